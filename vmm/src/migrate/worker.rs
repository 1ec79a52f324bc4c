//! The migration worker: a thread that sends the VM while the event loop keeps serving the
//! console and the control socket, then answers the `migrate` request on the connection it
//! took over (none for a detached migration). Every step goes to the process's event bus. On success the source VM ends (its guest runs at the destination); on failure
//! the guest is already running again here and only the error is reported; when the outcome
//! is unknown (handed over, no confirmation) the guest stays paused here, held for the
//! operator's decision.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use log::{error, info, warn};
use migration::fault::{FaultSource, FaultSpecError, Faults, FAULT_ENV};
use migration::send::{DeadlineAction, MigrationDeadline};
use migration::tls::TlsClient;
use migration::{
    send_migration, Cancel, Connection, Deadline, Endpoint, Limits, MigrationStats, Milestone,
    Observer, Progress, SendOptions, SourceError, Transport,
};
use serde::Serialize;

use super::outgoing::Outgoing;
use super::source_vm::SourceVm;
use crate::config::DirtyTracker;
use crate::control::events::EventBus;
use crate::control::protocol::{
    DestinationReport, Event, MigrateRequest, MigrateSummary, MigrationFigures, OnDeadline,
    PassProgress, ProgressLine, Reply, Side,
};
use crate::error_chain;
use crate::exit::VmExit;
use crate::sync::lock;
use crate::Vmm;

/// How long a source that handed its guest over waits for its event subscribers to get the
/// last events before it ends.
const FLUSH_EVENTS: Duration = Duration::from_secs(2);

/// What a migration worker reports to: the VM's outgoing slot and the process's event bus.
#[derive(Clone)]
pub struct Reporting {
    pub outgoing: Arc<Outgoing>,
    pub events: Arc<EventBus>,
}

/// Start the worker; it replies on `conn` (none when detached), keeps `outgoing` up to date
/// and frees it when done, and publishes every step. Setting `cancel` gives the migration up.
pub fn spawn(
    vmm: Arc<Mutex<Vmm>>,
    args: MigrateRequest,
    conn: Option<UnixStream>,
    report: Reporting,
    cancel: Cancel,
) {
    let body = move || {
        let Reporting { outgoing, events } = &report;
        let exit = lock(&vmm).exit_signal();
        events.publish(
            Side::Source,
            Event::Setup {
                to: args.to.clone(),
            },
        );
        let (reply, ended) = match migrate(&vmm, &args, conn.as_ref(), &report, cancel) {
            Ok((summary, ended)) => (Reply::Ok(summary), ended),
            Err(e) => {
                error!("migration to {} failed: {}", args.to, e.message);
                // Settled before the reply, which its reader may follow with `status` or
                // `migrate` at once.
                let event = if e.outcome_unknown {
                    outgoing.outcome_unknown();
                    Event::OutcomeUnknown {
                        to: args.to.clone(),
                        reason: e.message.clone(),
                    }
                } else {
                    outgoing.failed(e.cancelled, e.message.clone());
                    let reason = e.message.clone();
                    if e.cancelled {
                        Event::Cancelled { reason }
                    } else {
                        Event::Failed { reason }
                    }
                };
                events.publish(Side::Source, event);
                (Reply::Error(e.message), false)
            }
        };
        // A VM that left stays claimed: it must never be migrated a second time.
        if let Reply::Ok(summary) = &reply {
            if ended {
                outgoing.moved();
            } else {
                outgoing.end();
            }
            events.publish(
                Side::Source,
                Event::Completed {
                    summary: Box::new(summary.clone()),
                },
            );
        }
        if let Some(conn) = &conn {
            if let Err(e) = write_line(conn, &reply) {
                info!("migrate client went away before the reply: {e}");
            }
        }
        if ended {
            events.flush(FLUSH_EVENTS);
            exit.trigger(VmExit::Migrated(args.to.clone()));
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("migration".into())
        .spawn(body)
    {
        error!("cannot start the migration thread: {e}");
    }
}

fn write_line(mut conn: &UnixStream, v: &impl Serialize) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(v).map_err(io::Error::other)?;
    line.push('\n');
    conn.write_all(line.as_bytes())
}

/// Why a migration failed, whether its outcome is unknown (the guest stays paused here) and
/// whether it was given up rather than failed.
struct Failed {
    message: String,
    outcome_unknown: bool,
    cancelled: bool,
}

impl From<String> for Failed {
    fn from(message: String) -> Failed {
        Failed {
            message,
            outcome_unknown: false,
            cancelled: false,
        }
    }
}

impl From<SourceError> for Failed {
    fn from(e: SourceError) -> Failed {
        Failed {
            outcome_unknown: e.is_outcome_unknown(),
            cancelled: matches!(e, SourceError::Cancelled | SourceError::DeadlinePassed(_)),
            message: error_chain(&e),
        }
    }
}

/// Run one migration; returns its summary and whether the VM left this process.
fn migrate(
    vmm: &Arc<Mutex<Vmm>>,
    args: &MigrateRequest,
    conn: Option<&UnixStream>,
    report: &Reporting,
    cancel: Cancel,
) -> Result<(MigrateSummary, bool), Failed> {
    if let Some(flag) = args.zero_wait() {
        return Err(format!("{flag} must be at least 1 (milliseconds)").into());
    }
    let endpoint = Endpoint::parse(&args.to).map_err(|e| error_chain(&e))?;
    let is_file = matches!(endpoint, Endpoint::File(_));
    if args.local && !matches!(endpoint, Endpoint::Unix(_)) {
        return Err(format!(
            "--local needs a unix:PATH destination: memory descriptors pass only over a unix \
             socket to a process on this host, not to {}",
            args.to
        )
        .into());
    }
    let tls = tls_client(args, &endpoint)?;
    // The dirty ring is experimental: where guest code is emulated KVM has been seen to
    // overrun it and lose writes (README, "Dirty ring"). A migration that copies memory with
    // it therefore always verifies that memory end to end, so that a lost write makes the
    // destination refuse (the source resumes) instead of running a damaged guest.
    let ring = matches!(lock(vmm).config().dirty_tracker, DirtyTracker::Ring { .. });
    let verify_memory = args.verify_memory || (ring && !args.local);
    if verify_memory && !args.verify_memory {
        info!("the dirty ring is experimental: this migration verifies guest memory end to end");
    }
    let mut source = SourceVm::new(vmm.clone(), verify_memory).map_err(|e| error_chain(&e))?;
    let faults = armed_faults().map_err(|e| error_chain(&e))?;
    let connect_timeout = ms(args.connect_timeout_ms).unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let connection = endpoint
        .connect(connect_timeout)
        .map_err(|e| error_chain(&e))?;
    let progress_conn = match conn {
        Some(c) => Some(c.try_clone().map_err(|e| e.to_string())?),
        None => None,
    };
    let started = std::time::Instant::now();
    let default = SendOptions::default();
    let connections = u32::from(args.connections.unwrap_or(1));
    let connect = (connections > 1).then(|| data_connector(&endpoint, &tls, args, &default));
    let mut connection = match tls {
        Some((tls, name)) => secure(connection, &tls, &name, args, &default)?,
        None => connection,
    };
    let options = SendOptions {
        limits: limits(args),
        max_bandwidth: args.max_bandwidth,
        zero_elision: !args.no_zero_elision,
        io_timeout: ms(args.io_timeout_ms).unwrap_or(default.io_timeout),
        handshake_timeout: ms(args.handshake_timeout_ms).unwrap_or(default.handshake_timeout),
        switchover_timeout: ms(args.switchover_timeout_ms).unwrap_or(default.switchover_timeout),
        deadline: ms(args.deadline_ms).map(|after| MigrationDeadline {
            after,
            action: match args.on_deadline {
                OnDeadline::Cancel => DeadlineAction::Cancel,
                OnDeadline::Switchover => DeadlineAction::Switchover,
            },
        }),
        cancel,
        faults,
        local: args.local,
        connections,
        connect,
        progress: Some(Box::new({
            let Reporting { outgoing, events } = report.clone();
            move |p: &Progress| {
                let line = ProgressLine {
                    progress: PassProgress::from(p),
                };
                if let Some(conn) = &progress_conn {
                    let _ = write_line(conn, &line);
                }
                let figures = MigrationFigures::after_pass(p, started.elapsed().as_millis() as u64);
                outgoing.progress(line.progress.clone(), figures.clone());
                events.publish(
                    Side::Source,
                    Event::Pass {
                        progress: line.progress,
                        stats: figures,
                    },
                );
            }
        })),
        observer: Observer::new({
            let events = report.events.clone();
            move |m| match m {
                Milestone::Paused => events.publish(Side::Source, Event::Paused),
                Milestone::Committed => events.publish(Side::Source, Event::Committed),
                Milestone::Restored | Milestone::Running => {}
            }
        }),
        ..default
    };
    info!("migrating to {}", args.to);
    let stats = send_migration(&mut source, &mut connection, options)?;
    let stays = is_file && args.keep_running;
    if stays {
        lock(vmm).resume().map_err(|e| error_chain(&e))?;
    }
    info!("migration to {} complete: {stats}", args.to);
    let summary = summary(&stats, &source, args, lock(vmm).config().mem_bytes);
    report.outgoing.completed(summary.figures.clone());
    Ok((summary, !stays))
}

/// The TLS configuration of a migration with `tls_dir`, loaded by this process, and the name
/// the destination's certificate must be valid for. Plaintext over the network is allowed
/// (the destination decides) but warned about.
fn tls_client(
    args: &MigrateRequest,
    endpoint: &Endpoint,
) -> Result<Option<(TlsClient, String)>, String> {
    let host = match endpoint {
        Endpoint::Tcp { host, .. } => Some(host),
        _ => None,
    };
    let Some(dir) = &args.tls_dir else {
        if args.tls_name.is_some() {
            return Err("tls_name needs tls_dir".into());
        }
        if host.is_some_and(|h| !crate::config::is_loopback(h)) {
            warn!(
                "migrating to {} without TLS: the guest's memory crosses the network \
                 unencrypted and unauthenticated",
                args.to
            );
        }
        return Ok(None);
    };
    let Some(host) = host else {
        return Err(format!(
            "--tls-dir takes a tcp: destination, not {}",
            args.to
        ));
    };
    let tls = TlsClient::load(dir).map_err(|e| error_chain(&e))?;
    Ok(Some((
        tls,
        args.tls_name.clone().unwrap_or_else(|| host.clone()),
    )))
}

/// Opens the data connections of a migration with several: to the same endpoint, within
/// the connect timeout, over the same TLS as the control connection.
fn data_connector(
    endpoint: &Endpoint,
    tls: &Option<(TlsClient, String)>,
    args: &MigrateRequest,
    default: &SendOptions,
) -> migration::connections::Connector {
    let endpoint = endpoint.clone();
    let tls = tls.clone();
    let args = args.clone();
    let io_timeout = ms(args.io_timeout_ms).unwrap_or(default.io_timeout);
    let handshake = ms(args.handshake_timeout_ms).unwrap_or(default.handshake_timeout);
    let connect_timeout = ms(args.connect_timeout_ms).unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    Box::new(move || {
        let mut c = endpoint
            .connect(connect_timeout)
            .map_err(|e| error_chain(&e))?;
        let Some((tls, name)) = &tls else {
            return Ok(c);
        };
        c.set_read_timeout(Some(io_timeout))
            .and_then(|()| c.set_write_timeout(Some(io_timeout)))
            .map_err(|e| e.to_string())?;
        c.tls_client(tls, name, Deadline::after(handshake, "TLS handshake"))
            .map_err(|e| error_chain(&e))
    })
}

/// The TLS handshake with the destination, bounded by the handshake timeout. It fails before
/// anything of the guest was touched: the guest runs on.
fn secure(
    mut connection: Connection,
    tls: &TlsClient,
    name: &str,
    args: &MigrateRequest,
    default: &SendOptions,
) -> Result<Connection, String> {
    let io_timeout = ms(args.io_timeout_ms).unwrap_or(default.io_timeout);
    connection
        .set_read_timeout(Some(io_timeout))
        .and_then(|()| connection.set_write_timeout(Some(io_timeout)))
        .map_err(|e| e.to_string())?;
    let handshake = ms(args.handshake_timeout_ms).unwrap_or(default.handshake_timeout);
    let connection = connection
        .tls_client(tls, name, Deadline::after(handshake, "TLS handshake"))
        .map_err(|e| error_chain(&e))?;
    if let Some(who) = connection.tls_peer() {
        info!("TLS destination {}: {who}", args.to);
    }
    Ok(connection)
}

/// Default of `MigrateRequest::connect_timeout_ms`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn ms(v: Option<u64>) -> Option<Duration> {
    v.map(Duration::from_millis)
}

/// The fault of the next migration, as the environment (`MINIVMM_FAULT`) arms it, for the
/// fault matrix: a fixed fault fires once per process, a fault file is read again for each
/// migration.
pub fn armed_faults() -> Result<Faults, FaultSpecError> {
    static SOURCE: OnceLock<Option<FaultSource>> = OnceLock::new();
    static FIXED: OnceLock<Faults> = OnceLock::new();
    let source = match SOURCE.get() {
        Some(s) => s,
        None => {
            let s = FaultSource::from_env()?;
            SOURCE.get_or_init(|| s)
        }
    };
    match source {
        None => Ok(Faults::none()),
        Some(FaultSource::Fixed(f)) => Ok(FIXED
            .get_or_init(|| Faults::new(Some(*f)))
            .for_next_migration()),
        Some(file) => {
            let fault = file.next()?;
            if let Some(f) = fault {
                warn!("FAULT INJECTION ARMED ({FAULT_ENV}={file}): {f}");
            }
            Ok(Faults::new(fault))
        }
    }
}

/// The policy's limits: the request's, each default from `Limits::default`.
fn limits(args: &MigrateRequest) -> Limits {
    let default = Limits::default();
    Limits {
        downtime: args
            .downtime_ms
            .map_or(default.downtime, Duration::from_millis),
        max_passes: args.max_passes.map_or(default.max_passes, |n| n.max(1)),
        auto_converge: args.auto_converge,
    }
}

/// The reply: headline figures at the top level, everything in `stats`.
fn summary(
    stats: &MigrationStats,
    source: &SourceVm,
    args: &MigrateRequest,
    ram_bytes: u64,
) -> MigrateSummary {
    let t = &stats.totals;
    let dest: Option<DestinationReport> = stats
        .destination_report
        .as_deref()
        .and_then(|r| serde_json::from_str(r).ok());
    MigrateSummary {
        to: args.to.clone(),
        total_ms: stats.total_duration_us as f64 / 1000.0,
        downtime_ms: stats.downtime_us as f64 / 1000.0,
        passes: stats.passes.len() as u64,
        // A local migration sends no page: its bytes are the whole (small) stream.
        bytes_sent: if stats.local {
            stats.stream_bytes
        } else {
            t.bytes
        },
        pages_sent: t.pages_sent,
        pages_zero_elided: t.zero_elided,
        pages_zero_sent: t.zero_sent,
        pages_untouched_skipped: t.untouched_skipped,
        zero_elision: stats.zero_elision,
        converged: stats.converged,
        max_throttle_pct: stats.max_throttle_pct,
        nonzero_bytes: source
            .memory_hash
            .map(|h| h.nonzero_pages * migration::PAGE_SIZE as u64),
        mem_hash_source: source.memory_hash.map(|h| h.hex()),
        mem_hash_dest: dest.as_ref().and_then(|d| d.mem_hash.clone()),
        source_rss_kib: super::rss_kib(),
        dest_rss_kib: dest.as_ref().map(|d| d.rss_kib),
        destination: dest,
        figures: MigrationFigures::completed(stats, ram_bytes),
        stats: serde_json::to_value(stats).unwrap_or(serde_json::Value::Null),
    }
}

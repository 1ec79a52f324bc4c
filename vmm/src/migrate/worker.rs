//! The migration worker: a thread that sends the VM while the event loop keeps serving the
//! console and the control socket, then answers the `migrate` request on the connection it
//! took over. On success the source VM ends (its guest runs at the destination); on failure
//! the guest is already running again here and only the error is reported.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{error, info};
use migration::{
    send_migration, Cancel, Connection, Endpoint, Limits, MigrationStats, Progress, SendOptions,
    Transport,
};
use serde::Serialize;

use super::outgoing::Outgoing;
use super::source_vm::SourceVm;
use crate::control::protocol::{
    DestinationReport, MigrateRequest, MigrateSummary, PassProgress, ProgressLine, Reply,
};
use crate::error_chain;
use crate::exit::VmExit;
use crate::sync::lock;
use crate::Vmm;

/// Start the worker; it replies on `conn`, keeps `outgoing` up to date and frees it when done.
/// Setting `cancel` gives the migration up.
pub fn spawn(
    vmm: Arc<Mutex<Vmm>>,
    args: MigrateRequest,
    conn: UnixStream,
    outgoing: Arc<Outgoing>,
    cancel: Cancel,
) {
    let body = move || {
        let exit = lock(&vmm).exit_signal();
        let (reply, ended) = match migrate(&vmm, &args, &conn, &outgoing, cancel) {
            Ok((summary, ended)) => (Reply::Ok(summary), ended),
            Err(e) => {
                error!("migration to {} failed: {e}", args.to);
                (Reply::Error(e), false)
            }
        };
        // Settled before the reply, which its reader may follow with `status` or `migrate`
        // at once. A VM that left stays claimed: it must never be migrated a second time.
        if ended {
            outgoing.moved();
        } else {
            outgoing.end();
        }
        if let Err(e) = write_line(&conn, &reply) {
            info!("migrate client went away before the reply: {e}");
        }
        if ended {
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

/// Run one migration; returns its summary and whether the VM left this process.
fn migrate(
    vmm: &Arc<Mutex<Vmm>>,
    args: &MigrateRequest,
    conn: &UnixStream,
    outgoing: &Arc<Outgoing>,
    cancel: Cancel,
) -> Result<(MigrateSummary, bool), String> {
    let endpoint = Endpoint::parse(&args.to).map_err(|e| error_chain(&e))?;
    let is_file = matches!(endpoint, Endpoint::File(_));
    let mut source = SourceVm::new(vmm.clone(), args.verify_memory).map_err(|e| error_chain(&e))?;
    let connection = endpoint.connect().map_err(|e| error_chain(&e))?;
    let mut transport = FailAfter {
        inner: connection,
        budget: args.fail_after_bytes,
    };
    let progress_conn = conn.try_clone().map_err(|e| e.to_string())?;
    let options = SendOptions {
        limits: limits(args),
        max_bandwidth: args.max_bandwidth,
        zero_elision: !args.no_zero_elision,
        cancel,
        progress: Some(Box::new({
            let outgoing = outgoing.clone();
            move |p: &Progress| {
                let line = ProgressLine {
                    progress: PassProgress::from(p),
                };
                let _ = write_line(&progress_conn, &line);
                outgoing.progress(line.progress);
            }
        })),
        ..SendOptions::default()
    };
    info!("migrating to {}", args.to);
    let stats =
        send_migration(&mut source, &mut transport, options).map_err(|e| error_chain(&e))?;
    let stays = is_file && args.keep_running;
    if stays {
        lock(vmm).resume().map_err(|e| error_chain(&e))?;
    }
    info!("migration to {} complete: {stats}", args.to);
    Ok((summary(&stats, &source, args), !stays))
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
fn summary(stats: &MigrationStats, source: &SourceVm, args: &MigrateRequest) -> MigrateSummary {
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
        bytes_sent: t.bytes,
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
        stats: serde_json::to_value(stats).unwrap_or(serde_json::Value::Null),
    }
}

/// Fault injection (`fail_after_bytes`): the stream breaks after a byte budget, as when the
/// network or the destination dies mid-migration.
struct FailAfter {
    inner: Connection,
    budget: Option<u64>,
}

impl Transport for FailAfter {
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let Some(budget) = self.budget.as_mut() else {
            return self.inner.send(parts);
        };
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if len <= *budget {
            *budget -= len;
            return self.inner.send(parts);
        }
        if let Connection::Unix(s) = &self.inner {
            let _ = s.shutdown(Shutdown::Both);
        } else if let Connection::Tcp(s) = &self.inner {
            let _ = s.shutdown(Shutdown::Both);
        }
        Err(io::Error::other("injected failure (fail_after_bytes)"))
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.recv(buf)
    }

    fn has_peer(&self) -> bool {
        self.inner.has_peer()
    }

    fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(t)
    }

    fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(t)
    }
}

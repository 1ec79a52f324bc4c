//! The sending side of a migration: [`send_migration`], in four phases, each a function named
//! for it:
//!
//! 1. `handshake`: configuration and memory layout out, dirty logging on, the destination's
//!    `Ready` back (with whether its memory is pristine).
//! 2. `precopy`: the bulk pass, then dirty passes while the guest runs, each acknowledged
//!    (`PassEnd`/`PassDone`) and followed by the convergence policy (`precopy.rs`).
//! 3. `stop_and_copy`: pause, the final pass, device state, `End`, all within the switchover
//!    deadline.
//! 4. `complete`: the commit. The destination's `Restored`, then `Go`, then its `Running`
//!    (for a snapshot file: synced and renamed over the target).
//!
//! On any error before `Go` is sent, dirty logging is switched off and a paused guest is
//! resumed: the source VM keeps running and nothing is lost. After `Go` the guest is resumed
//! here only if the destination says it did not start it; otherwise it stays paused and the
//! error says the outcome is unknown. The VM is reached only through the contract in
//! `vm.rs`.

use std::collections::HashSet;
use std::io;
use std::time::{Duration, Instant};

use crate::cancel::{deadline_of, is_cancellation, Cancel};
use crate::connections::{Connector, DataWriters};
use crate::fault::{FaultPoint, Faults, FaultyTransport, InjectedFault};
use crate::memory::{layout_of, RamRegion};
use crate::observe::{Milestone, Observer};
use crate::precopy::{self, Decision, Limits};
use crate::ram_send::{DirtyLogError, PassError, RamSendConfig, RamSender};
use crate::records::{
    encode_layout, encode_local_memory, encode_message, Connections, PassDone, PassMark, Ready,
    Restored, StateBlob,
};
use crate::stats::{MigrationStats, PassStats, StopReason, Totals};
use crate::stream::{read_reply, RecordWriter};
use crate::transport::{Deadline, Transport};
use crate::vm::{MigrationSource, VmOpError};
use crate::wire::{self, RecordKind, WireError, MAX_DATA_CONNECTIONS, MAX_REGIONS};

/// Progress after each live pass.
#[derive(Clone, Debug)]
pub struct Progress {
    pub pass: u32,
    pub remaining_bytes: u64,
    pub bandwidth_bps: u64,
    pub dirty_rate_bps: u64,
    pub expected_downtime: Duration,
    /// The guest dirties memory at least as fast as it is sent.
    pub diverging: bool,
    /// Every pass so far, this one included.
    pub totals: Totals,
    /// Guest memory, bytes.
    pub ram_bytes: u64,
    /// From the start to the bulk pass (handshake, dirty logging on), microseconds.
    pub setup_us: u64,
}

/// Progress callback.
pub type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

/// The whole migration's deadline and what happens when it passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationDeadline {
    /// From the start of [`send_migration`].
    pub after: Duration,
    pub action: DeadlineAction,
}

/// What a passed [`MigrationDeadline`] does (as Cloud Hypervisor's `timeout_strategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadlineAction {
    /// Give the migration up (the source keeps the guest), at once if pre-copy is still
    /// running, or during the final pass if that is where it is.
    Cancel,
    /// Stop pre-copy after the pass in progress and switch over whatever is left (a longer
    /// downtime); once paused, the final pass is bounded by
    /// [`SendOptions::switchover_timeout`] as always.
    Switchover,
}

/// Options of [`send_migration`]. Every wait is bounded: the defaults suit a real network;
/// tests shorten them.
pub struct SendOptions {
    pub limits: Limits,
    /// Stream bytes per second during the live passes, `None` for unlimited. The final pass
    /// is never throttled (the guest is paused).
    pub max_bandwidth: Option<u64>,
    /// Elide zero pages from the bulk pass when the destination is pristine (`--no-zero-elision`
    /// turns it off).
    pub zero_elision: bool,
    /// Longest wait for any one read or write on the connection: a destination reply, or a
    /// destination that stopped reading the stream.
    pub io_timeout: Duration,
    /// Longest wait from the first byte until the destination's `Ready` (it builds its VM and
    /// proves its memory pristine meanwhile).
    pub handshake_timeout: Duration,
    /// Longest the guest may stay paused before the commit (final pass, state, the
    /// destination's restore): past it the migration fails and the guest resumes here,
    /// however slowly the destination still reads.
    pub switchover_timeout: Duration,
    /// The whole migration's deadline, if any.
    pub deadline: Option<MigrationDeadline>,
    /// Called after each pass.
    pub progress: Option<ProgressFn>,
    /// Use pagemap to skip never-touched pages without reading them.
    pub use_pagemap: bool,
    /// Most data pages per record (1..=1024).
    pub batch_pages: usize,
    /// Gives the migration up when set (before any record of guest memory, between passes).
    pub cancel: Cancel,
    /// The fault to inject, if any (tests; see `fault.rs`).
    pub faults: Faults,
    /// Local migration (unix sockets): guest memory goes across by descriptor, no RAM pass
    /// (`local.rs`).
    pub local: bool,
    /// Told when the guest is paused, when `Go` went out and when `Running` came back.
    pub observer: Observer,
    /// Connections to the destination (1 to 16): the one given to [`send_migration`] is the
    /// control connection, and `connections - 1` data connections opened with `connect`
    /// carry the live passes' pages (`connections.rs`).
    pub connections: u32,
    /// Opens a data connection (needed when `connections` > 1).
    pub connect: Option<Connector>,
    /// Test hook run after each page's zero check, before the page is queued.
    #[cfg(test)]
    pub(crate) scan_hook: Option<Box<dyn FnMut(usize, usize) + Send>>,
}

/// Default of [`SendOptions::io_timeout`].
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`SendOptions::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`SendOptions::switchover_timeout`].
pub const DEFAULT_SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            limits: Limits::default(),
            max_bandwidth: None,
            zero_elision: true,
            io_timeout: DEFAULT_IO_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            switchover_timeout: DEFAULT_SWITCHOVER_TIMEOUT,
            deadline: None,
            progress: None,
            use_pagemap: true,
            batch_pages: wire::MAX_BATCH_DATA_PAGES,
            cancel: Cancel::default(),
            faults: Faults::none(),
            local: false,
            observer: Observer::default(),
            connections: 1,
            connect: None,
            #[cfg(test)]
            scan_hook: None,
        }
    }
}

/// Errors of the source side. After any of them but [`SourceError::OutcomeUnknown`] the
/// guest runs on the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Invalid guest memory layout: {0}")]
    Layout(String),
    #[error("Getting the configuration blob failed")]
    Config(#[source] VmOpError),
    #[error("Writing the migration stream failed")]
    Send(#[source] io::Error),
    #[error("Reading the destination's reply failed")]
    Reply(#[source] WireError),
    #[error("Unexpected {0} reply from the destination")]
    UnexpectedReply(RecordKind),
    #[error("Destination acknowledged pass {got}, expected pass {expected}")]
    PassMismatch { expected: u32, got: u32 },
    #[error("Destination failed: {0}")]
    Destination(String),
    #[error("The migration was cancelled")]
    Cancelled,
    #[error("The migration's deadline ({0:?}) passed")]
    DeadlinePassed(Duration),
    #[error("Starting dirty logging failed")]
    StartDirtyLog(#[source] VmOpError),
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    #[error("Invalid PassDone reply: {0}")]
    TornPages(#[source] crate::ram_send::TornOutside),
    #[error("Stopping dirty logging failed")]
    StopDirtyLog(#[source] VmOpError),
    #[error("Between-passes hook failed")]
    BetweenPasses(#[source] VmOpError),
    #[error("Pausing the guest failed")]
    Pause(#[source] VmOpError),
    #[error("Saving device state failed")]
    SaveState(#[source] VmOpError),
    #[error("Invalid device state: {0}")]
    InvalidState(String),
    #[error("Making the snapshot durable failed")]
    Commit(#[source] io::Error),
    #[error(
        "The destination's commit window ({window:?}) was half over when its Restored \
         arrived here: not committing"
    )]
    CommitWindow { window: Duration },
    #[error("Injected fault")]
    Fault(#[source] io::Error),
    #[error("Local migration needs a unix socket (descriptors pass only there), not {0}")]
    LocalNeedsUnix(&'static str),
    #[error("{0}")]
    Connections(String),
    #[error("Opening the data connections failed")]
    DataConnections(#[source] io::Error),
    #[error("The destination answered Ready {0} local mode")]
    LocalMismatch(&'static str),
    #[error(
        "The destination failed to start the guest after the commit (it is not running there): {0}"
    )]
    FailedAfterCommit(String),
    #[error(
        "Outcome unknown: the guest was handed over (Go sent) but the destination's Running \
         never arrived; it may be running there. The guest stays paused here: `resume --force` \
         runs it here (only if it does not run there), `shutdown` ends it"
    )]
    OutcomeUnknown(#[source] Box<SourceError>),
    #[error("Migration failed ({failure}) and resuming the guest failed")]
    Resume {
        failure: Box<SourceError>,
        #[source]
        source: VmOpError,
    },
}

impl SourceError {
    /// Whether the guest was handed over and may run at the destination: it stays paused
    /// here and only an operator may resume it.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, SourceError::OutcomeUnknown(_))
    }
}

/// What must be undone if the migration fails.
#[derive(Default)]
struct Undo {
    logging: bool,
    paused: bool,
    /// `Go` went out: the guest must not be resumed here unless the destination says it is
    /// not running.
    committed: bool,
}

/// Migrates the VM behind `source` over `transport`. Returns once the destination reported
/// the guest running (for a snapshot file: once the snapshot is durable); the caller then
/// stops the source VM. On error the source guest is running again, except after the commit
/// with no answer from the destination ([`SourceError::OutcomeUnknown`]): then it stays
/// paused.
pub fn send_migration<S: MigrationSource + ?Sized>(
    source: &mut S,
    transport: &mut dyn Transport,
    mut options: SendOptions,
) -> Result<MigrationStats, SourceError> {
    let mut undo = Undo::default();
    let faults = options.faults.clone();
    let mut transport = FaultyTransport::new(transport, faults);
    let result = run(source, &mut transport, &mut options, &mut undo);
    transport.set_deadline(None);
    let _ = transport.set_read_timeout(None);
    let _ = transport.set_write_timeout(None);
    let Err(failure) = result else {
        return result;
    };
    log::error!("Migration failed: {failure}");
    if undo.logging {
        if let Err(e) = source.stop_dirty_log() {
            log::warn!("Stopping dirty logging after the failure failed: {e}");
        }
    }
    if undo.committed {
        log::error!("The guest stays paused here: the destination may be running it");
        return Err(failure);
    }
    if undo.paused {
        if let Err(source) = source.resume() {
            return Err(SourceError::Resume {
                failure: Box::new(failure),
                source,
            });
        }
        log::info!("Guest resumed on the source");
    }
    Err(failure)
}

/// One migration in progress: what every phase works on.
struct Outbound<'a, S: ?Sized> {
    source: &'a mut S,
    w: RecordWriter<'a>,
    options: &'a mut SendOptions,
    undo: &'a mut Undo,
    /// A socket (the destination replies), not a snapshot file.
    peer: bool,
    /// When the whole migration's deadline passes, and what it does then.
    deadline: Option<(Instant, MigrationDeadline)>,
    stats: MigrationStats,
    /// Guest memory, bytes (for progress reports).
    ram_bytes: u64,
}

fn run<S: MigrationSource + ?Sized>(
    source: &mut S,
    transport: &mut dyn Transport,
    options: &mut SendOptions,
    undo: &mut Undo,
) -> Result<MigrationStats, SourceError> {
    let started = Instant::now();
    let regions = source.ram_regions();
    check_layout(&regions)?;
    let peer = transport.has_peer();
    if options.local && !transport.passes_fds() {
        let what = if peer {
            "this connection"
        } else {
            "a snapshot file"
        };
        return Err(SourceError::LocalNeedsUnix(what));
    }
    if options.connections > 1 {
        let why = if !peer {
            Some("a snapshot file is one stream: --connections needs a socket")
        } else if options.local {
            Some("a local migration copies no memory: --connections does not apply")
        } else if options.connections > MAX_DATA_CONNECTIONS + 1 {
            Some("at most 16 connections")
        } else if options.connect.is_none() {
            Some("no way to open the data connections")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(SourceError::Connections(format!(
                "{} connections: {why}",
                options.connections
            )));
        }
    }
    if peer {
        transport
            .set_read_timeout(Some(options.io_timeout))
            .and_then(|_| transport.set_write_timeout(Some(options.io_timeout)))
            .map_err(SourceError::Send)?;
    }
    options
        .faults
        .hit(FaultPoint::Connect)
        .map_err(SourceError::Fault)?;
    let deadline = options.deadline.map(|d| (started + d.after, d));
    let mut m = Outbound {
        source,
        w: RecordWriter::start(transport).map_err(SourceError::Send)?,
        options,
        undo,
        peer,
        deadline,
        stats: MigrationStats::default(),
        ram_bytes: regions.iter().map(|r| r.len() as u64).sum(),
    };
    let elide = handshake(&mut m, &regions, started)?;
    // Checked above: with more than one connection there is a way to open them.
    let data = match m.options.connect.take() {
        Some(mut connect) if m.options.connections > 1 => {
            Some(join_data_connections(&mut m, &mut connect)?)
        }
        _ => None,
    };
    let mut ram = RamSender::new(
        regions,
        RamSendConfig {
            batch_pages: m.options.batch_pages,
            max_bandwidth: m.options.max_bandwidth,
            use_pagemap: m.options.use_pagemap,
        },
    );
    ram.set_stop(
        m.options.cancel.clone(),
        m.deadline
            .filter(|(_, d)| d.action == DeadlineAction::Cancel)
            .map(|(at, d)| (at, d.after)),
    );
    ram.set_faults(m.options.faults.clone());
    #[cfg(test)]
    {
        ram.scan_hook = m.options.scan_hook.take();
    }
    if let Some(data) = data {
        ram.set_data(data);
    }
    if !m.options.local {
        precopy(&mut m, &mut ram, elide)?;
    }
    let data_bytes = ram.finish_data().map_err(|e| send_error(&mut m.w, e))?;
    let paused_at = stop_and_copy(&mut m, &mut ram)?;
    complete(&mut m, paused_at)?;
    m.stats.total_duration_us = started.elapsed().as_micros() as u64;
    m.stats.stream_bytes = m.w.bytes() + data_bytes;
    m.stats.data_connections = m.options.connections.saturating_sub(1);
    m.stats.local = m.options.local;
    log::info!("Migration complete: {}", m.stats);
    Ok(m.stats)
}

/// Phase 1: the configuration and memory layout go out, dirty logging goes on, and the
/// destination answers `Ready`. Returns whether the bulk pass may elide zero pages.
fn handshake<S: MigrationSource + ?Sized>(
    m: &mut Outbound<'_, S>,
    regions: &[RamRegion],
    started: Instant,
) -> Result<bool, SourceError> {
    let mut setup = Phases::new(started);
    let config = m.source.config_blob().map_err(SourceError::Config)?;
    if config.len() > wire::MAX_CONFIG_LEN {
        return Err(SourceError::Layout(format!(
            "configuration blob is {} bytes",
            config.len()
        )));
    }
    let sent =
        m.w.write_record(RecordKind::Config, &[&config])
            .and_then(|_| {
                if m.options.local {
                    // The memory itself goes across: the files, with one record describing them.
                    let (entries, fds) = crate::local::describe(regions);
                    let payload = encode_local_memory(&entries);
                    m.w.write_record_with_fds(RecordKind::LocalMemory, &[&payload], &fds)
                } else {
                    let layout = encode_layout(&layout_of(regions));
                    m.w.write_record(RecordKind::MemoryLayout, &[&layout])
                }
            });
    if let Err(e) = sent {
        // A destination that refuses at once (a TLS endpoint, say) may have said why.
        return Err(send_error(&mut m.w, e));
    }
    if m.options.local {
        setup.end("send configuration and memory");
    } else {
        setup.end("send configuration");
        // Dirty logging goes on before the first byte of guest memory is read; here, while
        // the destination builds its VM and proves its memory zero, rather than after.
        m.source
            .start_dirty_log()
            .map_err(SourceError::StartDirtyLog)?;
        m.undo.logging = true;
        setup.end("start dirty log");
    }

    m.options
        .faults
        .hit(FaultPoint::BeforeReady)
        .map_err(SourceError::Fault)?;
    // Without a peer (snapshot file) the loader proves or makes its memory pristine itself.
    let pristine = if m.peer {
        let t = m.w.transport();
        t.set_deadline(Some(Deadline {
            at: started + m.options.handshake_timeout,
            what: "handshake",
        }));
        let ready = expect_reply(t, RecordKind::Ready);
        t.set_deadline(None);
        let ready = Ready::decode(&ready?, 0).map_err(SourceError::Reply)?;
        match (ready.local, m.options.local) {
            (false, true) => return Err(SourceError::LocalMismatch("without")),
            (true, false) => return Err(SourceError::LocalMismatch("in")),
            _ => {}
        }
        ready.pristine
    } else {
        true
    };
    setup.end("destination ready");
    let elide = m.options.zero_elision && pristine;
    log::info!(
        "Migrating {} regions, destination pristine: {pristine}, zero elision: {elide}",
        regions.len()
    );
    m.stats.zero_elision = elide;
    m.stats.setup_phases_us = setup.done();
    Ok(elide)
}

/// Phase 1b, with several connections: `Connections` out, the data connections opened and
/// joined (each sends `Join` with the token), the destination's `Joined` back within the
/// handshake timeout.
fn join_data_connections<S: MigrationSource + ?Sized>(
    m: &mut Outbound<'_, S>,
    connect: &mut Connector,
) -> Result<DataWriters, SourceError> {
    let t = Instant::now();
    let count = m.options.connections - 1;
    let token = crate::connections::new_token().map_err(SourceError::DataConnections)?;
    m.w.write_record(
        RecordKind::Connections,
        &[&Connections { count, token }.encode()],
    )
    .map_err(|e| send_error(&mut m.w, e))?;
    let data = DataWriters::open(count, token, connect, m.options.io_timeout).map_err(|e| {
        // A destination that refused the `Connections` record says why on this one.
        match send_error(&mut m.w, e) {
            SourceError::Send(e) => SourceError::DataConnections(e),
            other => other,
        }
    })?;
    let tr = m.w.transport();
    tr.set_deadline(Some(Deadline::after(
        m.options.handshake_timeout,
        "data connections joining",
    )));
    let joined = expect_reply(tr, RecordKind::Joined);
    tr.set_deadline(None);
    joined?;
    log::info!("{count} data connections joined");
    m.stats
        .setup_phases_us
        .push(("join data connections", t.elapsed().as_micros() as u64));
    Ok(data)
}

/// Phase 2: the bulk pass, then dirty passes with the guest running until the policy stops
/// them. After each pass: the destination applied it, the dirty log is fetched, the policy
/// decides and sets auto-converge's throttle.
fn precopy<S: MigrationSource + ?Sized>(
    m: &mut Outbound<'_, S>,
    ram: &mut RamSender,
    elide: bool,
) -> Result<(), SourceError> {
    let limits = m.options.limits;
    let mut throttle = 0;
    let mut pass = ram
        .bulk_pass(&mut m.w, &mut *m.source, elide)
        .map_err(|e| pass_error(&mut m.w, e))?;
    let reason = loop {
        if m.peer {
            ram.end_data_pass(pass.pass)
                .map_err(|e| send_error(&mut m.w, e))?;
            let done = wait_until_applied(&mut m.w, pass.pass)?;
            // Torn pages are sent again (they are in the dirty log as well when the guest
            // tore them; the link may have too).
            pass.torn_pages = done.torn.iter().map(|t| u64::from(t.pages)).sum();
            ram.resend(&done.torn).map_err(SourceError::TornPages)?;
        }
        if m.options.cancel.is_cancelled() {
            return Err(abort(&mut m.w, "cancelled on the source"));
        }
        let dirty = ram
            .collect_dirty(&mut *m.source)
            .map_err(|e| pass_error(&mut m.w, e))?;
        pass.close(ram.pass_elapsed(), dirty);
        report(m, &pass);
        throttle = precopy::throttle_pct(throttle, &pass, &limits);
        m.source
            .between_passes(&pass, throttle)
            .map_err(SourceError::BetweenPasses)?;
        let mut decision = precopy::decide(&pass, &limits);
        if let Some((at, d)) = m.deadline.filter(|(at, _)| Instant::now() >= *at) {
            let _ = at;
            match d.action {
                DeadlineAction::Cancel => return Err(deadline_passed(&mut m.w, d.after)),
                DeadlineAction::Switchover if decision == Decision::Continue => {
                    log::warn!(
                        "The migration's deadline ({:?}) passed: switching over",
                        d.after
                    );
                    decision = Decision::StopAndCopy(StopReason::Deadline);
                }
                DeadlineAction::Switchover => {}
            }
        }
        let next = pass.pass + 1;
        m.stats.expected_downtime_us = expected_downtime(&pass).as_micros() as u64;
        m.stats.max_throttle_pct = m.stats.max_throttle_pct.max(throttle);
        m.stats.push(std::mem::take(&mut pass));
        match decision {
            Decision::Continue => {
                pass = ram
                    .dirty_pass(&mut m.w, &mut *m.source, next, false)
                    .map_err(|e| pass_error(&mut m.w, e))?
            }
            Decision::StopAndCopy(reason) => break reason,
        }
    };
    m.stats.stop_reason = reason;
    m.stats.converged = reason == StopReason::Converged;
    if !m.stats.converged {
        log::warn!(
            "Pre-copy did not converge in {} passes; expected downtime {} ms",
            m.stats.passes.len(),
            m.stats.expected_downtime_us / 1000
        );
    }
    Ok(())
}

/// Phase 3: pause the guest, send what it dirtied since the last pass, its device and vCPU
/// state, and `End`. Cancellation is honoured up to the pause; from then on the migration
/// completes or fails. Returns when the guest was paused.
fn stop_and_copy<S: MigrationSource + ?Sized>(
    m: &mut Outbound<'_, S>,
    ram: &mut RamSender,
) -> Result<Instant, SourceError> {
    if m.options.cancel.is_cancelled() {
        return Err(abort(&mut m.w, "cancelled on the source"));
    }
    let paused_at = Instant::now();
    let mut phase = Phases::new(paused_at);
    // From the pause to the commit nothing may wait longer than the switchover allows (nor
    // past a cancelling deadline): a destination that reads slowly cannot hold the guest.
    let mut bound = Deadline {
        at: paused_at + m.options.switchover_timeout,
        what: "switchover",
    };
    if let Some((at, d)) = m.deadline {
        if d.action == DeadlineAction::Cancel && at < bound.at {
            bound = Deadline {
                at,
                what: "migration",
            };
        }
    }
    m.w.transport().set_deadline(Some(bound));
    // A pause that fails half-way may have stopped some vCPUs: resume on error either way.
    m.undo.paused = true;
    m.source.pause().map_err(SourceError::Pause)?;
    m.options.observer.tell(Milestone::Paused);
    phase.end("pause");
    // A local migration has no RAM to send: the destination maps the same memory.
    if !m.options.local {
        ram.collect_dirty(&mut *m.source)
            .map_err(|e| pass_error(&mut m.w, e))?;
        phase.end("dirty log");
        ram.set_paused(true);
        let mut last = ram
            .dirty_pass(&mut m.w, &mut *m.source, m.stats.passes.len() as u32, true)
            .map_err(|e| pass_error(&mut m.w, e))?;
        last.close(ram.pass_elapsed(), 0);
        m.stats.push(last);
        phase.end("final pass");
    }

    let states = m.source.save_state().map_err(SourceError::SaveState)?;
    check_states(&states)?;
    phase.end("save state");
    m.options
        .faults
        .hit(FaultPoint::StateSend)
        .map_err(SourceError::Fault)?;
    for s in &states {
        m.stats.state_bytes +=
            m.w.write_record(RecordKind::DeviceState, &[&s.encode_head(), &s.data])
                .map_err(|e| send_error(&mut m.w, e))?;
    }
    m.w.finish().map_err(|e| send_error(&mut m.w, e))?;
    phase.end("send state");
    m.stats.downtime_phases_us = phase.done();
    Ok(paused_at)
}

/// Phase 4: the commit. A snapshot file is complete once durable (synced and renamed over
/// the target). Over a socket: the destination restores everything without resuming and
/// answers `Restored`; this side commits by sending `Go` (from then on it never resumes the
/// guest on its own); the destination resumes on `Go` and answers `Running`. Without
/// `Running`, the outcome is unknown and the guest stays paused here.
fn complete<S: MigrationSource + ?Sized>(
    m: &mut Outbound<'_, S>,
    paused_at: Instant,
) -> Result<(), SourceError> {
    let mut phase = Phases::new(Instant::now());
    if !m.peer {
        m.w.transport().commit().map_err(SourceError::Commit)?;
        phase.end("sync snapshot");
    } else {
        let faults = m.options.faults.clone();
        faults
            .hit(FaultPoint::BeforeRestored)
            .map_err(SourceError::Fault)?;
        let restored = expect_reply(m.w.transport(), RecordKind::Restored)?;
        let received = Instant::now();
        let window = Restored::decode(&restored, 0)
            .map_err(SourceError::Reply)?
            .go_timeout;
        phase.end("destination restore");
        faults
            .hit(FaultPoint::BeforeGo)
            .map_err(SourceError::Fault)?;
        // The destination gives up `window` after it sent Restored, which was some time
        // before it arrived here: commit only with half the window left, so `Go` is there in
        // time (or the destination knows to discard).
        if received.elapsed() >= window / 2 {
            let why = "the destination's commit window passed";
            let _ = m.w.write_record(RecordKind::Abort, &[&encode_message(why)]);
            return Err(SourceError::CommitWindow { window });
        }
        m.undo.committed = true;
        if let Err(e) = m.w.write_record(RecordKind::Go, &[]) {
            // The write failed before a byte of `Go` left: the destination cannot run it.
            m.undo.committed = false;
            return Err(SourceError::Send(e));
        }
        log::info!("Committed: Go sent; the guest is the destination's now");
        m.options.observer.tell(Milestone::Committed);
        m.w.transport().set_deadline(None);
        phase.end("commit");
        let running = faults
            .hit(FaultPoint::BeforeRunning)
            .map_err(SourceError::Fault)
            .and_then(|()| expect_reply(m.w.transport(), RecordKind::Running));
        match running {
            Ok(report) if !report.is_empty() => {
                m.stats.destination_report = Some(String::from_utf8_lossy(&report).into_owned());
            }
            Ok(_) => {}
            // The destination says it did not start the guest and never will: it is ours.
            Err(SourceError::Destination(why)) => {
                m.undo.committed = false;
                return Err(SourceError::FailedAfterCommit(why));
            }
            Err(e) => return Err(SourceError::OutcomeUnknown(Box::new(e))),
        }
        m.options.observer.tell(Milestone::Running);
        phase.end("destination running");
        if let Err(e) = faults.hit(FaultPoint::AfterRunning) {
            log::warn!("{e}: ignored, the migration has completed");
        }
    }
    m.stats.downtime_us = paused_at.elapsed().as_micros() as u64;
    m.stats.downtime_phases_us.extend(phase.done());
    // The guest runs at the destination (or is in the snapshot): nothing may resume it here.
    m.undo.paused = false;
    m.undo.committed = false;
    m.undo.logging = false;
    if let Err(e) = m.source.stop_dirty_log() {
        log::warn!("Stopping dirty logging after the migration failed: {e}");
    }
    Ok(())
}

/// Durations of consecutive phases.
struct Phases {
    last: Instant,
    done: Vec<(&'static str, u64)>,
}

impl Phases {
    fn new(start: Instant) -> Phases {
        Phases {
            last: start,
            done: Vec::new(),
        }
    }

    fn end(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done
            .push((name, now.duration_since(self.last).as_micros() as u64));
        self.last = now;
    }

    fn done(self) -> Vec<(&'static str, u64)> {
        self.done
    }
}

fn check_layout(regions: &[RamRegion]) -> Result<(), SourceError> {
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return Err(SourceError::Layout(format!(
            "{} regions, expected 1..={MAX_REGIONS}",
            regions.len()
        )));
    }
    for pair in regions.windows(2) {
        if pair[1].guest_addr() < pair[0].guest_addr() + pair[0].len() as u64 {
            return Err(SourceError::Layout(format!(
                "region at {:#x} overlaps or precedes the one at {:#x}",
                pair[1].guest_addr(),
                pair[0].guest_addr()
            )));
        }
    }
    Ok(())
}

fn check_states(states: &[StateBlob]) -> Result<(), SourceError> {
    let mut ids = HashSet::new();
    for s in states {
        s.check().map_err(SourceError::InvalidState)?;
        if !ids.insert(s.id.as_str()) {
            return Err(SourceError::InvalidState(format!(
                "duplicate state id {:?}",
                s.id
            )));
        }
    }
    Ok(())
}

fn expected_downtime(p: &PassStats) -> Duration {
    precopy::expected_time(p.remaining_bytes(), p.bandwidth_bps).min(Duration::from_secs(86_400))
}

fn report<S: ?Sized>(m: &mut Outbound<'_, S>, p: &PassStats) {
    log::debug!("{p}");
    let Some(cb) = m.options.progress.as_mut() else {
        return;
    };
    let mut totals = m.stats.totals.clone();
    totals.add(p);
    cb(&Progress {
        pass: p.pass,
        remaining_bytes: p.remaining_bytes(),
        bandwidth_bps: p.bandwidth_bps,
        dirty_rate_bps: p.dirty_rate_bps,
        expected_downtime: expected_downtime(p),
        diverging: precopy::diverging(p),
        totals,
        ram_bytes: m.ram_bytes,
        setup_us: m.stats.setup_phases_us.iter().map(|(_, us)| us).sum(),
    });
}

/// Reads one reply and insists on `kind`; an `Error` reply becomes the destination's message.
fn expect_reply(t: &mut dyn Transport, kind: RecordKind) -> Result<Vec<u8>, SourceError> {
    match read_reply(t).map_err(SourceError::Reply)? {
        (k, payload) if k == kind => Ok(payload),
        (RecordKind::Error, msg) => Err(SourceError::Destination(
            String::from_utf8_lossy(&msg).into_owned(),
        )),
        (k, _) => Err(SourceError::UnexpectedReply(k)),
    }
}

/// Ends live pass `pass` with `PassEnd` and waits for the destination's `PassDone`: every
/// page sent is then in its memory, not in socket buffers. So the pass's duration and
/// bandwidth are end to end, and the downtime never starts with a backlog the destination
/// must work through while the guest is paused. Costs one round trip per pass. The answer
/// lists the pages the destination holds torn.
fn wait_until_applied(w: &mut RecordWriter<'_>, pass: u32) -> Result<PassDone, SourceError> {
    w.write_record(RecordKind::PassEnd, &[&PassMark { pass }.encode()])
        .map_err(|e| send_error(w, e))?;
    let reply = expect_reply(w.transport(), RecordKind::PassDone)?;
    let done = PassDone::decode(&reply, 0).map_err(SourceError::Reply)?;
    if done.pass != pass {
        return Err(SourceError::PassMismatch {
            expected: pass,
            got: done.pass,
        });
    }
    Ok(done)
}

/// A failed RAM pass as the migration's error.
fn pass_error(w: &mut RecordWriter<'_>, e: PassError) -> SourceError {
    match e {
        PassError::Send(e) => send_error(w, e),
        PassError::DirtyLog(e) => SourceError::DirtyLog(e),
    }
}

/// Tells the destination the migration is given up (best effort: it may be gone).
fn abort(w: &mut RecordWriter<'_>, why: &str) -> SourceError {
    if let Err(e) = w.write_record(RecordKind::Abort, &[&encode_message(why)]) {
        log::info!("The destination did not take the Abort record: {e}");
    }
    SourceError::Cancelled
}

/// The migration's deadline passed during pre-copy (action `cancel`): the stream ends with
/// `Abort` and the guest stays here.
fn deadline_passed(w: &mut RecordWriter<'_>, after: Duration) -> SourceError {
    abort(
        w,
        &format!("the migration's deadline ({after:?}) passed on the source"),
    );
    SourceError::DeadlinePassed(after)
}

/// A failed write often means the destination gave up: report its message if it sent one.
/// A cancellation surfacing as a write error ends the stream with `Abort` instead.
fn send_error(w: &mut RecordWriter<'_>, e: io::Error) -> SourceError {
    if is_cancellation(&e) {
        return abort(w, "cancelled on the source");
    }
    if let Some(after) = deadline_of(&e) {
        return deadline_passed(w, after);
    }
    if e.get_ref().is_some_and(|inner| inner.is::<InjectedFault>()) {
        return SourceError::Fault(e);
    }
    let t = w.transport();
    if t.has_peer() && t.set_read_timeout(Some(Duration::from_secs(2))).is_ok() {
        if let Ok((RecordKind::Error, msg)) = read_reply(t) {
            return SourceError::Destination(String::from_utf8_lossy(&msg).into_owned());
        }
    }
    SourceError::Send(e)
}

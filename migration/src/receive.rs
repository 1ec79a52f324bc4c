//! The receiving side of a migration: [`receive_migration`], which drives a
//! [`MigrationTarget`] (the contract in `vm.rs`, implemented by the vmm).
//!
//! Receiver states:
//!
//! ```text
//! Header ─▶ Config ─▶ Layout ─▶ (prove or reset pristine memory, reply Ready)   handshake deadline
//!   ─▶ { PassBegin RamPages* [PassEnd → PassDone{torn}] }+  (last pass flagged final)
//!   ─▶ DeviceState* ─▶ End (counts + checksum chain verified, no page left torn)
//!   ─▶ restore_state ─▶ reply Restored ─▶ wait for Go                       commit deadline
//!   ─▶ (committed) resume ─▶ reply Running
//! ```
//!
//! The first two steps, the stream header and `Config` within the handshake deadline, are
//! [`read_handshake`] of their own: until they arrived a connection is not a migration
//! attempt (a probe, a port scan, garbage, an idle peer), and a caller that serves a
//! listening socket may run them for several connections at once ([`crate::accept`]), then
//! go on with [`receive_handshaken`]. [`receive_migration`] is both in one.
//!
//! Before `Go` any error, in any state, returns `Err` without resuming (a half-restored guest
//! never runs) and, when there is a peer, tells the source why: the source keeps its guest.
//! Once `Go` arrived the guest is this side's: it is resumed and reported `Running`, and a
//! request to give up comes too late. A snapshot file has no peer and no commit step.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::connections::{read_lane, DataError, DataPasses, Joins};
use crate::fault::{FaultPoint, Faults, FaultyTransport};
use crate::memory::layout_of;
use crate::observe::{Milestone, Observer};
use crate::ram_recv::{RamLoadError, RamReceiver};
use crate::records::{
    decode_layout, decode_local_memory, encode_message, Connections, EndRecord, Join, PassBegin,
    PassDone, PassMark, Ready, Restored, StateBlob,
};
use crate::stats::ReceiveStats;
use crate::stream::{send_reply, ReaderState, RecordReader};
use crate::sync::lock;
use crate::transport::{Deadline, Transport};
use crate::vm::{MigrationTarget, VmOpError};
use crate::wire::{
    RecordHeader, RecordKind, WireError, FORMAT_VERSION, MAX_DEVICE_STATES, MAX_DEVICE_STATE_BYTES,
    MAX_MESSAGE_LEN, MAX_TORN_RUNS, PASS_FINAL, PASS_ZERO_ELIDED,
};

/// Options of [`receive_migration`].
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// When guest memory is not provably zero: reset it (`MADV_DONTNEED` everything) so the
    /// source may elide zero pages; if false, declare it not pristine and receive every page.
    pub reset_if_not_pristine: bool,
    /// Longest wait for any one read or write (sockets).
    pub io_timeout: Option<Duration>,
    /// Longest from the connection to the `Ready` reply: a peer that connects and sends
    /// nothing, or trickles, holds the destination no longer.
    pub handshake_timeout: Duration,
    /// How long the restored guest waits for the source's `Go` before it is discarded.
    pub go_timeout: Duration,
    /// Longest from the connection to the stream's `End` (sockets; `None`: no limit): a
    /// source that sends one valid record just inside each read timeout holds the
    /// destination no longer. The commit window after `Restored` is `go_timeout`'s.
    pub deadline: Option<Duration>,
    /// The fault to inject, if any (tests; see `fault.rs`).
    pub faults: Faults,
    /// Set (with the connection's reading side shut down to wake the reader) to give the
    /// migration up: it fails as [`DestinationError::GivenUp`], which the source is told.
    pub give_up: Cancel,
    /// Updated as records arrive, for whoever reports on the receive meanwhile.
    pub progress: Arc<ReceiveProgress>,
    /// Told when every state is restored, when `Go` arrived and when the guest runs.
    pub observer: Observer,
}

/// How far a receive has come, readable from other threads while it runs, and the one
/// decision two threads may race for: the commit (`Go` arrived) or giving up.
#[derive(Debug, Default)]
pub struct ReceiveProgress {
    /// Passes begun.
    passes: AtomicU32,
    /// Stream offset of the last record header read.
    bytes: AtomicU64,
    /// [`OPEN`], [`COMMITTED`] or [`GIVEN_UP`]: whichever came first.
    decision: AtomicU8,
    /// The target accepted the stream's configuration.
    configured: AtomicBool,
    /// The receive failed (set before the peer is told): the receiver is free again.
    failed: AtomicBool,
    /// The data connections the receive waits for, and those that joined (none may come
    /// unless whoever serves the listening socket hands them in: `accept_joins`).
    joins: Joins,
}

const OPEN: u8 = 0;
const COMMITTED: u8 = 1;
const GIVEN_UP: u8 = 2;

impl ReceiveProgress {
    /// The receiver got `Go`: true if the guest is now this side's, false if the receive was
    /// given up first.
    fn commit(&self) -> bool {
        self.decide(COMMITTED)
    }

    /// Gives the receive up: true if it was still open, false once committed (too late: the
    /// guest runs here).
    pub fn give_up(&self) -> bool {
        self.decide(GIVEN_UP)
    }

    fn decide(&self, to: u8) -> bool {
        match self
            .decision
            .compare_exchange(OPEN, to, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(current) => current == to,
        }
    }

    /// Whether the target accepted the stream's configuration: from then on the receive is
    /// a migration attempt, whatever happens next (before it, the peer was refused).
    pub fn configured(&self) -> bool {
        self.configured.load(Ordering::Acquire)
    }

    /// Whether the receive failed: set before the peer is told, so that whoever serves the
    /// listening socket takes the next connection as the receiver's, not as a busy one.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Whether `Go` arrived.
    pub fn committed(&self) -> bool {
        self.decision.load(Ordering::Acquire) == COMMITTED
    }

    /// The pass being received (`None` before the first).
    pub fn pass(&self) -> Option<u32> {
        self.passes.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Stream bytes received up to the last record header.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Data connections may join this receive: whoever serves the listening socket hands
    /// them in through [`joins`](Self::joins).
    pub fn accept_joins(&self) {
        self.joins.open_window();
    }

    /// Where data connections are handed in.
    pub fn joins(&self) -> &Joins {
        &self.joins
    }
}

/// Default of [`ReceiveOptions::io_timeout`].
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`ReceiveOptions::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ReceiveOptions::go_timeout`].
pub const DEFAULT_GO_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            reset_if_not_pristine: true,
            io_timeout: Some(DEFAULT_IO_TIMEOUT),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            go_timeout: DEFAULT_GO_TIMEOUT,
            deadline: None,
            give_up: Cancel::default(),
            progress: Arc::default(),
            faults: Faults::none(),
            observer: Observer::default(),
        }
    }
}

/// Errors of the destination side; the guest was not resumed.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("Invalid migration stream")]
    Wire(#[from] WireError),
    #[error("The source gave the migration up: {0}")]
    Aborted(String),
    #[error("The destination gave the migration up (it was told to end)")]
    GivenUp,
    #[error("Loading guest RAM failed")]
    Ram(#[from] RamLoadError),
    #[error("Unexpected {kind} record at offset {offset}: expected {expected}")]
    Unexpected {
        offset: u64,
        kind: RecordKind,
        expected: &'static str,
    },
    #[error("Pass {found} at offset {offset} out of order: expected pass {expected}")]
    PassOrder {
        offset: u64,
        found: u32,
        expected: u32,
    },
    #[error("Pass {pass} at offset {offset} elides zero pages, only the bulk pass may")]
    LateElision { offset: u64, pass: u32 },
    #[error("Duplicate device state {id:?} at offset {offset}")]
    DuplicateState { offset: u64, id: String },
    #[error("Device state {id:?} at offset {offset} is not one this destination restores")]
    UnknownState { offset: u64, id: String },
    #[error(
        "Device state at offset {offset} is one too many: the limit is {MAX_DEVICE_STATES} records"
    )]
    TooManyStates { offset: u64 },
    #[error(
        "Device state at offset {offset} brings the states to {total} bytes: the limit is \
         {MAX_DEVICE_STATE_BYTES}"
    )]
    StatesTooLarge { offset: u64, total: usize },
    #[error("Pass {pass} at offset {offset}: no pass may follow it (pass numbers are exhausted)")]
    PassNumbers { offset: u64, pass: u32 },
    #[error("Configuration rejected")]
    Config(#[source] VmOpError),
    #[error("Local migration refused")]
    Local(#[from] crate::local::LocalError),
    #[error("Taking over the source's guest memory failed")]
    Adopt(#[source] VmOpError),
    #[error("Memory layout differs: {0}")]
    Layout(String),
    #[error("Resetting guest memory failed")]
    Reset(#[source] RamLoadError),
    #[error("Sending a reply to the source failed")]
    Reply(#[source] std::io::Error),
    #[error("Restoring device state failed")]
    Restore(#[source] VmOpError),
    #[error("Resuming the guest failed (it is not running)")]
    Resume(#[source] VmOpError),
    #[error("No Go from the source within {0:?} of Restored: the guest is discarded")]
    NoGo(std::time::Duration, #[source] WireError),
    #[error("Injected fault")]
    Fault(#[source] std::io::Error),
    #[error("Connections record at offset {offset}: {why}")]
    NoDataConnections { offset: u64, why: &'static str },
    #[error(transparent)]
    Data(DataError),
    #[error(
        "This connection is a data connection (Join) of another migration, not a migration; \
         none waits for it here"
    )]
    JoinWithoutMigration,
}

impl From<DataError> for DestinationError {
    fn from(e: DataError) -> Self {
        match e {
            DataError::GivenUp => DestinationError::GivenUp,
            e => DestinationError::Data(e),
        }
    }
}

impl DestinationError {
    /// The connection closed before sending a byte: a probe (a health check, a second
    /// destination asking whether the socket is live), not a migration attempt.
    pub fn is_empty_stream(&self) -> bool {
        matches!(
            self,
            DestinationError::Wire(WireError::Truncated { offset: 0, .. })
        )
    }
}

/// Receives a migration (or loads a snapshot) into `target`, then resumes it:
/// [`read_handshake`], then [`receive_handshaken`].
pub fn receive_migration<T: MigrationTarget + ?Sized>(
    target: &mut T,
    transport: &mut dyn Transport,
    options: &ReceiveOptions,
) -> Result<ReceiveStats, DestinationError> {
    let handshake = match read_handshake(transport, options) {
        Ok(h) => h,
        Err(e) if e.is_empty_stream() => {
            log::info!("a connection closed without sending anything");
            return Err(e);
        }
        Err(e) => {
            log::error!("Receiving the migration failed: {e}");
            return Err(e);
        }
    };
    receive_handshaken(target, transport, handshake, options)
}

/// What a connection sent before it counts as a migration attempt: a valid stream header
/// and a `Config` record (not yet checked by a target), read by [`read_handshake`].
pub struct Handshake {
    config: Vec<u8>,
    /// A data connection's `Join` (`connections.rs`) instead of `Config`.
    join: Option<Join>,
    reader: ReaderState,
    /// When the handshake began: its deadline runs on until `Ready`.
    started: Instant,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("config_len", &self.config.len())
            .field("join", &self.join)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// A data connection of another migration: its `Join` and where its reader stands.
    pub fn into_join(self) -> Result<(Join, ReaderState), Box<Handshake>> {
        match self.join {
            Some(join) => Ok((join, self.reader)),
            None => Err(Box::new(self)),
        }
    }
}

/// The handshake's deadline: `handshake_timeout` from the connection, or the overall
/// deadline if that comes first.
fn handshake_deadline(started: Instant, options: &ReceiveOptions) -> Deadline {
    let handshake = Deadline {
        at: started + options.handshake_timeout,
        what: "handshake",
    };
    match overall_deadline(started, options) {
        Some(overall) if overall.at < handshake.at => overall,
        _ => handshake,
    }
}

/// [`ReceiveOptions::deadline`] from the connection, if any.
fn overall_deadline(started: Instant, options: &ReceiveOptions) -> Option<Deadline> {
    options.deadline.map(|d| Deadline {
        at: started + d,
        what: "migration",
    })
}

/// Reads the stream header and the `Config` record, within the handshake deadline (sockets).
/// On failure the peer, if it sent anything, is told why; one that sent nothing (a probe)
/// is not (see [`DestinationError::is_empty_stream`]). Logging is the caller's: it knows who
/// the peer is.
pub fn read_handshake(
    transport: &mut dyn Transport,
    options: &ReceiveOptions,
) -> Result<Handshake, DestinationError> {
    let started = Instant::now();
    let peer = transport.has_peer();
    let mut transport = FaultyTransport::new(transport, options.faults.clone());
    if peer {
        transport
            .set_read_timeout(options.io_timeout)
            .and_then(|()| transport.set_write_timeout(options.io_timeout))
            .map_err(DestinationError::Reply)?;
        transport.set_deadline(Some(handshake_deadline(started, options)));
    }
    let mut reader = RecordReader::new(&mut transport);
    let read = (|| {
        options
            .faults
            .hit(FaultPoint::Connect)
            .map_err(DestinationError::Fault)?;
        reader.read_stream_header()?;
        let (h, offset) = reader.next_header()?;
        match h.kind {
            RecordKind::Config => Ok((reader.read_payload(&h, offset)?, None)),
            RecordKind::Join => {
                let join = Join::decode(&reader.read_payload(&h, offset)?, offset)?;
                Ok((Vec::new(), Some(join)))
            }
            RecordKind::Abort => Err(aborted(&mut reader, &h, offset)),
            kind => Err(DestinationError::Unexpected {
                offset,
                kind,
                expected: "Config",
            }),
        }
    })();
    match read {
        Ok((config, join)) => Ok(Handshake {
            config,
            join,
            reader: reader.into_state(),
            started,
        }),
        Err(e) => Err(refuse(reader.transport(), e, options)),
    }
}

/// Receives the rest of the stream whose handshake `handshake` is, from the same
/// `transport`, into `target`, then resumes it.
pub fn receive_handshaken<T: MigrationTarget + ?Sized>(
    target: &mut T,
    transport: &mut dyn Transport,
    handshake: Handshake,
    options: &ReceiveOptions,
) -> Result<ReceiveStats, DestinationError> {
    let mut transport = FaultyTransport::new(transport, options.faults.clone());
    if handshake.join.is_some() {
        let e = refuse(
            &mut transport,
            DestinationError::JoinWithoutMigration,
            options,
        );
        log::error!("Receiving the migration failed: {e}");
        return Err(e);
    }
    let mut reader = RecordReader::resume(&mut transport, handshake.reader);
    let mut adopted = false;
    let result = receive(
        target,
        &mut reader,
        handshake.config,
        handshake.started,
        options,
        &mut adopted,
    );
    // Descriptors nobody took (a stream that did not expect them) are closed here.
    drop(reader.transport().take_fds());
    options.progress.joins.close();
    match result {
        Ok(stats) => Ok(stats),
        Err(e) => {
            // A local migration that failed before the commit: the memory is the source's
            // alone again.
            if adopted && !options.progress.committed() {
                target.release_memory();
            }
            options.progress.failed.store(true, Ordering::Release);
            let e = refuse(reader.transport(), e, options);
            log::error!("Receiving the migration failed: {e}");
            Err(e)
        }
    }
}

/// The error a receive ends with (a [`DestinationError::GivenUp`] if that is why it ended),
/// told to the peer unless it sent nothing at all.
fn refuse(
    transport: &mut dyn Transport,
    e: DestinationError,
    options: &ReceiveOptions,
) -> DestinationError {
    let e = if options.give_up.is_cancelled() && !options.progress.committed() {
        log::debug!("given up while: {e}");
        DestinationError::GivenUp
    } else {
        e
    };
    transport.set_deadline(None);
    if transport.has_peer() && !e.is_empty_stream() {
        let _ = send_reply(
            transport,
            RecordKind::Error,
            &encode_message(&crate::error_chain(&e)),
        );
    }
    e
}

fn receive<T: MigrationTarget + ?Sized>(
    target: &mut T,
    reader: &mut RecordReader<'_>,
    config: Vec<u8>,
    started: Instant,
    options: &ReceiveOptions,
    adopted: &mut bool,
) -> Result<ReceiveStats, DestinationError> {
    let faults = &options.faults;
    let peer = reader.transport().has_peer();
    if peer {
        reader
            .transport()
            .set_deadline(Some(handshake_deadline(started, options)));
    }
    target
        .validate_config(&config)
        .map_err(DestinationError::Config)?;
    options.progress.configured.store(true, Ordering::Release);
    let (h, offset) = reader.next_header()?;
    let local = match h.kind {
        RecordKind::MemoryLayout => false,
        RecordKind::LocalMemory => true,
        RecordKind::Abort => return Err(aborted(reader, &h, offset)),
        kind => {
            return Err(DestinationError::Unexpected {
                offset,
                kind,
                expected: "MemoryLayout or LocalMemory",
            })
        }
    };
    let payload = reader.read_payload(&h, offset)?;
    let adopt_started = Instant::now();
    let layout = if local {
        let entries = decode_local_memory(&payload, offset)?;
        if !reader.transport().passes_fds() {
            return Err(crate::local::LocalError::NoFdPassing.into());
        }
        let shared = crate::local::adopt(&entries, reader.transport().take_fds())?;
        *adopted = true;
        target
            .adopt_memory(shared)
            .map_err(DestinationError::Adopt)?;
        entries.iter().map(|e| e.layout()).collect()
    } else {
        decode_layout(&payload, offset)?
    };
    let regions = target.ram_regions();
    let ours = layout_of(&regions);
    if ours != layout {
        return Err(DestinationError::Layout(format!(
            "stream has {layout:x?}, guest has {ours:x?}"
        )));
    }

    // Local: the memory is the source's running guest's; nothing here reads or writes it
    // (no pristine proof, no reset, no RAM pass).
    let adopt_us = if local {
        adopt_started.elapsed().as_micros() as u64
    } else {
        0
    };
    let mut rx = if local {
        None
    } else {
        Some(RamReceiver::new(regions))
    };
    if let Some(rx) = rx.as_mut() {
        if !rx.is_pristine() && options.reset_if_not_pristine {
            log::info!("Guest memory is not pristine: resetting it before loading");
            rx.reset().map_err(DestinationError::Reset)?;
        }
    }
    let pristine = rx.as_ref().is_some_and(RamReceiver::is_pristine);
    faults
        .hit(FaultPoint::BeforeReady)
        .map_err(DestinationError::Fault)?;
    if peer {
        let ready = Ready {
            version: FORMAT_VERSION,
            pristine,
            local,
        };
        send_reply(reader.transport(), RecordKind::Ready, &ready.encode())
            .map_err(DestinationError::Reply)?;
        reader
            .transport()
            .set_deadline(overall_deadline(started, options));
    }

    let overall = overall_deadline(started, options);
    let body = load_body(target, reader, rx.as_mut(), options, overall)?;
    let states = body.states;
    if peer {
        // The whole stream is in: restoring it is this side's work, not the source's to hold.
        reader.transport().set_deadline(None);
    }
    let mut stats = rx.as_ref().map(|rx| rx.stats().clone()).unwrap_or_default();
    stats.local = local;
    stats.adopt_us = adopt_us;
    stats.pristine = pristine;
    stats.device_states = states.len() as u32;
    stats.bytes = reader.offset() + body.data_bytes;
    stats.data_connections = body.data_connections;
    stats.records = reader.records() + 1;

    faults
        .hit(FaultPoint::BeforeRestored)
        .map_err(DestinationError::Fault)?;
    let t = Instant::now();
    target
        .restore_state(states)
        .map_err(DestinationError::Restore)?;
    stats.restore_us = t.elapsed().as_micros() as u64;
    if peer {
        options.observer.tell(Milestone::Restored);
        commit(reader, options)?;
        options.observer.tell(Milestone::Committed);
    }
    let t = Instant::now();
    target.resume().map_err(DestinationError::Resume)?;
    stats.resume_us = t.elapsed().as_micros() as u64;
    options.observer.tell(Milestone::Running);
    if peer {
        // The guest runs here now, whatever happens to the reply.
        let t = Instant::now();
        let mut report = target.running_report(&stats);
        report.truncate(MAX_MESSAGE_LEN);
        if let Err(e) = faults.hit(FaultPoint::BeforeRunning) {
            log::warn!("{e}: closing the connection instead of reporting Running");
            reader.transport().shutdown();
        } else if let Err(e) = send_reply(reader.transport(), RecordKind::Running, &report) {
            log::warn!(
                "The guest runs here but the source did not take the Running reply ({e}); \
                 it reports the outcome as unknown"
            );
        }
        stats.report_us = t.elapsed().as_micros() as u64;
        if let Err(e) = faults.hit(FaultPoint::AfterRunning) {
            log::warn!("{e}: ignored, the guest runs here");
        }
    }
    stats.duration_us = started.elapsed().as_micros() as u64;
    log::info!("{stats}");
    Ok(stats)
}

/// The commit step: tell the source everything is restored, and wait (bounded) for its `Go`.
/// Returns once the guest is this side's to run.
fn commit(reader: &mut RecordReader<'_>, options: &ReceiveOptions) -> Result<(), DestinationError> {
    let restored = Restored {
        go_timeout: options.go_timeout,
    };
    send_reply(reader.transport(), RecordKind::Restored, &restored.encode())
        .map_err(DestinationError::Reply)?;
    // The window starts with Restored, whatever this side does meanwhile: a destination that
    // stalled past it must not take a Go the source sent long ago.
    let window = Deadline::after(options.go_timeout, "commit");
    options
        .faults
        .hit(FaultPoint::BeforeGo)
        .map_err(DestinationError::Fault)?;
    let t = reader.transport();
    t.set_deadline(Some(window));
    let go = reader.next_header();
    reader.transport().set_deadline(None);
    let (h, offset) = go.map_err(|e| DestinationError::NoGo(options.go_timeout, e))?;
    match h.kind {
        // Even a Go read from a buffer counts only within the window.
        RecordKind::Go if Instant::now() >= window.at => {
            return Err(DestinationError::NoGo(
                options.go_timeout,
                WireError::Read {
                    offset,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "Go arrived after the commit window",
                    ),
                },
            ))
        }
        RecordKind::Go => {}
        RecordKind::Abort => return Err(aborted(reader, &h, offset)),
        kind => {
            return Err(DestinationError::Unexpected {
                offset,
                kind,
                expected: "Go",
            })
        }
    }
    if !options.progress.commit() {
        return Err(DestinationError::GivenUp);
    }
    log::info!("Committed: Go received; the guest is this side's now");
    Ok(())
}

/// What [`load_body`] brought in besides guest memory.
struct Body {
    states: Vec<StateBlob>,
    /// Data connections (`connections.rs`) and the bytes they carried.
    data_connections: u32,
    data_bytes: u64,
}

/// RAM passes, device states and `End`; returns the states once `End` checked out. A state
/// the target does not restore, one too many, or one past the byte limit is refused as it
/// arrives. Without a RAM receiver (a local migration) no pass may come: device state and
/// `End` only. With data connections (a `Connections` record before the first pass) the
/// live passes' pages come over them, read by a thread each (`connections.rs`); none of
/// those threads outlives this function.
fn load_body<T: MigrationTarget + ?Sized>(
    target: &T,
    reader: &mut RecordReader<'_>,
    rx: Option<&mut RamReceiver>,
    options: &ReceiveOptions,
    overall: Option<Deadline>,
) -> Result<Body, DestinationError> {
    let rx = rx.map(Mutex::new);
    let passes: OnceLock<DataPasses> = OnceLock::new();
    std::thread::scope(|scope| {
        let result = load_records(
            target,
            reader,
            rx.as_ref(),
            options,
            overall,
            &passes,
            scope,
        );
        if let Some(p) = passes.get() {
            p.stop();
        }
        result
    })
}

fn load_records<'scope, 'env, T: MigrationTarget + ?Sized>(
    target: &T,
    reader: &mut RecordReader<'_>,
    rx: Option<&'env Mutex<&mut RamReceiver>>,
    options: &ReceiveOptions,
    overall: Option<Deadline>,
    passes_cell: &'env OnceLock<DataPasses>,
    scope: &'scope std::thread::Scope<'scope, 'env>,
) -> Result<Body, DestinationError> {
    let local = rx.is_none();
    let progress = &options.progress;
    let hit = |point| options.faults.hit(point).map_err(DestinationError::Fault);
    // The fault point of the pass in progress, hit at its first page record.
    let mut pass_point = None;
    let mut next_pass = 0u32;
    let mut in_pass = false;
    let mut final_seen = local;
    let mut states: Vec<StateBlob> = Vec::new();
    let mut state_bytes = 0usize;
    let mut ids = HashSet::new();
    let mut passes: Option<&DataPasses> = None;
    let mut data_bytes = 0;
    loop {
        let (h, offset) = match reader.next_header() {
            Ok(next) => next,
            // A failing data connection stops this read: its failure is the cause.
            Err(e) => {
                return Err(passes
                    .and_then(DataPasses::failure)
                    .map_or(e.into(), DestinationError::from))
            }
        };
        progress.bytes.store(offset, Ordering::Relaxed);
        let unexpected = |expected| DestinationError::Unexpected {
            offset,
            kind: h.kind,
            expected,
        };
        match h.kind {
            RecordKind::Connections => {
                let c = Connections::decode(&reader.read_payload(&h, offset)?, offset)?;
                let refuse = |why| DestinationError::NoDataConnections { offset, why };
                let Some(rx) = rx else {
                    return Err(refuse("a local migration has no RAM pass to spread"));
                };
                if passes.is_some() || next_pass != 0 {
                    return Err(refuse(
                        "data connections join only once, before the first pass",
                    ));
                }
                // The join window is open from the acceptor's offer until the first pass.
                if !progress.joins.may_come() || !reader.transport().has_peer() {
                    return Err(refuse(
                        "this destination takes no data connections (one connection only)",
                    ));
                }
                let mut deadline = Deadline::after(options.handshake_timeout, "join");
                if let Some(overall) = overall.filter(|o| o.at < deadline.at) {
                    deadline = overall;
                }
                let joined = progress
                    .joins
                    .wait(c.token, c.count, deadline, &options.give_up)?;
                let p = passes_cell
                    .get_or_init(|| DataPasses::new(&joined, reader.transport().wake_handle()));
                for (lane, j) in joined.into_iter().enumerate() {
                    log::info!("Data connection {lane} joined from {}", j.peer);
                    scope.spawn(move || read_lane(lane, j, rx, p, overall));
                }
                passes = Some(p);
                send_reply(reader.transport(), RecordKind::Joined, &[])
                    .map_err(DestinationError::Reply)?;
            }
            RecordKind::PassBegin => {
                let Some(rx) = rx.filter(|_| !final_seen) else {
                    return Err(unexpected(if local {
                        "device state or End: a local migration has no RAM pass"
                    } else {
                        "device state or End after the final pass"
                    }));
                };
                let p = PassBegin::decode(&reader.read_payload(&h, offset)?, offset)?;
                if p.pass != next_pass {
                    return Err(DestinationError::PassOrder {
                        offset,
                        found: p.pass,
                        expected: next_pass,
                    });
                }
                if p.pass != 0 && p.flags & PASS_ZERO_ELIDED != 0 {
                    return Err(DestinationError::LateElision {
                        offset,
                        pass: p.pass,
                    });
                }
                // The number after this pass's, which the next must have.
                let after = p.pass.checked_add(1).ok_or(DestinationError::PassNumbers {
                    offset,
                    pass: p.pass,
                })?;
                let is_final = p.flags & PASS_FINAL != 0;
                // No data connection joins once the passes began.
                progress.joins.close();
                if let (Some(data), true) = (passes, is_final) {
                    // Every data connection ends before the final pass: nothing of theirs
                    // lands while it is loaded.
                    data_bytes = data.wait_ended(overall, &options.give_up)?;
                }
                lock(rx).begin_pass(&p, offset)?;
                if let (Some(data), false) = (passes, is_final) {
                    lock(rx).begin_data_pass();
                    data.open(p.pass);
                }
                pass_point = match p.pass {
                    // The final pass may carry no page at all: its point is its beginning.
                    _ if is_final => {
                        hit(FaultPoint::FinalPass)?;
                        None
                    }
                    0 => Some(FaultPoint::MidBulk),
                    _ => Some(FaultPoint::MidDirty),
                };
                progress.passes.store(after, Ordering::Relaxed);
                next_pass = after;
                in_pass = true;
                final_seen = is_final;
            }
            RecordKind::PassEnd if in_pass && !final_seen => {
                let m = PassMark::decode(&reader.read_payload(&h, offset)?, offset, h.kind)?;
                // In a pass, so `next_pass` is that pass's number plus one (at least 1).
                let current = next_pass.saturating_sub(1);
                if m.pass != current {
                    return Err(DestinationError::PassOrder {
                        offset,
                        found: m.pass,
                        expected: current,
                    });
                }
                let Some(rx) = rx else {
                    return Err(unexpected("device state or End"));
                };
                if let Some(data) = passes {
                    if let Some(point) = pass_point.take() {
                        hit(point)?;
                    }
                    data.wait_delivered(m.pass, overall, &options.give_up)?;
                }
                // Everything read is in guest memory once the allocating thread is idle.
                let mut rx = lock(rx);
                rx.finish();
                if reader.transport().has_peer() {
                    // The pages held torn now, for the source to send again.
                    let (torn, more) = rx.torn_runs(MAX_TORN_RUNS);
                    let done = PassDone {
                        pass: m.pass,
                        torn,
                        more,
                    };
                    send_reply(reader.transport(), RecordKind::PassDone, &done.encode())
                        .map_err(DestinationError::Reply)?;
                    rx.acknowledged();
                }
                in_pass = false;
            }
            RecordKind::RamPages if passes.is_some() && !final_seen => {
                return Err(unexpected(
                    "PassEnd: a live pass's pages come over the data connections",
                ))
            }
            RecordKind::RamPages if in_pass && states.is_empty() => {
                if let Some(point) = pass_point.take() {
                    hit(point)?;
                }
                let Some(rx) = rx else {
                    return Err(unexpected("device state or End"));
                };
                lock(rx).load_batch(reader, &h, offset)?;
            }
            RecordKind::RamPages => return Err(unexpected("PassBegin before RAM pages")),
            RecordKind::DeviceState if final_seen => {
                if states.is_empty() {
                    hit(FaultPoint::StateSend)?;
                }
                if states.len() >= MAX_DEVICE_STATES {
                    return Err(DestinationError::TooManyStates { offset });
                }
                let s = StateBlob::decode(&reader.read_payload(&h, offset)?, offset)?;
                if !target.accepts_state(&s.id) {
                    return Err(DestinationError::UnknownState { offset, id: s.id });
                }
                if !ids.insert(s.id.clone()) {
                    return Err(DestinationError::DuplicateState { offset, id: s.id });
                }
                state_bytes = state_bytes.saturating_add(s.data.len());
                if state_bytes > MAX_DEVICE_STATE_BYTES {
                    return Err(DestinationError::StatesTooLarge {
                        offset,
                        total: state_bytes,
                    });
                }
                states.push(s);
            }
            RecordKind::DeviceState => return Err(unexpected("the final RAM pass first")),
            RecordKind::End if final_seen => {
                let end = EndRecord::decode(&reader.read_payload(&h, offset)?, offset)?;
                reader.check_end(&end, offset)?;
                if let Some(rx) = rx {
                    let mut rx = lock(rx);
                    rx.finish();
                    // A page torn in a live pass and never sent intact again is corruption.
                    rx.check_none_torn()?;
                }
                log::debug!("End at offset {offset} after {} records", reader.records());
                return Ok(Body {
                    states,
                    data_connections: passes.map_or(0, DataPasses::count),
                    data_bytes,
                });
            }
            RecordKind::Abort => return Err(aborted(reader, &h, offset)),
            _ => return Err(unexpected("a RAM pass, device state or End")),
        }
    }
}

/// The source's `Abort` record as an error (or the error reading it).
fn aborted(reader: &mut RecordReader<'_>, h: &RecordHeader, offset: u64) -> DestinationError {
    match reader.read_payload(h, offset) {
        Ok(reason) => DestinationError::Aborted(String::from_utf8_lossy(&reason).into_owned()),
        Err(e) => e.into(),
    }
}

//! Several connections per migration (`migrate --connections N`): one control connection and
//! `N - 1` data connections that carry the page records of the live passes, so that the
//! copying (and with TLS the encryption) of a fast link is spread over several cores.
//!
//! ```text
//! control:  header Config Layout ─▶ Ready ◀─  Connections{n, token} ─▶ Joined ◀─
//!           PassBegin(p) ........................ PassEnd(p) ─▶ PassDone(p) ◀─ (barrier)
//!           ... final pass, device state, End, commit: as with one connection
//! data i:   header Join{i, token} { RamPages* PassEnd(p) }* End      (own checksum chain)
//! ```
//!
//! - **Order only between passes.** A page goes out at most once per live pass, so within a
//!   pass the data connections carry records in any order: the source deals whole records
//!   round-robin (`DataWriters`). The destination refuses a page that arrives twice in one
//!   pass (the writers would race on it), page records on the control connection during a
//!   live pass, and any record of a pass that is not open. `PassDone(p)` goes out only once
//!   every data connection delivered its `PassEnd(p)` (`DataPasses`): a page's copy from
//!   pass p can never land after its copy from pass p + 1.
//! - **The paused final pass stays on the control connection**, as does everything after it:
//!   the data connections end (`End`, their chains checked) before the final pass begins.
//! - **Joining.** The token in `Connections` is 16 random bytes from the source; the
//!   listening socket's acceptor hands a connection whose `Join` carries it (over the same
//!   TLS identity checks as any connection) to the receive in progress ([`Joins`]), and
//!   refuses any other. A data connection that fails fails the migration, before `Go` like
//!   any other failure: the source keeps its guest.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::ram_recv::{load_batch_shared, RamLoadError, RamReceiver};
use crate::records::{EndRecord, Join, PassMark};
use crate::stream::{ReaderState, RecordReader, RecordWriter};
use crate::sync::lock;
use crate::transport::{Connection, Deadline, GuestSpan, Transport};
use crate::wire::{RecordKind, WireError, JOIN_TOKEN_LEN};

/// Opens one more connection to the destination (TLS handshaken where the migration uses
/// TLS), for each data connection.
pub type Connector = Box<dyn FnMut() -> Result<Connection, String> + Send>;

/// Errors of the destination's data connections.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Ram(#[from] RamLoadError),
    #[error("Unexpected {kind} record at offset {offset}: expected {expected}")]
    Unexpected {
        offset: u64,
        kind: RecordKind,
        expected: &'static str,
    },
    #[error("PassEnd of pass {found} at offset {offset} out of order: expected pass {expected}")]
    PassOrder {
        offset: u64,
        found: u32,
        expected: u32,
    },
    #[error("{arrived} of {count} data connections joined before the {what} deadline passed")]
    JoinTimeout {
        arrived: u32,
        count: u32,
        what: &'static str,
    },
    #[error("Data connection {index} did not send {what} before the {deadline} deadline passed")]
    Wait {
        index: u32,
        what: &'static str,
        deadline: &'static str,
    },
    #[error("Data connection {index} failed")]
    Lane {
        index: u32,
        #[source]
        source: Box<DataError>,
    },
    #[error("The destination gave the migration up")]
    GivenUp,
}

/// Records queued per data connection: enough to keep its writer busy while the next is
/// scanned, few enough that the memory they pin stays small (each names up to 4 MiB).
const QUEUE: usize = 2;

/// A fresh join token.
pub(crate) fn new_token() -> io::Result<[u8; JOIN_TOKEN_LEN]> {
    let mut token = [0u8; JOIN_TOKEN_LEN];
    File::open("/dev/urandom")?.read_exact(&mut token)?;
    Ok(token)
}

/// Guest memory named by a queued record.
struct QueuedSpans(Vec<GuestSpan>);

// SAFETY: the spans name guest memory that stays mapped for the whole migration (the VM
// outlives `send_migration`), and every writer thread is joined before `DataWriters` is
// gone (its `Drop`), so no span is used after the migration. The spans form no references:
// the guest may write the memory meanwhile, exactly as on the single-connection path.
unsafe impl Send for QueuedSpans {}

enum Work {
    Record { head: Vec<u8>, spans: QueuedSpans },
    PassEnd(u32),
    End,
}

/// One data connection's writer thread.
struct Lane {
    tx: Option<SyncSender<Work>>,
    wake: Option<OwnedFd>,
    thread: Option<JoinHandle<io::Result<u64>>>,
}

/// The source's data connections, each written by a thread of its own.
pub(crate) struct DataWriters {
    lanes: Vec<Lane>,
    next: usize,
    finished: bool,
}

impl DataWriters {
    /// Connects `count` data connections with `connect` and starts their writers; each sends
    /// the stream header and its `Join` first. `io_timeout` bounds every write.
    pub(crate) fn open(
        count: u32,
        token: [u8; JOIN_TOKEN_LEN],
        connect: &mut Connector,
        io_timeout: Duration,
    ) -> io::Result<DataWriters> {
        let mut writers = DataWriters {
            lanes: Vec::new(),
            next: 0,
            finished: false,
        };
        for index in 0..count {
            let mut conn = connect().map_err(|e| {
                io::Error::other(format!("opening data connection {index} failed: {e}"))
            })?;
            conn.set_read_timeout(Some(io_timeout))?;
            conn.set_write_timeout(Some(io_timeout))?;
            let wake = conn.wake_handle();
            let (tx, rx) = sync_channel(QUEUE);
            let thread = std::thread::Builder::new()
                .name(format!("data-{index}"))
                .spawn(move || write_lane(conn, index, token, rx))?;
            writers.lanes.push(Lane {
                tx: Some(tx),
                wake,
                thread: Some(thread),
            });
        }
        Ok(writers)
    }

    /// Queues one `RamPages` record (its head, and the guest memory after it) on the next
    /// data connection in turn.
    pub(crate) fn record(&mut self, head: Vec<u8>, spans: Vec<GuestSpan>) -> io::Result<()> {
        let lane = self.next;
        self.next = (self.next + 1) % self.lanes.len();
        self.send(
            lane,
            Work::Record {
                head,
                spans: QueuedSpans(spans),
            },
        )
    }

    /// Ends live pass `pass` on every data connection.
    pub(crate) fn pass_end(&mut self, pass: u32) -> io::Result<()> {
        for lane in 0..self.lanes.len() {
            self.send(lane, Work::PassEnd(pass))?;
        }
        Ok(())
    }

    /// Seals every data connection with `End` and waits for the writers; returns the bytes
    /// they wrote.
    pub(crate) fn finish(mut self) -> io::Result<u64> {
        for lane in 0..self.lanes.len() {
            self.send(lane, Work::End)?;
        }
        self.finished = true;
        let mut bytes = 0;
        for lane in 0..self.lanes.len() {
            bytes += self.join(lane)?;
        }
        Ok(bytes)
    }

    fn send(&mut self, lane: usize, work: Work) -> io::Result<()> {
        let sent = match &self.lanes[lane].tx {
            Some(tx) => tx.send(work).is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The writer ended: its error says why.
        match self.join(lane) {
            Err(e) => Err(e),
            Ok(_) => Err(io::Error::other(format!(
                "data connection {lane} ended early"
            ))),
        }
    }

    /// Waits for writer `lane` to end; its error names the connection.
    fn join(&mut self, lane: usize) -> io::Result<u64> {
        let l = &mut self.lanes[lane];
        l.tx = None;
        let Some(thread) = l.thread.take() else {
            return Ok(0);
        };
        match thread.join() {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => Err(io::Error::new(
                e.kind(),
                format!("data connection {lane}: {e}"),
            )),
            Err(_) => Err(io::Error::other(format!(
                "data connection {lane}: its writer panicked"
            ))),
        }
    }
}

impl Drop for DataWriters {
    fn drop(&mut self) {
        for lane in &mut self.lanes {
            lane.tx = None;
            if !self.finished {
                // A writer blocked on a peer that stopped reading ends now, not at its
                // timeout.
                if let Some(fd) = &lane.wake {
                    shut_down(fd, libc::SHUT_RDWR);
                }
            }
        }
        for lane in &mut self.lanes {
            if let Some(t) = lane.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn shut_down(fd: &OwnedFd, how: libc::c_int) {
    // SAFETY: shutdown(2) on a socket this process owns (a duplicate descriptor); no memory
    // is involved.
    unsafe { libc::shutdown(fd.as_raw_fd(), how) };
}

/// A data connection's writer: stream header, `Join`, then the queued work. A queue that
/// closes without `End` (the migration failed) leaves the stream unsealed.
fn write_lane(
    mut conn: Connection,
    index: u32,
    token: [u8; JOIN_TOKEN_LEN],
    rx: Receiver<Work>,
) -> io::Result<u64> {
    let mut w = RecordWriter::start(&mut conn)?;
    w.write_record(RecordKind::Join, &[&Join { index, token }.encode()])?;
    for work in rx.iter() {
        match work {
            Work::Record { head, spans } => {
                w.write_record_guest(RecordKind::RamPages, &head, &spans.0)?;
            }
            Work::PassEnd(pass) => {
                w.write_record(RecordKind::PassEnd, &[&PassMark { pass }.encode()])?;
            }
            Work::End => {
                w.finish()?;
                return Ok(w.bytes());
            }
        }
    }
    Ok(w.bytes())
}

/// A data connection the acceptor handed to the receive in progress.
pub struct JoinedConnection {
    pub(crate) index: u32,
    pub(crate) connection: Connection,
    pub(crate) reader: ReaderState,
    pub(crate) peer: String,
}

/// The data connections a receive waits for: shared by the acceptor, which hands them in
/// ([`Joins::offer`]), and the receiver, which says which it expects.
#[derive(Default)]
pub struct Joins {
    state: Mutex<JoinState>,
    changed: Condvar,
}

#[derive(Default)]
struct JoinState {
    /// Data connections may still come: from the offer of the receive until its first pass
    /// (a data connection may reach the acceptor before the receiver read `Connections`).
    window: bool,
    /// The token and count expected, from the `Connections` record until all joined.
    expected: Option<([u8; JOIN_TOKEN_LEN], u32)>,
    arrived: Vec<JoinedConnection>,
}

impl std::fmt::Debug for Joins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joins").finish_non_exhaustive()
    }
}

/// Compares tokens in time independent of where they differ.
fn same_token(a: &[u8; JOIN_TOKEN_LEN], b: &[u8; JOIN_TOKEN_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Joins {
    /// Whether data connections may join the receive now (or soon: before its first pass).
    pub fn may_come(&self) -> bool {
        let s = lock(&self.state);
        s.window || s.expected.is_some()
    }

    /// Opens the window in which data connections may come (the receive was offered).
    pub(crate) fn open_window(&self) {
        lock(&self.state).window = true;
    }

    /// No data connection may come any more (the first pass began, or the receive ended).
    pub(crate) fn close(&self) {
        let mut s = lock(&self.state);
        s.window = false;
        s.expected = None;
        s.arrived.clear();
        drop(s);
        self.changed.notify_all();
    }

    /// A data connection with `join`, from `peer`: taken if the receive waits for it (it may
    /// wait until `deadline` for the receive to read its `Connections`); else returned with
    /// the reason to tell its peer.
    pub fn offer(
        &self,
        join: Join,
        connection: Connection,
        reader: ReaderState,
        peer: String,
        deadline: Instant,
    ) -> Result<(), Box<(Connection, String)>> {
        let mut s = lock(&self.state);
        while s.expected.is_none() && s.window {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = match self.changed.wait_timeout(s, left) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
        let refused = match s.expected {
            None => Some("no migration here is waiting for data connections".to_string()),
            Some((token, _)) if !same_token(&token, &join.token) => {
                Some("the join token is not the migration's in progress".to_string())
            }
            Some((_, count))
                if join.index >= count || s.arrived.iter().any(|j| j.index == join.index) =>
            {
                Some(format!(
                    "data connection {} is not one the migration waits for ({count} join it, \
                     each once)",
                    join.index
                ))
            }
            Some(_) => None,
        };
        if let Some(why) = refused {
            return Err(Box::new((connection, why)));
        }
        s.arrived.push(JoinedConnection {
            index: join.index,
            connection,
            reader,
            peer,
        });
        self.changed.notify_all();
        Ok(())
    }

    /// Expects `count` data connections with `token` and waits for them until `deadline`
    /// (or until `give_up`); returns them in index order.
    pub(crate) fn wait(
        &self,
        token: [u8; JOIN_TOKEN_LEN],
        count: u32,
        deadline: Deadline,
        give_up: &Cancel,
    ) -> Result<Vec<JoinedConnection>, DataError> {
        let mut s = lock(&self.state);
        s.expected = Some((token, count));
        self.changed.notify_all();
        loop {
            if s.arrived.len() == count as usize {
                s.expected = None;
                s.window = false;
                let mut joined = std::mem::take(&mut s.arrived);
                joined.sort_by_key(|j| j.index);
                return Ok(joined);
            }
            let left = deadline.at.saturating_duration_since(Instant::now());
            if left.is_zero() || give_up.is_cancelled() {
                let arrived = s.arrived.len();
                s.expected = None;
                s.window = false;
                s.arrived.clear();
                if give_up.is_cancelled() {
                    return Err(DataError::GivenUp);
                }
                return Err(DataError::JoinTimeout {
                    arrived: arrived as u32,
                    count,
                    what: deadline.what,
                });
            }
            // Short waits: giving up is a flag, not a notification.
            let wait = left.min(Duration::from_millis(50));
            s = match self.changed.wait_timeout(s, wait) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

/// The live passes as the destination's data connections deliver them: which pass is open,
/// which connection delivered its `PassEnd`, which ended, and the first failure.
pub(crate) struct DataPasses {
    state: Mutex<PassState>,
    changed: Condvar,
    /// The data connections, shut down to wake their readers when the receive ends.
    wakes: Vec<OwnedFd>,
    /// The control connection, whose reading side a failing data connection shuts down so
    /// that the receiver stops waiting on it.
    control: Option<OwnedFd>,
}

struct PassState {
    open: Option<u32>,
    /// Per data connection: the last pass it delivered.
    delivered: Vec<Option<u32>>,
    /// Per data connection: its stream bytes once it ended (`End` checked).
    ended: Vec<Option<u64>>,
    failed: Option<DataError>,
    stopping: bool,
    /// The final pass began: no live pass opens again.
    live_over: bool,
}

/// How long a wait on the data connections sleeps between checks of the give-up flag.
const POLL: Duration = Duration::from_millis(50);

impl DataPasses {
    pub(crate) fn new(joined: &[JoinedConnection], control: Option<OwnedFd>) -> DataPasses {
        DataPasses {
            state: Mutex::new(PassState {
                open: None,
                delivered: vec![None; joined.len()],
                ended: vec![None; joined.len()],
                failed: None,
                stopping: false,
                live_over: false,
            }),
            changed: Condvar::new(),
            wakes: joined
                .iter()
                .filter_map(|j| j.connection.wake_handle())
                .collect(),
            control,
        }
    }

    /// How many data connections there are.
    pub(crate) fn count(&self) -> u32 {
        lock(&self.state).ended.len() as u32
    }

    /// Opens live pass `pass` (the control connection's `PassBegin`).
    pub(crate) fn open(&self, pass: u32) {
        lock(&self.state).open = Some(pass);
        self.changed.notify_all();
    }

    /// Waits until every data connection delivered `PassEnd(pass)`, then closes the pass (a
    /// deadline that passes names the first connection still owing it).
    pub(crate) fn wait_delivered(
        &self,
        pass: u32,
        deadline: Option<Deadline>,
        give_up: &Cancel,
    ) -> Result<(), DataError> {
        self.wait_until(deadline, give_up, "its PassEnd", |s| {
            s.delivered.iter().position(|d| *d != Some(pass))
        })?;
        lock(&self.state).open = None;
        Ok(())
    }

    /// The live passes are over: waits until every data connection ended with a valid
    /// `End`; returns their bytes. A connection that sends pages instead fails.
    pub(crate) fn wait_ended(
        &self,
        deadline: Option<Deadline>,
        give_up: &Cancel,
    ) -> Result<u64, DataError> {
        lock(&self.state).live_over = true;
        self.changed.notify_all();
        self.wait_until(deadline, give_up, "its End", |s| {
            s.ended.iter().position(Option::is_none)
        })?;
        Ok(lock(&self.state).ended.iter().flatten().sum())
    }

    fn wait_until(
        &self,
        deadline: Option<Deadline>,
        give_up: &Cancel,
        what: &'static str,
        pending: impl Fn(&PassState) -> Option<usize>,
    ) -> Result<(), DataError> {
        let mut s = lock(&self.state);
        loop {
            if let Some(e) = s.failed.take() {
                return Err(e);
            }
            let Some(waiting) = pending(&s) else {
                return Ok(());
            };
            if give_up.is_cancelled() {
                return Err(DataError::GivenUp);
            }
            let mut wait = POLL;
            if let Some(d) = deadline {
                let left = d.at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(DataError::Wait {
                        index: waiting as u32,
                        what,
                        deadline: d.what,
                    });
                }
                wait = wait.min(left);
            }
            s = match self.changed.wait_timeout(s, wait) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The failure a data connection ended with, if any (taken).
    pub(crate) fn failure(&self) -> Option<DataError> {
        lock(&self.state).failed.take()
    }

    /// Ends every data connection's reader (the receive is over, or failed).
    pub(crate) fn stop(&self) {
        lock(&self.state).stopping = true;
        for fd in &self.wakes {
            shut_down(fd, libc::SHUT_RDWR);
        }
        self.changed.notify_all();
    }

    /// A data connection's reader waits until pass `pass` is open: `Some(true)` once it is,
    /// `Some(false)` if the live passes are over, `None` if the receive is ending.
    fn wait_open(&self, pass: u32) -> Option<bool> {
        let mut s = lock(&self.state);
        loop {
            if s.stopping || s.failed.is_some() {
                return None;
            }
            if s.open == Some(pass) {
                return Some(true);
            }
            if s.live_over {
                return Some(false);
            }
            s = match self.changed.wait_timeout(s, POLL) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
    }

    fn delivered(&self, lane: usize, pass: u32) {
        lock(&self.state).delivered[lane] = Some(pass);
        self.changed.notify_all();
    }

    fn ended(&self, lane: usize, bytes: u64) {
        lock(&self.state).ended[lane] = Some(bytes);
        self.changed.notify_all();
    }

    fn fail(&self, lane: usize, e: DataError) {
        let mut s = lock(&self.state);
        if s.stopping {
            return;
        }
        if s.failed.is_none() {
            s.failed = Some(DataError::Lane {
                index: lane as u32,
                source: Box::new(e),
            });
            // The receiver may be reading the control connection: make it stop there.
            if let Some(fd) = &self.control {
                shut_down(fd, libc::SHUT_RD);
            }
        }
        drop(s);
        self.changed.notify_all();
    }
}

/// A destination data connection's reader: `RamPages` of the open pass, `PassEnd` of each
/// pass, then `End`. Runs on a thread of its own until the connection ends or fails (the
/// failure goes to `passes`).
pub(crate) fn read_lane(
    lane: usize,
    mut joined: JoinedConnection,
    rx: &Mutex<&mut RamReceiver>,
    passes: &DataPasses,
    overall: Option<Deadline>,
) {
    // The handshake's deadline is over: the migration's own, if any, holds from here.
    joined.connection.set_deadline(overall);
    let mut reader = RecordReader::resume(&mut joined.connection, joined.reader);
    if let Err(e) = read_records(lane, &mut reader, rx, passes) {
        log::debug!(
            "data connection {lane} from {} failed: {}",
            joined.peer,
            crate::error_chain(&e)
        );
        passes.fail(lane, e);
    }
}

fn read_records(
    lane: usize,
    reader: &mut RecordReader<'_>,
    rx: &Mutex<&mut RamReceiver>,
    passes: &DataPasses,
) -> Result<(), DataError> {
    let regions = lock(rx).regions().to_vec();
    // The pass this connection's records belong to next.
    let mut pass = 0u32;
    loop {
        let (h, offset) = reader.next_header()?;
        let unexpected = |expected| DataError::Unexpected {
            offset,
            kind: h.kind,
            expected,
        };
        match h.kind {
            RecordKind::RamPages => match passes.wait_open(pass) {
                None => return Ok(()),
                Some(false) => return Err(unexpected("End: the live passes are over")),
                Some(true) => load_batch_shared(rx, &regions, reader, &h, offset)?,
            },
            RecordKind::PassEnd => {
                let m = PassMark::decode(&reader.read_payload(&h, offset)?, offset, h.kind)?;
                if m.pass != pass {
                    return Err(DataError::PassOrder {
                        offset,
                        found: m.pass,
                        expected: pass,
                    });
                }
                match passes.wait_open(pass) {
                    None => return Ok(()),
                    Some(false) => return Err(unexpected("End: the live passes are over")),
                    Some(true) => passes.delivered(lane, pass),
                }
                // Pass numbers are checked on the control connection: this one stays below.
                pass = pass.saturating_add(1);
            }
            RecordKind::End => {
                let end = EndRecord::decode(&reader.read_payload(&h, offset)?, offset)?;
                reader.check_end(&end, offset)?;
                passes.ended(lane, reader.offset());
                return Ok(());
            }
            _ => return Err(unexpected("RamPages, PassEnd or End on a data connection")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::DataError;
    use crate::accept::{AcceptOptions, Acceptor};
    use crate::fake::{fake_target, FakeVm};
    use crate::memory::layout_of;
    use crate::receive::{receive_handshaken, receive_migration, DestinationError, ReceiveOptions};
    use crate::records::{encode_layout, encode_ram_pages, Connections, Join, PassBegin, RunDesc};
    use crate::stream::{read_reply, RecordWriter};
    use crate::transport::{Connection, Endpoint, Transport};
    use crate::wire::{RecordKind, JOIN_TOKEN_LEN, PAGE_SIZE};
    use crate::{send_migration, GuestRam, MigrationSource, SendOptions, SourceError};

    const LAYOUT: &[(u64, usize)] = &[(0, 512 * PAGE_SIZE), (1 << 32, 256 * PAGE_SIZE)];

    fn options() -> ReceiveOptions {
        ReceiveOptions {
            handshake_timeout: Duration::from_millis(800),
            io_timeout: Some(Duration::from_secs(5)),
            ..Default::default()
        }
    }

    /// A destination behind an acceptor on a unix socket in `dir`, receiving one migration
    /// into a fake target on a thread: its endpoint and the thread (target and result).
    type Received =
        std::thread::JoinHandle<(FakeVm, Result<crate::ReceiveStats, DestinationError>)>;

    fn destination(dir: &tempfile::TempDir, opts: ReceiveOptions) -> (Endpoint, Received) {
        let ep = Endpoint::Unix(dir.path().join("m.sock"));
        let l = ep.listen().expect("listen");
        let acceptor = Acceptor::start(l, &opts, AcceptOptions::default()).expect("start");
        let rx = std::thread::spawn(move || {
            let offer = acceptor.next().expect("an offer");
            let mut target = fake_target(LAYOUT);
            let mut conn = offer.connection;
            let opts = ReceiveOptions {
                progress: offer.progress.clone(),
                ..opts
            };
            let r = receive_handshaken(&mut target, &mut conn, offer.handshake, &opts);
            drop(acceptor);
            (target, r)
        });
        (ep, rx)
    }

    fn connector(ep: &Endpoint) -> super::Connector {
        let ep = ep.clone();
        Box::new(move || {
            ep.connect(Duration::from_secs(5))
                .map_err(|e| e.to_string())
        })
    }

    #[test]
    fn three_connections_carry_a_busy_guest_and_it_arrives_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ep, rx) = destination(&dir, options());
        let mut vm = FakeVm::new(LAYOUT);
        let w = vm.writer();
        w.fill(0, 300 * PAGE_SIZE, 0x5a);
        w.fill(1 << 32, 100 * PAGE_SIZE, 0xa5);
        // A guest that keeps writing: dirty passes, pages in flight on every connection.
        let mut n = 0u64;
        vm.run_guest(move |w| {
            n = n.wrapping_add(1);
            let page = (n * 7919) % 512;
            w.write(page * PAGE_SIZE as u64 + (n % 4000), &n.to_le_bytes());
            std::thread::sleep(Duration::from_micros(50));
        });
        let mut c = ep.connect(Duration::from_secs(5)).expect("connect");
        let stats = send_migration(
            &mut vm,
            &mut c,
            SendOptions {
                connections: 3,
                connect: Some(connector(&ep)),
                batch_pages: 16,
                // Longer than the handshake timeout: the data connections outlive it.
                max_bandwidth: Some(2 << 20),
                limits: crate::Limits {
                    max_passes: 4,
                    downtime: Duration::ZERO,
                    auto_converge: false,
                },
                ..Default::default()
            },
        )
        .expect("sent");
        let (target, received) = rx.join().expect("destination thread");
        let received = received.expect("received");
        assert_eq!(stats.data_connections, 2);
        assert_eq!(received.data_connections, 2);
        assert_eq!(stats.passes.len(), 5, "4 live passes and the final one");
        assert!(
            stats.total_duration_us > 1_000_000,
            "shorter than the handshake timeout"
        );
        assert_eq!(target.first_difference(&vm), None);
        assert!(target.running);
    }

    /// A hand-made source: control connection through `Joined`, with `count` data
    /// connections joined with `token` (their index and the token each presents).
    struct Source {
        control: Connection,
        data: Vec<Connection>,
    }

    fn handshake(ep: &Endpoint) -> Connection {
        let vm = FakeVm::new(LAYOUT);
        let mut c = ep.connect(Duration::from_secs(5)).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let layout = encode_layout(&layout_of(&vm.ram_regions()));
        let config = vm.config_blob().expect("config");
        let mut w = RecordWriter::start(&mut c).expect("header");
        w.write_record(RecordKind::Config, &[&config])
            .expect("config");
        w.write_record(RecordKind::MemoryLayout, &[&layout])
            .expect("layout");
        let (kind, _) = read_reply(&mut c).expect("ready");
        assert_eq!(kind, RecordKind::Ready);
        c
    }

    fn join(ep: &Endpoint, index: u32, token: [u8; JOIN_TOKEN_LEN]) -> Connection {
        let mut d = ep.connect(Duration::from_secs(5)).expect("connect");
        d.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        RecordWriter::start(&mut d)
            .and_then(|mut w| w.write_record(RecordKind::Join, &[&Join { index, token }.encode()]))
            .expect("join");
        d
    }

    /// Writes the records of a stream that began with its header and one record.
    fn records(c: &mut Connection, records: &[(RecordKind, Vec<u8>)]) {
        for (kind, payload) in records {
            let header = crate::wire::RecordHeader {
                kind: *kind,
                len: payload.len() as u32,
                payload_crc: crc32c::crc32c(payload),
            };
            let _ = c.send(&[&header.encode()[..], payload]);
        }
    }

    fn source(ep: &Endpoint, joins: &[(u32, [u8; JOIN_TOKEN_LEN])], count: u32) -> Source {
        let token = [7u8; JOIN_TOKEN_LEN];
        let mut control = handshake(ep);
        records(
            &mut control,
            &[(
                RecordKind::Connections,
                Connections { count, token }.encode().to_vec(),
            )],
        );
        let data = joins.iter().map(|&(i, t)| join(ep, i, t)).collect();
        Source { control, data }
    }

    /// Sends a `RamPages` record (head checksum in its header, as the sender writes it).
    fn send_pages(c: &mut Connection, first_page: u64, pages: u32) {
        let data = vec![0x11u8; pages as usize * PAGE_SIZE];
        let run = RunDesc {
            guest_addr: first_page * PAGE_SIZE as u64,
            pages,
            zero: false,
        };
        let (payload, crc) = encode_ram_pages(&[run], &data);
        let header = crate::wire::RecordHeader {
            kind: RecordKind::RamPages,
            len: payload.len() as u32,
            payload_crc: crc,
        };
        let _ = c.send(&[&header.encode()[..], &payload]);
    }

    fn pass_begin(pass: u32) -> (RecordKind, Vec<u8>) {
        (
            RecordKind::PassBegin,
            PassBegin { pass, flags: 0 }.encode().to_vec(),
        )
    }

    #[test]
    fn a_page_sent_twice_in_one_pass_over_two_connections_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ep, rx) = destination(&dir, options());
        let token = [7u8; JOIN_TOKEN_LEN];
        let mut s = source(&ep, &[(0, token), (1, token)], 2);
        let (kind, _) = read_reply(&mut s.control).expect("joined");
        assert_eq!(kind, RecordKind::Joined);
        records(&mut s.control, &[pass_begin(0)]);
        // Pages 10..14 on one connection, 12..16 on the other: 12 and 13 twice.
        send_pages(&mut s.data[0], 10, 4);
        std::thread::sleep(Duration::from_millis(100));
        send_pages(&mut s.data[1], 12, 4);
        let (_, r) = rx.join().expect("destination thread");
        let e = r.expect_err("refused");
        let text = crate::error_chain(&e);
        assert!(
            matches!(e, DestinationError::Data(DataError::Lane { .. }))
                && text.contains("already in this pass"),
            "{text}"
        );
        // The source is told why on its control connection.
        let (kind, msg) = read_reply(&mut s.control).expect("a reply");
        assert_eq!(kind, RecordKind::Error);
        assert!(String::from_utf8_lossy(&msg).contains("already in this pass"));
    }

    #[test]
    fn pages_on_the_control_connection_of_a_live_pass_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ep, rx) = destination(&dir, options());
        let token = [7u8; JOIN_TOKEN_LEN];
        let mut s = source(&ep, &[(0, token)], 1);
        let (kind, _) = read_reply(&mut s.control).expect("joined");
        assert_eq!(kind, RecordKind::Joined);
        records(&mut s.control, &[pass_begin(0)]);
        send_pages(&mut s.control, 3, 1);
        let (_, r) = rx.join().expect("destination thread");
        let text = crate::error_chain(&r.expect_err("refused"));
        assert!(
            text.contains("a live pass's pages come over the data connections"),
            "{text}"
        );
    }

    #[test]
    fn a_join_with_another_token_is_refused_and_the_receive_fails_at_its_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = options();
        let (ep, rx) = destination(&dir, opts.clone());
        let started = Instant::now();
        let mut s = source(&ep, &[(0, [8u8; JOIN_TOKEN_LEN])], 1);
        // The impostor is told why on its own connection.
        let (kind, msg) = read_reply(&mut s.data[0]).expect("a reply");
        assert_eq!(kind, RecordKind::Error);
        assert!(
            String::from_utf8_lossy(&msg).contains("join token is not the migration's"),
            "{}",
            String::from_utf8_lossy(&msg)
        );
        let (_, r) = rx.join().expect("destination thread");
        match r {
            Err(DestinationError::Data(DataError::JoinTimeout {
                arrived: 0,
                count: 1,
                ..
            })) => {}
            other => panic!("expected a join timeout, got {other:?}"),
        }
        assert!(started.elapsed() < opts.handshake_timeout + Duration::from_secs(3));
        let (kind, _) = read_reply(&mut s.control).expect("a reply");
        assert_eq!(kind, RecordKind::Error);
    }

    /// A data connection cut mid-pass (its socket shut down under the source's writer, as a
    /// link that dies would): the migration fails before `Go`, the source's guest runs on
    /// with dirty logging off, and the destination names the data connection.
    #[test]
    fn a_data_connection_cut_mid_pass_fails_the_migration_and_the_source_runs_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ep, rx) = destination(&dir, options());
        let mut vm = FakeVm::new(LAYOUT);
        vm.writer().fill(0, 400 * PAGE_SIZE, 0x3c);
        // The data connection's socket, to cut once pages flow on it.
        let cut: Arc<Mutex<Option<OwnedFd>>> = Arc::default();
        let connect: super::Connector = Box::new({
            let ep = ep.clone();
            let cut = cut.clone();
            move || {
                let c = ep
                    .connect(Duration::from_secs(5))
                    .map_err(|e| e.to_string())?;
                *crate::sync::lock(&cut) = c.wake_handle();
                Ok(c)
            }
        });
        let cutter = std::thread::spawn({
            let cut = cut.clone();
            move || {
                // Slowed to 2 MiB/s, the bulk pass lasts about 0.8 s: cut a third into it.
                std::thread::sleep(Duration::from_millis(300));
                if let Some(fd) = crate::sync::lock(&cut).as_ref() {
                    super::shut_down(fd, libc::SHUT_RDWR);
                }
            }
        });
        let mut c = ep.connect(Duration::from_secs(5)).expect("connect");
        let e = send_migration(
            &mut vm,
            &mut c,
            SendOptions {
                connections: 2,
                connect: Some(connect),
                batch_pages: 16,
                max_bandwidth: Some(2 << 20),
                ..Default::default()
            },
        )
        .expect_err("the migration fails");
        cutter.join().expect("cutter");
        let text = crate::error_chain(&e);
        assert!(!e.is_outcome_unknown(), "{text}");
        assert!(text.to_lowercase().contains("data connection 0"), "{text}");
        // The guest runs on here: not paused, dirty logging off.
        assert!(!vm.logging() && !vm.writer().paused(), "{text}");
        let (target, r) = rx.join().expect("destination thread");
        let d = crate::error_chain(&r.expect_err("the destination refused"));
        assert!(d.contains("Data connection 0 failed"), "{d}");
        assert!(!target.running);
    }

    #[test]
    fn a_destination_without_an_acceptor_refuses_data_connections_and_the_source_runs_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ep = Endpoint::Unix(dir.path().join("m.sock"));
        let mut l = ep.listen().expect("listen");
        let rx = std::thread::spawn(move || {
            let mut conn = l.accept().expect("accept");
            let mut target = fake_target(LAYOUT);
            receive_migration(&mut target, &mut conn, &options()).map(|_| ())
        });
        let mut vm = FakeVm::new(LAYOUT);
        vm.writer().fill(0, PAGE_SIZE, 1);
        let mut c = ep.connect(Duration::from_secs(5)).expect("connect");
        let e = send_migration(
            &mut vm,
            &mut c,
            SendOptions {
                connections: 2,
                connect: Some(connector(&ep)),
                ..Default::default()
            },
        )
        .expect_err("refused");
        assert!(
            matches!(&e, SourceError::Destination(m) if m.contains("takes no data connections")),
            "{e}"
        );
        assert!(!vm.logging() && !vm.writer().paused());
        let r = rx.join().expect("destination thread");
        assert!(matches!(r, Err(DestinationError::NoDataConnections { .. })));
    }
}

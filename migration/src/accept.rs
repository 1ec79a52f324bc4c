//! A destination's listening socket, served on a thread of its own while it receives:
//! [`Acceptor`]. No peer can end the destination or hold it:
//!
//! ```text
//! accept ─▶ helper thread: [TLS handshake, if the endpoint has TLS] ─┬─ receiver busy:
//!            Error "busy: ..." record, closed                            │
//!          ┌─────────────────────────────────────────────────────────────┘ receiver waiting
//!          └▶ stream header + Config within the handshake deadline
//!               ├─ done first ─▶ offered: Acceptor::next returns it
//!               └─ probe, reset, garbage, idle, refused certificate: logged with the peer's
//!                  address, told why (if it sent anything), closed
//! ```
//!
//! With TLS only an authenticated peer learns that the destination is busy, and with whom.
//!
//! Until a connection sent a valid stream header and `Config` it is not a migration attempt:
//! several handshakes run at once (at most [`MAX_HELPERS`] threads, busy replies included;
//! a connection beyond that is closed at once), so an idle peer does not keep a real source
//! waiting. The first complete handshake is offered to the receiver; from
//! [`Acceptor::next`] until [`Acceptor::idle`] every new connection is answered "busy" and
//! closed instead of waiting in the backlog.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::fault::{FaultSpecError, Faults};
use crate::receive::{read_handshake, Handshake, ReceiveOptions, ReceiveProgress};
use crate::records::{encode_message, Join};
use crate::stream::{send_reply, ReaderState};
use crate::sync::lock;
use crate::tls::TlsServer;
use crate::transport::{Connection, Deadline, Listener, Transport, TransportError};
use crate::wire::RecordKind;

/// Most helper threads at once: handshakes in progress plus busy replies being delivered.
pub const MAX_HELPERS: usize = 8;
/// Longest a refused peer is given to read its `Error` record before the connection closes.
const LINGER: Duration = Duration::from_secs(2);
/// Pause after an accept that failed for lack of resources (file descriptors, memory).
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);
/// Longest a stopping acceptor waits for its helpers to deliver their last replies.
const STOP_WAIT: Duration = Duration::from_secs(3);

/// Gives each connection the faults it runs with (tests, `fault.rs`), called as it is
/// accepted: the handshake and the rest of that connection's receive share them.
pub type FaultSupplier = Arc<dyn Fn() -> Result<Faults, FaultSpecError> + Send + Sync>;

/// What each connection gets before its stream begins.
#[derive(Clone)]
pub struct AcceptOptions {
    /// Its faults (tests).
    pub faults: FaultSupplier,
    /// Mutual TLS: the handshake comes first, within the handshake timeout; a peer it
    /// refuses is logged and closed like any other refusal.
    pub tls: Option<Arc<TlsServer>>,
    /// Without TLS: log a warning, with the peer's address, for every connection (a
    /// plaintext endpoint reachable from the network, `receive --insecure-plaintext`).
    pub warn_plaintext: bool,
}

impl Default for AcceptOptions {
    fn default() -> Self {
        AcceptOptions {
            faults: no_faults(),
            tls: None,
            warn_plaintext: false,
        }
    }
}

/// Why [`Acceptor::next`] has no connection to offer.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("The listening socket stopped accepting connections")]
    Closed(#[source] TransportError),
    #[error("The acceptor stopped")]
    Stopped,
}

/// A connection that completed its handshake, for the receiver to go on with
/// ([`crate::receive::receive_handshaken`]).
#[derive(Debug)]
pub struct Offer {
    pub connection: Connection,
    pub handshake: Handshake,
    /// Who the peer is, for logs.
    pub peer: String,
    /// The progress to pass in `ReceiveOptions::progress`: busy replies quote it.
    pub progress: Arc<ReceiveProgress>,
    /// The faults of this connection, to pass in `ReceiveOptions::faults`.
    pub faults: Faults,
}

/// What the receiver is doing, as the busy replies describe it.
enum Receiver {
    Waiting,
    /// A handshake completed; the receiver has not taken it yet.
    Offered(Box<Offer>),
    Busy {
        peer: String,
        since: Instant,
        progress: Arc<ReceiveProgress>,
    },
}

struct State {
    receiver: Receiver,
    helpers: usize,
    /// Sockets of the handshakes in progress, shut down when the acceptor stops.
    handshakes: HashMap<u64, OwnedFd>,
    next_id: u64,
    /// Why accepting ended, once it did.
    closed: Option<TransportError>,
    stopped: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    options: ReceiveOptions,
    accept: AcceptOptions,
}

/// Serves a listening socket on its own thread (see the module documentation). Dropping it
/// stops the thread, closes the listener and wakes the handshakes in progress (their peers
/// are told why: a given-up receive if `ReceiveOptions::give_up` is set), waiting a bounded
/// time for the replies to go out.
pub struct Acceptor {
    shared: Arc<Shared>,
    wake: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Starts serving `listener` (a socket; a `file:` snapshot has nothing to serve). The
    /// handshakes use `options`' timeouts and give-up flag, and `accept`'s faults and TLS.
    pub fn start(
        listener: Listener,
        options: &ReceiveOptions,
        accept: AcceptOptions,
    ) -> io::Result<Acceptor> {
        let wake = listener.wake_handle();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                receiver: Receiver::Waiting,
                helpers: 0,
                handshakes: HashMap::new(),
                next_id: 0,
                closed: None,
                stopped: false,
            }),
            changed: Condvar::new(),
            options: ReceiveOptions {
                progress: Arc::default(),
                ..options.clone()
            },
            accept,
        });
        let thread = std::thread::Builder::new().name("acceptor".into()).spawn({
            let shared = shared.clone();
            move || accept_loop(listener, &shared)
        })?;
        Ok(Acceptor {
            shared,
            wake,
            thread: Some(thread),
        })
    }

    /// Waits for the next connection that completed its handshake; the receiver is busy with
    /// it (other connections are told so) until [`idle`](Self::idle).
    pub fn next(&self) -> Result<Offer, AcceptError> {
        let mut s = lock(&self.shared.state);
        loop {
            if let Some(e) = s.closed.take() {
                return Err(AcceptError::Closed(e));
            }
            if s.stopped {
                return Err(AcceptError::Stopped);
            }
            match std::mem::replace(&mut s.receiver, Receiver::Waiting) {
                Receiver::Offered(offer) => {
                    s.receiver = Receiver::Busy {
                        peer: offer.peer.clone(),
                        since: Instant::now(),
                        progress: offer.progress.clone(),
                    };
                    return Ok(*offer);
                }
                other => s.receiver = other,
            }
            s = self
                .shared
                .changed
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The receiver is done with the last offer: connections are handshaken again (already
    /// once its receive failed, see `ReceiveProgress::failed`).
    pub fn idle(&self) {
        let mut s = lock(&self.shared.state);
        if matches!(s.receiver, Receiver::Busy { .. }) {
            s.receiver = Receiver::Waiting;
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        let offered = {
            let mut s = lock(&self.shared.state);
            s.stopped = true;
            // Their reads end; their replies still go out.
            for fd in s.handshakes.values() {
                shut_down(fd, libc::SHUT_RD);
            }
            std::mem::replace(&mut s.receiver, Receiver::Waiting)
        };
        if let Receiver::Offered(mut offer) = offered {
            reply_error(&mut offer.connection, "the destination stopped receiving");
        }
        if let Some(fd) = &self.wake {
            shut_down(fd, libc::SHUT_RDWR);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let deadline = Instant::now() + STOP_WAIT;
        let mut s = lock(&self.shared.state);
        while s.helpers > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "{} connections still being answered as the acceptor stops",
                    s.helpers
                );
                break;
            }
            s = match self.shared.changed.wait_timeout(s, left) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

fn shut_down(fd: &OwnedFd, how: libc::c_int) {
    // SAFETY: shutdown(2) on a socket this process owns; no memory is involved.
    unsafe { libc::shutdown(fd.as_raw_fd(), how) };
}

/// Whether a failed accept concerned one connection (or a passing shortage), so the listener
/// goes on; `Some(true)` when it is worth a pause first.
fn transient(e: &TransportError) -> Option<bool> {
    let TransportError::Accept(_, e) = e else {
        return None;
    };
    match e.raw_os_error()? {
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => Some(true),
        libc::ECONNABORTED
        | libc::EINTR
        | libc::EAGAIN
        | libc::EPROTO
        | libc::EPERM
        | libc::ENETDOWN
        | libc::ENOPROTOOPT
        | libc::EHOSTDOWN
        | libc::ENONET
        | libc::EHOSTUNREACH
        | libc::EOPNOTSUPP
        | libc::ENETUNREACH => Some(false),
        _ => None,
    }
}

fn accept_loop(mut listener: Listener, shared: &Arc<Shared>) {
    loop {
        if lock(&shared.state).stopped {
            return;
        }
        match listener.accept() {
            Ok(conn) => dispatch(conn, shared),
            Err(e) => match transient(&e) {
                Some(pause) if !lock(&shared.state).stopped => {
                    log::warn!("{}; accepting the next", crate::error_chain(&e));
                    if pause {
                        std::thread::sleep(RESOURCE_BACKOFF);
                    }
                }
                _ => {
                    let mut s = lock(&shared.state);
                    if !s.stopped {
                        s.closed = Some(e);
                    }
                    shared.changed.notify_all();
                    return;
                }
            },
        }
    }
}

/// What to tell a peer while the receiver is not waiting; `None` while it is.
fn busy_message(s: &State) -> Option<String> {
    match &s.receiver {
        Receiver::Waiting => None,
        // Its peer is being told why; the receiver takes the next offer.
        Receiver::Busy { progress, .. } if progress.failed() => None,
        Receiver::Offered(o) => Some(format!(
            "busy: a migration from {} is starting; try again when it is over",
            o.peer
        )),
        Receiver::Busy {
            peer,
            since,
            progress,
        } => {
            let pass = progress
                .pass()
                .map_or("before its first pass".to_string(), |p| format!("pass {p}"));
            Some(format!(
                "busy: receiving a migration from {peer} for {:.1} s ({pass}, {} bytes so \
                 far); try again when it is over",
                since.elapsed().as_secs_f64(),
                progress.bytes()
            ))
        }
    }
}

/// Starts a helper thread for a new connection, if there is room.
fn dispatch(mut conn: Connection, shared: &Arc<Shared>) {
    let peer = conn.peer().unwrap_or_else(|| "an unknown peer".into());
    let mut s = lock(&shared.state);
    if s.helpers >= MAX_HELPERS {
        drop(s);
        log::warn!(
            "Connection from {peer} closed unanswered: {MAX_HELPERS} others are being served"
        );
        conn.shutdown();
        return;
    }
    let id = s.next_id;
    s.next_id += 1;
    if let Some(fd) = conn.wake_handle() {
        s.handshakes.insert(id, fd);
    }
    s.helpers += 1;
    drop(s);
    let spawned = std::thread::Builder::new().name("handshake".into()).spawn({
        let shared = shared.clone();
        let peer = peer.clone();
        move || {
            serve(conn, peer, &shared);
            helper_done(&shared, id);
        }
    });
    if let Err(e) = spawned {
        log::warn!("Connection from {peer} closed unanswered: no thread for it ({e})");
        helper_done(shared, id);
    }
}

/// A helper thread: TLS first (if any), then a busy reply or the stream's handshake.
fn serve(conn: Connection, peer: String, shared: &Shared) {
    let Some(mut conn) = secure(conn, &peer, shared) else {
        return;
    };
    let busy = {
        let s = lock(&shared.state);
        // A receive waiting for its data connections reads what a connection sends first.
        busy_message(&s).filter(|_| joins_of(&s).is_none())
    };
    match busy {
        Some(message) => {
            log::warn!("Connection from {peer} refused: {message}");
            reply_error(&mut conn, &message);
        }
        None => handshake(conn, peer, shared),
    }
}

/// The TLS handshake, on an endpoint with TLS (bounded by the I/O and handshake timeouts);
/// `None` if it failed (logged: the peer was told, if it spoke at all).
fn secure(mut conn: Connection, peer: &str, shared: &Shared) -> Option<Connection> {
    let Some(tls) = &shared.accept.tls else {
        if shared.accept.warn_plaintext {
            log::warn!(
                "plaintext migration connection from {peer}: not authenticated, not encrypted \
                 (--insecure-plaintext)"
            );
        }
        return Some(conn);
    };
    let o = &shared.options;
    if let Err(e) = conn
        .set_read_timeout(o.io_timeout)
        .and_then(|()| conn.set_write_timeout(o.io_timeout))
    {
        log::warn!("Connection from {peer} closed: {e}");
        return None;
    }
    let deadline = Deadline::after(o.handshake_timeout, "TLS handshake");
    match conn.tls_server(tls, deadline) {
        Ok(c) => {
            let who = c
                .tls_peer()
                .map_or_else(|| "no readable subject".into(), ToString::to_string);
            match c.tls_allowed_by() {
                Some(by) => log::info!("TLS source {peer}: {who}, allowed by {by}"),
                None => log::info!("TLS source {peer}: {who}, signed by the CA"),
            }
            Some(c)
        }
        Err(e) if e.is_empty_connection() => {
            log::warn!("Connection from {peer} closed without sending anything (a probe?)");
            None
        }
        Err(e) => {
            log::warn!(
                "Connection from {peer} refused before a migration began: {}",
                crate::error_chain(&e)
            );
            None
        }
    }
}

fn helper_done(shared: &Shared, id: u64) {
    let mut s = lock(&shared.state);
    s.helpers -= 1;
    s.handshakes.remove(&id);
    shared.changed.notify_all();
}

/// A helper thread's handshake: offered to the receiver if it completes while the receiver
/// waits; refused (and logged with the peer's address) otherwise.
fn handshake(mut conn: Connection, peer: String, shared: &Shared) {
    let faults = match (shared.accept.faults)() {
        Ok(f) => f,
        Err(e) => {
            log::warn!("Connection from {peer} refused: bad fault injection setting: {e}");
            reply_error(&mut conn, &format!("bad fault injection setting: {e}"));
            return;
        }
    };
    let options = ReceiveOptions {
        faults: faults.clone(),
        ..shared.options.clone()
    };
    let handshake = match read_handshake(&mut conn, &options) {
        Ok(h) => h,
        Err(e) if e.is_empty_stream() => {
            log::warn!("Connection from {peer} closed without sending anything (a probe?)");
            return;
        }
        Err(e) => {
            log::warn!(
                "Connection from {peer} refused before a migration began: {}",
                crate::error_chain(&e)
            );
            linger(&mut conn);
            return;
        }
    };
    let handshake = match handshake.into_join() {
        Ok((join, reader)) => return hand_in(join, conn, reader, peer, shared),
        Err(handshake) => *handshake,
    };
    let mut s = lock(&shared.state);
    if s.stopped {
        drop(s);
        reply_error(&mut conn, "the destination stopped receiving");
        return;
    }
    if let Some(message) = busy_message(&s) {
        drop(s);
        log::warn!("Connection from {peer} refused: {message}");
        reply_error(&mut conn, &message);
        return;
    }
    log::info!("Connection from {peer}: migration stream begins");
    let progress = Arc::new(ReceiveProgress::default());
    progress.accept_joins();
    s.receiver = Receiver::Offered(Box::new(Offer {
        connection: conn,
        handshake,
        peer,
        progress,
        faults,
    }));
    shared.changed.notify_all();
}

/// The progress of the receive in progress if it waits for data connections.
fn joins_of(s: &State) -> Option<Arc<ReceiveProgress>> {
    match &s.receiver {
        Receiver::Busy { progress, .. } if progress.joins().may_come() => Some(progress.clone()),
        _ => None,
    }
}

/// A data connection (its first record was `Join`): handed to the receive in progress if
/// that waits for it, refused (and told why) otherwise.
fn hand_in(join: Join, conn: Connection, reader: ReaderState, peer: String, shared: &Shared) {
    let progress = joins_of(&lock(&shared.state));
    let refused = match progress {
        Some(p) => {
            let deadline = Instant::now() + shared.options.handshake_timeout;
            p.joins().offer(join, conn, reader, peer.clone(), deadline)
        }
        None => Err(Box::new((
            conn,
            "no migration here is waiting for data connections".to_string(),
        ))),
    };
    match refused {
        Ok(()) => log::debug!("Data connection {} from {peer} handed in", join.index),
        Err(refused) => {
            let (mut conn, message) = *refused;
            log::warn!("Data connection from {peer} refused: {message}");
            reply_error(&mut conn, &message);
        }
    }
}

/// Tells the peer `message` with an `Error` record and lets it read it before closing.
fn reply_error(conn: &mut Connection, message: &str) {
    let _ = conn.set_write_timeout(Some(LINGER));
    if send_reply(conn, RecordKind::Error, &encode_message(message)).is_ok() {
        linger(conn);
    }
}

/// A [`FaultSupplier`] that arms nothing.
pub fn no_faults() -> FaultSupplier {
    Arc::new(|| Ok(Faults::none()))
}

/// Closes our side for writing, then reads (and drops) what the peer still sends until it
/// closes, stops for a moment, or [`LINGER`] passed: closing on unread bytes would reset the
/// connection, and the peer could lose the reply it has not read yet.
fn linger(conn: &mut Connection) {
    conn.shutdown_write();
    let deadline = Instant::now() + LINGER;
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match conn.recv(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{fake_target, FakeVm};
    use crate::receive::receive_handshaken;
    use crate::stream::{read_reply, RecordWriter};
    use crate::transport::Endpoint;
    use crate::{send_migration, MigrationSource, SendOptions, PAGE_SIZE};

    const LAYOUT: &[(u64, usize)] = &[(0, 16 * PAGE_SIZE)];

    fn state(a: &Acceptor) -> std::sync::MutexGuard<'_, State> {
        lock(&a.shared.state)
    }

    fn listen(dir: &tempfile::TempDir) -> (Endpoint, Listener) {
        let ep = Endpoint::Unix(dir.path().join("m.sock"));
        let l = ep.listen().expect("listen");
        (ep, l)
    }

    fn options() -> ReceiveOptions {
        ReceiveOptions {
            handshake_timeout: Duration::from_millis(500),
            io_timeout: Some(Duration::from_secs(5)),
            ..Default::default()
        }
    }

    /// The reply a peer gets after sending `bytes` (and keeping its side open).
    fn reply_to(ep: &Endpoint, bytes: &[u8]) -> Result<(RecordKind, String), String> {
        let mut c = ep
            .connect(Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        if !bytes.is_empty() {
            c.send(&[bytes]).map_err(|e| e.to_string())?;
        }
        read_reply(&mut c)
            .map(|(k, p)| (k, String::from_utf8_lossy(&p).into_owned()))
            .map_err(|e| e.to_string())
    }

    /// A source's first records: header and Config.
    fn header_and_config() -> Vec<u8> {
        let mut c = Connection::memory();
        let config = FakeVm::new(LAYOUT).config_blob().expect("config");
        RecordWriter::start(&mut c)
            .and_then(|mut w| w.write_record(RecordKind::Config, &[&config]))
            .expect("write");
        c.into_bytes()
    }

    #[test]
    fn probes_garbage_and_idle_peers_are_refused_and_a_migration_still_comes_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ep, l) = listen(&dir);
        // A long handshake deadline: the idle peer below would hold a serial acceptor that
        // long.
        let opts = ReceiveOptions {
            handshake_timeout: Duration::from_secs(60),
            io_timeout: Some(Duration::from_secs(60)),
            ..options()
        };
        let acceptor = Acceptor::start(l, &opts, AcceptOptions::default()).expect("start");
        // A probe: connect, close.
        drop(ep.connect(Duration::from_secs(5)).expect("connect"));
        // Garbage: told why.
        let (kind, text) = reply_to(&ep, b"GET / HTTP/1.1\r\n\r\n").expect("a reply");
        assert_eq!(kind, RecordKind::Error);
        assert!(text.contains("Bad magic"), "{text}");
        // An idle peer, kept open: it holds nobody up.
        let idle = ep.connect(Duration::from_secs(5)).expect("connect");
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        let src = std::thread::spawn({
            let ep = ep.clone();
            move || {
                let mut vm = FakeVm::new(LAYOUT);
                vm.writer().fill(0x2000, 100, 7);
                let mut c = ep.connect(Duration::from_secs(5)).expect("connect");
                send_migration(&mut vm, &mut c, SendOptions::default())
            }
        });
        let offer = acceptor.next().expect("an offer");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the real source waited {:?} behind the idle peer",
            started.elapsed()
        );
        let mut target = fake_target(LAYOUT);
        let mut conn = offer.connection;
        let opts = ReceiveOptions {
            progress: offer.progress.clone(),
            ..opts
        };
        receive_handshaken(&mut target, &mut conn, offer.handshake, &opts).expect("received");
        src.join().expect("source thread").expect("sent");
        assert!(target.running);
        drop(acceptor);
        drop(idle);
    }

    #[test]
    fn a_second_source_is_told_the_destination_is_busy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ep, l) = listen(&dir);
        let acceptor = Acceptor::start(l, &options(), AcceptOptions::default()).expect("start");
        let hello = header_and_config();
        let first = std::thread::spawn({
            let ep = ep.clone();
            let hello = hello.clone();
            move || {
                let mut c = ep.connect(Duration::from_secs(5)).expect("connect");
                c.send(&[&hello]).expect("send");
                c
            }
        });
        let offer = acceptor.next().expect("the first is offered");
        let _first = first.join().expect("first");
        let (kind, text) = reply_to(&ep, &hello).expect("a reply");
        assert_eq!(kind, RecordKind::Error);
        assert!(
            text.starts_with("busy: receiving a migration from"),
            "{text}"
        );
        assert!(text.contains("before its first pass"), "{text}");
        // Not even a byte sent: told at once.
        let (kind, _) = reply_to(&ep, &[]).expect("a reply");
        assert_eq!(kind, RecordKind::Error);
        // Done with the first: the next is handshaken again.
        drop(offer);
        acceptor.idle();
        let next = std::thread::spawn({
            let ep = ep.clone();
            move || {
                let mut c = ep.connect(Duration::from_secs(5)).expect("connect");
                c.send(&[&hello]).expect("send");
                c
            }
        });
        let offer = acceptor.next().expect("offered again");
        assert!(offer.peer.contains("local process"), "{}", offer.peer);
        drop(next.join());
        // Every helper ends (the busy replies' lingers and the handshakes).
        let t = Instant::now();
        while state(&acceptor).helpers > 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "helpers end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_flood_of_connections_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ep, l) = listen(&dir);
        let opts = ReceiveOptions {
            handshake_timeout: Duration::from_secs(60),
            io_timeout: Some(Duration::from_secs(60)),
            ..options()
        };
        let acceptor = Acceptor::start(l, &opts, AcceptOptions::default()).expect("start");
        let idle: Vec<Connection> = (0..MAX_HELPERS)
            .map(|_| ep.connect(Duration::from_secs(5)).expect("connect"))
            .collect();
        let t = Instant::now();
        while state(&acceptor).helpers < MAX_HELPERS {
            assert!(t.elapsed() < Duration::from_secs(5), "all helpers busy");
            std::thread::sleep(Duration::from_millis(5));
        }
        // One more: closed at once, no thread for it.
        let mut extra = ep.connect(Duration::from_secs(5)).expect("connect");
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        assert_eq!(extra.recv(&mut buf).expect("closed, not timed out"), 0);
        assert_eq!(state(&acceptor).helpers, MAX_HELPERS);
        drop(idle);
    }

    #[test]
    fn a_closed_listener_ends_next_and_drop_wakes_handshakes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ep, l) = listen(&dir);
        let wake = l.wake_handle().expect("socket");
        let opts = ReceiveOptions {
            handshake_timeout: Duration::from_secs(60),
            ..options()
        };
        let acceptor = Acceptor::start(l, &opts, AcceptOptions::default()).expect("start");
        let _idle = ep.connect(Duration::from_secs(5)).expect("connect");
        let t = Instant::now();
        while state(&acceptor).handshakes.is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the handshake started"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        shut_down(&wake, libc::SHUT_RDWR);
        assert!(matches!(acceptor.next(), Err(AcceptError::Closed(_))));
        let shared = acceptor.shared.clone();
        let t = Instant::now();
        drop(acceptor);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the idle peer's handshake was woken"
        );
        assert_eq!(lock(&shared.state).helpers, 0);
    }
}

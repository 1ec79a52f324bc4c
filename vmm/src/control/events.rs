//! The process's event bus: migration events go to every `events` subscriber without ever
//! waiting for one. Each subscriber has a bounded queue and a writer thread of its own; a
//! publisher only serialises the line once and tries to queue it. A subscriber whose queue is
//! full misses lines (its next line is preceded by a `lagged` line saying how many); one whose
//! write does not complete within [`WRITE_TIMEOUT`], or whose peer closed, is dropped. A new
//! subscriber first gets the last [`EVENT_HISTORY`] lines.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info};

use super::protocol::{Done, Event, EventLine, Reply, Side, EVENT_HISTORY};
use crate::sync::lock;

/// Most subscribers at once.
pub const MAX_SUBSCRIBERS: usize = 16;
/// Lines queued for one subscriber before it misses some.
pub const QUEUE_LINES: usize = 256;
/// Longest one line may take to write before its subscriber is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle writer checks whether its peer went away.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Errors subscribing.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("too many event subscribers (at most {MAX_SUBSCRIBERS})")]
    TooMany,
    #[error("cannot set up the event connection")]
    Setup(#[source] io::Error),
}

struct Subscriber {
    queue: SyncSender<Arc<str>>,
    /// Lines this subscriber missed since its last written line.
    missed: Arc<AtomicU64>,
    /// Lines queued and not yet written.
    pending: Arc<AtomicUsize>,
}

impl Subscriber {
    /// Queues `line` if there is room (else counts it missed); false once the writer is gone.
    fn offer(&self, line: &Arc<str>) -> bool {
        self.pending.fetch_add(1, Ordering::AcqRel);
        match self.queue.try_send(line.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                if !line.is_empty() {
                    self.missed.fetch_add(1, Ordering::AcqRel);
                }
                true
            }
            Err(TrySendError::Disconnected(_)) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                false
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    seq: u64,
    history: VecDeque<Arc<str>>,
    subscribers: Vec<Subscriber>,
}

/// The event bus of one process (shared by the control handlers and the migration threads).
#[derive(Default)]
pub struct EventBus(Mutex<Inner>);

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = lock(&self.0);
        write!(
            f,
            "EventBus {{ seq: {}, subscribers: {} }}",
            inner.seq,
            inner.subscribers.len()
        )
    }
}

impl EventBus {
    pub fn new() -> Arc<EventBus> {
        Arc::default()
    }

    /// Sends `event` of `side` to every subscriber that keeps up; never blocks on one.
    pub fn publish(&self, side: Side, event: Event) {
        let mut inner = lock(&self.0);
        inner.seq += 1;
        let line = EventLine {
            seq: inner.seq,
            time_us: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            side: Some(side),
            event,
        };
        debug!("event {}: {}", line.seq, line.event.name());
        let Ok(text) = serde_json::to_string(&line) else {
            return;
        };
        let text: Arc<str> = Arc::from(text);
        if inner.history.len() == EVENT_HISTORY {
            inner.history.pop_front();
        }
        inner.history.push_back(text.clone());
        inner.subscribers.retain(|s| s.offer(&text));
    }

    /// Takes `conn` over as a subscriber: it gets `{"ok":true}`, the recent history, then
    /// every new event, from a thread of its own.
    pub fn subscribe(&self, conn: UnixStream) -> Result<(), EventsError> {
        let mut inner = lock(&self.0);
        // An empty line asks each writer whether it is still there.
        let probe: Arc<str> = Arc::from("");
        inner.subscribers.retain(|s| s.offer(&probe));
        if inner.subscribers.len() >= MAX_SUBSCRIBERS {
            return Err(EventsError::TooMany);
        }
        conn.set_nonblocking(false).map_err(EventsError::Setup)?;
        conn.set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(EventsError::Setup)?;
        let (queue, lines) = mpsc::sync_channel(QUEUE_LINES + EVENT_HISTORY);
        let missed = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(AtomicUsize::new(0));
        let ok: Arc<str> =
            Arc::from(serde_json::to_string(&Reply::Ok(Done {})).unwrap_or_default());
        for line in std::iter::once(&ok).chain(inner.history.iter()) {
            pending.fetch_add(1, Ordering::AcqRel);
            // Cannot be full: the queue has room for the history and more.
            let _ = queue.try_send(line.clone());
        }
        let writer = Writer {
            conn,
            lines,
            missed: missed.clone(),
            pending: pending.clone(),
        };
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || writer.run())
            .map_err(EventsError::Setup)?;
        inner.subscribers.push(Subscriber {
            queue,
            missed,
            pending,
        });
        Ok(())
    }

    /// Waits up to `limit` until every subscriber wrote what is queued for it (before the
    /// process ends, so the last events get out).
    pub fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let pending: usize = lock(&self.0)
                .subscribers
                .iter()
                .map(|s| s.pending.load(Ordering::Acquire))
                .sum();
            if pending == 0 || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Subscribers connected now.
    pub fn subscribers(&self) -> usize {
        lock(&self.0).subscribers.len()
    }
}

/// One subscriber's thread: writes its queued lines until the peer goes away or is too slow.
struct Writer {
    conn: UnixStream,
    lines: Receiver<Arc<str>>,
    missed: Arc<AtomicU64>,
    pending: Arc<AtomicUsize>,
}

impl Writer {
    fn run(mut self) {
        loop {
            let line = match self.lines.recv_timeout(IDLE_CHECK) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout) if self.peer_gone() => return,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // The empty line is the bus asking whether this writer is still there.
            let written = if line.is_empty() {
                if self.peer_gone() {
                    Err(io::Error::other("the subscriber closed its connection"))
                } else {
                    Ok(())
                }
            } else {
                self.write(&line)
            };
            self.pending.fetch_sub(1, Ordering::AcqRel);
            if let Err(e) = written {
                info!("events subscriber dropped: {e}");
                return;
            }
        }
    }

    fn write(&mut self, line: &str) -> io::Result<()> {
        let missed = self.missed.swap(0, Ordering::AcqRel);
        if missed > 0 {
            let lagged = EventLine {
                seq: 0,
                time_us: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64),
                side: None,
                event: Event::Lagged { missed },
            };
            let text = serde_json::to_string(&lagged).map_err(io::Error::other)?;
            self.conn.write_all(format!("{text}\n").as_bytes())?;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.conn.write_all(&buf)
    }

    /// Whether the peer closed its end (a subscriber never needs to send anything).
    fn peer_gone(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: recv(2) with MSG_PEEK | MSG_DONTWAIT writes at most one byte into `byte`,
        // which outlives the call; the socket is this writer's own.
        let n = unsafe {
            libc::recv(
                self.conn.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => true,
            n if n > 0 => false,
            _ => io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    fn read_lines(conn: UnixStream, n: usize) -> Vec<serde_json::Value> {
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut r = BufReader::new(conn);
        (0..n)
            .map(|_| {
                let mut l = String::new();
                r.read_line(&mut l).expect("line");
                serde_json::from_str(&l).expect("json")
            })
            .collect()
    }

    #[test]
    fn a_subscriber_gets_ok_the_history_then_new_events_in_order() {
        let bus = EventBus::new();
        bus.publish(
            Side::Destination,
            Event::Waiting {
                listen: "tcp:h:1".into(),
            },
        );
        let (ours, theirs) = UnixStream::pair().expect("pair");
        bus.subscribe(ours).expect("subscribe");
        bus.publish(Side::Destination, Event::Receiving { peer: None });
        bus.publish(Side::Destination, Event::Running);
        let lines = read_lines(theirs, 4);
        assert_eq!(lines[0], serde_json::json!({"ok": true}));
        let names: Vec<&str> = lines[1..]
            .iter()
            .map(|l| l["event"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(names, ["waiting", "receiving", "running"]);
        let seqs: Vec<u64> = lines[1..]
            .iter()
            .map(|l| l["seq"].as_u64().unwrap_or(0))
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[test]
    fn a_stuck_subscriber_never_blocks_the_publisher_and_learns_what_it_missed() {
        let bus = EventBus::new();
        let (ours, theirs) = UnixStream::pair().expect("pair");
        bus.subscribe(ours).expect("subscribe");
        // Nobody reads `theirs`: the socket buffer fills, then the queue, then lines are missed.
        let big = "x".repeat(2048);
        let started = Instant::now();
        for _ in 0..(QUEUE_LINES * 4) {
            bus.publish(
                Side::Source,
                Event::Failed {
                    reason: big.clone(),
                },
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "publishing to a stuck subscriber took {:?}",
            started.elapsed()
        );
        // Reading now, the subscriber is told it lagged.
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut r = BufReader::new(theirs);
        let mut lagged = None;
        for _ in 0..(QUEUE_LINES * 4) {
            let mut l = String::new();
            if r.read_line(&mut l).expect("line") == 0 {
                break;
            }
            let v: serde_json::Value = serde_json::from_str(&l).expect("json");
            if v["event"] == "lagged" {
                lagged = v["missed"].as_u64();
                break;
            }
        }
        assert!(lagged.is_some_and(|n| n > 0), "a lagged line: {lagged:?}");
    }

    #[test]
    fn subscribers_are_bounded_and_closed_ones_make_room() {
        let bus = EventBus::new();
        let mut peers = Vec::new();
        for _ in 0..MAX_SUBSCRIBERS {
            let (ours, theirs) = UnixStream::pair().expect("pair");
            bus.subscribe(ours).expect("subscribe");
            peers.push(theirs);
        }
        let (ours, _theirs) = UnixStream::pair().expect("pair");
        assert!(matches!(bus.subscribe(ours), Err(EventsError::TooMany)));
        drop(peers.pop());
        // The writer notices its peer left within its idle check.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (ours, _theirs) = UnixStream::pair().expect("pair");
            match bus.subscribe(ours) {
                Ok(()) => break,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("a closed subscriber still holds its place: {e}"),
            }
        }
    }

    #[test]
    fn flush_waits_for_the_queued_lines() {
        let bus = EventBus::new();
        let (ours, theirs) = UnixStream::pair().expect("pair");
        bus.subscribe(ours).expect("subscribe");
        bus.publish(Side::Source, Event::Paused);
        bus.flush(Duration::from_secs(5));
        assert_eq!(
            lock(&bus.0).subscribers[0].pending.load(Ordering::Acquire),
            0
        );
        let lines = read_lines(theirs, 2);
        assert_eq!(lines[1]["event"], "paused");
    }
}

//! Following a process's `events` stream from a test: a thread collects every [`EventLine`]
//! until the process closes the stream; the test waits for the events it expects.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vmm::control::protocol::{Event, EventLine, Side};

#[derive(Default)]
struct Seen {
    lines: Vec<EventLine>,
    ended: Option<Result<(), String>>,
}

/// The events of one process, collected as they come.
pub struct Events {
    name: String,
    seen: Arc<(Mutex<Seen>, Condvar)>,
}

impl Events {
    /// Subscribes to the control socket `api` (of `name`, for messages).
    pub fn follow(name: &str, api: &Path) -> Events {
        let seen: Arc<(Mutex<Seen>, Condvar)> = Arc::default();
        let api = api.to_path_buf();
        let s2 = seen.clone();
        thread::spawn(move || {
            let r = vmm::control::client::events(&api, |l| {
                vmm::sync::lock(&s2.0).lines.push(l.clone());
                s2.1.notify_all();
                true
            })
            .map_err(|e| vmm::error_chain(&e));
            vmm::sync::lock(&s2.0).ended = Some(r);
            s2.1.notify_all();
        });
        Events {
            name: name.to_string(),
            seen,
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<EventLine> {
        vmm::sync::lock(&self.seen.0).lines.clone()
    }

    /// The names of the events of `side` so far, in order.
    pub fn names(&self, side: Side) -> Vec<&'static str> {
        self.lines()
            .iter()
            .filter(|l| l.side == Some(side))
            .map(|l| l.event.name())
            .collect()
    }

    /// Waits for an event of `side` satisfying `pred`; panics with what came on timeout.
    pub fn wait(&self, side: Side, timeout: Duration, pred: impl Fn(&Event) -> bool) -> EventLine {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.seen;
        let mut seen = vmm::sync::lock(m);
        loop {
            if let Some(l) = seen
                .lines
                .iter()
                .find(|l| l.side == Some(side) && pred(&l.event))
            {
                return l.clone();
            }
            let now = Instant::now();
            if now >= deadline || seen.ended.is_some() {
                let names: Vec<String> = seen
                    .lines
                    .iter()
                    .map(|l| format!("{:?} {}", l.side, l.event.name()))
                    .collect();
                panic!(
                    "{}: the expected {side:?} event did not come (stream ended: {:?}); \
                     came: {names:?}",
                    self.name, seen.ended
                );
            }
            seen = cv
                .wait_timeout(seen, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Waits until the process closed the stream (it ended); returns how.
    pub fn wait_end(&self, timeout: Duration) -> Option<Result<(), String>> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.seen;
        let mut seen = vmm::sync::lock(m);
        while seen.ended.is_none() && Instant::now() < deadline {
            seen = cv
                .wait_timeout(seen, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        seen.ended.clone()
    }
}

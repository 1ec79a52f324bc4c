//! Bounds on waits: a [`Deadline`] no wait may pass, and a `Bound` (a per-operation timeout
//! plus the deadline) armed on a socket before each blocking call.

use std::io;
use std::time::{Duration, Instant};

/// A point in time no wait may pass, and what it bounds (for the error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    pub at: Instant,
    pub what: &'static str,
}

impl Deadline {
    /// `after` from now.
    pub fn after(after: Duration, what: &'static str) -> Deadline {
        Deadline {
            at: Instant::now() + after,
            what,
        }
    }

    fn passed(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the {} deadline passed", self.what),
        )
    }
}

/// What bounds one kind of wait (reads or writes) on a socket: the per-operation timeout and
/// the deadline no operation may pass.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bound {
    pub(crate) timeout: Option<Duration>,
    pub(crate) deadline: Option<Deadline>,
}

impl Bound {
    /// Before each blocking call on a socket with a deadline: sets the socket's timeout to the
    /// wait allowed now (the operation's timeout, cut to what is left), or fails once the
    /// deadline passed. Without a deadline the socket keeps the timeout it has.
    pub(crate) fn arm(
        &self,
        set: impl FnOnce(Option<Duration>) -> io::Result<()>,
    ) -> io::Result<()> {
        let Some(d) = self.deadline else {
            return Ok(());
        };
        let left = d.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(d.passed());
        }
        set(Some(self.timeout.map_or(left, |t| t.min(left))))
    }

    /// A timed-out blocking call (`EAGAIN`) as the error it is.
    pub(crate) fn timed_out(&self, e: io::Error) -> io::Error {
        if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::TimedOut {
            return e;
        }
        match self.deadline {
            Some(d) if Instant::now() >= d.at => d.passed(),
            _ => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the peer did nothing for {:?}",
                    self.timeout.unwrap_or_default()
                ),
            ),
        }
    }
}

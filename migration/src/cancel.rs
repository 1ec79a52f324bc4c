//! Giving a migration up from another thread. The sender checks the flag before each record of
//! guest memory, between passes and before the final pause; the stream then ends with an
//! `Abort` record, so the destination says why, and the source guest runs on as after any
//! failure. The destination's flag is set by whoever also shuts the connection's reading side
//! down; the receiver then fails as given up and tells the source so in its `Error` reply.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A cancellation flag shared between whoever may cancel and the sender.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Ask the migration to stop at its next check.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// An error the record-writing code can return through `io::Result`.
    pub(crate) fn check(&self) -> io::Result<()> {
        if self.is_cancelled() {
            return Err(io::Error::other(Cancelled));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the migration was cancelled")]
struct Cancelled;

/// The migration's deadline (with action `cancel`) passed while the sender was writing.
#[derive(Debug, thiserror::Error)]
#[error("the migration's deadline ({0:?}) passed")]
pub(crate) struct DeadlineReached(pub Duration);

/// The deadline `e` reports, if it is a [`DeadlineReached`].
pub(crate) fn deadline_of(e: &io::Error) -> Option<Duration> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<DeadlineReached>())
        .map(|d| d.0)
}

/// Whether `e` came from [`Cancel::check`].
pub(crate) fn is_cancellation(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Cancelled>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_flag_and_check_reports_it() {
        let c = Cancel::new();
        let other = c.clone();
        assert!(c.check().is_ok());
        other.cancel();
        assert!(c.is_cancelled());
        let e = c.check().unwrap_err();
        assert!(is_cancellation(&e));
        assert!(!is_cancellation(&io::Error::other("broken pipe")));
    }
}

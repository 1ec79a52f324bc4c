//! The VM's outgoing migration as the control socket sees it: at most one at a time, how to
//! cancel it, what `status` shows of it, and, once it succeeded, a claim that stays until the
//! process ends (a VM that moved must never be resumed or sent again).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use migration::Cancel;

use crate::control::protocol::{OutgoingStatus, PassProgress};
use crate::sync::lock;

/// The VM's outgoing migration, shared by the control handler and the worker.
#[derive(Default)]
pub struct Outgoing(Mutex<Option<Current>>);

struct Current {
    to: String,
    started: Instant,
    /// The migration succeeded: the guest runs at `to` now.
    moved: bool,
    cancel: Cancel,
    /// The last pass's progress, `None` during the bulk pass.
    progress: Option<PassProgress>,
}

impl Outgoing {
    fn lock(&self) -> MutexGuard<'_, Option<Current>> {
        lock(&self.0)
    }

    /// Claims the slot for a migration to `to`: its cancellation flag, or why not.
    pub(crate) fn begin(&self, to: &str) -> Result<Cancel, String> {
        let mut current = self.lock();
        match current.as_ref() {
            Some(c) if c.moved => return Err(format!("the VM has moved to {}", c.to)),
            Some(_) => return Err("a migration is already running".into()),
            None => {}
        }
        let cancel = Cancel::new();
        *current = Some(Current {
            to: to.to_string(),
            started: Instant::now(),
            moved: false,
            cancel: cancel.clone(),
            progress: None,
        });
        Ok(cancel)
    }

    /// Records the progress of the pass that just ended.
    pub fn progress(&self, progress: PassProgress) {
        if let Some(c) = self.lock().as_mut() {
            c.progress = Some(progress);
        }
    }

    /// The migration failed or was cancelled: the slot is free.
    pub fn end(&self) {
        *self.lock() = None;
    }

    /// The migration succeeded: the slot stays taken until the process ends.
    pub fn moved(&self) {
        if let Some(c) = self.lock().as_mut() {
            c.moved = true;
        }
    }

    pub(crate) fn running(&self) -> bool {
        self.lock().is_some()
    }

    /// Cancels the running migration and waits up to `limit` for it to give up (a migration
    /// past the final pause completes instead). Used when the VM is told to end.
    pub fn cancel_and_wait(&self, limit: Duration) {
        if !self.cancel() {
            return;
        }
        log::info!("cancelling the running migration before the VM ends");
        let deadline = Instant::now() + limit;
        while self.lock().as_ref().is_some_and(|c| !c.moved) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asks the running migration to stop; false when none runs.
    pub(crate) fn cancel(&self) -> bool {
        match self.lock().as_ref() {
            Some(c) if !c.moved => {
                c.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// What `status` shows of the running migration.
    pub(crate) fn status(&self) -> Option<OutgoingStatus> {
        self.lock().as_ref().map(|c| OutgoingStatus {
            to: c.to.clone(),
            elapsed_ms: c.started.elapsed().as_millis() as u64,
            cancelling: c.cancel.is_cancelled(),
            moved: c.moved,
            last_pass: c.progress.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outgoing_holds_one_migration_and_reports_it() {
        let o = Outgoing::default();
        assert!(!o.running() && o.status().is_none());
        assert!(!o.cancel(), "nothing to cancel");
        let cancel = o.begin("unix:/m").expect("free slot");
        assert!(o.begin("unix:/other").is_err(), "one at a time");
        let s = o.status().expect("running");
        assert_eq!((s.to.as_str(), s.last_pass), ("unix:/m", None));
        let progress = PassProgress {
            pass: 0,
            remaining_bytes: 4096,
            bandwidth_bps: 1,
            dirty_rate_bps: 2,
            expected_downtime_ms: 0.5,
            diverging: false,
        };
        o.progress(progress.clone());
        assert_eq!(o.status().expect("running").last_pass, Some(progress));
        assert!(o.cancel() && cancel.is_cancelled());
        assert!(o.status().expect("running").cancelling);
        o.end();
        assert!(!o.running() && o.status().is_none());
        let next = o.begin("unix:/m").expect("free again");
        assert!(!next.is_cancelled(), "a new migration starts uncancelled");
        o.moved();
        assert!(!o.cancel(), "a finished migration cannot be cancelled");
        assert_eq!(
            o.begin("unix:/n").unwrap_err(),
            "the VM has moved to unix:/m",
            "a VM that left is never sent again"
        );
    }
}

//! The VM's outgoing migration as the control socket sees it: at most one at a time, how to
//! cancel it, what `status` shows of it, and, once it succeeded, a claim that stays until the
//! process ends (a VM that moved must never be resumed or sent again). A migration whose
//! outcome is unknown (handed over, no confirmation) keeps the claim too, until the operator
//! resumes the guest here with `force` (or ends it).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use migration::Cancel;

use crate::control::protocol::{EndedMigration, MigrationFigures, OutgoingStatus, PassProgress};
use crate::sync::lock;

/// The VM's outgoing migration, shared by the control handler and the worker.
#[derive(Default)]
pub struct Outgoing {
    current: Mutex<Option<Current>>,
    /// The last migration that ended with the guest still here.
    last: Mutex<Option<EndedMigration>>,
}

struct Current {
    to: String,
    started: Instant,
    state: State,
    cancel: Cancel,
    /// The last pass's progress, `None` during the bulk pass.
    progress: Option<PassProgress>,
    /// The figures as of the last pass.
    figures: Option<MigrationFigures>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Migrating,
    /// The migration succeeded: the guest runs at `to` now.
    Moved,
    /// Handed over without confirmation: the guest may run at `to`.
    Unknown,
}

/// Why a paused VM may not simply be resumed.
pub fn unknown_outcome_message(to: &str) -> String {
    format!(
        "outcome unknown: the guest was handed over to {to} and may be running there; it stays \
         paused here. Resume it here with force only if it does not run at {to}, or shut it down"
    )
}

impl Outgoing {
    fn lock(&self) -> MutexGuard<'_, Option<Current>> {
        lock(&self.current)
    }

    /// Claims the slot for a migration to `to`: its cancellation flag, or why not.
    pub(crate) fn begin(&self, to: &str) -> Result<Cancel, String> {
        let mut current = self.lock();
        match current.as_ref().map(|c| (c.state, &c.to)) {
            Some((State::Moved, to)) => return Err(format!("the VM has moved to {to}")),
            Some((State::Unknown, to)) => return Err(unknown_outcome_message(to)),
            Some((State::Migrating, _)) => return Err("a migration is already running".into()),
            None => {}
        }
        let cancel = Cancel::new();
        *current = Some(Current {
            to: to.to_string(),
            started: Instant::now(),
            state: State::Migrating,
            cancel: cancel.clone(),
            progress: None,
            figures: None,
        });
        Ok(cancel)
    }

    /// Records the progress and figures of the pass that just ended.
    pub fn progress(&self, progress: PassProgress, figures: MigrationFigures) {
        if let Some(c) = self.lock().as_mut() {
            c.progress = Some(progress);
            c.figures = Some(figures);
        }
    }

    /// The migration ended and the guest runs here (a snapshot kept running): the slot is
    /// free.
    pub fn end(&self) {
        *self.lock() = None;
    }

    /// The migration failed or was given up (`cancelled`) and the guest runs here: the slot
    /// is free and `status` shows why until the next one ends.
    pub fn failed(&self, cancelled: bool, error: String) {
        let ended = self.lock().take();
        if let Some(c) = ended {
            *lock(&self.last) = Some(EndedMigration {
                to: c.to,
                cancelled,
                error,
            });
        }
    }

    /// How the last migration that left the guest here ended.
    pub(crate) fn last(&self) -> Option<EndedMigration> {
        lock(&self.last).clone()
    }

    /// The migration succeeded: the slot stays taken until the process ends.
    pub fn moved(&self) {
        self.settle(State::Moved);
    }

    /// The guest was handed over without confirmation: the slot stays taken until
    /// the operator resumes it here with force, or the process ends.
    pub fn outcome_unknown(&self) {
        self.settle(State::Unknown);
    }

    fn settle(&self, state: State) {
        if let Some(c) = self.lock().as_mut() {
            c.state = state;
        }
    }

    /// The destination `to` of a migration whose outcome is unknown.
    pub(crate) fn unknown_to(&self) -> Option<String> {
        self.lock()
            .as_ref()
            .filter(|c| c.state == State::Unknown)
            .map(|c| c.to.clone())
    }

    /// The operator resumed the guest here after an unknown outcome: the slot is free.
    pub(crate) fn resumed_by_force(&self) {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|c| c.state == State::Unknown) {
            *current = None;
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
        while self
            .lock()
            .as_ref()
            .is_some_and(|c| c.state == State::Migrating)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asks the running migration to stop; false when none runs.
    pub(crate) fn cancel(&self) -> bool {
        match self.lock().as_ref() {
            Some(c) if c.state == State::Migrating => {
                c.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// What `status` shows of the running migration.
    pub(crate) fn status(&self) -> Option<OutgoingStatus> {
        self.lock().as_ref().map(|c| {
            let elapsed_ms = c.started.elapsed().as_millis() as u64;
            let stats = c.figures.clone().map(|f| {
                Box::new(MigrationFigures {
                    total_time_ms: if c.state == State::Migrating {
                        elapsed_ms
                    } else {
                        f.total_time_ms
                    },
                    ..f
                })
            });
            OutgoingStatus {
                to: c.to.clone(),
                elapsed_ms,
                cancelling: c.cancel.is_cancelled(),
                moved: c.state == State::Moved,
                outcome_unknown: c.state == State::Unknown,
                last_pass: c.progress.clone(),
                stats,
            }
        })
    }

    /// Records the figures of the migration that completed.
    pub fn completed(&self, figures: MigrationFigures) {
        if let Some(c) = self.lock().as_mut() {
            c.figures = Some(figures);
        }
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
        let figures = MigrationFigures {
            total_time_ms: 0,
            setup_time_ms: 1.0,
            transferred_bytes: 4096,
            remaining_bytes: 4096,
            total_bytes: 1 << 20,
            duplicate_pages: 0,
            normal_pages: 1,
            normal_bytes: 4096,
            mbps: 1.0,
            dirty_pages_rate: 1,
            dirty_sync_count: 1,
            expected_downtime_ms: Some(0.5),
            downtime_ms: None,
        };
        o.progress(progress.clone(), figures);
        let s = o.status().expect("running");
        assert_eq!(s.last_pass, Some(progress));
        assert_eq!(s.stats.map(|f| f.transferred_bytes), Some(4096));
        assert!(o.cancel() && cancel.is_cancelled());
        assert!(o.status().expect("running").cancelling);
        assert_eq!(o.last(), None);
        o.failed(true, "cancelled".into());
        assert!(!o.running() && o.status().is_none());
        assert_eq!(
            o.last(),
            Some(EndedMigration {
                to: "unix:/m".into(),
                cancelled: true,
                error: "cancelled".into()
            }),
            "status shows how the last one ended"
        );
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

    #[test]
    fn an_unknown_outcome_holds_the_vm_until_forced() {
        let o = Outgoing::default();
        o.begin("tcp:h:1").expect("free slot");
        assert_eq!(o.unknown_to(), None);
        o.outcome_unknown();
        assert!(!o.cancel(), "nothing to cancel any more");
        assert!(o.status().expect("held").outcome_unknown);
        assert_eq!(o.unknown_to().as_deref(), Some("tcp:h:1"));
        assert!(o
            .begin("unix:/m")
            .unwrap_err()
            .starts_with("outcome unknown"));
        o.resumed_by_force();
        assert!(!o.running(), "the operator's resume frees the VM");
        o.begin("unix:/m").expect("migratable again");
        o.resumed_by_force();
        assert!(o.running(), "force frees only an unknown outcome");
    }
}

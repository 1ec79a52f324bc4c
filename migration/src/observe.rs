//! Milestones of a migration, told to whoever watches it (the vmm turns them into control-socket
//! events): the moments a caller cannot see from outside [`send_migration`] or
//! [`receive_migration`] because they happen inside them. The observer is called on the
//! migrating thread and must return quickly (the vmm only queues the event).
//!
//! [`send_migration`]: crate::send_migration
//! [`receive_migration`]: crate::receive_migration

use std::fmt;
use std::sync::Arc;

/// A step of the commit protocol that one side reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Milestone {
    /// Source: the guest is paused for the final pass.
    Paused,
    /// Destination: the whole stream arrived and every state is restored; `Restored` goes out
    /// and the guest waits for `Go`.
    Restored,
    /// Source: `Go` went out (the guest is the destination's now). Destination: `Go` arrived.
    Committed,
    /// Destination: the guest runs here (before `Running` goes out). Source: `Running` arrived.
    Running,
}

/// Who is told of the [`Milestone`]s (cheap to clone; the default tells nobody).
#[derive(Clone, Default)]
pub struct Observer(Option<Arc<dyn Fn(Milestone) + Send + Sync>>);

impl Observer {
    /// An observer that calls `f` for each milestone.
    pub fn new(f: impl Fn(Milestone) + Send + Sync + 'static) -> Observer {
        Observer(Some(Arc::new(f)))
    }

    /// Tells the observer, if there is one.
    pub fn tell(&self, m: Milestone) {
        if let Some(f) = &self.0 {
            f(m);
        }
    }
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Observer(set)"
        } else {
            "Observer(none)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn an_observer_hears_each_milestone_once_and_the_default_nobody() {
        Observer::default().tell(Milestone::Paused);
        let heard = Arc::new(Mutex::new(Vec::new()));
        let o = Observer::new({
            let heard = heard.clone();
            move |m| heard.lock().expect("lock").push(m)
        });
        o.clone().tell(Milestone::Restored);
        o.tell(Milestone::Committed);
        assert_eq!(
            *heard.lock().expect("lock"),
            [Milestone::Restored, Milestone::Committed]
        );
        assert_eq!(format!("{o:?}"), "Observer(set)");
    }
}

//! What the two event loops share: the VM's (`runner::serve`) and the one a `receive` runs
//! until its guest starts (`migrate::incoming::InterimLoop`). Both hold [`Subscriber`]s and
//! run with [`run_until`].

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};
use log::warn;

use crate::exit::ExitSignal;

/// What the event loops hold.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// An event loop.
pub type EventLoop = EventManager<Subscriber>;

/// Wakes the event loop when the VM ends.
pub struct ExitWatcher(pub Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event_fd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event_fd(), EventSet::IN)) {
            warn!("exit eventfd cannot be polled: {e:?}");
        }
    }
}

/// Dispatches events until `done()` holds (checked before each wait). A signal's `EINTR`
/// comes back as a wait with no events; an error means the epoll set is broken.
pub fn run_until(
    em: &mut EventLoop,
    mut done: impl FnMut() -> bool,
) -> Result<(), event_manager::Error> {
    while !done() {
        em.run()?;
    }
    Ok(())
}

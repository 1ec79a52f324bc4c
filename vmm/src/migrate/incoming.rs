//! `minivmm receive` before it has a guest. The receiving thread waits for the source (or
//! opens a snapshot) and loads the stream, so until the guest starts an [`InterimLoop`], an
//! event loop on a thread of its own, stands in for the VM's:
//!
//! - it serves the control socket (`control::dispatch::WaitingControl`): `status` says whether the process
//!   waits or receives, `shutdown` gives up, and the other requests are refused because there
//!   is no VM to act on (a client never hangs on an unanswered socket);
//! - it reads the exit signals, each of which gives up too.
//!
//! Giving up, [`Incoming::end`], shuts down the sockets the receive is blocked on (only the
//! reading side of a connection), so it fails at once, tells the source it gave up, and the
//! guest is never started: the source, which has no confirmation, keeps running.
//!
//! When the guest runs, the control socket goes back to the VM's event loop: connections
//! opened while waiting are closed then, and their clients connect again.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use migration::{Cancel, ReceiveProgress};

use crate::control::events::EventBus;
use crate::control::protocol::{Event, IncomingState, Side};
use crate::control::{ControlServer, ControlSocket, RequestHandler};
use crate::event_loop::{run_until, EventLoop};
use crate::exit::VmExit;
use crate::signals::SignalSubscriber;
use crate::sync::{into_inner, lock};

/// Errors starting the interim event loop.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("cannot set up the interim event loop")]
    EventManager(#[source] event_manager::Error),
    #[error("cannot create the interim loop's stop eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot watch the exit signals")]
    Signals(#[source] io::Error),
    #[error("cannot start the interim loop's thread")]
    Thread(#[source] io::Error),
}

#[derive(Debug)]
struct State {
    phase: IncomingState,
    /// The current attempt's progress (while receiving).
    progress: Option<Arc<ReceiveProgress>>,
    ended: Option<VmExit>,
    listener: Option<OwnedFd>,
    connection: Option<OwnedFd>,
}

/// The state of an incoming migration that the interim loop shares with the receiving thread.
#[derive(Debug)]
pub struct Incoming {
    listen: String,
    state: Mutex<State>,
    /// For `ReceiveOptions::give_up`: set by [`Incoming::end`].
    give_up: Cancel,
    /// Where the phases go (`waiting`, `receiving`).
    events: Arc<EventBus>,
}

impl Incoming {
    /// `listen` names the endpoint, for replies; the phases go to `events`, starting with
    /// `waiting`.
    pub fn new(listen: String, events: Arc<EventBus>) -> Arc<Incoming> {
        events.publish(
            Side::Destination,
            Event::Waiting {
                listen: listen.clone(),
            },
        );
        Arc::new(Incoming {
            events,
            listen,
            state: Mutex::new(State {
                phase: IncomingState::Waiting,
                progress: None,
                ended: None,
                listener: None,
                connection: None,
            }),
            give_up: Cancel::new(),
        })
    }

    /// The flag the receiver checks when its connection stops ([`end`](Incoming::end) sets it).
    pub fn give_up_flag(&self) -> Cancel {
        self.give_up.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The listening socket (a handle from `Listener::wake_handle`), shut down by [`end`].
    ///
    /// [`end`]: Incoming::end
    pub fn waiting_on(&self, listener: Option<OwnedFd>) {
        let mut s = self.lock();
        s.listener = listener;
        s.shut_down_if_ended();
    }

    /// A source's stream began (from `peer`, when known): `connection` (from
    /// `Connection::wake_handle`) is shut down by [`end`](Incoming::end), and `progress` is the
    /// receive's, which `end` gives up.
    pub fn receiving(
        &self,
        connection: Option<OwnedFd>,
        progress: Arc<ReceiveProgress>,
        peer: Option<String>,
    ) {
        self.events
            .publish(Side::Destination, Event::Receiving { peer });
        let mut s = self.lock();
        s.phase = IncomingState::Receiving;
        s.connection = connection;
        if s.ended.is_some() {
            progress.give_up();
        }
        s.progress = Some(progress);
        s.shut_down_if_ended();
    }

    /// An attempt failed with `reason` (another may follow).
    pub fn attempt_failed(&self, reason: String) {
        self.events
            .publish(Side::Destination, Event::Failed { reason });
    }

    /// The attempt failed; back to waiting for the next source.
    pub fn waiting(&self) {
        self.events.publish(
            Side::Destination,
            Event::Waiting {
                listen: self.listen.clone(),
            },
        );
        let mut s = self.lock();
        s.phase = IncomingState::Waiting;
        s.progress = None;
        s.connection = None;
    }

    /// Give up the incoming migration (the first reason wins): the blocked accept or read
    /// fails at once, and the source is told so and keeps its guest. Too late once the
    /// source committed (its `Go` arrived): the guest is this side's then, and runs; false.
    pub fn end(&self, why: VmExit) -> bool {
        let mut s = self.lock();
        if let Some(p) = &s.progress {
            if !p.give_up() {
                warn!(
                    "{why:?} comes too late to give the incoming migration up: the source \
                     committed and the guest runs here (ask again to end it)"
                );
                return false;
            }
        }
        info!("incoming migration given up: {why:?}");
        s.ended.get_or_insert(why);
        self.give_up.cancel();
        s.shut_down_if_ended();
        true
    }

    /// The endpoint the source is awaited on.
    pub fn listen(&self) -> &str {
        &self.listen
    }

    /// The phase and, while receiving, the attempt's progress.
    pub fn phase(&self) -> (IncomingState, Option<Arc<ReceiveProgress>>) {
        let s = self.lock();
        (s.phase, s.progress.clone())
    }

    /// Why the incoming migration was given up, if it was.
    pub fn ended(&self) -> Option<VmExit> {
        self.lock().ended.clone()
    }
}

impl State {
    fn shut_down_if_ended(&self) {
        if self.ended.is_none() {
            return;
        }
        // The connection keeps its writing side: the receiver tells the source why.
        let sockets = [
            (&self.listener, libc::SHUT_RDWR),
            (&self.connection, libc::SHUT_RD),
        ];
        for (fd, how) in sockets {
            if let Some(fd) = fd {
                // SAFETY: shutdown(2) on a socket this process owns; no memory is involved.
                unsafe { libc::shutdown(fd.as_raw_fd(), how) };
            }
        }
    }
}

/// The control server plus the eventfd that stops the interim loop.
struct Served<H: RequestHandler> {
    server: ControlServer<H>,
    stop: EventFd,
    stopped: bool,
}

impl<H: RequestHandler> MutEventSubscriber for Served<H> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.stop.as_raw_fd() {
            self.stopped = true;
        } else {
            self.server.process(events, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.stop, EventSet::IN)) {
            warn!("the interim loop's stop eventfd cannot be polled: {e:?}");
        }
        self.server.init(ops);
    }
}

/// The event loop of a `receive` until its guest runs, on a thread of its own: the control
/// socket (answered by `handler`, which reads the [`Incoming`] state:
/// `control::dispatch::WaitingControl`) and the exit signals (each one gives the migration
/// up). Dropped without [`InterimLoop::stop`], it stops the thread and removes the socket.
pub struct InterimLoop<H: RequestHandler> {
    served: Option<Arc<Mutex<Served<H>>>>,
    thread: Option<JoinHandle<()>>,
}

impl<H: RequestHandler + Send + 'static> InterimLoop<H> {
    pub fn start(
        socket: ControlSocket,
        handler: H,
        incoming: Arc<Incoming>,
    ) -> Result<InterimLoop<H>, IncomingError> {
        let mut em = EventLoop::new().map_err(IncomingError::EventManager)?;
        let signals = SignalSubscriber::new({
            let incoming = incoming.clone();
            move |sig| {
                incoming.end(VmExit::Signal(sig));
            }
        })
        .map_err(IncomingError::Signals)?;
        em.add_subscriber(Arc::new(Mutex::new(signals)));
        let served = Arc::new(Mutex::new(Served {
            server: ControlServer::new(socket, Arc::new(Mutex::new(handler))),
            stop: EventFd::new(EFD_NONBLOCK).map_err(IncomingError::EventFd)?,
            stopped: false,
        }));
        em.add_subscriber(served.clone());
        let thread = std::thread::Builder::new()
            .name("interim".into())
            .spawn({
                let served = served.clone();
                move || {
                    if let Err(e) = run_until(&mut em, || lock(&served).stopped) {
                        warn!("the interim event loop failed: {e:?}");
                    }
                }
            })
            .map_err(IncomingError::Thread)?;
        Ok(InterimLoop {
            served: Some(served),
            thread: Some(thread),
        })
    }
}

impl<H: RequestHandler> Drop for InterimLoop<H> {
    fn drop(&mut self) {
        self.join();
    }
}

impl<H: RequestHandler> InterimLoop<H> {
    /// Stops the loop and hands the control socket back (`None` if the thread died with it).
    /// Signals from now on stay pending for the next signalfd.
    pub fn stop(mut self) -> Option<ControlSocket> {
        if !self.join() {
            return None;
        }
        let served = Arc::try_unwrap(self.served.take()?).ok()?;
        let served = into_inner(served);
        Some(served.server.into_socket())
    }

    /// Stops the thread; false if it panicked.
    fn join(&mut self) -> bool {
        let Some(thread) = self.thread.take() else {
            return true;
        };
        if let Some(served) = &self.served {
            // A failed write means the counter is full: the thread is already woken.
            let _ = lock(served).stop.write(1);
        }
        thread.join().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// One end of a socket pair (its peer kept open, so only a shutdown ends reads) and a
    /// handle to guard it with.
    fn guarded_pair() -> (UnixStream, UnixStream, Option<OwnedFd>) {
        let (a, b) = UnixStream::pair().expect("pair");
        // Without the shutdown a read would time out (an error) instead of returning 0.
        a.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let handle = a.try_clone().ok().map(OwnedFd::from);
        (a, b, handle)
    }

    #[test]
    fn end_wakes_the_guarded_sockets_even_those_guarded_after_it() {
        let incoming = Incoming::new("unix:/x".into(), EventBus::new());
        let (mut listener, _peer, handle) = guarded_pair();
        incoming.waiting_on(handle);
        assert_eq!(incoming.ended(), None);
        incoming.end(VmExit::Signal(libc::SIGTERM));
        incoming.end(VmExit::ShutdownRequest);
        assert_eq!(incoming.ended(), Some(VmExit::Signal(libc::SIGTERM)));
        let mut buf = [0u8; 1];
        assert_eq!(listener.read(&mut buf).expect("read"), 0, "shut down");
        let (mut conn, _peer2, handle) = guarded_pair();
        incoming.receiving(handle, Arc::default(), None);
        assert_eq!(conn.read(&mut buf).expect("read"), 0, "shut down at once");
    }
}

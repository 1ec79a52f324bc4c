//! SIGINT, SIGTERM and SIGHUP through a signalfd, so they end the VM through the event loop
//! (vCPUs finished, terminal restored, socket removed) instead of killing the process.
//!
//! [`block_exit_signals`] must run before any other thread starts: threads inherit the mask,
//! so the signals are only ever delivered to the signalfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitSignal, VmExit};

const EXIT_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn exit_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t and the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in EXIT_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Block the exit signals in the calling thread (and the threads it creates later).
pub fn block_exit_signals() -> io::Result<()> {
    let set = exit_sigset();
    // SAFETY: `set` is a valid sigset_t; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Event-loop subscriber reading the signalfd.
pub struct SignalSubscriber {
    fd: OwnedFd,
    exit: Arc<ExitSignal>,
}

impl SignalSubscriber {
    pub fn new(exit: Arc<ExitSignal>) -> io::Result<SignalSubscriber> {
        Ok(SignalSubscriber {
            fd: exit_signalfd()?,
            exit,
        })
    }

    fn read_signal(&self) -> Option<i32> {
        read_signal(&self.fd)
    }
}

/// A non-blocking signalfd for the exit signals (which must be blocked to arrive there).
fn exit_signalfd() -> io::Result<OwnedFd> {
    let set = exit_sigset();
    // SAFETY: creates a new signalfd for a valid set; the result is checked.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes one pending exit signal off `fd`, if there is one.
fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let len = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `len` bytes into `info`, which is `len` bytes long.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            len,
        )
    };
    (n == len as isize).then_some(info.ssi_signo as i32)
}

impl MutEventSubscriber for SignalSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Some(sig) = self.read_signal() {
            info!("signal {sig}: shutting down");
            self.exit.trigger(VmExit::Signal(sig));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            warn!("signals cannot be polled: {e:?}");
        }
    }
}

/// Watches for the exit signals on a thread of its own, for the time before an event loop
/// exists (`minivmm receive` waiting for a migration): each signal is handed to a callback.
pub struct SignalWatch {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl SignalWatch {
    /// Starts the watching thread. The exit signals must already be blocked.
    pub fn start(on_signal: impl Fn(i32) + Send + 'static) -> io::Result<SignalWatch> {
        let fd = exit_signalfd()?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let thread = std::thread::Builder::new().name("signals".into()).spawn({
            let stop = stop.clone();
            move || watch(&fd, &stop, on_signal)
        })?;
        Ok(SignalWatch {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops watching; signals from now on stay pending for the event loop's signalfd.
    pub fn stop(mut self) {
        self.join();
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            // A failed write leaves the thread running until a signal; it holds only its fds.
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        self.join();
    }
}

/// The watching thread: waits for a signal or the stop request. It reads the signalfd only
/// when poll says a signal is there, so after a stop request nothing is taken off it.
fn watch(fd: &OwnedFd, stop: &EventFd, on_signal: impl Fn(i32)) {
    loop {
        let mut fds = [fd.as_raw_fd(), stop.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!("signals cannot be polled: {e}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        while let Some(sig) = read_signal(fd) {
            info!("signal {sig}");
            on_signal(sig);
        }
    }
}

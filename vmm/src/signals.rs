//! SIGINT, SIGTERM and SIGHUP through a signalfd, so they end the VM through the event loop
//! (vCPUs finished, terminal restored, socket removed) instead of killing the process, or,
//! in a `receive` still without a guest, give the incoming migration up.
//!
//! [`block_exit_signals`] must run before any other thread starts: threads inherit the mask,
//! so the signals are only ever delivered to the signalfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{info, warn};

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

/// Event-loop subscriber reading the signalfd; each signal goes to a callback (the running
/// VM's ends it, `receive`'s interim loop gives the incoming migration up).
pub struct SignalSubscriber {
    fd: OwnedFd,
    on_signal: Box<dyn Fn(i32) + Send>,
}

impl SignalSubscriber {
    pub fn new(on_signal: impl Fn(i32) + Send + 'static) -> io::Result<SignalSubscriber> {
        let set = exit_sigset();
        // SAFETY: creates a new signalfd for a valid set; the result is checked.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalSubscriber {
            fd,
            on_signal: Box::new(on_signal),
        })
    }

    fn read_signal(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `len` bytes into `info`, which is `len` bytes long.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                len,
            )
        };
        (n == len as isize).then_some(info.ssi_signo as i32)
    }
}

impl MutEventSubscriber for SignalSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Some(sig) = self.read_signal() {
            info!("signal {sig}");
            (self.on_signal)(sig);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            warn!("signals cannot be polled: {e:?}");
        }
    }
}

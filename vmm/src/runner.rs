//! `minivmm run`: build the VM, run the event loop until the VM ends, clean up. [`serve`] is
//! also where a received VM runs (`migrate::receive`).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use log::{info, warn};

use crate::boot::{BootError, BootSources};
use crate::config::VmConfig;
use crate::control::dispatch::VmmControl;
use crate::control::events::EventBus;
use crate::control::{self, ControlError, ControlServer, ControlSocket};
use crate::devices::serial::{SerialInput, StdoutOut};
use crate::event_loop::{run_until, ExitWatcher, Subscriber};
use crate::exit::VmExit;
use crate::signals::{block_exit_signals, SignalSubscriber};
use crate::sync::lock;
use crate::terminal::RawModeGuard;
use crate::{RunState, Vmm, VmmError};

/// Errors of `minivmm run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot load the guest")]
    Boot(#[source] BootError),
    #[error("cannot set up the control socket")]
    Control(#[source] ControlError),
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error("cannot set up the event loop")]
    EventManager(#[source] event_manager::Error),
    #[error("the event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error("cannot read stdin")]
    Stdin(#[source] io::Error),
    #[error(transparent)]
    Vmm(VmmError),
    #[error("the event loop ended without a reason")]
    NoExitReason,
}

/// How long a VM told to end waits for its running migration to give up.
const GIVE_UP_WAIT: Duration = Duration::from_secs(2);

/// Run the VM described by `config` until it ends; returns why it ended. `on_socket` is told
/// the control socket's path once it is bound.
pub fn run(config: VmConfig, on_socket: impl FnOnce(&Path)) -> Result<VmExit, RunError> {
    // Before any thread exists, so every thread inherits the mask, and before the control
    // socket is bound: whoever sees the socket may signal us, and the signal must then wait
    // for the event loop instead of killing the process.
    block_exit_signals().map_err(RunError::Signals)?;
    let mut sources = BootSources::open(&config).map_err(RunError::Boot)?;
    let socket = control::bind(&config.api_socket).map_err(RunError::Control)?;
    on_socket(socket.path());
    let vmm = Vmm::new(config, &mut sources, Box::new(StdoutOut)).map_err(RunError::Vmm)?;
    serve(vmm, socket, EventBus::new())
}

/// Serve a built VM (started unless already running) until it ends; `events` is the
/// process's event bus (a `receive` had it before its guest ran).
pub fn serve(vmm: Vmm, socket: ControlSocket, events: Arc<EventBus>) -> Result<VmExit, RunError> {
    let exit = vmm.exit_signal();
    let mut vmm = vmm;
    let serial = vmm.devices().serial.clone();
    let space = vmm.devices_mut().serial_input_space.take();
    let vmm = Arc::new(Mutex::new(vmm));

    let control = VmmControl::new(vmm.clone(), events);
    let outgoing = control.outgoing();
    let mut em = EventManager::<Subscriber>::new().map_err(RunError::EventManager)?;
    em.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit.clone()))));
    em.add_subscriber(Arc::new(Mutex::new(
        SignalSubscriber::new({
            let exit = exit.clone();
            move |sig| exit.trigger(VmExit::Signal(sig))
        })
        .map_err(RunError::Signals)?,
    )));
    em.add_subscriber(Arc::new(Mutex::new(ControlServer::new(
        socket,
        Arc::new(Mutex::new(control)),
    ))));

    // Raw stdin (no std buffering: unread buffered bytes would not wake epoll again).
    let stdin = File::from(
        io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(RunError::Stdin)?,
    );
    let _tty = match RawModeGuard::new(std::os::fd::AsRawFd::as_raw_fd(&stdin)) {
        Ok(g) => g,
        Err(e) => {
            warn!("terminal stays in cooked mode: {e}");
            None
        }
    };
    if let Some(space) = space {
        em.add_subscriber(Arc::new(Mutex::new(SerialInput::new(serial, stdin, space))));
    }

    {
        let mut v = lock(&vmm);
        if v.state() == RunState::Created {
            v.start().map_err(RunError::Vmm)?;
        }
    }
    let ended = run_until(&mut em, || exit.reason().is_some())
        .map_err(RunError::EventLoop)
        .and_then(|()| exit.reason().ok_or(RunError::NoExitReason));
    info!("VM ends: {ended:?}");
    if let Ok(VmExit::Signal(_) | VmExit::ShutdownRequest) = ended {
        // Tell the destination why the stream ends (Abort) rather than just cut it.
        outgoing.cancel_and_wait(GIVE_UP_WAIT);
    }
    lock(&vmm).shutdown();
    drop(em);
    ended
}

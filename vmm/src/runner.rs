//! `minivmm run`: build the VM, run the event loop until the VM ends, clean up.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use log::{info, warn};

use crate::boot::{BootError, BootSources};
use crate::config::VmConfig;
use crate::control::dispatch::VmmControl;
use crate::control::{self, ControlError, ControlServer, ControlSocket};
use crate::devices::serial::{SerialInput, StdoutOut};
use crate::exit::{ExitSignal, VmExit};
use crate::migrate::incoming::{Incoming, IncomingError, InterimLoop};
use crate::migrate::target::TargetVm;
use crate::signals::{block_exit_signals, SignalSubscriber};
use crate::terminal::RawModeGuard;
use crate::{error_chain, RunState, Vmm, VmmError};
use migration::{receive_migration, DestinationError, Endpoint, Listener, ReceiveOptions};

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
    #[error("invalid migration endpoint")]
    Endpoint(#[source] migration::EndpointError),
    #[error("migration transport failed")]
    Transport(#[source] migration::TransportError),
    #[error("incoming migration failed")]
    Receive(#[source] migration::DestinationError),
    #[error("the incoming migration left no VM")]
    NoVm,
    #[error("cannot build the expected VM before the migration")]
    Prepare(#[source] migration::VmError),
    #[error("cannot serve the control socket and signals while waiting")]
    Incoming(#[source] IncomingError),
}

/// What the event loops hold.
pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long a VM told to end waits for its running migration to give up.
const GIVE_UP_WAIT: Duration = Duration::from_secs(2);

/// Wakes the event loop when the VM ends.
struct ExitWatcher(Arc<ExitSignal>);

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
    serve(vmm, socket)
}

/// `minivmm receive`: wait for an incoming migration (or load a snapshot), then serve the
/// restored VM like `run` does. Returns why it ended. Until the guest runs, an [`InterimLoop`]
/// serves the control socket and the signals, and either (a `shutdown` request, a signal)
/// gives the receive up (see [`crate::migrate::incoming`]).
pub fn receive(
    uri: &str,
    api_socket: &Path,
    attempts: u32,
    shape: Option<(u64, u8)>,
    on_socket: impl FnOnce(&Path),
) -> Result<VmExit, RunError> {
    block_exit_signals().map_err(RunError::Signals)?;
    // Listening before the control socket appears: whoever waits for that socket may start
    // the migration at once.
    let endpoint = Endpoint::parse(uri).map_err(RunError::Endpoint)?;
    let mut listener = endpoint.listen().map_err(RunError::Transport)?;
    let socket = control::bind(api_socket).map_err(RunError::Control)?;
    on_socket(socket.path());
    let incoming = Incoming::new(endpoint.to_string());
    incoming.waiting_on(listener.wake_handle());
    let interim = InterimLoop::start(socket, incoming.clone()).map_err(RunError::Incoming)?;
    let mut target = TargetVm::new(api_socket.to_path_buf());
    if let Some((mem_bytes, cpus)) = shape {
        target.prepare(mem_bytes, cpus).map_err(RunError::Prepare)?;
    }
    let given_up = accept_migration(&mut listener, &mut target, &incoming, attempts)?;
    if let Some(why) = given_up {
        return Ok(why);
    }
    drop(listener);
    let socket = match interim.stop() {
        Some(s) => s,
        None => control::bind(api_socket).map_err(RunError::Control)?,
    };
    let vmm = target.into_vmm().ok_or(RunError::NoVm)?;
    if let Some(why) = incoming.ended() {
        // It came as the guest started here: end it like one to a running VM.
        vmm.exit_signal().trigger(why);
    }
    // Received into small pages (faster to fill fresh); huge pages from now on.
    vmm.advise_huge_pages();
    serve(vmm, socket)
}

/// Accept sources until one migration is received and its guest runs (`None`), or the
/// receive is given up before that (`Some(why)`: a signal, a shutdown request). A connection
/// that sends nothing is a probe; a failed attempt is retried while `attempts` allow.
fn accept_migration(
    listener: &mut Listener,
    target: &mut TargetVm,
    incoming: &Incoming,
    attempts: u32,
) -> Result<Option<VmExit>, RunError> {
    let is_file = matches!(listener, Listener::File(..));
    let mut attempt = 1;
    loop {
        let result = listener
            .accept()
            .map_err(RunError::Transport)
            .and_then(|mut conn| {
                let options = ReceiveOptions {
                    give_up: incoming.give_up_flag(),
                    progress: incoming.receiving(conn.wake_handle()),
                    ..ReceiveOptions::default()
                };
                receive_migration(target, &mut conn, &options).map_err(RunError::Receive)
            });
        let e = match result {
            Ok(stats) => {
                info!("incoming migration complete: {stats}");
                return Ok(None);
            }
            Err(e) => e,
        };
        // A started guest cannot be received again.
        if target.started() {
            return Err(e);
        }
        // Nothing is lost: the source has no acknowledgement and keeps running.
        if let Some(why) = incoming.ended() {
            let what = match why {
                VmExit::Signal(sig) => format!("signal {sig}"),
                _ => "shutdown request".to_string(),
            };
            match e {
                RunError::Transport(_) => warn!("{what} while waiting for a migration"),
                RunError::Receive(DestinationError::GivenUp) => {
                    warn!("{what}: incoming migration given up, guest not started")
                }
                e => warn!("{what}: incoming migration failed ({})", error_chain(&e)),
            }
            return Ok(Some(why));
        }
        match e {
            RunError::Receive(e) if e.is_empty_stream() && !is_file => {}
            e if attempt >= attempts => return Err(e),
            e => {
                warn!(
                    "incoming migration attempt {attempt} of {attempts} failed: {}; waiting for the next",
                    error_chain(&e)
                );
                attempt += 1;
            }
        }
        incoming.waiting();
    }
}

/// Serve a built VM (started unless already running) until it ends.
fn serve(vmm: Vmm, socket: ControlSocket) -> Result<VmExit, RunError> {
    let exit = vmm.exit_signal();
    let mut vmm = vmm;
    let serial = vmm.devices().serial.clone();
    let space = vmm.devices_mut().serial_input_space.take();
    let vmm = Arc::new(Mutex::new(vmm));

    let control = VmmControl::new(vmm.clone());
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
    let ended = loop {
        if let Some(reason) = exit.reason() {
            break Ok(reason);
        }
        // EINTR comes back as Ok(0); an error is a broken epoll set.
        if let Err(e) = em.run() {
            break Err(RunError::EventLoop(e));
        }
    };
    info!("VM ends: {ended:?}");
    if let Ok(VmExit::Signal(_) | VmExit::ShutdownRequest) = ended {
        // Tell the destination why the stream ends (Abort) rather than just cut it.
        outgoing.cancel_and_wait(GIVE_UP_WAIT);
    }
    lock(&vmm).shutdown();
    drop(em);
    ended
}

fn lock(vmm: &Mutex<Vmm>) -> std::sync::MutexGuard<'_, Vmm> {
    vmm.lock().unwrap_or_else(|e| e.into_inner())
}

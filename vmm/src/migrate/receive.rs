//! `minivmm receive`: wait for a source (or open a snapshot), receive into a [`TargetVm`],
//! retry into the same VM while attempts allow, then serve the restored VM like `run` does.
//!
//! ```text
//! listen ─▶ control socket ─▶ InterimLoop (status, shutdown, signals)
//!   ─▶ Acceptor (its own thread: handshakes, "busy" replies)
//!   ─▶ offer ─▶ receive_handshaken ─▶ guest runs ─▶ control socket back to the VM's loop
//!        ▲          │ refused configuration: back to waiting, no attempt spent
//!        │          │ failed, attempts left: back to waiting
//!        └──────────┘
//! ```
//!
//! A bad peer can neither end the destination nor hold it: probes, resets, garbage, idle
//! peers and (with `--tls-dir`) peers whose certificate is refused never get past the
//! acceptor's handshakes (logged with their address), a second source gets a "busy" reply,
//! and only a stream whose configuration this destination accepted counts as an attempt.

use std::path::Path;
use std::sync::Arc;

use log::{info, warn};
use migration::tls::{AllowList, TlsError, TlsServer};
use migration::{
    receive_handshaken, receive_migration, AcceptError, AcceptOptions, Acceptor, DestinationError,
    FaultSupplier, Listener, Milestone, Observer, Offer, ReceiveOptions,
};

use super::incoming::{Incoming, IncomingError, InterimLoop};
use super::target_vm::TargetVm;
use super::worker::armed_faults;
use crate::config::ReceiveConfig;
use crate::control::dispatch::WaitingControl;
use crate::control::events::EventBus;
use crate::control::protocol::{Event, ListeningLine, Side};
use crate::control::{self, ControlError};
use crate::error_chain;
use crate::exit::VmExit;
use crate::runner::{serve, RunError};
use crate::signals::block_exit_signals;

/// Errors of `minivmm receive`.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    #[error("cannot set up the control socket")]
    Control(#[source] ControlError),
    #[error("migration transport failed")]
    Transport(#[source] migration::TransportError),
    #[error("cannot serve the migration socket")]
    Acceptor(#[source] std::io::Error),
    #[error("waiting for a migration failed")]
    Accept(#[source] AcceptError),
    #[error("incoming migration failed")]
    Receive(#[source] DestinationError),
    #[error("the incoming migration left no VM")]
    NoVm,
    #[error("cannot open KVM for the incoming VM")]
    Kvm(#[source] migration::VmOpError),
    #[error("cannot build the expected VM before the migration")]
    Prepare(#[source] migration::VmOpError),
    #[error("cannot serve the control socket and signals while waiting")]
    Incoming(#[source] IncomingError),
    #[error("bad fault injection setting")]
    Fault(#[source] migration::fault::FaultSpecError),
    #[error("cannot use the TLS directory")]
    TlsSetup(#[source] TlsError),
    #[error(transparent)]
    Run(RunError),
}

/// Waits for an incoming migration (or loads a snapshot), then serves the restored VM until
/// it ends; returns why it ended. Until the guest runs, an [`InterimLoop`] serves the control
/// socket and the signals, and either (a `shutdown` request, a signal) gives the receive up.
/// `on_socket` is told the control socket's path once it is bound.
pub fn receive(
    config: ReceiveConfig,
    on_socket: impl FnOnce(&Path),
) -> Result<VmExit, ReceiveError> {
    block_exit_signals().map_err(ReceiveError::Signals)?;
    let tls = match &config.tls {
        Some(t) => Some(Arc::new(
            TlsServer::load(&t.dir, AllowList::new(t.allow.clone()))
                .map_err(ReceiveError::TlsSetup)?,
        )),
        None => None,
    };
    // Listening before the control socket appears: whoever waits for that socket may start
    // the migration at once.
    let listener = config.source.listen().map_err(ReceiveError::Transport)?;
    // The endpoint as bound: `tcp:HOST:0` gets its port here.
    let listen = listener
        .local_endpoint()
        .map_or_else(|_| config.source.to_string(), |e| e.to_string());
    if !matches!(listener, Listener::File(..)) {
        announce(&listen);
    }
    let socket = control::bind(&config.api_socket).map_err(ReceiveError::Control)?;
    on_socket(socket.path());
    let events = EventBus::new();
    let incoming = Incoming::new(listen, events.clone());
    incoming.waiting_on(listener.wake_handle());
    let control = WaitingControl::new(incoming.clone(), events.clone());
    let interim =
        InterimLoop::start(socket, control, incoming.clone()).map_err(ReceiveError::Incoming)?;
    let mut target = TargetVm::new(
        config.api_socket.clone(),
        config.limits,
        config.dirty_tracker,
    )
    .map_err(ReceiveError::Kvm)?;
    if let Some((mem_bytes, cpus)) = config.limits.shape {
        target
            .prepare(mem_bytes, cpus)
            .map_err(ReceiveError::Prepare)?;
    }
    let options = ReceiveOptions {
        io_timeout: Some(config.io_timeout),
        handshake_timeout: config.handshake_timeout,
        go_timeout: config.commit_timeout,
        deadline: config.deadline,
        give_up: incoming.give_up_flag(),
        observer: milestones(events.clone()),
        ..ReceiveOptions::default()
    };
    let given_up = match listener {
        Listener::File(..) => load_snapshot(listener, &mut target, &incoming, options),
        _ => accept_migration(listener, tls, &mut target, &incoming, &config, options),
    }
    .inspect_err(|e| {
        events.publish(
            Side::Destination,
            Event::Failed {
                reason: error_chain(e),
            },
        )
    })?;
    if let Some(why) = given_up {
        return Ok(why);
    }
    let socket = match interim.stop() {
        Some(s) => s,
        None => control::bind(&config.api_socket).map_err(ReceiveError::Control)?,
    };
    let vmm = target.into_vmm().ok_or(ReceiveError::NoVm)?;
    if let Some(why) = incoming.ended() {
        // It came as the guest started here: end it like one to a running VM.
        vmm.exit_signal().trigger(why);
    }
    // Received into small pages (faster to fill fresh); huge pages from now on.
    vmm.advise_huge_pages();
    serve(vmm, socket, events).map_err(ReceiveError::Run)
}

/// Prints the endpoint listened on as one [`ListeningLine`] on stdout, for a script to hand
/// a `tcp:HOST:0` port on to the source (it comes before any of the guest's console output).
fn announce(listen: &str) {
    let line = ListeningLine {
        listening: listen.to_string(),
    };
    if let Ok(text) = serde_json::to_string(&line) {
        println!("{text}");
    }
}

/// The destination's milestones as events.
fn milestones(events: Arc<EventBus>) -> Observer {
    Observer::new(move |m| {
        let event = match m {
            Milestone::Restored => Event::Restored,
            Milestone::Committed => Event::Committed,
            Milestone::Running => Event::Running,
            Milestone::Paused => return,
        };
        events.publish(Side::Destination, event);
    })
}

/// What a `receive` given up before its guest ran says about it (in the log and as a
/// `failed` event) and returns.
fn given_up(why: VmExit, e: Option<&ReceiveError>, incoming: &Incoming) -> Option<VmExit> {
    let what = match why {
        VmExit::Signal(sig) => format!("signal {sig}"),
        _ => "shutdown request".to_string(),
    };
    incoming.attempt_failed(format!("given up: {what}"));
    match e {
        None | Some(ReceiveError::Accept(_) | ReceiveError::Transport(_)) => {
            warn!("{what} while waiting for a migration")
        }
        Some(ReceiveError::Receive(DestinationError::GivenUp)) => {
            warn!("{what}: incoming migration given up, guest not started")
        }
        Some(e) => warn!("{what}: incoming migration failed ({})", error_chain(e)),
    }
    Some(why)
}

/// Loads a snapshot (one attempt): `None` once its guest runs, `Some(why)` if the receive was
/// given up before.
fn load_snapshot(
    mut listener: Listener,
    target: &mut TargetVm,
    incoming: &Incoming,
    options: ReceiveOptions,
) -> Result<Option<VmExit>, ReceiveError> {
    let result = listener
        .accept()
        .map_err(ReceiveError::Transport)
        .and_then(|mut conn| {
            incoming.receiving(None, options.progress.clone(), None);
            let options = ReceiveOptions {
                faults: armed_faults().map_err(ReceiveError::Fault)?,
                ..options
            };
            receive_migration(target, &mut conn, &options).map_err(ReceiveError::Receive)
        });
    match result {
        Ok(stats) => {
            info!("snapshot restored: {stats}");
            Ok(None)
        }
        Err(e) if target.started() || target.unusable() => Err(e),
        Err(e) => match incoming.ended() {
            Some(why) => Ok(given_up(why, Some(&e), incoming)),
            None => Err(e),
        },
    }
}

/// Serves the listening socket (an [`Acceptor`], with `tls` if given) until one migration is
/// received and its guest runs (`None`), or the receive is given up before that
/// (`Some(why)`: a signal, a shutdown request). A connection refused before its stream
/// began (by TLS too), or a stream whose configuration is refused, costs no attempt; a
/// failed attempt is retried while `attempts` allow.
fn accept_migration(
    listener: Listener,
    tls: Option<Arc<TlsServer>>,
    target: &mut TargetVm,
    incoming: &Incoming,
    config: &ReceiveConfig,
    options: ReceiveOptions,
) -> Result<Option<VmExit>, ReceiveError> {
    // Each connection reads the armed fault as it is accepted (tests; `fault.rs`).
    let faults: FaultSupplier = Arc::new(armed_faults);
    let accept = AcceptOptions {
        faults,
        tls,
        warn_plaintext: config.insecure_plaintext,
    };
    let acceptor = Acceptor::start(listener, &options, accept).map_err(ReceiveError::Acceptor)?;
    let attempts = config.attempts;
    let mut attempt = 0;
    loop {
        let Offer {
            mut connection,
            handshake,
            peer,
            progress,
            faults,
        } = match acceptor.next() {
            Ok(offer) => offer,
            Err(e) => {
                let e = ReceiveError::Accept(e);
                return match incoming.ended() {
                    Some(why) => Ok(given_up(why, Some(&e), incoming)),
                    None => Err(e),
                };
            }
        };
        incoming.receiving(
            connection.wake_handle(),
            progress.clone(),
            connection.peer(),
        );
        target.tls_peer = connection.tls_peer().map(ToString::to_string);
        let options = ReceiveOptions {
            progress: progress.clone(),
            faults,
            ..options.clone()
        };
        let result = receive_handshaken(target, &mut connection, handshake, &options);
        drop(connection);
        let e = match result {
            Ok(stats) => {
                info!("incoming migration from {peer} complete: {stats}");
                return Ok(None);
            }
            Err(e) => ReceiveError::Receive(e),
        };
        // A guest that started here, or a VM whose start failed half-way (its vCPUs ran on
        // its memory), cannot be received into again.
        if target.started() || target.unusable() {
            return Err(e);
        }
        // Nothing is lost: the source has no acknowledgement and keeps running.
        if let Some(why) = incoming.ended() {
            return Ok(given_up(why, Some(&e), incoming));
        }
        acceptor.idle();
        if progress.configured() {
            attempt += 1;
            if attempt >= attempts {
                return Err(e);
            }
            warn!(
                "incoming migration attempt {attempt} of {attempts} (from {peer}) failed: {}; \
                 waiting for the next",
                error_chain(&e)
            );
            incoming.attempt_failed(error_chain(&e));
        } else {
            warn!(
                "refused the stream from {peer} ({}); waiting for the next",
                error_chain(&e)
            );
            incoming.attempt_failed(format!(
                "refused the stream from {peer}: {}",
                error_chain(&e)
            ));
        }
        incoming.waiting();
    }
}

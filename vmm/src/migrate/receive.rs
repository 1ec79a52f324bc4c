//! `minivmm receive`: wait for a source (or open a snapshot), receive into a [`TargetVm`],
//! retry into the same VM while attempts allow, then serve the restored VM like `run` does.
//!
//! ```text
//! listen ─▶ control socket ─▶ InterimLoop (status, shutdown, signals)
//!   ─▶ accept ─▶ receive_migration ─▶ guest runs ─▶ control socket back to the VM's loop
//!        ▲          │ failed, attempts left: back to waiting
//!        └──────────┘
//! ```

use std::path::Path;

use log::{error, info, warn};
use migration::tls::{AllowList, TlsError, TlsServer};
use migration::{
    receive_migration, Connection, Deadline, DestinationError, Listener, ReceiveOptions, Transport,
};

use super::incoming::{Incoming, IncomingError, InterimLoop};
use super::target_vm::TargetVm;
use super::worker::armed_faults;
use crate::config::ReceiveConfig;
use crate::control::dispatch::WaitingControl;
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
    #[error("connection refused")]
    Refused(#[source] TlsError),
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
        Some(t) => Some(
            TlsServer::load(&t.dir, AllowList::new(t.allow.clone()))
                .map_err(ReceiveError::TlsSetup)?,
        ),
        None => None,
    };
    // Listening before the control socket appears: whoever waits for that socket may start
    // the migration at once.
    let mut listener = config.source.listen().map_err(ReceiveError::Transport)?;
    let socket = control::bind(&config.api_socket).map_err(ReceiveError::Control)?;
    on_socket(socket.path());
    let incoming = Incoming::new(config.source.to_string());
    incoming.waiting_on(listener.wake_handle());
    let control = WaitingControl::new(incoming.clone());
    let interim =
        InterimLoop::start(socket, control, incoming.clone()).map_err(ReceiveError::Incoming)?;
    let mut target =
        TargetVm::new(config.api_socket.clone(), config.limits).map_err(ReceiveError::Kvm)?;
    if let Some((mem_bytes, cpus)) = config.limits.shape {
        target
            .prepare(mem_bytes, cpus)
            .map_err(ReceiveError::Prepare)?;
    }
    let options = ReceiveOptions {
        io_timeout: Some(config.io_timeout),
        handshake_timeout: config.handshake_timeout,
        go_timeout: config.commit_timeout,
        give_up: incoming.give_up_flag(),
        ..ReceiveOptions::default()
    };
    let given_up = accept_migration(
        &mut listener,
        tls.as_ref(),
        &mut target,
        &incoming,
        &config,
        options,
    )?;
    if let Some(why) = given_up {
        return Ok(why);
    }
    drop(listener);
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
    serve(vmm, socket).map_err(ReceiveError::Run)
}

/// Accept sources until one migration is received and its guest runs (`None`), or the
/// receive is given up before that (`Some(why)`: a signal, a shutdown request). A connection
/// that sends nothing is a probe; one refused by TLS (no certificate signed by the CA, a
/// subject not allowed, plaintext) is no attempt; a failed attempt is retried while
/// `attempts` allow.
fn accept_migration(
    listener: &mut Listener,
    tls: Option<&TlsServer>,
    target: &mut TargetVm,
    incoming: &Incoming,
    config: &ReceiveConfig,
    options: ReceiveOptions,
) -> Result<Option<VmExit>, ReceiveError> {
    let is_file = matches!(listener, Listener::File(..));
    let attempts = config.attempts;
    let mut attempt = 1;
    loop {
        let result = listener
            .accept()
            .map_err(ReceiveError::Transport)
            .and_then(|conn| {
                let progress = incoming.receiving(conn.wake_handle());
                let mut conn = secure(conn, tls, config)?;
                target.tls_peer = conn.tls_peer().map(ToString::to_string);
                let options = ReceiveOptions {
                    progress,
                    faults: armed_faults().map_err(ReceiveError::Fault)?,
                    ..options.clone()
                };
                receive_migration(target, &mut conn, &options).map_err(ReceiveError::Receive)
            });
        let e = match result {
            Ok(stats) => {
                info!("incoming migration complete: {stats}");
                return Ok(None);
            }
            Err(e) => e,
        };
        // A guest that started here, or a VM whose start failed half-way (its vCPUs ran on
        // its memory), cannot be received into again.
        if target.started() || target.unusable() {
            return Err(e);
        }
        // Nothing is lost: the source has no acknowledgement and keeps running.
        if let Some(why) = incoming.ended() {
            let what = match why {
                VmExit::Signal(sig) => format!("signal {sig}"),
                _ => "shutdown request".to_string(),
            };
            match e {
                ReceiveError::Transport(_) => warn!("{what} while waiting for a migration"),
                ReceiveError::Receive(DestinationError::GivenUp) => {
                    warn!("{what}: incoming migration given up, guest not started")
                }
                e => warn!("{what}: incoming migration failed ({})", error_chain(&e)),
            }
            return Ok(Some(why));
        }
        match e {
            ReceiveError::Receive(e) if e.is_empty_stream() && !is_file => {}
            ReceiveError::Refused(e) if e.is_empty_connection() => info!("{e}"),
            ReceiveError::Refused(e) => {
                error!("{}; waiting for the next connection", error_chain(&e))
            }
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

/// The TLS handshake with a source (bounded by the handshake timeout; the destination's
/// logs name the certificate it accepted), or, on a plaintext endpoint reachable from the
/// network, a warning.
fn secure(
    mut conn: Connection,
    tls: Option<&TlsServer>,
    config: &ReceiveConfig,
) -> Result<Connection, ReceiveError> {
    let peer = conn.peer().unwrap_or_else(|| "a source".into());
    let Some(tls) = tls else {
        if config.insecure_plaintext {
            warn!(
                "plaintext migration connection from {peer}: not authenticated, not encrypted \
                 (--insecure-plaintext)"
            );
        }
        return Ok(conn);
    };
    conn.set_read_timeout(Some(config.io_timeout))
        .and_then(|()| conn.set_write_timeout(Some(config.io_timeout)))
        .map_err(|e| {
            ReceiveError::Refused(TlsError::Io {
                peer: peer.clone(),
                source: e,
            })
        })?;
    let deadline = Deadline::after(config.handshake_timeout, "TLS handshake");
    let conn = conn
        .tls_server(tls, deadline)
        .map_err(ReceiveError::Refused)?;
    let who = conn
        .tls_peer()
        .map_or_else(|| "no readable subject".into(), ToString::to_string);
    match conn.tls_allowed_by() {
        Some(by) => info!("TLS source {peer}: {who}, allowed by {by}"),
        None => info!("TLS source {peer}: {who}, signed by the CA"),
    }
    Ok(conn)
}

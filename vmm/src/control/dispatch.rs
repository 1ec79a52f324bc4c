//! What the control socket answers: [`VmmControl`] for a VM (`minivmm run`, or a `receive`
//! whose guest runs), [`WaitingControl`] for a `receive` that has no guest yet. The [`Vmm`]
//! and the migration state only act and report; the replies are built here.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use log::warn;

use super::protocol::{
    Done, IncomingProgress, IncomingState, IncomingStatus, OutgoingStatus, Reply, Request,
    Response, ShuttingDown, VmStatus,
};
use super::server::RequestHandler;
use crate::exit::VmExit;
use crate::migrate::incoming::Incoming;
use crate::migrate::outgoing::{unknown_outcome_message, Outgoing};
use crate::migrate::worker;
use crate::sync::lock;
use crate::{error_chain, Vmm, VmmError};

/// The control-socket handler of a running VM: basic requests go to the [`Vmm`], `migrate`
/// starts a [`worker`] that owns the connection until it replies.
pub struct VmmControl {
    vmm: Arc<Mutex<Vmm>>,
    outgoing: Arc<Outgoing>,
}

impl VmmControl {
    pub fn new(vmm: Arc<Mutex<Vmm>>) -> VmmControl {
        VmmControl {
            vmm,
            outgoing: Arc::default(),
        }
    }

    /// The VM's outgoing-migration slot.
    pub fn outgoing(&self) -> Arc<Outgoing> {
        self.outgoing.clone()
    }
}

impl RequestHandler for VmmControl {
    fn handle(&mut self, req: Request, conn: &UnixStream) -> Option<Reply<Response>> {
        let busy = self.outgoing.running();
        match req {
            Request::Migrate(args) => {
                let cancel = match self.outgoing.begin(&args.to) {
                    Ok(c) => c,
                    Err(why) => return Some(Reply::Error(why)),
                };
                match conn.try_clone() {
                    Ok(c) => {
                        let (vmm, outgoing) = (self.vmm.clone(), self.outgoing.clone());
                        worker::spawn(vmm, args, c, outgoing, cancel);
                        None
                    }
                    Err(e) => {
                        self.outgoing.end();
                        Some(Reply::error(format!(
                            "cannot hand the connection over: {e}"
                        )))
                    }
                }
            }
            Request::Cancel if self.outgoing.cancel() => Some(Reply::Ok(Done {}.into())),
            Request::Cancel => Some(Reply::error("no migration is running")),
            // After a handover without confirmation only the operator may run it here.
            Request::Resume(r) if self.outgoing.unknown_to().is_some() => {
                let to = self.outgoing.unknown_to().unwrap_or_default();
                if !r.force {
                    return Some(Reply::error(unknown_outcome_message(&to)));
                }
                warn!("resume --force: the operator says the guest does not run at {to}");
                let resumed = lock(&self.vmm).resume();
                if resumed.is_ok() {
                    self.outgoing.resumed_by_force();
                }
                Some(match resumed {
                    Ok(()) => Reply::Ok(Done {}.into()),
                    Err(e) => Reply::Error(error_chain(&e)),
                })
            }
            // Resuming a VM that moved would run its guest twice.
            Request::Pause | Request::Resume(_) if busy => Some(Reply::error(
                "the VM is migrating or has moved; pause and resume are refused",
            )),
            other => {
                let mut vmm = lock(&self.vmm);
                Some(handle_basic(&mut vmm, other, self.outgoing.status()))
            }
        }
    }
}

/// Answer the requests that need nothing but the VM (not `migrate`); `migration` is what
/// `status` and `shutdown` show of the outgoing migration.
fn handle_basic(vmm: &mut Vmm, req: Request, migration: Option<OutgoingStatus>) -> Reply<Response> {
    let done = |r: Result<(), VmmError>| match r {
        Ok(()) => Reply::Ok(Done {}.into()),
        Err(e) => Reply::Error(error_chain(&e)),
    };
    match req {
        Request::Status => Reply::Ok(status(vmm, migration).into()),
        Request::Pause => done(vmm.pause()),
        Request::Resume(_) => done(vmm.resume()),
        Request::Shutdown => {
            vmm.exit_signal().trigger(VmExit::ShutdownRequest);
            Reply::Ok(ShuttingDown { migration }.into())
        }
        Request::Migrate(_) | Request::Cancel => {
            Reply::error("migrate and cancel are handled by the migration worker")
        }
    }
}

fn status(vmm: &Vmm, migration: Option<OutgoingStatus>) -> VmStatus {
    VmStatus {
        state: vmm.state(),
        mem_bytes: vmm.config().mem_bytes,
        cpus: vmm.config().cpus,
        uptime_ms: vmm.uptime().as_millis() as u64,
        migration,
    }
}

/// Answers control requests while there is no guest.
pub struct WaitingControl(Arc<Incoming>);

impl WaitingControl {
    pub fn new(incoming: Arc<Incoming>) -> WaitingControl {
        WaitingControl(incoming)
    }
}

impl RequestHandler for WaitingControl {
    fn handle(&mut self, req: Request, _conn: &UnixStream) -> Option<Reply<Response>> {
        let (state, progress) = self.0.phase();
        let listen = self.0.listen();
        Some(match req {
            Request::Status => Reply::Ok(
                IncomingStatus {
                    state,
                    listen: listen.to_string(),
                    progress: progress.map(|p| IncomingProgress {
                        pass: p.pass(),
                        received_bytes: p.bytes(),
                    }),
                }
                .into(),
            ),
            Request::Shutdown if self.0.end(VmExit::ShutdownRequest) => {
                Reply::Ok(ShuttingDown::default().into())
            }
            Request::Shutdown => Reply::error(
                "too late to give the incoming migration up: the source committed and the \
                 guest runs here now; ask again to end it",
            ),
            other => Reply::error(format!(
                "no VM to {} yet: this minivmm is {} an incoming migration on {listen}",
                other.name(),
                doing(state)
            )),
        })
    }
}

/// The state as a verb, for refusals.
fn doing(state: IncomingState) -> &'static str {
    match state {
        IncomingState::Waiting => "waiting for",
        IncomingState::Receiving => "receiving",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// The reply as it goes on the wire.
    fn wire(r: Option<Reply<Response>>) -> Value {
        serde_json::to_value(r.expect("reply")).expect("serialisable")
    }

    #[test]
    fn waiting_control_reports_the_phase_and_refuses_what_needs_a_vm() {
        let incoming = Incoming::new("unix:/tmp/m.sock".into());
        let mut control = WaitingControl::new(incoming.clone());
        let (conn, _peer) = UnixStream::pair().expect("pair");
        assert_eq!(
            wire(control.handle(Request::Status, &conn)),
            json!({"ok": true, "state": "waiting", "listen": "unix:/tmp/m.sock"})
        );
        incoming.receiving(None, std::sync::Arc::default());
        assert_eq!(
            wire(control.handle(Request::Status, &conn)),
            json!({"ok": true, "state": "receiving", "listen": "unix:/tmp/m.sock",
                   "pass": null, "received_bytes": 0})
        );
        assert_eq!(
            wire(control.handle(Request::Pause, &conn)),
            json!({"ok": false, "error": "no VM to pause yet: this minivmm is receiving an \
                   incoming migration on unix:/tmp/m.sock"})
        );
        incoming.waiting();
        assert_eq!(
            wire(control.handle(Request::Status, &conn))["state"],
            "waiting"
        );
        assert_eq!(
            wire(control.handle(Request::Shutdown, &conn)),
            json!({"ok": true})
        );
        assert_eq!(incoming.ended(), Some(VmExit::ShutdownRequest));
    }
}

//! What the control socket answers: [`VmmControl`] for a VM (`minivmm run`, or a `receive`
//! whose guest runs), [`WaitingControl`] for a `receive` that has no guest yet. The [`Vmm`]
//! and the migration state only act and report; the replies are built here.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use log::warn;

use super::events::EventBus;
use super::protocol::{
    Done, EndedMigration, IncomingProgress, IncomingState, IncomingStatus, MigrationStarted,
    OutgoingStatus, Reply, Request, Response, ShuttingDown, VmStatus,
};
use super::server::RequestHandler;
use crate::exit::VmExit;
use crate::migrate::incoming::Incoming;
use crate::migrate::outgoing::{unknown_outcome_message, Outgoing};
use crate::migrate::worker::{self, Reporting};
use crate::sync::lock;
use crate::{error_chain, Vmm, VmmError};

/// The control-socket handler of a running VM: basic requests go to the [`Vmm`], `migrate`
/// starts a [`worker`] that owns the connection until it replies (or answers at once when
/// detached), `events` hands the connection to the [`EventBus`].
pub struct VmmControl {
    vmm: Arc<Mutex<Vmm>>,
    outgoing: Arc<Outgoing>,
    events: Arc<EventBus>,
}

impl VmmControl {
    pub fn new(vmm: Arc<Mutex<Vmm>>, events: Arc<EventBus>) -> VmmControl {
        VmmControl {
            vmm,
            outgoing: Arc::default(),
            events,
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
                let report = Reporting {
                    outgoing: self.outgoing.clone(),
                    events: self.events.clone(),
                };
                if args.detach {
                    let started = MigrationStarted {
                        to: args.to.clone(),
                        detached: true,
                    };
                    worker::spawn(self.vmm.clone(), *args, None, report, cancel);
                    return Some(Reply::Ok(started.into()));
                }
                match conn.try_clone() {
                    Ok(c) => {
                        worker::spawn(self.vmm.clone(), *args, Some(c), report, cancel);
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
            Request::Events => subscribe(&self.events, conn),
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
                let last = self.outgoing.last();
                Some(handle_basic(&mut vmm, other, self.outgoing.status(), last))
            }
        }
    }
}

/// Hands `conn` to the event bus (`None`: the bus replies), or says why not.
fn subscribe(events: &EventBus, conn: &UnixStream) -> Option<Reply<Response>> {
    match conn
        .try_clone()
        .map_err(super::events::EventsError::Setup)
        .and_then(|c| events.subscribe(c))
    {
        Ok(()) => None,
        Err(e) => Some(Reply::Error(error_chain(&e))),
    }
}

/// Answer the requests that need nothing but the VM (not `migrate`); `migration` is what
/// `status` and `shutdown` show of the outgoing migration, `last` how the last one that left
/// the guest here ended.
fn handle_basic(
    vmm: &mut Vmm,
    req: Request,
    migration: Option<OutgoingStatus>,
    last: Option<EndedMigration>,
) -> Reply<Response> {
    let done = |r: Result<(), VmmError>| match r {
        Ok(()) => Reply::Ok(Done {}.into()),
        Err(e) => Reply::Error(error_chain(&e)),
    };
    match req {
        Request::Status => Reply::Ok(status(vmm, migration, last).into()),
        Request::Pause => done(vmm.pause()),
        Request::Resume(_) => done(vmm.resume()),
        Request::Shutdown => {
            vmm.exit_signal().trigger(VmExit::ShutdownRequest);
            Reply::Ok(ShuttingDown { migration }.into())
        }
        Request::Migrate(_) | Request::Cancel | Request::Events => {
            Reply::error("migrate, cancel and events are handled by the VM's control handler")
        }
    }
}

fn status(
    vmm: &Vmm,
    migration: Option<OutgoingStatus>,
    last_migration: Option<EndedMigration>,
) -> VmStatus {
    VmStatus {
        state: vmm.state(),
        mem_bytes: vmm.config().mem_bytes,
        cpus: vmm.config().cpus,
        uptime_ms: vmm.uptime().as_millis() as u64,
        migration,
        last_migration,
    }
}

/// Answers control requests while there is no guest.
pub struct WaitingControl {
    incoming: Arc<Incoming>,
    events: Arc<EventBus>,
}

impl WaitingControl {
    pub fn new(incoming: Arc<Incoming>, events: Arc<EventBus>) -> WaitingControl {
        WaitingControl { incoming, events }
    }
}

impl RequestHandler for WaitingControl {
    fn handle(&mut self, req: Request, conn: &UnixStream) -> Option<Reply<Response>> {
        if let Request::Events = req {
            return subscribe(&self.events, conn);
        }
        let (state, progress) = self.incoming.phase();
        let listen = self.incoming.listen();
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
            Request::Shutdown if self.incoming.end(VmExit::ShutdownRequest) => {
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
        let incoming = Incoming::new("unix:/tmp/m.sock".into(), EventBus::new());
        let mut control = WaitingControl::new(incoming.clone(), EventBus::new());
        let (conn, _peer) = UnixStream::pair().expect("pair");
        assert_eq!(
            wire(control.handle(Request::Status, &conn)),
            json!({"ok": true, "state": "waiting", "listen": "unix:/tmp/m.sock"})
        );
        incoming.receiving(None, std::sync::Arc::default(), None);
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

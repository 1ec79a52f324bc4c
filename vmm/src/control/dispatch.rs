//! What the control socket answers: [`VmmControl`] for a VM (`minivmm run`, or a `receive`
//! whose guest runs), [`WaitingControl`] for a `receive` that has no guest yet. The [`Vmm`]
//! and the migration state only act and report; the replies are built here.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::protocol::{error_reply, Request};
use super::server::RequestHandler;
use crate::exit::VmExit;
use crate::migrate::incoming::Incoming;
use crate::migrate::outgoing::Outgoing;
use crate::migrate::worker;
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
    fn handle(&mut self, req: Request, conn: &UnixStream) -> Option<Value> {
        let busy = self.outgoing.running();
        match req {
            Request::Migrate(args) => {
                let cancel = match self.outgoing.begin(&args.to) {
                    Ok(c) => c,
                    Err(why) => return Some(error_reply(&why)),
                };
                match conn.try_clone() {
                    Ok(c) => {
                        let (vmm, outgoing) = (self.vmm.clone(), self.outgoing.clone());
                        worker::spawn(vmm, args, c, outgoing, cancel);
                        None
                    }
                    Err(e) => {
                        self.outgoing.end();
                        Some(error_reply(&format!(
                            "cannot hand the connection over: {e}"
                        )))
                    }
                }
            }
            Request::Cancel if self.outgoing.cancel() => Some(json!({"ok": true})),
            Request::Cancel => Some(error_reply("no migration is running")),
            // Resuming a VM that moved would run its guest twice.
            Request::Pause | Request::Resume if busy => Some(error_reply(
                "the VM is migrating or has moved; pause and resume are refused",
            )),
            other => {
                let mut reply = handle_basic(
                    &mut self.vmm.lock().unwrap_or_else(|e| e.into_inner()),
                    other,
                );
                if let (Some(m), Some(obj)) = (self.outgoing.status(), reply.as_object_mut()) {
                    obj.insert("migration".into(), m);
                }
                Some(reply)
            }
        }
    }
}

/// Answer the requests that need nothing but the VM (not `migrate`).
fn handle_basic(vmm: &mut Vmm, req: Request) -> Value {
    let done = |r: Result<(), VmmError>| match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => error_reply(&error_chain(&e)),
    };
    match req {
        Request::Status => status(vmm),
        Request::Pause => done(vmm.pause()),
        Request::Resume => done(vmm.resume()),
        Request::Shutdown => {
            vmm.exit_signal().trigger(VmExit::ShutdownRequest);
            json!({"ok": true})
        }
        Request::Migrate(_) | Request::Cancel => {
            error_reply("migrate and cancel are handled by the migration worker")
        }
    }
}

fn status(vmm: &Vmm) -> Value {
    json!({
        "ok": true,
        "state": vmm.state().as_str(),
        "mem_bytes": vmm.config().mem_bytes,
        "cpus": vmm.config().cpus,
        "uptime_ms": vmm.uptime().as_millis() as u64,
    })
}

/// Answers control requests while there is no guest.
pub struct WaitingControl(Arc<Incoming>);

impl WaitingControl {
    pub fn new(incoming: Arc<Incoming>) -> WaitingControl {
        WaitingControl(incoming)
    }
}

impl RequestHandler for WaitingControl {
    fn handle(&mut self, req: Request, _conn: &UnixStream) -> Option<Value> {
        let (phase, progress) = self.0.phase();
        let listen = self.0.listen();
        Some(match req {
            Request::Status => {
                let mut r = json!({"ok": true, "state": phase.as_str(), "listen": listen});
                if let Some(p) = progress {
                    r["pass"] = json!(p.pass());
                    r["received_bytes"] = json!(p.bytes());
                }
                r
            }
            Request::Shutdown => {
                self.0.end(VmExit::ShutdownRequest);
                json!({"ok": true})
            }
            other => error_reply(&format!(
                "no VM to {} yet: this minivmm is {} an incoming migration on {listen}",
                other.name(),
                phase.doing()
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_control_reports_the_phase_and_refuses_what_needs_a_vm() {
        let incoming = Incoming::new("unix:/tmp/m.sock".into());
        let mut control = WaitingControl::new(incoming.clone());
        let (conn, _peer) = UnixStream::pair().expect("pair");
        let r = control.handle(Request::Status, &conn).expect("reply");
        assert_eq!(
            (r["state"].as_str(), r["listen"].as_str()),
            (Some("waiting"), Some("unix:/tmp/m.sock"))
        );
        let _progress = incoming.receiving(None);
        let r = control.handle(Request::Status, &conn).expect("reply");
        assert_eq!(
            (r["pass"].is_null(), &r["received_bytes"]),
            (true, &json!(0))
        );
        let r = control.handle(Request::Pause, &conn).expect("reply");
        assert_eq!(r["ok"], false);
        assert_eq!(
            r["error"],
            "no VM to pause yet: this minivmm is receiving an incoming migration on unix:/tmp/m.sock"
        );
        incoming.waiting();
        assert_eq!(
            control.handle(Request::Status, &conn).expect("reply")["state"],
            "waiting"
        );
        assert_eq!(
            control.handle(Request::Shutdown, &conn).expect("reply")["ok"],
            true
        );
        assert_eq!(incoming.ended(), Some(VmExit::ShutdownRequest));
    }
}

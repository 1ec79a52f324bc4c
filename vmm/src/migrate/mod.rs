//! Live migration in the vmm, around the migration crate's `send_migration` and
//! `receive_migration`:
//!
//! - source: the worker thread that sends the VM while the event loop keeps serving
//!   ([`worker`]), the VM adapter it sends ([`source_vm`]) with auto-converge's mechanism
//!   ([`throttle`]), and the VM's one outgoing migration at a time ([`outgoing`]);
//! - destination: `minivmm receive` ([`receive`]: accept, retry, then serve), the process
//!   before its guest runs ([`incoming`]), and the VM adapter it receives into ([`target_vm`]);
//! - the `minivmm migrate` client ([`client`]).

pub mod client;
pub mod incoming;
pub mod outgoing;
pub mod receive;
pub mod source_vm;
pub mod target_vm;
pub mod throttle;
pub mod worker;

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::control::{error_reply, Request, RequestHandler};
use crate::Vmm;
use outgoing::Outgoing;

/// This process's resident set size in KiB.
pub fn rss_kib() -> u64 {
    crate::procfs::rss_kib(None)
}

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
                let mut reply = self
                    .vmm
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .handle_basic(other);
                if let (Some(m), Some(obj)) = (self.outgoing.status(), reply.as_object_mut()) {
                    obj.insert("migration".into(), m);
                }
                Some(reply)
            }
        }
    }
}

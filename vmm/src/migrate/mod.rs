//! Live migration glue: the running VM as a migration source ([`source`]), the worker thread
//! that sends it while the event loop keeps serving ([`worker`]), the destination VM
//! ([`target`]), the destination before its guest runs ([`incoming`]) and the
//! `minivmm migrate` client ([`client`]).

pub mod client;
pub mod incoming;
pub mod source;
pub mod target;
pub mod throttle;
pub mod worker;

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use migration::Cancel;
use serde_json::{json, Value};

use crate::control::{error_reply, Request, RequestHandler};
use crate::Vmm;

/// This process's resident set size in KiB.
pub fn rss_kib() -> u64 {
    crate::procfs::rss_kib(None)
}

/// The control-socket handler of a running VM: basic requests go to the [`Vmm`], `migrate`
/// starts a [`worker`] that owns the connection until it replies.
pub struct VmmControl {
    vmm: Arc<Mutex<Vmm>>,
    migrating: Arc<AtomicBool>,
    /// The running (or last) migration's cancellation flag.
    cancel: Cancel,
}

impl VmmControl {
    pub fn new(vmm: Arc<Mutex<Vmm>>) -> VmmControl {
        VmmControl {
            vmm,
            migrating: Arc::new(AtomicBool::new(false)),
            cancel: Cancel::new(),
        }
    }
}

impl RequestHandler for VmmControl {
    fn handle(&mut self, req: Request, conn: &UnixStream) -> Option<Value> {
        let busy = self.migrating.load(Ordering::Acquire);
        match req {
            Request::Migrate(args) => {
                if self.migrating.swap(true, Ordering::AcqRel) {
                    return Some(error_reply("a migration is already running"));
                }
                match conn.try_clone() {
                    Ok(c) => {
                        self.cancel = Cancel::new();
                        let (vmm, migrating) = (self.vmm.clone(), self.migrating.clone());
                        worker::spawn(vmm, args, c, migrating, self.cancel.clone());
                        None
                    }
                    Err(e) => {
                        self.migrating.store(false, Ordering::Release);
                        Some(error_reply(&format!(
                            "cannot hand the connection over: {e}"
                        )))
                    }
                }
            }
            Request::Cancel if busy => {
                self.cancel.cancel();
                Some(json!({"ok": true}))
            }
            Request::Cancel => Some(error_reply("no migration is running")),
            Request::Pause | Request::Resume if busy => Some(error_reply(
                "the VM is migrating; pause and resume are refused",
            )),
            other => Some(
                self.vmm
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .handle_basic(other),
            ),
        }
    }
}

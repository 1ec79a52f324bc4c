//! Live migration in the vmm, around the migration crate's `send_migration` and
//! `receive_migration`:
//!
//! - source: the worker thread that sends the VM while the event loop keeps serving
//!   ([`worker`]), the VM adapter it sends ([`source_vm`]) with auto-converge's mechanism
//!   ([`throttle`]), and the VM's one outgoing migration at a time ([`outgoing`]);
//! - destination: `minivmm receive` ([`receive`]: accept, retry, then serve), the process
//!   before its guest runs ([`incoming`]), and the VM adapter it receives into ([`target_vm`]).
//!
//! The control socket's side of it (the `migrate` request, the `minivmm migrate` client) is
//! in [`crate::control`].

pub mod incoming;
pub mod outgoing;
pub mod receive;
pub mod source_vm;
pub mod target_vm;
pub mod throttle;
pub mod worker;

/// This process's resident set size in KiB.
pub fn rss_kib() -> u64 {
    crate::procfs::rss_kib(None)
}

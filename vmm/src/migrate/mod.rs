//! Live migration glue: the running VM as a migration source ([`source`]), the worker thread
//! that sends it while the event loop keeps serving ([`worker`]), the destination VM
//! ([`target`]), the destination before its guest runs ([`incoming`]) and the source's one
//! migration at a time ([`outgoing`]). The control socket's side of it (the `migrate` request,
//! the `minivmm migrate` client) is in [`crate::control`].

pub mod incoming;
pub mod outgoing;
pub mod source;
pub mod target;
pub mod throttle;
pub mod worker;

/// This process's resident set size in KiB.
pub fn rss_kib() -> u64 {
    crate::procfs::rss_kib(None)
}

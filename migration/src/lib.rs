//! Live migration for minivmm: the stream format, RAM save/load with first-round zero-page
//! elision, transports, convergence and statistics. No KVM here: guest RAM is seen as
//! [`RamRegion`]s (from vm-memory's `GuestMemoryMmap` via [`regions_from_guest_memory`]) and the
//! VM through [`MigrationSource`] / [`MigrationTarget`], which the vmm implements. Everything
//! runs in tests against [`fake::FakeVm`].
//!
//! # Zero-page elision, done so it cannot break
//!
//! QEMU 1.5.0 skipped zero pages in the first pass and 1.5.3 reverted it: the destination had
//! written its own firmware into guest memory, so "not sent" did not mean "zero there". Here
//! the destination proves its memory is zero before the stream starts (pagemap: never-touched
//! pages; the rest is read), or resets it (`MADV_DONTNEED`), and says so in its `Ready` reply.
//! The source elides zero pages from the bulk pass only after that, marks the pass as eliding,
//! and the loader refuses an eliding pass into memory it cannot vouch for. Later passes send
//! zero pages as zero records (no data); the loader frees previously written pages for them.
//!
//! # Protocol
//!
//! ```text
//!  source (send_migration)                        destination (receive_migration)
//!  ───────────────────────                        ───────────────────────────────
//!  header, Config, MemoryLayout  ───────────────▶ validate_config, compare layout,
//!  start_dirty_log (meanwhile)                    prove memory zero or reset it
//!                                ◀─────────────── Ready { pristine }
//!  PassBegin 0 (elided iff pristine)
//!  RamPages … (bulk: every page,  ──────────────▶ check head and runs, allocate fresh pages
//!   each chunk cleared in the                      on a 2nd thread, read into guest RAM,
//!   dirty log before it is read,                   check each page: a live page that fails
//!   data straight from guest RAM)                  is held torn
//!  loop: PassEnd n                ──────────────▶ (all of pass n in guest RAM)
//!                                 ◀─────────────── PassDone n { torn pages }
//!     fetch dirty log (+ torn); policy(pass stats)
//!     PassBegin n+1, RamPages …   ──────────────▶
//!  pause; fetch dirty log
//!  PassBegin n+1 (final), RamPages … ───────────▶
//!  save_state
//!  DeviceState …, End { count, bytes, chain } ──▶ verify End (and no page torn),
//!                                                 restore_state (no resume)
//!                                ◀─────────────── Restored { go_timeout }
//!  commit (never resume here again)
//!  Go                            ───────────────▶ resume
//!                                ◀─────────────── Running        (or Error { message })
//!  Ok(stats): caller stops the source VM
//! ```
//!
//! Exactly one message, `Go`, decides who runs the guest. Any error on the source before it
//! stops dirty logging and resumes the guest there; any error on the destination before it
//! returns `Err` without resuming and sends `Error` back. After `Go` the source resumes only
//! if the destination says it did not start the guest; without an answer the outcome is
//! unknown and the guest stays paused for an operator to decide. Every wait is bounded
//! (per-operation timeouts, handshake, switchover and commit deadlines). A `file:` snapshot
//! is the same stream with no replies, written to a temporary file renamed over the target
//! only when complete and synced; the loader makes its memory pristine itself. The byte
//! layout is in `migration/FORMAT.md`; `fault.rs` holds the fault points that tests arm.
//!
//! # Example (vmm side)
//!
//! ```no_run
//! use migration::{fake::FakeVm, send_migration, Endpoint, SendOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut vm = FakeVm::new(&[(0, 64 << 20)]); // the vmm passes its own VM here
//! let timeout = std::time::Duration::from_secs(10);
//! let mut conn = Endpoint::parse("unix:/tmp/m.sock")?.connect(timeout)?;
//! let stats = send_migration(&mut vm, &mut conn, SendOptions::default())?;
//! println!("{stats}");
//! # Ok(()) }
//! ```

pub mod accept;
pub mod cancel;
pub mod checksum;
pub mod connections;
pub mod deadline;
pub mod dirty;
pub mod fake;
pub mod fault;
pub mod fd_passing;
pub mod holes;
pub mod local;
pub mod memory;
pub mod observe;
pub mod pagemap;
mod populator;
pub mod precopy;
pub mod ram_recv;
pub mod ram_send;
pub mod receive;
pub mod records;
pub mod send;
pub mod stats;
pub mod stream;
pub mod sync;
pub mod tls;
pub mod transport;
pub mod vm;
pub mod wire;
pub mod zero;

#[cfg(test)]
mod fuzz_regressions;
#[cfg(test)]
mod roundtrip_tests;

pub use accept::{no_faults, AcceptError, AcceptOptions, Acceptor, FaultSupplier, Offer};
pub use cancel::Cancel;
pub use dirty::DirtyBitmap;
pub use local::{LocalError, SharedRegion};
pub use memory::{
    advise_huge_pages, regions_from_guest_memory, AnonMapping, Backing, MemoryError, RamRegion,
};
pub use observe::{Milestone, Observer};
pub use precopy::{Decision, Limits};
pub use receive::{
    read_handshake, receive_handshaken, receive_migration, DestinationError, Handshake,
    ReceiveOptions, ReceiveProgress,
};
pub use records::StateBlob;
pub use send::{send_migration, Progress, SendOptions, SourceError};
pub use stats::{MigrationStats, PassKind, PassStats, ReceiveStats, StopReason};
pub use transport::{
    Connection, Deadline, Endpoint, EndpointError, GuestSpan, Listener, Transport, TransportError,
};
pub use vm::{DirtyLog, GuestRam, MigrationSource, MigrationTarget, VmOpError};
pub use wire::{WireError, FORMAT_VERSION, PAGE_SIZE};

/// An error and its sources on one line, `a: b: c` (for replies, logs and the command line).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

//! The built-in test guest, embedded in the `minivmm` binary.
//!
//! [`TEST_GUEST_ELF`] is a freestanding x86_64 ELF with a PVH entry note
//! (`XEN_ELFNOTE_PHYS32_ENTRY`), loaded at 1 MiB. It fills a working set with a deterministic
//! pattern, keeps rewriting it and verifies it every second, printing one line per event on
//! COM1; see guest/README.md for the knobs and the serial protocol. build.rs compiles it from
//! `image/` with a nested `rustc`.
//!
//! The pure parts of the image (knob parser, page pattern, layout, pacing) are plain `no_std` Rust,
//! re-exported here so the host can unit-test them and reproduce the guest's arithmetic.

/// The test guest image.
pub const TEST_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

#[path = "../image/knobs.rs"]
pub mod knobs;
#[path = "../image/layout.rs"]
pub mod layout;
#[path = "../image/pace.rs"]
pub mod pace;
#[path = "../image/pattern.rs"]
pub mod pattern;

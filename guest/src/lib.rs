//! The built-in test guest, embedded in the `minivmm` binary.
//!
//! Placeholder until the real guest lands: an empty image.

/// The test guest: an x86_64 ELF with a PVH entry note.
pub const TEST_GUEST_ELF: &[u8] = &[];

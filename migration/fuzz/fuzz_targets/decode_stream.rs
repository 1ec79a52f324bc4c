//! Arbitrary bytes as a migration stream (a snapshot file) into a small in-memory destination
//! with guard pages on both sides of its RAM: the framing layer under garbage. Any panic,
//! hang or stray write is a bug; errors are the expected outcome. `receive_records` is the
//! structure-aware counterpart that gets past the checksums.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| migration_fuzz::stream::run_raw(data.to_vec()));

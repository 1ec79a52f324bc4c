//! The destination under hostile streams built record by record with the crate's own writer
//! (see `src/stream.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_fuzz::stream::{run, StreamCase};

fuzz_target!(|case: StreamCase| run(&case));

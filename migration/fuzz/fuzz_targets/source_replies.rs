//! The source under a hostile destination's replies (see `src/source.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_fuzz::source::{run, SourceCase};

fuzz_target!(|case: SourceCase| run(&case));

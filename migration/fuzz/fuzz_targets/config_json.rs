//! The `Config` record's JSON and its checks (see `src/vmm_inputs.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_fuzz::vmm_inputs::{config, ConfigCase};

fuzz_target!(|case: ConfigCase| config(&case));

//! Device and vCPU state blobs into a `VmSnapshot` (see `src/vmm_inputs.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use migration_fuzz::vmm_inputs::{state, StateCase};

fuzz_target!(|case: StateCase| state(&case));

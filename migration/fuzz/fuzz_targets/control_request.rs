//! A control-socket request line (see `src/vmm_inputs.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| migration_fuzz::vmm_inputs::control(data));

//! Feeds arbitrary bytes to the stream decoder and RAM loader against a small in-memory
//! destination (guard pages on both sides of its RAM). Any panic, hang or stray write is a
//! bug; errors are the expected outcome.
//!
//! `cargo +nightly fuzz run decode_stream` from `migration/` (seed: `corpus/decode_stream/`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::fake::{fake_target, FakeVm};
use migration::{
    receive_migration, Connection, GuestRam, MigrationTarget, RamRegion, ReceiveOptions,
    StateBlob, VmError, PAGE_SIZE,
};

/// Accepts any configuration so the fuzzer reaches the RAM and state paths.
struct AnyConfig(FakeVm);

impl GuestRam for AnyConfig {
    fn ram_regions(&self) -> Vec<RamRegion> {
        self.0.ram_regions()
    }
}

impl MigrationTarget for AnyConfig {
    fn validate_config(&mut self, _config: &[u8]) -> Result<(), VmError> {
        Ok(())
    }
    fn restore_state(&mut self, states: Vec<StateBlob>) -> Result<(), VmError> {
        self.0.restore_state(states)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        MigrationTarget::resume(&mut self.0)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut target = AnyConfig(fake_target(&[(0, 16 * PAGE_SIZE), (0x10_0000, 8 * PAGE_SIZE)]));
    let mut conn = Connection::from_bytes(data.to_vec());
    let _ = receive_migration(&mut target, &mut conn, &ReceiveOptions::default());
});

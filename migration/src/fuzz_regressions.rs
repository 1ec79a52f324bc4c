//! Every bug the fuzz targets in `migration/fuzz` found in this crate, as a unit test of the
//! input that showed it (decoded from the crash file, so it reads as the stream it was). The
//! crash inputs themselves join the committed corpus (`fuzz/corpus/<target>/`).

use crate::fake::{fake_target, FakeVm};
use crate::records::{encode_layout, LayoutRegion, PassBegin, PassMark, StateBlob};
use crate::stream::RecordWriter;
use crate::transport::Connection;
use crate::wire::{RecordKind, PAGE_SIZE};
use crate::{
    receive_migration, DestinationError, GuestRam, MigrationTarget, RamRegion, ReceiveOptions,
    ReceiveStats, VmOpError,
};

const LAYOUT: &[(u64, usize)] = &[(0, 16 * PAGE_SIZE), (0x10_0000, 8 * PAGE_SIZE)];

/// A stream of configuration, layout, then whatever `body` writes.
fn stream(body: impl FnOnce(&mut RecordWriter<'_>)) -> Vec<u8> {
    let mut conn = Connection::memory();
    {
        let mut w = RecordWriter::start(&mut conn).expect("memory");
        let layout: Vec<LayoutRegion> = LAYOUT
            .iter()
            .map(|&(guest_addr, len)| LayoutRegion {
                guest_addr,
                size: len as u64,
            })
            .collect();
        w.write_record(RecordKind::Config, &[b"{}"])
            .and_then(|_| w.write_record(RecordKind::MemoryLayout, &[&encode_layout(&layout)]))
            .expect("memory");
        body(&mut w);
    }
    conn.into_bytes()
}

/// The fake destination, taking any configuration.
struct AnyConfig(FakeVm);

impl GuestRam for AnyConfig {
    fn ram_regions(&self) -> Vec<RamRegion> {
        self.0.ram_regions()
    }
}

impl MigrationTarget for AnyConfig {
    fn validate_config(&mut self, _: &[u8]) -> Result<(), VmOpError> {
        Ok(())
    }
    fn accepts_state(&self, id: &str) -> bool {
        self.0.accepts_state(id)
    }
    fn restore_state(&mut self, states: Vec<StateBlob>) -> Result<(), VmOpError> {
        self.0.restore_state(states)
    }
    fn resume(&mut self) -> Result<(), VmOpError> {
        MigrationTarget::resume(&mut self.0)
    }
}

/// Receives `bytes` as a snapshot file into a fresh fake destination.
fn receive(bytes: Vec<u8>) -> Result<ReceiveStats, DestinationError> {
    let mut target = AnyConfig(fake_target(LAYOUT));
    let mut conn = Connection::from_bytes(bytes);
    receive_migration(&mut target, &mut conn, &ReceiveOptions::default())
}

/// receive_records, `fuzz/corpus/receive_records/regression-pass-end-u32-max`: a `PassEnd`
/// for pass u32::MAX overflowed `pass + 1` (a panic in debug builds) instead of being refused
/// as out of order.
#[test]
fn pass_end_for_the_last_pass_number_is_refused() {
    let bytes = stream(|w| {
        let begin = PassBegin { pass: 0, flags: 0 };
        let end = PassMark { pass: u32::MAX };
        w.write_record(RecordKind::PassBegin, &[&begin.encode()])
            .and_then(|_| w.write_record(RecordKind::PassEnd, &[&end.encode()]))
            .expect("memory");
    });
    let err = receive(bytes).expect_err("refused");
    assert!(
        matches!(
            err,
            DestinationError::PassOrder {
                found: u32::MAX,
                expected: 0,
                ..
            }
        ),
        "{err}"
    );
}

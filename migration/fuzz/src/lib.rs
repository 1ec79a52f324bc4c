//! What the fuzz targets share: inputs described as `arbitrary` values and turned into bytes
//! by the crates' own encoders (the stream through `RecordWriter`, which computes every CRC
//! and the `End` chain; replies through `send_reply`), so that mutations reach the semantics
//! instead of dying at a checksum; the fake peers; and the oracles that say more than "no
//! panic". Each target in `fuzz_targets/` is one call into here.
//!
//! - [`stream`]: a destination (`receive_migration` into a fake VM) fed hostile streams.
//! - [`source`]: a source (`send_migration` from a fake VM) answered by a hostile
//!   destination.
//! - [`vmm_inputs`]: the vmm's decoders of what comes from outside: the configuration JSON,
//!   the postcard state blobs, the control-socket request line.

pub mod source;
pub mod stream;
pub mod vmm_inputs;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use migration::wire::PAGE_SIZE;

/// RAM of the fake VMs on both sides: 16 pages at 0 and 8 pages at 1 MiB.
pub const LAYOUT: &[(u64, usize)] = &[(0, 16 * PAGE_SIZE), (0x10_0000, 8 * PAGE_SIZE)];

/// Pages in [`LAYOUT`].
pub const PAGES: usize = 24;

/// Guest address of page `n` (modulo [`PAGES`]) of [`LAYOUT`].
pub fn page_addr(n: usize) -> u64 {
    let n = n % PAGES;
    let first = LAYOUT[0].1 / PAGE_SIZE;
    if n < first {
        LAYOUT[0].0 + (n * PAGE_SIZE) as u64
    } else {
        LAYOUT[1].0 + ((n - first) * PAGE_SIZE) as u64
    }
}

/// A state id: one a vmm knows, or anything.
#[derive(Arbitrary, Debug, Clone)]
pub enum Id {
    Vm,
    Vcpu(u8),
    Serial,
    MemHash,
    Raw(String),
}

impl Id {
    pub fn text(&self) -> String {
        match self {
            Id::Vm => "vm".into(),
            Id::Vcpu(n) => format!("vcpu{n}"),
            Id::Serial => "serial".into(),
            Id::MemHash => "memhash".into(),
            Id::Raw(s) => s.clone(),
        }
    }
}

/// A number relative to the one the other side expects, or any number.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Num {
    Expected,
    Off(i8),
    Raw(u32),
}

impl Num {
    pub fn value(self, expected: u32) -> u32 {
        match self {
            Num::Expected => expected,
            Num::Off(d) => expected.wrapping_add_signed(i32::from(d)),
            Num::Raw(v) => v,
        }
    }
}

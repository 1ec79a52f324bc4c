//! Boot GDT entries and the `kvm_segment`s they describe.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

/// Build a GDT entry from access `flags` (bits 0..8 access byte, 12..16 G/DB/L/AVL), `base` and
/// 20-bit `limit`.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT for 64-bit (Linux boot protocol) entry: null, code, data, TSS.
pub const GDT_64BIT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The boot GDT for 32-bit protected-mode (PVH) entry: null, flat 4 GiB code and data, TSS.
pub const GDT_32BIT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// Selector indexes in both boot GDTs.
pub const CODE_INDEX: u8 = 1;
pub const DATA_INDEX: u8 = 2;
pub const TSS_INDEX: u8 = 3;

fn base(e: u64) -> u64 {
    ((e & 0xff00_0000_0000_0000) >> 32) | ((e & 0x0000_00ff_ffff_0000) >> 16)
}

fn limit(e: u64) -> u32 {
    let raw = (((e & 0x000f_0000_0000_0000) >> 32) | (e & 0xffff)) as u32;
    // With the granularity bit the limit counts 4 KiB pages.
    if bit(e, 55) == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

fn bit(e: u64, n: u32) -> u8 {
    ((e >> n) & 1) as u8
}

/// The `kvm_segment` that loading GDT entry `table_index` (value `entry`) produces.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let present = bit(entry, 47);
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: bit(entry, 55),
        avl: bit(entry, 52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Write `table` at `addr`.
pub fn write_gdt<M: Bytes<GuestAddress, E = GuestMemoryError>>(
    mem: &M,
    addr: GuestAddress,
    table: &[u64],
) -> Result<(), GuestMemoryError> {
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(addr.0 + 8 * i as u64))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn flat_32bit_code_segment() {
        let s = segment_from_gdt(GDT_32BIT[1], CODE_INDEX);
        assert_eq!(s.base, 0);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.selector, 0x8);
        assert_eq!(s.type_, 0xb);
        assert_eq!((s.present, s.db, s.l, s.g, s.s, s.dpl), (1, 1, 0, 1, 1, 0));
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn long_mode_code_and_tss() {
        let c = segment_from_gdt(GDT_64BIT[1], CODE_INDEX);
        assert_eq!((c.l, c.db, c.type_), (1, 0, 0xb));
        let t = segment_from_gdt(GDT_64BIT[3], TSS_INDEX);
        assert_eq!((t.type_, t.s, t.selector), (0xb, 0, 0x18));
        let n = segment_from_gdt(GDT_64BIT[0], 0);
        assert_eq!(n.unusable, 1);
    }

    #[test]
    fn entry_round_trips_base_and_limit() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 5);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.selector, 40);
    }

    #[test]
    fn gdt_lands_in_memory() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem");
        write_gdt(&mem, GuestAddress(0x500), &GDT_64BIT).expect("write");
        let v: u64 = mem.read_obj(GuestAddress(0x508)).expect("read");
        assert_eq!(v, GDT_64BIT[1]);
    }
}

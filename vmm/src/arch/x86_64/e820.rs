//! The guest memory map (e820), shared by the Linux zero page and the PVH start info.

use super::layout::{low_ram_end, EBDA_START, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Start of the BIOS area reserved for the ACPI and MP tables.
const BIOS_AREA_START: u64 = 0xe0000;

/// One memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map of a guest with `mem_bytes` of RAM (at least 1 MiB plus one page).
pub fn memory_map(mem_bytes: u64) -> Vec<E820Entry> {
    let ram = |addr, end: u64| E820Entry {
        addr,
        size: end - addr,
        kind: E820_RAM,
    };
    let mut map = vec![
        ram(0, EBDA_START),
        E820Entry {
            addr: BIOS_AREA_START,
            size: HIMEM_START - BIOS_AREA_START,
            kind: E820_RESERVED,
        },
        ram(HIMEM_START, low_ram_end(mem_bytes)),
    ];
    if mem_bytes > MMIO_HOLE_START {
        map.push(ram(
            MMIO_HOLE_END,
            MMIO_HOLE_END + (mem_bytes - MMIO_HOLE_START),
        ));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_covers_ram_and_skips_the_hole() {
        let map = memory_map(16 << 30);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // All RAM except the legacy area [EBDA_START, 1 MiB).
        assert_eq!(ram, (16 << 30) - (HIMEM_START - EBDA_START));
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END));
        assert_eq!(map.last().map(|e| e.addr + e.size), Some(17 << 30));
        for w in map.windows(2) {
            assert!(
                w[0].addr + w[0].size <= w[1].addr,
                "sorted, disjoint: {w:?}"
            );
        }
    }

    #[test]
    fn small_map_has_no_high_entry() {
        let map = memory_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIMEM_START,
                size: (512 << 20) - HIMEM_START,
                kind: E820_RAM
            }
        );
    }
}

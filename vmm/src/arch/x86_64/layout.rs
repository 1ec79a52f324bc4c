//! Guest physical memory layout.
//!
//! ```text
//! 0x0000_0500  GDT (boot)                 0x0000_6000  PVH hvm_start_info, modlist, memmap
//! 0x0000_0520  IDT (boot, empty)          0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  boot stack top             0x0000_9000  PML4, PDPT, PD (identity map 1 GiB)
//! 0x0002_0000  kernel command line        0x0009_fc00  end of low RAM (EBDA and VGA hole above)
//! 0x000e_0000  ACPI tables (RSDP first)   0x000f_0000  MP table
//! 0x0010_0000  kernel (HIMEM_START) ...   initrd at the top of RAM below 3 GiB
//! 0xc000_0000  32-bit MMIO hole (3 GiB .. 4 GiB), KVM TSS and identity map page at its top
//! 0x1_0000_0000  RAM above 3 GiB continues here
//! ```

use vm_memory::GuestAddress;

pub const BOOT_GDT_ADDR: u64 = 0x500;
pub const BOOT_GDT_MAX_ENTRIES: usize = 4;
pub const BOOT_IDT_ADDR: u64 = 0x520;
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// End of usable low RAM: the EBDA, VGA hole and BIOS area follow.
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const MPTABLE_START: u64 = 0xf0000;
/// Kernels load here or higher.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM beyond this moves above 4 GiB.
pub const MMIO_HOLE_START: u64 = 3 << 30;
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// KVM's real-mode TSS (three pages) and identity-map page, inside the MMIO hole.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// I/O port of the power-off register (PM1a control, SLP_EN = bit 13).
pub const PM1A_CNT_PORT: u16 = 0x604;
/// Legacy serial port COM1 and its IRQ.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

// The boot structures do not overlap, and KVM's identity-map page and three-page TSS sit in
// the MMIO hole clear of the IOAPIC and LAPIC pages.
const _: () = {
    assert!(BOOT_GDT_ADDR + 8 * BOOT_GDT_MAX_ENTRIES as u64 <= BOOT_IDT_ADDR);
    assert!(PVH_START_INFO_ADDR + 56 <= PVH_MODLIST_ADDR);
    assert!(PVH_MODLIST_ADDR + 32 <= PVH_MEMMAP_ADDR);
    assert!(PVH_MEMMAP_ADDR + 24 * 32 <= ZERO_PAGE_ADDR);
    assert!(ZERO_PAGE_ADDR + 4096 <= BOOT_STACK_POINTER);
    assert!(PD_ADDR + 4096 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + 4096 <= EBDA_START);
    assert!(KVM_IDENTITY_MAP_ADDR + 4096 == KVM_TSS_ADDR);
    assert!(KVM_IDENTITY_MAP_ADDR >= LAPIC_ADDR as u64 + 4096);
    assert!(KVM_TSS_ADDR + 3 * 4096 <= MMIO_HOLE_END);
    assert!(IOAPIC_ADDR as u64 >= MMIO_HOLE_START);
};

/// The guest RAM regions for `mem_bytes` of memory: `[0, min(mem, 3G))` and, when larger,
/// `[4G, 4G + rest)`.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let mut regions = vec![(GuestAddress(0), low)];
    if mem_bytes > MMIO_HOLE_START {
        regions.push((GuestAddress(MMIO_HOLE_END), mem_bytes - MMIO_HOLE_START));
    }
    regions
}

/// End of RAM below the MMIO hole (exclusive).
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_HOLE_START)
}

/// Highest guest physical address used by `mem_bytes` of RAM, plus one.
pub fn guest_phys_end(mem_bytes: u64) -> u64 {
    ram_regions(mem_bytes)
        .last()
        .map_or(0, |(a, len)| a.0 + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(ram_regions(3 << 30), vec![(GuestAddress(0), 3 << 30)]);
        assert_eq!(guest_phys_end(3 << 30), 3 << 30);
    }

    #[test]
    fn memory_above_3g_is_split_around_the_hole() {
        assert_eq!(
            ram_regions(16 << 30),
            vec![
                (GuestAddress(0), 3 << 30),
                (GuestAddress(4 << 30), 13 << 30)
            ]
        );
        assert_eq!(guest_phys_end(16 << 30), 17 << 30);
        assert_eq!(low_ram_end(16 << 30), 3 << 30);
    }
}

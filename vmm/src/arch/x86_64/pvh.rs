//! PVH boot: the `hvm_start_info` structure, its memory map and module list.
//!
//! The guest's entry point gets the address of `hvm_start_info` in %ebx
//! (<https://xenbits.xen.org/docs/unstable/misc/pvh.html>).

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::e820::E820Entry;
use super::layout::{PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, PVH_START_INFO_ADDR};

pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// What the start info points at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartInfoParams {
    pub cmdline_addr: u64,
    /// Initrd as the single module: (address, size).
    pub initrd: Option<(u64, u64)>,
    /// ACPI RSDP address, 0 when there is none.
    pub rsdp_addr: u64,
}

/// Build the start info and write it, the memory map and the module list into guest memory.
/// Returns the address of the start info (the guest's %ebx).
pub fn write_start_info<M: GuestMemoryBackend>(
    mem: &M,
    params: &StartInfoParams,
    memmap: &[E820Entry],
) -> Result<GuestAddress, linux_loader::configurator::Error> {
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: params.cmdline_addr,
        rsdp_paddr: params.rsdp_addr,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let entries: Vec<hvm_memmap_table_entry> = memmap
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let start = GuestAddress(PVH_START_INFO_ADDR);
    let mut boot = if let Some((addr, size)) = params.initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
        let mut b = BootParams::new(&info, start);
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        b.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
        b
    } else {
        BootParams::new(&info, start)
    };
    boot.set_sections(&entries, GuestAddress(PVH_MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams(&boot, mem)?;
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::e820::memory_map;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn start_info_points_at_cmdline_memmap_and_module() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).expect("mem");
        let map = memory_map(32 << 20);
        let p = StartInfoParams {
            cmdline_addr: 0x20000,
            initrd: Some((0x100_0000, 0x1234)),
            rsdp_addr: 0xe0000,
        };
        let at = write_start_info(&mem, &p, &map).expect("write");
        let info: hvm_start_info = mem.read_obj(at).expect("read");
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, 0x20000);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.memmap_entries as usize, map.len());
        assert_eq!(info.nr_modules, 1);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).expect("mod");
        assert_eq!((m.paddr, m.size), (0x100_0000, 0x1234));
        for (i, e) in map.iter().enumerate() {
            let got: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(info.memmap_paddr + 24 * i as u64))
                .expect("entry");
            assert_eq!((got.addr, got.size, got.type_), (e.addr, e.size, e.kind));
        }
    }

    #[test]
    fn no_initrd_means_no_modules() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let at = write_start_info(&mem, &StartInfoParams::default(), &memory_map(16 << 20))
            .expect("write");
        let info: hvm_start_info = mem.read_obj(at).expect("read");
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }
}

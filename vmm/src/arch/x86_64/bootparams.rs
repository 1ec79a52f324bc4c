//! The Linux boot protocol zero page (`boot_params`) for bzImage kernels.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::e820::E820Entry;
use super::layout::ZERO_PAGE_ADDR;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// `loadflags`: the kernel may use the heap up to `heap_end_ptr`.
const CAN_USE_HEAP: u8 = 0x80;

/// What the zero page describes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroPageParams {
    pub cmdline_addr: u64,
    pub cmdline_size: u32,
    pub initrd: Option<(u64, u64)>,
    pub rsdp_addr: u64,
}

/// Errors building the zero page.
#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    #[error("memory map has {0} entries, the zero page holds 128")]
    TooManyE820Entries(usize),
    #[error("writing the zero page failed")]
    Write(#[source] linux_loader::configurator::Error),
}

/// Build `boot_params` from the kernel's own setup header and write it at `ZERO_PAGE_ADDR`.
pub fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    header: Option<setup_header>,
    p: &ZeroPageParams,
    memmap: &[E820Entry],
) -> Result<GuestAddress, ZeroPageError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = p.cmdline_addr as u32;
    params.hdr.cmdline_size = p.cmdline_size;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.loadflags |= CAN_USE_HEAP;
    // Heap end relative to the real-mode code at 0x10000 (unused with a 64-bit entry).
    params.hdr.heap_end_ptr = 0xfe00;
    if let Some((addr, size)) = p.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = p.rsdp_addr;
    if memmap.len() > params.e820_table.len() {
        return Err(ZeroPageError::TooManyE820Entries(memmap.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(memmap) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = memmap.len() as u8;
    let at = GuestAddress(ZERO_PAGE_ADDR);
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, at), mem)
        .map_err(ZeroPageError::Write)?;
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::e820::memory_map;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let hdr = setup_header {
            version: 0x20f,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let map = memory_map(8 << 30);
        let p = ZeroPageParams {
            cmdline_addr: 0x20000,
            cmdline_size: 12,
            initrd: Some((0x7000_0000, 0x10_0000)),
            rsdp_addr: 0xe0000,
        };
        let at = write_zero_page(&mem, Some(hdr), &p, &map).expect("write");
        let got: boot_params = mem.read_obj(at).expect("read");
        assert_eq!({ got.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ got.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ got.hdr.version }, 0x20f);
        assert_eq!({ got.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ got.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ got.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ got.hdr.ramdisk_image }, 0x7000_0000);
        assert_eq!({ got.hdr.ramdisk_size }, 0x10_0000);
        assert_eq!({ got.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(got.e820_entries as usize, map.len());
        let last = got.e820_table[map.len() - 1];
        assert_eq!(({ last.addr }, { last.size }), (4 << 30, 5 << 30));
    }
}

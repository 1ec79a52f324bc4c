//! Guest memory: anonymous private `MAP_NORESERVE` mappings, one per RAM region, each with a
//! [`WriteLog`] so the VMM's own writes to guest memory are tracked for migration.
//!
//! Only touched memory costs host memory: a 16 GiB guest that touches 100 MiB costs about
//! 100 MiB. A booted VM asks for transparent huge pages at once, like QEMU (2 MiB faults and
//! mappings); a migration destination only once the guest runs there (see
//! [`advise_huge_pages`]).

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestRegionMmap};

use super::write_log::WriteLog;
use crate::arch::x86_64::layout::ram_regions;

/// Guest memory with dirty tracking of VMM writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<WriteLog>;
pub type GuestRegion = GuestRegionMmap<WriteLog>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory region at {addr:#x} of {size} bytes is too large for this host")]
    RegionTooLarge { addr: u64, size: u64 },
    #[error(
        "cannot map {size} bytes of guest memory at {addr:#x} (--mem too large for this host?)"
    )]
    Mmap {
        addr: u64,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest memory region at {0:#x} overflows the address space")]
    Region(u64),
    #[error("guest memory regions are inconsistent")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// Map one anonymous region of `size` bytes for guest address `addr`.
fn map_region(addr: GuestAddress, size: u64) -> Result<GuestRegion, MemoryError> {
    let len =
        usize::try_from(size).map_err(|_| MemoryError::RegionTooLarge { addr: addr.0, size })?;
    let bitmap = WriteLog::new(len);
    let region = MmapRegionBuilder::new_with_bitmap(len, bitmap)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|source| MemoryError::Mmap {
            addr: addr.0,
            size,
            source,
        })?;
    GuestRegionMmap::new(region, addr).ok_or(MemoryError::Region(addr.0))
}

/// Create the guest memory for `mem_bytes` of RAM with the standard layout (RAM below 3 GiB,
/// the rest from 4 GiB).
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = ram_regions(mem_bytes)
        .into_iter()
        .map(|(addr, size)| map_region(addr, size))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Collection)
}

/// Ask for transparent huge pages behind all guest RAM.
///
/// A destination asks only after the incoming migration: on a host that hands out memory its
/// own hypervisor has reclaimed (free page reporting), filling fresh huge pages can be much
/// slower than filling small ones (measured in the README). Pages faulted later, and
/// khugepaged, then use huge pages for the running guest.
pub fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for r in mem.iter() {
        let map = r.get_mmap();
        migration::advise_huge_pages(map.as_ptr(), map.size());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn layout_matches_ram_regions_and_is_lazy() {
        let mem = create_guest_memory(16 << 30).expect("16 GiB of NORESERVE memory maps");
        let got: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(got, vec![(0, 3 << 30), (4 << 30, 13 << 30)]);
        assert!(
            mem.find_region(GuestAddress(3 << 30)).is_none(),
            "MMIO hole"
        );
    }

    #[test]
    fn vmm_writes_are_tracked_in_the_bitmap() {
        let mem = create_guest_memory(64 << 20).expect("mem");
        mem.write_obj(0xdead_beefu32, GuestAddress(0x5000))
            .expect("write");
        let r = mem.find_region(GuestAddress(0)).expect("region");
        assert!(r.bitmap().dirty_at(0x5000));
        assert!(!r.bitmap().dirty_at(0x6000));
    }
}

//! Guest memory: one `MAP_NORESERVE` mapping per RAM region, each with a [`WriteLog`] so the
//! VMM's own writes to guest memory are tracked for migration. Private anonymous memory by
//! default; with `--mem-shared` a sealed memfd per region mapped shared (`--mem-hugepages`:
//! on hugetlbfs), which a local migration hands to another process by descriptor. That
//! process maps the files over its own prepared memory ([`overlay`]), at the same addresses,
//! so its KVM memory slots stay as they are.
//!
//! Only touched memory costs host memory: a 16 GiB guest that touches 100 MiB costs about
//! 100 MiB. A booted VM asks for transparent huge pages at once, like QEMU (2 MiB faults and
//! mappings); a migration destination only once the guest runs there (see
//! [`advise_huge_pages`]).

use std::os::fd::AsRawFd;

use migration::SharedRegion;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::write_log::WriteLog;
use crate::arch::x86_64::layout::ram_regions;
use crate::config::MemoryBacking;

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
    #[error(
        "cannot create shared memory for the region at {addr:#x} ({size} bytes){}",
        if *.hugepages { " on huge pages: are enough reserved in /proc/sys/vm/nr_hugepages?" } else { "" }
    )]
    Memfd {
        addr: u64,
        size: u64,
        hugepages: bool,
        #[source]
        source: std::io::Error,
    },
    #[error("the handed-over memory has {got} regions ({got_layout:x?}), this VM {expected:x?}")]
    AdoptLayout {
        got: usize,
        got_layout: Vec<(u64, u64)>,
        expected: Vec<(u64, u64)>,
    },
    #[error("guest memory at host address {host:#x} is not aligned to the handed-over file's {page_size}-byte pages")]
    AdoptAlignment { host: usize, page_size: u64 },
    #[error("cannot map the handed-over memory of the region at {addr:#x} over this VM's")]
    AdoptMap {
        addr: u64,
        #[source]
        source: std::io::Error,
    },
}

fn region_len(addr: GuestAddress, size: u64) -> Result<usize, MemoryError> {
    usize::try_from(size).map_err(|_| MemoryError::RegionTooLarge { addr: addr.0, size })
}

/// Map one region of `size` bytes for guest address `addr`, backed as `backing` says.
fn map_region(
    addr: GuestAddress,
    size: u64,
    backing: MemoryBacking,
) -> Result<GuestRegion, MemoryError> {
    let len = region_len(addr, size)?;
    let bitmap = WriteLog::new(len);
    let builder = MmapRegionBuilder::new_with_bitmap(len, bitmap)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
    let builder = match backing {
        MemoryBacking::Private => {
            builder.with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        }
        MemoryBacking::Shared | MemoryBacking::HugePages => {
            let hugepages = backing == MemoryBacking::HugePages;
            let name = format!("minivmm-ram-{:#x}", addr.0);
            let file =
                migration::local::create_memfd(&name, size, hugepages).map_err(|source| {
                    MemoryError::Memfd {
                        addr: addr.0,
                        size,
                        hugepages,
                        source,
                    }
                })?;
            // Huge pages are reserved when mapped (a shortage fails here, not as a SIGBUS
            // in the guest later); small shared pages cost nothing until touched.
            let flags = if hugepages {
                libc::MAP_SHARED
            } else {
                libc::MAP_SHARED | libc::MAP_NORESERVE
            };
            builder
                .with_mmap_flags(flags)
                .with_file_offset(FileOffset::new(file, 0))
                .with_hugetlbfs(hugepages)
        }
    };
    let region = builder.build().map_err(|source| MemoryError::Mmap {
        addr: addr.0,
        size,
        source,
    })?;
    GuestRegionMmap::new(region, addr).ok_or(MemoryError::Region(addr.0))
}

/// Create the guest memory for `mem_bytes` of RAM with the standard layout (RAM below 3 GiB,
/// the rest from 4 GiB).
pub fn create_guest_memory(
    mem_bytes: u64,
    backing: MemoryBacking,
) -> Result<GuestMemoryMmap, MemoryError> {
    let regions = ram_regions(mem_bytes)
        .into_iter()
        .map(|(addr, size)| map_region(addr, size, backing))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Collection)
}

/// Local migration: maps the handed-over files of `shared` over the regions of `mem` (same
/// layout), at the same host addresses, and returns guest memory describing them (shared,
/// file-backed). KVM's memory slots point at those addresses and need no change. `mem` keeps
/// owning the address ranges (it unmaps them when dropped): keep it alive at least as long
/// as the returned memory.
///
/// Nothing is read or written: the source's guest may be running on these pages. On an
/// error some regions may already be replaced: drop `mem` (the VM) rather than use it.
pub fn overlay(
    mem: &GuestMemoryMmap,
    shared: Vec<SharedRegion>,
) -> Result<GuestMemoryMmap, MemoryError> {
    let ours: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let theirs: Vec<(u64, u64)> = shared.iter().map(|r| (r.guest_addr, r.size)).collect();
    if ours != theirs {
        return Err(MemoryError::AdoptLayout {
            got: theirs.len(),
            got_layout: theirs,
            expected: ours,
        });
    }
    let mut regions = Vec::with_capacity(shared.len());
    for (r, s) in mem.iter().zip(shared) {
        let host = r.as_ptr();
        let addr = r.start_addr();
        let len = region_len(addr, s.size)?;
        if !(host as u64).is_multiple_of(s.page_size) {
            return Err(MemoryError::AdoptAlignment {
                host: host as usize,
                page_size: s.page_size,
            });
        }
        let flags = if s.hugetlbfs {
            libc::MAP_SHARED
        } else {
            libc::MAP_SHARED | libc::MAP_NORESERVE
        };
        // SAFETY: `host..host + len` is exactly one region of `mem`, a mapping this VM owns
        // and nothing has written (a destination maps before anything runs); MAP_FIXED
        // replaces it with the file, so the address range stays mapped for `mem`'s owner to
        // unmap. The file was checked to be at least `file_offset + len` bytes and sealed
        // against shrinking.
        let got = unsafe {
            libc::mmap(
                host.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_FIXED,
                s.file.as_raw_fd(),
                s.file_offset as libc::off_t,
            )
        };
        if got == libc::MAP_FAILED || got.cast() != host {
            return Err(MemoryError::AdoptMap {
                addr: addr.0,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `host..host + len` is the shared mapping just made, which stays mapped as
        // long as `mem` (its owner, per this function's contract) lives.
        let builder = unsafe {
            MmapRegionBuilder::new_with_bitmap(len, WriteLog::new(len)).with_raw_mmap_pointer(host)
        };
        let region = builder
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_file_offset(FileOffset::new(s.file, s.file_offset))
            .with_hugetlbfs(s.hugetlbfs)
            .build()
            .map_err(|source| MemoryError::Mmap {
                addr: addr.0,
                size: s.size,
                source,
            })?;
        regions.push(GuestRegionMmap::new(region, addr).ok_or(MemoryError::Region(addr.0))?);
    }
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
        let mem = create_guest_memory(16 << 30, MemoryBacking::Private)
            .expect("16 GiB of NORESERVE memory maps");
        let got: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(got, vec![(0, 3 << 30), (4 << 30, 13 << 30)]);
        assert!(
            mem.find_region(GuestAddress(3 << 30)).is_none(),
            "MMIO hole"
        );
    }

    #[test]
    fn shared_memory_is_a_file_and_overlays_at_the_same_addresses() {
        use migration::{regions_from_guest_memory, Backing};
        let src = create_guest_memory(64 << 20, MemoryBacking::Shared).expect("memfd memory");
        src.write_obj(0x1234_5678u32, GuestAddress(0x3000))
            .expect("write");
        let regions = regions_from_guest_memory(&src).expect("regions");
        assert_eq!(regions[0].backing(), Backing::Other);
        let (entries, fds) = migration::local::describe(&regions);
        let fds = fds
            .iter()
            .map(|f| f.try_clone_to_owned().expect("dup"))
            .collect();
        let shared = migration::local::adopt(&entries, fds).expect("adopt");

        let dst = create_guest_memory(64 << 20, MemoryBacking::Private).expect("memory");
        let before: Vec<*mut u8> = dst.iter().map(|r| r.as_ptr()).collect();
        let adopted = overlay(&dst, shared).expect("overlay");
        let after: Vec<*mut u8> = adopted.iter().map(|r| r.as_ptr()).collect();
        assert_eq!(before, after, "KVM's slots keep their addresses");
        assert_eq!(
            adopted.read_obj::<u32>(GuestAddress(0x3000)).expect("read"),
            0x1234_5678
        );
        adopted
            .write_obj(7u32, GuestAddress(0x8000))
            .expect("write");
        assert_eq!(src.read_obj::<u32>(GuestAddress(0x8000)).expect("read"), 7);
        let again = regions_from_guest_memory(&adopted).expect("regions");
        assert!(again[0].file().is_some(), "it can be handed on again");

        let wrong = create_guest_memory(32 << 20, MemoryBacking::Private).expect("memory");
        let (entries, fds) = migration::local::describe(&regions);
        let fds = fds
            .iter()
            .map(|f| f.try_clone_to_owned().expect("dup"))
            .collect();
        let shared = migration::local::adopt(&entries, fds).expect("adopt");
        assert!(matches!(
            overlay(&wrong, shared),
            Err(MemoryError::AdoptLayout { .. })
        ));
    }

    #[test]
    fn vmm_writes_are_tracked_in_the_bitmap() {
        let mem = create_guest_memory(64 << 20, MemoryBacking::Private).expect("mem");
        mem.write_obj(0xdead_beefu32, GuestAddress(0x5000))
            .expect("write");
        let r = mem.find_region(GuestAddress(0)).expect("region");
        assert!(r.bitmap().dirty_at(0x5000));
        assert!(!r.bitmap().dirty_at(0x6000));
    }
}

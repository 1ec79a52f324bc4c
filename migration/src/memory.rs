//! The view of guest RAM the migration code works on: page-aligned regions of host memory with
//! their guest-physical ranges.
//!
//! Guest memory is shared with running vCPUs, so this crate never forms Rust references to it:
//! it reads and writes through raw pointers (zero checks, `writev`, `read`), the same way KVM
//! and the kernel see it. A read that races with a guest write may see either value; the dirty
//! log (switched on before the first read) makes the page go out again in a later pass.

use std::any::Any;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::records::LayoutRegion;
use crate::wire::{PAGE_SIZE, PAGE_SIZE_U64};

/// Errors about guest memory regions and their host mappings.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "Region at guest address {guest_addr:#x} ({len:#x} bytes) is empty or not page-aligned"
    )]
    Misaligned { guest_addr: u64, len: u64 },
    #[error("Region at guest address {guest_addr:#x} wraps the address space")]
    Wraps { guest_addr: u64 },
    #[error("Mapping anonymous memory failed")]
    Mmap(#[source] io::Error),
    #[error("Discarding guest pages failed")]
    Madvise(#[source] io::Error),
}

/// How a region's host memory is backed; decides what "not present" means and how pages are
/// given back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// `MAP_PRIVATE | MAP_ANONYMOUS` (no hugetlbfs): a page the process never touched, or gave
    /// back with `MADV_DONTNEED`, reads as zero.
    PrivateAnonymous,
    /// Shared, file-backed or hugetlbfs memory: pages are always read, zeroed by writing.
    Other,
}

/// One page-aligned guest-physical RAM range and the host memory behind it.
///
/// Cloning is cheap; a region may hold a reference that keeps its mapping alive.
#[derive(Clone)]
pub struct RamRegion {
    guest_addr: u64,
    host: NonNull<u8>,
    len: usize,
    backing: Backing,
    /// The file holding the memory and the region's offset in it (shared memory: memfd,
    /// hugetlbfs), for local migration and for finding holes.
    file: Option<(Arc<File>, u64)>,
    _keep_alive: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: the region is a pointer to process-wide memory that may be accessed from any thread;
// every access goes through raw pointers and tolerates concurrent guest writes.
unsafe impl Send for RamRegion {}
// SAFETY: as above, shared access never creates Rust references to the memory.
unsafe impl Sync for RamRegion {}

impl std::fmt::Debug for RamRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamRegion")
            .field("guest_addr", &format_args!("{:#x}", self.guest_addr))
            .field("len", &format_args!("{:#x}", self.len))
            .field("host", &self.host)
            .field("backing", &self.backing)
            .field("file", &self.file.as_ref().map(|(f, o)| (f.as_raw_fd(), o)))
            .finish()
    }
}

impl RamRegion {
    /// A region over raw host memory.
    ///
    /// # Safety
    ///
    /// `host..host + len` must be one readable and writable mapping that stays mapped for as
    /// long as this region or any clone of it exists, and `backing` must describe it truthfully
    /// (a wrong `PrivateAnonymous` claim makes untouched-page detection and `MADV_DONTNEED`
    /// zeroing wrong). Only the guest and this crate may write it during a migration.
    pub unsafe fn from_raw(
        guest_addr: u64,
        host: *mut u8,
        len: usize,
        backing: Backing,
    ) -> Result<Self, MemoryError> {
        Self::checked(guest_addr, host, len, backing, None)
    }

    fn checked(
        guest_addr: u64,
        host: *mut u8,
        len: usize,
        backing: Backing,
        keep: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<Self, MemoryError> {
        let misaligned = MemoryError::Misaligned {
            guest_addr,
            len: len as u64,
        };
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) || !guest_addr.is_multiple_of(PAGE_SIZE_U64) {
            return Err(misaligned);
        }
        if !(host as usize).is_multiple_of(PAGE_SIZE) {
            return Err(misaligned);
        }
        if guest_addr.checked_add(len as u64).is_none() {
            return Err(MemoryError::Wraps { guest_addr });
        }
        let host = NonNull::new(host).ok_or(misaligned)?;
        Ok(RamRegion {
            guest_addr,
            host,
            len,
            backing,
            file: None,
            _keep_alive: keep,
        })
    }

    /// A region over a vm-memory mapping; the region keeps the mapping alive.
    pub fn from_mmap<B>(guest_addr: u64, mmap: Arc<MmapRegion<B>>) -> Result<Self, MemoryError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let flags = mmap.flags();
        let anonymous = mmap.file_offset().is_none()
            && flags & libc::MAP_ANONYMOUS != 0
            && flags & libc::MAP_PRIVATE != 0
            && flags & libc::MAP_HUGETLB == 0
            && mmap.is_hugetlbfs() != Some(true);
        let backing = if anonymous {
            Backing::PrivateAnonymous
        } else {
            Backing::Other
        };
        let (host, len) = (mmap.as_ptr(), mmap.size());
        let shared = flags & libc::MAP_SHARED != 0;
        let file = mmap
            .file_offset()
            .filter(|_| shared)
            .map(|fo| (fo.arc().clone(), fo.start()));
        let mut region = Self::checked(guest_addr, host, len, backing, Some(mmap))?;
        region.file = file;
        Ok(region)
    }

    /// A region over an [`AnonMapping`]; the region keeps the mapping alive.
    pub fn from_anon(guest_addr: u64, map: Arc<AnonMapping>) -> Result<Self, MemoryError> {
        let (host, len) = (map.ptr.as_ptr(), map.len);
        let file = map.file.clone();
        let backing = if file.is_some() {
            Backing::Other
        } else {
            Backing::PrivateAnonymous
        };
        let mut region = Self::checked(guest_addr, host, len, backing, Some(map))?;
        region.file = file;
        Ok(region)
    }

    /// The shared file holding this region's memory and the region's offset in it, if the
    /// memory is a shared mapping of a file (memfd, hugetlbfs).
    pub fn file(&self) -> Option<(&File, u64)> {
        self.file.as_ref().map(|(f, o)| (&**f, *o))
    }

    pub fn guest_addr(&self) -> u64 {
        self.guest_addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Host address of the first byte (for logging and pagemap look-ups).
    pub fn host_addr(&self) -> usize {
        self.host.as_ptr() as usize
    }

    /// The layout entry for this region.
    pub fn layout(&self) -> LayoutRegion {
        LayoutRegion {
            guest_addr: self.guest_addr,
            size: self.len as u64,
        }
    }

    /// Pointer to page `page`; `page + pages` must be within the region.
    pub(crate) fn page_ptr(&self, page: usize, pages: usize) -> *mut u8 {
        assert!(page
            .checked_add(pages)
            .is_some_and(|end| end <= self.pages()));
        // SAFETY: the offset is within the mapping, checked just above.
        unsafe { self.host.as_ptr().add(page * PAGE_SIZE) }
    }

    /// Allocates pages `page..page + pages` in one call (`MADV_POPULATE_WRITE`) before they
    /// are written, much cheaper than one fault per page. Only for private anonymous memory.
    /// False when it did not: not private anonymous, a kernel without the call (before 5.14),
    /// or an error (logged); callers then stop asking and let writes fault pages in.
    pub(crate) fn populate(&self, page: usize, pages: usize) -> bool {
        if self.backing != Backing::PrivateAnonymous {
            return false;
        }
        let ptr = self.page_ptr(page, pages);
        // SAFETY: the range is page-aligned and inside our private anonymous mapping;
        // populating allocates (zero-filled) pages and leaves any existing contents alone.
        let rc = unsafe { libc::madvise(ptr.cast(), pages * PAGE_SIZE, MADV_POPULATE_WRITE) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                log::debug!("Populating guest pages failed, faulting them instead: {e}");
            }
        }
        rc == 0
    }

    /// Makes pages `page..page + pages` read as zero without writing them where possible:
    /// `MADV_DONTNEED` for private anonymous memory (frees the pages), writing zeros otherwise.
    pub(crate) fn zero_pages(&self, page: usize, pages: usize) -> Result<(), MemoryError> {
        let ptr = self.page_ptr(page, pages);
        let len = pages * PAGE_SIZE;
        match self.backing {
            Backing::PrivateAnonymous => {
                // SAFETY: the range is page-aligned and inside our private anonymous mapping;
                // MADV_DONTNEED replaces it with zero-fill-on-demand pages, nothing else changes.
                let rc = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTNEED) };
                if rc != 0 {
                    return Err(MemoryError::Madvise(io::Error::last_os_error()));
                }
            }
            Backing::Other => {
                // SAFETY: the range is inside the writable mapping (checked by page_ptr).
                unsafe { std::ptr::write_bytes(ptr, 0, len) };
            }
        }
        Ok(())
    }
}

/// A new memfd of `len` bytes for guest memory, on huge pages if `hugetlb` (which needs huge
/// pages reserved: `/proc/sys/vm/nr_hugepages`). It is sealed against shrinking and growing, so
/// no process it is shared with can cut it short under another's mapping (a `SIGBUS`).
pub fn create_memfd(name: &str, len: u64, hugetlb: bool) -> io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if hugetlb {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked and owned.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is the new descriptor, ours alone.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our own descriptor with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// `madvise` advice (Linux 5.14) to fault pages in for writing, without writing them.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Asks for transparent huge pages behind guest RAM at `ptr..ptr + len` (as QEMU does): a
/// 2 MiB fault instead of 512 small ones, and 2 MiB mappings for the guest. Memory nobody
/// writes still costs nothing. Advice only: a kernel without THP ignores it.
pub fn advise_huge_pages(ptr: *mut u8, len: usize) {
    // SAFETY: advice on a range of our own mapping; it changes how pages are allocated, never
    // their contents, and fails harmlessly on a range that is not mapped.
    let rc = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        log::debug!(
            "madvise(MADV_HUGEPAGE) on guest RAM: {}",
            io::Error::last_os_error()
        );
    }
}

/// The regions of a vm-memory `GuestMemoryMmap`, in address order, each keeping its mapping
/// alive. This is how the vmm turns its guest memory into migration regions.
pub fn regions_from_guest_memory<B>(mem: &GuestMemoryMmap<B>) -> Result<Vec<RamRegion>, MemoryError>
where
    B: Bitmap + Send + Sync + 'static,
{
    let mut regions = mem
        .iter()
        .map(|r| RamRegion::from_mmap(r.start_addr().0, r.get_mmap()))
        .collect::<Result<Vec<_>, _>>()?;
    regions.sort_by_key(|r| r.guest_addr);
    Ok(regions)
}

/// The layout of a list of regions, as written to the stream.
pub fn layout_of(regions: &[RamRegion]) -> Vec<LayoutRegion> {
    regions.iter().map(RamRegion::layout).collect()
}

/// A private anonymous mapping (`MAP_NORESERVE`): guest RAM for tests, benchmarks and the fake
/// VM; the real vmm uses vm-memory's `GuestMemoryMmap`, which maps the same way.
pub struct AnonMapping {
    ptr: NonNull<u8>,
    len: usize,
    /// Inaccessible pages on each side (tests: a stray access faults).
    guard: usize,
    /// A shared mapping of this file at this offset (else private anonymous memory).
    file: Option<(Arc<File>, u64)>,
}

// SAFETY: the mapping is plain process memory; accesses go through raw pointers.
unsafe impl Send for AnonMapping {}
// SAFETY: as above.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    /// Maps `len` bytes (rounded up to a page) of fresh, untouched memory.
    pub fn new(len: usize) -> Result<Self, MemoryError> {
        Self::map(len, 0)
    }

    /// Like [`new`](Self::new), with an inaccessible page just before and just after the
    /// usable range, so any access outside it faults.
    pub fn new_guarded(len: usize) -> Result<Self, MemoryError> {
        Self::map(len, PAGE_SIZE)
    }

    /// Shared memory: a new sealed memfd of `len` bytes (rounded up to a page), mapped
    /// shared, as `run --mem-shared` backs guest RAM.
    pub fn new_shared(len: usize) -> Result<Self, MemoryError> {
        let len = len.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let file =
            create_memfd("minivmm-test-ram", len as u64, false).map_err(MemoryError::Mmap)?;
        Self::map_file(Arc::new(file), 0, len)
    }

    /// A shared mapping of `len` bytes of `file` at `offset` (the caller checked that the
    /// file is that long and cannot shrink).
    pub fn map_file(file: Arc<File>, offset: u64, len: usize) -> Result<Self, MemoryError> {
        // SAFETY: a new shared mapping at an address of the kernel's choosing; the result is
        // checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Mmap(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast()).ok_or(MemoryError::Mmap(io::Error::other("null")))?;
        Ok(AnonMapping {
            ptr,
            len,
            guard: 0,
            file: Some((file, offset)),
        })
    }

    fn map(len: usize, guard: usize) -> Result<Self, MemoryError> {
        let len = len.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let total = len + 2 * guard;
        // SAFETY: a new anonymous mapping at an address of the kernel's choosing; the result
        // is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Mmap(io::Error::last_os_error()));
        }
        let base: *mut u8 = ptr.cast();
        if guard > 0 {
            // SAFETY: both guard pages lie inside the mapping just created; PROT_NONE on them
            // changes nothing we hold references to.
            let rc = unsafe {
                libc::mprotect(base.cast(), guard, libc::PROT_NONE)
                    | libc::mprotect(base.add(guard + len).cast(), guard, libc::PROT_NONE)
            };
            if rc != 0 {
                let e = io::Error::last_os_error();
                // SAFETY: unmapping the mapping we just created and nobody else knows.
                unsafe { libc::munmap(ptr, total) };
                return Err(MemoryError::Mmap(e));
            }
        }
        // SAFETY: `guard` bytes into a mapping of `len + 2 * guard` bytes.
        let usable = unsafe { base.add(guard) };
        let ptr = NonNull::new(usable).ok_or(MemoryError::Mmap(io::Error::other("null")))?;
        Ok(AnonMapping {
            ptr,
            len,
            guard,
            file: None,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copies `data` into the mapping at `offset` (bounds-checked).
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset
            .checked_add(data.len())
            .is_some_and(|end| end <= self.len));
        // SAFETY: the range was bounds-checked above; raw copy, no reference to the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len())
        };
    }

    /// Copies `out.len()` bytes at `offset` out of the mapping (bounds-checked).
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset
            .checked_add(out.len())
            .is_some_and(|end| end <= self.len));
        // SAFETY: the range was bounds-checked above; raw copy out of the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), out.as_mut_ptr(), out.len())
        };
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping (guards included) and nobody else holds it (regions keep
        // an Arc to us).
        unsafe {
            libc::munmap(
                self.ptr.as_ptr().sub(self.guard).cast(),
                self.len + 2 * self.guard,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn regions_are_validated() {
        let map = Arc::new(AnonMapping::new(3 * PAGE_SIZE).unwrap());
        assert!(RamRegion::from_anon(0x1000, map.clone()).is_ok());
        assert!(matches!(
            RamRegion::from_anon(0x800, map.clone()),
            Err(MemoryError::Misaligned { .. })
        ));
        assert!(matches!(
            RamRegion::from_anon(u64::MAX - 0xfff, map),
            Err(MemoryError::Wraps { .. })
        ));
    }

    #[test]
    fn zero_pages_frees_private_anonymous_memory() {
        let map = Arc::new(AnonMapping::new(4 * PAGE_SIZE).unwrap());
        let region = RamRegion::from_anon(0, map.clone()).unwrap();
        map.write(PAGE_SIZE, &[0xaa; PAGE_SIZE * 2]);
        region.zero_pages(1, 1).unwrap();
        let mut page = vec![0u8; PAGE_SIZE * 2];
        map.read(PAGE_SIZE, &mut page);
        assert!(page[..PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(page[PAGE_SIZE..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn vm_memory_regions_are_private_anonymous() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x10_0000), 0x4000),
        ])
        .unwrap();
        let regions = regions_from_guest_memory(&mem).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].guest_addr(), 0);
        assert_eq!(regions[1].pages(), 4);
        assert_eq!(regions[1].backing(), Backing::PrivateAnonymous);
        drop(mem);
        // The regions keep the mappings alive after the GuestMemoryMmap is gone.
        regions[1].zero_pages(0, 4).unwrap();
    }
}

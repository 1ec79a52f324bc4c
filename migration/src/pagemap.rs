//! Never-touched pages found without reading them, from `/proc/self/pagemap`.
//!
//! Each 8-byte pagemap entry has bit 63 "present" and bit 62 "swapped" (both readable without
//! privileges) and, for root only, the page frame number in bits 0–54. In private anonymous
//! memory a page with neither bit set was never written (or was given back with
//! `MADV_DONTNEED`): it reads as zero, and reading it would only fault in the shared zero page.
//! A page that was read but never written is present and mapped to the kernel's shared zero
//! page; as root we learn that page's PFN once (read-fault a private page of our own, look up
//! its entry) and treat present pages with that PFN as zero too.
//!
//! Where the kernel has it (Linux 6.7), the `PAGEMAP_SCAN` ioctl answers with ranges of
//! touched pages instead: it skips whole page tables that do not exist, so a mostly untouched
//! 16 GiB guest is classified in microseconds rather than by reading 32 MiB of entries (it
//! reports the zero page as a category, no privileges needed). Otherwise entries are read
//! with one `pread` per [`BATCH_PAGES`] pages (512 KiB of entries for 256 MiB of guest
//! memory). Where pagemap cannot be opened or read, callers fall back to reading the pages.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use crate::wire::PAGE_SIZE;

/// Pages classified per `pread`.
pub const BATCH_PAGES: usize = 64 * 1024;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// What pagemap says about one page of private anonymous memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// Neither present nor swapped: never written, reads as zero.
    Untouched,
    /// Present and mapped to the shared zero page: reads as zero.
    ZeroPage,
    /// Present or swapped with content: must be read.
    Resident,
}

impl PageState {
    /// Zero without reading.
    pub fn is_known_zero(self) -> bool {
        self != PageState::Resident
    }
}

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// Ranges returned per ioctl.
const SCAN_REGIONS: usize = 4096;

/// `struct pm_scan_arg` (include/uapi/linux/fs.h).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`: pages `start..end` (addresses) share `categories`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// A reader of this process's pagemap.
pub struct Pagemap {
    file: File,
    entries: Vec<u64>,
    zero_pfn: Option<u64>,
    /// `PAGEMAP_SCAN` works here (off after the first refusal).
    scan: bool,
    regions: Vec<PageRegion>,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`; `None` if it cannot be opened (callers scan instead).
    pub fn open() -> Option<Pagemap> {
        match File::open("/proc/self/pagemap") {
            Ok(file) => Some(Pagemap {
                file,
                entries: Vec::new(),
                zero_pfn: zero_page_pfn(),
                scan: true,
                regions: Vec::new(),
            }),
            Err(e) => {
                log::debug!("pagemap unavailable, pages will be read: {e}");
                None
            }
        }
    }

    /// The shared zero page's PFN if it is visible (root), else `None`.
    pub fn zero_pfn(&self) -> Option<u64> {
        self.zero_pfn
    }

    /// Classifies `pages` pages starting at host address `addr` (page-aligned) into `out`
    /// (cleared first), reading at most [`BATCH_PAGES`] entries per `pread`.
    pub fn classify(
        &mut self,
        addr: usize,
        pages: usize,
        out: &mut Vec<PageState>,
    ) -> io::Result<()> {
        out.clear();
        if self.scan {
            match self.scan_ranges(addr, pages, out) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    log::debug!("PAGEMAP_SCAN unavailable, reading pagemap entries: {e}");
                    self.scan = false;
                    out.clear();
                }
            }
        }
        out.reserve(pages);
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(BATCH_PAGES);
            self.read_entries(addr + done * PAGE_SIZE, n)?;
            let zero_pfn = self.zero_pfn;
            out.extend(self.entries.iter().map(|&e| state_of(e, zero_pfn)));
            done += n;
        }
        Ok(())
    }

    /// The pages of `addr..addr + pages * PAGE_SIZE` that must be read (neither untouched nor
    /// the zero page), as runs `(first page, count)` relative to `addr`, in order, into `out`
    /// (cleared first). Every page outside them reads as zero. One `PAGEMAP_SCAN` walk where
    /// the kernel has it (no per-page work for untouched ranges), else pagemap entries.
    pub fn resident_runs(
        &mut self,
        addr: usize,
        pages: usize,
        out: &mut Vec<(usize, usize)>,
    ) -> io::Result<()> {
        out.clear();
        if self.scan {
            match self.scan_resident(addr, pages, out) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    log::debug!("PAGEMAP_SCAN unavailable, reading pagemap entries: {e}");
                    self.scan = false;
                    out.clear();
                }
            }
        }
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(BATCH_PAGES);
            self.read_entries(addr + done * PAGE_SIZE, n)?;
            let zero_pfn = self.zero_pfn;
            for (i, &e) in self.entries.iter().enumerate() {
                if state_of(e, zero_pfn).is_known_zero() {
                    continue;
                }
                match out.last_mut() {
                    Some((start, len)) if *start + *len == done + i => *len += 1,
                    _ => out.push((done + i, 1)),
                }
            }
            done += n;
        }
        Ok(())
    }

    /// [`resident_runs`](Self::resident_runs) with `PAGEMAP_SCAN`.
    fn scan_resident(
        &mut self,
        addr: usize,
        pages: usize,
        out: &mut Vec<(usize, usize)>,
    ) -> io::Result<()> {
        self.scan_regions(addr, pages, |from, to, state| {
            if state == PageState::Resident && from < to {
                out.push((from, to - from));
            }
        })?;
        // The union of the ranges, in order (they may repeat or come out of order).
        out.sort_unstable();
        let mut merged = 0;
        for i in 0..out.len() {
            let (start, len) = out[i];
            if merged > 0 && out[merged - 1].0 + out[merged - 1].1 >= start {
                let last = &mut out[merged - 1];
                last.1 = (start + len).max(last.0 + last.1) - last.0;
            } else {
                out[merged] = (start, len);
                merged += 1;
            }
        }
        out.truncate(merged);
        Ok(())
    }

    /// [`classify`](Self::classify) with `PAGEMAP_SCAN`: everything untouched but the ranges
    /// the kernel reports present or swapped.
    fn scan_ranges(
        &mut self,
        addr: usize,
        pages: usize,
        out: &mut Vec<PageState>,
    ) -> io::Result<()> {
        out.resize(pages, PageState::Untouched);
        self.scan_regions(addr, pages, |from, to, state| {
            for s in &mut out[from..to] {
                // A page reported twice keeps the state that needs reading, if either does.
                if *s != PageState::Resident {
                    *s = state;
                }
            }
        })
    }

    /// Calls `each(from, to, state)` (pages relative to `addr`, `to` capped at `pages`) for
    /// every range `PAGEMAP_SCAN` reports present or swapped. Ranges may repeat and come out of
    /// order: the kernel's `walk_end` can lie before ranges it already returned (seen with
    /// Linux 6.18), and the next call returns them again; callers keep the union.
    fn scan_regions(
        &mut self,
        addr: usize,
        pages: usize,
        mut each: impl FnMut(usize, usize, PageState),
    ) -> io::Result<()> {
        self.regions.resize(SCAN_REGIONS, PageRegion::default());
        let end = (addr + pages * PAGE_SIZE) as u64;
        let mut start = addr as u64;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                start,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO,
                ..Default::default()
            };
            // SAFETY: `arg` is a complete pm_scan_arg whose `vec` points at `vec_len` writable
            // page_region entries we own; the kernel writes only those and `arg` itself.
            let n = unsafe { libc::ioctl(self.file.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for r in &self.regions[..n as usize] {
                let from = (r.start as usize).saturating_sub(addr) / PAGE_SIZE;
                let to = ((r.end as usize).saturating_sub(addr) / PAGE_SIZE).min(pages);
                let state =
                    if r.categories & PAGE_IS_PFNZERO != 0 && r.categories & PAGE_IS_SWAPPED == 0 {
                        PageState::ZeroPage
                    } else {
                        PageState::Resident
                    };
                if from < to {
                    each(from, to, state);
                }
            }
            if arg.walk_end <= start {
                return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
            }
            start = arg.walk_end;
        }
        Ok(())
    }

    /// Reads `n` raw entries for the pages at `addr` into `self.entries`.
    fn read_entries(&mut self, addr: usize, n: usize) -> io::Result<()> {
        self.entries.clear();
        self.entries.resize(n, 0);
        let offset = (addr / PAGE_SIZE) as u64 * 8;
        // SAFETY: viewing the u64 vector as bytes for the read; u64 has no invalid bit patterns
        // and the byte length is exactly the vector's.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(self.entries.as_mut_ptr().cast::<u8>(), n * 8)
        };
        self.file.read_exact_at(bytes, offset)
    }
}

fn state_of(entry: u64, zero_pfn: Option<u64>) -> PageState {
    if entry & (PM_PRESENT | PM_SWAPPED) == 0 {
        PageState::Untouched
    } else if entry & PM_PRESENT != 0 && zero_pfn.is_some_and(|z| entry & PM_PFN_MASK == z) {
        PageState::ZeroPage
    } else {
        PageState::Resident
    }
}

/// The PFN of the kernel's shared zero page, learned once by read-faulting a private page.
pub fn zero_page_pfn() -> Option<u64> {
    static PFN: OnceLock<Option<u64>> = OnceLock::new();
    *PFN.get_or_init(|| {
        let pfn = probe_zero_pfn();
        log::debug!("shared zero page pfn: {pfn:?}");
        pfn
    })
}

fn probe_zero_pfn() -> Option<u64> {
    let map = crate::memory::AnonMapping::new(PAGE_SIZE).ok()?;
    // SAFETY: the page is ours and readable; a read fault maps the shared zero page.
    let byte = unsafe { map.as_ptr().read_volatile() };
    if byte != 0 {
        return None;
    }
    let file = File::open("/proc/self/pagemap").ok()?;
    let mut entry = [0u8; 8];
    let offset = (map.as_ptr() as usize / PAGE_SIZE) as u64 * 8;
    file.read_exact_at(&mut entry, offset).ok()?;
    let entry = u64::from_le_bytes(entry);
    let pfn = entry & PM_PFN_MASK;
    (entry & PM_PRESENT != 0 && pfn != 0).then_some(pfn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::AnonMapping;

    #[test]
    fn untouched_read_and_written_pages() {
        let Some(mut pm) = Pagemap::open() else {
            eprintln!("SKIP: untouched_read_and_written_pages: pagemap unavailable");
            return;
        };
        let map = AnonMapping::new(8 * PAGE_SIZE).unwrap();
        map.write(2 * PAGE_SIZE, &[1]); // written
        map.write(5 * PAGE_SIZE, &[0]); // written with zero: resident, must be read
        let mut byte = [0u8; 1];
        map.read(3 * PAGE_SIZE, &mut byte); // read fault only
        std::hint::black_box(byte);
        let mut states = Vec::new();
        pm.classify(map.as_ptr() as usize, 8, &mut states).unwrap();
        assert_eq!(states[0], PageState::Untouched);
        assert_eq!(states[2], PageState::Resident);
        assert_eq!(states[5], PageState::Resident);
        assert_eq!(states[7], PageState::Untouched);
        // A read-faulted page maps the zero page: recognised when the PFN is visible (root),
        // otherwise it is resident and gets read. Never "untouched".
        let expected = if pm.zero_pfn().is_some() {
            PageState::ZeroPage
        } else {
            PageState::Resident
        };
        assert_eq!(states[3], expected);
    }

    #[test]
    fn classifies_across_batches() {
        let Some(mut pm) = Pagemap::open() else {
            return;
        };
        let pages = BATCH_PAGES + 3;
        let map = AnonMapping::new(pages * PAGE_SIZE).unwrap();
        map.write((pages - 1) * PAGE_SIZE, &[9]);
        let mut states = Vec::new();
        pm.classify(map.as_ptr() as usize, pages, &mut states)
            .unwrap();
        assert_eq!(states.len(), pages);
        assert_eq!(states.iter().filter(|s| !s.is_known_zero()).count(), 1);
        assert_eq!(states[pages - 1], PageState::Resident);
    }

    #[test]
    fn scan_and_entries_agree() {
        let Some(mut pm) = Pagemap::open() else {
            return;
        };
        let pages = 3 * 512 + 7;
        let map = AnonMapping::new(pages * PAGE_SIZE).unwrap();
        for p in [0, 1, 2, 600, 1023, 1024, pages - 1] {
            map.write(p * PAGE_SIZE, &[p as u8 | 1]);
        }
        let mut byte = [0u8; 1];
        map.read(700 * PAGE_SIZE, &mut byte); // zero page
        std::hint::black_box(byte);
        map.write(900 * PAGE_SIZE, &[0]); // resident, zero content
        let mut scanned = Vec::new();
        pm.classify(map.as_ptr() as usize + PAGE_SIZE, pages - 1, &mut scanned)
            .unwrap();
        let used_scan = pm.scan;
        pm.scan = false;
        let mut read = Vec::new();
        pm.classify(map.as_ptr() as usize + PAGE_SIZE, pages - 1, &mut read)
            .unwrap();
        assert_eq!(scanned, read, "PAGEMAP_SCAN used: {used_scan}");
        // The same answer as runs, by both methods.
        let mut runs_read = Vec::new();
        pm.resident_runs(map.as_ptr() as usize + PAGE_SIZE, pages - 1, &mut runs_read)
            .unwrap();
        pm.scan = used_scan;
        let mut runs_scanned = Vec::new();
        pm.resident_runs(
            map.as_ptr() as usize + PAGE_SIZE,
            pages - 1,
            &mut runs_scanned,
        )
        .unwrap();
        assert_eq!(runs_scanned, runs_read);
        let mut expected: Vec<(usize, usize)> = Vec::new();
        for (i, s) in read.iter().enumerate() {
            if !s.is_known_zero() {
                match expected.last_mut() {
                    Some((start, len)) if *start + *len == i => *len += 1,
                    _ => expected.push((i, 1)),
                }
            }
        }
        assert_eq!(runs_read, expected);
        assert_eq!(read[0], PageState::Resident);
        assert_eq!(read[2], PageState::Untouched);
        assert_eq!(read[899], PageState::Resident);
    }

    /// Many scattered pages over 256 MiB: `PAGEMAP_SCAN` answers in several calls, and
    /// 6.18 may report a `walk_end` before ranges it already returned (they come again).
    #[test]
    fn scan_and_entries_agree_on_a_large_sparse_mapping() {
        let Some(mut pm) = Pagemap::open() else {
            return;
        };
        let pages = 65536;
        let map = AnonMapping::new(pages * PAGE_SIZE).unwrap();
        let mut x = 7u64;
        for _ in 0..1500 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            map.write(((x >> 33) as usize % pages) * PAGE_SIZE, &[1]);
        }
        let addr = map.as_ptr() as usize;
        let mut scanned = Vec::new();
        pm.resident_runs(addr, pages, &mut scanned).unwrap();
        let mut states = Vec::new();
        pm.classify(addr, pages, &mut states).unwrap();
        pm.scan = false;
        let mut read = Vec::new();
        pm.resident_runs(addr, pages, &mut read).unwrap();
        assert!(
            scanned == read,
            "PAGEMAP_SCAN gave {} runs ({} pages), the entries {} runs ({} pages)",
            scanned.len(),
            scanned.iter().map(|r| r.1).sum::<usize>(),
            read.len(),
            read.iter().map(|r| r.1).sum::<usize>()
        );
        let resident: usize = read.iter().map(|r| r.1).sum();
        assert_eq!(
            resident,
            states.iter().filter(|s| !s.is_known_zero()).count()
        );
        assert!(read.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
    }

    #[test]
    fn entry_decoding() {
        assert_eq!(state_of(0, Some(5)), PageState::Untouched);
        assert_eq!(state_of(PM_SWAPPED | 3, Some(3)), PageState::Resident);
        assert_eq!(state_of(PM_PRESENT | 5, Some(5)), PageState::ZeroPage);
        assert_eq!(state_of(PM_PRESENT | 5, None), PageState::Resident);
        assert_eq!(state_of(PM_PRESENT | 6, Some(5)), PageState::Resident);
    }
}

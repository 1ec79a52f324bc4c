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
//! Entries are read with one `pread` per [`BATCH_PAGES`] pages (512 KiB of entries for 256 MiB
//! of guest memory). Where pagemap cannot be opened or read, callers fall back to reading the
//! pages.

use std::fs::File;
use std::io;
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

/// A reader of this process's pagemap.
pub struct Pagemap {
    file: File,
    entries: Vec<u64>,
    zero_pfn: Option<u64>,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`; `None` if it cannot be opened (callers scan instead).
    pub fn open() -> Option<Pagemap> {
        match File::open("/proc/self/pagemap") {
            Ok(file) => Some(Pagemap {
                file,
                entries: Vec::new(),
                zero_pfn: zero_page_pfn(),
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
    fn entry_decoding() {
        assert_eq!(state_of(0, Some(5)), PageState::Untouched);
        assert_eq!(state_of(PM_SWAPPED | 3, Some(3)), PageState::Resident);
        assert_eq!(state_of(PM_PRESENT | 5, Some(5)), PageState::ZeroPage);
        assert_eq!(state_of(PM_PRESENT | 5, None), PageState::Resident);
        assert_eq!(state_of(PM_PRESENT | 6, Some(5)), PageState::Resident);
    }
}

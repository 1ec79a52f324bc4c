//! Pages known to read as zero without reading them, whatever backs guest memory: pagemap
//! for private anonymous memory (`pagemap.rs`), the file's holes for shared memory.
//!
//! A shared memfd's page that was never written is a hole in the file (`SEEK_HOLE` finds it,
//! `SEEK_DATA` skips it) and reads as zero; reading it through the mapping would allocate it
//! (shmem has no shared zero page), so a 16 GiB guest in a memfd would be filled just by
//! being looked at. Pagemap tells nothing here: it shows this process's page tables, not what
//! the file holds. hugetlbfs reports no holes (all data): its pages are read.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::memory::{Backing, RamRegion};
use crate::pagemap::{PageState, Pagemap};
use crate::wire::PAGE_SIZE;

/// Fills `out` with the state of pages `start..start + n` of `region` when something is known
/// without reading them; returns false (and leaves `out` alone) when nothing is: every page
/// must be read.
pub fn classify(
    pagemap: Option<&mut Pagemap>,
    region: &RamRegion,
    start: usize,
    n: usize,
    out: &mut Vec<PageState>,
) -> io::Result<bool> {
    if let Some((file, offset)) = region.file() {
        file_holes(file, offset + (start * PAGE_SIZE) as u64, n, out)?;
        return Ok(true);
    }
    match (region.backing(), pagemap) {
        (Backing::PrivateAnonymous, Some(pm)) => {
            pm.classify(region.host_addr() + start * PAGE_SIZE, n, out)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Pages `offset..offset + n pages` of `file`: holes are `Untouched`, data `Resident`.
pub fn file_holes(file: &File, offset: u64, n: usize, out: &mut Vec<PageState>) -> io::Result<()> {
    out.clear();
    out.resize(n, PageState::Resident);
    let end = offset + (n * PAGE_SIZE) as u64;
    let mut at = offset;
    while at < end {
        let data = match seek(file, at, libc::SEEK_DATA) {
            Ok(d) => d.min(end),
            // No data from here to the end of the file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) => return Err(e),
        };
        let (first, last) = (page_of(offset, at), page_of(offset, data));
        out[first..last].fill(PageState::Untouched);
        if data >= end {
            break;
        }
        at = match seek(file, data, libc::SEEK_HOLE) {
            Ok(h) => h.min(end),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) => return Err(e),
        };
        // A hole that starts inside a page leaves that page data.
        at = at.next_multiple_of(PAGE_SIZE as u64).min(end);
    }
    Ok(())
}

fn page_of(base: u64, at: u64) -> usize {
    ((at - base) / PAGE_SIZE as u64) as usize
}

fn seek(file: &File, at: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor we hold; no memory is involved. It moves the file offset
    // (shared with whoever holds the same open file), which nobody uses for I/O: guest
    // memory is reached through mappings, and each lseek returns its own result.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::memory::AnonMapping;

    #[test]
    fn memfd_holes_are_untouched_and_data_is_read() {
        let map = Arc::new(AnonMapping::new_shared(64 * PAGE_SIZE).unwrap());
        map.write(3 * PAGE_SIZE + 100, b"x");
        map.write(40 * PAGE_SIZE, &[0u8; 8]);
        let region = RamRegion::from_anon(0, map).unwrap();
        let mut out = Vec::new();
        assert!(classify(None, &region, 0, 64, &mut out).unwrap());
        let resident: Vec<usize> = (0..64).filter(|&i| out[i] == PageState::Resident).collect();
        // Written with zeros is still data: it is read (and found zero) like any page.
        assert_eq!(resident, [3, 40]);
        assert!(classify(None, &region, 40, 4, &mut out).unwrap());
        assert_eq!(out[0], PageState::Resident);
        assert!(out[1..].iter().all(|s| s.is_known_zero()));
    }

    #[test]
    fn private_memory_without_pagemap_is_unknown() {
        let map = Arc::new(AnonMapping::new(4 * PAGE_SIZE).unwrap());
        let region = RamRegion::from_anon(0, map).unwrap();
        let mut out = Vec::new();
        assert!(!classify(None, &region, 0, 4, &mut out).unwrap());
    }
}

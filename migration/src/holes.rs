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

/// Like [`classify`], as runs `(first page, count)` relative to `start` of the pages that
/// must be read, in order, into `out` (cleared first); false when nothing is known without
/// reading (every page must be read). No per-page work for untouched ranges.
pub fn resident_runs(
    pagemap: Option<&mut Pagemap>,
    region: &RamRegion,
    start: usize,
    n: usize,
    out: &mut Vec<(usize, usize)>,
) -> io::Result<bool> {
    out.clear();
    if let Some((file, offset)) = region.file() {
        file_data_runs(file, offset + (start * PAGE_SIZE) as u64, n, out)?;
        return Ok(true);
    }
    match (region.backing(), pagemap) {
        (Backing::PrivateAnonymous, Some(pm)) => {
            pm.resident_runs(region.host_addr() + start * PAGE_SIZE, n, out)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The pages of `offset..offset + n pages` of `file` that hold data, as runs relative to
/// `offset` (a page partly data is data), into `out`.
fn file_data_runs(
    file: &File,
    offset: u64,
    n: usize,
    out: &mut Vec<(usize, usize)>,
) -> io::Result<()> {
    let end = offset + (n * PAGE_SIZE) as u64;
    let mut at = offset;
    while at < end {
        let data = match seek(file, at, libc::SEEK_DATA) {
            Ok(d) => d,
            // No data from here to the end of the file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = match seek(file, data, libc::SEEK_HOLE) {
            Ok(h) => h.min(end),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) => return Err(e),
        };
        let first = page_of(offset, data);
        let last = page_of(offset, hole.next_multiple_of(PAGE_SIZE as u64).min(end));
        match out.last_mut() {
            Some((s, l)) if *s + *l >= first => *l = last.max(*s + *l) - *s,
            _ => out.push((first, last - first)),
        }
        at = last as u64 * PAGE_SIZE as u64 + offset;
    }
    Ok(())
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
    fn memfd_data_runs_agree_with_the_page_states() {
        let map = Arc::new(AnonMapping::new_shared(300 * PAGE_SIZE).unwrap());
        for p in [0, 1, 2, 7, 100, 101, 299] {
            map.write(p * PAGE_SIZE + 17, b"y");
        }
        let region = RamRegion::from_anon(0, map).unwrap();
        for (start, n) in [(0, 300), (1, 100), (50, 250), (7, 1), (8, 92)] {
            let mut states = Vec::new();
            assert!(classify(None, &region, start, n, &mut states).unwrap());
            let mut runs = Vec::new();
            assert!(resident_runs(None, &region, start, n, &mut runs).unwrap());
            let mut expected: Vec<(usize, usize)> = Vec::new();
            for (i, s) in states.iter().enumerate() {
                if !s.is_known_zero() {
                    match expected.last_mut() {
                        Some((f, l)) if *f + *l == i => *l += 1,
                        _ => expected.push((i, 1)),
                    }
                }
            }
            assert_eq!(runs, expected, "pages {start}+{n}");
        }
    }

    #[test]
    fn private_memory_without_pagemap_is_unknown() {
        let map = Arc::new(AnonMapping::new(4 * PAGE_SIZE).unwrap());
        let region = RamRegion::from_anon(0, map).unwrap();
        let mut out = Vec::new();
        assert!(!classify(None, &region, 0, 4, &mut out).unwrap());
    }
}

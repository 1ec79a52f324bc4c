//! The VMM's own writes into guest memory, kept for migration: vm-memory's `AtomicBitmap` (one
//! bit per 4 KiB page) plus one flag saying whether anything was written since the last fetch.
//! Fetching then costs nothing when nothing was written, the usual case (our devices do not
//! write guest memory), instead of reading and clearing the whole bitmap inside the downtime.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

use migration::PAGE_SIZE;

const PAGE_SIZE_NZ: NonZeroUsize = match NonZeroUsize::new(PAGE_SIZE) {
    Some(n) => n,
    None => panic!("page size is zero"),
};

/// Pages of one guest memory region the VMM wrote.
#[derive(Debug)]
pub struct WriteLog {
    bits: AtomicBitmap,
    /// Set after the bits of every write: a fetch that finds it clear may skip the bits.
    any: AtomicBool,
}

impl WriteLog {
    /// A log for a region of `byte_size` bytes.
    pub fn new(byte_size: usize) -> WriteLog {
        WriteLog {
            bits: AtomicBitmap::new(byte_size, PAGE_SIZE_NZ),
            any: AtomicBool::new(false),
        }
    }

    /// Forgets every write so far. Costs nothing when nothing was written since the last
    /// reset or take (the bits, one per page, are then clear already: for 16 GiB that is
    /// 512 KiB not written, and not faulted in on the first migration).
    pub fn reset(&self) {
        // A write whose bits are set but whose flag is not yet may keep its bits: it is
        // reported by the next take, which only sends a page once more.
        if self.any.swap(false, Ordering::AcqRel) {
            self.bits.reset();
        }
    }

    /// The pages written since the last call (bit `i` of word `w` is page `64 * w + i`) and
    /// clears them; `None` when nothing was written. A write racing with this call is
    /// returned by this call or by the next one.
    pub fn take(&self) -> Option<Vec<u64>> {
        self.any
            .swap(false, Ordering::AcqRel)
            .then(|| self.bits.get_and_reset())
    }
}

impl<'a> WithBitmapSlice<'a> for WriteLog {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for WriteLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        // The bits first: a fetch that sees the flag also sees them.
        self.bits.mark_dirty(offset, len);
        self.any.store(true, Ordering::Release);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.bits.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl Default for WriteLog {
    fn default() -> Self {
        WriteLog::new(0)
    }
}

impl NewBitmap for WriteLog {
    fn with_len(len: usize) -> Self {
        WriteLog::new(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_returns_writes_once_and_nothing_when_clean() {
        let log = WriteLog::new(64 * PAGE_SIZE);
        assert_eq!(log.take(), None);
        log.mark_dirty(3 * PAGE_SIZE + 10, 2 * PAGE_SIZE);
        let words = log.take().expect("written");
        assert_eq!(words[0], 0b111 << 3);
        assert!(!log.dirty_at(3 * PAGE_SIZE), "taking clears the bits");
        assert_eq!(log.take(), None);
    }

    #[test]
    fn slices_mark_the_whole_log() {
        let log = WriteLog::new(64 * PAGE_SIZE);
        log.slice_at(8 * PAGE_SIZE).mark_dirty(PAGE_SIZE, 1);
        assert!(log.dirty_at(9 * PAGE_SIZE));
        assert_eq!(log.take().map(|w| w[0]), Some(1 << 9));
        log.mark_dirty(0, 1);
        log.reset();
        assert_eq!(log.take(), None);
    }
}

//! Dirty-page tracking: the per-region [`DirtyBitmap`] (one bit per 4 KiB page, KVM's layout:
//! bit `i % 64` of word `i / 64`), the merge of KVM's log with the vmm's own write log, the run
//! iterator the sender walks. The [`crate::vm::DirtyLog`] trait (in `vm.rs`) fills it.

/// Errors merging dirty logs.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("Dirty log has {found} words, the region needs {expected}")]
    WordCount { expected: usize, found: usize },
}

/// One bit per page of a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyBitmap {
    /// An all-clear bitmap for `pages` pages.
    pub fn new(pages: usize) -> Self {
        DirtyBitmap {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The raw words (KVM layout).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn get(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    pub fn set(&mut self, page: usize) {
        assert!(
            page < self.pages,
            "page {page} beyond bitmap of {}",
            self.pages
        );
        self.words[page / 64] |= 1 << (page % 64);
    }

    /// Sets `start..start + len`.
    pub fn set_range(&mut self, start: usize, len: usize) {
        self.apply_range(start, len, true);
    }

    /// Clears `start..start + len`.
    pub fn clear_range(&mut self, start: usize, len: usize) {
        self.apply_range(start, len, false);
    }

    fn apply_range(&mut self, start: usize, len: usize, set: bool) {
        let end = start.checked_add(len).expect("range overflows");
        assert!(
            end <= self.pages,
            "range {start}+{len} beyond bitmap of {}",
            self.pages
        );
        let mut i = start;
        while i < end {
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            if set {
                self.words[i / 64] |= mask;
            } else {
                self.words[i / 64] &= !mask;
            }
            i += n;
        }
    }

    /// Whether any of pages `start..start + len` is set.
    pub fn any_in(&self, start: usize, len: usize) -> bool {
        self.next_set(start).is_some_and(|p| p < start + len)
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Clears words `from..to` (pages `64 * from..64 * to`).
    pub fn clear_words(&mut self, from: usize, to: usize) {
        self.words[from..to].fill(0);
    }

    /// Number of set bits.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_clear(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// ORs in a log in KVM layout (`KVM_GET_DIRTY_LOG` output, or the vmm's write log).
    /// Bits past the last page are ignored.
    pub fn merge_words(&mut self, words: &[u64]) -> Result<(), DirtyError> {
        if words.len() != self.words.len() {
            return Err(DirtyError::WordCount {
                expected: self.words.len(),
                found: words.len(),
            });
        }
        for (dst, src) in self.words.iter_mut().zip(words) {
            *dst |= src;
        }
        self.mask_tail();
        Ok(())
    }

    /// ORs in another bitmap of the same size.
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<(), DirtyError> {
        self.merge_words(&other.words)
    }

    fn mask_tail(&mut self) {
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    /// Runs of set bits as `(first_page, page_count)`, in order.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            map: self,
            next: 0,
            end: self.pages,
        }
    }

    /// Runs of set bits within pages `from..to`, cut at both ends.
    pub fn runs_in(&self, from: usize, to: usize) -> Runs<'_> {
        Runs {
            map: self,
            next: from,
            end: to.min(self.pages),
        }
    }

    /// First set bit at or after `from`.
    fn next_set(&self, from: usize) -> Option<usize> {
        let mut w = from / 64;
        if w >= self.words.len() {
            return None;
        }
        let mut word = self.words[w] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let i = w * 64 + word.trailing_zeros() as usize;
                return (i < self.pages).then_some(i);
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }

    /// First clear bit at or after `from` (or `pages`).
    fn next_clear(&self, from: usize) -> usize {
        let mut w = from / 64;
        if w >= self.words.len() {
            return self.pages;
        }
        let mut word = !self.words[w] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                return (w * 64 + word.trailing_zeros() as usize).min(self.pages);
            }
            w += 1;
            match self.words.get(w) {
                Some(x) => word = !x,
                None => return self.pages,
            }
        }
    }
}

/// Iterator over runs of set bits; see [`DirtyBitmap::runs`].
pub struct Runs<'a> {
    map: &'a DirtyBitmap,
    next: usize,
    end: usize,
}

impl Iterator for Runs<'_> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        if self.next >= self.end {
            return None;
        }
        let start = self.map.next_set(self.next).filter(|&s| s < self.end)?;
        let end = self.map.next_clear(start).min(self.end);
        self.next = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runs_merge_and_tail() {
        let mut b = DirtyBitmap::new(130);
        b.set(0);
        b.set_range(63, 3);
        b.set(129);
        assert_eq!(
            b.runs().collect::<Vec<_>>(),
            vec![(0, 1), (63, 3), (129, 1)]
        );
        assert_eq!(b.count(), 5);
        let mut kvm = vec![0u64; 3];
        kvm[1] = 1 << 10;
        kvm[2] = u64::MAX; // bits past page 129 must be dropped
        b.merge_words(&kvm).unwrap();
        assert!(b.get(74));
        assert_eq!(b.count(), 7);
        assert!(matches!(
            b.merge_words(&[0]),
            Err(DirtyError::WordCount {
                expected: 3,
                found: 1
            })
        ));
        assert_eq!(
            b.runs_in(64, 75).collect::<Vec<_>>(),
            vec![(64, 2), (74, 1)]
        );
        assert_eq!(b.runs_in(0, 1).collect::<Vec<_>>(), vec![(0, 1)]);
        assert_eq!(b.runs_in(1, 63).count(), 0);
        assert!(b.any_in(60, 4) && b.any_in(129, 1) && !b.any_in(1, 62) && !b.any_in(66, 8));
        b.clear_words(1, 2);
        assert_eq!(
            b.runs().collect::<Vec<_>>(),
            vec![(0, 1), (63, 1), (128, 2)]
        );
        b.clear_range(0, 130);
        assert!(b.is_clear());
    }

    proptest! {
        #[test]
        fn runs_cover_exactly_the_set_bits(bits in proptest::collection::vec(any::<bool>(), 1..300)) {
            let mut b = DirtyBitmap::new(bits.len());
            for (i, &s) in bits.iter().enumerate() {
                if s { b.set(i); }
            }
            let mut seen = vec![false; bits.len()];
            let mut last_end = None;
            for (start, len) in b.runs() {
                prop_assert!(len > 0);
                if let Some(e) = last_end { prop_assert!(start > e); }
                for s in &mut seen[start..start + len] { *s = true; }
                last_end = Some(start + len);
            }
            prop_assert_eq!(seen, bits);
        }
    }
}

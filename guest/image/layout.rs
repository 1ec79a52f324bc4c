//! Guest-physical layout: RAM from the memory map, the generation table, the working set
//! (which may span the 3-4 GiB MMIO hole), per-CPU slices and the never-touched remainder.
//!
//! Shared source (`no_std`), unit-tested on the host. Working-set pages are addressed by index
//! through the RAM ranges, never as one flat span.

/// Page size.
pub const PAGE: u64 = 4096;
/// The working set starts on this boundary (a host huge page).
pub const WS_ALIGN: u64 = 2 << 20;
/// Most ranges a [`Spans`] holds.
pub const MAX_RANGES: usize = 32;

/// `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub fn pages(&self) -> u64 {
        (self.end - self.start) / PAGE
    }
}

pub fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align).saturating_mul(align)
}

/// Sorted, disjoint, page-aligned ranges, addressed page by page.
#[derive(Debug, Clone, Copy)]
pub struct Spans {
    r: [Range; MAX_RANGES],
    n: usize,
    pages: u64,
}

impl Default for Spans {
    fn default() -> Self {
        Spans::new()
    }
}

impl Spans {
    pub const fn new() -> Spans {
        Spans {
            r: [Range { start: 0, end: 0 }; MAX_RANGES],
            n: 0,
            pages: 0,
        }
    }

    /// Adds `[start, start + len)` shrunk to whole pages, merging with what touches it.
    /// Returns false (and adds nothing) when the table is full.
    pub fn add(&mut self, start: u64, len: u64) -> bool {
        let s = align_up(start, PAGE);
        let e = start.saturating_add(len) / PAGE * PAGE;
        if e <= s {
            return true;
        }
        let mut new = Range { start: s, end: e };
        // Absorb every range that overlaps or touches the new one.
        let mut out = [Range::default(); MAX_RANGES];
        let mut m = 0;
        for r in &self.r[..self.n] {
            if r.end < new.start || r.start > new.end {
                out[m] = *r;
                m += 1;
            } else {
                new.start = new.start.min(r.start);
                new.end = new.end.max(r.end);
            }
        }
        if m == MAX_RANGES {
            return false;
        }
        let at = out[..m]
            .iter()
            .position(|r| r.start > new.start)
            .unwrap_or(m);
        out.copy_within(at..m, at + 1);
        out[at] = new;
        self.r = out;
        self.n = m + 1;
        self.pages = self.r[..self.n].iter().map(Range::pages).sum();
        true
    }

    pub fn ranges(&self) -> &[Range] {
        &self.r[..self.n]
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn bytes(&self) -> u64 {
        self.pages * PAGE
    }

    /// The end of the highest range (0 when empty).
    pub fn end(&self) -> u64 {
        self.ranges().last().map_or(0, |r| r.end)
    }

    /// Guest-physical address of page `idx` (`idx < pages()`).
    pub fn addr(&self, mut idx: u64) -> u64 {
        for r in self.ranges() {
            if idx < r.pages() {
                return r.start + idx * PAGE;
            }
            idx -= r.pages();
        }
        self.end()
    }

    /// Whether `[addr, addr + len)` lies inside one range.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let end = addr.saturating_add(len);
        self.ranges()
            .iter()
            .any(|r| r.start <= addr && end <= r.end)
    }

    /// The spans without `[start, end)`.
    pub fn without(&self, start: u64, end: u64) -> Spans {
        let mut out = Spans::new();
        for r in self.ranges() {
            // Removing a hole from a range may split it, so `out` can need one more slot;
            // then the upper part is dropped, which only shrinks the set.
            if r.end <= start || r.start >= end {
                out.add(r.start, r.end - r.start);
                continue;
            }
            if r.start < start {
                out.add(r.start, start - r.start);
            }
            if end < r.end {
                out.add(end, r.end - end);
            }
        }
        out
    }

    /// The lowest `max_bytes` (rounded down to pages) of the spans at or above `from`.
    pub fn carve(&self, from: u64, max_bytes: u64) -> Spans {
        let mut out = Spans::new();
        let mut left = max_bytes / PAGE;
        for r in self.ranges() {
            let s = r.start.max(align_up(from, PAGE));
            if s >= r.end || left == 0 {
                continue;
            }
            let take = ((r.end - s) / PAGE).min(left);
            // Fewer ranges than `self`, so this always fits.
            out.add(s, take * PAGE);
            left -= take;
        }
        out
    }
}

/// Page indices `[first, end)` of `pages` owned by `cpu` of `ncpus`.
pub fn slice(pages: u64, cpu: u64, ncpus: u64) -> (u64, u64) {
    let at = |c: u64| (u128::from(pages) * u128::from(c) / u128::from(ncpus.max(1))) as u64;
    (at(cpu), at(cpu + 1))
}

/// Where everything goes.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// One `u32` generation per working-set page.
    pub gen_table: u64,
    /// The working set.
    pub ws: Spans,
    /// The first `scrub_pages` pages of `ws` are zeroed after the fill.
    pub scrub_pages: u64,
    /// RAM above the working set that is never written.
    pub untouched: Spans,
    /// The working set is smaller than asked: RAM ran out.
    pub clamped: bool,
}

/// A layout that cannot be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutError {
    /// The generation table does not fit into the RAM range after the image.
    NoRoomForGenTable { at: u64, bytes: u64 },
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LayoutError::NoRoomForGenTable { at, bytes } => {
                write!(f, "no RAM for the {bytes}-byte generation table at {at:#x}")
            }
        }
    }
}

/// Lays out the generation table right after `free_from` (the end of the image and its page
/// tables) and the working set at the next 2 MiB boundary after it, in `ram`.
pub fn plan(ram: &Spans, free_from: u64, touch: u64, scrub: u64) -> Result<Layout, LayoutError> {
    let want = touch.div_ceil(PAGE);
    let gen_table = align_up(free_from, PAGE);
    let gen_bytes = align_up(want.saturating_mul(4), PAGE);
    if gen_bytes > 0 && !ram.contains(gen_table, gen_bytes) {
        return Err(LayoutError::NoRoomForGenTable {
            at: gen_table,
            bytes: gen_bytes,
        });
    }
    let ws_from = align_up(gen_table + gen_bytes, WS_ALIGN);
    let ws = ram.carve(ws_from, want.saturating_mul(PAGE));
    let untouched = ram.carve(ws.end().max(ws_from), u64::MAX);
    Ok(Layout {
        gen_table,
        ws,
        scrub_pages: scrub.div_ceil(PAGE).min(ws.pages()),
        untouched,
        clamped: ws.pages() < want,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;

    /// minivmm's map for a 16 GiB guest: low RAM, 1 MiB..3 GiB, 4 GiB..17 GiB.
    fn big() -> Spans {
        let mut s = Spans::new();
        assert!(s.add(4 * G, 13 * G));
        assert!(s.add(0, 0x9fc00));
        assert!(s.add(M, 3 * G - M));
        s
    }

    #[test]
    fn add_sorts_merges_and_trims_to_pages() {
        let s = big();
        let r = s.ranges();
        assert_eq!(r.len(), 3);
        assert_eq!(
            r[0],
            Range {
                start: 0,
                end: 0x9f000
            }
        );
        assert_eq!(
            r[1],
            Range {
                start: M,
                end: 3 * G
            }
        );
        assert_eq!(
            r[2],
            Range {
                start: 4 * G,
                end: 17 * G
            }
        );
        let mut t = s;
        assert!(t.add(3 * G, G));
        assert_eq!(
            t.ranges().len(),
            2,
            "a range bridging the hole merges both sides"
        );
        assert_eq!(t.pages(), (0x9f000 + 17 * G - M) / PAGE);
        assert!(t.add(5, 100), "a sub-page range adds nothing");
        assert_eq!(t.ranges().len(), 2);
    }

    #[test]
    fn add_refuses_when_full() {
        let mut s = Spans::new();
        for i in 0..MAX_RANGES as u64 {
            assert!(s.add(i * 2 * PAGE, PAGE));
        }
        assert!(!s.add(1 << 40, PAGE));
        assert_eq!(s.ranges().len(), MAX_RANGES);
    }

    #[test]
    fn addr_walks_across_the_hole() {
        let s = big().carve(3 * G - 2 * PAGE, 4 * PAGE);
        assert_eq!(s.pages(), 4);
        let a: [u64; 4] = core::array::from_fn(|i| s.addr(i as u64));
        assert_eq!(a, [3 * G - 2 * PAGE, 3 * G - PAGE, 4 * G, 4 * G + PAGE]);
    }

    #[test]
    fn plan_small_working_set() {
        let l = plan(&big(), 0x0034_5678, 64 * M, 16 * M).expect("plan");
        assert_eq!(l.gen_table, 0x0034_6000);
        assert_eq!(
            l.ws.ranges(),
            &[Range {
                start: 4 * M,
                end: 68 * M
            }]
        );
        assert_eq!(l.scrub_pages, 16 * M / PAGE);
        assert!(!l.clamped);
        assert_eq!(l.untouched.ranges()[0].start, 68 * M);
        assert_eq!(l.untouched.end(), 17 * G);
        assert_eq!(l.untouched.bytes(), 16 * G - 68 * M);
    }

    #[test]
    fn plan_spans_the_hole_and_clamps() {
        let l = plan(&big(), 2 * M, 4 * G, 0).expect("plan");
        assert_eq!(l.ws.ranges().len(), 2);
        assert_eq!(l.ws.pages(), 4 * G / PAGE);
        assert_eq!(l.ws.ranges()[1].start, 4 * G);
        let mut small = Spans::new();
        small.add(M, 63 * M);
        let l = plan(&small, 2 * M, 128 * M, 1 << 40).expect("plan");
        assert_eq!(
            l.ws.ranges(),
            &[Range {
                start: 4 * M,
                end: 64 * M
            }]
        );
        assert!(l.clamped);
        assert_eq!(l.scrub_pages, l.ws.pages());
        assert_eq!(l.untouched.pages(), 0);
    }

    #[test]
    fn plan_refuses_a_gen_table_outside_ram() {
        let mut small = Spans::new();
        small.add(M, 15 * M);
        let e = plan(&small, 15 * M, 8 << 30, 0).expect_err("too big");
        assert!(matches!(e, LayoutError::NoRoomForGenTable { .. }));
    }

    #[test]
    fn without_cuts_and_splits() {
        let s = big();
        let t = s.without(3 * G - 32 * M, 3 * G);
        assert_eq!(
            t.ranges()[1],
            Range {
                start: M,
                end: 3 * G - 32 * M
            }
        );
        assert_eq!(t.pages(), s.pages() - 32 * M / PAGE);
        let u = s.without(2 * M, 3 * M);
        assert_eq!(u.ranges().len(), 4);
        assert_eq!(
            u.ranges()[1],
            Range {
                start: M,
                end: 2 * M
            }
        );
        assert_eq!(
            u.ranges()[2],
            Range {
                start: 3 * M,
                end: 3 * G
            }
        );
        assert_eq!(s.without(0, 1 << 40).pages(), 0);
    }

    #[test]
    fn slices_cover_everything_once() {
        for n in 1..6 {
            let mut next = 0;
            for c in 0..n {
                let (a, b) = slice(1001, c, n);
                assert_eq!(a, next);
                next = b;
            }
            assert_eq!(next, 1001);
        }
    }
}

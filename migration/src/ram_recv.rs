//! The RAM side of the destination: applies `RamPages` batches to guest memory after checking
//! every run against the declared layout, and keeps the zero guarantee that zero-page
//! elision relies on.
//!
//! The receiver tracks, per page, whether the page may be non-zero (`maybe_nonzero`). At
//! creation it proves the memory zero (pagemap: untouched pages need no reading; the rest is
//! read) or marks everything as possibly non-zero. Data runs set bits, zero runs give the set
//! pages back (`MADV_DONTNEED`, nothing allocated) and clear them, [`RamReceiver::reset`]
//! clears all. The memory is *pristine* when no bit is set; only then is a pass that elides
//! zero pages accepted. This is the check QEMU 1.5 lacked.
//!
//! Each record's head (prefix, run table, page checksums) is checked against the header's
//! checksum before a byte of guest memory is written; each data page against its own
//! checksum as it lands. A page that fails it in a live pass is *torn* (the guest wrote it
//! while the source sent it, or the link garbled it): it is kept in the `torn` set until a
//! later record brings it intact or as zero, listed in every `PassDone` so the source sends
//! it again, and the stream is refused at `End` while any page is still torn. In the final
//! pass (guest paused at the source) a failing page is corruption: refused at once.

use crate::dirty::DirtyBitmap;
use crate::memory::{Backing, MemoryError, RamRegion};
use crate::pagemap::Pagemap;
use crate::populator::{Populator, Ticket};
use crate::records::{decode_batch_prefix, decode_run_table, PassBegin, TornRun};
use crate::stats::ReceiveStats;
use crate::stream::RecordReader;
use crate::wire::{
    RecordHeader, RecordKind, WireError, BATCH_PREFIX_LEN, PAGE_CRC_LEN, PAGE_SIZE, PAGE_SIZE_U64,
    PASS_FINAL, PASS_ZERO_ELIDED, RUN_DESC_LEN,
};
use crate::zero::is_zero_raw;

/// Errors applying RAM records. Offsets are stream offsets of the record.
#[derive(Debug, thiserror::Error)]
pub enum RamLoadError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(
        "Run {run} of the batch at offset {offset}: address {guest_addr:#x} is not page-aligned"
    )]
    Misaligned {
        offset: u64,
        run: usize,
        guest_addr: u64,
    },
    #[error("Run {run} of the batch at offset {offset} has no pages")]
    EmptyRun { offset: u64, run: usize },
    #[error("Run {run} of the batch at offset {offset}: {pages} pages at {guest_addr:#x} are outside guest memory")]
    OutOfRange {
        offset: u64,
        run: usize,
        guest_addr: u64,
        pages: u32,
    },
    #[error("Run {run} of the batch at offset {offset}: address {guest_addr:#x} overlaps or precedes the previous run")]
    Overlap {
        offset: u64,
        run: usize,
        guest_addr: u64,
    },
    #[error("Batch at offset {offset} announces {announced} data pages, its runs hold {found}")]
    DataPages {
        offset: u64,
        announced: usize,
        found: usize,
    },
    #[error("Pass at offset {offset} elides zero pages but destination memory is not pristine")]
    ElisionIntoDirtyMemory { offset: u64 },
    #[error("Zeroing guest pages failed")]
    Zero(#[source] MemoryError),
    #[error(
        "Page {guest_addr:#x} of the final-pass batch at offset {offset} fails its checksum \
         (the guest was paused: the stream is corrupt)"
    )]
    PageChecksum { offset: u64, guest_addr: u64 },
    #[error(
        "Run {run} of the batch at offset {offset}: page {guest_addr:#x} came already in this \
         pass (on another data connection)"
    )]
    TwiceInPass {
        offset: u64,
        run: usize,
        guest_addr: u64,
    },
    #[error(
        "{pages} pages torn in live passes never arrived intact again (the first at \
         {guest_addr:#x}): the stream is corrupt"
    )]
    TornLeft { pages: u64, guest_addr: u64 },
}

/// Applies RAM records to the destination's guest memory.
pub struct RamReceiver {
    regions: Vec<RamRegion>,
    maybe_nonzero: Vec<DirtyBitmap>,
    /// Pages whose last data failed its checksum in a live pass (module documentation).
    torn: Vec<DirtyBitmap>,
    /// Scratch: the checksums of the pages being read.
    page_crcs: Vec<u32>,
    stats: ReceiveStats,
    /// Allocate a data run's pages in one call before reading into them (off once the
    /// kernel says it cannot).
    populate: bool,
    /// Allocates fresh pages on a second thread ahead of the reader.
    populator: Populator,
    /// The final pass (few pages, inside the downtime): allocate in this thread, no hand-off.
    final_pass: bool,
    /// Pages that came in the live pass in progress over data connections: no page may come
    /// twice in one pass, so the connections' readers never write the same memory.
    claimed: Vec<DirtyBitmap>,
}

impl RamReceiver {
    /// A receiver for `regions` (sorted, non-overlapping: the layout already checked). The
    /// memory is inspected: all-zero memory starts pristine, anything else does not.
    pub fn new(regions: Vec<RamRegion>) -> Self {
        let zero = memory_is_zero(&regions);
        let maybe_nonzero = regions
            .iter()
            .map(|r| {
                let mut b = DirtyBitmap::new(r.pages());
                if !zero {
                    b.set_range(0, r.pages());
                }
                b
            })
            .collect();
        RamReceiver {
            populator: Populator::new(regions.clone()),
            torn: regions
                .iter()
                .map(|r| DirtyBitmap::new(r.pages()))
                .collect(),
            page_crcs: Vec::new(),
            regions,
            maybe_nonzero,
            stats: ReceiveStats::default(),
            populate: true,
            final_pass: false,
            claimed: Vec::new(),
        }
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Starts a live pass whose pages come over data connections (`connections.rs`): none
    /// claimed yet, and the allocating thread idle (the readers allocate their own runs).
    pub fn begin_data_pass(&mut self) {
        self.populator.drain();
        if self.claimed.is_empty() {
            self.claimed = self
                .regions
                .iter()
                .map(|r| DirtyBitmap::new(r.pages()))
                .collect();
        } else {
            for (map, r) in self.claimed.iter_mut().zip(&self.regions) {
                map.clear_range(0, r.pages());
            }
        }
    }

    /// All guest memory is zero and only this receiver wrote it since it was proven so.
    pub fn is_pristine(&self) -> bool {
        self.maybe_nonzero.iter().all(DirtyBitmap::is_clear)
    }

    /// Makes the memory pristine again: every page given back (`MADV_DONTNEED`; written with
    /// zeros for memory that is not private anonymous).
    pub fn reset(&mut self) -> Result<(), RamLoadError> {
        self.populator.drain();
        for (region, map) in self.regions.iter().zip(&mut self.maybe_nonzero) {
            match region.backing() {
                Backing::PrivateAnonymous => region
                    .zero_pages(0, region.pages())
                    .map_err(RamLoadError::Zero)?,
                Backing::Other => {
                    for (start, len) in map.runs() {
                        region.zero_pages(start, len).map_err(RamLoadError::Zero)?;
                    }
                }
            }
            map.clear();
        }
        self.torn.iter_mut().for_each(DirtyBitmap::clear);
        self.stats.reset = true;
        Ok(())
    }

    /// Statistics so far.
    pub fn stats(&self) -> &ReceiveStats {
        &self.stats
    }

    /// Starts a pass; refuses an eliding pass unless the memory is pristine. The final pass
    /// waits for every earlier page to be in place and then reads straight into guest memory.
    pub fn begin_pass(&mut self, pass: &PassBegin, offset: u64) -> Result<(), RamLoadError> {
        if pass.flags & PASS_ZERO_ELIDED != 0 && !self.is_pristine() {
            return Err(RamLoadError::ElisionIntoDirtyMemory { offset });
        }
        self.final_pass = pass.flags & PASS_FINAL != 0;
        if self.final_pass {
            self.populator.drain();
        }
        self.stats.passes = self.stats.passes.saturating_add(1);
        Ok(())
    }

    /// Counts a live pass acknowledged to the source.
    pub fn acknowledged(&mut self) {
        self.stats.passes_acknowledged = self.stats.passes_acknowledged.saturating_add(1);
    }

    /// Waits until the allocating thread is idle (before the state is restored).
    pub fn finish(&mut self) {
        self.populator.drain();
    }

    /// The pages held torn now, as runs in address order: at most `max` runs, and whether
    /// there were more.
    pub fn torn_runs(&self, max: usize) -> (Vec<TornRun>, bool) {
        let mut out = Vec::new();
        for (region, map) in self.regions.iter().zip(&self.torn) {
            for (page, pages) in map.runs() {
                let mut done = 0;
                while done < pages {
                    if out.len() == max {
                        return (out, true);
                    }
                    let n = (pages - done).min(u32::MAX as usize);
                    out.push(TornRun {
                        guest_addr: region.guest_addr() + (page + done) as u64 * PAGE_SIZE_U64,
                        pages: n as u32,
                    });
                    done += n;
                }
            }
        }
        (out, false)
    }

    /// Refuses the stream if any page is still torn (at `End`: every page must have arrived
    /// intact at least once after its last tear).
    pub fn check_none_torn(&self) -> Result<(), RamLoadError> {
        let pages: u64 = self.torn.iter().map(|m| m.count() as u64).sum();
        if pages == 0 {
            return Ok(());
        }
        let (first, _) = self.torn_runs(1);
        Err(RamLoadError::TornLeft {
            pages,
            guest_addr: first.first().map_or(0, |t| t.guest_addr),
        })
    }

    /// Reads the payload of the `RamPages` record `h` (at `offset`) and applies it. Nothing
    /// is written before the record's head (run table, page checksums) matched the header's
    /// checksum and the runs were validated; data is read straight into guest memory and each
    /// page checked against its checksum as it lands.
    pub fn load_batch(
        &mut self,
        reader: &mut RecordReader<'_>,
        h: &RecordHeader,
        offset: u64,
    ) -> Result<(), RamLoadError> {
        let head = read_head(reader, h, offset)?;
        let crcs = &head.crcs;
        let placed = self.place_runs(&head.runs, head.data_pages, offset)?;

        // Queue every fresh data run for allocation before reading the first one, so the
        // allocating thread runs ahead through the whole record. A page never written here
        // is not allocated yet; one already written needs nothing. (Runs do not overlap, so
        // no run of this batch changes whether another is fresh.)
        let tickets: Vec<(bool, Ticket)> = placed
            .iter()
            .map(|p| {
                let fresh = !p.zero && !self.maybe_nonzero[p.region].get(p.page);
                let ticket = if fresh && !self.final_pass {
                    self.populator.queue(p.region, p.page, p.pages)
                } else {
                    Ticket::NONE
                };
                (fresh, ticket)
            })
            .collect();

        let mut expected = page_checksums(crcs);
        let mut landed = std::mem::take(&mut self.page_crcs);
        for (p, &(fresh, ticket)) in placed.iter().zip(&tickets) {
            if p.zero {
                self.apply_zero_run(p)?;
                continue;
            }
            if fresh && ticket == Ticket::NONE {
                self.populate_now(p);
            }
            // Mark first: if the read fails half-way the pages are already possibly non-zero.
            self.maybe_nonzero[p.region].set_range(p.page, p.pages);
            let mut done = 0;
            while done < p.pages {
                let n = self.populator.ready(ticket, done, p.pages - done);
                let ptr = self.regions[p.region].page_ptr(p.page + done, n);
                // SAFETY: the run was checked to lie inside this region's live mapping
                // (page_ptr checks again), and the destination guest does not run while the
                // stream is loaded, so this is the only access to these bytes while the slice
                // lives (the allocating thread only allocates, never reads or writes).
                let dst = unsafe { std::slice::from_raw_parts_mut(ptr, n * PAGE_SIZE) };
                landed.clear();
                landed.resize(n, 0);
                reader.read_exact_with(dst, "page data", |at, piece| {
                    page_crcs_append(&mut landed, at, piece)
                })?;
                for (i, &got) in landed.iter().enumerate() {
                    let page = p.page + done + i;
                    // The head holds exactly one checksum per data page (length checked).
                    self.page_landed(p.region, page, Some(got) == expected.next(), offset)?;
                }
                done += n;
            }
            self.stats.pages_written += p.pages as u64;
        }
        self.page_crcs = landed;
        Ok(())
    }

    /// A zero run: its pages read as zero (written ones given back) and are torn no more.
    fn apply_zero_run(&mut self, p: &Placed) -> Result<(), RamLoadError> {
        self.stats.zero_pages += p.pages as u64;
        self.zero_run(p.region, p.page, p.pages)?;
        self.torn[p.region].clear_range(p.page, p.pages);
        Ok(())
    }

    /// Page `page` of region `r` landed from the record at `offset`, `intact` if it matched
    /// its checksum: then it is torn no more; otherwise it is torn in a live pass and fatal
    /// in the final one.
    fn page_landed(
        &mut self,
        r: usize,
        page: usize,
        intact: bool,
        offset: u64,
    ) -> Result<(), RamLoadError> {
        if intact {
            self.torn[r].clear_range(page, 1);
            return Ok(());
        }
        let guest_addr = self.regions[r].guest_addr() + page as u64 * PAGE_SIZE_U64;
        if self.final_pass {
            return Err(RamLoadError::PageChecksum { offset, guest_addr });
        }
        log::debug!("page {guest_addr:#x} torn in the record at offset {offset}");
        self.torn[r].set(page);
        self.stats.torn_pages += 1;
        Ok(())
    }

    /// Allocates a fresh run in one call in this thread (rather than fault page by page
    /// inside the read), while the kernel allows it.
    fn populate_now(&mut self, p: &Placed) {
        if self.populate {
            self.populate = self.regions[p.region].populate(p.page, p.pages);
        }
    }

    /// Checks every run against the layout and the previous run; returns them placed.
    fn place_runs(
        &self,
        runs: &[crate::records::RunDesc],
        data_pages: usize,
        offset: u64,
    ) -> Result<Vec<Placed>, RamLoadError> {
        let mut placed = Vec::with_capacity(runs.len());
        let mut prev_end: Option<u64> = None;
        let mut found_data = 0usize;
        for (i, run) in runs.iter().enumerate() {
            let gpa = run.guest_addr;
            if !gpa.is_multiple_of(PAGE_SIZE_U64) {
                return Err(RamLoadError::Misaligned {
                    offset,
                    run: i,
                    guest_addr: gpa,
                });
            }
            if run.pages == 0 {
                return Err(RamLoadError::EmptyRun { offset, run: i });
            }
            let out_of_range = || RamLoadError::OutOfRange {
                offset,
                run: i,
                guest_addr: gpa,
                pages: run.pages,
            };
            let end = (run.pages as u64)
                .checked_mul(PAGE_SIZE_U64)
                .and_then(|len| gpa.checked_add(len))
                .ok_or_else(out_of_range)?;
            if prev_end.is_some_and(|p| gpa < p) {
                return Err(RamLoadError::Overlap {
                    offset,
                    run: i,
                    guest_addr: gpa,
                });
            }
            let region = self
                .regions
                .iter()
                .position(|r| gpa >= r.guest_addr() && end <= r.guest_addr() + r.len() as u64)
                .ok_or_else(out_of_range)?;
            if !run.zero {
                found_data += run.pages as usize;
            }
            prev_end = Some(end);
            placed.push(Placed {
                region,
                page: ((gpa - self.regions[region].guest_addr()) / PAGE_SIZE_U64) as usize,
                pages: run.pages as usize,
                zero: run.zero,
            });
        }
        if found_data != data_pages {
            return Err(RamLoadError::DataPages {
                offset,
                announced: data_pages,
                found: found_data,
            });
        }
        Ok(placed)
    }

    /// Makes a zero run read as zero: pages never written are left alone (no allocation),
    /// written ones are given back.
    fn zero_run(&mut self, r: usize, page: usize, pages: usize) -> Result<(), RamLoadError> {
        let region = &self.regions[r];
        let map = &mut self.maybe_nonzero[r];
        let mut dirty = Vec::new();
        let mut i = page;
        while i < page + pages {
            if map.get(i) {
                let start = i;
                while i < page + pages && map.get(i) {
                    i += 1;
                }
                dirty.push((start, i - start));
            } else {
                i += 1;
            }
        }
        if !dirty.is_empty() {
            // A queued allocation must not bring a page back after it was given back.
            self.populator.drain();
        }
        for (start, len) in dirty {
            region.zero_pages(start, len).map_err(RamLoadError::Zero)?;
            map.clear_range(start, len);
            self.stats.zero_pages_freed += len as u64;
        }
        Ok(())
    }
}

/// A `RamPages` record's head: its runs, data page count and the page checksums (the bytes
/// of the checksum table).
struct Head {
    runs: Vec<crate::records::RunDesc>,
    data_pages: usize,
    crcs: Vec<u8>,
}

/// Reads the head of the `RamPages` record `h` (at `offset`): prefix, run table and page
/// checksums, checked against the header's checksum before anything in it is trusted.
fn read_head(
    reader: &mut RecordReader<'_>,
    h: &RecordHeader,
    offset: u64,
) -> Result<Head, RamLoadError> {
    let mut prefix = [0u8; BATCH_PREFIX_LEN];
    reader.read_exact(&mut prefix, "batch prefix")?;
    let (run_count, data_pages) = decode_batch_prefix(&prefix, h.len, offset)?;
    let table_len = run_count * RUN_DESC_LEN;
    let mut head = vec![0u8; table_len + data_pages * PAGE_CRC_LEN];
    reader.read_exact(&mut head, "run table")?;
    if crc32c::crc32c_append(crc32c::crc32c(&prefix), &head) != h.payload_crc {
        return Err(WireError::PayloadChecksum {
            offset,
            kind: RecordKind::RamPages,
        }
        .into());
    }
    let crcs = head.split_off(table_len);
    let runs = decode_run_table(&head, offset)?;
    Ok(Head {
        runs,
        data_pages,
        crcs,
    })
}

/// [`RamReceiver::load_batch`] for a data connection's reader (`connections.rs`), several at
/// once: the head is read and checked and the guest memory written without the lock; the
/// lock is held to place and claim the runs (a page claimed twice in one pass is refused
/// before any byte of it is written: no two readers ever write the same page) and to record
/// what landed. Each reader allocates its own fresh runs.
pub fn load_batch_shared(
    rx: &std::sync::Mutex<&mut RamReceiver>,
    regions: &[RamRegion],
    reader: &mut RecordReader<'_>,
    h: &RecordHeader,
    offset: u64,
) -> Result<(), RamLoadError> {
    let head = read_head(reader, h, offset)?;
    let (runs, data_pages, crcs) = (&head.runs, head.data_pages, &head.crcs);

    // Under the lock: place, claim, zero runs, mark data runs possibly non-zero.
    let (data, populate) = {
        let mut g = crate::sync::lock(rx);
        let placed = g.place_runs(runs, data_pages, offset)?;
        for (i, p) in placed.iter().enumerate() {
            if g.claimed[p.region].any_in(p.page, p.pages) {
                return Err(RamLoadError::TwiceInPass {
                    offset,
                    run: i,
                    guest_addr: runs[i].guest_addr,
                });
            }
        }
        let mut data = Vec::new();
        for p in placed {
            g.claimed[p.region].set_range(p.page, p.pages);
            if p.zero {
                g.apply_zero_run(&p)?;
                continue;
            }
            let fresh = !g.maybe_nonzero[p.region].get(p.page);
            g.maybe_nonzero[p.region].set_range(p.page, p.pages);
            data.push((p, fresh));
        }
        (data, g.populate)
    };

    // Without the lock: this reader's pages are claimed by it alone in this pass.
    let mut populate_ok = true;
    let mut landed = Vec::with_capacity(data_pages);
    for (p, fresh) in &data {
        let region = &regions[p.region];
        if *fresh && populate && populate_ok {
            populate_ok = region.populate(p.page, p.pages);
        }
        let ptr = region.page_ptr(p.page, p.pages);
        // SAFETY: the run lies inside this region's live mapping (placed against the layout;
        // page_ptr checks again), which outlives the receive; its pages were claimed by this
        // reader alone for this pass (claims are checked and set under the lock, a page
        // claimed twice is refused above), no other thread writes guest memory during a
        // pass over data connections, and the destination guest does not run: this slice is
        // the only access to these bytes while it lives.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr, p.pages * PAGE_SIZE) };
        let first = landed.len();
        landed.resize(first + p.pages, 0);
        reader.read_exact_with(dst, "page data", |at, piece| {
            page_crcs_append(&mut landed[first..], at, piece)
        })?;
    }

    // Under the lock: what landed torn, and the figures.
    let mut g = crate::sync::lock(rx);
    if !populate_ok {
        g.populate = false;
    }
    let mut expected = page_checksums(crcs);
    let mut got = landed.iter();
    for (p, _) in &data {
        for page in p.page..p.page + p.pages {
            // One checksum per data page each side (lengths checked).
            let intact = got.next() == expected.next().as_ref();
            g.page_landed(p.region, page, intact, offset)?;
        }
        g.stats.pages_written += p.pages as u64;
    }
    Ok(())
}

/// The page checksums of a record's head, in order.
fn page_checksums(crcs: &[u8]) -> impl Iterator<Item = u32> + '_ {
    crcs.chunks_exact(PAGE_CRC_LEN)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Extends the per-page checksums `crcs` (page `i` = bytes `i * PAGE_SIZE..`) with `piece`,
/// which landed at byte `at`.
fn page_crcs_append(crcs: &mut [u32], mut at: usize, mut piece: &[u8]) {
    while !piece.is_empty() {
        let page = at / PAGE_SIZE;
        let take = (PAGE_SIZE - at % PAGE_SIZE).min(piece.len());
        crcs[page] = crc32c::crc32c_append(crcs[page], &piece[..take]);
        at += take;
        piece = &piece[take..];
    }
}

struct Placed {
    region: usize,
    page: usize,
    pages: usize,
    zero: bool,
}

/// True if every byte of every region is zero: pagemap says which private anonymous pages
/// were never touched (no reading needed), the rest is read.
pub fn memory_is_zero(regions: &[RamRegion]) -> bool {
    let mut pagemap = Pagemap::open();
    let mut states = Vec::new();
    for region in regions {
        let pages = region.pages();
        let mut start = 0;
        while start < pages {
            let n = (pages - start).min(crate::pagemap::BATCH_PAGES);
            let classified = region.backing() == Backing::PrivateAnonymous
                && pagemap.as_mut().is_some_and(|pm| {
                    pm.classify(region.host_addr() + start * PAGE_SIZE, n, &mut states)
                        .is_ok()
                });
            for i in 0..n {
                if classified && states.get(i).is_some_and(|s| s.is_known_zero()) {
                    continue;
                }
                let ptr = region.page_ptr(start + i, 1);
                // SAFETY: one page inside the region's live mapping.
                if !unsafe { is_zero_raw(ptr, PAGE_SIZE) } {
                    return false;
                }
            }
            start += n;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::AnonMapping;
    use crate::records::{encode_ram_pages, RunDesc};
    use crate::transport::Connection;
    use std::sync::Arc;

    fn setup(pages: usize) -> (Arc<AnonMapping>, RamReceiver) {
        let map = Arc::new(AnonMapping::new(pages * PAGE_SIZE).unwrap());
        let region = RamRegion::from_anon(0x10_0000, map.clone()).unwrap();
        (map, RamReceiver::new(vec![region]))
    }

    /// A RamPages record (header included) for `runs` with data byte `fill`.
    fn batch(runs: &[RunDesc], fill: u8) -> Vec<u8> {
        let data_pages: u32 = runs.iter().filter(|r| !r.zero).map(|r| r.pages).sum();
        let (payload, crc) = encode_ram_pages(runs, &vec![fill; data_pages as usize * PAGE_SIZE]);
        let h = RecordHeader {
            kind: RecordKind::RamPages,
            len: payload.len() as u32,
            payload_crc: crc,
        };
        let mut out = h.encode().to_vec();
        out.extend_from_slice(&payload);
        out
    }

    fn apply(rx: &mut RamReceiver, bytes: Vec<u8>) -> Result<(), RamLoadError> {
        let mut c = Connection::from_bytes(bytes);
        let mut reader = RecordReader::new(&mut c);
        let (h, off) = reader.next_header()?;
        rx.load_batch(&mut reader, &h, off)?;
        rx.finish();
        Ok(())
    }

    fn run(guest_addr: u64, pages: u32, zero: bool) -> RunDesc {
        RunDesc {
            guest_addr,
            pages,
            zero,
        }
    }

    #[test]
    fn fresh_memory_is_pristine_and_data_makes_it_dirty() {
        let (map, mut rx) = setup(8);
        assert!(rx.is_pristine());
        apply(
            &mut rx,
            batch(&[run(0x10_1000, 2, false), run(0x10_5000, 1, true)], 0xab),
        )
        .unwrap();
        assert!(!rx.is_pristine());
        let mut b = [0u8; 1];
        map.read(PAGE_SIZE, &mut b);
        assert_eq!(b[0], 0xab);
        assert_eq!(
            rx.stats().zero_pages_freed,
            0,
            "zero run on pristine pages frees nothing"
        );
        // Zeroing the written pages makes the memory pristine again.
        apply(&mut rx, batch(&[run(0x10_1000, 2, true)], 0)).unwrap();
        assert!(rx.is_pristine());
        assert_eq!(rx.stats().zero_pages_freed, 2);
        map.read(PAGE_SIZE, &mut b);
        assert_eq!(b[0], 0);
    }

    #[test]
    fn pages_zeroed_right_after_their_data_stay_given_back() {
        // Data into 300 fresh pages (allocated by the second thread), then a zero run over
        // them in the next record, with no drain in between: the allocation must not bring
        // them back after they were given back. (The reader waits for each chunk it reads,
        // and zero_run drains first as well; this pins the outcome, not the mechanism.)
        let (map, mut rx) = setup(600);
        let mut bytes = batch(&[run(0x10_0000, 300, false)], 0x5a);
        bytes.extend(batch(&[run(0x10_0000, 300, true)], 0));
        let mut c = Connection::from_bytes(bytes);
        let mut reader = RecordReader::new(&mut c);
        for _ in 0..2 {
            let (h, off) = reader.next_header().unwrap();
            rx.load_batch(&mut reader, &h, off).unwrap();
        }
        rx.finish();
        assert!(rx.is_pristine());
        assert_eq!(rx.stats().zero_pages_freed, 300);
        let mut pm = Pagemap::open().expect("pagemap");
        let mut states = Vec::new();
        pm.classify(map.as_ptr() as usize, 600, &mut states)
            .unwrap();
        assert!(
            states.iter().all(|s| s.is_known_zero()),
            "no page is resident after the zero run"
        );
    }

    #[test]
    fn written_memory_is_not_pristine_until_reset() {
        let map = Arc::new(AnonMapping::new(4 * PAGE_SIZE).unwrap());
        map.write(3 * PAGE_SIZE + 9, &[1]); // "firmware" loaded by the destination itself
        let region = RamRegion::from_anon(0, map.clone()).unwrap();
        let mut rx = RamReceiver::new(vec![region]);
        assert!(!rx.is_pristine());
        let elided = PassBegin {
            pass: 0,
            flags: PASS_ZERO_ELIDED,
        };
        assert!(matches!(
            rx.begin_pass(&elided, 40),
            Err(RamLoadError::ElisionIntoDirtyMemory { offset: 40 })
        ));
        rx.reset().unwrap();
        assert!(rx.is_pristine());
        assert!(memory_is_zero(rx.regions.as_slice()));
        rx.begin_pass(&elided, 40).unwrap();
    }

    #[test]
    fn bad_runs_are_refused_before_any_write() {
        let (map, mut rx) = setup(8);
        let cases: Vec<(Vec<RunDesc>, &str)> = vec![
            (vec![run(0x10_0800, 1, false)], "not page-aligned"),
            (vec![run(0x10_0000, 0, true)], "no pages"),
            (vec![run(0x10_7000, 2, false)], "outside guest memory"),
            (vec![run(0x0, 1, true)], "outside guest memory"),
            (vec![run(u64::MAX - 0xfff, 2, true)], "outside guest memory"),
            (
                vec![run(0x10_2000, 2, false), run(0x10_3000, 1, true)],
                "overlaps",
            ),
            (
                vec![run(0x10_4000, 1, true), run(0x10_0000, 1, false)],
                "overlaps",
            ),
        ];
        for (runs, what) in cases {
            let err = apply(&mut rx, batch(&runs, 0xcd)).unwrap_err();
            assert!(err.to_string().contains(what), "{err} should say {what}");
            assert!(err.to_string().contains("offset 0"), "{err}");
        }
        assert!(rx.is_pristine());
        assert!(memory_is_zero(&[RamRegion::from_anon(0, map).unwrap()]));
    }

    #[test]
    fn a_corrupt_head_is_refused_before_any_write() {
        let (map, mut rx) = setup(8);
        let good = batch(&[run(0x10_1000, 2, false)], 7);
        // Every byte of the head (prefix, run table, page checksums) after the header.
        let head_len = BATCH_PREFIX_LEN + RUN_DESC_LEN + 2 * PAGE_CRC_LEN;
        for i in 0..head_len {
            let mut bytes = good.clone();
            bytes[crate::wire::RECORD_HEADER_LEN + i] ^= 0x10;
            assert!(apply(&mut rx, bytes).is_err(), "byte {i} of the head");
        }
        assert!(rx.is_pristine(), "nothing written");
        assert!(memory_is_zero(&[RamRegion::from_anon(0, map).unwrap()]));
    }

    #[test]
    fn a_torn_page_is_kept_until_it_arrives_intact() {
        let (map, mut rx) = setup(4);
        let mut bytes = batch(&[run(0x10_0000, 2, false)], 7);
        let last = bytes.len() - 1;
        bytes[last] ^= 1; // the second page
        apply(&mut rx, bytes).unwrap();
        assert!(
            !rx.is_pristine(),
            "pages written before the check stay tracked"
        );
        assert_eq!(rx.stats().torn_pages, 1);
        let (torn, more) = rx.torn_runs(8);
        assert_eq!(
            torn,
            vec![TornRun {
                guest_addr: 0x10_1000,
                pages: 1
            }]
        );
        assert!(!more);
        let err = rx.check_none_torn().unwrap_err();
        assert!(
            matches!(
                err,
                RamLoadError::TornLeft {
                    pages: 1,
                    guest_addr: 0x10_1000
                }
            ),
            "{err}"
        );
        // Sent again intact: no longer torn.
        apply(&mut rx, batch(&[run(0x10_1000, 1, false)], 9)).unwrap();
        rx.check_none_torn().unwrap();
        let mut b = [0u8; 1];
        map.read(PAGE_SIZE + 5, &mut b);
        assert_eq!(b[0], 9);
        // Torn again, then zeroed: a zero run settles it too.
        let mut bytes = batch(&[run(0x10_2000, 1, false)], 3);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
        apply(&mut rx, bytes).unwrap();
        assert_eq!(rx.torn_runs(8).0.len(), 1);
        apply(&mut rx, batch(&[run(0x10_2000, 1, true)], 0)).unwrap();
        rx.check_none_torn().unwrap();
    }

    #[test]
    fn a_failing_page_in_the_final_pass_is_fatal() {
        let (_map, mut rx) = setup(4);
        let final_pass = PassBegin {
            pass: 1,
            flags: PASS_FINAL,
        };
        rx.begin_pass(&final_pass, 0).unwrap();
        let mut bytes = batch(&[run(0x10_0000, 1, false)], 7);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let err = apply(&mut rx, bytes).unwrap_err();
        assert!(
            matches!(
                err,
                RamLoadError::PageChecksum {
                    guest_addr: 0x10_0000,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(rx.stats().torn_pages, 0);
    }

    #[test]
    fn torn_runs_are_capped() {
        let (_map, mut rx) = setup(16);
        // Every other page torn: 8 runs.
        let runs: Vec<RunDesc> = (0..8)
            .map(|i| run(0x10_0000 + i * 0x2000, 1, false))
            .collect();
        let mut bytes = batch(&runs, 1);
        let header_and_head =
            crate::wire::RECORD_HEADER_LEN + BATCH_PREFIX_LEN + 8 * RUN_DESC_LEN + 8 * PAGE_CRC_LEN;
        for i in 0..8 {
            bytes[header_and_head + i * PAGE_SIZE] ^= 2;
        }
        apply(&mut rx, bytes).unwrap();
        let (torn, more) = rx.torn_runs(3);
        assert_eq!(torn.len(), 3);
        assert!(more);
        assert_eq!(rx.torn_runs(8), (rx.torn_runs(8).0, false));
        assert_eq!(rx.torn_runs(8).0.len(), 8);
    }
}

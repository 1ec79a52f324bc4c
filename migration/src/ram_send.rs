//! The RAM side of the source: the bulk pass over every page and the passes over the dirty
//! bitmap, batched into `RamPages` records.
//!
//! Invariant that makes the result correct: the dirty log is on before the first byte is
//! read, and each page's fate (data, zero record, elided) is decided from one reading of the
//! page, whose bytes are what is sent. A write after that reading is in the dirty log and the
//! page goes out again in a later pass, the final one with the guest paused.
//!
//! While the guest runs, data pages are copied into a staging buffer at the moment they are
//! found non-zero, so the record checksum describes exactly the bytes sent. With the guest
//! paused (final pass), runs are written straight from guest memory with one vectored write
//! per batch.

use std::io;
use std::time::{Duration, Instant};

use crate::cancel::{Cancel, DeadlineReached};
use crate::dirty::DirtyBitmap;
use crate::fault::{FaultPoint, Faults};
use crate::holes;
use crate::memory::{Backing, RamRegion};
use crate::pagemap::{PageState, Pagemap, BATCH_PAGES};
use crate::records::{encode_batch_prefix, PassBegin, RunDesc};
use crate::stats::{PassKind, PassStats};
use crate::stream::RecordWriter;
use crate::wire::{
    RecordKind, MAX_BATCH_DATA_PAGES, MAX_BATCH_RUNS, PAGE_SIZE, PAGE_SIZE_U64, PASS_FINAL,
    PASS_ZERO_ELIDED,
};
use crate::zero::is_zero_raw;

/// RAM sender tuning.
#[derive(Clone, Copy, Debug)]
pub struct RamSendConfig {
    /// Most data pages per record (1..=1024).
    pub batch_pages: usize,
    /// Most stream bytes per second, `None` for no limit.
    pub max_bandwidth: Option<u64>,
    /// Use pagemap to skip untouched pages without reading them.
    pub use_pagemap: bool,
}

impl Default for RamSendConfig {
    fn default() -> Self {
        RamSendConfig {
            batch_pages: MAX_BATCH_DATA_PAGES,
            max_bandwidth: None,
            use_pagemap: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    region: usize,
    page: usize,
    pages: usize,
    zero: bool,
}

/// Pages decided but not written yet.
struct Batch {
    runs: Vec<Run>,
    data_pages: usize,
    /// Data of the runs, copied at decision time (guest running).
    staging: Staging,
    /// CRC32C of `staging`, extended page by page right after each copy.
    staging_crc: u32,
    table: Vec<u8>,
}

/// Sends RAM passes for a fixed list of regions.
pub struct RamSender {
    regions: Vec<RamRegion>,
    pending: Vec<DirtyBitmap>,
    /// A cleared bitmap per region, swapped with `pending` at each dirty pass.
    spare: Vec<DirtyBitmap>,
    pagemap: Option<Pagemap>,
    states: Vec<PageState>,
    batch: Batch,
    cfg: RamSendConfig,
    /// Guest paused: no staging copy, vectored writes from guest memory.
    paused: bool,
    pass_start: Instant,
    pass_bytes: u64,
    /// The fault point of the pass in progress, hit at its first page record.
    pass_point: Option<FaultPoint>,
    cancel: Cancel,
    /// The migration's deadline (action `cancel`; when, and how long it was): when it passes
    /// the next record fails.
    deadline: Option<(Instant, Duration)>,
    faults: Faults,
    #[cfg(test)]
    pub(crate) scan_hook: Option<Box<dyn FnMut(usize, usize) + Send>>,
}

impl RamSender {
    pub fn new(regions: Vec<RamRegion>, cfg: RamSendConfig) -> Self {
        let pending: Vec<DirtyBitmap> = regions
            .iter()
            .map(|r| DirtyBitmap::new(r.pages()))
            .collect();
        let batch_pages = cfg.batch_pages.clamp(1, MAX_BATCH_DATA_PAGES);
        RamSender {
            regions,
            spare: pending
                .iter()
                .map(|b| DirtyBitmap::new(b.pages()))
                .collect(),
            pending,
            pagemap: if cfg.use_pagemap {
                Pagemap::open()
            } else {
                None
            },
            states: Vec::new(),
            batch: Batch {
                runs: Vec::new(),
                data_pages: 0,
                staging: Staging::with_capacity(batch_pages),
                staging_crc: 0,
                table: Vec::new(),
            },
            cfg: RamSendConfig { batch_pages, ..cfg },
            paused: false,
            pass_start: Instant::now(),
            pass_bytes: 0,
            pass_point: None,
            cancel: Cancel::default(),
            deadline: None,
            faults: Faults::none(),
            #[cfg(test)]
            scan_hook: None,
        }
    }

    /// Checked before each record is written: once `cancel` is set, or `deadline` passed,
    /// passes fail with a cancellation (or the deadline error).
    pub fn set_stop(&mut self, cancel: Cancel, deadline: Option<(Instant, Duration)>) {
        self.cancel = cancel;
        self.deadline = deadline;
    }

    /// The fault to inject at the first page record of a pass (tests).
    pub fn set_faults(&mut self, faults: Faults) {
        self.faults = faults;
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The pages of region `region` still to send; the dirty log is ORed in here.
    pub fn pending_mut(&mut self, region: usize) -> &mut DirtyBitmap {
        &mut self.pending[region]
    }

    /// Pages still to send over all regions.
    pub fn pending_pages(&self) -> u64 {
        self.pending.iter().map(|b| b.count() as u64).sum()
    }

    /// Declares the guest paused (final pass): data goes straight from guest memory.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Pass 0: every page. Zero pages (read, or known untouched from pagemap) are elided if
    /// `elide`, else sent as zero runs.
    pub fn bulk_pass(&mut self, w: &mut RecordWriter<'_>, elide: bool) -> io::Result<PassStats> {
        let mut stats = self.begin_pass(
            w,
            0,
            PassKind::Bulk,
            if elide { PASS_ZERO_ELIDED } else { 0 },
        )?;
        for r in 0..self.regions.len() {
            let pages = self.regions[r].pages();
            let mut start = 0;
            while start < pages {
                let n = (pages - start).min(BATCH_PAGES);
                self.classify(r, start, n);
                let mut i = 0;
                while i < n {
                    let known_zero = self.states[i].is_known_zero();
                    if known_zero && elide {
                        // A run of pages known zero without reading: elided as one.
                        let run = self.states[i..]
                            .iter()
                            .take_while(|s| s.is_known_zero())
                            .count();
                        stats.pages_scanned += run as u64;
                        stats.untouched_skipped += run as u64;
                        stats.zero_elided += run as u64;
                        #[cfg(test)]
                        if let Some(hook) = self.scan_hook.as_mut() {
                            (start + i..start + i + run).for_each(|page| hook(r, page));
                        }
                        i += run;
                        continue;
                    }
                    stats.untouched_skipped += known_zero as u64;
                    self.scan_page(w, &mut stats, r, start + i, known_zero, elide)?;
                    i += 1;
                }
                start += n;
            }
        }
        self.flush(w)?;
        stats.bytes = self.pass_bytes;
        Ok(stats)
    }

    /// Pass `pass` (> 0): the pending dirty pages, zero pages as zero runs. `final_pass`
    /// only marks the record; call [`set_paused`](Self::set_paused) first for the final pass.
    pub fn dirty_pass(
        &mut self,
        w: &mut RecordWriter<'_>,
        pass: u32,
        final_pass: bool,
    ) -> io::Result<PassStats> {
        let (kind, flags) = if final_pass {
            (PassKind::Final, PASS_FINAL)
        } else {
            (PassKind::Iterative, 0)
        };
        let mut stats = self.begin_pass(w, pass, kind, flags)?;
        for r in 0..self.regions.len() {
            // The pending set is taken and a cleared one put in its place; the taken one is
            // cleared where it had bits and kept for the next pass. No bitmap is allocated or
            // freed here: for 16 GiB that is 512 KiB to fault in or unmap, inside the downtime
            // on the final pass.
            let spare = std::mem::replace(&mut self.spare[r], DirtyBitmap::new(0));
            let mut dirty = std::mem::replace(&mut self.pending[r], spare);
            let runs: Vec<(usize, usize)> = dirty.runs().collect();
            for &(start, len) in &runs {
                for page in start..start + len {
                    self.scan_page(w, &mut stats, r, page, false, false)?;
                }
            }
            runs.iter()
                .for_each(|&(start, len)| dirty.clear_range(start, len));
            self.spare[r] = dirty;
        }
        self.flush(w)?;
        stats.bytes = self.pass_bytes;
        Ok(stats)
    }

    fn begin_pass(
        &mut self,
        w: &mut RecordWriter<'_>,
        pass: u32,
        kind: PassKind,
        flags: u32,
    ) -> io::Result<PassStats> {
        self.pass_start = Instant::now();
        self.pass_point = match kind {
            PassKind::Bulk => Some(FaultPoint::MidBulk),
            PassKind::Iterative => Some(FaultPoint::MidDirty),
            PassKind::Final => None,
        };
        self.pass_bytes = w.write_record(
            RecordKind::PassBegin,
            &[&PassBegin { pass, flags }.encode()],
        )?;
        // The final pass may carry no page at all: its point is its beginning.
        if kind == PassKind::Final {
            self.faults.hit(FaultPoint::FinalPass)?;
        }
        Ok(PassStats {
            pass,
            kind,
            ..Default::default()
        })
    }

    /// Fills `self.states` for pages `start..start + n` of region `r`.
    fn classify(&mut self, r: usize, start: usize, n: usize) {
        let region = &self.regions[r];
        match holes::classify(self.pagemap.as_mut(), region, start, n, &mut self.states) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) if region.backing() == Backing::PrivateAnonymous => {
                log::warn!("Reading pagemap failed, reading pages instead: {e}");
                self.pagemap = None;
            }
            Err(e) => log::warn!("Finding the holes of shared memory failed, reading it: {e}"),
        }
        self.states.clear();
        self.states.resize(n, PageState::Resident);
    }

    /// Decides one page from one reading of it and queues it.
    fn scan_page(
        &mut self,
        w: &mut RecordWriter<'_>,
        stats: &mut PassStats,
        r: usize,
        page: usize,
        known_zero: bool,
        elide: bool,
    ) -> io::Result<()> {
        stats.pages_scanned += 1;
        let ptr = self.regions[r].page_ptr(page, 1);
        // SAFETY: the page is inside the region's live mapping (page_ptr checks bounds).
        let zero = known_zero || unsafe { is_zero_raw(ptr, PAGE_SIZE) };
        #[cfg(test)]
        if let Some(hook) = self.scan_hook.as_mut() {
            hook(r, page);
        }
        if zero {
            if elide {
                stats.zero_elided += 1;
                return Ok(());
            }
            stats.zero_sent += 1;
        } else {
            stats.pages_sent += 1;
        }
        self.push(w, r, page, zero)
    }

    /// Queues one page, merging it into the last run when contiguous; flushes full batches.
    fn push(
        &mut self,
        w: &mut RecordWriter<'_>,
        r: usize,
        page: usize,
        zero: bool,
    ) -> io::Result<()> {
        if !zero && self.batch.data_pages == self.cfg.batch_pages {
            self.flush(w)?;
        }
        let extend = self.batch.runs.last().is_some_and(|last| {
            last.region == r
                && last.zero == zero
                && last.page + last.pages == page
                && last.pages < u32::MAX as usize
        });
        if !extend && self.batch.runs.len() == MAX_BATCH_RUNS {
            self.flush(w)?;
        }
        if !zero {
            self.batch.data_pages += 1;
            if !self.paused {
                self.stage(r, page);
            }
        }
        match self.batch.runs.last_mut() {
            Some(last) if extend => last.pages += 1,
            _ => self.batch.runs.push(Run {
                region: r,
                page,
                pages: 1,
                zero,
            }),
        }
        Ok(())
    }

    /// Copies one page into the staging buffer; this copy is what gets sent and checksummed.
    fn stage(&mut self, r: usize, page: usize) {
        let src = self.regions[r].page_ptr(page, 1);
        let copy = self.batch.staging.push(src);
        // Checksummed from the copy, while it is in the cache.
        self.batch.staging_crc = crc32c::crc32c_append(self.batch.staging_crc, copy);
    }

    /// Writes the queued runs as one `RamPages` record.
    fn flush(&mut self, w: &mut RecordWriter<'_>) -> io::Result<()> {
        let b = &mut self.batch;
        if b.runs.is_empty() {
            return Ok(());
        }
        self.cancel.check()?;
        if let Some((_, after)) = self.deadline.filter(|&(at, _)| Instant::now() >= at) {
            return Err(io::Error::other(DeadlineReached(after)));
        }
        if let Some(point) = self.pass_point.take() {
            self.faults.hit(point)?;
        }
        b.table.clear();
        encode_batch_prefix(b.runs.len() as u32, b.data_pages as u32, &mut b.table);
        for run in &b.runs {
            let gpa = self.regions[run.region].guest_addr() + run.page as u64 * PAGE_SIZE_U64;
            RunDesc {
                guest_addr: gpa,
                pages: run.pages as u32,
                zero: run.zero,
            }
            .encode_into(&mut b.table);
        }
        let written = if self.paused {
            let mut parts: Vec<&[u8]> = Vec::with_capacity(b.runs.len() + 1);
            parts.push(&b.table);
            for run in b.runs.iter().filter(|r| !r.zero) {
                let ptr = self.regions[run.region].page_ptr(run.page, run.pages);
                // SAFETY: the range is inside the region's live mapping (page_ptr checks) and
                // the guest is paused, so nothing writes it while this slice exists.
                parts.push(unsafe { std::slice::from_raw_parts(ptr, run.pages * PAGE_SIZE) });
            }
            w.write_record(RecordKind::RamPages, &parts)?
        } else {
            let crc =
                crc32c::crc32c_combine(crc32c::crc32c(&b.table), b.staging_crc, b.staging.len());
            w.write_record_with_crc(RecordKind::RamPages, &[&b.table, b.staging.bytes()], crc)?
        };
        b.runs.clear();
        b.staging.clear();
        b.staging_crc = 0;
        b.data_pages = 0;
        self.pass_bytes += written;
        self.throttle();
        Ok(())
    }

    /// Sleeps as needed to stay under the bandwidth limit (live passes only: the final pass
    /// goes as fast as the link allows, the guest is paused).
    fn throttle(&self) {
        let Some(limit) = self.cfg.max_bandwidth.filter(|&l| l > 0 && !self.paused) else {
            return;
        };
        let due = Duration::from_secs_f64(self.pass_bytes as f64 / limit as f64);
        let elapsed = self.pass_start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }

    /// Seconds since the current pass began.
    pub fn pass_elapsed(&self) -> Duration {
        self.pass_start.elapsed()
    }
}

/// One page, page-aligned.
#[repr(C, align(4096))]
struct Page([u8; PAGE_SIZE]);

/// Page-aligned copies of guest pages. The alignment matters: copying a page-aligned guest page
/// into a buffer 16 bytes past a page boundary (where `malloc` puts large blocks) is several
/// times slower on AMD (`rep movsb` slows down when destination and source are close modulo
/// 4 KiB; figures in the README), and the copy is a large part of the sender's time.
struct Staging {
    pages: Vec<Page>,
}

impl Staging {
    fn with_capacity(pages: usize) -> Staging {
        Staging {
            pages: Vec::with_capacity(pages),
        }
    }

    /// Appends a copy of the page at `src` (one page of live guest memory); returns the copy.
    fn push(&mut self, src: *const u8) -> &[u8] {
        self.pages.reserve(1);
        let len = self.pages.len();
        // SAFETY: `src` is one readable page (the caller's page_ptr checked it); the slot at
        // `len` is reserved, page-sized and becomes initialised by the copy (any bytes are a
        // valid `Page`).
        unsafe {
            let dst = self.pages.as_mut_ptr().add(len).cast::<u8>();
            std::ptr::copy_nonoverlapping(src, dst, PAGE_SIZE);
            self.pages.set_len(len + 1);
        }
        &self.pages[len].0
    }

    /// Bytes staged.
    fn len(&self) -> usize {
        self.pages.len() * PAGE_SIZE
    }

    /// All staged pages as one byte slice.
    fn bytes(&self) -> &[u8] {
        // SAFETY: `Page` is `repr(C)` around a byte array with no padding (size = alignment =
        // PAGE_SIZE), so the vector's initialised elements are `len()` contiguous bytes.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len()) }
    }

    fn clear(&mut self) {
        self.pages.clear();
    }
}

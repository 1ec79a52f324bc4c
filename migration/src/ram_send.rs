//! The RAM side of the source: the bulk pass over every page and the passes over the dirty
//! bitmap, batched into `RamPages` records.
//!
//! # Why no write is lost
//!
//! The dirty log promises (`vm.rs`, [`DirtyLog`]): a write to a page after
//! `clear_dirty_log` covered it is reported by a later fetch, and a page never covered is
//! reported by every fetch (or its writes are). This sender keeps one rule: **while the guest
//! runs, a page is cleared before it is read**. Each page's fate (data, zero run, elided) is
//! decided from one reading of it, made after its clear; any write that reading missed came
//! after the clear, so a later fetch reports the page and it goes out again in a later pass,
//! the last one with the guest paused (nothing to clear then: nothing writes).
//!
//! Clearing happens in chunks just before they are read: in the bulk pass the resident pages
//! of each pagemap batch, in a dirty pass each window of [`CLEAR_WINDOW_PAGES`] pending
//! pages. With KVM's initially-set bitmaps nothing is write-protected up front.
//!
//! Pages pagemap shows never touched are zero without being read, and they are not cleared
//! either: KVM write-protects page by page, which for 16 GiB of untouched memory costs more
//! than the whole migration (figures in the README), and a page with no host page behind it
//! has no writable mapping to protect. They are kept as *uncleared*: their bits stay set and
//! every fetch reports them again, so [`RamSender::collect_dirty`] asks pagemap about them once
//! more: still untouched means still zero, as the destination holds them, and they leave the
//! pending set; touched means written since, and they are sent like any dirty page (cleared,
//! then read).
//!
//! # Sending straight from guest memory
//!
//! A data page is checksummed right after its zero check (while it is in the cache) and goes
//! to the stream from guest memory, one vectored write per record. While the guest runs it may
//! change a page between its checksum and the kernel's copy: the destination then finds the
//! page *torn* (FORMAT.md 3.3), keeps it as such and lists it in its `PassDone`, and the page
//! is sent again ([`RamSender::resend`]); it is in the next dirty log anyway, since that write
//! came after its clear. In the final pass, with the guest paused, nothing tears: there a
//! checksum mismatch is corruption and ends the migration.

use std::io;
use std::time::{Duration, Instant};

use crate::cancel::{Cancel, DeadlineReached};
use crate::checksum::page_crc_raw;
use crate::connections::DataWriters;
use crate::dirty::DirtyBitmap;
use crate::fault::{FaultPoint, Faults};
use crate::holes;
use crate::memory::{Backing, RamRegion};
use crate::pagemap::{Pagemap, BATCH_PAGES};
use crate::records::{encode_batch_prefix, PassBegin, RunDesc, TornRun};
use crate::stats::{PassKind, PassStats};
use crate::stream::RecordWriter;
use crate::transport::GuestSpan;
use crate::vm::{DirtyLog, VmOpError};
use crate::wire::{
    RecordKind, MAX_BATCH_DATA_PAGES, MAX_BATCH_RUNS, PAGE_SIZE, PAGE_SIZE_U64, PASS_FINAL,
    PASS_ZERO_ELIDED, RECORD_HEADER_LEN,
};
use crate::zero::is_zero_raw;

/// Pending pages cleared at once in a dirty pass, just before they are read: one record's
/// worth of data pages. Smaller windows mean more `KVM_CLEAR_DIRTY_LOG` calls (each flushes
/// the guest's TLB); larger ones more pages written between their clear and their read (sent
/// once more, harmlessly).
pub const CLEAR_WINDOW_PAGES: usize = MAX_BATCH_DATA_PAGES;
const CLEAR_WINDOW_WORDS: usize = CLEAR_WINDOW_PAGES / 64;

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

/// Errors of a RAM pass.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("Writing the migration stream failed")]
    Send(#[from] io::Error),
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
}

/// The VM's dirty log failed a RAM pass (the migration reports it as it is).
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("Fetching the dirty log of region {region} failed")]
    Fetch {
        region: usize,
        #[source]
        source: VmOpError,
    },
    #[error("Clearing the dirty log of region {region} from page {first_page} failed")]
    Clear {
        region: usize,
        first_page: usize,
        #[source]
        source: VmOpError,
    },
}

/// A torn run the destination reported does not lie inside guest memory.
#[derive(Debug, thiserror::Error)]
#[error("The destination reported {pages} torn pages at {guest_addr:#x}, outside guest memory")]
pub struct TornOutside {
    pub guest_addr: u64,
    pub pages: u32,
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
    /// CRC32C of each data page, taken right after its zero check, in order.
    crcs: Vec<u32>,
    /// Prefix, run table and page checksums of the record being written.
    head: Vec<u8>,
    spans: Vec<GuestSpan>,
}

/// Sends RAM passes for a fixed list of regions.
pub struct RamSender {
    regions: Vec<RamRegion>,
    pending: Vec<DirtyBitmap>,
    /// A cleared bitmap per region, swapped with `pending` at each dirty pass.
    spare: Vec<DirtyBitmap>,
    /// Per region, the pages never cleared (never read: untouched when pagemap was asked),
    /// which the destination holds as zero. See the module documentation.
    uncleared: Vec<DirtyBitmap>,
    /// Scratch: runs of the uncleared set.
    runs: Vec<(usize, usize)>,
    pagemap: Option<Pagemap>,
    /// Scratch: resident runs of what pagemap was last asked about.
    resident: Vec<(usize, usize)>,
    /// Scratch: the clear mask of a bulk-pass chunk.
    mask: Vec<u64>,
    batch: Batch,
    cfg: RamSendConfig,
    /// Guest paused: nothing to clear, no throttling.
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
    /// The data connections that carry the live passes' records, if any (`connections.rs`).
    data: Option<DataWriters>,
    #[cfg(test)]
    pub(crate) scan_hook: Option<Box<dyn FnMut(usize, usize) + Send>>,
}

impl RamSender {
    pub fn new(regions: Vec<RamRegion>, cfg: RamSendConfig) -> Self {
        let bitmaps = || -> Vec<DirtyBitmap> {
            regions
                .iter()
                .map(|r| DirtyBitmap::new(r.pages()))
                .collect()
        };
        let batch_pages = cfg.batch_pages.clamp(1, MAX_BATCH_DATA_PAGES);
        RamSender {
            pending: bitmaps(),
            spare: bitmaps(),
            uncleared: bitmaps(),
            runs: Vec::new(),
            regions,
            pagemap: if cfg.use_pagemap {
                Pagemap::open()
            } else {
                None
            },
            resident: Vec::new(),
            mask: Vec::new(),
            batch: Batch {
                runs: Vec::new(),
                data_pages: 0,
                crcs: Vec::with_capacity(batch_pages),
                head: Vec::new(),
                spans: Vec::new(),
            },
            cfg: RamSendConfig { batch_pages, ..cfg },
            paused: false,
            pass_start: Instant::now(),
            pass_bytes: 0,
            pass_point: None,
            cancel: Cancel::default(),
            deadline: None,
            faults: Faults::none(),
            data: None,
            #[cfg(test)]
            scan_hook: None,
        }
    }

    /// From now on the records go over `data`'s connections, until
    /// [`finish_data`](Self::finish_data).
    pub(crate) fn set_data(&mut self, data: DataWriters) {
        self.data = Some(data);
    }

    /// Ends live pass `pass` on the data connections (none: nothing to do).
    pub(crate) fn end_data_pass(&mut self, pass: u32) -> io::Result<()> {
        match self.data.as_mut() {
            Some(d) => d.pass_end(pass),
            None => Ok(()),
        }
    }

    /// Seals and closes the data connections: what follows goes over the control
    /// connection. Returns the bytes they carried.
    pub(crate) fn finish_data(&mut self) -> io::Result<u64> {
        match self.data.take() {
            Some(d) => d.finish(),
            None => Ok(0),
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

    /// Pages still to send over all regions.
    pub fn pending_pages(&self) -> u64 {
        self.pending.iter().map(|b| b.count() as u64).sum()
    }

    /// Declares the guest paused (final pass): nothing is cleared, nothing throttled.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// ORs the dirty log of every region into the pending set, drops the uncleared pages
    /// that are still untouched (module documentation) and returns the pages pending.
    pub fn collect_dirty<L: DirtyLog + ?Sized>(&mut self, log: &mut L) -> Result<u64, PassError> {
        for region in 0..self.regions.len() {
            log.fetch_dirty_log(region, &mut self.pending[region])
                .map_err(|source| DirtyLogError::Fetch { region, source })?;
            self.settle_uncleared(region);
        }
        Ok(self.pending_pages())
    }

    /// Asks pagemap about the pending pages of region `r` that were never cleared: those still
    /// untouched leave the pending set (zero, as at the destination; a write would have
    /// touched them, and their bit stays set for the next fetch); the others stop being
    /// uncleared and are sent (cleared first) like any dirty page. Works on runs of the
    /// uncleared set, which the fetch reported whole (initially-set bits): no per-page work
    /// for untouched memory, which is most of an idle guest (this runs inside the downtime).
    fn settle_uncleared(&mut self, r: usize) {
        let (pending, uncleared) = (&mut self.pending[r], &mut self.uncleared[r]);
        self.runs.clear();
        self.runs.extend(uncleared.runs());
        let region = &self.regions[r];
        for &(start, len) in &self.runs {
            if !pending.any_in(start, len) {
                continue;
            }
            let known = match holes::resident_runs(
                self.pagemap.as_mut(),
                region,
                start,
                len,
                &mut self.resident,
            ) {
                Ok(known) => known,
                Err(e) => {
                    log::warn!("Finding untouched pages failed, reading them instead: {e}");
                    false
                }
            };
            if !known {
                // Without pagemap every such page is read (and cleared before).
                uncleared.clear_range(start, len);
                continue;
            }
            // Untouched pages of the run leave the pending set; touched ones stay in it (if
            // they were there) and stop being uncleared.
            let mut at = start;
            for &(s, l) in self.resident.iter().chain([(len, 0)].iter()) {
                pending.clear_range(at, start + s - at);
                uncleared.clear_range(start + s, l);
                at = start + s + l;
            }
        }
    }

    /// Adds pages the destination reported torn to the next pass.
    pub fn resend(&mut self, torn: &[TornRun]) -> Result<(), TornOutside> {
        for t in torn {
            let outside = || TornOutside {
                guest_addr: t.guest_addr,
                pages: t.pages,
            };
            let end = (t.pages as u64)
                .checked_mul(PAGE_SIZE_U64)
                .and_then(|len| t.guest_addr.checked_add(len))
                .ok_or_else(outside)?;
            let r = self
                .regions
                .iter()
                .position(|r| {
                    t.guest_addr >= r.guest_addr() && end <= r.guest_addr() + r.len() as u64
                })
                .ok_or_else(outside)?;
            let page = ((t.guest_addr - self.regions[r].guest_addr()) / PAGE_SIZE_U64) as usize;
            self.pending[r].set_range(page, t.pages as usize);
            self.uncleared[r].clear_range(page, t.pages as usize);
        }
        Ok(())
    }

    /// Pass 0: every page. Zero pages (read, or known untouched from pagemap) are elided if
    /// `elide`, else sent as zero runs. Each pagemap batch's resident pages are cleared in
    /// `log` before the first of them is read.
    pub fn bulk_pass<L: DirtyLog + ?Sized>(
        &mut self,
        w: &mut RecordWriter<'_>,
        log: &mut L,
        elide: bool,
    ) -> Result<PassStats, PassError> {
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
                self.clear_resident(log, r, start, n)?;
                let resident = std::mem::take(&mut self.resident);
                let mut at = 0;
                for &(s, len) in resident.iter().chain([(n, 0)].iter()) {
                    if s > at {
                        // Known zero without reading: never cleared, kept as uncleared.
                        self.known_zero(w, &mut stats, r, start + at, s - at, elide)?;
                    }
                    for page in start + s..start + s + len {
                        self.scan_page(w, &mut stats, r, page, elide)?;
                    }
                    at = s + len;
                }
                self.resident = resident;
                start += n;
            }
        }
        self.flush(w)?;
        stats.bytes = self.pass_bytes;
        Ok(stats)
    }

    /// Pass `pass` (> 0): the pending pages, zero pages as zero runs, each window of pending
    /// pages cleared in `log` before its first page is read (unless the guest is paused).
    /// `final_pass` only marks the record; call [`set_paused`](Self::set_paused) first for
    /// the final pass.
    pub fn dirty_pass<L: DirtyLog + ?Sized>(
        &mut self,
        w: &mut RecordWriter<'_>,
        log: &mut L,
        pass: u32,
        final_pass: bool,
    ) -> Result<PassStats, PassError> {
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
            let words = dirty.words().len();
            let mut w0 = 0;
            while w0 < words {
                let w1 = (w0 + CLEAR_WINDOW_WORDS).min(words);
                let window = &dirty.words()[w0..w1];
                if window.iter().all(|&x| x == 0) {
                    w0 = w1;
                    continue;
                }
                if !self.paused {
                    log.clear_dirty_log(r, w0 * 64, window).map_err(|source| {
                        DirtyLogError::Clear {
                            region: r,
                            first_page: w0 * 64,
                            source,
                        }
                    })?;
                }
                for (start, len) in dirty.runs_in(w0 * 64, w1 * 64) {
                    for page in start..start + len {
                        self.scan_page(w, &mut stats, r, page, false)?;
                    }
                }
                dirty.clear_words(w0, w1);
                w0 = w1;
            }
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

    /// Fills `self.resident` with the runs of pages `start..start + n` of region `r` that must
    /// be read (relative to `start`); every other page there is known zero.
    fn classify(&mut self, r: usize, start: usize, n: usize) {
        let region = &self.regions[r];
        match holes::resident_runs(self.pagemap.as_mut(), region, start, n, &mut self.resident) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) if region.backing() == Backing::PrivateAnonymous => {
                log::warn!("Reading pagemap failed, reading pages instead: {e}");
                self.pagemap = None;
            }
            Err(e) => log::warn!("Finding the holes of shared memory failed, reading it: {e}"),
        }
        self.resident.clear();
        self.resident.push((0, n));
    }

    /// Clears (re-protects) the resident pages of the chunk `start..start + n` of region `r`
    /// classified last, before any of them is read.
    fn clear_resident<L: DirtyLog + ?Sized>(
        &mut self,
        log: &mut L,
        r: usize,
        start: usize,
        n: usize,
    ) -> Result<(), PassError> {
        if self.paused || self.resident.is_empty() {
            return Ok(());
        }
        self.mask.clear();
        self.mask.resize(n.div_ceil(64), 0);
        for &(s, len) in &self.resident {
            set_bits(&mut self.mask, s, len);
        }
        log.clear_dirty_log(r, start, &self.mask)
            .map_err(|source| DirtyLogError::Clear {
                region: r,
                first_page: start,
                source,
            })?;
        Ok(())
    }

    /// Pages `page..page + n` of region `r`, known zero without reading (never touched):
    /// elided (`elide`) or sent as one zero run, and kept as uncleared.
    fn known_zero(
        &mut self,
        w: &mut RecordWriter<'_>,
        stats: &mut PassStats,
        r: usize,
        page: usize,
        n: usize,
        elide: bool,
    ) -> io::Result<()> {
        stats.pages_scanned += n as u64;
        stats.untouched_skipped += n as u64;
        self.uncleared[r].set_range(page, n);
        #[cfg(test)]
        if let Some(hook) = self.scan_hook.as_mut() {
            (page..page + n).for_each(|p| hook(r, p));
        }
        if elide {
            stats.zero_elided += n as u64;
            return Ok(());
        }
        stats.zero_sent += n as u64;
        self.push_zero_run(w, r, page, n)
    }

    /// Decides one page from one reading of it (its clear came before) and queues it.
    fn scan_page(
        &mut self,
        w: &mut RecordWriter<'_>,
        stats: &mut PassStats,
        r: usize,
        page: usize,
        elide: bool,
    ) -> io::Result<()> {
        stats.pages_scanned += 1;
        let ptr = self.regions[r].page_ptr(page, 1);
        // SAFETY: the page is inside the region's live mapping (page_ptr checks bounds).
        let zero = unsafe { is_zero_raw(ptr, PAGE_SIZE) };
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
            return self.push_zero_run(w, r, page, 1);
        }
        stats.pages_sent += 1;
        // SAFETY: one page-aligned page inside the region's live mapping (checked above); the
        // guest may be writing it, which the checksum then shows (the page is torn).
        let crc = unsafe { page_crc_raw(ptr) };
        self.push_data(w, r, page, crc)
    }

    /// Queues one data page with its checksum, merging it into the last run when contiguous.
    fn push_data(
        &mut self,
        w: &mut RecordWriter<'_>,
        r: usize,
        page: usize,
        crc: u32,
    ) -> io::Result<()> {
        if self.batch.data_pages == self.cfg.batch_pages {
            self.flush(w)?;
        }
        self.push_run(w, r, page, 1, false)?;
        self.batch.data_pages += 1;
        self.batch.crcs.push(crc);
        Ok(())
    }

    /// Queues a zero run.
    fn push_zero_run(
        &mut self,
        w: &mut RecordWriter<'_>,
        r: usize,
        page: usize,
        pages: usize,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(u32::MAX as usize);
            self.push_run(w, r, page + done, n, true)?;
            done += n;
        }
        Ok(())
    }

    /// Appends `pages` pages to the batch, extending the last run when contiguous (a run
    /// holds at most `u32::MAX` pages); flushes when the run table is full.
    fn push_run(
        &mut self,
        w: &mut RecordWriter<'_>,
        r: usize,
        page: usize,
        pages: usize,
        zero: bool,
    ) -> io::Result<()> {
        let extend = self.batch.runs.last().is_some_and(|last| {
            last.region == r
                && last.zero == zero
                && last.page + last.pages == page
                && last.pages + pages <= u32::MAX as usize
        });
        if extend {
            if let Some(last) = self.batch.runs.last_mut() {
                last.pages += pages;
            }
            return Ok(());
        }
        if self.batch.runs.len() == MAX_BATCH_RUNS {
            self.flush(w)?;
        }
        self.batch.runs.push(Run {
            region: r,
            page,
            pages,
            zero,
        });
        Ok(())
    }

    /// Writes the queued runs as one `RamPages` record: prefix, run table and page checksums,
    /// then the data straight from guest memory.
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
        b.head.clear();
        encode_batch_prefix(b.runs.len() as u32, b.data_pages as u32, &mut b.head);
        for run in &b.runs {
            let gpa = self.regions[run.region].guest_addr() + run.page as u64 * PAGE_SIZE_U64;
            RunDesc {
                guest_addr: gpa,
                pages: run.pages as u32,
                zero: run.zero,
            }
            .encode_into(&mut b.head);
        }
        for crc in &b.crcs {
            b.head.extend_from_slice(&crc.to_le_bytes());
        }
        b.spans.clear();
        for run in b.runs.iter().filter(|r| !r.zero) {
            let ptr = self.regions[run.region].page_ptr(run.page, run.pages);
            // SAFETY: the range is inside the region's live mapping (page_ptr checks), which
            // outlives this write; the guest may write it meanwhile (the page checksums then
            // show it torn), and no reference to it is formed.
            b.spans
                .push(unsafe { GuestSpan::new(ptr, run.pages * PAGE_SIZE) });
        }
        let written = match self.data.as_mut() {
            Some(data) => {
                let len = b.head.len() + b.spans.iter().map(GuestSpan::len).sum::<usize>();
                data.record(std::mem::take(&mut b.head), std::mem::take(&mut b.spans))?;
                (RECORD_HEADER_LEN + len) as u64
            }
            None => w.write_record_guest(RecordKind::RamPages, &b.head, &b.spans)?,
        };
        b.runs.clear();
        b.crcs.clear();
        b.spans.clear();
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

/// Sets bits `start..start + len` of `words`.
fn set_bits(words: &mut [u64], start: usize, len: usize) {
    let end = start + len;
    let mut i = start;
    while i < end {
        let bit = i % 64;
        let n = (64 - bit).min(end - i);
        words[i / 64] |= if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        i += n;
    }
}

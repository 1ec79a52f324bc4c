//! An in-memory VM for tests, benchmarks and fuzzing: guest RAM in private anonymous mappings
//! (so pagemap and `MADV_DONTNEED` paths are the real ones) with an inaccessible guard page on
//! each side (a stray write faults instead of going unnoticed), a dirty log that behaves as
//! KVM's does for the writes made through its [`GuestWriter`] (the test's "vCPU"), scripted
//! failures, and both [`MigrationSource`] and [`MigrationTarget`].
//!
//! The dirty log models KVM's write protection page by page, in either of KVM's two modes
//! ([`FakeDirtyLog`]): a write to a write-protected page is logged and makes the page writable;
//! a write to a writable page is not logged at all. So a sender that read a page before
//! clearing (re-protecting) it would lose the writes in between here as it would with KVM.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use crate::dirty::DirtyBitmap;
use crate::memory::{AnonMapping, RamRegion};
use crate::records::StateBlob;
use crate::stats::PassStats;
use crate::sync::{read, write};
use crate::vm::{DirtyLog, GuestRam, MigrationSource, MigrationTarget, VmOpError};
use crate::wire::{PAGE_SIZE, PAGE_SIZE_U64};

/// How the fake's dirty log behaves: KVM's two modes (`vm.rs`, `DirtyLog`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeDirtyLog {
    /// `KVM_DIRTY_LOG_INITIALLY_SET`: starting protects nothing and sets every bit; a fetch
    /// reads the bits without clearing them; `clear_dirty_log` clears bits and write-protects
    /// their pages.
    InitiallySet,
    /// Plain `KVM_GET_DIRTY_LOG`: starting write-protects every page with all bits clear; a
    /// fetch returns the bits, clears them and write-protects those pages again;
    /// `clear_dirty_log` does nothing.
    ProtectOnFetch,
}

/// A step of the fake that can be made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailAt {
    StartDirtyLog,
    FetchDirtyLog,
    ClearDirtyLog,
    Pause,
    SaveState,
    StopDirtyLog,
    ValidateConfig,
    Restore,
    Resume,
    AdoptMemory,
}

struct Shared {
    maps: Vec<Arc<AnonMapping>>,
    layout: Vec<(u64, usize)>,
    logging: AtomicBool,
    /// [`FakeDirtyLog`] as a number (0 initially set, 1 protect on fetch).
    mode: AtomicU8,
    paused: AtomicBool,
    /// One bit per page per region.
    log: Vec<Vec<AtomicU64>>,
    /// Write-protected pages, one bit per page per region.
    protected: Vec<Vec<AtomicU64>>,
    /// Writers hold it shared; starting, fetching and clearing take it exclusively, so a
    /// write is wholly before or wholly after each of them (KVM's mmu lock and TLB flush).
    gate: RwLock<()>,
}

impl Shared {
    fn mode(&self) -> FakeDirtyLog {
        match self.mode.load(Ordering::SeqCst) {
            0 => FakeDirtyLog::InitiallySet,
            _ => FakeDirtyLog::ProtectOnFetch,
        }
    }
}

/// Writes guest memory like a vCPU: a write to a write-protected page is logged (and the page
/// made writable) before the data lands, as KVM's write fault does; other writes are not.
#[derive(Clone)]
pub struct GuestWriter(Arc<Shared>);

impl GuestWriter {
    fn locate(&self, gpa: u64, len: usize) -> (usize, usize) {
        for (i, &(start, size)) in self.0.layout.iter().enumerate() {
            if gpa >= start && gpa + len as u64 <= start + size as u64 {
                return (i, (gpa - start) as usize);
            }
        }
        panic!("guest write {gpa:#x}+{len} outside guest memory");
    }

    /// Writes `data` at guest address `gpa` (one region).
    pub fn write(&self, gpa: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let (r, off) = self.locate(gpa, data.len());
        let _gate = read(&self.0.gate);
        if self.0.logging.load(Ordering::SeqCst) {
            let (first, last) = (off / PAGE_SIZE, (off + data.len() - 1) / PAGE_SIZE);
            for p in first..=last {
                let bit = 1u64 << (p % 64);
                if self.0.protected[r][p / 64].fetch_and(!bit, Ordering::SeqCst) & bit != 0 {
                    self.0.log[r][p / 64].fetch_or(bit, Ordering::SeqCst);
                }
            }
        }
        self.0.maps[r].write(off, data);
    }

    /// Whether the VM is paused (a paused guest must not write).
    pub fn paused(&self) -> bool {
        self.0.paused.load(Ordering::SeqCst)
    }

    /// Fills `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        self.write(gpa, &vec![byte; len]);
    }

    /// Reads `out.len()` bytes at `gpa`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) {
        let (r, off) = self.locate(gpa, out.len());
        self.0.maps[r].read(off, out);
    }
}

/// Guest activity run between passes.
pub type PassHook = Box<dyn FnMut(&GuestWriter, &PassStats) + Send>;

/// The fake VM.
pub struct FakeVm {
    shared: Arc<Shared>,
    /// Returned by `save_state` (source), replaced by `restore_state` (target).
    pub states: Vec<StateBlob>,
    /// vCPU count, part of the configuration blob.
    pub vcpus: u32,
    /// The device-state ids the target takes (`None`: any).
    pub known_states: Option<Vec<String>>,
    pub fail_at: Option<FailAt>,
    /// Every trait call, in order ("pause", "resume", ...).
    pub calls: Vec<&'static str>,
    pub paused: bool,
    pub running: bool,
    /// Runs between passes with the guest writer (deterministic guest activity).
    pub between_passes: Option<PassHook>,
    /// Pages `clear_dirty_log` was asked to clear, over the VM's life.
    pub cleared_pages: u64,
    vcpu: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl FakeVm {
    /// A VM with RAM regions `(guest_addr, bytes)`, all fresh (untouched) memory.
    pub fn new(layout: &[(u64, usize)]) -> FakeVm {
        Self::with_maps(layout, |len| {
            AnonMapping::new_guarded(len).expect("mmap for fake VM")
        })
    }

    /// Like [`new`](Self::new), with guest RAM in sealed memfds mapped shared (what a local
    /// migration hands over).
    pub fn new_shared(layout: &[(u64, usize)]) -> FakeVm {
        Self::with_maps(layout, |len| {
            AnonMapping::new_shared(len).expect("memfd for fake VM")
        })
    }

    fn with_maps(layout: &[(u64, usize)], map: impl Fn(usize) -> AnonMapping) -> FakeVm {
        let maps = layout.iter().map(|&(_, len)| Arc::new(map(len))).collect();
        let bits = || -> Vec<Vec<AtomicU64>> {
            layout
                .iter()
                .map(|&(_, len)| {
                    (0..(len / PAGE_SIZE).div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect()
        };
        FakeVm {
            shared: Arc::new(Shared {
                maps,
                layout: layout.to_vec(),
                logging: AtomicBool::new(false),
                mode: AtomicU8::new(0),
                paused: AtomicBool::new(false),
                log: bits(),
                protected: bits(),
                gate: RwLock::new(()),
            }),
            states: Vec::new(),
            vcpus: 1,
            known_states: None,
            fail_at: None,
            calls: Vec::new(),
            paused: false,
            running: true,
            between_passes: None,
            cleared_pages: 0,
            vcpu: None,
        }
    }

    /// Chooses how the dirty log behaves ([`FakeDirtyLog::InitiallySet`] by default); takes
    /// effect at the next `start_dirty_log`.
    pub fn set_dirty_log_mode(&mut self, mode: FakeDirtyLog) {
        let v = match mode {
            FakeDirtyLog::InitiallySet => 0,
            FakeDirtyLog::ProtectOnFetch => 1,
        };
        self.shared.mode.store(v, Ordering::SeqCst);
    }

    /// The guest's hands.
    pub fn writer(&self) -> GuestWriter {
        GuestWriter(self.shared.clone())
    }

    /// All of guest RAM, regions concatenated.
    pub fn image(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for m in &self.shared.maps {
            let at = out.len();
            out.resize(at + m.len(), 0);
            m.read(0, &mut out[at..]);
        }
        out
    }

    /// First differing guest address against `other` (same layout), if any. Compares 1 MiB
    /// at a time, so large sparse guests need no big buffers.
    pub fn first_difference(&self, other: &FakeVm) -> Option<u64> {
        if self.shared.layout != other.shared.layout {
            return Some(0);
        }
        const CHUNK: usize = 1 << 20;
        let (mut a, mut b) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        for (r, &(start, len)) in self.shared.layout.iter().enumerate() {
            let mut off = 0;
            while off < len {
                let n = CHUNK.min(len - off);
                self.shared.maps[r].read(off, &mut a[..n]);
                other.shared.maps[r].read(off, &mut b[..n]);
                if a[..n] != b[..n] {
                    let i = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y)?;
                    return Some(start + (off + i) as u64);
                }
                off += n;
            }
        }
        None
    }

    /// Whether dirty logging is on.
    pub fn logging(&self) -> bool {
        self.shared.logging.load(Ordering::SeqCst)
    }

    /// Starts a "vCPU" thread calling `step` with the guest writer until `pause` (or drop).
    pub fn run_guest(&mut self, mut step: impl FnMut(&GuestWriter) + Send + 'static) {
        let stop = Arc::new(AtomicBool::new(false));
        let writer = self.writer();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                step(&writer);
            }
        });
        self.vcpu = Some((stop, handle));
    }

    fn stop_guest(&mut self) {
        if let Some((stop, handle)) = self.vcpu.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = handle.join();
        }
    }

    fn step(&mut self, call: &'static str, fail: FailAt) -> Result<(), VmOpError> {
        self.calls.push(call);
        if self.fail_at == Some(fail) {
            return Err(format!("injected failure in {call}").into());
        }
        Ok(())
    }

    fn config(&self) -> String {
        let regions: Vec<_> = self
            .shared
            .layout
            .iter()
            .map(|&(a, l)| [a, l as u64])
            .collect();
        serde_json::json!({ "regions": regions, "vcpus": self.vcpus }).to_string()
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.stop_guest();
    }
}

impl GuestRam for FakeVm {
    fn ram_regions(&self) -> Vec<RamRegion> {
        self.shared
            .layout
            .iter()
            .zip(&self.shared.maps)
            .map(|(&(gpa, _), m)| {
                RamRegion::from_anon(gpa, m.clone()).expect("aligned fake layout")
            })
            .collect()
    }
}

impl DirtyLog for FakeVm {
    fn start_dirty_log(&mut self) -> Result<(), VmOpError> {
        self.step("start_dirty_log", FailAt::StartDirtyLog)?;
        let _gate = write(&self.shared.gate);
        let initially_set = self.shared.mode() == FakeDirtyLog::InitiallySet;
        for (r, (log, protected)) in self
            .shared
            .log
            .iter()
            .zip(&self.shared.protected)
            .enumerate()
        {
            let pages = self.shared.layout[r].1 / PAGE_SIZE;
            for (i, (l, p)) in log.iter().zip(protected).enumerate() {
                let valid = if (i + 1) * 64 <= pages {
                    u64::MAX
                } else {
                    (1u64 << (pages % 64)) - 1
                };
                // Initially set: every bit set, nothing protected. Else the opposite.
                l.store(if initially_set { valid } else { 0 }, Ordering::SeqCst);
                p.store(if initially_set { 0 } else { valid }, Ordering::SeqCst);
            }
        }
        self.shared.logging.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), VmOpError> {
        self.calls.push("stop_dirty_log");
        if self.fail_at == Some(FailAt::StopDirtyLog) {
            return Err("injected failure in stop_dirty_log".into());
        }
        self.shared.logging.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn fetch_dirty_log(
        &mut self,
        region: usize,
        bitmap: &mut DirtyBitmap,
    ) -> Result<(), VmOpError> {
        if self.fail_at == Some(FailAt::FetchDirtyLog) {
            return Err("injected failure in fetch_dirty_log".into());
        }
        let _gate = write(&self.shared.gate);
        let log = &self.shared.log[region];
        let words: Vec<u64> = match self.shared.mode() {
            FakeDirtyLog::InitiallySet => log.iter().map(|w| w.load(Ordering::SeqCst)).collect(),
            FakeDirtyLog::ProtectOnFetch => log
                .iter()
                .zip(&self.shared.protected[region])
                .map(|(w, p)| {
                    let bits = w.swap(0, Ordering::SeqCst);
                    p.fetch_or(bits, Ordering::SeqCst);
                    bits
                })
                .collect(),
        };
        bitmap.merge_words(&words).map_err(VmOpError::new)?;
        Ok(())
    }

    fn clear_dirty_log(
        &mut self,
        region: usize,
        first_page: usize,
        pages: &[u64],
    ) -> Result<(), VmOpError> {
        if self.fail_at == Some(FailAt::ClearDirtyLog) {
            return Err("injected failure in clear_dirty_log".into());
        }
        if !first_page.is_multiple_of(64) {
            return Err(format!("clear from page {first_page}: not a multiple of 64").into());
        }
        self.cleared_pages += pages.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        if self.shared.mode() != FakeDirtyLog::InitiallySet {
            return Ok(());
        }
        let _gate = write(&self.shared.gate);
        let log = &self.shared.log[region];
        let protected = &self.shared.protected[region];
        for (i, &mask) in pages.iter().enumerate() {
            let w = first_page / 64 + i;
            let (Some(l), Some(p)) = (log.get(w), protected.get(w)) else {
                break;
            };
            l.fetch_and(!mask, Ordering::SeqCst);
            p.fetch_or(mask, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl MigrationSource for FakeVm {
    fn config_blob(&self) -> Result<Vec<u8>, VmOpError> {
        Ok(self.config().into_bytes())
    }

    fn pause(&mut self) -> Result<(), VmOpError> {
        self.step("pause", FailAt::Pause)?;
        self.stop_guest();
        self.shared.paused.store(true, Ordering::SeqCst);
        self.paused = true;
        self.running = false;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmOpError> {
        self.step("resume", FailAt::Resume)?;
        self.shared.paused.store(false, Ordering::SeqCst);
        self.paused = false;
        self.running = true;
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<StateBlob>, VmOpError> {
        self.step("save_state", FailAt::SaveState)?;
        Ok(self.states.clone())
    }

    fn between_passes(&mut self, last: &PassStats, _throttle_pct: u32) -> Result<(), VmOpError> {
        let writer = self.writer();
        if let Some(hook) = self.between_passes.as_mut() {
            hook(&writer, last);
        }
        Ok(())
    }
}

impl FakeVm {
    /// Guest memory replaced by `maps` (same layout); no guest thread may run.
    fn replace_maps(&mut self, maps: Vec<Arc<AnonMapping>>) -> Result<(), VmOpError> {
        let shared = Arc::get_mut(&mut self.shared).ok_or("the guest is running")?;
        shared.maps = maps;
        Ok(())
    }

    /// Whether guest memory is shared memory (a local migration's, or `new_shared`).
    pub fn memory_is_shared(&self) -> bool {
        self.ram_regions().iter().all(|r| r.file().is_some())
    }
}

impl MigrationTarget for FakeVm {
    fn adopt_memory(&mut self, regions: Vec<crate::SharedRegion>) -> Result<(), VmOpError> {
        self.step("adopt_memory", FailAt::AdoptMemory)?;
        let layout: Vec<(u64, usize)> = regions
            .iter()
            .map(|r| (r.guest_addr, r.size as usize))
            .collect();
        if layout != self.shared.layout {
            return Err(format!("layout {layout:x?} is not this VM's").into());
        }
        let maps = regions
            .into_iter()
            .map(|r| {
                AnonMapping::map_file(Arc::new(r.file), r.file_offset, r.size as usize)
                    .map(Arc::new)
                    .map_err(VmOpError::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.replace_maps(maps)
    }

    fn release_memory(&mut self) {
        self.calls.push("release_memory");
        let maps = self
            .shared
            .layout
            .iter()
            .map(|&(_, len)| Arc::new(AnonMapping::new_guarded(len).expect("mmap for fake VM")))
            .collect();
        let _ = self.replace_maps(maps);
    }

    fn validate_config(&mut self, config: &[u8]) -> Result<(), VmOpError> {
        self.step("validate_config", FailAt::ValidateConfig)?;
        if config != self.config().as_bytes() {
            return Err(format!(
                "configuration {} does not match this VM ({})",
                String::from_utf8_lossy(config),
                self.config()
            )
            .into());
        }
        Ok(())
    }

    fn accepts_state(&self, id: &str) -> bool {
        self.known_states
            .as_ref()
            .is_none_or(|known| known.iter().any(|k| k == id))
    }

    fn restore_state(&mut self, states: Vec<StateBlob>) -> Result<(), VmOpError> {
        self.step("restore_state", FailAt::Restore)?;
        self.states = states;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmOpError> {
        self.step("resume", FailAt::Resume)?;
        self.running = true;
        Ok(())
    }
}

/// A destination-side fake: same layout, not running.
pub fn fake_target(layout: &[(u64, usize)]) -> FakeVm {
    let mut vm = FakeVm::new(layout);
    vm.running = false;
    vm
}

/// Guest address of page `page` of region `region` in `layout`.
pub fn page_addr(layout: &[(u64, usize)], region: usize, page: usize) -> u64 {
    layout[region].0 + page as u64 * PAGE_SIZE_U64
}

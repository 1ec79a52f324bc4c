//! What this crate asks of a VM: the contract the vmm implements (and [`crate::fake::FakeVm`]
//! in tests), in one place.
//!
//! - [`GuestRam`]: the guest's RAM as regions, on both sides.
//! - [`DirtyLog`]: which pages the guest (or the vmm) wrote since the last look, on the source.
//! - [`MigrationSource`]: configuration, pause/resume, state save, the between-passes hook.
//! - [`MigrationTarget`]: configuration check, which device states it takes, state restore,
//!   resume.
//!
//! Every call returns a [`VmOpError`] on failure: the implementation's own error, opaque here,
//! kept with its chain of sources so that the messages reach the operator whole.

use crate::dirty::DirtyBitmap;
use crate::local::SharedRegion;
use crate::memory::RamRegion;
use crate::records::StateBlob;
use crate::stats::{PassStats, ReceiveStats};

/// A failed VM operation, as the implementation of this contract reported it.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct VmOpError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl VmOpError {
    /// Wraps the implementation's error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> VmOpError {
        VmOpError(Box::new(e))
    }
}

impl From<String> for VmOpError {
    fn from(message: String) -> VmOpError {
        VmOpError(message.into())
    }
}

impl From<&str> for VmOpError {
    fn from(message: &str) -> VmOpError {
        VmOpError(message.into())
    }
}

/// Something that owns guest RAM and lists it as regions (index = region number in the
/// stream and in dirty-log calls). The list must not change during a migration.
pub trait GuestRam {
    fn ram_regions(&self) -> Vec<RamRegion>;
}

/// The dirty log of a VM, one bitmap per RAM region (`GuestRam::ram_regions` order).
///
/// The sender switches logging on before it reads the first byte of guest memory and relies
/// on one promise, whatever the implementation:
///
/// > A write to a page after [`clear_dirty_log`](Self::clear_dirty_log) covered it is
/// > reported by a later [`fetch_dirty_log`](Self::fetch_dirty_log); a page no
/// > `clear_dirty_log` covered since logging started is reported by every fetch, or its
/// > writes are.
///
/// The sender keeps its side: while the guest runs, it clears every page before it reads it
/// (`ram_send.rs`). Two implementations fit:
///
/// - *initially set* (KVM `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with
///   `KVM_DIRTY_LOG_INITIALLY_SET`): starting protects nothing and every bit starts set;
///   a fetch reads the bits without clearing them; `clear_dirty_log` clears bits and
///   write-protects their pages, so the next write to one sets its bit again;
/// - *protect on fetch* (plain `KVM_GET_DIRTY_LOG`): starting write-protects every page with
///   all bits clear; a fetch returns the bits, clears them and re-protects those pages;
///   `clear_dirty_log` has nothing to do (the default).
///
/// An implementation must OR in every way guest memory changes: KVM's dirty log for vCPU
/// writes and the vmm's own log for device and vmm writes (and discards such as a balloon's
/// `MADV_DONTNEED`), the latter reported by the next fetch after the write.
pub trait DirtyLog {
    /// Starts logging (KVM: `KVM_MEM_LOG_DIRTY_PAGES` on every slot).
    fn start_dirty_log(&mut self) -> Result<(), VmOpError>;
    /// Stops logging.
    fn stop_dirty_log(&mut self) -> Result<(), VmOpError>;
    /// ORs into `bitmap` the pages of region `region` the log holds as written (see the
    /// promise above; KVM: `KVM_GET_DIRTY_LOG`).
    fn fetch_dirty_log(&mut self, region: usize, bitmap: &mut DirtyBitmap)
        -> Result<(), VmOpError>;
    /// Forgets that the pages of region `region` set in `pages` were written and re-arms
    /// logging for them: bit `i` of word `w` is page `first_page + 64 * w + i`
    /// (`first_page` is a multiple of 64; bits past the region's end are ignored). Once it
    /// returns, a write to any of those pages is reported by a later fetch (KVM:
    /// `KVM_CLEAR_DIRTY_LOG`). Implementations whose fetch re-protects need do nothing.
    fn clear_dirty_log(
        &mut self,
        _region: usize,
        _first_page: usize,
        _pages: &[u64],
    ) -> Result<(), VmOpError> {
        Ok(())
    }
}

/// What the vmm provides on the source. Region indices are positions in `ram_regions()`.
pub trait MigrationSource: GuestRam + DirtyLog {
    /// Configuration the destination validates before any RAM is sent (memory layout, vCPU
    /// count, CPUID...; opaque here, e.g. JSON).
    fn config_blob(&self) -> Result<Vec<u8>, VmOpError>;
    /// Stops every vCPU and device that could write guest memory. On failure no vCPU may be
    /// left paused: the guest runs as before.
    fn pause(&mut self) -> Result<(), VmOpError>;
    /// Lets the guest run again after [`pause`](Self::pause).
    fn resume(&mut self) -> Result<(), VmOpError>;
    /// With the guest paused: every device and vCPU state, in restore order.
    fn save_state(&mut self) -> Result<Vec<StateBlob>, VmOpError>;
    /// Called after each pre-copy pass with its statistics and the throttle the convergence
    /// policy asks for (percent of vCPU time taken away; 0 = none): the place to throttle
    /// vCPUs (auto-converge). An error aborts the migration.
    fn between_passes(&mut self, _last: &PassStats, _throttle_pct: u32) -> Result<(), VmOpError> {
        Ok(())
    }
}

/// What the vmm provides on the destination.
///
/// Contract: between `validate_config` and `resume` nothing but this crate writes guest
/// memory (no vCPU runs, no firmware is loaded); that is what makes zero-page elision safe.
pub trait MigrationTarget: GuestRam {
    /// Checks the source's configuration; the vmm may create the guest memory from it here.
    /// Called before [`GuestRam::ram_regions`].
    fn validate_config(&mut self, config: &[u8]) -> Result<(), VmOpError>;
    /// Whether a device state with this id is one the target restores (after
    /// `validate_config`, which may decide the set, e.g. one state per vCPU). The receiver
    /// asks as each state arrives and refuses the stream at the first unknown one, so it never
    /// keeps states it would throw away.
    fn accepts_state(&self, id: &str) -> bool;
    /// Local migration: `regions`, the source's guest memory handed over by descriptor,
    /// become this VM's guest memory in place of its own (same layout). Called after
    /// [`validate_config`](Self::validate_config), before [`GuestRam::ram_regions`]. Until
    /// `resume` the source's guest runs on this memory: map it, never write it. The default
    /// refuses.
    fn adopt_memory(&mut self, regions: Vec<SharedRegion>) -> Result<(), VmOpError> {
        let _ = regions;
        Err("this VM cannot take guest memory by descriptor".into())
    }
    /// A receive that adopted memory failed before the commit: the memory is the source's
    /// again. Unmap it, so nothing here (a later attempt, a stray write) can touch it.
    fn release_memory(&mut self) {}
    /// Restores every device and vCPU state (in stream order). Called only after the whole
    /// stream arrived and its end checksum matched.
    fn restore_state(&mut self, states: Vec<StateBlob>) -> Result<(), VmOpError>;
    /// Starts the restored guest.
    fn resume(&mut self) -> Result<(), VmOpError>;
    /// A short report (UTF-8, e.g. JSON) sent back to the source with the `Running`
    /// acknowledgement: what the destination measured after it resumed, given what the
    /// receive measured.
    fn running_report(&self, _stats: &ReceiveStats) -> Vec<u8> {
        Vec::new()
    }
}

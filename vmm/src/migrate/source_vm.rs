//! The running VM as a [`MigrationSource`]: a thin adapter from the migration crate's contract
//! to [`Vmm`] operations. The `Vmm` lock is held only for each operation, never while guest
//! memory is hashed.

use std::sync::{Arc, Mutex};

use migration::{
    regions_from_guest_memory, DirtyBitmap, DirtyLog, GuestRam, MigrationSource, PassStats,
    RamRegion, StateBlob, VmOpError,
};

use super::throttle::Throttle;
use crate::persist::{self, MemoryHash, MigrationConfig};
use crate::sync::lock;
use crate::Vmm;

/// The source VM during one migration.
pub struct SourceVm {
    vmm: Arc<Mutex<Vmm>>,
    regions: Vec<RamRegion>,
    config: MigrationConfig,
    /// Hash guest memory at the final pause and send it for the destination to check.
    verify_memory: bool,
    /// The hash taken at the final pause (with `verify_memory`).
    pub memory_hash: Option<MemoryHash>,
    throttle: Throttle,
}

impl SourceVm {
    pub fn new(vmm: Arc<Mutex<Vmm>>, verify_memory: bool) -> Result<SourceVm, VmOpError> {
        let (regions, config) = {
            let v = lock(&vmm);
            let regions = regions_from_guest_memory(v.memory()).map_err(VmOpError::new)?;
            if regions.len() != v.memory_slots().len() {
                return Err("guest memory regions and KVM slots differ".into());
            }
            let config = MigrationConfig::new(v.config(), v.guest_cpuid(), v.saved_msrs());
            (regions, config)
        };
        Ok(SourceVm {
            throttle: Throttle::new(vmm.clone()),
            vmm,
            regions,
            config,
            verify_memory,
            memory_hash: None,
        })
    }
}

impl GuestRam for SourceVm {
    fn ram_regions(&self) -> Vec<RamRegion> {
        self.regions.clone()
    }
}

impl DirtyLog for SourceVm {
    fn start_dirty_log(&mut self) -> Result<(), VmOpError> {
        lock(&self.vmm).start_dirty_log().map_err(VmOpError::new)
    }

    fn stop_dirty_log(&mut self) -> Result<(), VmOpError> {
        lock(&self.vmm).stop_dirty_log().map_err(VmOpError::new)
    }

    fn fetch_dirty_log(
        &mut self,
        region: usize,
        bitmap: &mut DirtyBitmap,
    ) -> Result<(), VmOpError> {
        lock(&self.vmm)
            .fetch_dirty_log(region, bitmap)
            .map_err(VmOpError::new)
    }

    fn clear_dirty_log(
        &mut self,
        region: usize,
        first_page: usize,
        pages: &[u64],
    ) -> Result<(), VmOpError> {
        lock(&self.vmm)
            .clear_dirty_log(region, first_page, pages)
            .map_err(VmOpError::new)
    }
}

impl MigrationSource for SourceVm {
    fn config_blob(&self) -> Result<Vec<u8>, VmOpError> {
        serde_json::to_vec(&self.config).map_err(VmOpError::new)
    }

    fn pause(&mut self) -> Result<(), VmOpError> {
        self.throttle.set(0);
        lock(&self.vmm).pause().map_err(VmOpError::new)
    }

    fn resume(&mut self) -> Result<(), VmOpError> {
        self.throttle.set(0);
        lock(&self.vmm).resume().map_err(VmOpError::new)
    }

    fn between_passes(&mut self, _last: &PassStats, throttle_pct: u32) -> Result<(), VmOpError> {
        self.throttle.set(throttle_pct);
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<StateBlob>, VmOpError> {
        let mut snapshot = lock(&self.vmm).save_state().map_err(VmOpError::new)?;
        // The guest is paused: its memory holds still without the lock.
        if self.verify_memory {
            let h = persist::memory_hash(&self.regions);
            self.memory_hash = Some(h);
            snapshot.memory_hash = Some(h);
        }
        snapshot.to_blobs().map_err(VmOpError::new)
    }
}

//! The running VM as a [`MigrationSource`]: KVM's dirty log OR-ed with the VMM's own write
//! log, pause/resume through the vCPU threads, and every state blob saved in restore order.

use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use migration::{
    regions_from_guest_memory, DirtyBitmap, DirtyLog, GuestRam, MigrationSource, PassStats,
    RamRegion, StateBlob, VmError,
};
use vm_memory::GuestMemoryBackend;

use super::throttle::{self, Throttle};
use crate::kvm::vcpu::{VcpuEvent, VcpuResponse, RESPONSE_TIMEOUT};
use crate::persist::{self, MemoryHash, MigrationConfig, SerialSnapshot, VmState};
use crate::Vmm;

/// The source VM during one migration.
pub struct SourceVm {
    vmm: Arc<Mutex<Vmm>>,
    regions: Vec<RamRegion>,
    msr_index_list: Arc<Vec<u32>>,
    config: MigrationConfig,
    /// Hash guest memory at the final pause and send it for the destination to check.
    verify_memory: bool,
    /// The hash taken at the final pause (with `verify_memory`).
    pub memory_hash: Option<MemoryHash>,
    /// Auto-converge, with the downtime limit it aims for (`None`: off).
    auto_converge: Option<Duration>,
    throttle: Throttle,
    /// Highest throttle applied, in percent.
    pub max_throttle_pct: u32,
    /// KVM's dirty bitmap per slot, reused: faulted in at the first fetch, not in the downtime.
    log_words: Vec<Vec<u64>>,
}

fn lock(vmm: &Mutex<Vmm>) -> MutexGuard<'_, Vmm> {
    vmm.lock().unwrap_or_else(|e| e.into_inner())
}

fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> VmError {
    Box::new(e)
}

fn msg(s: String) -> VmError {
    s.into()
}

impl SourceVm {
    pub fn new(
        vmm: Arc<Mutex<Vmm>>,
        verify_memory: bool,
        auto_converge: Option<Duration>,
    ) -> Result<SourceVm, VmError> {
        let (regions, msr_index_list, config) = {
            let v = lock(&vmm);
            let regions = regions_from_guest_memory(v.memory()).map_err(boxed)?;
            let msrs = v.kvm().get_msr_index_list().map_err(boxed)?;
            let supported = v
                .kvm()
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(boxed)?;
            let config = MigrationConfig {
                mem_bytes: v.config().mem_bytes,
                cpus: v.config().cpus,
                cmdline: v.config().cmdline.clone(),
                cpu_features: persist::config::cpu_features(supported.as_slice()),
            };
            (regions, msrs.as_slice().to_vec(), config)
        };
        if regions.len() != lock(&vmm).memory_slots().len() {
            return Err(msg("guest memory regions and KVM slots differ".into()));
        }
        let regions_len = regions.len();
        Ok(SourceVm {
            vmm,
            regions,
            msr_index_list: Arc::new(msr_index_list),
            config,
            verify_memory,
            memory_hash: None,
            auto_converge,
            throttle: Throttle::new(),
            max_throttle_pct: 0,
            log_words: vec![Vec::new(); regions_len],
        })
    }

    /// Save every vCPU through its (paused) thread.
    fn save_vcpus(&self, v: &Vmm) -> Result<Vec<StateBlob>, VmError> {
        let mut out = Vec::new();
        for h in v.vcpu_handles() {
            let (tx, rx) = mpsc::channel();
            h.send_event(VcpuEvent::SaveState {
                msr_index_list: self.msr_index_list.clone(),
                reply: tx,
            })
            .map_err(boxed)?;
            match h
                .response(Instant::now() + RESPONSE_TIMEOUT)
                .map_err(boxed)?
            {
                VcpuResponse::Saved => {}
                other => return Err(msg(format!("vCPU {}: {other:?}", h.id()))),
            }
            let state = rx
                .recv_timeout(RESPONSE_TIMEOUT)
                .map_err(|_| msg(format!("vCPU {} sent no state", h.id())))?
                .map_err(msg)?;
            let id = format!("{}{}", persist::VCPU_ID_PREFIX, h.id());
            let data = persist::encode(&id, &*state).map_err(boxed)?;
            out.push(StateBlob {
                id,
                version: persist::STATE_VERSION,
                data,
            });
        }
        Ok(out)
    }
}

impl GuestRam for SourceVm {
    fn ram_regions(&self) -> Vec<RamRegion> {
        self.regions.clone()
    }
}

impl DirtyLog for SourceVm {
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        let mut v = lock(&self.vmm);
        // Older VMM writes are covered by the bulk pass, which sends everything.
        for r in v.memory().iter() {
            r.get_mmap().bitmap().reset();
        }
        v.set_dirty_logging(true).map_err(boxed)
    }

    fn stop_dirty_log(&mut self) -> Result<(), VmError> {
        lock(&self.vmm).set_dirty_logging(false).map_err(boxed)
    }

    fn fetch_dirty_log(&mut self, region: usize, bitmap: &mut DirtyBitmap) -> Result<(), VmError> {
        let v = lock(&self.vmm);
        let slot = v
            .memory_slots()
            .get(region)
            .ok_or_else(|| msg(format!("no KVM slot for region {region}")))?
            .slot;
        let words = self
            .log_words
            .get_mut(region)
            .ok_or_else(|| msg(format!("no dirty bitmap for region {region}")))?;
        v.dirty_log_into(slot, words).map_err(boxed)?;
        bitmap.merge_words(words).map_err(boxed)?;
        // The VMM's own writes into guest memory (vm-memory's bitmap).
        let r = v
            .memory()
            .iter()
            .nth(region)
            .ok_or_else(|| msg(format!("no guest memory region {region}")))?;
        if let Some(words) = r.get_mmap().bitmap().take() {
            bitmap.merge_words(&words).map_err(boxed)?;
        }
        Ok(())
    }
}

impl MigrationSource for SourceVm {
    fn config_blob(&self) -> Result<Vec<u8>, VmError> {
        serde_json::to_vec(&self.config).map_err(boxed)
    }

    fn pause(&mut self) -> Result<(), VmError> {
        self.throttle.set(&self.vmm, 0);
        lock(&self.vmm).pause().map_err(boxed)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.throttle.set(&self.vmm, 0);
        lock(&self.vmm).resume().map_err(boxed)
    }

    fn between_passes(&mut self, last: &PassStats) -> Result<(), VmError> {
        if let Some(downtime) = self.auto_converge {
            let pct = throttle::next_pct(self.throttle.pct(), last, downtime);
            self.max_throttle_pct = self.max_throttle_pct.max(pct);
            self.throttle.set(&self.vmm, pct);
        }
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<StateBlob>, VmError> {
        let v = lock(&self.vmm);
        let blob = |id: &str, data: Vec<u8>| StateBlob {
            id: id.to_string(),
            version: persist::STATE_VERSION,
            data,
        };
        let mut blobs = Vec::new();
        let vm = VmState::save(v.vm_fd()).map_err(boxed)?;
        blobs.push(blob(
            persist::VM_STATE_ID,
            persist::encode(persist::VM_STATE_ID, &vm).map_err(boxed)?,
        ));
        blobs.extend(self.save_vcpus(&v)?);
        let serial = SerialSnapshot::from(
            &v.devices()
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state(),
        );
        blobs.push(blob(
            persist::SERIAL_ID,
            persist::encode(persist::SERIAL_ID, &serial).map_err(boxed)?,
        ));
        if self.verify_memory {
            let h = persist::memory_hash(&self.regions);
            self.memory_hash = Some(h);
            blobs.push(blob(
                persist::MEMORY_HASH_ID,
                persist::encode(persist::MEMORY_HASH_ID, &(h.hash, h.nonzero_pages))
                    .map_err(boxed)?,
            ));
        }
        Ok(blobs)
    }
}

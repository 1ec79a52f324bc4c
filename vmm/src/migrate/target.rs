//! The destination VM as a [`MigrationTarget`]: built from the incoming configuration with
//! pristine memory (no kernel loaded, nothing written), restored only once the whole stream
//! arrived, then started.

use migration::{
    regions_from_guest_memory, GuestRam, MigrationTarget, RamRegion, ReceiveStats, StateBlob,
    VmError,
};

use crate::config::{KernelSource, VmConfig};
use crate::control::protocol::DestinationReport;
use crate::devices::serial::{SerialOut, StdoutOut};
use crate::persist::{
    self, memory_hash, BlobError, MemoryHash, MigrationConfig, SerialSnapshot, VcpuState, VmState,
};
use crate::Vmm;

/// A destination VM being received.
pub struct TargetVm {
    api_socket: std::path::PathBuf,
    incoming: Option<MigrationConfig>,
    vmm: Option<Vmm>,
    regions: Vec<RamRegion>,
    started: bool,
    /// Hash checked against the source's before resuming (when the source sent one).
    pub memory_hash: Option<MemoryHash>,
}

fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> VmError {
    Box::new(e)
}

impl TargetVm {
    pub fn new(api_socket: std::path::PathBuf) -> TargetVm {
        TargetVm {
            api_socket,
            incoming: None,
            vmm: None,
            regions: Vec::new(),
            started: false,
            memory_hash: None,
        }
    }

    /// Builds the VM before the stream arrives (`receive --mem --cpus`): its memory is
    /// mapped and never written, so the stream finds it pristine. A stream of another shape
    /// replaces it.
    pub fn prepare(&mut self, mem_bytes: u64, cpus: u8) -> Result<(), VmError> {
        self.build(mem_bytes, cpus, String::new())
    }

    fn build(&mut self, mem_bytes: u64, cpus: u8, cmdline: String) -> Result<(), VmError> {
        self.vmm = None;
        let config = VmConfig {
            mem_bytes,
            cpus,
            kernel: KernelSource::BuiltinTestGuest,
            initrd: None,
            cmdline,
            api_socket: self.api_socket.clone(),
        };
        let out: SerialOut = Box::new(StdoutOut);
        let vmm = Vmm::new_for_restore(config, out).map_err(boxed)?;
        self.regions = regions_from_guest_memory(vmm.memory()).map_err(boxed)?;
        self.vmm = Some(vmm);
        Ok(())
    }

    /// Whether the guest was started (after which a failure cannot be retried).
    pub fn started(&self) -> bool {
        self.started
    }

    /// The restored, running VM.
    pub fn into_vmm(self) -> Option<Vmm> {
        self.vmm
    }

    fn vmm(&mut self) -> Result<&mut Vmm, VmError> {
        self.vmm
            .as_mut()
            .ok_or_else(|| "state arrived before the configuration".into())
    }
}

impl GuestRam for TargetVm {
    fn ram_regions(&self) -> Vec<RamRegion> {
        self.regions.clone()
    }
}

impl MigrationTarget for TargetVm {
    fn validate_config(&mut self, blob: &[u8]) -> Result<(), VmError> {
        let cfg: MigrationConfig = serde_json::from_slice(blob)
            .map_err(|e| format!("configuration is not valid JSON: {e}"))?;
        cfg.check_values().map_err(boxed)?;
        let kvm = kvm_ioctls::Kvm::new().map_err(boxed)?;
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(boxed)?;
        cfg.check_cpu(supported.as_slice()).map_err(boxed)?;
        // A prepared VM, or a retry, with the same shape keeps the VM: the migration crate
        // proves its memory zero or resets it before accepting elided pages.
        let built = self
            .vmm
            .as_ref()
            .map(|v| (v.config().mem_bytes, v.config().cpus));
        match self.vmm.as_mut() {
            Some(vmm) if built == Some((cfg.mem_bytes, cfg.cpus)) => {
                vmm.set_cmdline(cfg.cmdline.clone())
            }
            _ => {
                if let Some((mem, cpus)) = built {
                    log::warn!(
                        "Prepared for {mem} bytes and {cpus} vCPUs, the stream has {} and {}: \
                         rebuilding the VM",
                        cfg.mem_bytes,
                        cfg.cpus
                    );
                }
                self.build(cfg.mem_bytes, cfg.cpus, cfg.cmdline.clone())?;
            }
        }
        self.incoming = Some(cfg);
        Ok(())
    }

    fn restore_state(&mut self, states: Vec<StateBlob>) -> Result<(), VmError> {
        let regions = self.regions.clone();
        let cpus = self.incoming.as_ref().map_or(0, |c| c.cpus);
        let find = |id: &str| {
            states
                .iter()
                .find(|s| s.id == id)
                .ok_or_else(|| boxed(BlobError::Missing(id.to_string())))
        };
        for s in &states {
            let known = [
                persist::VM_STATE_ID,
                persist::SERIAL_ID,
                persist::MEMORY_HASH_ID,
            ];
            let vcpu =
                s.id.strip_prefix(persist::VCPU_ID_PREFIX)
                    .and_then(|n| n.parse::<u8>().ok())
                    .is_some_and(|n| n < cpus);
            if !vcpu && !known.contains(&s.id.as_str()) {
                return Err(boxed(BlobError::Unknown(s.id.clone())));
            }
        }
        // Guest memory first: refuse to go on if it is not what the source had.
        if let Ok(b) = find(persist::MEMORY_HASH_ID) {
            let (hash, pages): (u64, u64) = persist::decode(&b.id, b.version, &b.data)?;
            let here = memory_hash(&regions);
            self.memory_hash = Some(here);
            if here.hash != hash || here.nonzero_pages != pages {
                return Err(format!(
                    "guest memory differs from the source's: hash {:016x} over {} pages here, \
                     {hash:016x} over {pages} pages there",
                    here.hash, here.nonzero_pages
                )
                .into());
            }
        }
        let vmm = self.vmm.as_mut().ok_or("no VM")?;
        let b = find(persist::VM_STATE_ID)?;
        let vm: VmState = persist::decode(&b.id, b.version, &b.data)?;
        vm.restore(vmm.vm_fd()).map_err(boxed)?;
        for vcpu in vmm.unstarted_vcpus() {
            let id = format!("{}{}", persist::VCPU_ID_PREFIX, vcpu.id());
            let b = find(&id)?;
            let st: VcpuState = persist::decode(&b.id, b.version, &b.data)?;
            st.restore(vcpu.fd()).map_err(boxed)?;
        }
        let b = find(persist::SERIAL_ID)?;
        let serial: SerialSnapshot = persist::decode(&b.id, b.version, &b.data)?;
        vmm.devices()
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&(&serial).into())
            .map_err(boxed)?;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.vmm()?.start().map_err(boxed)?;
        self.started = true;
        Ok(())
    }

    fn running_report(&self, stats: &ReceiveStats) -> Vec<u8> {
        let report = DestinationReport {
            rss_kib: super::rss_kib(),
            pristine: stats.pristine,
            reset: stats.reset,
            mem_hash: self.memory_hash.map(|h| h.hex()),
            nonzero_pages: self.memory_hash.map(|h| h.nonzero_pages),
        };
        serde_json::to_vec(&report).unwrap_or_default()
    }
}

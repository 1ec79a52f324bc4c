//! The destination VM as a [`MigrationTarget`]: a thin adapter that checks the incoming
//! configuration (the command line's limits, this destination's `--max-mem`/`--max-cpus` or
//! its prepared shape, the guest's CPUID against this host) before it allocates, maps or
//! registers any guest memory, then builds the VM with pristine memory (no kernel loaded,
//! nothing written) and the guest's CPUID, checks that its vCPUs take back every MSR the
//! source saves, restores the state only once the whole stream arrived, then starts it.

use std::path::PathBuf;
use std::sync::Arc;

use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::Kvm;
use migration::{
    regions_from_guest_memory, GuestRam, MigrationTarget, RamRegion, ReceiveStats, SharedRegion,
    StateBlob, VmOpError,
};

use crate::arch::x86_64::cpuid::guest_cpuid;
use crate::builder;
use crate::config::{DirtyTracker, GuestLimits, KernelSource, VmConfig};
use crate::control::protocol::DestinationReport;
use crate::devices::serial::{SerialOut, StdoutOut};
use crate::persist::{memory_hash, MemoryHash, MigrationConfig, VmSnapshot};
use crate::Vmm;

/// A destination VM being received.
pub struct TargetVm {
    api_socket: PathBuf,
    /// How the received VM tracks its guest's writes when it migrates on.
    dirty_tracker: DirtyTracker,
    /// This process's one handle of `/dev/kvm`, shared with the VM it builds.
    kvm: Arc<Kvm>,
    /// What this host's KVM supports, for the configuration check.
    supported_cpuid: Vec<kvm_cpuid_entry2>,
    /// What a stream's guest may be.
    limits: GuestLimits,
    incoming: Option<MigrationConfig>,
    vmm: Option<Vmm>,
    regions: Vec<RamRegion>,
    started: bool,
    /// A start that failed half-way: vCPUs ran on this memory, it takes no other stream.
    unusable: bool,
    /// Hash checked against the source's before resuming (when the source sent one).
    pub memory_hash: Option<MemoryHash>,
    /// The subject of the source's TLS certificate (over TLS), for the Running report.
    pub tls_peer: Option<String>,
}

impl TargetVm {
    pub fn new(
        api_socket: PathBuf,
        limits: GuestLimits,
        dirty_tracker: DirtyTracker,
    ) -> Result<TargetVm, VmOpError> {
        let kvm = builder::open_kvm().map_err(VmOpError::new)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(VmOpError::new)?
            .as_slice()
            .to_vec();
        Ok(TargetVm {
            api_socket,
            dirty_tracker,
            kvm: Arc::new(kvm),
            supported_cpuid,
            limits,
            incoming: None,
            vmm: None,
            regions: Vec::new(),
            started: false,
            unusable: false,
            memory_hash: None,
            tls_peer: None,
        })
    }

    /// Builds the VM before the stream arrives (`receive --mem --cpus`): its memory is
    /// mapped and never written, so the stream finds it pristine. A stream of another shape
    /// is refused (`GuestLimits::shape`).
    pub fn prepare(&mut self, mem_bytes: u64, cpus: u8) -> Result<(), VmOpError> {
        self.build(mem_bytes, cpus, String::new())
    }

    fn build(&mut self, mem_bytes: u64, cpus: u8, cmdline: String) -> Result<(), VmOpError> {
        self.vmm = None;
        let config = VmConfig {
            mem_bytes,
            cpus,
            kernel: KernelSource::BuiltinTestGuest,
            initrd: None,
            cmdline,
            api_socket: self.api_socket.clone(),
            memory: Default::default(),
            dirty_tracker: self.dirty_tracker,
        };
        let out: SerialOut = Box::new(StdoutOut);
        let vmm = Vmm::new_for_restore(config, out, self.kvm.clone()).map_err(VmOpError::new)?;
        self.regions = regions_from_guest_memory(vmm.memory()).map_err(VmOpError::new)?;
        self.vmm = Some(vmm);
        Ok(())
    }

    /// Whether the guest was started (after which a failure cannot be retried).
    pub fn started(&self) -> bool {
        self.started
    }

    /// Whether a start failed after some vCPUs ran (no retry into this VM either).
    pub fn unusable(&self) -> bool {
        self.unusable
    }

    /// The restored, running VM.
    pub fn into_vmm(self) -> Option<Vmm> {
        self.vmm
    }

    fn vmm(&mut self) -> Result<&mut Vmm, VmOpError> {
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
    fn validate_config(&mut self, blob: &[u8]) -> Result<(), VmOpError> {
        let cfg: MigrationConfig =
            serde_json::from_slice(blob).map_err(|e| format!("configuration is not valid: {e}"))?;
        // Nothing is allocated, mapped or registered before these pass.
        let (mem_bytes, cpus) = cfg.check_values().map_err(VmOpError::new)?;
        cfg.check_limits(&self.limits).map_err(VmOpError::new)?;
        cfg.check_cpu(&guest_cpuid(&self.supported_cpuid, cpus))
            .map_err(VmOpError::new)?;
        // A prepared VM, or a retry, with the same shape keeps the VM: the migration crate
        // proves its memory zero or resets it before accepting elided pages.
        let built = self
            .vmm
            .as_ref()
            .map(|v| (v.config().mem_bytes, v.config().cpus));
        match self.vmm.as_mut() {
            Some(vmm) if built == Some((mem_bytes, cpus)) => vmm.set_cmdline(cfg.cmdline.clone()),
            _ => self.build(mem_bytes, cpus, cfg.cmdline.clone())?,
        }
        let vmm = self.vmm()?;
        vmm.set_guest_cpuid(cfg.guest_cpuid())
            .map_err(VmOpError::new)?;
        cfg.check_msrs(vmm.saved_msrs()).map_err(VmOpError::new)?;
        self.incoming = Some(cfg);
        Ok(())
    }

    fn adopt_memory(&mut self, shared: Vec<SharedRegion>) -> Result<(), VmOpError> {
        let vmm = self.vmm()?;
        let started = std::time::Instant::now();
        if let Err(e) = vmm.adopt_memory(shared) {
            // Part of it may map the source's memory now: this VM goes, a retry builds anew.
            self.release_memory();
            return Err(VmOpError::new(e));
        }
        self.regions = regions_from_guest_memory(self.vmm()?.memory()).map_err(VmOpError::new)?;
        log::info!(
            "Guest memory handed over by the source (local migration), mapped in {:?}",
            started.elapsed()
        );
        Ok(())
    }

    fn release_memory(&mut self) {
        // The VM maps the source's memory: drop it (unmapping it) before anything here could
        // touch it; another attempt gets a VM of its own.
        self.regions.clear();
        if self.vmm.take().is_some() {
            log::info!("Released the source's guest memory");
        }
    }

    fn accepts_state(&self, id: &str) -> bool {
        let cpus = self.incoming.as_ref().map_or(0, |c| c.cpus);
        VmSnapshot::is_known_id(id, u8::try_from(cpus).unwrap_or(0))
    }

    fn restore_state(&mut self, states: Vec<StateBlob>) -> Result<(), VmOpError> {
        let (cpus, msrs) = self
            .incoming
            .as_ref()
            .map_or((0, Vec::new()), |c| (c.cpus, c.msrs.clone()));
        let snapshot = VmSnapshot::from_blobs(&states, u8::try_from(cpus).unwrap_or(0))
            .map_err(VmOpError::new)?;
        // Exactly the MSRs the configuration announced (and this host's vCPUs take back).
        for v in &snapshot.vcpus {
            let saved: Vec<u32> = v.msrs.iter().map(|&(i, _)| i).collect();
            if saved != msrs {
                return Err(format!(
                    "vCPU {} state holds MSRs {saved:x?}, the configuration announced {msrs:x?}",
                    v.id
                )
                .into());
            }
        }
        // Guest memory first: refuse to go on if it is not what the source had.
        if let Some(there) = snapshot.memory_hash {
            let here = memory_hash(&self.regions);
            self.memory_hash = Some(here);
            if here != there {
                return Err(format!(
                    "guest memory differs from the source's: hash {} over {} pages here, \
                     {} over {} pages there",
                    here.hex(),
                    here.nonzero_pages,
                    there.hex(),
                    there.nonzero_pages
                )
                .into());
            }
        }
        self.vmm()?.restore_state(&snapshot).map_err(VmOpError::new)
    }

    fn resume(&mut self) -> Result<(), VmOpError> {
        if let Err(e) = self.vmm()?.start() {
            self.unusable = true;
            return Err(VmOpError::new(e));
        }
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
            tls_peer: self.tls_peer.clone(),
        };
        serde_json::to_vec(&report).unwrap_or_default()
    }
}

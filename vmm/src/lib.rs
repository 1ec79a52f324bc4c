//! minivmm: a small KVM virtual machine monitor built for live migration.
//!
//! Flow of `minivmm run` ([`runner::run`]):
//!
//! ```text
//! VmConfig ─▶ BootSources::open (files checked) ─▶ control::bind (socket)
//!          ─▶ Vmm::new: open_kvm → create_vm → create_memory → load_kernel
//!                       → setup_devices → guest_cpuid → create_vcpus → settle_msrs
//!                       → configure_boot_vcpu
//!          ─▶ event loop (event-manager): exit eventfd, signalfd, control socket, stdin
//!          ─▶ Vmm::start (one thread per vCPU) … until an exit reason is recorded
//!          ─▶ vCPUs finished, terminal restored, socket removed → VmExit
//! ```
//!
//! vCPU threads dispatch port I/O to the [`devices::PioBus`]; whoever ends the VM (a device, a
//! vCPU, the control socket, a signal) records a [`exit::VmExit`] in the shared
//! [`exit::ExitSignal`], which wakes the event loop.
//!
//! For migration the [`Vmm`] offers what the migration's VM adapters (`migrate/source_vm.rs`,
//! `migrate/target_vm.rs`) need: `pause`/`resume` (all vCPUs stopped with pending I/O
//! completed), the guest memory, the dirty log (KVM's and the VMM's own writes), and the whole
//! state as a typed [`persist::VmSnapshot`] (`save_state`/`restore_state`).

pub mod arch;
pub mod boot;
pub mod builder;
pub mod cli;
pub mod config;
pub mod control;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod kvm;
pub mod migrate;
pub mod persist;
pub mod plot;
pub mod procfs;
pub mod runner;
pub mod signals;
pub mod sync;
pub mod terminal;
pub mod test_utils;
pub mod tls_init;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::Kvm;
use log::{info, warn};
use migration::dirty::DirtyError;
use migration::DirtyBitmap;
use vm_memory::GuestMemoryBackend;

use crate::boot::BootSources;
use crate::builder::BuildError;
use crate::config::VmConfig;
use crate::devices::serial::SerialOut;
use crate::devices::Devices;
use crate::exit::{ExitSignal, ExitSignalError};
use crate::kvm::memory::GuestMemoryMmap;
use crate::kvm::vcpu::{Vcpu, VcpuError, VcpuEvent, VcpuHandle, VcpuResponse, RESPONSE_TIMEOUT};
use crate::kvm::vm::{MemorySlot, Vm, VmError};
use crate::persist::{SerialSnapshot, VcpuStateError, VmSnapshot, VmState, VmStateError};
use crate::sync::lock;

/// Errors of VM lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot create the exit signal")]
    ExitSignal(#[source] ExitSignalError),
    #[error("cannot build the VM")]
    Build(#[source] BuildError),
    #[error("the VM is already started")]
    AlreadyStarted,
    #[error("the VM is not started")]
    NotStarted,
    #[error("cannot start vCPU")]
    StartVcpu(#[source] VcpuError),
    #[error("cannot pause vCPU")]
    Pause(#[source] VcpuError),
    #[error("cannot resume vCPU")]
    Resume(#[source] VcpuError),
    #[error("dirty logging")]
    DirtyLog(#[source] VmError),
    #[error("no guest memory region {0}")]
    NoSuchRegion(usize),
    #[error("merging the dirty log of region {0}")]
    MergeDirtyLog(usize, #[source] DirtyError),
    #[error("the VM is {0} and cannot {1}")]
    WrongState(RunState, &'static str),
    #[error("cannot save the VM state")]
    SaveVm(#[source] VmStateError),
    #[error("cannot save vCPU state")]
    SaveVcpu(#[source] VcpuError),
    #[error("cannot restore the VM state")]
    RestoreVm(#[source] VmStateError),
    #[error("cannot restore the state of vCPU {0}")]
    RestoreVcpu(u8, #[source] VcpuStateError),
    #[error("the snapshot has {found} vCPUs, the VM {expected}")]
    VcpuCount { found: usize, expected: usize },
    #[error("cannot restore the serial port")]
    RestoreSerial(#[source] crate::devices::serial::SerialError),
    #[error("cannot give the vCPUs the guest's CPUID")]
    GuestCpuid(#[source] BuildError),
    #[error("cannot take over the source's guest memory")]
    AdoptMemory(#[source] crate::kvm::memory::MemoryError),
}

/// Whether the vCPUs run (`status` spells it in lowercase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Built, vCPU threads not started.
    Created,
    Running,
    Paused,
    /// A vCPU could not start; the ones that had were stopped. It never runs.
    Failed,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Created => "created",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Failed => "failed",
        })
    }
}

/// A VM: KVM objects, guest memory, devices and vCPUs.
///
/// Field order is drop order: vCPU threads end first, guest memory is unmapped last.
pub struct Vmm {
    handles: Vec<VcpuHandle>,
    vcpus: Vec<Vcpu>,
    devices: Devices,
    vm: Vm,
    kvm: Arc<Kvm>,
    memory: GuestMemoryMmap,
    /// After a local migration's [`Vmm::adopt_memory`]: the memory first made for this VM,
    /// which still owns (and unmaps, last) the address ranges `memory` maps the source's
    /// files at.
    _address_owner: Option<GuestMemoryMmap>,
    exit: Arc<ExitSignal>,
    config: VmConfig,
    state: RunState,
    started_at: Instant,
    /// The CPUID the guest sees (vCPU 0's table; each vCPU has its own APIC id in it).
    cpuid: Vec<kvm_cpuid_entry2>,
    /// The MSRs a vCPU's saved state holds (`builder::settle_msrs`).
    msrs: Arc<Vec<u32>>,
    /// KVM's dirty bitmap per slot, reused: faulted in at the first fetch, not in the downtime.
    dirty_scratch: Vec<Vec<u64>>,
    /// How long a pause, resume or state save waits for the vCPUs.
    response_timeout: Duration,
    /// Test hook of `start`.
    fail_start_at: Option<usize>,
}

impl Vmm {
    /// Build a VM booting `sources`, with serial output to `out`. The vCPUs are created and
    /// configured but not started.
    pub fn new(
        config: VmConfig,
        sources: &mut BootSources,
        out: SerialOut,
    ) -> Result<Vmm, VmmError> {
        let kvm = builder::open_kvm().map_err(VmmError::Build)?;
        Vmm::build(config, Some(sources), out, Arc::new(kvm))
    }

    /// Build a VM with the same layout, devices and vCPUs (CPUID, MSRs) but no kernel: guest
    /// memory stays pristine (all zero, untouched) and the vCPUs keep their reset state, for a
    /// restore that sets memory and state from a snapshot ([`Vmm::restore_state`]) before
    /// [`Vmm::start`]. `kvm` is the caller's handle of `/dev/kvm`, shared.
    pub fn new_for_restore(
        config: VmConfig,
        out: SerialOut,
        kvm: Arc<Kvm>,
    ) -> Result<Vmm, VmmError> {
        Vmm::build(config, None, out, kvm)
    }

    fn build(
        config: VmConfig,
        sources: Option<&mut BootSources>,
        out: SerialOut,
        kvm: Arc<Kvm>,
    ) -> Result<Vmm, VmmError> {
        let exit = Arc::new(ExitSignal::new().map_err(VmmError::ExitSignal)?);
        let build = || -> Result<Vmm, BuildError> {
            let mut vm = builder::create_vm(&kvm, &config)?;
            let memory = builder::create_memory(&kvm, &mut vm, &config)?;
            let entry = match sources {
                Some(s) => {
                    crate::kvm::memory::advise_huge_pages(&memory);
                    Some(builder::load_kernel(s, &memory, &config)?)
                }
                None => None,
            };
            let devices = builder::setup_devices(&vm, &exit, out)?;
            let mut cpuid = builder::guest_cpuid(&kvm, &config)?;
            let vcpus = builder::create_vcpus(&vm, &config, &cpuid, &devices, &exit, &memory)?;
            let msrs = Arc::new(builder::settle_msrs(&kvm, &vcpus, &mut cpuid)?);
            if let (Some(bsp), Some(entry)) = (vcpus.first(), entry) {
                builder::configure_boot_vcpu(bsp, &entry)?;
            }
            let dirty_scratch = vec![Vec::new(); vm.slots().len()];
            Ok(Vmm {
                handles: Vec::new(),
                vcpus,
                devices,
                vm,
                kvm: kvm.clone(),
                memory,
                _address_owner: None,
                exit: exit.clone(),
                config: config.clone(),
                state: RunState::Created,
                started_at: Instant::now(),
                cpuid,
                msrs,
                dirty_scratch,
                response_timeout: RESPONSE_TIMEOUT,
                fail_start_at: None,
            })
        };
        build().map_err(VmmError::Build)
    }

    /// Spawn one thread per vCPU. If vCPU k cannot start, vCPUs 0..k, which already run the
    /// guest, are stopped again and the VM is [`RunState::Failed`]: it never starts again
    /// (its memory was run on; a destination must not receive into it once more).
    pub fn start(&mut self) -> Result<(), VmmError> {
        self.start_threads(false)
    }

    /// Test hook: [`start`](Self::start) with every vCPU thread paused before it ever entered
    /// the guest, so that [`save_state`](Self::save_state) sees exactly the state the vCPUs
    /// were given (set through [`kvm_handles`](Self::kvm_handles) or
    /// [`restore_state`](Self::restore_state)); [`resume`](Self::resume) lets them run.
    #[doc(hidden)]
    pub fn start_paused(&mut self) -> Result<(), VmmError> {
        self.start_threads(true)
    }

    /// Test hook: the KVM handles of the VM and of its vCPUs (empty once started), to set
    /// state directly through KVM before [`start_paused`](Self::start_paused).
    #[doc(hidden)]
    pub fn kvm_handles(&self) -> (&kvm_ioctls::VmFd, Vec<&kvm_ioctls::VcpuFd>) {
        (self.vm.fd(), self.vcpus.iter().map(Vcpu::fd).collect())
    }

    fn start_threads(&mut self, paused: bool) -> Result<(), VmmError> {
        if self.state != RunState::Created {
            return Err(VmmError::AlreadyStarted);
        }
        let run_size = self.vm.fd().run_size();
        for (i, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let started = match self.fail_start_at {
                Some(k) if k == i => Err(VcpuError::Spawn(
                    vcpu.id(),
                    std::io::Error::other("injected start failure"),
                )),
                _ => vcpu.start(run_size, paused),
            };
            match started {
                Ok(h) => self.handles.push(h),
                Err(e) => {
                    warn!(
                        "vCPU {i} did not start: stopping the {} started before it",
                        self.handles.len()
                    );
                    self.shutdown();
                    self.state = RunState::Failed;
                    return Err(VmmError::StartVcpu(e));
                }
            }
        }
        self.state = if paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        self.started_at = Instant::now();
        info!("VM started with {} vCPUs", self.handles.len());
        Ok(())
    }

    /// Test hook: [`start`](Self::start) fails at vCPU `k` as a failed thread spawn would.
    #[doc(hidden)]
    pub fn inject_start_failure(&mut self, k: usize) {
        self.fail_start_at = Some(k);
    }

    /// Sends `event` to every vCPU.
    fn send_to_all(&self, event: fn() -> VcpuEvent) -> Result<(), VcpuError> {
        self.handles.iter().try_for_each(|h| h.send_event(event()))
    }

    /// Waits (bounded in all) for the answer `want` from the vCPUs `which` (indices into
    /// the handles): those that gave it, and the first failure.
    fn collect(&self, which: &[usize], want: &'static str) -> (Vec<usize>, Option<VcpuError>) {
        let deadline = Instant::now() + self.response_timeout;
        let mut ok = Vec::with_capacity(which.len());
        let mut failure = None;
        for &i in which {
            let h = &self.handles[i];
            match h.response(deadline) {
                Ok(r) if r.name() == want => ok.push(i),
                Ok(other) => {
                    failure.get_or_insert(VcpuError::UnexpectedResponse(
                        h.id(),
                        other.name(),
                        want,
                    ));
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        (ok, failure)
    }

    /// Stop every vCPU (pending I/O completed); returns once all of them confirmed. If one
    /// does not (it is stuck, say writing to a console nobody reads), those that paused run
    /// again and the VM stays `Running`: a failed pause leaves nothing paused.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        match self.state {
            RunState::Created | RunState::Failed => return Err(VmmError::NotStarted),
            RunState::Paused => return Ok(()),
            RunState::Running => {}
        }
        let t = Instant::now();
        let all: Vec<usize> = (0..self.handles.len()).collect();
        let (paused, failure) = match self.send_to_all(|| VcpuEvent::Pause) {
            Ok(()) => self.collect(&all, "Paused"),
            Err(e) => (Vec::new(), Some(e)),
        };
        let Some(e) = failure else {
            self.state = RunState::Paused;
            info!("VM paused in {:?}", t.elapsed());
            return Ok(());
        };
        warn!(
            "pausing failed ({e}); resuming the {} of {} vCPUs that paused",
            paused.len(),
            all.len()
        );
        // Every vCPU gets Resume: one that has not answered finds it right after its Pause.
        let _ = self.send_to_all(|| VcpuEvent::Resume);
        if let (_, Some(again)) = self.collect(&paused, "Resumed") {
            warn!("a paused vCPU did not resume at once: {again}");
        }
        Err(VmmError::Pause(e))
    }

    /// Let every vCPU run again. A vCPU that does not confirm in time still has the request
    /// and runs once it gets to it: the VM counts as running either way.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        match self.state {
            RunState::Created | RunState::Failed => return Err(VmmError::NotStarted),
            RunState::Running => return Ok(()),
            RunState::Paused => {}
        }
        let all: Vec<usize> = (0..self.handles.len()).collect();
        let failure = match self.send_to_all(|| VcpuEvent::Resume) {
            Ok(()) => self.collect(&all, "Resumed").1,
            Err(e) => Some(e),
        };
        self.state = RunState::Running;
        match failure {
            None => {
                info!("VM resumed");
                Ok(())
            }
            Some(e) => Err(VmmError::Resume(e)),
        }
    }

    /// How long each pause, resume or state save waits for every vCPU's answer.
    pub fn set_response_timeout(&mut self, timeout: Duration) {
        self.response_timeout = timeout;
    }

    /// End every vCPU thread (bounded wait each).
    pub fn shutdown(&mut self) {
        for h in &mut self.handles {
            h.finish();
        }
        self.handles.clear();
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Records the guest command line of a VM received into one built beforehand (it is
    /// informational: it travels on with the next migration).
    pub fn set_cmdline(&mut self, cmdline: String) {
        self.config.cmdline = cmdline;
    }

    /// The CPUID the guest sees (vCPU 0's table).
    pub fn guest_cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.cpuid
    }

    /// The MSRs each vCPU's saved state holds.
    pub fn saved_msrs(&self) -> &[u32] {
        &self.msrs
    }

    /// Before the first start: every vCPU takes `cpuid` (vCPU 0's table of a guest received
    /// here, checked against this host beforehand; it is not changed), and the MSRs to save
    /// are those the vCPUs take back under it.
    pub fn set_guest_cpuid(&mut self, cpuid: Vec<kvm_cpuid_entry2>) -> Result<(), VmmError> {
        if self.state != RunState::Created {
            return Err(VmmError::WrongState(self.state, "change its CPUID"));
        }
        builder::set_vcpu_cpuid(&self.vcpus, &cpuid).map_err(VmmError::GuestCpuid)?;
        let msrs = builder::vm_msrs(&self.kvm, &self.vcpus).map_err(VmmError::GuestCpuid)?;
        self.cpuid = cpuid;
        self.msrs = Arc::new(msrs);
        Ok(())
    }

    /// Guest memory; its bitmaps record the VMM's own writes.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The handle of `/dev/kvm` this VM was made with.
    pub fn kvm(&self) -> &Arc<Kvm> {
        &self.kvm
    }

    /// Local migration, before the first start: guest memory becomes the source's files
    /// (`shared`), mapped over this VM's own memory at the same addresses (KVM's slots stay),
    /// and nothing is written to it. On an error the VM must be dropped: some regions may be
    /// the source's already.
    pub fn adopt_memory(&mut self, shared: Vec<migration::SharedRegion>) -> Result<(), VmmError> {
        if self.state != RunState::Created {
            return Err(VmmError::WrongState(self.state, "take over memory"));
        }
        let hugepages = shared.iter().any(|s| s.hugetlbfs);
        let adopted =
            crate::kvm::memory::overlay(&self.memory, shared).map_err(VmmError::AdoptMemory)?;
        for vcpu in &mut self.vcpus {
            vcpu.set_memory(adopted.clone());
        }
        let own = std::mem::replace(&mut self.memory, adopted);
        self._address_owner = Some(own);
        self.config.memory = if hugepages {
            config::MemoryBacking::HugePages
        } else {
            config::MemoryBacking::Shared
        };
        Ok(())
    }

    /// Ask for transparent huge pages behind guest RAM (a destination, once its guest runs).
    pub fn advise_huge_pages(&self) {
        crate::kvm::memory::advise_huge_pages(&self.memory);
    }

    /// The KVM memory slots (slot number, guest address, size).
    pub fn memory_slots(&self) -> &[MemorySlot] {
        self.vm.slots()
    }

    /// Auto-converge: keep every vCPU out of the guest for `d` (no answer awaited).
    pub fn throttle(&self, d: Duration) {
        for h in &self.handles {
            let _ = h.throttle(d);
        }
    }

    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    pub fn devices_mut(&mut self) -> &mut Devices {
        &mut self.devices
    }

    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// Starts dirty logging for a migration: KVM's for every slot, and the VMM's own log of
    /// its writes starts empty (older writes are covered by the bulk pass, which sends
    /// everything).
    pub fn start_dirty_log(&mut self) -> Result<(), VmmError> {
        for r in self.memory.iter() {
            r.get_mmap().bitmap().reset();
        }
        self.vm.set_dirty_logging(true).map_err(VmmError::DirtyLog)
    }

    /// Stops KVM's dirty logging.
    pub fn stop_dirty_log(&mut self) -> Result<(), VmmError> {
        self.vm.set_dirty_logging(false).map_err(VmmError::DirtyLog)
    }

    /// ORs into `into` every page of guest memory region `region` (address order, as
    /// `migration::regions_from_guest_memory` lists them) the logs hold as written: by a vCPU
    /// (KVM's dirty log: since the page was last cleared, or since the last fetch, by mode)
    /// or by the VMM itself (since the last fetch).
    pub fn fetch_dirty_log(
        &mut self,
        region: usize,
        into: &mut DirtyBitmap,
    ) -> Result<(), VmmError> {
        let slot = self
            .vm
            .slots()
            .get(region)
            .ok_or(VmmError::NoSuchRegion(region))?
            .slot;
        let words = self
            .dirty_scratch
            .get_mut(region)
            .ok_or(VmmError::NoSuchRegion(region))?;
        self.vm
            .dirty_log_into(slot, words)
            .map_err(VmmError::DirtyLog)?;
        into.merge_words(words)
            .map_err(|e| VmmError::MergeDirtyLog(region, e))?;
        let r = self
            .memory
            .iter()
            .nth(region)
            .ok_or(VmmError::NoSuchRegion(region))?;
        if let Some(words) = r.get_mmap().bitmap().take() {
            into.merge_words(&words)
                .map_err(|e| VmmError::MergeDirtyLog(region, e))?;
        }
        Ok(())
    }

    /// Clears KVM's dirty bits of region `region` set in `bits` (bit `i` of word `w` is page
    /// `first_page + 64 * w + i`) and write-protects those pages, so a later write to one is
    /// in a later fetch (`KVM_CLEAR_DIRTY_LOG`; nothing to do where the fetch re-protects).
    pub fn clear_dirty_log(
        &self,
        region: usize,
        first_page: usize,
        bits: &[u64],
    ) -> Result<(), VmmError> {
        let slot = self
            .vm
            .slots()
            .get(region)
            .ok_or(VmmError::NoSuchRegion(region))?
            .slot;
        self.vm
            .clear_dirty_log(slot, first_page, bits)
            .map_err(VmmError::DirtyLog)
    }

    /// How KVM's dirty log behaves on this VM.
    pub fn dirty_log_mode(&self) -> crate::kvm::vm::DirtyLogMode {
        self.vm.dirty_log_mode()
    }

    /// With the VM paused: the state of the VM, of every vCPU (each saved by its own thread)
    /// and of the serial port. The memory hash is the caller's to add.
    pub fn save_state(&self) -> Result<VmSnapshot, VmmError> {
        if self.state != RunState::Paused {
            return Err(VmmError::WrongState(self.state, "save its state"));
        }
        let vm = VmState::save(self.vm.fd()).map_err(VmmError::SaveVm)?;
        let mut vcpus = Vec::with_capacity(self.handles.len());
        for h in &self.handles {
            h.send_event(VcpuEvent::SaveState(self.msrs.clone()))
                .map_err(VmmError::SaveVcpu)?;
            let state = match h
                .response(Instant::now() + self.response_timeout)
                .map_err(VmmError::SaveVcpu)?
            {
                VcpuResponse::Saved(Ok(state)) => *state,
                VcpuResponse::Saved(Err(e)) => {
                    return Err(VmmError::SaveVcpu(VcpuError::Save(h.id(), e)))
                }
                VcpuResponse::NotAllowed(why) => {
                    return Err(VmmError::SaveVcpu(VcpuError::NotAllowed(h.id(), why)))
                }
                other => {
                    return Err(VmmError::SaveVcpu(VcpuError::UnexpectedResponse(
                        h.id(),
                        other.name(),
                        "Saved",
                    )))
                }
            };
            vcpus.push(state);
        }
        let serial = SerialSnapshot::from(&lock(&self.devices.serial).state());
        Ok(VmSnapshot {
            vm,
            vcpus,
            serial,
            memory_hash: None,
        })
    }

    /// Before the first start: the VM, every vCPU and the serial port take the state of
    /// `snapshot` (which must have as many vCPUs as this VM).
    pub fn restore_state(&mut self, snapshot: &VmSnapshot) -> Result<(), VmmError> {
        if self.state != RunState::Created {
            return Err(VmmError::WrongState(self.state, "restore a state"));
        }
        if snapshot.vcpus.len() != self.vcpus.len() {
            return Err(VmmError::VcpuCount {
                found: snapshot.vcpus.len(),
                expected: self.vcpus.len(),
            });
        }
        snapshot
            .vm
            .restore(self.vm.fd())
            .map_err(VmmError::RestoreVm)?;
        for (vcpu, state) in self.vcpus.iter().zip(&snapshot.vcpus) {
            state
                .restore(vcpu.fd())
                .map_err(|e| VmmError::RestoreVcpu(vcpu.id(), e))?;
        }
        lock(&self.devices.serial)
            .restore(&(&snapshot.serial).into())
            .map_err(VmmError::RestoreSerial)
    }

    /// Time since the vCPUs started.
    pub fn uptime(&self) -> Duration {
        self.started_at.elapsed()
    }
}

/// Render an error and its sources as `a: b: c`.
pub use migration::error_chain;

//! minivmm: a small KVM virtual machine monitor built for live migration.
//!
//! Flow of `minivmm run` ([`runner::run`]):
//!
//! ```text
//! VmConfig ─▶ BootSources::open (files checked) ─▶ control::bind (socket)
//!          ─▶ Vmm::new: open_kvm → create_vm → create_memory → load_kernel
//!                       → setup_devices → create_vcpus → configure_boot_vcpu
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
pub mod procfs;
pub mod runner;
pub mod signals;
pub mod sync;
pub mod terminal;
pub mod test_utils;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use log::info;
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
}

/// Whether the vCPUs run (`status` spells it in lowercase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Built, vCPU threads not started.
    Created,
    Running,
    Paused,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Created => "created",
            RunState::Running => "running",
            RunState::Paused => "paused",
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
    exit: Arc<ExitSignal>,
    config: VmConfig,
    state: RunState,
    started_at: Instant,
    /// The MSRs a vCPU's saved state holds (`KVM_GET_MSR_INDEX_LIST`).
    msr_index_list: Arc<Vec<u32>>,
    /// KVM's dirty bitmap per slot, reused: faulted in at the first fetch, not in the downtime.
    dirty_scratch: Vec<Vec<u64>>,
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
            let vcpus = builder::create_vcpus(&kvm, &vm, &config, &devices, &exit, &memory)?;
            if let (Some(bsp), Some(entry)) = (vcpus.first(), entry) {
                builder::configure_boot_vcpu(bsp, &entry)?;
            }
            let msr_index_list = Arc::new(builder::msr_index_list(&kvm)?);
            let dirty_scratch = vec![Vec::new(); vm.slots().len()];
            Ok(Vmm {
                handles: Vec::new(),
                vcpus,
                devices,
                vm,
                kvm: kvm.clone(),
                memory,
                exit: exit.clone(),
                config: config.clone(),
                state: RunState::Created,
                started_at: Instant::now(),
                msr_index_list,
                dirty_scratch,
            })
        };
        build().map_err(VmmError::Build)
    }

    /// Spawn one thread per vCPU.
    pub fn start(&mut self) -> Result<(), VmmError> {
        if self.state != RunState::Created {
            return Err(VmmError::AlreadyStarted);
        }
        let run_size = self.vm.fd().run_size();
        for vcpu in self.vcpus.drain(..) {
            let h = vcpu.start(run_size).map_err(VmmError::StartVcpu)?;
            self.handles.push(h);
        }
        self.state = RunState::Running;
        self.started_at = Instant::now();
        info!("VM started with {} vCPUs", self.handles.len());
        Ok(())
    }

    fn broadcast(&mut self, event: fn() -> VcpuEvent, want: &'static str) -> Result<(), VcpuError> {
        for h in &self.handles {
            h.send_event(event())?;
        }
        let deadline = Instant::now() + RESPONSE_TIMEOUT;
        for h in &self.handles {
            match h.response(deadline)? {
                r if r.name() == want => {}
                other => {
                    return Err(VcpuError::UnexpectedResponse(h.id(), other.name(), want));
                }
            }
        }
        Ok(())
    }

    /// Stop every vCPU (pending I/O completed); returns once all of them confirmed.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        match self.state {
            RunState::Created => return Err(VmmError::NotStarted),
            RunState::Paused => return Ok(()),
            RunState::Running => {}
        }
        let t = Instant::now();
        self.broadcast(|| VcpuEvent::Pause, "Paused")
            .map_err(VmmError::Pause)?;
        self.state = RunState::Paused;
        info!("VM paused in {:?}", t.elapsed());
        Ok(())
    }

    /// Let every vCPU run again.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        match self.state {
            RunState::Created => return Err(VmmError::NotStarted),
            RunState::Running => return Ok(()),
            RunState::Paused => {}
        }
        self.broadcast(|| VcpuEvent::Resume, "Resumed")
            .map_err(VmmError::Resume)?;
        self.state = RunState::Running;
        info!("VM resumed");
        Ok(())
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

    /// Guest memory; its bitmaps record the VMM's own writes.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The handle of `/dev/kvm` this VM was made with.
    pub fn kvm(&self) -> &Arc<Kvm> {
        &self.kvm
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
    /// `migration::regions_from_guest_memory` lists them) written since the last fetch: by a
    /// vCPU (KVM's dirty log, fetched and cleared) or by the VMM itself.
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

    /// With the VM paused: the state of the VM, of every vCPU (each saved by its own thread)
    /// and of the serial port. The memory hash is the caller's to add.
    pub fn save_state(&self) -> Result<VmSnapshot, VmmError> {
        if self.state != RunState::Paused {
            return Err(VmmError::WrongState(self.state, "save its state"));
        }
        let vm = VmState::save(self.vm.fd()).map_err(VmmError::SaveVm)?;
        let mut vcpus = Vec::with_capacity(self.handles.len());
        for h in &self.handles {
            h.send_event(VcpuEvent::SaveState(self.msr_index_list.clone()))
                .map_err(VmmError::SaveVcpu)?;
            let state = match h
                .response(Instant::now() + RESPONSE_TIMEOUT)
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

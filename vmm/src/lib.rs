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
//! For migration the [`Vmm`] exposes `pause`/`resume` (all vCPUs stopped with pending I/O
//! completed), the guest memory (with the VMM-write bitmap), the VM fd and KVM dirty logging.

pub mod arch;
pub mod boot;
pub mod builder;
pub mod cli;
pub mod config;
pub mod control;
pub mod devices;
pub mod exit;
pub mod kvm;
pub mod migrate;
pub mod persist;
pub mod procfs;
pub mod runner;
pub mod signals;
pub mod terminal;
pub mod test_utils;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use log::info;

use crate::boot::BootSources;
use crate::builder::BuildError;
use crate::config::VmConfig;
use crate::devices::serial::SerialOut;
use crate::devices::Devices;
use crate::exit::{ExitSignal, ExitSignalError};
use crate::kvm::memory::GuestMemoryMmap;
use crate::kvm::vcpu::{Vcpu, VcpuError, VcpuEvent, VcpuHandle, VcpuResponse, RESPONSE_TIMEOUT};
use crate::kvm::vm::{MemorySlot, Vm, VmError};

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

/// A VM: KVM objects, guest memory, devices and vCPUs.
///
/// Field order is drop order: vCPU threads end first, guest memory is unmapped last.
pub struct Vmm {
    handles: Vec<VcpuHandle>,
    vcpus: Vec<Vcpu>,
    devices: Devices,
    vm: Vm,
    kvm: Kvm,
    memory: GuestMemoryMmap,
    exit: Arc<ExitSignal>,
    config: VmConfig,
    state: RunState,
    started_at: Instant,
}

impl Vmm {
    /// Build a VM booting `sources`, with serial output to `out`. The vCPUs are created and
    /// configured but not started.
    pub fn new(
        config: VmConfig,
        sources: &mut BootSources,
        out: SerialOut,
    ) -> Result<Vmm, VmmError> {
        Vmm::build(config, Some(sources), out)
    }

    /// Build a VM with the same layout, devices and vCPUs (CPUID, MSRs) but no kernel: guest
    /// memory stays pristine (all zero, untouched) and the vCPUs keep their reset state, for a
    /// restore that sets memory and state from a snapshot (through [`Vmm::unstarted_vcpus`]
    /// and [`Vmm::vm_fd`]) before [`Vmm::start`].
    pub fn new_for_restore(config: VmConfig, out: SerialOut) -> Result<Vmm, VmmError> {
        Vmm::build(config, None, out)
    }

    fn build(
        config: VmConfig,
        sources: Option<&mut BootSources>,
        out: SerialOut,
    ) -> Result<Vmm, VmmError> {
        let exit = Arc::new(ExitSignal::new().map_err(VmmError::ExitSignal)?);
        let build = || -> Result<Vmm, BuildError> {
            let kvm = builder::open_kvm()?;
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
            Ok(Vmm {
                handles: Vec::new(),
                vcpus,
                devices,
                vm,
                kvm,
                memory,
                exit: exit.clone(),
                config: config.clone(),
                state: RunState::Created,
                started_at: Instant::now(),
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

    fn broadcast(&mut self, event: fn() -> VcpuEvent, want: VcpuResponse) -> Result<(), VcpuError> {
        for h in &self.handles {
            h.send_event(event())?;
        }
        let deadline = Instant::now() + RESPONSE_TIMEOUT;
        for h in &self.handles {
            match h.response(deadline)? {
                r if r == want => {}
                other => return Err(VcpuError::UnexpectedResponse(h.id(), other)),
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
        self.broadcast(|| VcpuEvent::Pause, VcpuResponse::Paused)
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
        self.broadcast(|| VcpuEvent::Resume, VcpuResponse::Resumed)
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

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    pub fn vm_fd(&self) -> &VmFd {
        self.vm.fd()
    }

    /// Ask for transparent huge pages behind guest RAM (a destination, once its guest runs).
    pub fn advise_huge_pages(&self) {
        crate::kvm::memory::advise_huge_pages(&self.memory);
    }

    /// The KVM memory slots (slot number, guest address, size).
    pub fn memory_slots(&self) -> &[MemorySlot] {
        self.vm.slots()
    }

    /// Created vCPUs that are not started yet (their fds, for state restore).
    pub fn unstarted_vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    /// The running vCPU threads' handles.
    pub fn vcpu_handles(&self) -> &[VcpuHandle] {
        &self.handles
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

    /// Switch KVM dirty logging on or off for all memory slots.
    pub fn set_dirty_logging(&mut self, enable: bool) -> Result<(), VmmError> {
        self.vm
            .set_dirty_logging(enable)
            .map_err(VmmError::DirtyLog)
    }

    /// Fetch and clear KVM's dirty bitmap of `slot` (one bit per 4 KiB page).
    pub fn dirty_log(&self, slot: u32) -> Result<Vec<u64>, VmmError> {
        self.vm.dirty_log(slot).map_err(VmmError::DirtyLog)
    }

    /// [`dirty_log`](Self::dirty_log) into `out`, reused from call to call.
    pub fn dirty_log_into(&self, slot: u32, out: &mut Vec<u64>) -> Result<(), VmmError> {
        self.vm
            .dirty_log_into(slot, out)
            .map_err(VmmError::DirtyLog)
    }

    /// Time since the vCPUs started.
    pub fn uptime(&self) -> Duration {
        self.started_at.elapsed()
    }
}

/// Render an error and its sources as `a: b: c`.
pub use migration::error_chain;

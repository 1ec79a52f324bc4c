//! Building a VM in named steps, each taking the configuration:
//!
//! `open_kvm` → `create_vm` → `create_memory` → `load_kernel` → `setup_devices` →
//! `guest_cpuid` → `create_vcpus` → `settle_msrs` → `configure_boot_vcpu`, then `Vmm::start`
//! spawns the vCPU threads.
//!
//! A restore path (migration target) runs the same steps except `load_kernel` and
//! `configure_boot_vcpu`: same layout, pristine memory, vCPU state set from a snapshot.

use std::sync::Arc;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::arch::x86_64::cpuid::{self, vcpu_cpuid};
use crate::arch::x86_64::layout::guest_phys_end;
use crate::arch::x86_64::msr::boot_msr_entries;
use crate::arch::x86_64::regs::{
    configure_boot_vcpu as set_boot_regs, configure_fpu_and_lint, EntryPoint, RegsError,
};
use crate::boot::{self, BootError, BootSources};
use crate::config::{DirtyTracker, VmConfig};
use crate::devices::serial::SerialOut;
use crate::devices::{DeviceError, Devices};
use crate::exit::ExitSignal;
use crate::kvm::memory::{create_guest_memory, GuestMemoryMmap, MemoryError};
use crate::kvm::vcpu::{Vcpu, VcpuError};
use crate::kvm::vm::{DirtyLogMode, Vm, VmError};
use crate::persist::restorable_msrs;

/// Leaf of the physical address width.
const LEAF_ADDRESS_SIZES: u32 = 0x8000_0008;

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("--cpus {requested} is above this host's KVM limit of {max}")]
    TooManyCpus { requested: u8, max: usize },
    #[error("cannot read KVM's supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("--mem {mem_bytes} bytes needs guest physical addresses up to {end:#x}, beyond this host's {bits}-bit limit")]
    MemBeyondPhysBits { mem_bytes: u64, end: u64, bits: u32 },
    #[error("cannot create the VM")]
    Vm(#[source] VmError),
    #[error("cannot create {0} bytes of guest memory (--mem)")]
    Memory(u64, #[source] MemoryError),
    #[error("cannot register guest memory (--mem) with KVM")]
    RegisterMemory(#[source] VmError),
    #[error("cannot load the guest")]
    Boot(#[source] BootError),
    #[error("cannot set up devices")]
    Devices(#[source] DeviceError),
    #[error("cannot create vCPU")]
    Vcpu(#[source] VcpuError),
    #[error("CPUID of vCPU {0} has too many entries")]
    CpuidTooLarge(u8),
    #[error("cannot set CPUID of vCPU {0}")]
    SetCpuid(u8, #[source] kvm_ioctls::Error),
    #[error("cannot build the MSR list")]
    MsrList,
    #[error("cannot list the MSRs KVM saves (KVM_GET_MSR_INDEX_LIST)")]
    MsrIndexList(#[source] kvm_ioctls::Error),
    #[error("cannot set MSRs of vCPU {0}")]
    SetMsrs(u8, #[source] kvm_ioctls::Error),
    #[error("vCPU {0} took {1} of {2} boot MSRs")]
    PartialMsrs(u8, usize, usize),
    #[error("cannot set registers of vCPU {0}")]
    Regs(u8, #[source] RegsError),
}

/// Open `/dev/kvm`.
pub fn open_kvm() -> Result<Kvm, BuildError> {
    Kvm::new().map_err(BuildError::OpenKvm)
}

/// The MSRs this KVM saves and restores for a vCPU (`KVM_GET_MSR_INDEX_LIST`).
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, BuildError> {
    kvm.get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .map_err(BuildError::MsrIndexList)
}

/// Create the VM (irqchip, PIT) after checking the configuration against this host.
pub fn create_vm(kvm: &Kvm, config: &VmConfig) -> Result<Vm, BuildError> {
    let max = kvm.get_max_vcpus();
    if usize::from(config.cpus) > max {
        return Err(BuildError::TooManyCpus {
            requested: config.cpus,
            max,
        });
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    let bits = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_ADDRESS_SIZES)
        .map_or(36, |e| e.eax & 0xff);
    let end = guest_phys_end(config.mem_bytes);
    if bits < 64 && end > (1u64 << bits) {
        return Err(BuildError::MemBeyondPhysBits {
            mem_bytes: config.mem_bytes,
            end,
            bits,
        });
    }
    match config.dirty_tracker {
        DirtyTracker::Bitmap => Vm::with_dirty_log_mode(kvm, DirtyLogMode::ManualInitiallySet),
        DirtyTracker::BitmapProtect => Vm::with_dirty_log_mode(kvm, DirtyLogMode::ProtectOnFetch),
        DirtyTracker::Ring { entries } => Vm::with_dirty_ring(kvm, entries),
    }
    .map_err(BuildError::Vm)
}

/// Map guest memory and register every region as a KVM slot.
pub fn create_memory(
    kvm: &Kvm,
    vm: &mut Vm,
    config: &VmConfig,
) -> Result<GuestMemoryMmap, BuildError> {
    let mem = create_guest_memory(config.mem_bytes, config.memory)
        .map_err(|e| BuildError::Memory(config.mem_bytes, e))?;
    vm.register_memory(kvm, &mem)
        .map_err(BuildError::RegisterMemory)?;
    Ok(mem)
}

/// Load kernel, initrd, command line and boot tables.
pub fn load_kernel(
    sources: &mut BootSources,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
) -> Result<EntryPoint, BuildError> {
    boot::load(sources, mem, config).map_err(BuildError::Boot)
}

/// Create the devices; serial output goes to `out`.
pub fn setup_devices(
    vm: &Vm,
    exit: &Arc<ExitSignal>,
    out: SerialOut,
) -> Result<Devices, BuildError> {
    Devices::new(vm, exit, out).map_err(BuildError::Devices)
}

/// The CPUID a guest of this host sees (vCPU 0's): KVM's supported set, nested
/// virtualisation hidden, topology for `config.cpus` (`arch::x86_64::cpuid`).
pub fn guest_cpuid(kvm: &Kvm, config: &VmConfig) -> Result<Vec<kvm_cpuid_entry2>, BuildError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    Ok(cpuid::guest_cpuid(supported.as_slice(), config.cpus))
}

/// Gives every vCPU its CPUID: `guest` (vCPU 0's table) patched with its APIC id.
pub fn set_vcpu_cpuid(vcpus: &[Vcpu], guest: &[kvm_cpuid_entry2]) -> Result<(), BuildError> {
    let count = u8::try_from(vcpus.len()).unwrap_or(u8::MAX);
    for v in vcpus {
        let cpuid = CpuId::from_entries(&vcpu_cpuid(guest, v.id(), count))
            .map_err(|_| BuildError::CpuidTooLarge(v.id()))?;
        v.fd()
            .set_cpuid2(&cpuid)
            .map_err(|e| BuildError::SetCpuid(v.id(), e))?;
    }
    Ok(())
}

/// The MSRs the VM's vCPU states hold: those of KVM's list that vCPU 0 (with its CPUID, not
/// run yet) reads and takes back (`persist::restorable_msrs`), so that whatever a migration
/// saves it restores.
pub fn vm_msrs(kvm: &Kvm, vcpus: &[Vcpu]) -> Result<Vec<u32>, BuildError> {
    let Some(first) = vcpus.first() else {
        return Ok(Vec::new());
    };
    Ok(restorable_msrs(first.fd(), &msr_index_list(kvm)?))
}

/// [`vm_msrs`] for a VM built here: a feature whose MSR is not restorable is hidden from the
/// guest's CPUID (`cpuid::hide_unrestorable`: IA32_ARCH_CAPABILITIES, which KVM refuses to
/// set while the CPUID lacks its bit, and a host may not emulate), so that the guest never
/// reads a value a migration would not carry.
pub fn settle_msrs(
    kvm: &Kvm,
    vcpus: &[Vcpu],
    guest: &mut [kvm_cpuid_entry2],
) -> Result<Vec<u32>, BuildError> {
    let msrs = vm_msrs(kvm, vcpus)?;
    if cpuid::hide_unrestorable(guest, &msrs) {
        set_vcpu_cpuid(vcpus, guest)?;
    }
    Ok(msrs)
}

/// Create every vCPU with its CPUID (`guest`, vCPU 0's table), boot MSRs, FPU and LAPIC LINT
/// set-up. Application processors stay in wait-for-SIPI (the in-kernel LAPIC's reset state).
pub fn create_vcpus(
    vm: &Vm,
    config: &VmConfig,
    guest: &[kvm_cpuid_entry2],
    devices: &Devices,
    exit: &Arc<ExitSignal>,
    mem: &GuestMemoryMmap,
) -> Result<Vec<Vcpu>, BuildError> {
    let msrs = Msrs::from_entries(&boot_msr_entries()).map_err(|_| BuildError::MsrList)?;
    (0..config.cpus)
        .map(|id| {
            let fd = vm
                .fd()
                .create_vcpu(u64::from(id))
                .map_err(|e| BuildError::Vcpu(VcpuError::Create(id, e)))?;
            let cpuid = CpuId::from_entries(&vcpu_cpuid(guest, id, config.cpus))
                .map_err(|_| BuildError::CpuidTooLarge(id))?;
            fd.set_cpuid2(&cpuid)
                .map_err(|e| BuildError::SetCpuid(id, e))?;
            let n = fd.set_msrs(&msrs).map_err(|e| BuildError::SetMsrs(id, e))?;
            if n != msrs.as_slice().len() {
                return Err(BuildError::PartialMsrs(id, n, msrs.as_slice().len()));
            }
            configure_fpu_and_lint(&fd).map_err(|e| BuildError::Regs(id, e))?;
            let ring = match vm.dirty_rings() {
                Some(rings) => Some((
                    rings.clone(),
                    rings
                        .add_vcpu(&fd)
                        .map_err(|e| BuildError::Vm(VmError::DirtyRing(e)))?,
                )),
                None => None,
            };
            let mut vcpu = Vcpu::new(id, fd, devices.bus.clone(), exit.clone(), mem.clone());
            if let Some((rings, index)) = ring {
                vcpu.set_dirty_ring(rings, index);
            }
            Ok(vcpu)
        })
        .collect()
}

/// Put the bootstrap vCPU at the kernel's entry point.
pub fn configure_boot_vcpu(bsp: &Vcpu, entry: &EntryPoint) -> Result<(), BuildError> {
    set_boot_regs(bsp.fd(), entry).map_err(|e| BuildError::Regs(bsp.id(), e))
}

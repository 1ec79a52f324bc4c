//! Per-vCPU state: saved on the vCPU's own thread while it is paused, restored before it first
//! runs on the destination.
//!
//! Ordering follows Firecracker's `arch/x86_64/vcpu.rs`, with its reasons:
//! - save: MP_STATE first, because `KVM_GET_MP_STATE` runs `kvm_apic_accept_events()`, which may
//!   change vCPU and LAPIC state that is saved afterwards;
//! - restore: TSC rate, MP_STATE, REGS, SREGS (APIC base), XSAVE, XCRS, DEBUGREGS, then LAPIC
//!   (needs the APIC base from SREGS), then MSRs (the TSC-deadline MSR needs the LAPIC in
//!   TSC-deadline mode), and VCPU_EVENTS last (the setters above may clear pending events).
//!
//! The CPUID is not part of the state: it travels in the migration's configuration, where the
//! destination checks it before it accepts the stream, and is set when the vCPUs are made.
//! Everything saved is restored or the restore fails (the source then keeps its guest): the
//! TSC rate and every MSR. The source saves only the MSRs its vCPUs take back
//! ([`restorable_msrs`]), and the destination checks before `Ready` that its own take every
//! one the source announced.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use log::debug;
use serde::{Deserialize, Serialize};

/// Errors while saving or restoring one vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("KVM_GET_{0} failed")]
    Get(&'static str, #[source] kvm_ioctls::Error),
    #[error("KVM_SET_{0} failed")]
    Set(&'static str, #[source] kvm_ioctls::Error),
    #[error("MSR list of {0} entries cannot be built")]
    Msrs(usize),
    #[error("MSR {0:#x} could not be read")]
    MsrUnreadable(u32),
    #[error("MSR {index:#x} (value {value:#x}) was refused by this host's KVM")]
    MsrRefused { index: u32, value: u64 },
    #[error("the TSC rate of {0} kHz cannot be set on this host")]
    TscKhz(u32, #[source] kvm_ioctls::Error),
}

/// Everything KVM keeps for one vCPU.
#[derive(Default, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// Save the state of a paused vCPU, with every MSR of `msrs` (the VM's
    /// [`restorable_msrs`]: one that cannot be read fails the save).
    pub fn save(id: u32, vcpu: &VcpuFd, msrs: &[u32]) -> Result<VcpuState, VcpuStateError> {
        use VcpuStateError::Get;
        // MP_STATE first: see the module comment.
        let mp_state = vcpu.get_mp_state().map_err(|e| Get("MP_STATE", e))?;
        let regs = vcpu.get_regs().map_err(|e| Get("REGS", e))?;
        let sregs = vcpu.get_sregs().map_err(|e| Get("SREGS", e))?;
        let xsave = vcpu.get_xsave().map_err(|e| Get("XSAVE", e))?;
        let xcrs = vcpu.get_xcrs().map_err(|e| Get("XCRS", e))?;
        let debugregs = vcpu.get_debug_regs().map_err(|e| Get("DEBUGREGS", e))?;
        let lapic = vcpu.get_lapic().map_err(|e| Get("LAPIC", e))?;
        let msrs = save_msrs(vcpu, msrs)?;
        let events = vcpu.get_vcpu_events().map_err(|e| Get("VCPU_EVENTS", e))?;
        let tsc_khz = vcpu.get_tsc_khz().ok();
        Ok(VcpuState {
            id,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    /// Restore into a freshly created vCPU that has not run yet (its CPUID set from the
    /// migration's configuration). Every part is restored or this fails.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuStateError> {
        use VcpuStateError::Set;
        if let Some(khz) = self.tsc_khz {
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                vcpu.set_tsc_khz(khz)
                    .map_err(|e| VcpuStateError::TscKhz(khz, e))?;
            }
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(|e| Set("MP_STATE", e))?;
        vcpu.set_regs(&self.regs).map_err(|e| Set("REGS", e))?;
        vcpu.set_sregs(&self.sregs).map_err(|e| Set("SREGS", e))?;
        // SAFETY: `self.xsave` is a complete `kvm_xsave` as KVM_GET_XSAVE returned it; the legacy
        // 4 KiB layout is what KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(|e| Set("XSAVE", e))?;
        vcpu.set_xcrs(&self.xcrs).map_err(|e| Set("XCRS", e))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(|e| Set("DEBUGREGS", e))?;
        vcpu.set_lapic(&self.lapic).map_err(|e| Set("LAPIC", e))?;
        restore_msrs(vcpu, &self.msrs)?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(|e| Set("VCPU_EVENTS", e))?;
        Ok(())
    }
}

fn msr_entries(pairs: impl Iterator<Item = (u32, u64)>) -> Vec<kvm_msr_entry> {
    pairs
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect()
}

/// Reads every MSR of `list` (in chunks of KVM's limit); one that KVM does not read is an
/// error: the configuration announced it.
fn save_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::with_capacity(list.len());
    for chunk in list.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries = msr_entries(chunk.iter().map(|&i| (i, 0)));
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Msrs(chunk.len()))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| VcpuStateError::Get("MSRS", e))?;
        if let Some(&bad) = chunk.get(n) {
            return Err(VcpuStateError::MsrUnreadable(bad));
        }
        out.extend(msrs.as_slice().iter().map(|e| (e.index, e.data)));
    }
    Ok(out)
}

/// Writes every saved MSR; one that this KVM refuses is an error.
fn restore_msrs(vcpu: &VcpuFd, saved: &[(u32, u64)]) -> Result<(), VcpuStateError> {
    for chunk in saved.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries = msr_entries(chunk.iter().copied());
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Msrs(chunk.len()))?;
        let n = vcpu
            .set_msrs(&msrs)
            .map_err(|e| VcpuStateError::Set("MSRS", e))?;
        if let Some(&(index, value)) = chunk.get(n) {
            return Err(VcpuStateError::MsrRefused { index, value });
        }
    }
    Ok(())
}

/// The MSRs of `candidates` (`KVM_GET_MSR_INDEX_LIST`) that this vCPU reads and takes back:
/// each is read and written again with the value read. KVM lists MSRs it refuses to set in
/// some configurations (IA32_ARCH_CAPABILITIES while the vCPU's CPUID lacks its bit); a VM
/// saves only the ones it can restore, so that a migration restores all it saved. Call it
/// on a vCPU that has its CPUID and has not run.
pub fn restorable_msrs(vcpu: &VcpuFd, candidates: &[u32]) -> Vec<u32> {
    let one = |index, data| Msrs::from_entries(&msr_entries(std::iter::once((index, data))));
    candidates
        .iter()
        .copied()
        .filter(|&index| {
            let Ok(mut m) = one(index, 0) else {
                return false;
            };
            let read = vcpu.get_msrs(&mut m).ok() == Some(1);
            let Some(value) = m.as_slice().first().map(|e| e.data).filter(|_| read) else {
                debug!("MSR {index:#x} not readable: not saved");
                return false;
            };
            let taken = one(index, value).is_ok_and(|m| vcpu.set_msrs(&m).ok() == Some(1));
            if !taken {
                debug!("MSR {index:#x} = {value:#x} not settable: not saved");
            }
            taken
        })
        .collect()
}

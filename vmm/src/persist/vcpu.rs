//! Per-vCPU state: saved on the vCPU's own thread while it is paused, restored before it first
//! runs on the destination.
//!
//! Ordering follows Firecracker's `arch/x86_64/vcpu.rs`, with its reasons:
//! - save: MP_STATE first, because `KVM_GET_MP_STATE` runs `kvm_apic_accept_events()`, which may
//!   change vCPU and LAPIC state that is saved afterwards;
//! - restore: CPUID, MP_STATE, REGS, SREGS (APIC base), XSAVE, XCRS, DEBUGREGS, then LAPIC
//!   (needs the APIC base from SREGS), then MSRs (the TSC-deadline MSR needs the LAPIC in
//!   TSC-deadline mode), and VCPU_EVENTS last (the setters above may clear pending events).

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use log::{debug, warn};
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
    #[error("essential MSR {0:#x} could not be restored")]
    EssentialMsr(u32),
}

/// MSRs the guest cannot run correctly without: their loss is an error, not a warning.
const ESSENTIAL_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0xc000_0080, // EFER
    0x1b,        // IA32_APIC_BASE
];

/// MSRs KVM may list but refuse to set: IA32_ARCH_CAPABILITIES, which a nested KVM without
/// the feature reports and rejects (QEMU needs `-cpu host,-arch-capabilities` there).
const UNSETTABLE_MSRS: &[u32] = &[0x10a];

/// Everything KVM keeps for one vCPU.
#[derive(Default, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
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
    /// Save the state of a paused vCPU. `msr_index_list` is `KVM_GET_MSR_INDEX_LIST`.
    pub fn save(
        id: u32,
        vcpu: &VcpuFd,
        msr_index_list: &[u32],
    ) -> Result<VcpuState, VcpuStateError> {
        use VcpuStateError::Get;
        let cpuid = vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Get("CPUID2", e))?;
        // MP_STATE first: see the module comment.
        let mp_state = vcpu.get_mp_state().map_err(|e| Get("MP_STATE", e))?;
        let regs = vcpu.get_regs().map_err(|e| Get("REGS", e))?;
        let sregs = vcpu.get_sregs().map_err(|e| Get("SREGS", e))?;
        let xsave = vcpu.get_xsave().map_err(|e| Get("XSAVE", e))?;
        let xcrs = vcpu.get_xcrs().map_err(|e| Get("XCRS", e))?;
        let debugregs = vcpu.get_debug_regs().map_err(|e| Get("DEBUGREGS", e))?;
        let lapic = vcpu.get_lapic().map_err(|e| Get("LAPIC", e))?;
        let msrs = save_msrs(vcpu, msr_index_list)?;
        let events = vcpu.get_vcpu_events().map_err(|e| Get("VCPU_EVENTS", e))?;
        let tsc_khz = vcpu.get_tsc_khz().ok();
        Ok(VcpuState {
            id,
            cpuid: cpuid.as_slice().to_vec(),
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

    /// Restore into a freshly created vCPU that has not run yet.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuStateError> {
        use VcpuStateError::Set;
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError::Msrs(self.cpuid.len()))?;
        vcpu.set_cpuid2(&cpuid).map_err(|e| Set("CPUID2", e))?;
        if let Some(khz) = self.tsc_khz {
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = vcpu.set_tsc_khz(khz) {
                    warn!(
                        "vCPU {}: TSC frequency {khz} kHz not settable: {e}",
                        self.id
                    );
                }
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
        restore_msrs(vcpu, self.id, &self.msrs)?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(|e| Set("VCPU_EVENTS", e))?;
        Ok(())
    }
}

/// Read every MSR of the list that KVM can read; an MSR that KVM refuses is left out.
fn save_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest: Vec<u32> = list.to_vec();
    while !rest.is_empty() {
        let chunk: Vec<u32> = rest
            .iter()
            .copied()
            .take(kvm_bindings::KVM_MAX_MSR_ENTRIES)
            .collect();
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Msrs(chunk.len()))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| VcpuStateError::Get("MSRS", e))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it cannot read: skip that one and go on.
        let consumed = if n < chunk.len() {
            debug!("MSR {:#x} not readable; left out of the state", chunk[n]);
            n + 1
        } else {
            n
        };
        rest.drain(..consumed);
    }
    Ok(out)
}

/// Write the saved MSRs; one that this KVM refuses is skipped with a warning unless essential.
fn restore_msrs(vcpu: &VcpuFd, id: u32, saved: &[(u32, u64)]) -> Result<(), VcpuStateError> {
    let mut rest: Vec<kvm_msr_entry> = saved
        .iter()
        .filter(|(i, _)| !UNSETTABLE_MSRS.contains(i))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    while !rest.is_empty() {
        let take = rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES);
        let msrs = Msrs::from_entries(&rest[..take]).map_err(|_| VcpuStateError::Msrs(take))?;
        let n = vcpu
            .set_msrs(&msrs)
            .map_err(|e| VcpuStateError::Set("MSRS", e))?;
        let consumed = if n < take {
            let bad = rest[n].index;
            if ESSENTIAL_MSRS.contains(&bad) {
                return Err(VcpuStateError::EssentialMsr(bad));
            }
            warn!("vCPU {id}: MSR {bad:#x} refused by this KVM; skipped");
            n + 1
        } else {
            n
        };
        rest.drain(..consumed);
    }
    Ok(())
}

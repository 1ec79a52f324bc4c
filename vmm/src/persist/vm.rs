//! VM-wide KVM state: the two PICs, the IOAPIC, the PIT and the kvmclock
//! (as Firecracker's `arch/x86_64/vm.rs::save_state`).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Errors while saving or restoring VM-wide state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("KVM_GET_{0} failed")]
    Get(&'static str, #[source] kvm_ioctls::Error),
    #[error("KVM_SET_{0} failed")]
    Set(&'static str, #[source] kvm_ioctls::Error),
}

/// Interrupt controllers, PIT and clock of one VM.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn irqchip(vm: &VmFd, chip_id: u32, name: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|e| VmStateError::Get(name, e))?;
    Ok(chip)
}

impl VmState {
    /// Save with every vCPU paused.
    pub fn save(vm: &VmFd) -> Result<VmState, VmStateError> {
        Ok(VmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "IRQCHIP(PIC master)")?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "IRQCHIP(PIC slave)")?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC, "IRQCHIP(IOAPIC)")?,
            pit: vm.get_pit2().map_err(|e| VmStateError::Get("PIT2", e))?,
            clock: vm.get_clock().map_err(|e| VmStateError::Get("CLOCK", e))?,
        })
    }

    /// Restore into a VM whose irqchip and PIT exist and whose vCPUs have not run yet.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        use VmStateError::Set;
        vm.set_pit2(&self.pit).map_err(|e| Set("PIT2", e))?;
        // KVM_SET_CLOCK accepts only the flags it knows how to apply; TSC_STABLE is a report.
        let mut clock = self.clock;
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        vm.set_clock(&clock).map_err(|e| Set("CLOCK", e))?;
        vm.set_irqchip(&self.pic_master)
            .map_err(|e| Set("IRQCHIP(PIC master)", e))?;
        vm.set_irqchip(&self.pic_slave)
            .map_err(|e| Set("IRQCHIP(PIC slave)", e))?;
        vm.set_irqchip(&self.ioapic)
            .map_err(|e| Set("IRQCHIP(IOAPIC)", e))?;
        Ok(())
    }
}

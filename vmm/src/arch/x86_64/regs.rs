//! Boot register state of the bootstrap vCPU, FPU and LAPIC LINT set-up of every vCPU.
//!
//! The builders are pure (`kvm_regs`/`kvm_sregs` in, out); `configure_*` apply them to a vCPU.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

use super::gdt::{segment_from_gdt, CODE_INDEX, DATA_INDEX, GDT_32BIT, GDT_64BIT, TSS_INDEX};
use super::layout::{BOOT_GDT_ADDR, BOOT_IDT_ADDR, BOOT_STACK_POINTER, PML4_ADDR};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 0x2;
/// Offset of the 64-bit entry point (`startup_64`) from a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// How the bootstrap vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// Linux boot protocol, 64-bit: `rip = load_addr + 0x200`, `rsi` = zero page, paging on.
    Linux64 { load_addr: u64, zero_page: u64 },
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh { entry: u64, start_info: u64 },
}

/// Errors configuring a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM_GET_SREGS failed")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_REGS failed")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU failed")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_LAPIC failed")]
    GetLapic(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_LAPIC failed")]
    SetLapic(#[source] kvm_ioctls::Error),
}

/// General-purpose registers at the entry point.
pub fn boot_regs(entry: &EntryPoint) -> kvm_regs {
    match *entry {
        EntryPoint::Linux64 {
            load_addr,
            zero_page,
        } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: load_addr + BZIMAGE_64BIT_ENTRY_OFFSET,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: zero_page,
            ..Default::default()
        },
        EntryPoint::Pvh { entry, start_info } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rbx: start_info,
            ..Default::default()
        },
    }
}

/// The boot GDT that goes with `entry` (written to guest memory at `BOOT_GDT_ADDR`).
pub fn boot_gdt(entry: &EntryPoint) -> &'static [u64; 4] {
    match entry {
        EntryPoint::Linux64 { .. } => &GDT_64BIT,
        EntryPoint::Pvh { .. } => &GDT_32BIT,
    }
}

/// Special registers at the entry point, starting from the vCPU's reset state `sregs`.
pub fn boot_sregs(mut sregs: kvm_sregs, entry: &EntryPoint) -> kvm_sregs {
    let gdt = boot_gdt(entry);
    let code = segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        EntryPoint::Linux64 { .. } => {
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// x87 and SSE control words as after FNINIT / reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (dst, src) in l.regs[off..off + 4].iter_mut().zip(v.to_le_bytes()) {
        *dst = src as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, as a BIOS leaves them.
pub fn set_lint(l: &mut kvm_lapic_state) {
    let lint0 = lapic_reg(l, APIC_LVT_LINT0);
    set_lapic_reg(
        l,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(l, APIC_LVT_LINT1);
    set_lapic_reg(l, APIC_LVT_LINT1, with_delivery_mode(lint1, APIC_MODE_NMI));
}

/// Put the bootstrap vCPU at `entry` (the GDT and page tables must already be in memory).
pub fn configure_boot_vcpu(vcpu: &VcpuFd, entry: &EntryPoint) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    vcpu.set_sregs(&boot_sregs(sregs, entry))
        .map_err(RegsError::SetSregs)?;
    vcpu.set_regs(&boot_regs(entry)).map_err(RegsError::SetRegs)
}

/// FPU and LAPIC LINT set-up that every vCPU gets.
pub fn configure_fpu_and_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu()).map_err(RegsError::SetFpu)?;
    let mut lapic = vcpu.get_lapic().map_err(RegsError::GetLapic)?;
    set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(RegsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_entry_is_flat_32bit_protected_mode() {
        let e = EntryPoint::Pvh {
            entry: 0x10_0040,
            start_info: 0x6000,
        };
        let r = boot_regs(&e);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x10_0040, 0x6000, 2));
        let s = boot_sregs(kvm_sregs::default(), &e);
        assert_eq!(s.cr0, CR0_PE | CR0_ET);
        assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
        assert_eq!(
            (s.cs.db, s.cs.l, s.cs.limit, s.cs.base),
            (1, 0, 0xffff_ffff, 0)
        );
        assert_eq!((s.ss.limit, s.ds.type_), (0xffff_ffff, 0x3));
        assert_eq!(s.gdt.base, BOOT_GDT_ADDR);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn linux64_entry_is_long_mode_with_paging() {
        let e = EntryPoint::Linux64 {
            load_addr: 0x10_0000,
            zero_page: 0x7000,
        };
        let r = boot_regs(&e);
        assert_eq!(
            (r.rip, r.rsi, r.rsp),
            (0x10_0200, 0x7000, BOOT_STACK_POINTER)
        );
        let s = boot_sregs(kvm_sregs::default(), &e);
        assert_eq!(s.cr3, PML4_ADDR);
        assert!(s.cr0 & CR0_PG != 0 && s.cr4 & CR4_PAE != 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.l, 1);
    }

    #[test]
    fn lint_delivery_modes() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT_LINT0, 0x1_0000); // masked
        set_lint(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT_LINT0), 0x1_0700);
        assert_eq!(lapic_reg(&l, APIC_LVT_LINT1), 0x400);
    }

    #[test]
    fn fpu_control_words() {
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }
}

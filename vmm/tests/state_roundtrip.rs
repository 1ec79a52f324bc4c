//! The whole KVM state of a VM and its vCPUs, checked rather than trusted: known values are
//! set through KVM on vCPUs that never ran (registers, segment and control registers, x87,
//! SSE and AVX registers in the XSAVE area, XCR0, debug registers, MSRs with the TSC, LAPIC
//! registers, MP state, pending events; the PICs, IOAPIC, PIT and clock of the VM), saved by
//! `Vmm::save_state`, carried as state blobs (postcard, as in the stream), restored by
//! `Vmm::restore_state` into a second VM, saved again, and compared field by field. No guest
//! code runs: both VMs start with their vCPU threads paused.

use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pic_state,
    kvm_regs, kvm_xcr, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SHADOW, KVM_VCPUEVENT_VALID_SIPI_VECTOR, KVM_X86_SHADOW_INT_MOV_SS,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm::config::{RawConfig, VmConfig};
use vmm::persist::{VcpuState, VmSnapshot, VmState};
use vmm::{require_kvm, Vmm};

const CPUS: usize = 2;
/// Guest TSC both vCPUs are given (about 400 s at the test hosts' rate).
const TSC: u64 = 1 << 40;
/// Guest clock the VM is given, ns.
const CLOCK_NS: u64 = 5_000 * 1_000_000_000;
/// Longest the test may take between setting a clock and reading it back, ns.
const SLACK_NS: u64 = 60 * 1_000_000_000;

/// MSRs set on vCPU `i`: value `v ^ (i << 12)` for (index, v).
const MSRS: &[(u32, u64)] = &[
    (0x174, 0x10),                        // SYSENTER_CS
    (0x175, 0xffff_8880_0000_1000),       // SYSENTER_ESP
    (0x176, 0xffff_ffff_8100_0000),       // SYSENTER_EIP
    (0x277, 0x0007_0406_0007_0401),       // PAT
    (0xc000_0081, 0x0023_0010_0000_0000), // STAR
    (0xc000_0082, 0xffff_ffff_8160_0000), // LSTAR
    (0xc000_0083, 0xffff_ffff_8160_1000), // CSTAR
    (0xc000_0084, 0x4_7700),              // SFMASK
    (0xc000_0102, 0xffff_8880_7fc0_0000), // KERNEL_GS_BASE
];

/// LAPIC registers set on every vCPU: (offset, value).
const LAPIC: &[(usize, u32)] = &[
    (0x80, 0x20),         // TPR
    (0xd0, 0x0200_0000),  // LDR
    (0xe0, 0xffff_ffff),  // DFR: flat
    (0xf0, 0x1ff),        // SVR: enabled, spurious vector 0xff
    (0x320, 0x0001_0030), // LVT timer: masked, vector 0x30 (never armed)
    (0x350, 0x0001_0700), // LVT LINT0: masked ExtINT
    (0x360, 0x400),       // LVT LINT1: NMI
    (0x370, 0x0001_00fe), // LVT error: masked
    (0x3e0, 0x3),         // timer divide by 16
];

fn skeleton(kvm: &Arc<Kvm>) -> Vmm {
    let config = VmConfig::new(RawConfig {
        mem: Some("64M".into()),
        cpus: Some(CPUS as u32),
        api_socket: Some("/nonexistent/unused.sock".into()),
        ..Default::default()
    })
    .expect("config");
    Vmm::new_for_restore(config, Box::new(std::io::sink()), kvm.clone()).expect("VM builds")
}

/// The XSAVE area as bytes and back.
fn xsave_bytes(x: &kvm_bindings::kvm_xsave) -> Vec<u8> {
    x.region.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn put(bytes: &mut [u8], at: usize, v: &[u8]) {
    bytes[at..at + v.len()].copy_from_slice(v);
}

/// Where the AVX state (upper halves of YMM0-15) sits in the XSAVE area, if the vCPU has AVX.
fn avx_offset(fd: &VcpuFd) -> Option<usize> {
    let cpuid = fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).ok()?;
    let e = cpuid.as_slice();
    let leaf1 = e.iter().find(|e| e.function == 1)?;
    let xsave_avx = e.iter().find(|e| e.function == 0xd && e.index == 0)?;
    let avx = e.iter().find(|e| e.function == 0xd && e.index == 2)?;
    (leaf1.ecx & (1 << 28) != 0 && xsave_avx.eax & 0b100 != 0 && avx.eax == 256)
        .then_some(avx.ebx as usize)
}

/// A value that differs per vCPU and per slot.
fn val(cpu: usize, slot: u64) -> u64 {
    let mut z = 0x9e37_79b9_7f4a_7c15u64
        .wrapping_mul(slot + 1)
        .wrapping_add(cpu as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 27)
}

/// What this host's KVM let the test set.
#[derive(Clone, Copy)]
struct Applied {
    /// Where the AVX state is in the XSAVE area, when the vCPU has AVX.
    avx: Option<usize>,
    /// Whether a TSC written through KVM_SET_MSRS reads back (some nested hosts keep the
    /// host's TSC whatever is written).
    tsc: bool,
}

fn read_tsc(fd: &VcpuFd) -> u64 {
    let mut m = Msrs::from_entries(&[kvm_msr_entry {
        index: 0x10,
        ..Default::default()
    }])
    .expect("MSR list");
    assert_eq!(fd.get_msrs(&mut m).expect("KVM_GET_MSRS"), 1);
    m.as_slice()[0].data
}

/// Sets known values on vCPU `i`.
fn set_vcpu(i: usize, fd: &VcpuFd) -> Applied {
    let v = |slot| val(i, slot);
    fd.set_regs(&kvm_regs {
        rax: v(0),
        rbx: v(1),
        rcx: v(2),
        rdx: v(3),
        rsi: v(4),
        rdi: v(5),
        rsp: v(6),
        rbp: v(7),
        r8: v(8),
        r9: v(9),
        r10: v(10),
        r11: v(11),
        r12: v(12),
        r13: v(13),
        r14: v(14),
        r15: v(15),
        rip: 0x10_0000 + i as u64 * 0x40,
        rflags: 0xa47, // OF | IF | ZF | PF | CF and the fixed bit 1
    })
    .expect("KVM_SET_REGS");

    let mut sregs = fd.get_sregs().expect("KVM_GET_SREGS");
    sregs.cr2 = v(16);
    sregs.cr3 = 0x7000 + i as u64 * 0x1000;
    sregs.gdt.base = 0x1234_5000 + i as u64;
    sregs.gdt.limit = 0x7f;
    sregs.idt.base = 0x2345_6000 + i as u64;
    sregs.idt.limit = 0xfff;
    sregs.fs.base = v(17);
    sregs.gs.base = v(18);
    sregs.efer |= 0x801; // SCE | NXE
    fd.set_sregs(&sregs).expect("KVM_SET_SREGS");

    // XCR0 first: KVM_SET_XSAVE takes only the components XCR0 may enable.
    let avx = avx_offset(fd);
    if avx.is_some() {
        let mut xcrs = fd.get_xcrs().expect("KVM_GET_XCRS");
        xcrs.nr_xcrs = 1;
        xcrs.xcrs[0] = kvm_xcr {
            xcr: 0,
            value: 0b111,
            ..Default::default()
        };
        fd.set_xcrs(&xcrs).expect("KVM_SET_XCRS");
    }
    let mut xsave = fd.get_xsave().expect("KVM_GET_XSAVE");
    let mut b = xsave_bytes(&xsave);
    put(&mut b, 0, &0x0f7fu16.to_le_bytes()); // FCW: round toward zero
    put(&mut b, 2, &0u16.to_le_bytes()); // FSW: TOP 0
    b[4] = 0xff; // FTW (abridged): all eight valid
    put(&mut b, 24, &0xff80u32.to_le_bytes()); // MXCSR: round toward zero, FZ
    for r in 0..8 {
        let mantissa = v(20 + r as u64) | 1 << 63;
        put(&mut b, 32 + 16 * r, &mantissa.to_le_bytes());
        put(&mut b, 40 + 16 * r, &(0x3ff0u16 + r as u16).to_le_bytes());
    }
    for r in 0..16 {
        put(&mut b, 160 + 16 * r, &v(40 + r as u64).to_le_bytes());
        put(&mut b, 168 + 16 * r, &v(60 + r as u64).to_le_bytes());
    }
    let mut bv = 0b11u64; // x87, SSE
    if let Some(off) = avx {
        for r in 0..16 {
            put(&mut b, off + 16 * r, &v(80 + r as u64).to_le_bytes());
            put(&mut b, off + 8 + 16 * r, &v(100 + r as u64).to_le_bytes());
        }
        bv |= 0b100;
    }
    put(&mut b, 512, &bv.to_le_bytes()); // XSTATE_BV
    for (w, c) in xsave.region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    // SAFETY: a complete 4 KiB `kvm_xsave` as KVM_GET_XSAVE returned it, in the standard
    // (non-compacted) layout KVM_SET_XSAVE reads; only values inside it changed.
    unsafe { fd.set_xsave(&xsave) }.expect("KVM_SET_XSAVE");

    let mut dr = fd.get_debug_regs().expect("KVM_GET_DEBUGREGS");
    dr.db = [v(120), v(121), v(122), v(123)];
    dr.dr6 = 0xffff_0ff1; // B0 and the fixed bits
    dr.dr7 = 0x000d_0455; // L0-L3, RW0 write, LEN0 8 bytes, bit 10
    fd.set_debug_regs(&dr).expect("KVM_SET_DEBUGREGS");

    let mut lapic = fd.get_lapic().expect("KVM_GET_LAPIC");
    for &(off, value) in LAPIC {
        for (k, byte) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[off + k] = *byte as std::os::raw::c_char;
        }
    }
    fd.set_lapic(&lapic).expect("KVM_SET_LAPIC");

    let mut entries: Vec<kvm_msr_entry> = MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data: data ^ ((i as u64) << 12),
            ..Default::default()
        })
        .collect();
    entries.push(kvm_msr_entry {
        index: 0x10,
        data: TSC,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).expect("MSR list");
    assert_eq!(
        fd.set_msrs(&msrs).expect("KVM_SET_MSRS"),
        entries.len(),
        "every MSR set"
    );
    let tsc = (TSC..TSC + (1 << 36)).contains(&read_tsc(fd));

    fd.set_mp_state(kvm_mp_state {
        mp_state: if i == 0 {
            KVM_MP_STATE_HALTED
        } else {
            KVM_MP_STATE_RUNNABLE
        },
    })
    .expect("KVM_SET_MP_STATE");

    // Pending and injected events last: the setters above may clear them.
    let mut ev = fd.get_vcpu_events().expect("KVM_GET_VCPU_EVENTS");
    if i == 0 {
        ev.exception.injected = 1;
        ev.exception.nr = 13;
        ev.exception.has_error_code = 1;
        ev.exception.error_code = 0x18;
        ev.nmi.pending = 1;
        ev.nmi.masked = 1;
        ev.interrupt.shadow = KVM_X86_SHADOW_INT_MOV_SS as u8;
    } else {
        ev.interrupt.injected = 1;
        ev.interrupt.nr = 0x41;
        // KVM takes a SIPI vector but never reports one (it reads back 0): not checked.
        ev.sipi_vector = 0x9a;
    }
    ev.flags = KVM_VCPUEVENT_VALID_NMI_PENDING
        | KVM_VCPUEVENT_VALID_SHADOW
        | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    fd.set_vcpu_events(&ev).expect("KVM_SET_VCPU_EVENTS");
    Applied { avx, tsc }
}

fn master_pic() -> kvm_pic_state {
    kvm_pic_state {
        imr: 0xb8,
        isr: 0x02,
        priority_add: 3,
        irq_base: 0x20,
        read_reg_select: 1,
        init4: 1,
        elcr: 0x08,
        ..Default::default()
    }
}

fn slave_pic() -> kvm_pic_state {
    kvm_pic_state {
        imr: 0x7d,
        irq_base: 0x28,
        auto_eoi: 1,
        init4: 1,
        elcr: 0x02,
        ..Default::default()
    }
}

fn ioapic_entry(pin: usize) -> u64 {
    (1 << 16) | (0x30 + pin as u64) | ((pin as u64 & 3) << 56) | ((pin as u64 & 1) << 15)
}

fn chip(vm: &VmFd, chip_id: u32) -> kvm_irqchip {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).expect("KVM_GET_IRQCHIP");
    c
}

fn set_vm(vm: &VmFd) {
    let mut c = chip(vm, KVM_IRQCHIP_PIC_MASTER);
    c.chip.pic = kvm_pic_state {
        elcr_mask: pic_of(&c).elcr_mask,
        ..master_pic()
    };
    vm.set_irqchip(&c).expect("KVM_SET_IRQCHIP master");
    let mut c = chip(vm, KVM_IRQCHIP_PIC_SLAVE);
    c.chip.pic = kvm_pic_state {
        elcr_mask: pic_of(&c).elcr_mask,
        ..slave_pic()
    };
    vm.set_irqchip(&c).expect("KVM_SET_IRQCHIP slave");
    let mut c = chip(vm, KVM_IRQCHIP_IOAPIC);
    let mut io = ioapic_of(&c);
    io.id = 3 << 24;
    io.ioregsel = 0x10;
    for (pin, e) in io.redirtbl.iter_mut().enumerate() {
        e.bits = ioapic_entry(pin);
    }
    c.chip.ioapic = io;
    vm.set_irqchip(&c).expect("KVM_SET_IRQCHIP IOAPIC");

    let mut pit = vm.get_pit2().expect("KVM_GET_PIT2");
    pit.channels[0].count = 0x2e9c;
    pit.channels[0].mode = 2;
    pit.channels[0].rw_mode = 3;
    pit.channels[0].gate = 1;
    pit.channels[2].count = 0x1000;
    pit.channels[2].mode = 0;
    pit.channels[2].rw_mode = 3;
    pit.channels[2].gate = 0;
    vm.set_pit2(&pit).expect("KVM_SET_PIT2");
    vm.set_clock(&kvm_clock_data {
        clock: CLOCK_NS,
        ..Default::default()
    })
    .expect("KVM_SET_CLOCK");
}

fn pic_of(c: &kvm_irqchip) -> kvm_pic_state {
    assert!(c.chip_id <= KVM_IRQCHIP_PIC_SLAVE);
    // SAFETY: for chip ids PIC_MASTER and PIC_SLAVE KVM fills the `pic` member.
    unsafe { c.chip.pic }
}

fn ioapic_of(c: &kvm_irqchip) -> kvm_bindings::kvm_ioapic_state {
    assert_eq!(c.chip_id, KVM_IRQCHIP_IOAPIC);
    // SAFETY: for chip id IOAPIC KVM fills the `ioapic` member.
    unsafe { c.chip.ioapic }
}

fn ioapic_table(c: &kvm_irqchip) -> Vec<u64> {
    ioapic_of(c)
        .redirtbl
        .iter()
        // SAFETY: every redirection entry is a plain 64-bit value; `bits` views it whole.
        .map(|e| unsafe { e.bits })
        .collect()
}

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|k| l.regs[off + k] as u8))
}

fn msr(v: &VcpuState, index: u32) -> Option<u64> {
    v.msrs.iter().find(|m| m.0 == index).map(|m| m.1)
}

/// Cycles the guest TSC runs in `ns`.
fn tsc_cycles(v: &VcpuState, ns: u64) -> u64 {
    let khz = u64::from(v.tsc_khz.unwrap_or(4_000_000));
    ns / 1_000_000 * khz
}

/// The first differing byte of two encodings, or `None`.
fn first_diff(a: &[u8], b: &[u8]) -> Option<String> {
    if a == b {
        return None;
    }
    let i = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    Some(format!(
        "first difference at byte {i} of {}/{}: {:02x?} vs {:02x?}",
        a.len(),
        b.len(),
        a.get(i..(i + 8).min(a.len())).unwrap_or_default(),
        b.get(i..(i + 8).min(b.len())).unwrap_or_default()
    ))
}

fn encoded<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("encode")
}

/// The saved state of vCPU `i` holds the values set on it.
fn check_known(i: usize, s: &VcpuState, applied: Applied, errors: &mut Vec<String>) {
    let mut expect = |what: String, ok: bool| {
        if !ok {
            errors.push(format!("vcpu{i}: saved {what} is not the value set"));
        }
    };
    let v = |slot| val(i, slot);
    expect("rax".into(), s.regs.rax == v(0));
    expect("r15".into(), s.regs.r15 == v(15));
    expect("rflags".into(), s.regs.rflags == 0xa47);
    expect("cr2".into(), s.sregs.cr2 == v(16));
    expect("gdt".into(), s.sregs.gdt.base == 0x1234_5000 + i as u64);
    expect("fs.base".into(), s.sregs.fs.base == v(17));
    let b = xsave_bytes(&s.xsave);
    expect("FCW".into(), b[0..2] == 0x0f7fu16.to_le_bytes());
    expect("MXCSR".into(), b[24..28] == 0xff80u32.to_le_bytes());
    expect("ST7".into(), b[144..152] == (v(27) | 1 << 63).to_le_bytes());
    expect("XMM15".into(), b[400..408] == v(55).to_le_bytes());
    if let Some(off) = applied.avx {
        let xcr0 = s.xcrs.xcrs[..s.xcrs.nr_xcrs as usize]
            .iter()
            .find(|x| x.xcr == 0)
            .map(|x| x.value);
        expect(format!("XCR0 {xcr0:x?}"), xcr0 == Some(0b111));
        expect(
            "YMM15 upper half".into(),
            b[off + 240..off + 248] == v(95).to_le_bytes(),
        );
    }
    expect(
        "DR0-3".into(),
        s.debugregs.db == [v(120), v(121), v(122), v(123)],
    );
    expect("DR7".into(), s.debugregs.dr7 == 0x000d_0455);
    for &(off, value) in LAPIC {
        expect(format!("LAPIC {off:#x}"), lapic_reg(&s.lapic, off) == value);
    }
    for &(index, data) in MSRS {
        expect(
            format!("MSR {index:#x}"),
            msr(s, index) == Some(data ^ ((i as u64) << 12)),
        );
    }
    let tsc = msr(s, 0x10).unwrap_or(0);
    expect(
        format!("TSC {tsc:#x}"),
        !applied.tsc || (TSC..TSC + tsc_cycles(s, SLACK_NS)).contains(&tsc),
    );
    let mp = if i == 0 {
        KVM_MP_STATE_HALTED
    } else {
        KVM_MP_STATE_RUNNABLE
    };
    expect("MP state".into(), s.mp_state.mp_state == mp);
    if i == 0 {
        let e = &s.events;
        expect(
            "pending exception".into(),
            e.exception.injected == 1 && e.exception.nr == 13 && e.exception.error_code == 0x18,
        );
        expect("NMI".into(), e.nmi.pending == 1 && e.nmi.masked == 1);
        expect("interrupt shadow".into(), e.interrupt.shadow != 0);
    } else {
        let e = &s.events;
        expect(
            "injected interrupt".into(),
            e.interrupt.injected == 1 && e.interrupt.nr == 0x41,
        );
    }
}

/// vCPU states `a` (saved from the first VM) and `b` (from the second) agree field by field;
/// the TSC only up to the time that passed between the two saves.
fn compare_vcpu(i: usize, a: &VcpuState, b: &VcpuState, errors: &mut Vec<String>) {
    let mut field = |name: &str, x: Vec<u8>, y: Vec<u8>| {
        if let Some(d) = first_diff(&x, &y) {
            errors.push(format!("vcpu{i}: {name} differs after the round trip: {d}"));
        }
    };
    field("mp_state", encoded(&a.mp_state), encoded(&b.mp_state));
    field("regs", encoded(&a.regs), encoded(&b.regs));
    field("sregs", encoded(&a.sregs), encoded(&b.sregs));
    field("xsave", xsave_bytes(&a.xsave), xsave_bytes(&b.xsave));
    field("xcrs", encoded(&a.xcrs), encoded(&b.xcrs));
    field("debugregs", encoded(&a.debugregs), encoded(&b.debugregs));
    field("lapic", encoded(&a.lapic), encoded(&b.lapic));
    field("events", encoded(&a.events), encoded(&b.events));
    field("tsc_khz", encoded(&a.tsc_khz), encoded(&b.tsc_khz));
    let others = |s: &VcpuState| -> Vec<(u32, u64)> {
        s.msrs.iter().copied().filter(|m| m.0 != 0x10).collect()
    };
    for (x, y) in others(a).iter().zip(others(b).iter()) {
        if x != y {
            errors.push(format!(
                "vcpu{i}: MSR {:#x}: {:#x} saved, {:#x} after the round trip ({:#x})",
                x.0, x.1, y.1, y.0
            ));
        }
    }
    if others(a).len() != others(b).len() {
        errors.push(format!(
            "vcpu{i}: {} MSRs saved, {} after the round trip",
            a.msrs.len(),
            b.msrs.len()
        ));
    }
    let (ta, tb) = (msr(a, 0x10).unwrap_or(0), msr(b, 0x10).unwrap_or(0));
    let ok = tb + tsc_cycles(a, 1_000_000_000) >= ta && tb <= ta + tsc_cycles(a, SLACK_NS);
    if !ok {
        errors.push(format!(
            "vcpu{i}: TSC {ta:#x} saved, {tb:#x} after the round trip"
        ));
    }
}

fn compare_vm(a: &VmState, b: &VmState, known: bool, errors: &mut Vec<String>) {
    for (name, x, y) in [
        ("PIC master", &a.pic_master, &b.pic_master),
        ("PIC slave", &a.pic_slave, &b.pic_slave),
    ] {
        if pic_of(x) != pic_of(y) {
            errors.push(format!("{name}: {:?} vs {:?}", pic_of(x), pic_of(y)));
        }
    }
    if let Some(d) = first_diff(&encoded(&a.ioapic), &encoded(&b.ioapic)) {
        errors.push(format!("IOAPIC differs: {d}"));
    }
    for (ch, (x, y)) in a.pit.channels.iter().zip(&b.pit.channels).enumerate() {
        // The load time is the host's clock at KVM_SET_PIT2: it never survives as such.
        let strip = |c: &kvm_bindings::kvm_pit_channel_state| kvm_bindings::kvm_pit_channel_state {
            count_load_time: 0,
            ..*c
        };
        if strip(x) != strip(y) {
            errors.push(format!("PIT channel {ch}: {x:?} vs {y:?}"));
        }
    }
    if a.pit.flags != b.pit.flags {
        errors.push(format!(
            "PIT flags {:#x} vs {:#x}",
            a.pit.flags, b.pit.flags
        ));
    }
    let (ca, cb) = (a.clock.clock, b.clock.clock);
    if !(ca..ca + SLACK_NS).contains(&cb) {
        errors.push(format!("clock {ca} ns saved, {cb} ns after the round trip"));
    }
    if known {
        let mut expect = |what: &str, ok: bool| {
            if !ok {
                errors.push(format!("saved {what} is not the value set"));
            }
        };
        let (m, s) = (pic_of(&a.pic_master), pic_of(&a.pic_slave));
        expect(
            "PIC master",
            (m.imr, m.isr, m.irq_base, m.elcr) == (0xb8, 0x02, 0x20, 0x08),
        );
        expect(
            "PIC slave",
            (s.imr, s.irq_base, s.auto_eoi) == (0x7d, 0x28, 1),
        );
        let table = ioapic_table(&a.ioapic);
        expect(
            "IOAPIC redirection table",
            table.iter().enumerate().all(|(p, &e)| e == ioapic_entry(p)),
        );
        expect("IOAPIC id", ioapic_of(&a.ioapic).id == 3 << 24);
        let c = &a.pit.channels;
        expect(
            "PIT channels",
            (c[0].count, c[0].mode, c[2].count, c[2].gate) == (0x2e9c, 2, 0x1000, 0),
        );
        expect("clock", (CLOCK_NS..CLOCK_NS + SLACK_NS).contains(&ca));
    }
}

#[test]
fn vcpu_and_vm_state_survive_save_blobs_and_restore() {
    require_kvm!();
    let started = Instant::now();
    let kvm = Arc::new(Kvm::new().expect("/dev/kvm"));
    let mut first = skeleton(&kvm);
    let (vm_fd, vcpus) = first.kvm_handles();
    assert_eq!(vcpus.len(), CPUS);
    let applied: Vec<Applied> = vcpus
        .iter()
        .enumerate()
        .map(|(i, fd)| set_vcpu(i, fd))
        .collect();
    set_vm(vm_fd);
    if applied.iter().any(|a| a.avx.is_none()) {
        eprintln!("NOTE: this host's vCPUs have no AVX: the YMM upper halves are not checked");
    }
    if applied.iter().any(|a| !a.tsc) {
        eprintln!(
            "NOTE: this host's KVM keeps its own TSC whatever KVM_SET_MSRS writes: the TSC is \
             checked for continuity only"
        );
    }
    first.start_paused().expect("start paused");
    let saved = first.save_state().expect("save");

    let mut errors = Vec::new();
    for (i, s) in saved.vcpus.iter().enumerate() {
        check_known(i, s, applied[i], &mut errors);
    }
    compare_vm(&saved.vm, &saved.vm, true, &mut errors);
    assert!(
        errors.is_empty(),
        "save lost values:\n{}",
        errors.join("\n")
    );

    // Through the stream's encoding, into a VM that never ran, and out again.
    let blobs = saved.to_blobs().expect("encode blobs");
    let carried = VmSnapshot::from_blobs(&blobs, CPUS as u8).expect("decode blobs");
    let mut second = skeleton(&kvm);
    second.restore_state(&carried).expect("restore");
    second.start_paused().expect("start paused");
    let again = second.save_state().expect("save again");
    for (i, (a, b)) in saved.vcpus.iter().zip(&again.vcpus).enumerate() {
        compare_vcpu(i, a, b, &mut errors);
    }
    compare_vm(&saved.vm, &again.vm, false, &mut errors);
    assert!(
        errors.is_empty(),
        "state changed across save, blobs and restore:\n{}",
        errors.join("\n")
    );
    eprintln!(
        "{} vCPUs ({} MSRs each) and the VM state round-tripped in {:?}",
        CPUS,
        saved.vcpus[0].msrs.len(),
        started.elapsed()
    );
    first.shutdown();
    second.shutdown();
}

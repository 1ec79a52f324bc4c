//! Ring-3 access to the hardware: port I/O (IOPL 3), the TSC, CPUID, MMIO and the two traps
//! into ring 0 (idle and halt), plus the symbols the ring-0 code in boot.s exports.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8};

use crate::{CPU_PAGE, MAX_CPUS, TICKS_OFF};

extern "C" {
    static boot_tables_end: AtomicU64;
    static boot_map_gib: AtomicU64;
    static boot_pages_1g: AtomicU64;
    static ap_next: AtomicU32;
    static serial_lock: AtomicU8;
    static percpu: [u8; 0];
    static ap_tramp_start: [u8; 0];
    static ap_tramp_end: [u8; 0];
    fn guest_idle_trap();
    fn guest_halt_trap() -> !;
}

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects; ring 3 runs with IOPL 3.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn outw(port: u16, v: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

pub fn rdtsc() -> u64 {
    // SAFETY: reading the TSC has no side effects (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// CPUID leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Reads a 32-bit MMIO register at guest-physical (= virtual) `addr`.
pub fn mmio_read(addr: u64) -> u32 {
    // SAFETY: `addr` is an identity-mapped, user-accessible device register (LAPIC).
    unsafe { (addr as *const u32).read_volatile() }
}

pub fn mmio_write(addr: u64, v: u32) {
    // SAFETY: as for `mmio_read`.
    unsafe { (addr as *mut u32).write_volatile(v) }
}

/// Waits for the next interrupt: traps into ring 0, which runs `sti; hlt`.
pub fn idle() {
    // SAFETY: the #UD handler recognises this RIP, waits for an interrupt and resumes after ud2.
    unsafe { guest_idle_trap() }
}

/// Stops this CPU for good: traps into ring 0, which runs `cli; hlt` forever.
pub fn halt() -> ! {
    // SAFETY: the #UD handler recognises this RIP and parks the CPU.
    unsafe { guest_halt_trap() }
}

/// First byte after the image and the page tables ring 0 built.
pub fn tables_end() -> u64 {
    // SAFETY: a plain variable of boot.s, written by ring 0 before ring 3 ran.
    unsafe { boot_tables_end.load(core::sync::atomic::Ordering::Relaxed) }
}

/// GiB of address space the page tables map, and whether they use 1 GiB pages.
pub fn mapping() -> (u64, bool) {
    // SAFETY: plain variables of boot.s, written by ring 0 before ring 3 ran.
    unsafe {
        (
            boot_map_gib.load(core::sync::atomic::Ordering::Relaxed),
            boot_pages_1g.load(core::sync::atomic::Ordering::Relaxed) != 0,
        )
    }
}

/// The next-AP-index counter ring 0 increments as APs check in.
pub fn ap_counter() -> &'static AtomicU32 {
    // SAFETY: a 4-byte aligned variable of boot.s; only accessed atomically.
    unsafe { &ap_next }
}

/// The serial lock byte shared with ring 0's exception printer.
pub fn serial_lock_byte() -> &'static AtomicU8 {
    // SAFETY: a variable of boot.s; only accessed atomically.
    unsafe { &serial_lock }
}

/// Timer ticks of `cpu` so far (incremented by ring 0's timer handler).
pub fn ticks(cpu: usize) -> u64 {
    assert!(cpu < MAX_CPUS);
    // SAFETY: `percpu` spans MAX_CPUS pages; the counter is an aligned u64 in this CPU's page.
    unsafe {
        let base = core::ptr::addr_of!(percpu) as *const u8;
        let p = base.add(cpu * CPU_PAGE + TICKS_OFF) as *const AtomicU64;
        (*p).load(core::sync::atomic::Ordering::Relaxed)
    }
}

/// The AP trampoline code, to be copied below 1 MiB.
pub fn trampoline() -> &'static [u8] {
    // SAFETY: both symbols delimit the trampoline inside the (immutable) text of the image.
    unsafe {
        let s = core::ptr::addr_of!(ap_tramp_start) as *const u8;
        let e = core::ptr::addr_of!(ap_tramp_end) as *const u8;
        core::slice::from_raw_parts(s, e as usize - s as usize)
    }
}

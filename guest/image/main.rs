//! minivmm's built-in test guest: a freestanding x86_64 image booted through PVH.
//!
//! `boot.s` is all of ring 0 (emulated on the test hosts, so it stays small): PVH entry, page
//! tables, long mode, GDT/IDT/TSS, LAPIC timer handler, exception printer, AP trampoline.
//! It drops every CPU into ring 3 with IOPL 3 at [`ring3_main`], where this crate does the
//! rest: serial output, TSC and LAPIC timer calibration, waking the APs, and the workload
//! (see `work.rs`). The build (guest/build.rs) compiles this file with a nested `rustc` for the
//! host target, `no_std`, `panic=abort`, static relocations, linked by `link.ld` at 1 MiB.

#![no_std]
#![no_main]

mod bootinfo;
mod firmware;
mod fpu;
mod hw;
#[allow(dead_code)]
mod knobs;
mod lapic;
#[allow(dead_code)]
mod layout;
mod pace;
#[allow(dead_code)]
mod pattern;
mod serial;
mod smp;
mod tsc;
mod work;

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use bootinfo::BootInfo;
use serial::Printable;
use work::Plan;

/// CPUs the image has room for (per-CPU pages, stacks, TSS descriptors).
pub const MAX_CPUS: usize = 32;
/// Per-CPU page: ring-0 stack below `RSP0_OFF`, TSS and I/O bitmap at `TSS_OFF`, tick counter
/// at `TICKS_OFF`.
pub const CPU_PAGE: usize = 4096;
const RSP0_OFF: usize = 0xc00;
const TSS_OFF: usize = 0xc00;
/// The TSS I/O bitmap allows ports 0..0x800 (COM1, PIT, port 0x61, PM1a control at 0x604).
const IOMAP_BYTES: usize = 0x100;
pub const TICKS_OFF: usize = 0xf00;
const CPU_OFF: usize = 0xf08;
/// Ring-3 stack size per CPU: 64 KiB.
const USTACK_SHIFT: u32 = 16;
/// Where the AP trampoline runs (SIPI vector 0x08).
pub const TRAMP_ADDR: u64 = 0x8000;
pub const TIMER_VECTOR: u32 = 0x20;
pub const SPURIOUS_VECTOR: u32 = 0xff;

core::arch::global_asm!(
    include_str!("boot.s"),
    MAX_CPUS = const MAX_CPUS,
    RSP0_OFF = const RSP0_OFF,
    TSS_OFF = const TSS_OFF,
    TICKS_OFF = const TICKS_OFF,
    IOMAP_BYTES = const IOMAP_BYTES,
    CPU_OFF = const CPU_OFF,
    USTACK_SHIFT = const USTACK_SHIFT,
    TRAMP_ADDR = const TRAMP_ADDR,
    TIMER_VECTOR = const TIMER_VECTOR,
    SPURIOUS_VECTOR = const SPURIOUS_VECTOR,
    options(att_syntax)
);

/// A value the BSP publishes once and the APs wait for.
struct SetOnce<T> {
    ready: AtomicBool,
    value: UnsafeCell<MaybeUninit<T>>,
}

const _: () = assert!(TSS_OFF + 104 + IOMAP_BYTES < TICKS_OFF);

// SAFETY: the value is written once, before `ready` is released, and only read after `ready`
// is acquired; `T: Sync` makes the shared reads sound.
unsafe impl<T: Sync> Sync for SetOnce<T> {}

impl<T> SetOnce<T> {
    const fn new() -> Self {
        SetOnce {
            ready: AtomicBool::new(false),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Publishes `v`. Called exactly once, by the BSP.
    fn set(&self, v: T) -> &T {
        // SAFETY: single writer (the BSP, once) and no reader before `ready` is set.
        let r = unsafe { (*self.value.get()).write(v) };
        self.ready.store(true, Ordering::Release);
        r
    }

    fn wait(&self) -> &T {
        while !self.ready.load(Ordering::Acquire) {
            hw::idle();
        }
        // SAFETY: `ready` is only set after the value was written.
        unsafe { (*self.value.get()).assume_init_ref() }
    }
}

static PLAN: SetOnce<Plan> = SetOnce::new();
/// LAPIC timer initial count, set by the BSP before it wakes the APs.
static TIMER_COUNT: AtomicU32 = AtomicU32::new(0);

/// Ring-3 entry of every CPU (boot.s `iretq`s here); `start_info` is the PVH %ebx.
#[no_mangle]
pub extern "C" fn ring3_main(cpu: u64, start_info: u64) -> ! {
    if cpu == 0 {
        bsp(start_info)
    } else {
        ap(cpu)
    }
}

fn fatal(what: impl core::fmt::Display) -> ! {
    say!("TESTGUEST error: {what}");
    hw::halt()
}

fn bsp(start_info: u64) -> ! {
    let boot_tsc = hw::rdtsc();
    serial::init();
    say!("TESTGUEST ring3 cpu=0 iopl=3 start_info={start_info:#x}");
    let info = BootInfo::read(start_info).unwrap_or_else(|e| fatal(e));
    let knobs = knobs::parse(info.cmdline(), |e| say!("TESTGUEST warn: {e}"));
    let (tsc_khz, tsc_src) = tsc::frequency_khz(knobs.tsc_khz);
    let tsc_hz = tsc_khz * 1000;
    lapic::enable();
    let lapic_hz = lapic::timer_hz(tsc_hz);
    let count = (lapic_hz / knobs.hz).clamp(1, u64::from(u32::MAX)) as u32;
    TIMER_COUNT.store(count, Ordering::Release);
    lapic::start_periodic(count);
    let started = smp::start_aps(&knobs, &info.ram, info.rsdp, tsc_hz).unwrap_or_else(|e| fatal(e));
    let max = if knobs.cpus == 0 {
        u64::MAX
    } else {
        knobs.cpus
    };
    let ncpus = (1 + u64::from(started.aps)).min(max);
    let mut layout = layout::plan(&info.ram, hw::tables_end(), knobs.touch, knobs.scrub)
        .unwrap_or_else(|e| fatal(e));
    let fw_top = firmware::dirty_top(&layout.untouched);
    if let Some((start, end)) = fw_top {
        layout.untouched = layout.untouched.without(start, end);
    }
    let mem_mib = info.ram.bytes().div_ceil(1 << 20);
    say!(
        "TESTGUEST boot cmdline=\"{}\" mem={} cpus={} tsc_khz={} tsc_src={} timer_hz={} fw_cpus={}",
        Printable(info.cmdline_bytes()),
        mem_mib,
        ncpus,
        tsc_khz,
        tsc_src.name(),
        lapic_hz / u64::from(count),
        started.expected.unwrap_or(0)
    );
    let (map_gib, pages_1g) = hw::mapping();
    let ws = layout.ws.ranges();
    say!(
        "TESTGUEST layout ws_pages={} ws_start={:#x} ws_end={:#x} ws_ranges={} scrub_pages={} \
         gen_table={:#x} untouched_pages={} fw_top={:#x} map_gib={} pages_1g={} e820={} \
         lapic_id={}",
        layout.ws.pages(),
        ws.first().map_or(0, |r| r.start),
        layout.ws.end(),
        ws.len(),
        layout.scrub_pages,
        layout.gen_table,
        layout.untouched.pages(),
        fw_top.map_or(0, |(start, _)| start),
        map_gib,
        u8::from(pages_1g),
        info.entries,
        lapic::id()
    );
    if layout.clamped {
        say!(
            "TESTGUEST warn: touch={} is more than the RAM left; using {} bytes",
            knobs.touch,
            layout.ws.bytes()
        );
    }
    let plan = PLAN.set(Plan {
        knobs,
        ncpus,
        layout,
        tsc_hz,
        boot_tsc,
    });
    work::run(0, plan)
}

fn ap(cpu: u64) -> ! {
    smp::ap_alive();
    lapic::enable();
    lapic::start_periodic(TIMER_COUNT.load(Ordering::Acquire));
    let plan = PLAN.wait();
    if cpu >= plan.ncpus {
        hw::halt();
    }
    work::run(cpu, plan)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    say!("TESTGUEST panic: {info}");
    hw::halt()
}

// The freestanding link has no libc: the memory functions the compiler calls.

/// # Safety
/// As C `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes valid, non-overlapping ranges; DF is clear in ring 3.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _,
            inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: copying forwards never overwrites bytes still to be read.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: dst overlaps the tail of src: copy backwards, then restore DF.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld", inout("rcx") n => _,
            inout("rdi") dst.add(n).wrapping_sub(1) => _,
            inout("rsi") src.add(n).wrapping_sub(1) => _, options(nostack));
    }
    dst
}

/// # Safety
/// As C `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid range; DF is clear in ring 3.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _,
            in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller passes valid ranges; volatile keeps this loop from becoming a
        // call to itself.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As C `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded from the caller.
    unsafe { memcmp(a, b, n) }
}

/// Referenced by the unwind tables of the precompiled `core` (built with `panic=unwind`);
/// never called, since this image aborts on panic and has no unwinder.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

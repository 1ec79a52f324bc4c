//! The local APIC (xAPIC MMIO at 0xfee00000, mapped user-accessible), programmed from ring 3:
//! enable, timer calibration against the TSC, periodic timer, INIT/SIPI broadcast.

use crate::hw::{mmio_read, mmio_write, rdtsc};
use crate::{SPURIOUS_VECTOR, TIMER_VECTOR};

const BASE: u64 = 0xfee0_0000;
const ID: u64 = 0x20;
const TPR: u64 = 0x80;
const SVR: u64 = 0xf0;
const ICR_LO: u64 = 0x300;
const ICR_HI: u64 = 0x310;
const LVT_TIMER: u64 = 0x320;
const TIMER_INIT: u64 = 0x380;
const TIMER_CUR: u64 = 0x390;
const TIMER_DIV: u64 = 0x3e0;

const DIV_16: u32 = 0x3;
const MASKED: u32 = 1 << 16;
const PERIODIC: u32 = 1 << 17;
const DELIVERY_PENDING: u32 = 1 << 12;
/// ICR: INIT, level assert, destination shorthand "all excluding self".
const ICR_INIT_ALL: u32 = 0x000c_4500;
/// ICR: start-up, destination shorthand "all excluding self"; OR the vector in.
const ICR_SIPI_ALL: u32 = 0x000c_4600;

fn read(reg: u64) -> u32 {
    mmio_read(BASE + reg)
}

fn write(reg: u64, v: u32) {
    mmio_write(BASE + reg, v)
}

/// Software-enables this CPU's LAPIC and accepts every priority.
pub fn enable() {
    write(TPR, 0);
    write(SVR, 0x100 | SPURIOUS_VECTOR);
}

pub fn id() -> u32 {
    read(ID) >> 24
}

/// Timer counts per second at divide-by-16, measured for 10 ms against the TSC.
pub fn timer_hz(tsc_hz: u64) -> u64 {
    write(TIMER_DIV, DIV_16);
    write(LVT_TIMER, MASKED | TIMER_VECTOR);
    write(TIMER_INIT, u32::MAX);
    let t0 = rdtsc();
    let c0 = read(TIMER_CUR);
    while rdtsc().wrapping_sub(t0) < tsc_hz / 100 {
        core::hint::spin_loop();
    }
    let c1 = read(TIMER_CUR);
    let cycles = rdtsc().wrapping_sub(t0).max(1);
    write(TIMER_INIT, 0);
    u64::from(c0.wrapping_sub(c1)) * tsc_hz / cycles
}

/// Starts this CPU's periodic timer: `count` ticks of the divided clock per interrupt.
pub fn start_periodic(count: u32) {
    write(TIMER_DIV, DIV_16);
    write(LVT_TIMER, PERIODIC | TIMER_VECTOR);
    write(TIMER_INIT, count.max(1));
}

fn send(icr: u32) {
    write(ICR_HI, 0);
    write(ICR_LO, icr);
    for _ in 0..1_000_000 {
        if read(ICR_LO) & DELIVERY_PENDING == 0 {
            break;
        }
        core::hint::spin_loop();
    }
}

/// INIT, 10 ms, SIPI, 200 us, SIPI to every other CPU; they start at `vector << 12`.
pub fn wake_all_others(vector: u8, tsc_hz: u64) {
    send(ICR_INIT_ALL);
    crate::tsc::delay(tsc_hz / 100);
    send(ICR_SIPI_ALL | u32::from(vector));
    crate::tsc::delay(tsc_hz / 5000);
    send(ICR_SIPI_ALL | u32::from(vector));
}

//! Waking the APs from ring 3 and counting those that check in.
//!
//! The BSP copies the real-mode trampoline of boot.s to `TRAMP_ADDR`, broadcasts
//! INIT/SIPI/SIPI and waits until as many APs as the firmware tables list have checked in (or the
//! `ap_wait_ms=` timeout passes). Then it closes the gate: it swaps the check-in counter to
//! `CLOSED`, so an AP that arrives later gets an index of at least `MAX_CPUS` and parks in
//! ring 0. Every AP that got an index reaches ring 3 and reports alive.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::hw;
use crate::knobs::Knobs;
use crate::layout::Spans;
use crate::{MAX_CPUS, TRAMP_ADDR};

const CLOSED: u32 = 0x4000_0000;

/// APs that reached ring 3.
static ALIVE: AtomicU32 = AtomicU32::new(0);

/// Called by each AP as its first act in ring 3.
pub fn ap_alive() {
    ALIVE.fetch_add(1, Ordering::AcqRel);
}

/// The outcome of waking the APs.
pub struct Started {
    /// APs that checked in (CPU indices 1..=aps).
    pub aps: u32,
    /// CPUs the firmware tables (ACPI MADT, MP table) list, if any.
    pub expected: Option<u32>,
}

/// Wakes the APs and counts them. `ram` must cover the trampoline page.
pub fn start_aps(
    knobs: &Knobs,
    ram: &Spans,
    rsdp: u64,
    tsc_hz: u64,
) -> Result<Started, &'static str> {
    let expected = crate::firmware::cpu_count(rsdp);
    let want = match (knobs.cpus, expected) {
        (1, _) | (_, Some(1)) => return Ok(close(expected)),
        (0, e) => e,
        (c, Some(e)) => Some(e.min(c as u32)),
        (c, None) => Some(c as u32),
    };
    let code = hw::trampoline();
    if !ram.contains(TRAMP_ADDR, 4096) || code.len() > 4096 {
        return Err("no RAM for the AP trampoline at 0x8000");
    }
    // SAFETY: TRAMP_ADDR..+4096 is RAM (checked above) that nothing else uses once the start
    // info has been copied out; identity-mapped and user-accessible.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), TRAMP_ADDR as *mut u8, code.len());
    }
    crate::lapic::wake_all_others((TRAMP_ADDR >> 12) as u8, tsc_hz);
    let counter = hw::ap_counter();
    let t0 = hw::rdtsc();
    let timeout = tsc_hz / 1000 * knobs.ap_wait_ms;
    while hw::rdtsc().wrapping_sub(t0) < timeout {
        let cpus = counter.load(Ordering::Acquire);
        if want.is_some_and(|w| cpus >= w) {
            break;
        }
        core::hint::spin_loop();
    }
    let started = close(expected);
    // An AP with an index is a few dozen ring-0 instructions away from ring 3.
    let t0 = hw::rdtsc();
    while ALIVE.load(Ordering::Acquire) < started.aps {
        if hw::rdtsc().wrapping_sub(t0) > tsc_hz * 5 {
            return Err("an AP checked in but never reached ring 3");
        }
        core::hint::spin_loop();
    }
    Ok(started)
}

fn close(expected: Option<u32>) -> Started {
    let next = hw::ap_counter().swap(CLOSED, Ordering::AcqRel);
    let aps = next.saturating_sub(1).min(MAX_CPUS as u32 - 1);
    Started { aps, expected }
}

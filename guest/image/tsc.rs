//! TSC frequency, and a per-CPU clock on it that never runs backwards.
//!
//! Method, first that works: the `tsc_khz=` knob; the hypervisor timing leaf 0x40000010 (EAX =
//! TSC kHz) when the VMM provides it; PIT channel 2 counting 20 ms in mode 0 (gate via port
//! 0x61, end seen on its OUT2 bit; lowest of five); CPUID 0x15 (crystal ratio); CPUID 0x16
//! (base MHz).

use crate::hw::{cpuid, inb, outb, rdtsc};

/// Where the TSC frequency came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Knob,
    HypervisorLeaf,
    Pit,
    Cpuid15,
    Cpuid16,
    Assumed,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Knob => "knob",
            Source::HypervisorLeaf => "cpuid-40000010",
            Source::Pit => "pit",
            Source::Cpuid15 => "cpuid-15",
            Source::Cpuid16 => "cpuid-16",
            Source::Assumed => "assumed",
        }
    }
}

/// Frequencies outside this range (kHz) are measurement errors.
const PLAUSIBLE_KHZ: core::ops::RangeInclusive<u64> = 100_000..=20_000_000;

/// The TSC frequency in kHz and how it was found.
pub fn frequency_khz(knob_khz: u64) -> (u64, Source) {
    if knob_khz != 0 {
        return (knob_khz, Source::Knob);
    }
    if let Some(k) = hypervisor_leaf() {
        return (k, Source::HypervisorLeaf);
    }
    if let Some(k) = pit() {
        return (k, Source::Pit);
    }
    let (max, ..) = cpuid(0);
    if max >= 0x15 {
        let (den, num, crystal_hz, _) = cpuid(0x15);
        let khz = u64::from(crystal_hz) * u64::from(num) / u64::from(den.max(1)) / 1000;
        if den != 0 && PLAUSIBLE_KHZ.contains(&khz) {
            return (khz, Source::Cpuid15);
        }
    }
    if max >= 0x16 {
        let khz = u64::from(cpuid(0x16).0 & 0xffff) * 1000;
        if PLAUSIBLE_KHZ.contains(&khz) {
            return (khz, Source::Cpuid16);
        }
    }
    (2_000_000, Source::Assumed)
}

fn hypervisor_leaf() -> Option<u64> {
    if cpuid(1).2 & (1 << 31) == 0 {
        return None;
    }
    if cpuid(0x4000_0000).0 < 0x4000_0010 {
        return None;
    }
    let khz = u64::from(cpuid(0x4000_0010).0);
    PLAUSIBLE_KHZ.contains(&khz).then_some(khz)
}

/// The lowest of five 20 ms PIT measurements: a vCPU preempted during a window only ever
/// makes that window look longer.
fn pit() -> Option<u64> {
    (0..5).filter_map(|_| pit_once()).min()
}

fn pit_once() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const LATCH: u64 = PIT_HZ / 50; // 20 ms
    let port61 = inb(0x61);
    outb(0x61, (port61 & !0x02) | 0x01); // gate on, speaker off
    outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(0x42, LATCH as u8);
    outb(0x42, (LATCH >> 8) as u8);
    let t0 = rdtsc();
    let mut polls = 0u64;
    while inb(0x61) & 0x20 == 0 {
        polls += 1;
        if polls > 50_000_000 {
            return None;
        }
    }
    let cycles = rdtsc().wrapping_sub(t0);
    outb(0x61, port61);
    if polls < 10 {
        return None; // no PIT behind port 0x61
    }
    let khz = cycles * PIT_HZ / (LATCH * 1000);
    PLAUSIBLE_KHZ.contains(&khz).then_some(khz)
}

/// A TSC-based clock of one CPU that never goes backwards, even if the TSC does (for example
/// across a migration to a host that does not restore it).
pub struct Clock {
    last_raw: u64,
    adjust: u64,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            last_raw: rdtsc(),
            adjust: 0,
        }
    }

    /// Monotonic TSC cycles.
    pub fn now(&mut self) -> u64 {
        let raw = rdtsc();
        if raw < self.last_raw {
            self.adjust += self.last_raw - raw;
        }
        self.last_raw = raw;
        raw + self.adjust
    }
}

/// Spins until `cycles` TSC cycles have passed.
pub fn delay(cycles: u64) {
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < cycles {
        core::hint::spin_loop();
    }
}

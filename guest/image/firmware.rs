//! How many CPUs the firmware tables list: ACPI MADT (found through the PVH `rsdp_paddr` or
//! the BIOS areas) and the Intel MP table. Only a hint for how long to wait for APs: under
//! QEMU, SeaBIOS's MP table may list only the CPUs its own (slow, emulated) probe saw.
//! Also: which top part of RAM the firmware left non-zero.

use crate::layout::Spans;

/// The larger of the MADT's and the MP table's count of enabled CPUs, if either exists.
pub fn cpu_count(rsdp_hint: u64) -> Option<u32> {
    match (madt_cpus(rsdp_hint), mp_table_cpus()) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Firmware may leave data near the top of RAM below 4 GiB that the PVH memory map still calls
/// RAM (QEMU + SeaBIOS: its high zone, about 16 MiB below the top). Reads the top
/// `TOP_SCAN` bytes of each such span of `untouched` and returns `[lowest non-zero page,
/// span end)` of the highest span that has one. Reading untouched RAM maps the host zero page.
pub fn dirty_top(untouched: &Spans) -> Option<(u64, u64)> {
    const TOP_SCAN: u64 = 32 << 20;
    let mut found = None;
    for r in untouched.ranges().iter().filter(|r| r.end <= 1 << 32) {
        let mut at = r.end.saturating_sub(TOP_SCAN).max(r.start);
        while at < r.end {
            // SAFETY: an identity-mapped RAM page that nothing writes to.
            if unsafe { crate::pattern::check(at as *const u64, 0, 0, 0) }.is_err() {
                found = Some((at, r.end));
                break;
            }
            at += crate::layout::PAGE;
        }
    }
    found
}

fn bios_areas() -> [(u64, u64); 3] {
    // The BIOS data area word at 0x40e holds the EBDA segment.
    let ebda = u64::from(rd16(0x40e)) << 4;
    let ebda = if (0x400..0xa0000).contains(&ebda) {
        ebda
    } else {
        0x9fc00
    };
    [(ebda, 1024), (0x9fc00, 1024), (0xe0000, 0x20000)]
}

fn scan(base: u64, len: u64, sig: &[u8], sum_len: u64) -> Option<u64> {
    let mut at = base;
    while at + 16 <= base + len {
        if sig
            .iter()
            .enumerate()
            .all(|(i, &b)| rd8(at + i as u64) == b)
            && checksum(at, sum_len)
        {
            return Some(at);
        }
        at += 16;
    }
    None
}

fn checksum(at: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(rd8(at + i))) == 0
}

fn madt_cpus(rsdp_hint: u64) -> Option<u32> {
    let rsdp = if rsdp_hint != 0 && below_4g(rsdp_hint, 36) {
        rsdp_hint
    } else {
        bios_areas()
            .iter()
            .find_map(|&(base, len)| scan(base, len, b"RSD PTR ", 20))?
    };
    let (root, wide) = if rd8(rsdp + 15) >= 2 && rd64(rsdp + 24) != 0 {
        (rd64(rsdp + 24), true)
    } else {
        (u64::from(rd32(rsdp + 16)), false)
    };
    if !below_4g(root, 36) {
        return None;
    }
    let len = u64::from(rd32(root + 4)).min(4096);
    let width = if wide { 8 } else { 4 };
    let mut at = root + 36;
    while at + width <= root + len {
        let table = if wide { rd64(at) } else { u64::from(rd32(at)) };
        at += width;
        if below_4g(table, 44) && rd32(table) == u32::from_le_bytes(*b"APIC") {
            return Some(madt_count(table)).filter(|&n| n > 0);
        }
    }
    None
}

fn madt_count(madt: u64) -> u32 {
    let end = madt + u64::from(rd32(madt + 4)).min(64 << 10);
    let mut at = madt + 44;
    let mut cpus = 0;
    while at + 2 <= end {
        let (kind, len) = (rd8(at), u64::from(rd8(at + 1)));
        if len < 2 {
            break;
        }
        let enabled = match kind {
            0 => rd32(at + 4) & 1 != 0, // processor local APIC
            9 => rd32(at + 8) & 1 != 0, // processor local x2APIC
            _ => false,
        };
        cpus += u32::from(enabled);
        at += len;
    }
    cpus
}

fn mp_table_cpus() -> Option<u32> {
    let fp = bios_areas()
        .iter()
        .find_map(|&(base, len)| scan(base, len, b"_MP_", 16))?;
    let table = u64::from(rd32(fp + 4));
    if !below_4g(table, 44) || rd32(table) != u32::from_le_bytes(*b"PCMP") {
        return None;
    }
    let count = rd16(table + 34);
    let mut at = table + 44;
    let mut cpus = 0;
    for _ in 0..count.min(1024) {
        match rd8(at) {
            0 => {
                cpus += u32::from(rd8(at + 3) & 1);
                at += 20;
            }
            1..=4 => at += 8,
            _ => break,
        }
    }
    (cpus > 0).then_some(cpus)
}

fn below_4g(addr: u64, len: u64) -> bool {
    addr >= 0x400 && addr + len <= 0xfec0_0000
}

fn rd8(addr: u64) -> u8 {
    // SAFETY: BIOS areas and firmware tables lie in identity-mapped memory below 4 GiB
    // (`below_4g` keeps table addresses out of the low page and the MMIO hole).
    unsafe { (addr as *const u8).read_volatile() }
}

fn rd16(addr: u64) -> u16 {
    u16::from(rd8(addr)) | u16::from(rd8(addr + 1)) << 8
}

fn rd32(addr: u64) -> u32 {
    u32::from(rd16(addr)) | u32::from(rd16(addr + 2)) << 16
}

fn rd64(addr: u64) -> u64 {
    u64::from(rd32(addr)) | u64::from(rd32(addr + 4)) << 32
}

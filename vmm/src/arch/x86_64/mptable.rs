//! Intel MultiProcessor Specification 1.4 table, so guests without ACPI find every vCPU, the
//! IOAPIC and the ISA interrupt routing.
//!
//! Layout at `MPTABLE_START`: the 16-byte floating pointer, then the configuration table
//! (header, one processor entry per vCPU, the ISA bus, the IOAPIC, 16 I/O interrupt entries and
//! the two local interrupt entries LINT0 = ExtINT, LINT1 = NMI).

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};

const SPEC_REV: u8 = 4;
const HEADER_LEN: usize = 44;
const FLOATING_LEN: usize = 16;
const CPU_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature and the FPU and APIC feature bits.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ISA_IRQS: u8 = 16;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("MP table cannot describe {0} vCPUs (APIC ids are 8 bits)")]
    TooManyCpus(u8),
    #[error("writing the MP table failed")]
    Write(#[source] GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The IOAPIC id: the first id after the vCPUs' APIC ids.
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// Size in bytes of the floating pointer plus the table for `cpus` vCPUs.
pub fn table_size(cpus: u8) -> usize {
    FLOATING_LEN
        + HEADER_LEN
        + usize::from(cpus) * CPU_ENTRY_LEN
        + SMALL_ENTRY_LEN * (2 + usize::from(ISA_IRQS) + 2)
}

/// The configuration table (header and entries) for `cpus` vCPUs, checksummed.
fn config_table(cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.push(0); // processor
        entries.push(id);
        entries.push(LAPIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(cpus);
    entries.extend_from_slice(&[2, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // Type 3: I/O interrupt; flags 0 = conforming polarity and trigger; bus 0 IRQ -> pin.
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, irq, ioapic, irq]);
        count += 1;
    }
    // Type 4: local interrupts; LINT0 of every LAPIC is ExtINT, LINT1 is NMI.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum
    table.extend_from_slice(b"MINIVMM ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table
    table.push(0);
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Write the MP floating pointer and configuration table for `cpus` vCPUs at `start`.
pub fn setup_mptable<M: Bytes<GuestAddress, E = GuestMemoryError>>(
    mem: &M,
    start: GuestAddress,
    cpus: u8,
) -> Result<(), MptableError> {
    if cpus == u8::MAX {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let table_addr = start.0 + FLOATING_LEN as u64;
    let mut fp = Vec::with_capacity(FLOATING_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(SPEC_REV);
    fp.push(0); // checksum
    fp.extend_from_slice(&[0; 5]);
    fp[10] = checksum(&fp);
    mem.write_slice(&fp, start).map_err(MptableError::Write)?;
    mem.write_slice(&config_table(cpus), GuestAddress(table_addr))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::MPTABLE_START;
    use vm_memory::GuestMemoryMmap;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem")
    }

    #[test]
    fn checksums_are_zero_and_pointer_is_right() {
        for cpus in [1u8, 2, 8, 254] {
            let m = mem();
            setup_mptable(&m, GuestAddress(MPTABLE_START), cpus).expect("write");
            let mut fp = [0u8; FLOATING_LEN];
            m.read_slice(&mut fp, GuestAddress(MPTABLE_START))
                .expect("read");
            assert_eq!(&fp[0..4], b"_MP_");
            assert_eq!(sum(&fp), 0, "floating pointer checksum");
            let table_addr = u32::from_le_bytes([fp[4], fp[5], fp[6], fp[7]]);
            let mut hdr = [0u8; HEADER_LEN];
            m.read_slice(&mut hdr, GuestAddress(u64::from(table_addr)))
                .expect("hdr");
            assert_eq!(&hdr[0..4], b"PCMP");
            let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
            let mut table = vec![0u8; len];
            m.read_slice(&mut table, GuestAddress(u64::from(table_addr)))
                .expect("table");
            assert_eq!(sum(&table), 0, "table checksum for {cpus} cpus");
            assert_eq!(FLOATING_LEN + len, table_size(cpus));
            let count = u16::from_le_bytes([hdr[34], hdr[35]]);
            assert_eq!(usize::from(count), usize::from(cpus) + 2 + 16 + 2);
        }
    }

    #[test]
    fn one_processor_entry_per_cpu_with_bsp_first() {
        let t = config_table(3);
        let cpus: Vec<&[u8]> = t[HEADER_LEN..].chunks(CPU_ENTRY_LEN).take(3).collect();
        for (i, e) in cpus.iter().enumerate() {
            assert_eq!(e[0], 0, "processor entry");
            assert_eq!(e[1], i as u8, "APIC id");
            assert_eq!(e[3] & CPU_BSP != 0, i == 0);
        }
        let ioapic = &t[HEADER_LEN + 3 * CPU_ENTRY_LEN + 8..][..8];
        assert_eq!((ioapic[0], ioapic[1]), (2, 3));
    }

    #[test]
    fn table_fits_in_the_bios_area() {
        assert!(MPTABLE_START as usize + table_size(254) <= 0x10_0000);
        assert!(matches!(
            setup_mptable(&mem(), GuestAddress(MPTABLE_START), 255),
            Err(MptableError::TooManyCpus(255))
        ));
    }
}

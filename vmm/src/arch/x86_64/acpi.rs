//! Minimal ACPI tables: RSDP → XSDT → {FADT → DSDT, MADT}.
//!
//! They tell the guest its vCPUs and IOAPIC (MADT), and how to power off: the FADT's PM1a
//! control block is the power-off port (`PM1A_CNT_PORT`) and the DSDT's `\_S5_` package gives
//! SLP_TYP 5, so Linux `poweroff` writes SLP_TYP | SLP_EN there. The FADT's reset register is
//! the i8042 command port with value 0xfe.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR, PM1A_CNT_PORT};
use super::mptable::ioapic_id;

const OEM_ID: &[u8; 6] = b"MINVMM";
const OEM_TABLE_ID: &[u8; 8] = b"MINIVMM ";
const CREATOR_ID: &[u8; 4] = b"MVMM";
const HEADER_LEN: usize = 36;
const RSDP_LEN: usize = 36;
const FADT_LEN: usize = 276;
/// PM1a event block (status + enable), answered with zeros.
pub const PM1A_EVT_PORT: u16 = 0x600;
pub const PM1A_EVT_LEN: u8 = 4;
const SCI_IRQ: u16 = 9;
const RESET_PORT: u64 = 0x64;
const RESET_VALUE: u8 = 0xfe;

/// `Name (_S5_, Package () { 5, 5, 0, 0 })`
const DSDT_S5: &[u8] = &[
    0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00,
];

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table: header plus body, checksummed by [`Sdt::finish`].
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Sdt {
        let mut v = Vec::with_capacity(128);
        v.extend_from_slice(signature);
        v.extend_from_slice(&0u32.to_le_bytes()); // length, set in finish
        v.push(revision);
        v.push(0); // checksum
        v.extend_from_slice(OEM_ID);
        v.extend_from_slice(OEM_TABLE_ID);
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(CREATOR_ID);
        v.extend_from_slice(&1u32.to_le_bytes());
        Sdt(v)
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Sdt {
        self.0.extend_from_slice(b);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

/// A Generic Address Structure for an I/O port.
fn gas_io(port: u64, bit_width: u8, access_size: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = bit_width;
    g[3] = access_size;
    g[4..12].copy_from_slice(&port.to_le_bytes());
    g
}

fn dsdt() -> Vec<u8> {
    let mut t = Sdt::new(b"DSDT", 2);
    t.bytes(DSDT_S5);
    t.finish()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = vec![0u8; FADT_LEN - HEADER_LEN];
    let mut put =
        |off: usize, v: &[u8]| b[off - HEADER_LEN..off - HEADER_LEN + v.len()].copy_from_slice(v);
    put(40, &(dsdt_addr as u32).to_le_bytes());
    put(46, &SCI_IRQ.to_le_bytes());
    put(56, &u32::from(PM1A_EVT_PORT).to_le_bytes());
    put(64, &u32::from(PM1A_CNT_PORT).to_le_bytes());
    put(88, &[PM1A_EVT_LEN, 2]);
    // IAPC_BOOT_ARCH: 8042 present, no VGA, no CMOS RTC.
    put(109, &(0x2u16 | 0x4 | 0x20).to_le_bytes());
    // Flags: WBINVD, power and sleep buttons absent as fixed features, reset register.
    put(112, &(1u32 | (1 << 4) | (1 << 5) | (1 << 10)).to_le_bytes());
    put(116, &gas_io(RESET_PORT, 8, 1));
    put(128, &[RESET_VALUE]);
    put(131, &[5]); // FADT minor version (ACPI 6.5)
    put(140, &dsdt_addr.to_le_bytes());
    put(148, &gas_io(u64::from(PM1A_EVT_PORT), 32, 2));
    put(172, &gas_io(u64::from(PM1A_CNT_PORT), 16, 2));
    let mut t = Sdt::new(b"FACP", 6);
    t.bytes(&b);
    t.finish()
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(b"APIC", 5);
    t.bytes(&LAPIC_ADDR.to_le_bytes());
    t.bytes(&1u32.to_le_bytes()); // PCAT_COMPAT: dual 8259s present
    for id in 0..cpus {
        t.bytes(&[0, 8, id, id, 1, 0, 0, 0]); // processor local APIC, enabled
    }
    let mut ioapic = vec![1, 12, ioapic_id(cpus), 0];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    t.bytes(&ioapic);
    t.bytes(&[4, 6, 0xff, 0, 0, 1]); // local APIC NMI: all processors, LINT1
    t.finish()
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = Sdt::new(b"XSDT", 1);
    for e in entries {
        t.bytes(&e.to_le_bytes());
    }
    t.finish()
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RSDP_LEN);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.push(0); // extended checksum
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Write the ACPI tables for `cpus` vCPUs starting at `start` (16-byte aligned, in the BIOS
/// area); returns the RSDP address.
pub fn setup_acpi<M: Bytes<GuestAddress, E = GuestMemoryError>>(
    mem: &M,
    start: GuestAddress,
    cpus: u8,
) -> Result<GuestAddress, GuestMemoryError> {
    let align = |a: u64| a.next_multiple_of(16);
    let rsdp_addr = start.0;
    let xsdt_addr = align(rsdp_addr + RSDP_LEN as u64);
    let xsdt_len = (HEADER_LEN + 2 * 8) as u64;
    let dsdt_addr = align(xsdt_addr + xsdt_len);
    let dsdt = dsdt();
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let madt_addr = align(fadt_addr + FADT_LEN as u64);
    mem.write_slice(&dsdt, GuestAddress(dsdt_addr))?;
    mem.write_slice(&fadt(dsdt_addr), GuestAddress(fadt_addr))?;
    mem.write_slice(&madt(cpus), GuestAddress(madt_addr))?;
    mem.write_slice(&xsdt(&[fadt_addr, madt_addr]), GuestAddress(xsdt_addr))?;
    mem.write_slice(&rsdp(xsdt_addr), GuestAddress(rsdp_addr))?;
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ACPI_START;
    use vm_memory::GuestMemoryMmap;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
    }

    fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut hdr = [0u8; HEADER_LEN];
        mem.read_slice(&mut hdr, GuestAddress(addr))
            .expect("header");
        let mut t = vec![0u8; u32_at(&hdr, 4) as usize];
        mem.read_slice(&mut t, GuestAddress(addr)).expect("table");
        assert_eq!(
            sum(&t),
            0,
            "checksum of {:?}",
            String::from_utf8_lossy(&t[..4])
        );
        t
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let at = setup_acpi(&mem, GuestAddress(ACPI_START), 4).expect("write");
        let mut r = [0u8; RSDP_LEN];
        mem.read_slice(&mut r, at).expect("rsdp");
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt = table(&mem, u64_at(&r, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let fadt = table(&mem, u64_at(&xsdt, 36));
        let madt = table(&mem, u64_at(&xsdt, 44));
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!(u32_at(&fadt, 64), u32::from(PM1A_CNT_PORT));
        assert_eq!(fadt[89], 2, "PM1 control block is 16 bits");
        assert_eq!(u64_at(&fadt, 172 + 4), u64::from(PM1A_CNT_PORT));
        let dsdt = table(&mem, u64_at(&fadt, 140));
        assert_eq!(u64::from(u32_at(&fadt, 40)), u64_at(&fadt, 140));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert_eq!(&madt[..4], b"APIC");
        // Walk the MADT entries.
        let mut off = 44;
        let mut ids = Vec::new();
        let mut ioapics = 0;
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            match ty {
                0 => ids.push(madt[off + 3]),
                1 => {
                    ioapics += 1;
                    assert_eq!(u32_at(&madt, off + 4), IOAPIC_ADDR);
                }
                _ => {}
            }
            off += len;
        }
        assert_eq!(ids, vec![0, 1, 2, 3]);
        assert_eq!(ioapics, 1);
        assert!(madt_end_within_bios_area(u64_at(&xsdt, 44), madt.len()));
    }

    fn madt_end_within_bios_area(addr: u64, len: usize) -> bool {
        addr + len as u64 <= crate::arch::x86_64::layout::MPTABLE_START
    }
}

//! Identity page tables for the 64-bit Linux boot protocol entry: the first 1 GiB mapped with
//! 2 MiB pages.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{PDPT_ADDR, PD_ADDR, PML4_ADDR};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Write PML4, PDPT and PD at their layout addresses; returns the CR3 value.
pub fn write_identity_map<M: Bytes<GuestAddress, E = GuestMemoryError>>(
    mem: &M,
) -> Result<u64, GuestMemoryError> {
    mem.write_obj(PDPT_ADDR | PRESENT_RW, GuestAddress(PML4_ADDR))?;
    mem.write_obj(PD_ADDR | PRESENT_RW, GuestAddress(PDPT_ADDR))?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | PAGE_SIZE_2M | PRESENT_RW,
            GuestAddress(PD_ADDR + i * 8),
        )?;
    }
    Ok(PML4_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Walk the tables like the MMU does for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let rd = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).ok();
        let pml4e = rd(cr3 + ((va >> 39) & 0x1ff) * 8)?;
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = rd((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8)?;
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = rd((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8)?;
        if pde & 1 == 0 || pde & PAGE_SIZE_2M == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff) | (va & 0x1f_ffff))
    }

    #[test]
    fn first_gigabyte_is_identity_mapped() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let cr3 = write_identity_map(&mem).expect("write");
        for va in [0u64, 0x7000, 0x100_0000, 0x1234_5678, (1 << 30) - 1] {
            assert_eq!(translate(&mem, cr3, va), Some(va));
        }
        assert_eq!(translate(&mem, cr3, 1 << 30), None);
    }
}

//! The embedded image is an x86_64 ELF64 that both minivmm and QEMU can boot through PVH:
//! a `XEN_ELFNOTE_PHYS32_ENTRY` note whose entry lies inside a loadable segment, loaded at
//! 1 MiB and up.

use guest::TEST_GUEST_ELF as ELF;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

struct Phdr {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

fn phdrs() -> Vec<Phdr> {
    let phoff = u64_at(ELF, 0x20) as usize;
    let phentsize = u16_at(ELF, 0x36) as usize;
    let phnum = u16_at(ELF, 0x38) as usize;
    assert_eq!(phentsize, 56, "ELF64 program header size");
    (0..phnum)
        .map(|i| {
            let p = phoff + i * phentsize;
            Phdr {
                kind: u32_at(ELF, p),
                offset: u64_at(ELF, p + 8),
                paddr: u64_at(ELF, p + 0x18),
                filesz: u64_at(ELF, p + 0x20),
                memsz: u64_at(ELF, p + 0x28),
                align: u64_at(ELF, p + 0x30),
            }
        })
        .collect()
}

/// The PVH entry from the first Xen note of type 18 in a PT_NOTE segment.
fn pvh_entry() -> Option<u64> {
    for ph in phdrs().iter().filter(|p| p.kind == PT_NOTE) {
        let mut at = ph.offset as usize;
        let end = at + ph.filesz as usize;
        let align = ph.align.max(4) as usize;
        while at + 12 <= end {
            let namesz = u32_at(ELF, at) as usize;
            let descsz = u32_at(ELF, at + 4) as usize;
            let kind = u32_at(ELF, at + 8);
            let name = &ELF[at + 12..at + 12 + namesz];
            let desc = at + 12 + namesz.next_multiple_of(align);
            if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                return Some(match descsz {
                    4 => u64::from(u32_at(ELF, desc)),
                    _ => u64_at(ELF, desc),
                });
            }
            at = desc + descsz.next_multiple_of(align);
        }
    }
    None
}

#[test]
fn image_is_an_x86_64_elf64_executable() {
    assert!(ELF.len() > 64, "image is {} bytes", ELF.len());
    assert_eq!(&ELF[..4], b"\x7fELF");
    assert_eq!(ELF[4], 2, "ELFCLASS64");
    assert_eq!(ELF[5], 1, "little endian");
    assert_eq!(u16_at(ELF, 0x10), 2, "ET_EXEC");
    assert_eq!(u16_at(ELF, 0x12), 62, "EM_X86_64");
}

#[test]
fn pvh_entry_lies_in_a_loadable_segment() {
    let entry = pvh_entry().expect("a Xen PHYS32_ENTRY note");
    let loads: Vec<Phdr> = phdrs().into_iter().filter(|p| p.kind == PT_LOAD).collect();
    assert!(!loads.is_empty());
    assert!(
        loads
            .iter()
            .any(|p| p.paddr <= entry && entry < p.paddr + p.filesz),
        "entry {entry:#x} is not in the file-backed part of any PT_LOAD"
    );
    assert!(entry < 1 << 32, "a 32-bit entry point");
}

#[test]
fn segments_load_at_1mib_and_fit_the_file() {
    for p in phdrs().iter().filter(|p| p.kind == PT_LOAD) {
        assert!(
            p.paddr >= 1 << 20,
            "segment at {:#x} is below 1 MiB",
            p.paddr
        );
        assert!(p.paddr + p.memsz < 64 << 20, "image stays small");
        assert!(p.filesz <= p.memsz);
        assert!((p.offset + p.filesz) as usize <= ELF.len());
    }
}

#[test]
fn pvh_note_is_four_byte_aligned_for_qemu() {
    // QEMU aligns the note name by the segment's p_align: it must be 4 for an 8-byte
    // descriptor after "Xen\0" to be found where it is.
    let notes: Vec<Phdr> = phdrs().into_iter().filter(|p| p.kind == PT_NOTE).collect();
    assert!(!notes.is_empty());
    assert!(notes.iter().all(|p| p.align == 4));
}

//! A hand-assembled PVH test guest, shared by the KVM integration tests.

/// The guest, linked at 0x100000 (`as --32`, `ld -Ttext=0x100000 --oformat binary`): checks
/// the start info magic (else prints `!`), prints the command line and the memmap entry count as
/// a digit, then does what the mode byte at 0x100ff0 says: 0 power-off (0x2000 to port 0x604),
/// 1 i8042 reset, 2 spin incrementing the dword at 0x2000, 3 triple fault (empty IDT, ud2),
/// 4 echo serial input plus one (`a` → `b`) until it reads `q`, then power off.
pub const GUEST_CODE: &[u8] = &[
    0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33, // 0x00 start: cmpl $0x336ec578,(%ebx)
    0x75, 0x7c, // 0x06 jne 84
    0x66, 0xba, 0xf8, 0x03, // 0x08 mov $0x3f8,%dx
    0x8b, 0x73, 0x18, // 0x0c mov 0x18(%ebx),%esi
    0x8a, 0x06, // 0x0f mov (%esi),%al
    0x84, 0xc0, // 0x11 test %al,%al
    0x74, 0x04, // 0x13 je 19
    0xee, // 0x15 out %al,(%dx)
    0x46, // 0x16 inc %esi
    0xeb, 0xf6, // 0x17 jmp f
    0xb0, 0x0a, // 0x19 mov $0xa,%al
    0xee, // 0x1b out %al,(%dx)
    0x8b, 0x4b, 0x30, // 0x1c mov 0x30(%ebx),%ecx
    0x80, 0xc1, 0x30, // 0x1f add $0x30,%cl
    0x88, 0xc8, // 0x22 mov %cl,%al
    0xee, // 0x24 out %al,(%dx)
    0xb0, 0x0a, // 0x25 mov $0xa,%al
    0xee, // 0x27 out %al,(%dx)
    0xa0, 0xf0, 0x0f, 0x10, 0x00, // 0x28 mov 0x100ff0,%al
    0x3c, 0x01, // 0x2d cmp $0x1,%al
    0x74, 0x19, // 0x2f je 4a
    0x3c, 0x02, // 0x31 cmp $0x2,%al
    0x74, 0x1b, // 0x33 je 50
    0x3c, 0x03, // 0x35 cmp $0x3,%al
    0x74, 0x1f, // 0x37 je 58
    0x3c, 0x04, // 0x39 cmp $0x4,%al
    0x74, 0x24, // 0x3b je 61
    0x66, 0xba, 0x04, 0x06, // 0x3d mov $0x604,%dx
    0x66, 0xb8, 0x00, 0x20, // 0x41 mov $0x2000,%ax
    0x66, 0xef, // 0x45 out %ax,(%dx)
    0xf4, // 0x47 hlt
    0xeb, 0xfd, // 0x48 jmp 47
    0xb0, 0xfe, // 0x4a reset: mov $0xfe,%al
    0xe6, 0x64, // 0x4c out %al,$0x64
    0xeb, 0xf7, // 0x4e jmp 47
    0xff, 0x05, 0x00, 0x20, 0x00, 0x00, // 0x50 spin: incl 0x2000
    0xeb, 0xf8, // 0x56 jmp 50
    0x0f, 0x01, 0x1d, 0x90, 0x00, 0x10, 0x00, // 0x58 fault: lidt 0x100090
    0x0f, 0x0b, // 0x5f ud2
    0x66, 0xba, 0xfd, 0x03, // 0x61 echo: mov $0x3fd,%dx
    0xec, // 0x65 in (%dx),%al
    0xa8, 0x01, // 0x66 test $0x1,%al
    0x74, 0xf7, // 0x68 je 61
    0x66, 0xba, 0xf8, 0x03, // 0x6a mov $0x3f8,%dx
    0xec, // 0x6e in (%dx),%al
    0x3c, 0x71, // 0x6f cmp $0x71,%al
    0x74, 0x05, // 0x71 je 78
    0xfe, 0xc0, // 0x73 inc %al
    0xee, // 0x75 out %al,(%dx)
    0xeb, 0xe9, // 0x76 jmp 61
    0x66, 0xba, 0x04, 0x06, // 0x78 poweroff: mov $0x604,%dx
    0x66, 0xb8, 0x00, 0x20, // 0x7c mov $0x2000,%ax
    0x66, 0xef, // 0x80 out %ax,(%dx)
    0xeb, 0xc3, // 0x82 jmp 47
    0x66, 0xba, 0xf8, 0x03, // 0x84 fail: mov $0x3f8,%dx
    0xb0, 0x21, // 0x88 mov $0x21,%al
    0xee, // 0x8a out %al,(%dx)
    0xeb, 0xba, // 0x8b jmp 47
    0x8d, 0x76, 0x00, // 0x8d padding
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 0x90 idt0: limit 0, base 0
];

pub const LOAD_ADDR: u64 = 0x10_0000;
pub const MODE_OFFSET: usize = 0xff0;

/// A 64-bit ELF with one PT_LOAD at 1 MiB and a PT_NOTE with XEN_ELFNOTE_PHYS32_ENTRY.
pub fn pvh_elf(mode: u8) -> Vec<u8> {
    let mut f = vec![0u8; 0x2000];
    let put = |f: &mut Vec<u8>, off: usize, b: &[u8]| f[off..off + b.len()].copy_from_slice(b);
    // ELF header.
    put(&mut f, 0, b"\x7fELF\x02\x01\x01");
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &0x3eu16.to_le_bytes()); // x86-64
    put(&mut f, 20, &1u32.to_le_bytes());
    put(&mut f, 24, &LOAD_ADDR.to_le_bytes()); // e_entry
    put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut f, 56, &2u16.to_le_bytes()); // e_phnum
    put(&mut f, 58, &64u16.to_le_bytes()); // e_shentsize
                                           // PT_LOAD.
    let ph = 64;
    put(&mut f, ph, &1u32.to_le_bytes());
    put(&mut f, ph + 4, &7u32.to_le_bytes());
    put(&mut f, ph + 8, &0x1000u64.to_le_bytes());
    put(&mut f, ph + 16, &LOAD_ADDR.to_le_bytes());
    put(&mut f, ph + 24, &LOAD_ADDR.to_le_bytes());
    put(&mut f, ph + 32, &0x1000u64.to_le_bytes());
    put(&mut f, ph + 40, &0x1000u64.to_le_bytes());
    put(&mut f, ph + 48, &0x1000u64.to_le_bytes());
    // PT_NOTE.
    let ph = 64 + 56;
    put(&mut f, ph, &4u32.to_le_bytes());
    put(&mut f, ph + 4, &4u32.to_le_bytes());
    put(&mut f, ph + 8, &0x200u64.to_le_bytes());
    put(&mut f, ph + 32, &20u64.to_le_bytes());
    put(&mut f, ph + 40, &20u64.to_le_bytes());
    put(&mut f, ph + 48, &4u64.to_le_bytes());
    // The note: namesz 4, descsz 4, type 18, "Xen\0", entry.
    put(&mut f, 0x200, &4u32.to_le_bytes());
    put(&mut f, 0x204, &4u32.to_le_bytes());
    put(&mut f, 0x208, &18u32.to_le_bytes());
    put(&mut f, 0x20c, b"Xen\0");
    put(&mut f, 0x210, &(LOAD_ADDR as u32).to_le_bytes());
    // The segment.
    put(&mut f, 0x1000, GUEST_CODE);
    f[0x1000 + MODE_OFFSET] = mode;
    f
}

/// Guest endings selected by the mode byte.
pub const MODE_POWER_OFF: u8 = 0;
pub const MODE_RESET: u8 = 1;
pub const MODE_SPIN: u8 = 2;
pub const MODE_TRIPLE_FAULT: u8 = 3;
pub const MODE_ECHO: u8 = 4;

/// Write the guest for `mode` to a temporary file removed on drop.
pub struct GuestFile(pub std::path::PathBuf);

impl GuestFile {
    pub fn new(tag: &str, mode: u8) -> GuestFile {
        let p = std::env::temp_dir().join(format!("minivmm-test-{}-{tag}.elf", std::process::id()));
        std::fs::write(&p, pvh_elf(mode)).expect("write guest");
        GuestFile(p)
    }
}

impl Drop for GuestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

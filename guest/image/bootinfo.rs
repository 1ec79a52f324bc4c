//! The PVH `struct hvm_start_info`: command line and memory map, copied out early.

use core::fmt;

use crate::layout::Spans;

const MAGIC: u32 = 0x336e_c578;
const RAM: u32 = 1;
const MAX_ENTRIES: u32 = 128;
/// Longest command line kept (longer ones are cut).
pub const CMDLINE_MAX: usize = 1024;

/// What the guest learnt from its start info.
pub struct BootInfo {
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    /// Type-1 (RAM) memory-map entries, page-trimmed and merged.
    pub ram: Spans,
    /// Memory-map entries of any type.
    pub entries: u32,
    /// ACPI RSDP address from the start info (0 if none).
    pub rsdp: u64,
}

/// Start info that cannot be used.
#[derive(Debug, Clone, Copy)]
pub enum BootInfoError {
    /// %ebx was 0.
    Missing,
    BadMagic(u32),
    /// Version 0 or an empty memory map: no way to know the RAM.
    NoMemoryMap {
        version: u32,
    },
    TooManyRamRanges,
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootInfoError::Missing => write!(f, "no hvm_start_info (ebx = 0)"),
            BootInfoError::BadMagic(m) => write!(f, "hvm_start_info has bad magic {m:#x}"),
            BootInfoError::NoMemoryMap { version } => {
                write!(f, "hvm_start_info version {version} carries no memory map")
            }
            BootInfoError::TooManyRamRanges => write!(f, "too many RAM ranges in the memory map"),
        }
    }
}

fn rd32(addr: u64) -> u32 {
    // SAFETY: start info, memory map and command line lie in identity-mapped low RAM.
    unsafe { (addr as *const u32).read_unaligned() }
}

fn rd64(addr: u64) -> u64 {
    // SAFETY: as for `rd32`.
    unsafe { (addr as *const u64).read_unaligned() }
}

impl BootInfo {
    /// Reads the start info at `at` (the %ebx of the PVH entry).
    pub fn read(at: u64) -> Result<BootInfo, BootInfoError> {
        if at == 0 {
            return Err(BootInfoError::Missing);
        }
        let magic = rd32(at);
        if magic != MAGIC {
            return Err(BootInfoError::BadMagic(magic));
        }
        let version = rd32(at + 4);
        let cmdline_at = rd64(at + 24);
        let (map_at, entries) = if version >= 1 {
            (rd64(at + 40), rd32(at + 48))
        } else {
            (0, 0)
        };
        if map_at == 0 || entries == 0 {
            return Err(BootInfoError::NoMemoryMap { version });
        }
        let mut ram = Spans::new();
        for i in 0..entries.min(MAX_ENTRIES) {
            let e = map_at + 24 * u64::from(i);
            if rd32(e + 16) == RAM && !ram.add(rd64(e), rd64(e + 8)) {
                return Err(BootInfoError::TooManyRamRanges);
            }
        }
        let mut info = BootInfo {
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            ram,
            entries,
            rsdp: rd64(at + 32),
        };
        if cmdline_at != 0 {
            while info.cmdline_len < CMDLINE_MAX {
                // SAFETY: a NUL-terminated string in identity-mapped RAM, read up to the cap.
                let b = unsafe { ((cmdline_at + info.cmdline_len as u64) as *const u8).read() };
                if b == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = b;
                info.cmdline_len += 1;
            }
        }
        Ok(info)
    }

    /// The raw command line bytes.
    pub fn cmdline_bytes(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// The command line as text (up to its first invalid UTF-8 byte).
    pub fn cmdline(&self) -> &str {
        let b = self.cmdline_bytes();
        match core::str::from_utf8(b) {
            Ok(s) => s,
            // The prefix is valid by construction.
            Err(e) => core::str::from_utf8(&b[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

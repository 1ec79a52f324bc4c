//! Loading the guest: kernel (bzImage or PVH ELF, told apart by content), initrd, command line,
//! and the boot tables (GDT, page tables, MP table, zero page or PVH start info).
//!
//! Files are opened and their format checked by [`BootSources::open`] before any KVM work, so
//! bad input is refused early; [`load`] then writes everything into guest memory and returns
//! the bootstrap vCPU's entry point.

use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult};
use log::info;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::acpi::setup_acpi;
use crate::arch::x86_64::bootparams::{write_zero_page, ZeroPageError, ZeroPageParams};
use crate::arch::x86_64::e820::memory_map;
use crate::arch::x86_64::gdt::write_gdt;
use crate::arch::x86_64::layout::{
    low_ram_end, ACPI_START, BOOT_GDT_ADDR, CMDLINE_ADDR, HIMEM_START, MPTABLE_START,
};
use crate::arch::x86_64::mptable::{setup_mptable, MptableError};
use crate::arch::x86_64::paging::write_identity_map;
use crate::arch::x86_64::pvh::{write_start_info, StartInfoParams};
use crate::arch::x86_64::regs::{boot_gdt, EntryPoint};
use crate::config::{KernelSource, VmConfig, MAX_CMDLINE_LEN};
use crate::kvm::memory::GuestMemoryMmap;

/// Offset and magic of the Linux boot protocol header ("HdrS").
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELF_CLASS_64: u8 = 2;
/// `xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
const PAGE: u64 = 4096;

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {0}")]
    OpenKernel(PathBuf, #[source] io::Error),
    #[error("cannot read kernel {0}")]
    ReadKernel(String, #[source] io::Error),
    #[error("kernel {0} is empty")]
    EmptyKernel(String),
    #[error("kernel {0} is neither a bzImage nor an ELF file")]
    UnknownKernelFormat(String),
    #[error("kernel {0} is a 32-bit ELF; only 64-bit ELF kernels are supported")]
    Elf32(String),
    #[error("kernel {0} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry(String),
    #[error("bzImage {0} has no 64-bit entry point")]
    NoBzImage64BitEntry(String),
    #[error("cannot load kernel {0}")]
    LoadKernel(String, #[source] linux_loader::loader::Error),
    #[error("the built-in test guest is empty in this build; pass --kernel")]
    EmptyBuiltinGuest,
    #[error("cannot open initrd {0}")]
    OpenInitrd(PathBuf, #[source] io::Error),
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot load initrd {0}")]
    LoadInitrd(PathBuf, #[source] vm_memory::GuestMemoryError),
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    #[error("cannot write the boot GDT")]
    Gdt(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the boot page tables")]
    PageTables(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the MP table")]
    Mptable(#[source] MptableError),
    #[error("cannot write the ACPI tables")]
    Acpi(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the zero page")]
    ZeroPage(#[source] ZeroPageError),
    #[error("cannot write the PVH start info")]
    StartInfo(#[source] linux_loader::configurator::Error),
}

/// The two kernel formats we boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

/// Tell the format from the first bytes of a kernel image.
pub fn detect_format(name: &str, head: &[u8]) -> Result<KernelFormat, BootError> {
    if head.is_empty() {
        return Err(BootError::EmptyKernel(name.to_string()));
    }
    if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(BZIMAGE_MAGIC) {
        return Ok(KernelFormat::BzImage);
    }
    if head.starts_with(ELF_MAGIC) {
        return match head.get(4) {
            Some(&ELF_CLASS_64) => Ok(KernelFormat::Elf),
            _ => Err(BootError::Elf32(name.to_string())),
        };
    }
    Err(BootError::UnknownKernelFormat(name.to_string()))
}

/// A readable, seekable kernel image.
enum KernelImage {
    File(File),
    Builtin(Cursor<&'static [u8]>),
}

impl KernelImage {
    fn load<L: KernelLoader>(
        &mut self,
        mem: &GuestMemoryMmap,
    ) -> Result<KernelLoaderResult, linux_loader::loader::Error> {
        let high = Some(GuestAddress(HIMEM_START));
        match self {
            KernelImage::File(f) => L::load(mem, None, f, high),
            KernelImage::Builtin(c) => L::load(mem, None, c, high),
        }
    }
}

/// An opened initrd.
struct Initrd {
    path: PathBuf,
    file: File,
    size: u64,
}

/// Kernel and initrd, opened and checked.
pub struct BootSources {
    name: String,
    format: KernelFormat,
    kernel: KernelImage,
    initrd: Option<Initrd>,
}

fn read_head<R: Read + Seek>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    r.by_ref().take(1024).read_to_end(&mut head)?;
    r.seek(SeekFrom::Start(0))?;
    Ok(head)
}

impl BootSources {
    /// Open the kernel and initrd of `config` and check the kernel's format.
    pub fn open(config: &VmConfig) -> Result<BootSources, BootError> {
        let name = config.kernel.to_string();
        let initrd = config.initrd.as_deref().map(open_initrd).transpose()?;
        let (mut kernel, head) = match &config.kernel {
            KernelSource::BuiltinTestGuest => {
                if guest::TEST_GUEST_ELF.is_empty() {
                    return Err(BootError::EmptyBuiltinGuest);
                }
                let mut c = Cursor::new(guest::TEST_GUEST_ELF);
                let head = read_head(&mut c).map_err(|e| BootError::ReadKernel(name.clone(), e))?;
                (KernelImage::Builtin(c), head)
            }
            KernelSource::File(path) => {
                let mut f = File::open(path).map_err(|e| BootError::OpenKernel(path.clone(), e))?;
                let head = read_head(&mut f).map_err(|e| BootError::ReadKernel(name.clone(), e))?;
                (KernelImage::File(f), head)
            }
        };
        let format = detect_format(&name, &head)?;
        if let KernelImage::File(f) = &mut kernel {
            f.seek(SeekFrom::Start(0))
                .map_err(|e| BootError::ReadKernel(name.clone(), e))?;
        }
        Ok(BootSources {
            name,
            format,
            kernel,
            initrd,
        })
    }

    pub fn format(&self) -> KernelFormat {
        self.format
    }
}

fn open_initrd(path: &Path) -> Result<Initrd, BootError> {
    let err = |e| BootError::OpenInitrd(path.to_path_buf(), e);
    let file = File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    Ok(Initrd {
        path: path.to_path_buf(),
        file,
        size: meta.len(),
    })
}

/// Load the initrd at the top of RAM below `limit`, above `kernel_end`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut Initrd,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let too_large = || BootError::InitrdTooLarge {
        path: initrd.path.clone(),
        size: initrd.size,
        limit,
    };
    let addr = limit.checked_sub(initrd.size).ok_or_else(too_large)? & !(PAGE - 1);
    if addr < kernel_end.next_multiple_of(PAGE) {
        return Err(too_large());
    }
    let size = usize::try_from(initrd.size).map_err(|_| too_large())?;
    let mut f = &initrd.file;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size)
        .map_err(|e| BootError::LoadInitrd(initrd.path.clone(), e))?;
    Ok((addr, initrd.size))
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<u32, BootError> {
    let mut cl = Cmdline::new(MAX_CMDLINE_LEN).map_err(BootError::Cmdline)?;
    if !cmdline.is_empty() {
        cl = Cmdline::try_from(cmdline, MAX_CMDLINE_LEN).map_err(BootError::Cmdline)?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(BootError::WriteCmdline)?;
    Ok(cmdline.len() as u32 + 1)
}

/// Load kernel, initrd and command line and write the boot tables; returns the entry point of
/// the bootstrap vCPU.
pub fn load(
    sources: &mut BootSources,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
) -> Result<EntryPoint, BootError> {
    let name = sources.name.clone();
    let low_end = low_ram_end(config.mem_bytes);
    let memmap = memory_map(config.mem_bytes);
    let cmdline_size = write_cmdline(mem, &config.cmdline)?;
    setup_mptable(mem, GuestAddress(MPTABLE_START), config.cpus).map_err(BootError::Mptable)?;
    let rsdp_addr = setup_acpi(mem, GuestAddress(ACPI_START), config.cpus)
        .map_err(BootError::Acpi)?
        .0;

    let entry = match sources.format {
        KernelFormat::Elf => {
            let r = sources
                .kernel
                .load::<Elf>(mem)
                .map_err(|e| BootError::LoadKernel(name.clone(), e))?;
            let PvhBootCapability::PvhEntryPresent(pvh_entry) = r.pvh_boot_cap else {
                return Err(BootError::NoPvhEntry(name));
            };
            let initrd = match sources.initrd.as_mut() {
                Some(i) => Some(load_initrd(mem, i, r.kernel_end, low_end)?),
                None => None,
            };
            let params = StartInfoParams {
                cmdline_addr: CMDLINE_ADDR,
                initrd,
                rsdp_addr,
            };
            let start_info =
                write_start_info(mem, &params, &memmap).map_err(BootError::StartInfo)?;
            info!("PVH entry {:#x}", pvh_entry.0);
            EntryPoint::Pvh {
                entry: pvh_entry.0,
                start_info: start_info.0,
            }
        }
        KernelFormat::BzImage => {
            let r = sources
                .kernel
                .load::<BzImage>(mem)
                .map_err(|e| BootError::LoadKernel(name.clone(), e))?;
            let hdr: setup_header = r.setup_header.unwrap_or_default();
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::NoBzImage64BitEntry(name));
            }
            let limit = match hdr.initrd_addr_max {
                0 => low_end,
                max => low_end.min(u64::from(max) + 1),
            };
            let initrd = match sources.initrd.as_mut() {
                Some(i) => Some(load_initrd(mem, i, r.kernel_end, limit)?),
                None => None,
            };
            write_identity_map(mem).map_err(BootError::PageTables)?;
            let params = ZeroPageParams {
                cmdline_addr: CMDLINE_ADDR,
                cmdline_size,
                initrd,
                rsdp_addr,
            };
            let zero_page =
                write_zero_page(mem, Some(hdr), &params, &memmap).map_err(BootError::ZeroPage)?;
            info!("bzImage loaded at {:#x}", r.kernel_load.0);
            EntryPoint::Linux64 {
                load_addr: r.kernel_load.0,
                zero_page: zero_page.0,
            }
        }
    };
    write_gdt(mem, GuestAddress(BOOT_GDT_ADDR), boot_gdt(&entry)).map_err(BootError::Gdt)?;
    // The boot IDT (8 zero bytes) is already zero in fresh memory.
    mem.write_obj(
        0u64,
        GuestAddress(crate::arch::x86_64::layout::BOOT_IDT_ADDR),
    )
    .map_err(BootError::Gdt)?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_apart_by_content() {
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format("k", &bz).ok(), Some(KernelFormat::BzImage));
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = 2;
        assert_eq!(detect_format("k", &elf).ok(), Some(KernelFormat::Elf));
        elf[4] = 1;
        assert!(matches!(detect_format("k", &elf), Err(BootError::Elf32(_))));
        assert!(matches!(
            detect_format("k", &[]),
            Err(BootError::EmptyKernel(_))
        ));
        let garbage = vec![0x5a; 4096];
        let e = detect_format("/tmp/garbage", &garbage).expect_err("garbage");
        assert!(e.to_string().contains("kernel /tmp/garbage"), "{e}");
    }
}

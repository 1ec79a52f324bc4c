//! The KVM VM: in-kernel irqchip and PIT, memory slots and their dirty logging.
//!
//! Dirty logging comes in two modes ([`DirtyLogMode`]). Where KVM offers
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `KVM_DIRTY_LOG_INITIALLY_SET` (enabled when the VM
//! is created, before any slot exists), switching logging on write-protects nothing: every
//! bit starts set, `KVM_GET_DIRTY_LOG` only reads the bitmap, and the migration write-protects
//! pages in chunks with `KVM_CLEAR_DIRTY_LOG` just before it reads them. Without it, switching
//! logging on write-protects every page of the slot up front and each `KVM_GET_DIRTY_LOG`
//! clears and re-protects what it returns. The third mode replaces the bitmaps with KVM's
//! per-vCPU dirty rings (`dirty_ring.rs`).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use log::debug;
use migration::PAGE_SIZE;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::dirty_ring::{DirtyRingError, DirtyRings, DEFAULT_RING_ENTRIES};
use super::memory::GuestMemoryMmap;
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

/// `KVM_GET_DIRTY_LOG`: `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
const KVM_GET_DIRTY_LOG: libc::c_ulong = 0x4010_ae42;
/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = 0xc018_aec0;
/// The manual-protect options we ask for: both, or we use the write-protect-up-front mode.
const MANUAL_PROTECT_INITIALLY_SET: u64 =
    (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET) as u64;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR failed")]
    SetIdentityMapAddress(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel irqchip")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("guest memory needs {0} KVM memory slots, this host has {1}")]
    TooManySlots(usize, usize),
    #[error("cannot register guest memory slot {slot} ({size} bytes at {guest_addr:#x}) with KVM")]
    SetMemoryRegion {
        slot: u32,
        guest_addr: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("no memory slot {0}")]
    NoSuchSlot(u32),
    #[error("KVM_GET_DIRTY_LOG of slot {0} failed")]
    GetDirtyLog(u32, #[source] kvm_ioctls::Error),
    #[error("KVM_CLEAR_DIRTY_LOG of {pages} pages from page {first_page} of slot {slot} failed")]
    ClearDirtyLog {
        slot: u32,
        first_page: u64,
        pages: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("dirty ring")]
    DirtyRing(#[from] DirtyRingError),
    #[error(
        "cannot clear the dirty log from page {first_page} of slot {slot} ({pages} pages): {why}"
    )]
    ClearRange {
        slot: u32,
        first_page: usize,
        pages: usize,
        why: &'static str,
    },
}

/// How KVM's dirty log behaves on this VM (chosen when the VM is created).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `KVM_DIRTY_LOG_INITIALLY_SET`: switching
    /// logging on protects nothing and sets every bit; `KVM_GET_DIRTY_LOG` reads without
    /// clearing; [`Vm::clear_dirty_log`] clears bits and write-protects their pages.
    ManualInitiallySet,
    /// Switching logging on write-protects every page; `KVM_GET_DIRTY_LOG` returns the bits,
    /// clears them and write-protects their pages again. [`Vm::clear_dirty_log`] does nothing.
    ProtectOnFetch,
    /// KVM's dirty rings: switching logging on write-protects every page; a fetch harvests
    /// the rings and re-protects what they held. [`Vm::clear_dirty_log`] does nothing.
    Ring,
}

/// One KVM memory slot backed by a guest memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySlot {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: u64,
}

/// A KVM VM with its memory slots.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    slots: Vec<MemorySlot>,
    dirty_logging: bool,
    dirty_log_mode: DirtyLogMode,
    /// The dirty rings, in [`DirtyLogMode::Ring`].
    rings: Option<Arc<DirtyRings>>,
}

impl Vm {
    /// Create the VM with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, and with
    /// [`DirtyLogMode::ManualInitiallySet`] where this KVM offers it.
    pub fn new(kvm: &Kvm) -> Result<Vm, VmError> {
        Vm::with_dirty_log_mode(kvm, DirtyLogMode::ManualInitiallySet)
    }

    /// [`Vm::new`] asking for dirty-log mode `wanted`; the initially-set mode falls back to
    /// [`DirtyLogMode::ProtectOnFetch`] where KVM lacks the manual-protect capability; the
    /// ring (of [`DEFAULT_RING_ENTRIES`] per vCPU) is an error where KVM has none.
    pub fn with_dirty_log_mode(kvm: &Kvm, wanted: DirtyLogMode) -> Result<Vm, VmError> {
        Vm::create(kvm, wanted, DEFAULT_RING_ENTRIES)
    }

    /// [`Vm::new`] with dirty rings of `entries` entries per vCPU.
    pub fn with_dirty_ring(kvm: &Kvm, entries: u32) -> Result<Vm, VmError> {
        Vm::create(kvm, DirtyLogMode::Ring, entries)
    }

    fn create(kvm: &Kvm, wanted: DirtyLogMode, ring_entries: u32) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        // Before any memory slot or vCPU exists: the mode applies to slots as logging is
        // switched on, and the ring to vCPUs as they are created.
        let mut rings = None;
        let dirty_log_mode = match wanted {
            DirtyLogMode::ManualInitiallySet => enable_manual_protect(&fd),
            DirtyLogMode::ProtectOnFetch => DirtyLogMode::ProtectOnFetch,
            DirtyLogMode::Ring => {
                rings = Some(Arc::new(DirtyRings::enable(&fd, ring_entries)?));
                DirtyLogMode::Ring
            }
        };
        debug!("dirty log mode: {dirty_log_mode:?}");
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(VmError::SetIdentityMapAddress)?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(VmError::SetTssAddress)?;
        fd.create_irq_chip().map_err(VmError::CreateIrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        Ok(Vm {
            fd,
            slots: Vec::new(),
            dirty_logging: false,
            dirty_log_mode,
            rings,
        })
    }

    /// The dirty rings ([`DirtyLogMode::Ring`]), for the vCPUs to map theirs.
    pub fn dirty_rings(&self) -> Option<&Arc<DirtyRings>> {
        self.rings.as_ref()
    }

    /// How the dirty log behaves on this VM.
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        self.dirty_log_mode
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The registered memory slots.
    pub fn slots(&self) -> &[MemorySlot] {
        &self.slots
    }

    /// Whether KVM dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// Register every region of `mem` as one slot (slot number = region index).
    pub fn register_memory(&mut self, kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        let max = kvm.get_nr_memslots();
        if mem.num_regions() > max {
            return Err(VmError::TooManySlots(mem.num_regions(), max));
        }
        for (i, region) in mem.iter().enumerate() {
            let host_addr = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::NoSuchSlot(i as u32))? as u64;
            let slot = MemorySlot {
                slot: i as u32,
                guest_addr: region.start_addr().0,
                size: region.len(),
                host_addr,
            };
            self.set_slot(&slot)?;
            self.slots.push(slot);
        }
        if let Some(rings) = &self.rings {
            let mut pages = vec![
                0;
                self.slots
                    .iter()
                    .map(|s| s.slot as usize + 1)
                    .max()
                    .unwrap_or(0)
            ];
            for s in &self.slots {
                pages[s.slot as usize] = (s.size as usize).div_ceil(PAGE_SIZE);
            }
            rings.set_slots(&pages);
        }
        Ok(())
    }

    fn set_slot(&self, s: &MemorySlot) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: s.slot,
            flags: if self.dirty_logging {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: s.guest_addr,
            memory_size: s.size,
            userspace_addr: s.host_addr,
        };
        // SAFETY: `host_addr..host_addr+size` is a live mapping owned by the guest memory
        // object, which the VMM keeps alive for as long as the VM (`Vmm` owns both, and drops
        // the VM first).
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| {
            VmError::SetMemoryRegion {
                slot: s.slot,
                guest_addr: s.guest_addr,
                size: s.size,
                source,
            }
        })
    }

    /// Switch KVM dirty logging on or off for every slot (re-registers the slots). Switching it
    /// on starts with every bit set ([`DirtyLogMode::ManualInitiallySet`]) or with a clean log
    /// and every page write-protected ([`DirtyLogMode::ProtectOnFetch`]).
    pub fn set_dirty_logging(&mut self, enable: bool) -> Result<(), VmError> {
        if self.dirty_logging == enable {
            return Ok(());
        }
        if enable {
            if let Some(rings) = &self.rings {
                // Logging starts afresh: nothing harvested before counts.
                rings.forget()?;
            }
        }
        let previous = self.dirty_logging;
        self.dirty_logging = enable;
        for s in &self.slots {
            if let Err(e) = self.set_slot(s) {
                self.dirty_logging = previous;
                return Err(e);
            }
        }
        debug!("dirty logging {}", if enable { "on" } else { "off" });
        Ok(())
    }

    /// Fetch the dirty bitmap of `slot` into `out`: one bit per 4 KiB page, bit `i` of word `w`
    /// is page `64 * w + i` of the slot. In [`DirtyLogMode::ProtectOnFetch`] the bits are
    /// cleared and their pages write-protected again; in [`DirtyLogMode::ManualInitiallySet`]
    /// they stay until [`clear_dirty_log`](Self::clear_dirty_log). Keep `out` from call to
    /// call: a fresh bitmap would be faulted in by the kernel inside the downtime.
    pub fn dirty_log_into(&self, slot: u32, out: &mut Vec<u64>) -> Result<(), VmError> {
        let s = self
            .slots
            .iter()
            .find(|s| s.slot == slot)
            .ok_or(VmError::NoSuchSlot(slot))?;
        let pages = (s.size as usize).div_ceil(PAGE_SIZE);
        if let Some(rings) = &self.rings {
            rings.harvest_all()?;
            rings.take(slot, out);
            out.resize(pages.div_ceil(64), 0);
            return Ok(());
        }
        out.resize(pages.div_ceil(64), 0);
        let log = kvm_dirty_log {
            slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: out.as_mut_ptr().cast(),
            },
        };
        // SAFETY: KVM_GET_DIRTY_LOG writes one bit per page of the slot, ceil(pages / 64)
        // words, through `dirty_bitmap`, which points at exactly that many u64s we own; `log`
        // outlives the call and KVM keeps no pointer.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_GET_DIRTY_LOG, &log) };
        if rc < 0 {
            return Err(VmError::GetDirtyLog(slot, kvm_ioctls::Error::last()));
        }
        Ok(())
    }

    /// Clears the dirty bits of `slot` set in `bits` (bit `i` of word `w` is page
    /// `first_page + 64 * w + i`; bits past the slot's end are ignored) and write-protects
    /// those pages, so that a write to any of them after this returns is in a later
    /// [`dirty_log_into`](Self::dirty_log_into). `first_page` must be a multiple of 64. Does
    /// nothing in [`DirtyLogMode::ProtectOnFetch`], where the fetch re-protects.
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: usize,
        bits: &[u64],
    ) -> Result<(), VmError> {
        if self.dirty_log_mode != DirtyLogMode::ManualInitiallySet || bits.is_empty() {
            return Ok(());
        }
        let s = self
            .slots
            .iter()
            .find(|s| s.slot == slot)
            .ok_or(VmError::NoSuchSlot(slot))?;
        let slot_pages = (s.size as usize).div_ceil(PAGE_SIZE);
        let refuse = |why| VmError::ClearRange {
            slot,
            first_page,
            pages: bits.len() * 64,
            why,
        };
        if !first_page.is_multiple_of(64) {
            return Err(refuse("the first page is not a multiple of 64"));
        }
        if first_page >= slot_pages {
            return Err(refuse("the first page is past the slot's end"));
        }
        // KVM takes whole words, or a range that ends exactly at the slot's end.
        let pages = (bits.len() * 64).min(slot_pages - first_page);
        let num_pages = u32::try_from(pages).map_err(|_| refuse("too many pages at once"))?;
        let clear = kvm_clear_dirty_log {
            slot,
            num_pages,
            first_page: first_page as u64,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bits.as_ptr().cast_mut().cast(),
            },
        };
        // SAFETY: KVM_CLEAR_DIRTY_LOG reads ceil(num_pages / 64) words through `dirty_bitmap`,
        // which points at `bits`, at least that long (num_pages <= 64 * bits.len()) and alive
        // for the call; KVM does not write through it and keeps no pointer.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &clear) };
        if rc < 0 {
            return Err(VmError::ClearDirtyLog {
                slot,
                first_page: first_page as u64,
                pages: pages as u64,
                source: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// [`dirty_log_into`](Self::dirty_log_into) into a new vector.
    pub fn dirty_log(&self, slot: u32) -> Result<Vec<u64>, VmError> {
        let mut out = Vec::new();
        self.dirty_log_into(slot, &mut out)?;
        Ok(out)
    }
}

/// Enables manual dirty-log protection with initially-set bitmaps where KVM offers both
/// options; returns the mode the VM got.
fn enable_manual_protect(fd: &VmFd) -> DirtyLogMode {
    let offered = fd.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    if offered < 0
        || (offered as u64) & MANUAL_PROTECT_INITIALLY_SET != MANUAL_PROTECT_INITIALLY_SET
    {
        debug!("KVM offers manual dirty-log protection options {offered:#x}: protecting up front");
        return DirtyLogMode::ProtectOnFetch;
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [MANUAL_PROTECT_INITIALLY_SET, 0, 0, 0],
        ..Default::default()
    };
    match fd.enable_cap(&cap) {
        Ok(()) => DirtyLogMode::ManualInitiallySet,
        Err(e) => {
            log::warn!("Enabling manual dirty-log protection failed ({e}): protecting up front");
            DirtyLogMode::ProtectOnFetch
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryBacking;
    use crate::kvm::memory::create_guest_memory;
    use crate::require_kvm;

    fn vm_with_memory(mode: DirtyLogMode) -> (Vm, GuestMemoryMmap) {
        let kvm = Kvm::new().expect("kvm");
        let mut vm = Vm::with_dirty_log_mode(&kvm, mode).expect("vm");
        let mem = create_guest_memory(64 << 20, MemoryBacking::Private).expect("memory");
        vm.register_memory(&kvm, &mem).expect("slots");
        (vm, mem)
    }

    fn dirty_pages(vm: &Vm) -> u32 {
        let mut out = Vec::new();
        vm.dirty_log_into(0, &mut out).expect("get dirty log");
        out.iter().map(|w| w.count_ones()).sum()
    }

    #[test]
    fn initially_set_log_starts_full_and_clears_what_it_is_told() {
        require_kvm!();
        let (mut vm, _mem) = vm_with_memory(DirtyLogMode::ManualInitiallySet);
        if vm.dirty_log_mode() != DirtyLogMode::ManualInitiallySet {
            eprintln!("SKIP: KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with initially set");
            return;
        }
        let pages = (64 << 20) / PAGE_SIZE as u32;
        vm.set_dirty_logging(true).unwrap();
        assert_eq!(dirty_pages(&vm), pages, "every bit starts set");
        assert_eq!(dirty_pages(&vm), pages, "reading does not clear");
        // Clear pages 64..192 except 100; page 5 in a second call.
        let mut bits = vec![u64::MAX, u64::MAX];
        bits[0] &= !(1 << (100 - 64));
        vm.clear_dirty_log(0, 64, &bits).unwrap();
        vm.clear_dirty_log(0, 0, &[1 << 5]).unwrap();
        let mut out = Vec::new();
        vm.dirty_log_into(0, &mut out).unwrap();
        assert_eq!(out[0], !(1 << 5));
        assert_eq!(out[1], 1 << (100 - 64));
        assert_eq!(out[2], 0);
        assert_eq!(out[3], u64::MAX);
        // Off and on again: all set again.
        vm.set_dirty_logging(false).unwrap();
        vm.set_dirty_logging(true).unwrap();
        assert_eq!(dirty_pages(&vm), pages);
        // KVM's rules are checked here first, with an error naming the range.
        let err = vm.clear_dirty_log(0, 10, &[1]).unwrap_err();
        assert!(err.to_string().contains("multiple of 64"), "{err}");
        let err = vm.clear_dirty_log(0, pages as usize, &[1]).unwrap_err();
        assert!(err.to_string().contains("past the slot's end"), "{err}");
    }

    #[test]
    fn protect_on_fetch_log_starts_clean_and_ignores_clears() {
        require_kvm!();
        let (mut vm, _mem) = vm_with_memory(DirtyLogMode::ProtectOnFetch);
        assert_eq!(vm.dirty_log_mode(), DirtyLogMode::ProtectOnFetch);
        vm.set_dirty_logging(true).unwrap();
        assert_eq!(dirty_pages(&vm), 0);
        vm.clear_dirty_log(0, 10, &[1]).unwrap();
        assert_eq!(dirty_pages(&vm), 0);
    }
}

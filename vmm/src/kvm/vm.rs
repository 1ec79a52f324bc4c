//! The KVM VM: in-kernel irqchip and PIT, memory slots and their dirty logging.

use std::os::fd::AsRawFd;

use kvm_bindings::{
    kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, kvm_pit_config, kvm_userspace_memory_region,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use log::debug;
use migration::PAGE_SIZE;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMemoryMmap;
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

/// `KVM_GET_DIRTY_LOG`: `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
const KVM_GET_DIRTY_LOG: libc::c_ulong = 0x4010_ae42;

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
}

impl Vm {
    /// Create the VM with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT.
    pub fn new(kvm: &Kvm) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
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
        })
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
    /// on starts with a clean log.
    pub fn set_dirty_logging(&mut self, enable: bool) -> Result<(), VmError> {
        if self.dirty_logging == enable {
            return Ok(());
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

    /// Fetch and clear the dirty bitmap of `slot` into `out`: one bit per 4 KiB page, bit `i`
    /// of word `w` is page `64 * w + i` of the slot. Keep `out` from call to call: a fresh
    /// bitmap would be faulted in by the kernel inside the downtime.
    pub fn dirty_log_into(&self, slot: u32, out: &mut Vec<u64>) -> Result<(), VmError> {
        let s = self
            .slots
            .iter()
            .find(|s| s.slot == slot)
            .ok_or(VmError::NoSuchSlot(slot))?;
        let pages = (s.size as usize).div_ceil(PAGE_SIZE);
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

    /// [`dirty_log_into`](Self::dirty_log_into) into a new vector.
    pub fn dirty_log(&self, slot: u32) -> Result<Vec<u64>, VmError> {
        let mut out = Vec::new();
        self.dirty_log_into(slot, &mut out)?;
        Ok(out)
    }
}

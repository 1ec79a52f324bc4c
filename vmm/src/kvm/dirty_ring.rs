//! The KVM dirty ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`): instead of a bitmap per memory slot,
//! each vCPU pushes the pages it dirties into a ring shared with this process. A fetch
//! harvests every ring into per-slot bitmaps and calls `KVM_RESET_DIRTY_RINGS`, which
//! write-protects the harvested pages again; a vCPU whose ring fills up exits with
//! `KVM_EXIT_DIRTY_RING_FULL` and harvests its own ring before it enters the guest again.
//!
//! The ring must be enabled before any vCPU exists (`run --dirty-tracker ring`). Switching
//! logging on write-protects every page, as without initially-set bitmaps: the ring saves the
//! bitmap scan of a fetch (its cost follows the pages dirtied, not the memory size), not the
//! switch-on.
//!
//! A fetch meets the migration's `DirtyLog` promise like a protect-on-fetch bitmap: a page
//! written after the fetch's reset is pushed again, and one written between the harvest and
//! the reset was harvested already.
//!
//! KVM relies on the vCPU leaving the guest while the ring still has room (64 entries); if it
//! pushes into a full ring it overwrites the oldest entry and that page's record is gone. On a
//! host that emulates guest instructions (this project's nested machine: every emulated write
//! pushes an entry) rings were seen completely full. Both signs of it are caught here: a
//! harvest that finds every entry waiting, and a reset that re-arms fewer entries than were
//! harvested (an overwritten entry stops KVM's reset). Either marks the rings *overrun*: every
//! later fetch fails, so a migration fails rather than lose a write.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_dirty_gfn, kvm_enable_cap, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::{VcpuFd, VmFd};
use log::warn;
use migration::PAGE_SIZE;

use crate::sync::lock;

/// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`: the ring whose flags userspace reads with acquire and
/// writes with release semantics (the variant every architecture offers).
const KVM_CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;
/// `KVM_RESET_DIRTY_RINGS`: `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xae_c7;
/// Entry flag: KVM pushed the entry.
const GFN_DIRTY: u32 = 1;
/// Entry flag: this process harvested it; the next reset re-protects the page.
const GFN_RESET: u32 = 2;
/// Bytes of one ring entry.
const ENTRY_LEN: usize = std::mem::size_of::<kvm_dirty_gfn>();
/// Entries per vCPU ring by default (KVM's most): 1 MiB per vCPU, 256 MiB of guest writes
/// between two harvests.
pub const DEFAULT_RING_ENTRIES: u32 = 65536;
/// Fewest entries KVM takes (one page of entries).
pub const MIN_RING_ENTRIES: u32 = (PAGE_SIZE / ENTRY_LEN) as u32;

/// Errors setting up or using the dirty ring.
#[derive(Debug, thiserror::Error)]
pub enum DirtyRingError {
    #[error("this KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL)")]
    Unavailable,
    #[error(
        "a dirty ring of {0} entries: this KVM takes a power of two from {MIN_RING_ENTRIES} to {1}"
    )]
    Size(u32, usize),
    #[error("enabling a {0}-byte dirty ring failed")]
    Enable(usize, #[source] kvm_ioctls::Error),
    #[error("cannot duplicate the VM fd for the dirty ring")]
    DupFd(#[source] std::io::Error),
    #[error("cannot map the dirty ring of vCPU {0}")]
    Map(usize, #[source] std::io::Error),
    #[error("KVM_RESET_DIRTY_RINGS failed")]
    Reset(#[source] std::io::Error),
    #[error(
        "a dirty ring overflowed ({0}): KVM may have lost dirty pages, so no migration of this VM \
         can be trusted; its KVM fills rings faster than it leaves the guest (use \
         --dirty-tracker bitmap)"
    )]
    Overrun(&'static str),
}

/// One vCPU's ring, mapped from its fd.
struct Ring {
    entries: NonNull<kvm_dirty_gfn>,
    len: usize,
    /// Index of the next entry to harvest (grows without bound; taken modulo `len`).
    next: u64,
}

// SAFETY: the mapping is process-wide shared memory; every access goes through the ring's
// mutex here, and through atomics for the flags KVM shares.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping was created with this address and length and nothing uses it
        // after the ring is dropped.
        unsafe { libc::munmap(self.entries.as_ptr().cast(), self.len * ENTRY_LEN) };
    }
}

/// The dirty rings of one VM and what they harvested.
pub struct DirtyRings {
    vm: OwnedFd,
    ring_bytes: usize,
    /// Held across each harvest and the reset that follows it, so the reset re-arms exactly
    /// the entries that harvest marked.
    rings: Mutex<Vec<Mutex<Ring>>>,
    /// Why the rings cannot be trusted any more, once they overflowed.
    overrun: Mutex<Option<&'static str>>,
    /// Per slot (index = slot number): one bit per page harvested and not fetched yet.
    harvested: Mutex<Vec<Vec<AtomicU64>>>,
}

impl std::fmt::Debug for DirtyRings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyRings")
            .field("ring_bytes", &self.ring_bytes)
            .finish()
    }
}

impl DirtyRings {
    /// Enables rings of `entries` entries per vCPU on `vm`, which must not have vCPUs yet.
    pub fn enable(vm: &VmFd, entries: u32) -> Result<DirtyRings, DirtyRingError> {
        let offered = vm.check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into());
        if offered <= 0 {
            return Err(DirtyRingError::Unavailable);
        }
        let max = offered as usize / ENTRY_LEN;
        if !entries.is_power_of_two() || entries < MIN_RING_ENTRIES || entries as usize > max {
            return Err(DirtyRingError::Size(entries, max));
        }
        let ring_bytes = entries as usize * ENTRY_LEN;
        let cap = kvm_enable_cap {
            cap: KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            args: [ring_bytes as u64, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(|e| DirtyRingError::Enable(ring_bytes, e))?;
        // SAFETY: the VM fd is open for this call; the duplicate is ours.
        let vm = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(DirtyRingError::DupFd)?;
        Ok(DirtyRings {
            vm,
            ring_bytes,
            rings: Mutex::new(Vec::new()),
            overrun: Mutex::new(None),
            harvested: Mutex::new(Vec::new()),
        })
    }

    /// Maps the ring of a new vCPU; returns its index for [`harvest_one`](Self::harvest_one).
    pub fn add_vcpu(&self, vcpu: &VcpuFd) -> Result<usize, DirtyRingError> {
        let mut rings = lock(&self.rings);
        let index = rings.len();
        // SAFETY: a shared mapping of the vCPU fd at KVM's dirty-ring offset, of the size the
        // ring was enabled with; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                (KVM_DIRTY_LOG_PAGE_OFFSET as usize * PAGE_SIZE) as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyRingError::Map(index, std::io::Error::last_os_error()));
        }
        let entries = NonNull::new(ptr.cast()).ok_or_else(|| {
            DirtyRingError::Map(index, std::io::Error::other("mmap returned null"))
        })?;
        rings.push(Mutex::new(Ring {
            entries,
            len: self.ring_bytes / ENTRY_LEN,
            next: 0,
        }));
        Ok(index)
    }

    /// Sizes the harvest bitmaps: `pages[s]` pages for slot `s`.
    pub fn set_slots(&self, pages: &[usize]) {
        *lock(&self.harvested) = pages
            .iter()
            .map(|&p| (0..p.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
            .collect();
    }

    /// Harvests vCPU `index`'s ring and re-protects what it held (a full ring's exit).
    /// Returns the entries harvested.
    pub fn harvest_one(&self, index: usize) -> Result<u64, DirtyRingError> {
        let rings = lock(&self.rings);
        let marked = match rings.get(index) {
            Some(ring) => self.harvest(&mut lock(ring)),
            None => 0,
        };
        self.reset(marked)?;
        Ok(marked)
    }

    /// Harvests every ring and re-protects what they held; fails once the rings overran.
    pub fn harvest_all(&self) -> Result<(), DirtyRingError> {
        let rings = lock(&self.rings);
        let marked = rings.iter().map(|ring| self.harvest(&mut lock(ring))).sum();
        self.reset(marked)?;
        drop(rings);
        match *lock(&self.overrun) {
            Some(why) => Err(DirtyRingError::Overrun(why)),
            None => Ok(()),
        }
    }

    /// Moves the pages harvested for `slot` into `out` (KVM bitmap layout, one word per 64
    /// pages, `out` as long as the slot's bitmap) and forgets them.
    pub fn take(&self, slot: u32, out: &mut Vec<u64>) {
        let harvested = lock(&self.harvested);
        out.clear();
        if let Some(words) = harvested.get(slot as usize) {
            out.extend(words.iter().map(|w| w.swap(0, Ordering::AcqRel)));
        }
    }

    /// Forgets everything harvested so far (logging starts afresh).
    pub fn forget(&self) -> Result<(), DirtyRingError> {
        self.harvest_all()?;
        for words in lock(&self.harvested).iter() {
            words.iter().for_each(|w| w.store(0, Ordering::Release));
        }
        Ok(())
    }

    /// Collects the entries KVM pushed since the last harvest into the bitmaps and marks them
    /// for reset; returns how many. Entries naming a slot or page we do not know are dropped
    /// with a warning.
    fn harvest(&self, ring: &mut Ring) -> u64 {
        let harvested = lock(&self.harvested);
        let start = ring.next;
        loop {
            let i = (ring.next % ring.len as u64) as usize;
            // SAFETY: `i < len`, inside the mapping of `len` entries; the flags word is
            // 4-byte aligned (entries are 16 bytes at a page-aligned base) and shared with
            // KVM, so it is accessed atomically only.
            let entry = unsafe { ring.entries.as_ptr().add(i) };
            // SAFETY: as above; `flags` is the entry's first field.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: as above; KVM wrote slot and offset before it published the flag,
            // which the acquire load above ordered before these reads.
            let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
            match harvested
                .get((slot & 0xffff) as usize)
                .and_then(|words| words.get((offset / 64) as usize))
            {
                Some(word) if slot >> 16 == 0 => {
                    word.fetch_or(1 << (offset % 64), Ordering::AcqRel);
                }
                _ => warn!("dirty ring entry for slot {slot:#x} page {offset} ignored"),
            }
            flags.store(GFN_RESET, Ordering::Release);
            ring.next += 1;
        }
        let marked = ring.next - start;
        if marked >= ring.len as u64 {
            // Every entry was waiting: KVM had no room left and overwrites the oldest entry
            // when it pushes into a full ring.
            self.overran("a harvest found the ring full");
        }
        marked
    }

    fn overran(&self, why: &'static str) {
        warn!("A dirty ring overflowed ({why}): migrations of this VM will fail");
        lock(&self.overrun).get_or_insert(why);
    }

    /// `KVM_RESET_DIRTY_RINGS`: re-protects the pages of every harvested entry, `marked` of
    /// them since the last reset (the caller holds the rings' lock across both).
    fn reset(&self, marked: u64) -> Result<(), DirtyRingError> {
        // SAFETY: a KVM VM ioctl without argument on our duplicate of the VM fd.
        let rc = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS) };
        if rc < 0 {
            return Err(DirtyRingError::Reset(std::io::Error::last_os_error()));
        }
        if (rc as u64) < marked {
            // KVM stops at the first entry not marked: one it overwrote after we marked it.
            self.overran("a reset re-armed fewer entries than were harvested");
        }
        Ok(())
    }
}

//! A hash of guest memory that both ends of a migration compute the same way: over every
//! non-zero page, keyed by its guest-physical address. Never-touched pages are recognised
//! through pagemap and not read, so hashing a big idle guest does not fault its memory in.

use migration::pagemap::{PageState, Pagemap};
use migration::{zero, RamRegion, PAGE_SIZE};
use serde::{Deserialize, Serialize};

/// The hash and how much non-zero memory it covered (in the stream: the two numbers, hash
/// first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryHash {
    pub hash: u64,
    pub nonzero_pages: u64,
}

impl MemoryHash {
    pub fn hex(&self) -> String {
        format!("{:016x}", self.hash)
    }
}

const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(FNV_PRIME)
}

/// Hash the non-zero pages of `regions`. Call with the guest stopped.
pub fn memory_hash(regions: &[RamRegion]) -> MemoryHash {
    let mut pagemap = Pagemap::open();
    let mut states = Vec::new();
    let mut out = MemoryHash {
        hash: 0xcbf2_9ce4_8422_2325,
        nonzero_pages: 0,
    };
    const CHUNK: usize = 64 * 1024;
    for r in regions {
        let base = r.host_addr();
        let mut page = 0;
        while page < r.pages() {
            let n = (r.pages() - page).min(CHUNK);
            let addr = base + page * PAGE_SIZE;
            // Pagemap for private memory, the file's holes for shared memory.
            let known = migration::holes::classify(pagemap.as_mut(), r, page, n, &mut states)
                .unwrap_or(false);
            for i in 0..n {
                if known && states.get(i) != Some(&PageState::Resident) {
                    continue;
                }
                // SAFETY: the page lies inside the region's live mapping (page + i < pages);
                // the guest is stopped, so nothing writes it while we read.
                let bytes = unsafe {
                    std::slice::from_raw_parts((addr + i * PAGE_SIZE) as *const u8, PAGE_SIZE)
                };
                if zero::is_zero(bytes) {
                    continue;
                }
                let gpa = r.guest_addr() + ((page + i) * PAGE_SIZE) as u64;
                out.hash = mix(mix(out.hash, gpa), u64::from(crc32c::crc32c(bytes)));
                out.nonzero_pages += 1;
            }
            page += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use migration::AnonMapping;

    use super::*;

    #[test]
    fn hash_sees_content_and_address_not_zero_pages() {
        let a = Arc::new(AnonMapping::new(64 * PAGE_SIZE).unwrap());
        let b = Arc::new(AnonMapping::new(64 * PAGE_SIZE).unwrap());
        let ra = [RamRegion::from_anon(0, a.clone()).unwrap()];
        let rb = [RamRegion::from_anon(0, b.clone()).unwrap()];
        assert_eq!(memory_hash(&ra), memory_hash(&rb));
        a.write(5 * PAGE_SIZE, b"hello");
        assert_ne!(memory_hash(&ra), memory_hash(&rb));
        b.write(6 * PAGE_SIZE, b"hello");
        assert_ne!(memory_hash(&ra), memory_hash(&rb), "address matters");
        b.write(6 * PAGE_SIZE, &[0; 5]);
        b.write(5 * PAGE_SIZE, b"hello");
        assert_eq!(
            memory_hash(&ra),
            memory_hash(&rb),
            "written-then-zeroed pages do not count"
        );
        assert_eq!(memory_hash(&ra).nonzero_pages, 1);
    }
}

//! The checksum of one guest page (CRC32C, the `crc32c` crate's value) read through raw
//! pointers: the source checksums live guest memory, which the guest may be writing at that
//! very moment, and this crate never forms Rust references to such memory (`memory.rs`).
//!
//! On x86_64 with SSE 4.2 (runtime-detected) the page is checksummed in three interleaved
//! streams of 1360 bytes (the `crc32` instruction has a latency of three), joined with a
//! precomputed shift table, then the last 16 bytes; elsewhere the page is copied to the stack
//! and handed to the `crc32c` crate. A page written during the checksum gets a value that
//! describes no single state of it; the destination then finds it torn (FORMAT.md 3.3).

use crate::wire::PAGE_SIZE;

/// CRC32C of the `PAGE_SIZE` bytes at `ptr`, equal to `crc32c::crc32c` of them.
///
/// # Safety
///
/// `ptr` must be 8-byte aligned and `ptr..ptr + PAGE_SIZE` readable for the whole call (it may
/// be written concurrently; the value is then of no consistent content).
pub unsafe fn page_crc_raw(ptr: *const u8) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: SSE 4.2 is present; the caller guarantees the aligned page is readable.
            return unsafe { x86::page_crc_sse42(ptr) };
        }
    }
    let mut copy = [0u8; PAGE_SIZE];
    // SAFETY: the caller guarantees the page is readable; `copy` is ours. A raw copy: no
    // reference to the source is formed.
    unsafe { std::ptr::copy_nonoverlapping(ptr, copy.as_mut_ptr(), PAGE_SIZE) };
    crc32c::crc32c(&copy)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::_mm_crc32_u64;

    use crate::wire::PAGE_SIZE;

    /// Words per stream: three streams cover 4080 of the 4096 bytes.
    const BLOCK_WORDS: usize = 170;
    const TAIL_WORDS: usize = PAGE_SIZE / 8 - 3 * BLOCK_WORDS;

    /// Reflected CRC32C polynomial.
    const POLY: u32 = 0x82f6_3b78;

    /// The raw CRC state `crc` after `bytes` zero bytes (bit by bit; const evaluation only).
    const fn zeros(mut crc: u32, bytes: usize) -> u32 {
        let mut i = 0;
        while i < bytes * 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            i += 1;
        }
        crc
    }

    /// `SHIFT[i][b]`: the state `b << 8i` advanced over one stream's bytes of zeros. The
    /// advance is linear over GF(2), so a whole state advances as the XOR of its four bytes'
    /// entries.
    const SHIFT: [[u32; 256]; 4] = {
        let mut bit = [0u32; 32];
        let mut k = 0;
        while k < 32 {
            bit[k] = zeros(1 << k, BLOCK_WORDS * 8);
            k += 1;
        }
        let mut table = [[0u32; 256]; 4];
        let mut i = 0;
        while i < 4 {
            let mut b = 0;
            while b < 256 {
                let mut v = 0;
                let mut j = 0;
                while j < 8 {
                    if b & (1 << j) != 0 {
                        v ^= bit[8 * i + j];
                    }
                    j += 1;
                }
                table[i][b] = v;
                b += 1;
            }
            i += 1;
        }
        table
    };

    fn shift(crc: u64) -> u64 {
        let c = crc as u32;
        u64::from(
            SHIFT[0][(c & 0xff) as usize]
                ^ SHIFT[1][((c >> 8) & 0xff) as usize]
                ^ SHIFT[2][((c >> 16) & 0xff) as usize]
                ^ SHIFT[3][(c >> 24) as usize],
        )
    }

    /// # Safety
    ///
    /// Needs SSE 4.2; `ptr` 8-byte aligned, the page readable.
    #[target_feature(enable = "sse4.2")]
    pub unsafe fn page_crc_sse42(ptr: *const u8) -> u32 {
        let p = ptr.cast::<u64>();
        let (a, b, c) = (p, p.add(BLOCK_WORDS), p.add(2 * BLOCK_WORDS));
        let mut c0 = u64::from(u32::MAX);
        let mut c1 = 0u64;
        let mut c2 = 0u64;
        for i in 0..BLOCK_WORDS {
            // Volatile: the guest may be writing these words; each is read exactly once.
            c0 = _mm_crc32_u64(c0, u64::from_le(a.add(i).read_volatile()));
            c1 = _mm_crc32_u64(c1, u64::from_le(b.add(i).read_volatile()));
            c2 = _mm_crc32_u64(c2, u64::from_le(c.add(i).read_volatile()));
        }
        c0 = shift(c0) ^ c1;
        c0 = shift(c0) ^ c2;
        let tail = p.add(3 * BLOCK_WORDS);
        for i in 0..TAIL_WORDS {
            c0 = _mm_crc32_u64(c0, u64::from_le(tail.add(i).read_volatile()));
        }
        !(c0 as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(4096))]
    struct Page([u8; PAGE_SIZE]);

    #[test]
    fn equals_the_crate_on_many_pages() {
        let mut page = Page([0; PAGE_SIZE]);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..200 {
            for b in page.0.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if round % 7 == 0 {
                page.0[..PAGE_SIZE / 2].fill(0);
            }
            // SAFETY: an aligned page of our own.
            let ours = unsafe { page_crc_raw(page.0.as_ptr()) };
            assert_eq!(ours, crc32c::crc32c(&page.0), "round {round}");
        }
        let zero = Page([0; PAGE_SIZE]);
        // SAFETY: as above.
        let ours = unsafe { page_crc_raw(zero.0.as_ptr()) };
        assert_eq!(ours, crc32c::crc32c(&zero.0));
    }
}

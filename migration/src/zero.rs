//! All-zero test at memory speed: AVX2 (runtime-detected) or SSE2 on x86_64, 256 bytes per
//! step, leaving at the first non-zero step; a word-wise loop elsewhere.

/// True if every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: a live slice is readable for its whole length.
    unsafe { is_zero_raw(buf.as_ptr(), buf.len()) }
}

/// True if every byte of `ptr..ptr + len` is zero.
///
/// # Safety
///
/// The range must be readable memory (it may be written concurrently, e.g. guest RAM: the
/// answer is then the state at some instant of each 32-byte chunk, and the dirty log covers
/// the rest).
pub unsafe fn is_zero_raw(ptr: *const u8, len: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present; the caller guarantees the range is readable.
            return unsafe { x86::is_zero_avx2(ptr, len) };
        }
        // SAFETY: SSE2 is part of the x86_64 baseline; range readable per the caller.
        unsafe { x86::is_zero_sse2(ptr, len) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // SAFETY: the caller guarantees the range is readable.
        unsafe { is_zero_words(ptr, len) }
    }
}

/// Portable version: eight `u64` words per step.
///
/// # Safety
///
/// As [`is_zero_raw`].
pub unsafe fn is_zero_words(ptr: *const u8, len: usize) -> bool {
    let mut i = 0;
    while i + 64 <= len {
        let mut acc = 0u64;
        for k in 0..8 {
            // SAFETY: i + 64 <= len, so the 8-byte read at i + 8k is in range; unaligned is fine.
            acc |= unsafe { ptr.add(i + 8 * k).cast::<u64>().read_unaligned() };
        }
        if acc != 0 {
            return false;
        }
        i += 64;
    }
    // SAFETY: the remaining bytes i..len are in range.
    (i..len).all(|j| unsafe { ptr.add(j).read() } == 0)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    ///
    /// Needs AVX2; the range must be readable.
    #[target_feature(enable = "avx2")]
    pub unsafe fn is_zero_avx2(ptr: *const u8, len: usize) -> bool {
        let mut i = 0;
        while i + 256 <= len {
            let p = ptr.add(i).cast::<__m256i>();
            let a = _mm256_or_si256(_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
            let b = _mm256_or_si256(_mm256_loadu_si256(p.add(2)), _mm256_loadu_si256(p.add(3)));
            let c = _mm256_or_si256(_mm256_loadu_si256(p.add(4)), _mm256_loadu_si256(p.add(5)));
            let d = _mm256_or_si256(_mm256_loadu_si256(p.add(6)), _mm256_loadu_si256(p.add(7)));
            let acc = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
            if _mm256_testz_si256(acc, acc) == 0 {
                return false;
            }
            i += 256;
        }
        super::is_zero_words(ptr.add(i), len - i)
    }

    /// # Safety
    ///
    /// The range must be readable (SSE2 is baseline on x86_64).
    pub unsafe fn is_zero_sse2(ptr: *const u8, len: usize) -> bool {
        let mut i = 0;
        while i + 128 <= len {
            // SAFETY: i + 128 <= len, eight unaligned 16-byte loads stay in range.
            let nonzero = unsafe {
                let p = ptr.add(i).cast::<__m128i>();
                let mut acc = _mm_loadu_si128(p);
                for k in 1..8 {
                    acc = _mm_or_si128(acc, _mm_loadu_si128(p.add(k)));
                }
                _mm_movemask_epi8(_mm_cmpeq_epi8(acc, _mm_setzero_si128())) != 0xffff
            };
            if nonzero {
                return false;
            }
            i += 128;
        }
        // SAFETY: the tail i..len is in range.
        unsafe { super::is_zero_words(ptr.add(i), len - i) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_any_single_nonzero_byte() {
        for len in [
            0usize,
            1,
            7,
            63,
            64,
            65,
            127,
            128,
            255,
            256,
            300,
            4096,
            8192 + 17,
        ] {
            let mut buf = vec![0u8; len];
            assert!(is_zero(&buf), "len {len}");
            for pos in 0..len {
                buf[pos] = 0x80;
                assert!(!is_zero(&buf), "len {len} pos {pos}");
                // SAFETY: a live buffer.
                assert!(!unsafe { is_zero_words(buf.as_ptr(), len) });
                #[cfg(target_arch = "x86_64")]
                // SAFETY: SSE2 is baseline; a live buffer.
                assert!(!unsafe { x86::is_zero_sse2(buf.as_ptr(), len) });
                buf[pos] = 0;
            }
        }
    }

    #[test]
    fn unaligned_start() {
        let mut buf = vec![0u8; 1024];
        buf[0] = 1;
        assert!(is_zero(&buf[1..]));
        buf[1023] = 1;
        assert!(!is_zero(&buf[1..]));
    }
}

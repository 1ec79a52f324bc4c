//! The page pattern: the content of page `pfn` at generation `gen` under `seed`.
//!
//! Shared source (`no_std`): the bare-metal image, the host unit tests and the Linux workload
//! all fill and check pages with these functions. Generation 0 means "must read as zero"
//! (scrubbed); generation 1 is the initial fill and every rewrite adds one.
//!
//! Every 8-byte word is a hash of the page key and the word index, so a page that holds another
//! page's content, a stale generation, zeros, or a single flipped word all fail [`check`].

/// 8-byte words in a 4 KiB page.
pub const WORDS: usize = 512;

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's finaliser: a strong 64-bit mixer.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The per-page key all words of page `pfn` at `gen` derive from.
#[inline]
pub fn page_key(seed: u64, pfn: u64, gen: u32) -> u64 {
    mix64(mix64(seed.wrapping_add(pfn.wrapping_mul(GOLDEN))).wrapping_add(u64::from(gen)))
}

/// Word `i` of the page with key `key`: cheap, so fills and checks run at memory speed.
#[inline]
pub fn word(key: u64, i: usize) -> u64 {
    let w = key.wrapping_add((i as u64).wrapping_mul(GOLDEN));
    (w ^ (w >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// Writes the pattern (or zeros for `gen == 0`) into `page`.
#[inline]
pub fn fill(page: &mut [u64; WORDS], seed: u64, pfn: u64, gen: u32) {
    if gen == 0 {
        page.fill(0);
        return;
    }
    let key = page_key(seed, pfn, gen);
    for (i, w) in page.iter_mut().enumerate() {
        *w = word(key, i);
    }
}

/// The first word that differs from the expected content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub word: usize,
    pub got: u64,
    pub want: u64,
}

/// Checks `page` against the pattern (or zeros for `gen == 0`).
///
/// `page` points at memory the compiler must not reason about (guest RAM that a migration may
/// have replaced), so every word is read with a volatile load.
///
/// # Safety
/// `page` must be valid for reads of [`WORDS`] aligned `u64`s.
#[inline]
pub unsafe fn check(page: *const u64, seed: u64, pfn: u64, gen: u32) -> Result<(), Mismatch> {
    let key = page_key(seed, pfn, gen);
    for i in 0..WORDS {
        let want = if gen == 0 { 0 } else { word(key, i) };
        // SAFETY: the caller guarantees `page` covers WORDS aligned words.
        let got = unsafe { page.add(i).read_volatile() };
        if got != want {
            return Err(Mismatch { word: i, got, want });
        }
    }
    Ok(())
}

/// What a page that failed [`check`] holds instead, for the failure report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// All zeros.
    Zero,
    /// The full pattern of another (nearby) generation: a lost or stale write.
    Generation(u32),
    /// Anything else.
    Other,
}

/// Identifies what `page` holds: zeros, generation `gen - 8 ..= gen + 1`, or something else.
///
/// # Safety
/// `page` must be valid for reads of [`WORDS`] aligned `u64`s.
pub unsafe fn diagnose(page: *const u64, seed: u64, pfn: u64, gen: u32) -> Found {
    // SAFETY: forwarded from the caller.
    if unsafe { check(page, seed, pfn, 0) }.is_ok() {
        return Found::Zero;
    }
    for g in gen.saturating_sub(8).max(1)..=gen.saturating_add(1) {
        // SAFETY: forwarded from the caller.
        if unsafe { check(page, seed, pfn, g) }.is_ok() {
            return Found::Generation(g);
        }
    }
    Found::Other
}

/// xorshift64*: the deterministic page picker.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, stream: u64) -> Rng {
        Rng(mix64(seed ^ mix64(stream.wrapping_add(GOLDEN))) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u64, pfn: u64, gen: u32) -> [u64; WORDS] {
        let mut p = [0u64; WORDS];
        fill(&mut p, seed, pfn, gen);
        p
    }

    fn checks(p: &[u64; WORDS], seed: u64, pfn: u64, gen: u32) -> Result<(), Mismatch> {
        // SAFETY: `p` is a whole page.
        unsafe { check(p.as_ptr(), seed, pfn, gen) }
    }

    #[test]
    fn filled_page_checks() {
        let p = page(7, 0x1234, 3);
        assert_eq!(checks(&p, 7, 0x1234, 3), Ok(()));
        assert!(p.iter().all(|&w| w != 0), "no zero words in this page");
    }

    #[test]
    fn stale_generation_other_page_and_seed_fail() {
        let p = page(7, 0x1234, 3);
        assert!(checks(&p, 7, 0x1234, 4).is_err());
        assert!(checks(&p, 7, 0x1235, 3).is_err());
        assert!(checks(&p, 8, 0x1234, 3).is_err());
        assert_eq!(checks(&p, 7, 0x1234, 0).map_err(|m| m.word), Err(0));
    }

    #[test]
    fn single_word_flip_is_found() {
        let mut p = page(1, 99, 1);
        p[311] ^= 1 << 17;
        let m = checks(&p, 1, 99, 1).expect_err("flip");
        assert_eq!(m.word, 311);
        assert_eq!(m.got ^ m.want, 1 << 17);
    }

    #[test]
    fn generation_zero_is_zeros() {
        let p = page(5, 10, 0);
        assert!(p.iter().all(|&w| w == 0));
        assert_eq!(checks(&[0; WORDS], 5, 10, 0), Ok(()));
    }

    #[test]
    fn diagnosis_names_what_the_page_holds() {
        let d = |p: &[u64; WORDS], gen| {
            // SAFETY: a whole page.
            unsafe { diagnose(p.as_ptr(), 2, 40, gen) }
        };
        assert_eq!(d(&[0; WORDS], 9), Found::Zero);
        assert_eq!(d(&page(2, 40, 7), 9), Found::Generation(7));
        assert_eq!(d(&page(2, 41, 9), 9), Found::Other);
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let mut a = Rng::new(3, 1);
        let mut b = Rng::new(3, 1);
        let mut c = Rng::new(3, 2);
        let xs: [u64; 8] = core::array::from_fn(|_| a.below(1000));
        let ys: [u64; 8] = core::array::from_fn(|_| b.below(1000));
        let zs: [u64; 8] = core::array::from_fn(|_| c.below(1000));
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        assert!(xs.iter().all(|&x| x < 1000));
    }
}

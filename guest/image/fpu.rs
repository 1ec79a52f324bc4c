//! `fpu=1`: known values in this CPU's floating-point registers, loaded once in ring 3 before
//! the fill and checked every verify round, so a migration that loses, resets or swaps a vCPU's
//! FPU/XSAVE state (or XCR0) makes the guest's own verifier fail (`VERIFY-FAIL kind=fpu`).
//!
//! What holds known values: the eight x87 registers ST0-ST7 (the stack full, TOP 0), the x87
//! control word, the MXCSR control bits and, when XCR0 enables AVX, the upper 128 bits of all
//! sixteen YMM registers. Values differ per CPU and per `seed=`. Nothing else in the image
//! touches them: it is compiled for baseline x86-64 and uses no floating point, so its code has
//! no x87 instruction and no VEX instruction, and the legacy SSE instructions it does use (the
//! compiler's memory copies) leave the upper halves of the YMM registers alone. The lower
//! halves of the XMM registers belong to the compiler and are not checked; they live in the
//! same XSAVE legacy area as the x87 registers, which is checked.

use core::arch::asm;

use crate::hw;
use crate::pattern::mix64;

/// x87 control word: every exception masked, 64-bit precision, round toward zero (reset
/// value 0x037f: round to nearest).
const FCW: u16 = 0x0f7f;
/// MXCSR: every exception masked, round toward zero, flush to zero (reset value 0x1f80).
const MXCSR: u32 = 0xff80;
/// The MXCSR bits compared: all but the sticky exception flags (bits 0-5).
const MXCSR_CONTROL: u32 = !0x3f;
/// XCR0 bits for AVX: SSE and YMM state.
const XCR0_AVX: u64 = 0b110;

/// The values one CPU loaded.
pub struct Fpu {
    /// ST0..ST7 as 80-bit extended values (mantissa, then sign and exponent).
    st: [[u8; 10]; 8],
    /// Upper 128 bits of YMM0..YMM15, when `avx`.
    ymm_hi: [[u64; 2]; 16],
    /// XCR0 enables AVX (boot.s sets it when CPUID lists XSAVE and AVX).
    pub avx: bool,
    pub xcr0: u64,
}

/// One register (or 64-bit part of one) that did not hold its value.
pub struct Mismatch {
    pub reg: Reg,
    pub got: u64,
    pub want: u64,
}

/// A register as failure lines name it: `fcw`, `top`, `ftw`, `mxcsr`, `st3` (mantissa),
/// `st3.exp` (sign and exponent), `ymm7.hi0` / `ymm7.hi1` (bits 128-191 / 192-255).
#[derive(Clone, Copy)]
pub struct Reg {
    name: &'static str,
    index: Option<usize>,
    part: &'static str,
}

impl core::fmt::Display for Reg {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name)?;
        if let Some(i) = self.index {
            write!(f, "{i}")?;
        }
        f.write_str(self.part)
    }
}

const fn reg(name: &'static str) -> Reg {
    Reg {
        name,
        index: None,
        part: "",
    }
}

const fn indexed(name: &'static str, index: usize, part: &'static str) -> Reg {
    Reg {
        name,
        index: Some(index),
        part,
    }
}

/// FXSAVE area: 512 bytes, 16-byte aligned.
#[repr(C, align(16))]
struct FxArea([u8; 512]);

impl Fpu {
    /// The values of CPU `cpu` for pattern seed `seed`.
    pub fn new(seed: u64, cpu: u64) -> Fpu {
        let key = mix64(seed ^ 0xf9f9_0000_0000_0000 ^ cpu);
        let mut st = [[0u8; 10]; 8];
        for (i, r) in st.iter_mut().enumerate() {
            let m = mix64(key.wrapping_add(i as u64)) | 1 << 63; // normal: integer bit set
            let sign = (m & 1) << 15;
            let exp = 0x3ff0 + i as u64 + (cpu & 0xf) * 8; // well inside the normal range
            r[..8].copy_from_slice(&m.to_le_bytes());
            r[8..].copy_from_slice(&((sign | exp) as u16).to_le_bytes());
        }
        let mut ymm_hi = [[0u64; 2]; 16];
        for (i, r) in ymm_hi.iter_mut().enumerate() {
            r[0] = mix64(key ^ (0x100 + i as u64));
            r[1] = mix64(key ^ (0x200 + i as u64));
        }
        let xcr0 = xcr0();
        Fpu {
            st,
            ymm_hi,
            avx: xcr0 & XCR0_AVX == XCR0_AVX,
            xcr0,
        }
    }

    /// Loads the values into this CPU's registers.
    pub fn load(&self) {
        let st = self.st.as_ptr() as *const u8;
        // SAFETY: reads 8 x 10 bytes of `self.st` and two control values from the stack.
        // The x87 stack is left full (Rust's asm rules expect it empty between blocks); no
        // code in this image uses x87 instructions or floating point at all, so nothing
        // relies on that, and MXCSR's rounding mode is equally unobserved.
        unsafe {
            asm!(
                "fninit",
                "fldcw word ptr [{fcw}]",
                "fld tbyte ptr [{st} + 70]",
                "fld tbyte ptr [{st} + 60]",
                "fld tbyte ptr [{st} + 50]",
                "fld tbyte ptr [{st} + 40]",
                "fld tbyte ptr [{st} + 30]",
                "fld tbyte ptr [{st} + 20]",
                "fld tbyte ptr [{st} + 10]",
                "fld tbyte ptr [{st}]",
                "ldmxcsr dword ptr [{mxcsr}]",
                st = in(reg) st,
                fcw = in(reg) &FCW,
                mxcsr = in(reg) &MXCSR,
                options(nostack, readonly),
            );
        }
        if !self.avx {
            return;
        }
        let p = self.ymm_hi.as_ptr() as *const u8;
        // SAFETY: XCR0 enables AVX (checked above), so VEX instructions do not fault; reads
        // 16 x 16 bytes of `self.ymm_hi`. Only the upper halves of the YMM registers change,
        // which no code of this image reads or writes (see the module comment); the lower
        // halves keep the compiler's values.
        unsafe {
            asm!(
                "vinsertf128 ymm0, ymm0, xmmword ptr [{p}], 1",
                "vinsertf128 ymm1, ymm1, xmmword ptr [{p} + 16], 1",
                "vinsertf128 ymm2, ymm2, xmmword ptr [{p} + 32], 1",
                "vinsertf128 ymm3, ymm3, xmmword ptr [{p} + 48], 1",
                "vinsertf128 ymm4, ymm4, xmmword ptr [{p} + 64], 1",
                "vinsertf128 ymm5, ymm5, xmmword ptr [{p} + 80], 1",
                "vinsertf128 ymm6, ymm6, xmmword ptr [{p} + 96], 1",
                "vinsertf128 ymm7, ymm7, xmmword ptr [{p} + 112], 1",
                "vinsertf128 ymm8, ymm8, xmmword ptr [{p} + 128], 1",
                "vinsertf128 ymm9, ymm9, xmmword ptr [{p} + 144], 1",
                "vinsertf128 ymm10, ymm10, xmmword ptr [{p} + 160], 1",
                "vinsertf128 ymm11, ymm11, xmmword ptr [{p} + 176], 1",
                "vinsertf128 ymm12, ymm12, xmmword ptr [{p} + 192], 1",
                "vinsertf128 ymm13, ymm13, xmmword ptr [{p} + 208], 1",
                "vinsertf128 ymm14, ymm14, xmmword ptr [{p} + 224], 1",
                "vinsertf128 ymm15, ymm15, xmmword ptr [{p} + 240], 1",
                p = in(reg) p,
                options(nostack, readonly, preserves_flags),
            );
        }
    }

    /// Compares the registers with the loaded values; calls `bad` for each that differs and
    /// returns how many did.
    pub fn check(&self, mut bad: impl FnMut(Mismatch)) -> u64 {
        let mut area = FxArea([0; 512]);
        // SAFETY: FXSAVE writes the 512-byte, 16-byte aligned area and changes no register.
        unsafe {
            asm!("fxsave64 [{a}]", a = in(reg) area.0.as_mut_ptr(), options(nostack, preserves_flags));
        }
        let a = &area.0;
        let u16_at = |o: usize| u64::from(u16::from_le_bytes([a[o], a[o + 1]]));
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&a[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let mut n = 0;
        let mut cmp = |reg, got: u64, want: u64| {
            if got != want {
                n += 1;
                bad(Mismatch { reg, got, want });
            }
        };
        cmp(reg("fcw"), u16_at(0), u64::from(FCW));
        cmp(reg("top"), (u16_at(2) >> 11) & 7, 0);
        cmp(reg("ftw"), u64::from(a[4]), 0xff);
        let mxcsr = u64::from(u32::from_le_bytes([a[24], a[25], a[26], a[27]]));
        cmp(
            reg("mxcsr"),
            mxcsr & u64::from(MXCSR_CONTROL),
            u64::from(MXCSR & MXCSR_CONTROL),
        );
        for (i, want) in self.st.iter().enumerate() {
            let o = 32 + 16 * i;
            let mut w = [0u8; 8];
            w.copy_from_slice(&want[..8]);
            cmp(indexed("st", i, ""), u64_at(o), u64::from_le_bytes(w));
            cmp(
                indexed("st", i, ".exp"),
                u16_at(o + 8),
                u64::from(u16::from_le_bytes([want[8], want[9]])),
            );
        }
        if self.avx {
            let mut hi = [[0u64; 2]; 16];
            let p = hi.as_mut_ptr() as *mut u8;
            // SAFETY: XCR0 enables AVX; writes 16 x 16 bytes of `hi` and changes no register.
            unsafe {
                asm!(
                    "vextractf128 xmmword ptr [{p}], ymm0, 1",
                    "vextractf128 xmmword ptr [{p} + 16], ymm1, 1",
                    "vextractf128 xmmword ptr [{p} + 32], ymm2, 1",
                    "vextractf128 xmmword ptr [{p} + 48], ymm3, 1",
                    "vextractf128 xmmword ptr [{p} + 64], ymm4, 1",
                    "vextractf128 xmmword ptr [{p} + 80], ymm5, 1",
                    "vextractf128 xmmword ptr [{p} + 96], ymm6, 1",
                    "vextractf128 xmmword ptr [{p} + 112], ymm7, 1",
                    "vextractf128 xmmword ptr [{p} + 128], ymm8, 1",
                    "vextractf128 xmmword ptr [{p} + 144], ymm9, 1",
                    "vextractf128 xmmword ptr [{p} + 160], ymm10, 1",
                    "vextractf128 xmmword ptr [{p} + 176], ymm11, 1",
                    "vextractf128 xmmword ptr [{p} + 192], ymm12, 1",
                    "vextractf128 xmmword ptr [{p} + 208], ymm13, 1",
                    "vextractf128 xmmword ptr [{p} + 224], ymm14, 1",
                    "vextractf128 xmmword ptr [{p} + 240], ymm15, 1",
                    p = in(reg) p,
                    options(nostack, preserves_flags),
                );
            }
            for (i, (got, want)) in hi.iter().zip(&self.ymm_hi).enumerate() {
                cmp(indexed("ymm", i, ".hi0"), got[0], want[0]);
                cmp(indexed("ymm", i, ".hi1"), got[1], want[1]);
            }
        }
        n
    }
}

/// XCR0, or 0 when the OS (boot.s) did not set CR4.OSXSAVE.
fn xcr0() -> u64 {
    let (_, _, ecx, _) = hw::cpuid(1);
    if ecx & (1 << 27) == 0 {
        return 0;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: CPUID says CR4.OSXSAVE is set, so XGETBV is allowed in ring 3; it reads XCR0.
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    u64::from(lo) | u64::from(hi) << 32
}

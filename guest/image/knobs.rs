//! Command-line knobs: `touch=64M scrub=16M rate=20000 seed=7 ...`.
//!
//! Shared source (`no_std`, no allocation): compiled into the bare-metal image, into the `guest`
//! crate for host unit tests, and into the Linux workload. A key may carry a `minivmm.` prefix
//! (`minivmm.touch=64M`), which is how it reads on a Linux kernel command line.

use core::fmt;

/// A pace in pages per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// At most this many pages per second; 0 means none at all.
    Limit(u64),
    /// As fast as possible.
    Max,
}

/// What a CPU with nothing to do does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Trap into ring 0 and `hlt` until the next interrupt (cheap for the host).
    Halt,
    /// Spin on `pause` in ring 3 (never enters ring 0 except for the timer).
    Spin,
}

/// Every knob with its value; [`Knobs::default`] holds the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Knobs {
    /// Working-set size in bytes (`touch=`).
    pub touch: u64,
    /// Bytes at the start of the working set zeroed again after the fill (`scrub=`).
    pub scrub: u64,
    /// Rewrites after the fill, over all CPUs (`rate=N|max`).
    pub rate: Rate,
    /// Pace of the initial fill, over all CPUs (`fill_rate=N|max`, 0 = max).
    pub fill_rate: Rate,
    /// Pattern seed (`seed=`).
    pub seed: u64,
    /// Verification period in milliseconds (`verify_ms=`).
    pub verify_ms: u64,
    /// Power off after this many verify rounds on every CPU; 0 = never (`exit_after=`).
    pub exit_after: u64,
    /// LAPIC timer frequency (`hz=`).
    pub hz: u64,
    /// Use at most this many CPUs; 0 = all that check in (`cpus=`).
    pub cpus: u64,
    /// How long the BSP waits for APs to check in (`ap_wait_ms=`).
    pub ap_wait_ms: u64,
    /// Never-touched pages read per verify round, over all CPUs (`sample=`).
    pub sample: u64,
    /// Idle method (`idle=hlt|spin`).
    pub idle: Idle,
    /// TSC frequency override in kHz; 0 = measure (`tsc_khz=`).
    pub tsc_khz: u64,
    /// Self-test: after verify round N, CPU 0 records a rewrite of one page without writing
    /// it, as a migration that lost a dirty page would; 0 = never (`lose_write=`).
    pub lose_write: u64,
    /// Self-check: hold known values in the x87, SSE and AVX registers and check them every
    /// verify round (`fpu=0|1`; the test image only).
    pub fpu: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            touch: 16 << 20,
            scrub: 0,
            rate: Rate::Limit(0),
            fill_rate: Rate::Max,
            seed: 1,
            verify_ms: 1000,
            exit_after: 0,
            hz: 100,
            cpus: 0,
            ap_wait_ms: 1000,
            sample: 256,
            idle: Idle::Halt,
            tsc_khz: 0,
            lose_write: 0,
            fpu: false,
        }
    }
}

/// A command-line word that is not a valid knob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnobError<'a> {
    /// A known key with a value that does not parse or is out of range.
    BadValue {
        key: &'a str,
        value: &'a str,
        expected: &'static str,
    },
    /// A word that names no knob (a Linux command line is full of these).
    Unknown { word: &'a str },
}

impl fmt::Display for KnobError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KnobError::BadValue {
                key,
                value,
                expected,
            } => write!(f, "bad value {value:?} for {key}: expected {expected}"),
            KnobError::Unknown { word } => write!(f, "unknown knob {word:?}"),
        }
    }
}

const SIZE: &str = "a size like 4096, 64K, 16M or 2G";
const COUNT: &str = "a decimal number";
const RATE: &str = "pages per second or \"max\"";

/// Parses the knobs in `cmdline`; every bad word goes to `on_error` and leaves its default.
pub fn parse<'a>(cmdline: &'a str, mut on_error: impl FnMut(KnobError<'a>)) -> Knobs {
    let mut k = Knobs::default();
    for word in cmdline.split_ascii_whitespace() {
        let Some((raw_key, value)) = word.split_once('=') else {
            on_error(KnobError::Unknown { word });
            continue;
        };
        let key = raw_key.strip_prefix("minivmm.").unwrap_or(raw_key);
        let bad = |expected| KnobError::BadValue {
            key,
            value,
            expected,
        };
        let result = match key {
            "touch" => parse_size(value).map(|v| k.touch = v).ok_or(bad(SIZE)),
            "scrub" => parse_size(value).map(|v| k.scrub = v).ok_or(bad(SIZE)),
            "rate" => parse_rate(value).map(|v| k.rate = v).ok_or(bad(RATE)),
            "fill_rate" => parse_rate(value)
                .map(|v| k.fill_rate = if v == Rate::Limit(0) { Rate::Max } else { v })
                .ok_or(bad(RATE)),
            "seed" => parse_u64(value).map(|v| k.seed = v).ok_or(bad(COUNT)),
            "verify_ms" => ranged(value, 1, 3_600_000)
                .map(|v| k.verify_ms = v)
                .ok_or(bad("1 to 3600000")),
            "exit_after" => parse_u64(value).map(|v| k.exit_after = v).ok_or(bad(COUNT)),
            "hz" => ranged(value, 1, 10_000)
                .map(|v| k.hz = v)
                .ok_or(bad("1 to 10000")),
            "cpus" => parse_u64(value).map(|v| k.cpus = v).ok_or(bad(COUNT)),
            "ap_wait_ms" => ranged(value, 1, 60_000)
                .map(|v| k.ap_wait_ms = v)
                .ok_or(bad("1 to 60000")),
            "sample" => ranged(value, 0, 1 << 20)
                .map(|v| k.sample = v)
                .ok_or(bad("0 to 1048576")),
            "idle" => match value {
                "hlt" => {
                    k.idle = Idle::Halt;
                    Ok(())
                }
                "spin" => {
                    k.idle = Idle::Spin;
                    Ok(())
                }
                _ => Err(bad("\"hlt\" or \"spin\"")),
            },
            "tsc_khz" => parse_u64(value).map(|v| k.tsc_khz = v).ok_or(bad(COUNT)),
            "lose_write" => parse_u64(value).map(|v| k.lose_write = v).ok_or(bad(COUNT)),
            "fpu" => match value {
                "0" | "1" => {
                    k.fpu = value == "1";
                    Ok(())
                }
                _ => Err(bad("0 or 1")),
            },
            _ => Err(KnobError::Unknown { word }),
        };
        if let Err(e) = result {
            on_error(e);
        }
    }
    k
}

/// A decimal number without sign.
pub fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.bytes().try_fold(0u64, |acc, b| {
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

fn ranged(s: &str, min: u64, max: u64) -> Option<u64> {
    parse_u64(s).filter(|v| (min..=max).contains(v))
}

/// A byte count with an optional binary suffix: K, M, G or T (either case).
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b't' | b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n = parse_u64(digits)?;
    n.checked_mul(1u64 << shift)
}

fn parse_rate(s: &str) -> Option<Rate> {
    if s == "max" {
        Some(Rate::Max)
    } else {
        parse_u64(s).map(Rate::Limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(cmdline: &str) -> (Knobs, usize) {
        let mut n = 0;
        let k = parse(cmdline, |_| n += 1);
        (k, n)
    }

    #[test]
    fn empty_cmdline_gives_defaults() {
        assert_eq!(errors(""), (Knobs::default(), 0));
    }

    #[test]
    fn every_knob_parses() {
        let (k, n) = errors(
            "touch=64M scrub=16M rate=20000 fill_rate=max seed=7 verify_ms=250 exit_after=3 \
             hz=250 cpus=2 ap_wait_ms=500 sample=0 idle=spin tsc_khz=2000000 lose_write=5 \
             fpu=1",
        );
        assert_eq!(n, 0);
        assert_eq!(
            k,
            Knobs {
                touch: 64 << 20,
                scrub: 16 << 20,
                rate: Rate::Limit(20000),
                fill_rate: Rate::Max,
                seed: 7,
                verify_ms: 250,
                exit_after: 3,
                hz: 250,
                cpus: 2,
                ap_wait_ms: 500,
                sample: 0,
                idle: Idle::Spin,
                tsc_khz: 2_000_000,
                lose_write: 5,
                fpu: true,
            }
        );
    }

    #[test]
    fn linux_prefix_and_foreign_words() {
        let mut unknown = 0;
        let k = parse(
            "console=ttyS0 minivmm.workload=1 minivmm.touch=256M rate=max quiet",
            |e| {
                assert!(matches!(e, KnobError::Unknown { .. }), "{e}");
                unknown += 1;
            },
        );
        assert_eq!(unknown, 3);
        assert_eq!(k.touch, 256 << 20);
        assert_eq!(k.rate, Rate::Max);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("99999999999999999999"), None);
        assert_eq!(parse_size("20000000000000T"), None);
    }

    #[test]
    fn bad_values_are_named_and_keep_the_default() {
        let mut seen = None;
        let k = parse("touch=lots hz=0 fpu=yes", |e| {
            if seen.is_none() {
                seen = Some(e)
            }
        });
        assert_eq!(k.touch, Knobs::default().touch);
        assert_eq!(k.hz, Knobs::default().hz);
        let e = seen.expect("an error");
        assert!(matches!(
            e,
            KnobError::BadValue {
                key: "touch",
                value: "lots",
                ..
            }
        ));
        let text = std::format!("{e}");
        assert!(text.contains("touch") && text.contains("lots"), "{text}");
    }

    #[test]
    fn fill_rate_zero_means_max() {
        assert_eq!(errors("fill_rate=0").0.fill_rate, Rate::Max);
        assert_eq!(errors("fill_rate=10").0.fill_rate, Rate::Limit(10));
        assert_eq!(errors("rate=0").0.rate, Rate::Limit(0));
    }
}

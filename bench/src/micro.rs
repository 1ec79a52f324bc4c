//! Microbenchmarks in the same run: zero check vs memcpy, untouched-page detection, page
//! streaming over a unix socket vs a raw copy over the same kind of socket.
//!
//! Each figure is the best of a few runs (the machine is shared), next to its baseline measured
//! on the same buffers in the same process:
//!
//! - zero check ([`migration::zero::is_zero`]) vs `memcpy` of a resident, all-zero 256 MiB
//!   buffer, whole and page by page;
//! - never-touched-page detection ([`Pagemap::classify`]) of 1 GiB of fresh private anonymous
//!   memory vs reading every page of another fresh 1 GiB mapping;
//! - page streaming ([`streaming`]): a real `send_migration` of a 512 MiB fake VM full of
//!   pseudo-random data into a real `receive_migration` over a unix socketpair vs a raw
//!   `write_all`/`read` copy of the same bytes over another socketpair, plus diagnostic rows
//!   that show where the difference goes.
//!
//! GB means 10^9 bytes. The whole run takes about 15 s on the 2-core development VM.

use std::hint::black_box;
use std::time::{Duration, Instant};

use migration::pagemap::Pagemap;
use migration::zero::is_zero;
use migration::{AnonMapping, PAGE_SIZE};
use serde_json::{json, Value};

mod streaming;

/// Resident buffer for the zero check: far larger than the caches.
const ZERO_BUF: usize = 256 << 20;
/// Fresh memory for the untouched-page comparison.
const UNTOUCHED: usize = 1 << 30;

const ZERO_REPS: usize = 5;
const UNTOUCHED_REPS: usize = 3;

const GB: f64 = 1e9;
const GIB: f64 = (1u64 << 30) as f64;

/// One line of the printed table.
struct Row {
    name: String,
    ours: String,
    baseline: String,
    ratio: String,
    goal: &'static str,
}

impl Row {
    fn new(name: impl Into<String>, ours: impl Into<String>, baseline: impl Into<String>) -> Row {
        Row {
            name: name.into(),
            ours: ours.into(),
            baseline: baseline.into(),
            ratio: String::new(),
            goal: "",
        }
    }

    fn ratio(mut self, ratio: String, goal: &'static str) -> Row {
        self.ratio = ratio;
        self.goal = goal;
        self
    }
}

/// What a section hands back: its JSON and its table rows.
type Section = (Value, Vec<Row>);

/// One measurement section.
type SectionFn = fn() -> Result<Section, String>;

/// Runs the microbenchmarks; prints a table when `print`, and returns the same figures.
pub fn run(print: bool) -> Value {
    let started = Instant::now();
    if print {
        println!(
            "\n== microbenchmarks (best of {ZERO_REPS}/{UNTOUCHED_REPS}/{} runs, \
             GB = 10^9 bytes)",
            streaming::STREAM_REPS
        );
        println!(
            "{:<44} {:>14} {:>24} {:>9} {:>8}",
            "measurement", "minivmm", "baseline", "ratio", "goal"
        );
    }
    let sections: [(&str, SectionFn); 3] = [
        ("zero_check", zero_vs_memcpy),
        ("untouched", untouched_detection),
        ("streaming", streaming::streaming),
    ];
    let mut out = serde_json::Map::new();
    for (name, f) in sections {
        let value = match f() {
            Ok((value, rows)) => {
                if print {
                    for r in rows {
                        println!(
                            "{:<44} {:>14} {:>24} {:>9} {:>8}",
                            r.name, r.ours, r.baseline, r.ratio, r.goal
                        );
                    }
                }
                value
            }
            Err(e) => {
                eprintln!("bench: micro {name}: FAILED: {e}");
                json!({ "error": e })
            }
        };
        out.insert(name.into(), value);
    }
    let elapsed = started.elapsed();
    if print {
        println!("(microbenchmarks took {:.1} s)", elapsed.as_secs_f64());
    }
    out.insert("elapsed_ms".into(), json!(ms(elapsed)));
    Value::Object(out)
}

/// Durations of repeated runs of one measurement.
struct Samples(Vec<Duration>);

impl Samples {
    /// Runs `f` `reps` times; each call returns the time it measured.
    fn collect(
        reps: usize,
        mut f: impl FnMut() -> Result<Duration, String>,
    ) -> Result<Samples, String> {
        (0..reps)
            .map(|_| f())
            .collect::<Result<_, _>>()
            .map(Samples)
    }

    fn best(&self) -> Duration {
        self.0.iter().copied().min().unwrap_or(Duration::MAX)
    }

    fn ms(&self) -> Vec<f64> {
        self.0.iter().map(|&d| ms(d)).collect()
    }

    /// Best throughput for `bytes` per run, in GB/s.
    fn gbps(&self, bytes: usize) -> f64 {
        gbps(bytes, self.best())
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / GB
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Zero check and memcpy on the same resident, all-zero buffer.
fn zero_vs_memcpy() -> Result<Section, String> {
    // Non-zero first, so every page is resident: a zeroed allocation would be untouched and
    // read the shared zero page from cache. The black_box keeps the compiler from folding the
    // two fills into one zeroed allocation.
    let mut src = vec![1u8; ZERO_BUF];
    black_box(&mut src);
    src.fill(0);
    black_box(&mut src);
    let mut dst = vec![1u8; ZERO_BUF];
    black_box(&mut dst);

    let memcpy = Samples::collect(ZERO_REPS, || {
        let t = Instant::now();
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        Ok(t.elapsed())
    })?;
    let whole = Samples::collect(ZERO_REPS, || {
        let t = Instant::now();
        let zero = is_zero(black_box(&src));
        let d = t.elapsed();
        if !zero {
            return Err("is_zero says the all-zero buffer is not zero".into());
        }
        Ok(d)
    })?;
    let per_page = Samples::collect(ZERO_REPS, || {
        let t = Instant::now();
        let zero = src.chunks_exact(PAGE_SIZE).all(|p| is_zero(black_box(p)));
        let d = t.elapsed();
        if !zero {
            return Err("is_zero says a page of the all-zero buffer is not zero".into());
        }
        Ok(d)
    })?;

    let (memcpy_gbps, whole_gbps, page_gbps) = (
        memcpy.gbps(ZERO_BUF),
        whole.gbps(ZERO_BUF),
        per_page.gbps(ZERO_BUF),
    );
    let ratio = whole_gbps / memcpy_gbps;
    let page_ratio = page_gbps / memcpy_gbps;
    let baseline = format!("memcpy {memcpy_gbps:.2} GB/s");
    let rows = vec![
        Row::new(
            format!("zero check, {} MiB resident", ZERO_BUF >> 20),
            format!("{whole_gbps:.2} GB/s"),
            baseline.clone(),
        )
        .ratio(format!("{ratio:.2}"), ">= 0.50"),
        Row::new(
            "  page by page (as the sender calls it)",
            format!("{page_gbps:.2} GB/s"),
            baseline,
        )
        .ratio(format!("{page_ratio:.2}"), ""),
    ];
    let value = json!({
        "buffer_bytes": ZERO_BUF,
        "memcpy_gbps": round(memcpy_gbps, 3),
        "is_zero_gbps": round(whole_gbps, 3),
        "is_zero_per_page_gbps": round(page_gbps, 3),
        "ratio_vs_memcpy": round(ratio, 3),
        "per_page_ratio_vs_memcpy": round(page_ratio, 3),
        "samples_ms": {
            "memcpy": memcpy.ms(),
            "is_zero": whole.ms(),
            "is_zero_per_page": per_page.ms(),
        },
    });
    Ok((value, rows))
}

/// Pagemap classification of never-touched memory vs reading every page of it.
fn untouched_detection() -> Result<Section, String> {
    let mut pm = Pagemap::open().ok_or("/proc/self/pagemap cannot be opened")?;
    let pages = UNTOUCHED / PAGE_SIZE;
    let untouched =
        AnonMapping::new(UNTOUCHED).map_err(|e| format!("mapping {UNTOUCHED} bytes: {e}"))?;
    let mut states = Vec::new();
    let mut classify = || -> Result<Duration, String> {
        let t = Instant::now();
        pm.classify(untouched.as_ptr() as usize, pages, &mut states)
            .map_err(|e| format!("reading /proc/self/pagemap: {e}"))?;
        let d = t.elapsed();
        let resident = states.iter().filter(|s| !s.is_known_zero()).count();
        if states.len() != pages || resident != 0 {
            return Err(format!(
                "pagemap classified {} of {pages} pages, {resident} of them resident, \
                 in memory never touched",
                states.len()
            ));
        }
        Ok(d)
    };
    let pagemap = Samples::collect(UNTOUCHED_REPS, &mut classify)?;

    // A fresh mapping per run: once read, its pages are mapped (to the zero page).
    let read = Samples::collect(UNTOUCHED_REPS, || {
        let m =
            AnonMapping::new(UNTOUCHED).map_err(|e| format!("mapping {UNTOUCHED} bytes: {e}"))?;
        // SAFETY: `m` is a live, readable mapping of `m.len()` bytes that nothing writes while
        // the slice exists (it is dropped before `m`).
        let bytes = unsafe { std::slice::from_raw_parts(m.as_ptr().cast_const(), m.len()) };
        let t = Instant::now();
        let zero = is_zero(black_box(bytes));
        let d = t.elapsed();
        if !zero {
            return Err("fresh anonymous memory does not read as zero".into());
        }
        Ok(d)
    })?;
    // The classified mapping is still untouched: pagemap did not fault anything in.
    classify()?;

    let per_gib = |d: Duration| ms(d) * GIB / UNTOUCHED as f64;
    let (pm_ms, read_ms) = (per_gib(pagemap.best()), per_gib(read.best()));
    let speedup = read_ms / pm_ms.max(1e-6);
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let rows = vec![Row::new(
        format!("untouched {} GiB: pagemap vs reading", UNTOUCHED >> 30),
        format!("{pm_ms:.2} ms/GiB"),
        format!("read {read_ms:.0} ms/GiB"),
    )
    .ratio(format!("{speedup:.0}x"), ">= 20x")];
    let value = json!({
        "bytes": UNTOUCHED,
        "pagemap_ms_per_gib": round(pm_ms, 3),
        "read_ms_per_gib": round(read_ms, 3),
        "speedup": round(speedup, 1),
        "zero_pfn_visible": pm.zero_pfn().is_some(),
        "transparent_hugepage": thp,
        "samples_ms": { "pagemap": pagemap.ms(), "read": read.ms() },
    });
    Ok((value, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_and_best_sample() {
        let s = Samples(vec![Duration::from_millis(300), Duration::from_millis(250)]);
        assert_eq!(s.best(), Duration::from_millis(250));
        assert_eq!(s.ms(), vec![300.0, 250.0]);
        assert!((s.gbps(500_000_000) - 2.0).abs() < 1e-9);
        assert_eq!(round(1.23456, 2), 1.23);
    }
}

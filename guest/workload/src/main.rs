//! minivmm's Linux workload: the test guest's fill / rewrite / verify loop over one anonymous
//! region, one thread per online CPU, printing the test guest's protocol lines on stdout
//! (`FILL-DONE`, `VERIFY-OK`, `VERIFY-FAIL`, `VERIFY-ROUND-FAILED`) with `cpu` = thread index.
//!
//! Knobs are the test guest's (same names, meanings and defaults, `minivmm.` prefix allowed):
//! `touch scrub rate fill_rate seed verify_ms exit_after cpus lose_write`. They come from
//! `--cmdline "<words>"`, else `$MINIVMM_WORKLOAD_CMDLINE`, else `/proc/cmdline`; words that
//! are no knob are ignored, as a kernel command line is full of them.
//!
//! Differences from the bare-metal guest: `page=` in failure lines is an offset into the
//! region, `ticks=` is the kernel's time accounting of CPU `cpu` from /proc/stat (USER_HZ
//! units), `tsc_ms=` is milliseconds since the program started, no never-touched RAM is
//! sampled (`sampled=0`), and `exit_after=` ends the program instead of powering off (exit
//! code 0, or 1 if any round failed). Its own lines start with `WORKLOAD `.

#[allow(dead_code)]
#[path = "../../image/knobs.rs"]
mod knobs;
#[allow(dead_code)]
#[path = "../../image/layout.rs"]
mod layout;
#[path = "../../image/pace.rs"]
mod pace;
#[allow(dead_code)]
#[path = "../../image/pattern.rs"]
mod pattern;

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use knobs::{KnobError, Knobs};
use pace::Pace;
use pattern::{Found, Rng, WORDS};

const PAGE: usize = 4096;
/// Most per-page failure lines one thread prints per round.
const MAX_FAIL_LINES: u64 = 8;
/// Pages written between clock reads.
const BATCH: u64 = 16;

/// Verify rounds that found a bad page, over all threads.
static FAILED_ROUNDS: AtomicU64 = AtomicU64::new(0);

fn main() -> ExitCode {
    let text = match cmdline() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("workload: cannot read the knobs: {e}");
            return ExitCode::FAILURE;
        }
    };
    let knobs = knobs::parse(&text, |e| {
        if matches!(e, KnobError::BadValue { .. }) {
            eprintln!("workload: {e}");
        }
    });
    let threads = match knobs.cpus {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    };
    let pages = (knobs.touch as usize).div_ceil(PAGE);
    if pages == 0 {
        eprintln!("workload: touch=0: nothing to do");
        return ExitCode::FAILURE;
    }
    // calloc'd, so the kernel maps it lazily; one spare page to align the start.
    let mut words = Vec::<u64>::new();
    if words.try_reserve_exact((pages + 1) * WORDS).is_err() {
        eprintln!("workload: cannot allocate touch={} bytes", knobs.touch);
        return ExitCode::FAILURE;
    }
    words.resize((pages + 1) * WORDS, 0);
    let skip = (PAGE - words.as_ptr() as usize % PAGE) % PAGE / 8;
    let region = &mut words[skip..skip + pages * WORDS];
    let mut gens = vec![0u32; pages];
    say(format_args!(
        "WORKLOAD start cmdline=\"{}\" touch_mib={} cpus={}",
        text.trim().replace('"', "'"),
        knobs.touch >> 20,
        threads
    ));

    let start = Instant::now();
    std::thread::scope(|s| {
        let mut region = region;
        let mut gens = gens.as_mut_slice();
        for id in 0..threads {
            let (first, end) = layout::slice(pages as u64, id as u64, threads as u64);
            let n = (end - first) as usize;
            let (mine, rest) = std::mem::take(&mut region).split_at_mut(n * WORDS);
            region = rest;
            let (my_gens, rest) = std::mem::take(&mut gens).split_at_mut(n);
            gens = rest;
            let mut w = Worker {
                id,
                threads,
                knobs: &knobs,
                first: first as usize,
                pages: mine,
                gens: my_gens,
                start,
                rng: Rng::new(knobs.seed, id as u64),
                writes: 0,
                round: 0,
                lost: None,
            };
            s.spawn(move || w.run());
        }
    });
    let failed = FAILED_ROUNDS.load(Ordering::Relaxed);
    say(format_args!(
        "WORKLOAD done rounds={} failed_rounds={failed}",
        knobs.exit_after
    ));
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn cmdline() -> std::io::Result<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => {}
        [flag, text] if flag == "--cmdline" => return Ok(text.clone()),
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("bad arguments {args:?} (usage: workload [--cmdline \"touch=64M ...\"])"),
            ))
        }
    }
    if let Ok(t) = std::env::var("MINIVMM_WORKLOAD_CMDLINE") {
        return Ok(t);
    }
    std::fs::read_to_string("/proc/cmdline")
}

/// One line on stdout, written whole under the stdout lock.
fn say(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{args}");
    let _ = out.flush();
}

struct Worker<'a> {
    id: usize,
    threads: usize,
    knobs: &'a Knobs,
    /// Global index of this thread's first page.
    first: usize,
    pages: &'a mut [u64],
    gens: &'a mut [u32],
    start: Instant,
    rng: Rng,
    writes: u64,
    round: u64,
    lost: Option<usize>,
}

impl Worker<'_> {
    fn page(&mut self, i: usize) -> &mut [u64; WORDS] {
        let p = &mut self.pages[i * WORDS..(i + 1) * WORDS];
        p.try_into().expect("a page is WORDS words")
    }

    fn write_page(&mut self, i: usize, gen: u32) {
        let (seed, pfn) = (self.knobs.seed, (self.first + i) as u64);
        pattern::fill(self.page(i), seed, pfn, gen);
        self.gens[i] = gen;
    }

    fn run(&mut self) {
        let n = self.gens.len();
        let scrub_end = (self.knobs.scrub as usize)
            .div_ceil(PAGE)
            .saturating_sub(self.first)
            .min(n);
        let (threads, id) = (self.threads as u64, self.id as u64);
        let mut pace = Pace::new(self.knobs.fill_rate, threads, id);
        let t0 = Instant::now();
        let mut i = 0;
        while i < n {
            let due = (pace.due(nanos(t0), NS, BATCH) as usize).min(n - i);
            if due == 0 {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            for _ in 0..due {
                self.write_page(i, 1);
                i += 1;
            }
            pace.record(due as u64);
        }
        for i in 0..scrub_end {
            self.write_page(i, 0);
        }
        say(format_args!("FILL-DONE cpu={} pages={}", self.id, n));

        let candidates = n - scrub_end;
        let period = Duration::from_millis(self.knobs.verify_ms);
        let mut pace = Pace::new(self.knobs.rate, threads, id);
        let t0 = Instant::now();
        let mut next_verify = t0 + period;
        loop {
            let now = Instant::now();
            if now >= next_verify {
                self.verify_round();
                if self.knobs.exit_after != 0 && self.round >= self.knobs.exit_after {
                    return;
                }
                next_verify = (next_verify + period).max(Instant::now() + period / 2);
                continue;
            }
            let due = match candidates {
                0 => 0,
                _ => pace.due(nanos(t0), NS, BATCH),
            };
            if due == 0 {
                let wait = next_verify.saturating_duration_since(now);
                std::thread::sleep(wait.min(Duration::from_millis(1)));
                continue;
            }
            for _ in 0..due.min(BATCH) {
                let i = scrub_end + self.rng.below(candidates as u64) as usize;
                pace.record(1);
                if self.lost == Some(i) {
                    continue;
                }
                let gen = self.gens[i].wrapping_add(1).max(1);
                self.write_page(i, gen);
                self.writes += 1;
            }
        }
    }

    fn verify_round(&mut self) {
        self.round += 1;
        let seed = self.knobs.seed;
        let mut failed = 0;
        for i in 0..self.gens.len() {
            let (gen, pfn) = (self.gens[i], (self.first + i) as u64);
            let page = self.page(i).as_ptr();
            // SAFETY: `page` points at a whole page of this thread's slice.
            if let Err(m) = unsafe { pattern::check(page, seed, pfn, gen) } {
                failed += 1;
                if failed <= MAX_FAIL_LINES {
                    // SAFETY: as above.
                    let found = unsafe { pattern::diagnose(page, seed, pfn, gen) };
                    say(format_args!(
                        "VERIFY-FAIL cpu={} page={:#x} expected_gen={} round={} kind=owned \
                         word={} got={:#x} want={:#x} found={}",
                        self.id,
                        pfn * PAGE as u64,
                        gen,
                        self.round,
                        m.word,
                        m.got,
                        m.want,
                        found_text(found)
                    ));
                }
            }
        }
        let n = self.gens.len();
        if failed == 0 {
            say(format_args!(
                "VERIFY-OK round={} cpu={} ticks={} writes={} tsc_ms={} checked={n} sampled=0",
                self.round,
                self.id,
                ticks(self.id, self.start),
                self.writes,
                self.start.elapsed().as_millis()
            ));
        } else {
            FAILED_ROUNDS.fetch_add(1, Ordering::Relaxed);
            say(format_args!(
                "VERIFY-ROUND-FAILED round={} cpu={} failed={failed} checked={n} sampled=0",
                self.round, self.id
            ));
        }
        if self.id == 0 && self.round == self.knobs.lose_write {
            let scrub_pages = (self.knobs.scrub as usize).div_ceil(PAGE);
            if scrub_pages < n {
                let i = scrub_pages;
                self.gens[i] = self.gens[i].wrapping_add(1).max(1);
                self.lost = Some(i);
                say(format_args!(
                    "WORKLOAD lost-write page={:#x} gen={}",
                    i * PAGE,
                    self.gens[i]
                ));
            }
        }
    }
}

const NS: u64 = 1_000_000_000;

fn nanos(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn found_text(f: Found) -> String {
    match f {
        Found::Zero => "zero".into(),
        Found::Generation(g) => format!("gen{g}"),
        Found::Other => "other".into(),
    }
}

/// The kernel's accounting of CPU `cpu` (all /proc/stat fields, USER_HZ units); elapsed
/// hundredths of a second if that CPU is not listed.
fn ticks(cpu: usize, start: Instant) -> u64 {
    let tag = format!("cpu{cpu} ");
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(&tag))?;
            Some(
                line.split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum(),
            )
        })
        .unwrap_or_else(|| (start.elapsed().as_millis() / 10) as u64)
}

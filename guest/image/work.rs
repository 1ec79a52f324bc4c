//! The ring-3 workload of one CPU: fill (+ scrub) its slice, then rewrite pages at its share
//! of `rate=`, and every `verify_ms` check every page it owns plus a sample of never-touched
//! RAM, printing `VERIFY-OK` or `VERIFY-FAIL` lines.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::fpu::{Fpu, Mismatch};
use crate::hw;
use crate::knobs::{Idle, Knobs};
use crate::layout::{slice, Layout};
use crate::pace::Pace;
use crate::pattern::{self, Found, Rng, WORDS};
use crate::say;
use crate::tsc::Clock;

/// Everything the BSP decided, shared read-only with all CPUs.
pub struct Plan {
    pub knobs: Knobs,
    pub ncpus: u64,
    pub layout: Layout,
    pub tsc_hz: u64,
    pub boot_tsc: u64,
}

/// CPUs that completed `exit_after` rounds.
static FINISHED: AtomicU64 = AtomicU64::new(0);

/// Most per-page failure lines one CPU prints per round.
const MAX_FAIL_LINES: u64 = 8;
/// Pages written between clock reads.
const BATCH: u64 = 16;

struct Cpu<'a> {
    id: u64,
    plan: &'a Plan,
    /// Owned page indices `[first, end)`; `[rewrite_from, end)` are not scrubbed.
    first: u64,
    end: u64,
    rewrite_from: u64,
    clock: Clock,
    rng: Rng,
    writes: u64,
    round: u64,
    /// The page whose write `lose_write=` dropped; the writer leaves it alone.
    lost: Option<u64>,
    /// The values `fpu=1` loaded into this CPU's registers.
    fpu: Option<Fpu>,
}

/// Runs the workload of CPU `id`; never returns.
pub fn run(id: u64, plan: &Plan) -> ! {
    let (first, end) = slice(plan.layout.ws.pages(), id, plan.ncpus);
    let mut cpu = Cpu {
        id,
        plan,
        first,
        end,
        rewrite_from: end.min(first.max(plan.layout.scrub_pages)),
        clock: Clock::new(),
        rng: Rng::new(plan.knobs.seed, id),
        writes: 0,
        round: 0,
        lost: None,
        fpu: plan.knobs.fpu.then(|| Fpu::new(plan.knobs.seed, id)),
    };
    if let Some(f) = &cpu.fpu {
        f.load();
        say!(
            "TESTGUEST fpu cpu={} avx={} xcr0={:#x}",
            id,
            u8::from(f.avx),
            f.xcr0
        );
    }
    cpu.fill();
    cpu.steady()
}

impl Cpu<'_> {
    fn page(&self, idx: u64) -> *mut u64 {
        self.plan.layout.ws.addr(idx) as *mut u64
    }

    fn gen_slot(&self, idx: u64) -> *mut u32 {
        (self.plan.layout.gen_table + idx * 4) as *mut u32
    }

    fn gen(&self, idx: u64) -> u32 {
        // SAFETY: the generation table covers every working-set page; only this CPU touches the
        // entries of its own slice.
        unsafe { self.gen_slot(idx).read_volatile() }
    }

    /// Writes generation `gen` (0 = zeros) into page `idx` and records it.
    fn write_page(&mut self, idx: u64, gen: u32) {
        let addr = self.plan.layout.ws.addr(idx);
        // SAFETY: `addr` is a working-set page in identity-mapped RAM owned by this CPU alone.
        let page = unsafe { &mut *(addr as *mut [u64; WORDS]) };
        pattern::fill(page, self.plan.knobs.seed, addr >> 12, gen);
        // SAFETY: as in `gen`.
        unsafe { self.gen_slot(idx).write_volatile(gen) };
    }

    fn ms_to_cycles(&self, ms: u64) -> u64 {
        self.plan.tsc_hz / 1000 * ms
    }

    /// Waits a little: until the next interrupt, or a short spin.
    fn pause(&self) {
        match self.plan.knobs.idle {
            Idle::Halt => hw::idle(),
            Idle::Spin => {
                for _ in 0..256 {
                    core::hint::spin_loop();
                }
            }
        }
    }

    fn fill(&mut self) {
        let mut pace = Pace::new(self.plan.knobs.fill_rate, self.plan.ncpus, self.id);
        let start = self.clock.now();
        let mut idx = self.first;
        while idx < self.end {
            let elapsed = self.clock.now() - start;
            let due = pace
                .due(elapsed, self.plan.tsc_hz, BATCH)
                .min(self.end - idx);
            if due == 0 {
                self.pause();
                continue;
            }
            for _ in 0..due {
                self.write_page(idx, 1);
                idx += 1;
            }
            pace.record(due);
        }
        for idx in self.first..self.rewrite_from {
            self.write_page(idx, 0);
        }
        say!("FILL-DONE cpu={} pages={}", self.id, self.end - self.first);
    }

    fn steady(&mut self) -> ! {
        let period = self.ms_to_cycles(self.plan.knobs.verify_ms);
        let mut pace = Pace::new(self.plan.knobs.rate, self.plan.ncpus, self.id);
        let candidates = self.end - self.rewrite_from;
        let start = self.clock.now();
        let mut next_verify = start + period;
        loop {
            let now = self.clock.now();
            if now >= next_verify {
                self.verify_round();
                let after = self.clock.now();
                next_verify = (next_verify + period).max(after + period / 2);
                continue;
            }
            let due = match candidates {
                0 => 0,
                _ => pace.due(now - start, self.plan.tsc_hz, BATCH),
            };
            if due == 0 {
                self.pause();
                continue;
            }
            for _ in 0..due.min(BATCH) {
                let idx = self.rewrite_from + self.rng.below(candidates);
                pace.record(1);
                if self.lost == Some(idx) {
                    continue;
                }
                let gen = self.gen(idx).wrapping_add(1).max(1);
                self.write_page(idx, gen);
                self.writes += 1;
            }
        }
    }

    fn verify_round(&mut self) {
        self.round += 1;
        let seed = self.plan.knobs.seed;
        let mut failed = 0u64;
        for idx in self.first..self.end {
            let gen = self.gen(idx);
            let page = self.page(idx);
            let pfn = page as u64 >> 12;
            // SAFETY: a working-set page in identity-mapped RAM.
            if let Err(m) = unsafe { pattern::check(page, seed, pfn, gen) } {
                failed += 1;
                if failed <= MAX_FAIL_LINES {
                    // SAFETY: as above.
                    let found = unsafe { pattern::diagnose(page, seed, pfn, gen) };
                    self.report_fail(page as u64, gen, m, found, "owned");
                }
            }
        }
        let sampled = self.sample_untouched(&mut failed);
        if let Some(f) = &self.fpu {
            let (id, round) = (self.id, self.round);
            let mut lines = 0;
            failed += f.check(|m: Mismatch| {
                lines += 1;
                if lines <= MAX_FAIL_LINES {
                    say!(
                        "VERIFY-FAIL cpu={} kind=fpu reg={} round={} got={:#x} want={:#x}",
                        id,
                        m.reg,
                        round,
                        m.got,
                        m.want
                    );
                }
            });
        }
        if failed == 0 {
            let ms =
                self.clock.now().saturating_sub(self.plan.boot_tsc) / (self.plan.tsc_hz / 1000);
            say!(
                "VERIFY-OK round={} cpu={} ticks={} writes={} tsc_ms={} checked={} sampled={}",
                self.round,
                self.id,
                hw::ticks(self.id as usize),
                self.writes,
                ms,
                self.end - self.first,
                sampled
            );
        } else {
            say!(
                "VERIFY-ROUND-FAILED round={} cpu={} failed={} checked={} sampled={}",
                self.round,
                self.id,
                failed,
                self.end - self.first,
                sampled
            );
        }
        if self.id == 0 && self.round == self.plan.knobs.lose_write && self.rewrite_from < self.end
        {
            let idx = self.rewrite_from;
            let gen = self.gen(idx).wrapping_add(1).max(1);
            // SAFETY: as in `gen`; the page itself is deliberately left at its old generation.
            unsafe { self.gen_slot(idx).write_volatile(gen) };
            self.lost = Some(idx);
            say!(
                "TESTGUEST lost-write page={:#x} gen={}",
                self.page(idx) as u64,
                gen
            );
        }
        let exit_after = self.plan.knobs.exit_after;
        if exit_after != 0 && self.round == exit_after {
            self.finish();
        }
    }

    /// Reads this CPU's share of `sample=` never-touched pages, spread pseudo-randomly over all
    /// untouched RAM and different each round; they must read as zero.
    fn sample_untouched(&mut self, failed: &mut u64) -> u64 {
        let untouched = &self.plan.layout.untouched;
        if untouched.pages() == 0 {
            return 0;
        }
        let n = self.plan.knobs.sample.div_ceil(self.plan.ncpus);
        let mut pick = Rng::new(self.plan.knobs.seed ^ 0x5a5a, self.round * 1024 + self.id);
        for _ in 0..n {
            let addr = untouched.addr(pick.below(untouched.pages()));
            // SAFETY: an untouched RAM page, identity-mapped; reading it maps the host zero page.
            if let Err(m) = unsafe { pattern::check(addr as *const u64, 0, addr >> 12, 0) } {
                *failed += 1;
                if *failed <= MAX_FAIL_LINES {
                    self.report_fail(addr, 0, m, Found::Other, "untouched");
                }
            }
        }
        n
    }

    fn report_fail(&self, page: u64, gen: u32, m: pattern::Mismatch, found: Found, kind: &str) {
        say!(
            "VERIFY-FAIL cpu={} page={:#x} expected_gen={} round={} kind={} word={} got={:#x} \
             want={:#x} found={}",
            self.id,
            page,
            gen,
            self.round,
            kind,
            m.word,
            m.got,
            m.want,
            FoundText(found)
        );
    }

    /// `exit_after` reached: the last CPU to get here powers the VM off, the others stop.
    fn finish(&self) -> ! {
        let done = FINISHED.fetch_add(1, Ordering::AcqRel) + 1;
        if done == self.plan.ncpus {
            say!("TESTGUEST poweroff rounds={}", self.round);
            hw::outw(0x604, 0x2000); // PM1a control: SLP_EN, SLP_TYP 0 (S5)
        }
        hw::halt()
    }
}

/// `found=` of a failure line: `zero`, `gen<N>` or `other`.
struct FoundText(Found);

impl core::fmt::Display for FoundText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Found::Zero => f.write_str("zero"),
            Found::Generation(g) => write!(f, "gen{g}"),
            Found::Other => f.write_str("other"),
        }
    }
}

//! The convergence policy: pure functions from the last pass's statistics to "another pass"
//! or "stop and copy" ([`decide`]), and to how much vCPU time to take away from a guest that
//! dirties memory faster than the link drains it ([`throttle_pct`], auto-converge). Both ask
//! the same question, whether what is left fits the downtime limit ([`fits_downtime`]).

use std::time::Duration;

use crate::stats::{PassKind, PassStats, StopReason};

/// Default downtime limit.
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(50);
/// Default most passes (bulk included) before stop-and-copy.
pub const DEFAULT_MAX_PASSES: u32 = 30;

/// Auto-converge's first throttle, in percent of vCPU time (as QEMU's
/// `cpu-throttle-initial`).
pub const THROTTLE_INITIAL_PCT: u32 = 20;
/// Auto-converge's step per pass that still does not fit (QEMU's `cpu-throttle-increment`).
pub const THROTTLE_STEP_PCT: u32 = 10;
/// Most vCPU time auto-converge takes away.
pub const THROTTLE_MAX_PCT: u32 = 95;

/// What the policy is allowed. Built once per migration; every default is here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest acceptable pause for the final pass.
    pub downtime: Duration,
    /// Passes (bulk included) after which the guest is paused whatever remains.
    pub max_passes: u32,
    /// Throttle the vCPUs while a pass leaves more than fits the downtime (auto-converge).
    pub auto_converge: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            downtime: DEFAULT_DOWNTIME,
            max_passes: DEFAULT_MAX_PASSES,
            auto_converge: true,
        }
    }
}

/// The policy's answer after a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send the dirty pages with the guest running.
    Continue,
    /// Pause the guest and send the rest.
    StopAndCopy(StopReason),
}

/// Time to send `bytes` at `bandwidth_bps` (infinite for an unmeasured bandwidth).
pub fn expected_time(bytes: u64, bandwidth_bps: u64) -> Duration {
    if bytes == 0 {
        Duration::ZERO
    } else if bandwidth_bps == 0 {
        Duration::MAX
    } else {
        Duration::from_secs_f64(bytes as f64 / bandwidth_bps as f64)
    }
}

/// Below this expected downtime another pass is not worth its fixed costs (dirty-log fetch,
/// a round trip).
pub const WORTH_A_PASS: Duration = Duration::from_millis(1);

/// Stop when the dirty bytes left after `last` go out within the downtime at the bandwidth
/// the pass achieved, unless one more live pass is expected to at least halve that
/// downtime; or when `last` was pass number `max_passes - 1`.
///
/// The limit is a ceiling, not a target: a writer that leaves 20 MiB dirty after the bulk
/// pass fits a 50 ms limit, but one more pass of about 20 ms leaves only what it dirties
/// meanwhile, and the guest keeps running during it.
pub fn decide(last: &PassStats, limits: &Limits) -> Decision {
    let expected = expected_time(last.remaining_bytes(), last.bandwidth_bps);
    let fits = fits_downtime(last, limits);
    if fits && !another_pass_pays(last, expected) {
        Decision::StopAndCopy(StopReason::Converged)
    } else if last.pass + 1 >= limits.max_passes {
        Decision::StopAndCopy(if fits {
            StopReason::Converged
        } else {
            StopReason::MaxPasses
        })
    } else {
        Decision::Continue
    }
}

/// Whether the dirty bytes left after `last` go out within the downtime limit at the
/// bandwidth the pass achieved.
pub fn fits_downtime(last: &PassStats, limits: &Limits) -> bool {
    expected_time(last.remaining_bytes(), last.bandwidth_bps) <= limits.downtime
}

/// Auto-converge: the share of vCPU time to take away after `last`, given the `current`
/// share. Like QEMU's auto-converge: [`THROTTLE_INITIAL_PCT`] at the first dirty pass that
/// does not fit the downtime, [`THROTTLE_STEP_PCT`] more for each further one, at most
/// [`THROTTLE_MAX_PCT`]; kept while passes fit. The bulk pass says nothing about the guest's
/// dirtying rate (it sends everything), and an unmeasured bandwidth says nothing either.
pub fn throttle_pct(current: u32, last: &PassStats, limits: &Limits) -> u32 {
    if !limits.auto_converge {
        return 0;
    }
    if last.kind == PassKind::Bulk || last.bandwidth_bps == 0 || fits_downtime(last, limits) {
        return current;
    }
    match current {
        0 => THROTTLE_INITIAL_PCT,
        c => (c + THROTTLE_STEP_PCT).min(THROTTLE_MAX_PCT),
    }
}

/// One more pass would take about `expected` and leave what the guest dirties meanwhile:
/// worth it if that is expected to go out in at most half the time.
fn another_pass_pays(last: &PassStats, expected: Duration) -> bool {
    if expected <= WORTH_A_PASS {
        return false;
    }
    let dirtied = last.dirty_rate_bps as f64 * expected.as_secs_f64();
    expected_time(dirtied as u64, last.bandwidth_bps) * 2 <= expected
}

/// True when the guest dirties memory at least as fast as it can be sent: more passes will
/// not shrink the remainder (reported in progress and logs).
pub fn diverging(last: &PassStats) -> bool {
    last.dirty_pages > 0 && last.dirty_rate_bps >= last.bandwidth_bps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(pass: u32, dirty_pages: u64, bandwidth_bps: u64) -> PassStats {
        PassStats {
            pass,
            dirty_pages,
            bandwidth_bps,
            ..Default::default()
        }
    }

    #[test]
    fn under_the_limit_another_pass_runs_while_it_halves_the_downtime() {
        let l = Limits::default();
        // 5,000 pages (20 MiB) at 1 GB/s: 20 ms, under the 50 ms limit.
        let mut p = pass(0, 5_000, 1_000_000_000);
        // Dirtying 80 MB/s: a 20 ms pass leaves 1.6 MB, 1.6 ms. Worth it.
        p.dirty_rate_bps = 80_000_000;
        assert_eq!(decide(&p, &l), Decision::Continue);
        // Dirtying 600 MB/s: it would leave 12 MB, 12 ms: not half. Stop.
        p.dirty_rate_bps = 600_000_000;
        assert_eq!(decide(&p, &l), Decision::StopAndCopy(StopReason::Converged));
        // Under a millisecond nothing is worth another pass.
        let mut small = pass(3, 200, 1_000_000_000);
        small.dirty_rate_bps = 1;
        assert_eq!(
            decide(&small, &l),
            Decision::StopAndCopy(StopReason::Converged)
        );
        // Out of passes while under the limit: that is still convergence.
        p.dirty_rate_bps = 80_000_000;
        p.pass = l.max_passes - 1;
        assert_eq!(decide(&p, &l), Decision::StopAndCopy(StopReason::Converged));
    }

    #[test]
    fn converges_when_remainder_fits_downtime() {
        let l = Limits::default();
        // 100 pages = 400 KiB at 1 GB/s is 0.4 ms.
        assert_eq!(
            decide(&pass(1, 100, 1_000_000_000), &l),
            Decision::StopAndCopy(StopReason::Converged)
        );
        // 1 GiB at 1 GB/s is ~1 s: go on.
        assert_eq!(
            decide(&pass(1, 262_144, 1_000_000_000), &l),
            Decision::Continue
        );
        // Nothing dirty: done even with no bandwidth measured.
        assert_eq!(
            decide(&pass(0, 0, 0), &l),
            Decision::StopAndCopy(StopReason::Converged)
        );
        // Unmeasured bandwidth with work left: continue.
        assert_eq!(decide(&pass(0, 1, 0), &l), Decision::Continue);
    }

    #[test]
    fn stops_at_max_passes() {
        let l = Limits {
            downtime: Duration::from_millis(1),
            max_passes: 3,
            ..Limits::default()
        };
        assert_eq!(decide(&pass(1, 1 << 20, 1000), &l), Decision::Continue);
        assert_eq!(
            decide(&pass(2, 1 << 20, 1000), &l),
            Decision::StopAndCopy(StopReason::MaxPasses)
        );
    }

    #[test]
    fn throttle_steps_up_only_while_the_rest_does_not_fit() {
        let l = Limits::default();
        let gbps = 1 << 30;
        let pass_of = |kind, bytes: u64| PassStats {
            kind,
            dirty_pages: bytes / 4096,
            bandwidth_bps: gbps,
            ..Default::default()
        };
        // 1 GiB/s x 50 ms = 51 MiB fit; 100 MiB dirty does not.
        let big = pass_of(PassKind::Iterative, 100 << 20);
        let small = pass_of(PassKind::Iterative, 10 << 20);
        assert_eq!(throttle_pct(0, &pass_of(PassKind::Bulk, 1 << 30), &l), 0);
        assert_eq!(throttle_pct(0, &big, &l), THROTTLE_INITIAL_PCT);
        assert_eq!(throttle_pct(20, &big, &l), 30);
        assert_eq!(throttle_pct(90, &big, &l), THROTTLE_MAX_PCT);
        assert_eq!(throttle_pct(95, &big, &l), THROTTLE_MAX_PCT);
        assert_eq!(throttle_pct(30, &small, &l), 30);
        let off = Limits {
            auto_converge: false,
            ..l
        };
        assert_eq!(throttle_pct(30, &big, &off), 0);
    }

    #[test]
    fn divergence() {
        let mut p = pass(1, 10, 100);
        p.dirty_rate_bps = 200;
        assert!(diverging(&p));
        p.dirty_rate_bps = 50;
        assert!(!diverging(&p));
    }
}

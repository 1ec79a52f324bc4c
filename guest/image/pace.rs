//! Pacing a [`Rate`] shared by several CPUs: how many pages are due after some time.
//!
//! Shared source (`no_std`): the bare-metal guest counts time in TSC cycles, the Linux
//! workload in nanoseconds. The backlog is capped at 100 ms of work, so a stall (a long verify
//! round, a paused VM, a TSC jump across a migration) never turns into a burst.

use crate::knobs::Rate;

/// One CPU's share of a rate, and the pages it has done.
#[derive(Debug, Clone)]
pub struct Pace {
    /// Pages per second; `None` = as fast as possible.
    per_s: Option<u64>,
    done: u64,
}

impl Pace {
    /// Part `part` of `parts` of `rate` (the remainder goes to the first parts).
    pub fn new(rate: Rate, parts: u64, part: u64) -> Pace {
        let parts = parts.max(1);
        let per_s = match rate {
            Rate::Max => None,
            Rate::Limit(n) => Some(n / parts + u64::from(part < n % parts)),
        };
        Pace { per_s, done: 0 }
    }

    /// Pages due `elapsed` time units after the start (`units_per_s` units a second); at most
    /// `batch` when the rate is unlimited.
    pub fn due(&mut self, elapsed: u64, units_per_s: u64, batch: u64) -> u64 {
        let per_s = match self.per_s {
            None => return batch,
            Some(0) => return 0,
            Some(n) => n,
        };
        let target = u128::from(elapsed) * u128::from(per_s) / u128::from(units_per_s.max(1));
        let target = u64::try_from(target).unwrap_or(u64::MAX);
        let cap = (per_s / 10).max(1);
        if target > self.done.saturating_add(cap) {
            self.done = target - cap;
        }
        target.saturating_sub(self.done)
    }

    /// Records `n` pages done.
    pub fn record(&mut self, n: u64) {
        self.done += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HZ: u64 = 1_000_000_000;

    #[test]
    fn shares_add_up_to_the_rate() {
        let total: u64 = (0..3)
            .map(|part| {
                let mut pace = Pace::new(Rate::Limit(1000), 3, part);
                (1..=100)
                    .map(|step| {
                        let due = pace.due(step * HZ / 100, HZ, 16);
                        pace.record(due);
                        due
                    })
                    .sum::<u64>()
            })
            .sum();
        assert_eq!(total, 1000, "one second of all three shares");
    }

    #[test]
    fn due_follows_time_and_records() {
        let mut pace = Pace::new(Rate::Limit(100), 1, 0);
        assert_eq!(pace.due(0, HZ, 16), 0);
        assert_eq!(pace.due(HZ / 20, HZ, 16), 5);
        pace.record(5);
        assert_eq!(pace.due(HZ / 20, HZ, 16), 0);
        assert_eq!(pace.due(HZ / 10, HZ, 16), 5);
    }

    #[test]
    fn backlog_is_capped_at_100ms() {
        let mut pace = Pace::new(Rate::Limit(1000), 1, 0);
        assert_eq!(pace.due(3600 * HZ, HZ, 16), 100);
        pace.record(100);
        assert_eq!(pace.due(3600 * HZ, HZ, 16), 0);
    }

    #[test]
    fn zero_and_max() {
        assert_eq!(Pace::new(Rate::Limit(0), 2, 0).due(HZ, HZ, 16), 0);
        assert_eq!(Pace::new(Rate::Max, 2, 1).due(0, HZ, 16), 16);
        assert_eq!(
            Pace::new(Rate::Limit(1), 2, 1).due(HZ, HZ, 16),
            0,
            "1/s goes to part 0"
        );
    }
}

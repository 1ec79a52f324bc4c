//! Auto-converge: when the guest dirties memory faster than the link drains it, take a growing
//! share of each vCPU's time away (as QEMU's auto-converge does: 20 % first, +10 % per pass
//! that still does not fit the downtime limit, at most 95 %). A thread kicks every vCPU out of
//! the guest at the end of each 10 ms run slice and has it sleep its share.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::info;
use migration::{PassKind, PassStats};

use crate::Vmm;

const RUN_SLICE: Duration = Duration::from_millis(10);
const INITIAL_PCT: u32 = 20;
const STEP_PCT: u32 = 10;
const MAX_PCT: u32 = 95;

/// The share of vCPU time to take away after `last`, given the current share.
pub fn next_pct(current: u32, last: &PassStats, downtime: Duration) -> u32 {
    if last.kind == PassKind::Bulk || last.bandwidth_bps == 0 {
        return current;
    }
    let fits = last.remaining_bytes() as f64 <= last.bandwidth_bps as f64 * downtime.as_secs_f64();
    match (fits, current) {
        (true, c) => c,
        (false, 0) => INITIAL_PCT,
        (false, c) => (c + STEP_PCT).min(MAX_PCT),
    }
}

/// The sleep that takes `pct` % of the time around one run slice.
pub fn sleep_for(pct: u32) -> Duration {
    let p = f64::from(pct.min(MAX_PCT)) / 100.0;
    RUN_SLICE.mul_f64(p / (1.0 - p))
}

/// The throttling thread of one migration; stops when dropped.
pub struct Throttle {
    pct: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    pub fn new() -> Throttle {
        Throttle {
            pct: Arc::new(AtomicU32::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        }
    }

    pub fn pct(&self) -> u32 {
        self.pct.load(Ordering::Relaxed)
    }

    /// Set the share; starts the thread the first time it is above zero.
    pub fn set(&mut self, vmm: &Arc<Mutex<Vmm>>, pct: u32) {
        if pct == self.pct() {
            return;
        }
        info!("auto-converge: throttling vCPUs by {pct} %");
        self.pct.store(pct, Ordering::Relaxed);
        if pct == 0 || self.thread.is_some() {
            return;
        }
        let (vmm, pct, stop) = (vmm.clone(), self.pct.clone(), self.stop.clone());
        self.thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(RUN_SLICE);
                    let d = sleep_for(pct.load(Ordering::Relaxed));
                    if d.is_zero() {
                        continue;
                    }
                    let v = vmm.lock().unwrap_or_else(|e| e.into_inner());
                    for h in v.vcpu_handles() {
                        let _ = h.throttle(d);
                    }
                    drop(v);
                    std::thread::sleep(d);
                }
            })
            .ok();
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(kind: PassKind, dirty_pages: u64, bandwidth_bps: u64) -> PassStats {
        PassStats {
            kind,
            dirty_pages,
            bandwidth_bps,
            ..Default::default()
        }
    }

    #[test]
    fn steps_up_only_while_the_rest_does_not_fit() {
        let dt = Duration::from_millis(50);
        let gbps = 1 << 30;
        // 1 GiB/s x 50 ms = 51 MiB fit; 100 MiB dirty does not.
        let big = pass(PassKind::Iterative, (100 << 20) / 4096, gbps);
        let small = pass(PassKind::Iterative, (10 << 20) / 4096, gbps);
        assert_eq!(next_pct(0, &pass(PassKind::Bulk, 1 << 20, gbps), dt), 0);
        assert_eq!(next_pct(0, &big, dt), 20);
        assert_eq!(next_pct(20, &big, dt), 30);
        assert_eq!(next_pct(90, &big, dt), 95);
        assert_eq!(next_pct(95, &big, dt), 95);
        assert_eq!(next_pct(30, &small, dt), 30);
    }

    #[test]
    fn sleep_takes_the_share() {
        assert!(sleep_for(0).is_zero());
        assert_eq!(sleep_for(50), RUN_SLICE);
        assert!(sleep_for(95) > RUN_SLICE * 18 && sleep_for(99) == sleep_for(95));
    }
}

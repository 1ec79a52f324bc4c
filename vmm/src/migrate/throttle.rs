//! Auto-converge's mechanism: a thread that kicks every vCPU out of the guest at the end of
//! each 10 ms run slice and has it sleep the share of time the policy asks for
//! (`migration::precopy::throttle_pct` decides the share).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::info;
use migration::precopy::THROTTLE_MAX_PCT;

use crate::sync::lock;
use crate::Vmm;

const RUN_SLICE: Duration = Duration::from_millis(10);

/// The sleep that takes `pct` % of the time around one run slice.
pub fn sleep_for(pct: u32) -> Duration {
    let p = f64::from(pct.min(THROTTLE_MAX_PCT)) / 100.0;
    RUN_SLICE.mul_f64(p / (1.0 - p))
}

/// The throttling thread of one migration; stops when dropped.
pub struct Throttle {
    vmm: Arc<Mutex<Vmm>>,
    pct: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    pub fn new(vmm: Arc<Mutex<Vmm>>) -> Throttle {
        Throttle {
            vmm,
            pct: Arc::new(AtomicU32::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        }
    }

    /// Sets the share; starts the thread the first time it is above zero.
    pub fn set(&mut self, pct: u32) {
        if pct == self.pct.load(Ordering::Relaxed) {
            return;
        }
        info!("auto-converge: throttling vCPUs by {pct} %");
        self.pct.store(pct, Ordering::Relaxed);
        if pct == 0 || self.thread.is_some() {
            return;
        }
        let (vmm, pct, stop) = (self.vmm.clone(), self.pct.clone(), self.stop.clone());
        self.thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(RUN_SLICE);
                    let d = sleep_for(pct.load(Ordering::Relaxed));
                    if d.is_zero() {
                        continue;
                    }
                    lock(&vmm).throttle(d);
                    std::thread::sleep(d);
                }
            })
            .ok();
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

    #[test]
    fn sleep_takes_the_share() {
        assert!(sleep_for(0).is_zero());
        assert_eq!(sleep_for(50), RUN_SLICE);
        assert!(sleep_for(95) > RUN_SLICE * 18 && sleep_for(99) == sleep_for(95));
    }
}

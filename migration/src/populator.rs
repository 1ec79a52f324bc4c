//! Allocating destination pages on a second thread, ahead of the reader.
//!
//! On a fresh destination, the kernel allocates and clears every page on first write; on a
//! host that is itself a VM this also faults in the outer hypervisor, and allocating can cost
//! more than receiving the data (figures in the README).
//! Done by the thread that reads the socket, the socket and the sender wait meanwhile. So
//! the reader queues each data run of a record here as soon as it has checked the run table,
//! and this thread allocates the runs in order (`MADV_POPULATE_WRITE`, a chunk at a time)
//! while the reader receives into the part already allocated, straight into guest memory.
//!
//! Allocation never changes what a page holds, so a chunk allocated late or twice is only
//! slower, never wrong: if the kernel refuses, or the thread cannot start or dies, the
//! reader stops waiting and faults pages itself. [`Populator::drain`] waits for the queue to
//! empty; the receiver drains before it gives pages back (a page allocated after
//! `MADV_DONTNEED` would read as zero but cost memory) and before the final pass, so nothing
//! runs beside the downtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::memory::{Backing, RamRegion};
use crate::sync::{lock, wait};

/// Pages allocated per call (512 KiB): the reader's unit of waiting.
const CHUNK_PAGES: usize = 128;

/// Positions count pages in queue order; `GONE` means the thread no longer allocates.
const GONE: u64 = u64::MAX;

/// A queued run: its first page's position in queue order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket(Option<u64>);

impl Ticket {
    /// Nothing to wait for (already allocated, or no thread).
    pub(crate) const NONE: Ticket = Ticket(None);
}

/// The reader's end.
pub(crate) struct Populator {
    regions: Vec<RamRegion>,
    worker: Option<Worker>,
    /// Pages queued so far.
    queued: u64,
    /// False once the thread is gone: the reader faults pages itself.
    enabled: bool,
}

struct Worker {
    jobs: Sender<(usize, usize, usize)>,
    shared: Arc<Shared>,
    handle: JoinHandle<()>,
}

struct Shared {
    /// Pages allocated so far, in queue order (`GONE` once the thread stopped allocating).
    allocated: Mutex<u64>,
    progress: Condvar,
    /// Tells the thread to drop what is queued.
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, u64> {
        lock(&self.allocated)
    }

    fn advance(&self, pages: usize) {
        let mut a = self.lock();
        if *a != GONE {
            *a += pages as u64;
        }
        self.progress.notify_all();
    }

    fn gone(&self) {
        *self.lock() = GONE;
        self.progress.notify_all();
    }
}

/// Marks the thread gone however it ends (a panic included), so no reader waits forever.
struct GoneOnDrop(Arc<Shared>);

impl Drop for GoneOnDrop {
    fn drop(&mut self) {
        self.0.gone();
    }
}

impl Populator {
    pub(crate) fn new(regions: Vec<RamRegion>) -> Populator {
        let enabled = regions
            .iter()
            .all(|r| r.backing() == Backing::PrivateAnonymous);
        Populator {
            regions,
            worker: None,
            queued: 0,
            enabled,
        }
    }

    /// Queues pages `page..page + pages` of region `region` (checked against the layout)
    /// for allocation; the ticket tells [`ready`](Self::ready) where they are in the queue.
    pub(crate) fn queue(&mut self, region: usize, page: usize, pages: usize) -> Ticket {
        if !self.enabled {
            return Ticket::NONE;
        }
        if self.worker.is_none() {
            match Worker::spawn(self.regions.clone()) {
                Ok(w) => self.worker = Some(w),
                Err(e) => {
                    log::debug!("Cannot start the page allocating thread: {e}");
                    self.enabled = false;
                    return Ticket::NONE;
                }
            }
        }
        let Some(w) = self.worker.as_ref() else {
            return Ticket::NONE;
        };
        if w.jobs.send((region, page, pages)).is_err() {
            self.enabled = false;
            return Ticket::NONE;
        }
        let at = self.queued;
        self.queued += pages as u64;
        Ticket(Some(at))
    }

    /// Waits until the page `done` pages into the run of `ticket` is allocated; returns how
    /// many pages from there (at most `want`, at least one) may be written without faulting.
    pub(crate) fn ready(&mut self, ticket: Ticket, done: usize, want: usize) -> usize {
        let (Some(first), Some(w)) = (ticket.0, self.worker.as_ref()) else {
            return want;
        };
        let at = first + done as u64;
        let mut a = w.shared.lock();
        while *a <= at {
            a = wait(&w.shared.progress, a);
        }
        if *a == GONE {
            self.enabled = false;
            return want;
        }
        ((*a - at) as usize).min(want)
    }

    /// Waits until everything queued is allocated (or the thread is gone).
    pub(crate) fn drain(&mut self) {
        let Some(w) = self.worker.as_ref() else {
            return;
        };
        let mut a = w.shared.lock();
        while *a < self.queued {
            a = wait(&w.shared.progress, a);
        }
        if *a == GONE {
            self.enabled = false;
        }
    }
}

impl Drop for Populator {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.shared.stop.store(true, Ordering::Release);
            drop(w.jobs);
            if w.handle.join().is_err() {
                log::error!("The page allocating thread panicked");
            }
        }
    }
}

impl Worker {
    fn spawn(regions: Vec<RamRegion>) -> std::io::Result<Worker> {
        let (jobs, inbox) = mpsc::channel::<(usize, usize, usize)>();
        let shared = Arc::new(Shared {
            allocated: Mutex::new(0),
            progress: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let theirs = shared.clone();
        let handle = std::thread::Builder::new()
            .name("ram-alloc".into())
            .spawn(move || {
                let shared = GoneOnDrop(theirs);
                for (r, page, pages) in inbox {
                    let mut at = page;
                    while at < page + pages {
                        if shared.0.stop.load(Ordering::Acquire) {
                            return;
                        }
                        let n = (page + pages - at).min(CHUNK_PAGES);
                        if !regions[r].populate(at, n) {
                            return;
                        }
                        shared.0.advance(n);
                        at += n;
                    }
                }
            })?;
        Ok(Worker {
            jobs,
            shared,
            handle,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::AnonMapping;
    use crate::pagemap::Pagemap;
    use crate::wire::PAGE_SIZE;

    fn resident(map: &AnonMapping, page: usize, pages: usize) -> usize {
        let mut pm = Pagemap::open().expect("pagemap");
        let mut states = Vec::new();
        pm.classify(map.as_ptr() as usize + page * PAGE_SIZE, pages, &mut states)
            .unwrap();
        states.iter().filter(|s| !s.is_known_zero()).count()
    }

    #[test]
    fn queued_runs_are_allocated_in_order_and_ready_says_how_far() {
        let pages = 3 * CHUNK_PAGES + 5;
        let map = Arc::new(AnonMapping::new(2 * pages * PAGE_SIZE).unwrap());
        let mut p = Populator::new(vec![RamRegion::from_anon(0, map.clone()).unwrap()]);
        let a = p.queue(0, 0, 10);
        let b = p.queue(0, pages, pages);
        assert_ne!(a, Ticket::NONE);
        assert_eq!(p.ready(a, 0, 10), 10, "a short run is allocated whole");
        let mut done = 0;
        while done < pages {
            let n = p.ready(b, done, pages - done);
            assert!(n >= 1 && n <= pages - done);
            assert_eq!(
                resident(&map, pages + done, n),
                n,
                "ready pages are allocated"
            );
            done += n;
        }
        p.drain();
        assert_eq!(resident(&map, 0, 2 * pages), 10 + pages);
        assert_eq!(p.ready(Ticket::NONE, 0, 7), 7);
    }

    #[test]
    fn a_gone_thread_never_blocks_the_reader() {
        let map = Arc::new(AnonMapping::new(4 * PAGE_SIZE).unwrap());
        let mut p = Populator::new(vec![RamRegion::from_anon(0, map).unwrap()]);
        let t = p.queue(0, 0, 4);
        p.worker.as_ref().unwrap().shared.gone();
        assert_eq!(p.ready(t, 0, 4), 4);
        assert!(!p.enabled);
        assert_eq!(p.queue(0, 0, 1), Ticket::NONE);
        p.drain();
    }
}

//! Zero detection at memory speed, measured against a memcpy of the same buffer in the same
//! run, and untouched-page detection (pagemap) against reading the pages; plus the bulk pass
//! of a mostly idle 16 GiB guest.
//!
//! `cargo bench -p migration --bench zero_scan` (numbers in migration/README.md).

use std::hint::black_box;
use std::io;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use migration::fake::FakeVm;
use migration::pagemap::Pagemap;
use migration::zero::{is_zero_raw, is_zero_words};
use migration::{send_migration, AnonMapping, GuestSpan, SendOptions, Transport, PAGE_SIZE};

/// Large enough to stream from DRAM, not from cache.
const TOUCHED: usize = 256 << 20;
/// Fresh memory for the untouched-page comparison.
const UNTOUCHED: usize = 1 << 30;

fn touched_buffer() -> AnonMapping {
    let m = AnonMapping::new(TOUCHED).unwrap();
    // SAFETY: the whole mapping is ours and writable; writing zeros makes every page resident.
    unsafe { std::ptr::write_bytes(m.as_ptr(), 0, m.len()) };
    m
}

fn zero_check(c: &mut Criterion) {
    let src = touched_buffer();
    let dst = touched_buffer();
    let mut g = c.benchmark_group("zero_check_256MiB_resident");
    g.throughput(Throughput::Bytes(TOUCHED as u64));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("memcpy", |b| {
        // SAFETY: two distinct live mappings of TOUCHED bytes.
        b.iter(|| unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_ptr(), TOUCHED) })
    });
    g.bench_function("is_zero_whole_buffer", |b| {
        // SAFETY: a live mapping of TOUCHED bytes.
        b.iter(|| assert!(unsafe { is_zero_raw(black_box(src.as_ptr()), TOUCHED) }))
    });
    g.bench_function("is_zero_per_page", |b| {
        b.iter(|| {
            for p in 0..TOUCHED / PAGE_SIZE {
                // SAFETY: one page of a live mapping.
                assert!(unsafe {
                    is_zero_raw(black_box(src.as_ptr().add(p * PAGE_SIZE)), PAGE_SIZE)
                });
            }
        })
    });
    g.bench_function("is_zero_u64_words", |b| {
        // SAFETY: a live mapping of TOUCHED bytes.
        b.iter(|| assert!(unsafe { is_zero_words(black_box(src.as_ptr()), TOUCHED) }))
    });
    g.finish();
}

fn untouched_detection(c: &mut Criterion) {
    if Pagemap::open().is_none() {
        eprintln!("SKIP: untouched_detection: /proc/self/pagemap unavailable");
        return;
    }
    let pages = UNTOUCHED / PAGE_SIZE;
    let mut g = c.benchmark_group("untouched_1GiB_fresh");
    g.throughput(Throughput::Bytes(UNTOUCHED as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("pagemap_classify", |b| {
        let mut pm = Pagemap::open().unwrap();
        let mut states = Vec::new();
        b.iter_batched(
            || AnonMapping::new(UNTOUCHED).unwrap(),
            |m| {
                pm.classify(m.as_ptr() as usize, pages, &mut states)
                    .unwrap();
                assert!(states.iter().all(|s| s.is_known_zero()));
                m
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("read_every_page", |b| {
        b.iter_batched(
            || AnonMapping::new(UNTOUCHED).unwrap(),
            |m| {
                // SAFETY: a live mapping of UNTOUCHED bytes; reading faults in the zero page.
                assert!(unsafe { is_zero_raw(m.as_ptr(), UNTOUCHED) });
                m
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// Counts and drops the stream.
struct Null(u64);

impl Transport for Null {
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        self.0 += parts.iter().map(|p| p.len() as u64).sum::<u64>();
        Ok(())
    }
    fn send_guest(&mut self, parts: &[&[u8]], guest: &[GuestSpan]) -> io::Result<()> {
        self.send(parts)?;
        self.0 += guest.iter().map(|g| g.len() as u64).sum::<u64>();
        Ok(())
    }
    fn recv(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
    fn has_peer(&self) -> bool {
        false
    }
}

fn idle_guest_migration(c: &mut Criterion) {
    // 16 GiB guest, 64 MiB of it written (every 256th page), the rest never touched.
    let mut vm = FakeVm::new(&[(0, 16 << 30)]);
    let w = vm.writer();
    for p in (0..(16usize << 30) / PAGE_SIZE).step_by(256) {
        w.write((p * PAGE_SIZE) as u64, &[1]);
    }
    let mut g = c.benchmark_group("send_16GiB_guest_64MiB_written");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("send_migration_to_null", |b| {
        b.iter(|| {
            let mut null = Null(0);
            let stats = send_migration(&mut vm, &mut null, SendOptions::default()).unwrap();
            assert_eq!(stats.totals.pages_sent, 16384);
            // The source stays paused after a successful send; let the next iteration run.
            migration::MigrationSource::resume(&mut vm).unwrap();
            null.0
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    zero_check,
    untouched_detection,
    idle_guest_migration
);
criterion_main!(benches);

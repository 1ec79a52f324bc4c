//! Property tests of the whole RAM path: random memory images, random guest writes
//! interleaved with the passes (between passes, at arbitrary points of a scan, to the very
//! page being scanned between its zero check and its queuing, and while a record's pages are
//! being copied to the stream, after their checksums were taken), both dirty-log modes
//! (initially set with clearing before reading, protect on fetch), zero elision on and off,
//! pagemap on and off, clean and dirtied destinations. The destination must end
//! byte-identical to the source.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use crate::fake::{fake_target, FakeDirtyLog, FakeVm, GuestWriter};
use crate::precopy::Limits;
use crate::records::StateBlob;
use crate::stats::PassKind;
use crate::transport::Connection;
use crate::transport::{GuestSpan, Transport};
use crate::vm::GuestRam;
use crate::wire::PAGE_SIZE;
use crate::{receive_migration, send_migration, ReceiveOptions, SendOptions};

const REGION1: u64 = 0x40_0000;

/// What a page holds before the migration starts.
#[derive(Clone, Copy, Debug)]
enum Init {
    Untouched,
    WrittenZero,
    ReadFaulted,
    Data(u8),
}

#[derive(Clone, Copy, Debug)]
enum Target {
    /// The page the sender is scanning right now.
    Current,
    /// A page by global index (modulo the page count).
    Page(usize),
}

#[derive(Clone, Debug)]
struct Write {
    target: Target,
    /// `None`: zero the whole page; `Some(b)`: write non-zero byte `b` somewhere in it.
    value: Option<u8>,
}

#[derive(Clone, Debug)]
struct Case {
    pages: (usize, usize),
    init: Vec<Init>,
    /// Fired when the sender's scan counter reaches the key.
    during_scan: Vec<(usize, Write)>,
    /// Fired after pass `.0`.
    between: Vec<(u32, Write)>,
    /// Fired in the middle of copying record `.0`'s pages to the stream (`Current`: a page
    /// of that record, chosen by the write's value).
    during_send: Vec<(usize, Write)>,
    dirty_log: FakeDirtyLog,
    elide: bool,
    pagemap: bool,
    batch_pages: usize,
    max_passes: u32,
    dirty_destination: bool,
}

fn layout(pages: (usize, usize)) -> Vec<(u64, usize)> {
    vec![(0, pages.0 * PAGE_SIZE), (REGION1, pages.1 * PAGE_SIZE)]
}

fn gpa_of(pages: (usize, usize), global: usize) -> u64 {
    let g = global % (pages.0 + pages.1);
    if g < pages.0 {
        (g * PAGE_SIZE) as u64
    } else {
        REGION1 + ((g - pages.0) * PAGE_SIZE) as u64
    }
}

fn apply(w: &GuestWriter, gpa: u64, value: Option<u8>) {
    match value {
        None => w.fill(gpa, PAGE_SIZE, 0),
        Some(b) => {
            let b = b | 1;
            w.write(gpa + (b as u64 * 13) % PAGE_SIZE as u64, &[b]);
        }
    }
}

fn init_strategy() -> impl Strategy<Value = Init> {
    prop_oneof![
        3 => Just(Init::Untouched),
        1 => Just(Init::WrittenZero),
        1 => Just(Init::ReadFaulted),
        3 => any::<u8>().prop_map(Init::Data),
    ]
}

fn write_strategy() -> impl Strategy<Value = Write> {
    let target = prop_oneof![Just(Target::Current), any::<usize>().prop_map(Target::Page)];
    (target, proptest::option::weighted(0.6, any::<u8>()))
        .prop_map(|(target, value)| Write { target, value })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (8usize..120, 1usize..80).prop_flat_map(|pages| {
        let total = pages.0 + pages.1;
        (
            Just(pages),
            proptest::collection::vec(init_strategy(), total),
            proptest::collection::vec((0..total * 2, write_strategy()), 0..24),
            proptest::collection::vec((0u32..4, write_strategy()), 0..24),
            proptest::collection::vec((0..total, write_strategy()), 0..16),
            prop_oneof![
                Just(FakeDirtyLog::InitiallySet),
                Just(FakeDirtyLog::ProtectOnFetch)
            ],
            (any::<bool>(), any::<bool>()),
            1usize..6,
            1u32..5,
            any::<bool>(),
        )
            .prop_map(
                |(
                    pages,
                    init,
                    during_scan,
                    between,
                    during_send,
                    dirty_log,
                    (elide, pagemap),
                    batch_pages,
                    max_passes,
                    dirty,
                )| Case {
                    pages,
                    init,
                    during_scan,
                    between,
                    during_send,
                    dirty_log,
                    elide,
                    pagemap,
                    batch_pages,
                    max_passes,
                    dirty_destination: dirty,
                },
            )
    })
}

/// A stream that writes guest memory while it copies a record's pages, as a guest may while
/// the kernel copies them out of guest memory: half of the pages' bytes, the writes, the rest.
struct Tearing {
    inner: Connection,
    writer: GuestWriter,
    /// (host address, guest address, bytes) of each region.
    regions: Vec<(usize, u64, usize)>,
    pages: (usize, usize),
    writes: Vec<(usize, Write)>,
    records: usize,
    /// Writes that fired.
    pub fired: usize,
}

impl Tearing {
    fn gpa_of_host(&self, host: usize) -> u64 {
        let &(h, g, _) = self
            .regions
            .iter()
            .find(|&&(h, _, len)| host >= h && host < h + len)
            .expect("span inside guest memory");
        g + (host - h) as u64
    }
}

impl Transport for Tearing {
    fn send(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        self.inner.send(parts)
    }

    fn send_guest(&mut self, parts: &[&[u8]], guest: &[GuestSpan]) -> std::io::Result<()> {
        let record = self.records;
        self.records += 1;
        let writes: Vec<Write> = self
            .writes
            .iter()
            .filter(|(at, _)| *at == record)
            .map(|(_, w)| w.clone())
            .collect();
        if writes.is_empty() || guest.is_empty() || self.writer.paused() {
            return self.inner.send_guest(parts, guest);
        }
        let total: usize = guest.iter().map(GuestSpan::len).sum();
        let mut copy = Vec::with_capacity(total);
        let mut left = total / 2 + 7;
        let mut rest = Vec::new();
        for g in guest {
            let (now, later) = g.split_at(left);
            now.copy_into(&mut copy);
            left -= now.len();
            rest.push(later);
        }
        let pages: Vec<usize> = guest
            .iter()
            .flat_map(|g| {
                (0..g.len() / PAGE_SIZE).map(move |i| g.as_ptr() as usize + i * PAGE_SIZE)
            })
            .collect();
        for w in writes {
            let gpa = match w.target {
                Target::Current => {
                    let pick = w.value.map_or(0, usize::from) % pages.len();
                    self.gpa_of_host(pages[pick])
                }
                Target::Page(i) => gpa_of(self.pages, i),
            };
            apply(&self.writer, gpa, w.value);
            self.fired += 1;
        }
        for g in rest {
            g.copy_into(&mut copy);
        }
        let mut all = parts.to_vec();
        all.push(&copy);
        self.inner.send(&all)
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.recv(buf)
    }

    fn has_peer(&self) -> bool {
        false
    }
}

fn source_vm(case: &Case) -> FakeVm {
    let mut src = FakeVm::new(&layout(case.pages));
    src.set_dirty_log_mode(case.dirty_log);
    src.states = vec![StateBlob {
        id: "vcpu0".into(),
        version: 1,
        data: vec![1, 2, 3],
    }];
    let w = src.writer();
    for (i, init) in case.init.iter().enumerate() {
        let gpa = gpa_of(case.pages, i);
        match *init {
            Init::Untouched => {}
            Init::WrittenZero => w.write(gpa, &[0]),
            Init::ReadFaulted => w.read(gpa, &mut [0]),
            Init::Data(b) => w.fill(gpa + (b as u64 % 64) * 8, 8, b | 0x80),
        }
    }
    src
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let mut src = source_vm(case);
    let mut dst = fake_target(&layout(case.pages));
    if case.dirty_destination {
        // The destination "loaded firmware" first: the QEMU 1.5 failure mode.
        dst.writer()
            .fill(gpa_of(case.pages, 3), 3 * PAGE_SIZE, 0x5a);
    }

    let w = src.writer();
    let between = case.between.clone();
    let pages = case.pages;
    src.between_passes = Some(Box::new(move |w, p| {
        for (pass, write) in &between {
            if *pass == p.pass {
                let page = match write.target {
                    Target::Page(i) => i,
                    Target::Current => *pass as usize,
                };
                apply(w, gpa_of(pages, page), write.value);
            }
        }
    }));
    let counter = Arc::new(AtomicUsize::new(0));
    let during = case.during_scan.clone();
    let hook = move |r: usize, page: usize| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        if w.paused() {
            return;
        }
        for (at, write) in &during {
            if *at == n {
                let gpa = match write.target {
                    Target::Current if r == 0 => (page * PAGE_SIZE) as u64,
                    Target::Current => REGION1 + (page * PAGE_SIZE) as u64,
                    Target::Page(i) => gpa_of(pages, i),
                };
                apply(&w, gpa, write.value);
            }
        }
    };
    let mut opts = SendOptions {
        zero_elision: case.elide,
        limits: Limits {
            downtime: Duration::ZERO,
            max_passes: case.max_passes,
            ..Limits::default()
        },
        batch_pages: case.batch_pages,
        use_pagemap: case.pagemap,
        ..Default::default()
    };
    opts.scan_hook = Some(Box::new(hook));

    let mut out = Tearing {
        inner: Connection::memory(),
        writer: src.writer(),
        regions: src
            .ram_regions()
            .iter()
            .map(|r| (r.host_addr(), r.guest_addr(), r.len()))
            .collect(),
        pages: case.pages,
        writes: case.during_send.clone(),
        records: 0,
        fired: 0,
    };
    let stats =
        send_migration(&mut src, &mut out, opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut input = Connection::from_bytes(out.inner.into_bytes());
    let rstats = receive_migration(&mut dst, &mut input, &ReceiveOptions::default())
        .map_err(|e| TestCaseError::fail(format!("{e}: {:?}", std::error::Error::source(&e))))?;

    prop_assert_eq!(
        src.first_difference(&dst),
        None,
        "destination differs from source"
    );
    prop_assert_eq!(&dst.states, &src.states);
    prop_assert_eq!(stats.zero_elision, case.elide);
    prop_assert_eq!(rstats.reset, case.dirty_destination);
    for p in &stats.passes {
        prop_assert_eq!(p.pages_scanned, p.pages_sent + p.zero_elided + p.zero_sent);
        prop_assert!(p.untouched_skipped <= p.zero_elided + p.zero_sent);
        if p.kind != PassKind::Bulk || !case.elide {
            prop_assert_eq!(p.zero_elided, 0);
        }
        if !case.pagemap {
            prop_assert_eq!(p.untouched_skipped, 0);
        }
    }
    prop_assert_eq!(stats.passes[0].pages_scanned as usize, case.init.len());
    prop_assert_eq!(stats.passes.last().map(|p| p.kind), Some(PassKind::Final));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn destination_equals_source(case in case_strategy()) {
        run_case(&case)?;
    }
}

/// Exact accounting on a known image: untouched pages are found without reading (pagemap),
/// written-zero pages are read and found zero; all are elided into a pristine destination.
#[test]
fn bulk_pass_accounting() {
    let pages = (16, 16);
    let mut init = vec![Init::Untouched; 32];
    init[1] = Init::Data(7);
    init[2] = Init::WrittenZero;
    init[20] = Init::Data(9);
    let case = Case {
        pages,
        init,
        during_scan: vec![],
        between: vec![],
        during_send: vec![],
        dirty_log: FakeDirtyLog::InitiallySet,
        elide: true,
        pagemap: true,
        batch_pages: 1024,
        max_passes: 3,
        dirty_destination: false,
    };
    let mut src = source_vm(&case);
    let mut out = Connection::memory();
    let stats = send_migration(&mut src, &mut out, SendOptions::default()).unwrap();
    let bulk = &stats.passes[0];
    assert_eq!(bulk.pages_sent, 2);
    assert_eq!(bulk.zero_elided, 30);
    assert_eq!(bulk.zero_sent, 0);
    if crate::pagemap::Pagemap::open().is_some() {
        assert_eq!(
            bulk.untouched_skipped, 29,
            "all but the written-zero page known without reading"
        );
    }
    // Nothing was dirtied: bulk + final, and the stream holds 2 data pages plus small records.
    assert_eq!(stats.passes.len(), 2);
    assert!(
        stats.totals.bytes < 2 * PAGE_SIZE as u64 + 600,
        "{}",
        stats.totals.bytes
    );

    let mut dst = fake_target(&layout(pages));
    receive_migration(
        &mut dst,
        &mut Connection::from_bytes(out.into_bytes()),
        &ReceiveOptions::default(),
    )
    .unwrap();
    assert_eq!(src.first_difference(&dst), None);
}

/// Without elision the bulk pass sends every zero page as a zero record (no data) and the
/// stream stays small.
#[test]
fn no_elision_sends_zero_records_without_data() {
    let mut src = FakeVm::new(&[(0, 256 * PAGE_SIZE)]);
    src.writer().fill(0x3000, 10, 1);
    let mut out = Connection::memory();
    let opts = SendOptions {
        zero_elision: false,
        ..Default::default()
    };
    let stats = send_migration(&mut src, &mut out, opts).unwrap();
    assert_eq!(stats.passes[0].zero_sent, 255);
    assert_eq!(stats.passes[0].pages_sent, 1);
    assert!(
        stats.totals.bytes < PAGE_SIZE as u64 + 600,
        "{}",
        stats.totals.bytes
    );
}

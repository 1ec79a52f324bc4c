//! Bad input on the destination: every truncation point of a valid stream, thousands of
//! random byte flips, random garbage, and hand-made streams with valid checksums but wrong
//! content. Each must give a typed error naming the offset: never a panic, a hang, a resumed
//! guest, or a write outside guest memory (the fake's RAM has inaccessible guard pages on both
//! sides, so a stray write would crash the test).

use std::time::Duration;

use migration::error_chain;
use migration::fake::{fake_target, FakeVm};
use migration::ram_recv::RamLoadError;
use migration::records::{
    encode_batch_prefix, encode_layout, EndRecord, LayoutRegion, PassBegin, PassMark, RunDesc,
};
use migration::stream::RecordWriter;
use migration::wire::{RecordKind, PASS_FINAL, PASS_ZERO_ELIDED};
use migration::{
    receive_migration, send_migration, Connection, DestinationError, Limits, MigrationSource,
    ReceiveOptions, SendOptions, StateBlob, WireError, PAGE_SIZE,
};

const LAYOUT: &[(u64, usize)] = &[(0, 16 * PAGE_SIZE), (0x10_0000, 8 * PAGE_SIZE)];

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// A valid stream with a bulk pass, a final pass (with a page turned back to zero and one
/// turned non-zero after the bulk pass) and two device states.
fn valid_stream() -> Vec<u8> {
    valid_stream_and_source().0
}

/// [`valid_stream`] and the source it came from (paused, its memory as the stream ends).
fn valid_stream_and_source() -> (Vec<u8>, FakeVm) {
    let mut src = FakeVm::new(LAYOUT);
    src.states = vec![
        StateBlob {
            id: "vcpu0".into(),
            version: 1,
            data: vec![9; 100],
        },
        StateBlob {
            id: "pit".into(),
            version: 1,
            data: vec![1],
        },
    ];
    let w = src.writer();
    w.fill(0x1000, 10, 0x11);
    w.fill(0x3000, PAGE_SIZE, 0x22);
    w.fill(0x10_2000, 5, 0x33);
    src.between_passes = Some(Box::new(|w, p| {
        if p.pass == 0 {
            w.fill(0x1000, PAGE_SIZE, 0);
            w.fill(0x5000, 3, 0x44);
        }
    }));
    let opts = SendOptions {
        limits: Limits {
            downtime: Duration::ZERO,
            max_passes: 2,
            ..Limits::default()
        },
        batch_pages: 2,
        ..Default::default()
    };
    let mut out = Connection::memory();
    let stats = send_migration(&mut src, &mut out, opts).unwrap();
    assert_eq!(stats.passes.len(), 2);
    assert_eq!(
        (stats.passes[1].zero_sent, stats.passes[1].pages_sent),
        (1, 1)
    );
    (out.into_bytes(), src)
}

fn load(target: &mut FakeVm, bytes: &[u8]) -> Result<(), DestinationError> {
    target.running = false;
    let mut conn = Connection::from_bytes(bytes.to_vec());
    receive_migration(target, &mut conn, &ReceiveOptions::default()).map(|_| ())
}

fn assert_not_resumed(target: &FakeVm) {
    assert!(!target.running);
    assert!(!target.calls.contains(&"restore_state") && !target.calls.contains(&"resume"));
}

#[test]
fn valid_stream_loads() {
    let mut target = fake_target(LAYOUT);
    load(&mut target, &valid_stream()).unwrap();
    assert!(target.running);
    assert_eq!(target.states.len(), 2);
}

#[test]
fn every_truncation_point_is_an_error() {
    let bytes = valid_stream();
    let mut target = fake_target(LAYOUT);
    for len in 0..bytes.len() {
        let err = load(&mut target, &bytes[..len]).unwrap_err();
        let text = error_chain(&err);
        assert!(text.contains("truncated"), "cut at {len}: {text}");
        assert!(
            text.contains(&format!("offset {len}")),
            "cut at {len}: {text}"
        );
        assert_not_resumed(&target);
    }
    load(&mut target, &bytes).unwrap();
}

/// A flipped byte is an error, except in the data of a live pass's page that a later pass
/// sends again (there it looks like a page the guest tore: the page is held torn until the
/// later copy arrives intact). Either way no flipped byte ever ends up in the guest.
#[test]
fn random_byte_flips_are_errors_or_resent() {
    let (bytes, src) = valid_stream_and_source();
    let mut rng = Lcg(42);
    let mut accepted = 0;
    for i in 0..4000 {
        let mut bad = bytes.clone();
        let pos = rng.next() as usize % bad.len();
        bad[pos] ^= (rng.next() % 255 + 1) as u8;
        if i % 4 == 0 {
            // A second flip somewhere else.
            let pos2 = rng.next() as usize % bad.len();
            bad[pos2] ^= (rng.next() % 255 + 1) as u8;
        }
        let mut target = fake_target(LAYOUT);
        if load(&mut target, &bad).is_ok() {
            accepted += 1;
            assert_eq!(
                src.first_difference(&target),
                None,
                "flip at {pos} was accepted and kept"
            );
        } else {
            assert_not_resumed(&target);
        }
    }
    // Page 0x1000 goes in the bulk pass and again (as zero) in the final one: flips in its
    // bulk-pass data (a tenth of the stream) are resent, not fatal.
    assert!(accepted > 0, "no flip landed in a resent page");
}

/// A flip in the data of a live-pass page that no later pass sends again stays torn: the
/// stream is refused at `End`, naming the page.
#[test]
fn a_torn_page_never_resent_is_refused_at_the_end() {
    let (bytes, _) = valid_stream_and_source();
    // Page 0x3000 is sent once, in the bulk pass, filled with 0x22.
    let pos = bytes
        .windows(PAGE_SIZE)
        .position(|w| w.iter().all(|&b| b == 0x22))
        .expect("the page's data is in the stream");
    let mut bad = bytes;
    bad[pos + 100] ^= 1;
    let err = expect_err(bad, |e| {
        matches!(
            e,
            DestinationError::Ram(RamLoadError::TornLeft {
                pages: 1,
                guest_addr: 0x3000
            })
        )
    });
    assert!(
        error_chain(&err).contains("corrupt"),
        "{}",
        error_chain(&err)
    );
}

#[test]
fn garbage_is_an_error() {
    let bytes = valid_stream();
    let mut target = fake_target(LAYOUT);
    let mut rng = Lcg(5);
    for _ in 0..500 {
        // A valid prefix, then garbage.
        let cut = rng.next() as usize % bytes.len();
        let mut bad = bytes[..cut].to_vec();
        let n = rng.next() as usize % 5000;
        bad.extend((0..n).map(|_| rng.next() as u8));
        assert!(load(&mut target, &bad).is_err());
        assert_not_resumed(&target);
    }
}

/// Builds streams record by record with valid checksums.
struct Craft {
    conn: Connection,
}

impl Craft {
    fn new() -> Craft {
        let config = FakeVm::new(LAYOUT).config_blob().unwrap();
        let mut c = Craft {
            conn: Connection::memory(),
        };
        {
            let mut w = RecordWriter::start(&mut c.conn).unwrap();
            w.write_record(RecordKind::Config, &[&config]).unwrap();
            let layout: Vec<LayoutRegion> = LAYOUT
                .iter()
                .map(|&(a, l)| LayoutRegion {
                    guest_addr: a,
                    size: l as u64,
                })
                .collect();
            w.write_record(RecordKind::MemoryLayout, &[&encode_layout(&layout)])
                .unwrap();
        }
        c
    }

    fn record(self, kind: RecordKind, payload: &[u8]) -> Craft {
        let crc = crc32c::crc32c(payload);
        self.record_crc(kind, payload, crc)
    }

    /// A record whose header carries checksum `crc` (a `RamPages` header's covers the head).
    fn record_crc(mut self, kind: RecordKind, payload: &[u8], crc: u32) -> Craft {
        // A fresh writer per record: headers and checksums are right, the End chain is not
        // used by these streams.
        let mut scratch = Connection::memory();
        RecordWriter::start(&mut scratch)
            .unwrap()
            .write_record_with_crc(kind, &[payload], crc)
            .unwrap();
        let bytes = scratch.into_bytes();
        migration::Transport::send(&mut self.conn, &[&bytes[16..]]).unwrap();
        self
    }

    fn pass(self, pass: u32, flags: u32) -> Craft {
        self.record(RecordKind::PassBegin, &PassBegin { pass, flags }.encode())
    }

    /// A `RamPages` record announcing `data_pages` data pages (of 0x77 bytes, with right
    /// checksums), whatever the runs hold.
    fn pages(self, runs: &[RunDesc], data_pages: u32) -> Craft {
        let page = [0x77u8; PAGE_SIZE];
        let mut p = Vec::new();
        encode_batch_prefix(runs.len() as u32, data_pages, &mut p);
        for r in runs {
            r.encode_into(&mut p);
        }
        for _ in 0..data_pages {
            p.extend_from_slice(&crc32c::crc32c(&page).to_le_bytes());
        }
        let crc = crc32c::crc32c(&p);
        for _ in 0..data_pages {
            p.extend_from_slice(&page);
        }
        self.record_crc(RecordKind::RamPages, &p, crc)
    }

    fn bytes(self) -> Vec<u8> {
        self.conn.into_bytes()
    }
}

fn run(guest_addr: u64, pages: u32, zero: bool) -> RunDesc {
    RunDesc {
        guest_addr,
        pages,
        zero,
    }
}

fn expect_err(bytes: Vec<u8>, check: impl Fn(&DestinationError) -> bool) -> DestinationError {
    let mut target = fake_target(LAYOUT);
    let err = load(&mut target, &bytes).unwrap_err();
    assert!(check(&err), "unexpected error: {}", error_chain(&err));
    assert_not_resumed(&target);
    err
}

#[test]
fn crafted_streams_get_typed_errors() {
    // Header: 16 bytes; Config and MemoryLayout follow, so the first crafted record starts at:
    let first = Craft::new().bytes().len() as u64;

    // Another version (with a correct header checksum): version 1, from before the commit
    // step, and a future one.
    for version in [1u8, 3] {
        let mut other = Craft::new().bytes();
        other[8] = version;
        let crc = crc32c::crc32c(&other[..12]);
        other[12..16].copy_from_slice(&crc.to_le_bytes());
        expect_err(other, |e| {
            matches!(
                e,
                DestinationError::Wire(WireError::UnsupportedVersion { version: v, .. })
                    if *v == u32::from(version)
            )
        });
    }

    // Unknown record kind.
    let mut unknown = Craft::new().pass(0, 0).bytes();
    let at = first as usize;
    unknown[at] = 0x55;
    let crc = crc32c::crc32c(&unknown[at..at + 12]);
    unknown[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
    expect_err(
        unknown,
        |e| matches!(e, DestinationError::Wire(WireError::UnknownKind { offset, kind: 0x55 }) if *offset == first),
    );

    // Pages before any pass; passes out of order; elision outside the bulk pass.
    expect_err(
        Craft::new().pages(&[run(0, 1, true)], 0).bytes(),
        |e| matches!(e, DestinationError::Unexpected { kind: RecordKind::RamPages, offset, .. } if *offset == first),
    );
    expect_err(Craft::new().pass(1, 0).bytes(), |e| {
        matches!(
            e,
            DestinationError::PassOrder {
                found: 1,
                expected: 0,
                ..
            }
        )
    });
    expect_err(
        Craft::new().pass(0, 0).pass(1, PASS_ZERO_ELIDED).bytes(),
        |e| matches!(e, DestinationError::LateElision { pass: 1, .. }),
    );

    // A pass end naming another pass, pages after a pass ended, a pass end outside a pass.
    let end = |pass: u32| PassMark { pass }.encode();
    expect_err(
        Craft::new()
            .pass(0, 0)
            .record(RecordKind::PassEnd, &end(1))
            .bytes(),
        |e| {
            matches!(
                e,
                DestinationError::PassOrder {
                    found: 1,
                    expected: 0,
                    ..
                }
            )
        },
    );
    expect_err(
        Craft::new()
            .pass(0, 0)
            .record(RecordKind::PassEnd, &end(0))
            .pages(&[run(0, 1, true)], 0)
            .bytes(),
        |e| {
            matches!(
                e,
                DestinationError::Unexpected {
                    kind: RecordKind::RamPages,
                    ..
                }
            )
        },
    );
    expect_err(
        Craft::new().record(RecordKind::PassEnd, &end(0)).bytes(),
        |e| matches!(e, DestinationError::Unexpected { kind: RecordKind::PassEnd, offset, .. } if *offset == first),
    );
    // The source's Abort ends the stream wherever it comes, with its reason (invalid UTF-8
    // shown replaced, not refused), before a pass and in the middle of one.
    let err = expect_err(
        Craft::new()
            .record(RecordKind::Abort, b"cancelled \xff")
            .bytes(),
        |e| matches!(e, DestinationError::Aborted(_)),
    );
    assert_eq!(
        err.to_string(),
        "The source gave the migration up: cancelled \u{fffd}"
    );
    expect_err(
        Craft::new()
            .pass(0, 0)
            .pages(&[run(0, 1, false)], 1)
            .record(RecordKind::Abort, b"stop")
            .pass(1, 0)
            .bytes(),
        |e| matches!(e, DestinationError::Aborted(r) if r == "stop"),
    );

    // Runs outside memory (in the hole between regions, past the end, wrapping), misaligned,
    // overlapping, empty, and a data count that does not match.
    let bad_runs: Vec<(Vec<RunDesc>, u32, &str)> = vec![
        (vec![run(0x10_000, 1, true)], 0, "outside"),
        (vec![run(0xf000, 2, false)], 2, "outside"),
        (vec![run(0x10_7000, 2, true)], 0, "outside"),
        (vec![run(!0xfff, 2, true)], 0, "outside"),
        (vec![run(0x1010, 1, false)], 1, "not page-aligned"),
        (
            vec![run(0x2000, 2, false), run(0x3000, 1, true)],
            2,
            "overlaps",
        ),
        (vec![run(0x2000, 0, true)], 0, "no pages"),
    ];
    let batch_at = first + 16 + 8;
    for (runs, data, what) in bad_runs {
        let err = expect_err(Craft::new().pass(0, 0).pages(&runs, data).bytes(), |e| {
            matches!(e, DestinationError::Ram(_))
        });
        let text = error_chain(&err);
        assert!(
            text.contains(what) && text.contains(&format!("offset {batch_at}")),
            "{text}"
        );
    }
    expect_err(
        Craft::new()
            .pass(0, 0)
            .pages(&[run(0, 1, false)], 2)
            .bytes(),
        |e| {
            matches!(
                e,
                DestinationError::Ram(RamLoadError::DataPages {
                    announced: 2,
                    found: 1,
                    ..
                })
            )
        },
    );

    // Oversized: a batch claiming more data pages than allowed is refused from its prefix.
    let mut big = Vec::new();
    encode_batch_prefix(1, 1025, &mut big);
    expect_err(
        Craft::new()
            .pass(0, 0)
            .record(RecordKind::RamPages, &big)
            .bytes(),
        |e| error_chain(e).contains("limit is 1024"),
    );

    // Device state before the final pass; duplicate device state; End with wrong counts.
    let state = |id: &str| {
        let s = StateBlob {
            id: id.into(),
            version: 1,
            data: vec![1],
        };
        let mut p = s.encode_head();
        p.extend_from_slice(&s.data);
        p
    };
    expect_err(
        Craft::new()
            .pass(0, 0)
            .record(RecordKind::DeviceState, &state("a"))
            .bytes(),
        |e| {
            matches!(
                e,
                DestinationError::Unexpected {
                    kind: RecordKind::DeviceState,
                    ..
                }
            )
        },
    );
    let dup = Craft::new()
        .pass(0, PASS_FINAL)
        .record(RecordKind::DeviceState, &state("a"))
        .record(RecordKind::DeviceState, &state("a"))
        .bytes();
    expect_err(dup, |e| {
        matches!(e, DestinationError::DuplicateState { .. })
    });
    let end = EndRecord {
        records: 99,
        bytes: 0,
        chain_crc: 0,
    };
    let bad_end = Craft::new()
        .pass(0, PASS_FINAL)
        .record(RecordKind::End, &end.encode())
        .bytes();
    expect_err(bad_end, |e| error_chain(e).contains("99 records announced"));

    // A stream that ends after the final pass without End.
    expect_err(Craft::new().pass(0, PASS_FINAL).bytes(), |e| {
        error_chain(e).contains("truncated")
    });
}

#[test]
fn layout_and_config_mismatch_are_refused() {
    let bytes = valid_stream();
    let mut other = fake_target(&[(0, 16 * PAGE_SIZE), (0x20_0000, 8 * PAGE_SIZE)]);
    let err = load(&mut other, &bytes).unwrap_err();
    assert!(
        matches!(err, DestinationError::Config(_)),
        "{}",
        error_chain(&err)
    );
    assert_not_resumed(&other);
}

#[test]
fn eliding_stream_into_written_memory_without_reset_is_refused() {
    let bytes = valid_stream();
    let mut target = fake_target(LAYOUT);
    target.writer().fill(0x4000, 8, 0xff);
    let mut conn = Connection::from_bytes(bytes.clone());
    let opts = ReceiveOptions {
        reset_if_not_pristine: false,
        ..Default::default()
    };
    let err = receive_migration(&mut target, &mut conn, &opts).unwrap_err();
    assert!(matches!(
        err,
        DestinationError::Ram(RamLoadError::ElisionIntoDirtyMemory { .. })
    ));
    assert_not_resumed(&target);
    // With the default (reset first) the same stream loads and the stray bytes are gone.
    load(&mut target, &bytes).unwrap();
    let mut b = [0u8; 8];
    target.writer().read(0x4000, &mut b);
    assert_eq!(b, [0; 8]);
}

/// A `PassEnd` naming the largest pass number: refused as out of order, no overflow (a
/// panic in builds with overflow checks, as tests and fuzzing have).
#[test]
fn pass_numbers_do_not_overflow() {
    let end = PassMark { pass: u32::MAX }.encode();
    expect_err(
        Craft::new()
            .pass(0, 0)
            .record(RecordKind::PassEnd, &end)
            .bytes(),
        |e| {
            matches!(
                e,
                DestinationError::PassOrder {
                    found: u32::MAX,
                    expected: 0,
                    ..
                }
            )
        },
    );
}

fn state_record(id: &str, len: usize) -> Vec<u8> {
    let s = StateBlob {
        id: id.into(),
        version: 1,
        data: vec![1; len],
    };
    let mut p = s.encode_head();
    p.extend_from_slice(&s.data);
    p
}

/// Device states are checked as they arrive, not after `End`: an id the target does not
/// restore, one record too many, or one byte too many in all ends the stream there (these
/// streams have no `End` at all: the error is not "truncated").
#[test]
fn device_states_are_bounded_on_arrival() {
    let mut target = fake_target(LAYOUT);
    target.known_states = Some(vec!["vcpu0".into(), "pit".into()]);
    let unknown = Craft::new()
        .pass(0, PASS_FINAL)
        .record(RecordKind::DeviceState, &state_record("vcpu0", 10))
        .record(RecordKind::DeviceState, &state_record("vcpu7", 10))
        .bytes();
    let err = load(&mut target, &unknown).unwrap_err();
    assert!(
        matches!(&err, DestinationError::UnknownState { id, .. } if id == "vcpu7"),
        "{}",
        error_chain(&err)
    );
    assert_not_resumed(&target);
    // The valid stream's ids are known: it still loads.
    load(&mut target, &valid_stream()).unwrap();

    let mut many = Craft::new().pass(0, PASS_FINAL);
    for i in 0..=migration::wire::MAX_DEVICE_STATES {
        many = many.record(RecordKind::DeviceState, &state_record(&format!("s{i}"), 1));
    }
    let err = expect_err(many.bytes(), |e| {
        matches!(e, DestinationError::TooManyStates { .. })
    });
    assert!(error_chain(&err).contains("limit is 1024 records"));

    // Each record within its own cap, together past the total.
    let big = migration::wire::MAX_STATE_LEN - 64;
    let mut large = Craft::new().pass(0, PASS_FINAL);
    for i in 0..=migration::wire::MAX_DEVICE_STATE_BYTES / big {
        large = large.record(
            RecordKind::DeviceState,
            &state_record(&format!("s{i}"), big),
        );
    }
    let err = expect_err(large.bytes(), |e| {
        matches!(e, DestinationError::StatesTooLarge { .. })
    });
    assert!(
        error_chain(&err).contains(&format!("limit is {}", 64 << 20)),
        "{}",
        error_chain(&err)
    );
}

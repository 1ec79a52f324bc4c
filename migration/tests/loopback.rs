//! Whole migrations between two fake VMs over real sockets (socketpair, unix, tcp) and a real
//! snapshot file: round trips with a concurrently writing guest, the pristine handshake,
//! failures on either side, a destination killed mid-stream and the retry that follows.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::thread;
use std::time::Duration;

use migration::fake::{fake_target, FailAt, FakeVm, GuestWriter};
use migration::fault::{Fault, FaultAction, FaultPoint, Faults};
use migration::send::{DeadlineAction, MigrationDeadline};
use migration::{
    receive_migration, send_migration, Cancel, Connection, DestinationError, Endpoint, Limits,
    MigrationStats, ReceiveOptions, ReceiveStats, SendOptions, SourceError, StateBlob, Transport,
    PAGE_SIZE,
};

const LAYOUT: &[(u64, usize)] = &[(0, 2 << 20), (0x1_0000_0000, 1 << 20)];

fn states() -> Vec<StateBlob> {
    vec![
        StateBlob {
            id: "vcpu0".into(),
            version: 1,
            data: (0..200u8).collect(),
        },
        StateBlob {
            id: "pic".into(),
            version: 2,
            data: vec![],
        },
    ]
}

/// Deterministic pseudo-random numbers.
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

/// A page of the layout, by global index.
fn page_gpa(layout: &[(u64, usize)], mut page: usize) -> u64 {
    for &(start, len) in layout {
        let pages = len / PAGE_SIZE;
        if page < pages {
            return start + (page * PAGE_SIZE) as u64;
        }
        page -= pages;
    }
    panic!("page beyond layout");
}

fn total_pages(layout: &[(u64, usize)]) -> usize {
    layout.iter().map(|&(_, l)| l / PAGE_SIZE).sum()
}

/// Random writes, a quarter of them zeroing whole pages.
fn scribble(w: &GuestWriter, layout: &[(u64, usize)], rng: &mut Lcg, writes: usize) {
    for _ in 0..writes {
        let gpa = page_gpa(layout, rng.next() as usize % total_pages(layout));
        if rng.next().is_multiple_of(4) {
            w.fill(gpa, PAGE_SIZE, 0);
        } else {
            let off = rng.next() as usize % (PAGE_SIZE - 8);
            w.write(gpa + off as u64, &rng.next().to_le_bytes());
        }
    }
}

/// One armed fault.
fn fault(point: FaultPoint, action: FaultAction) -> Faults {
    Faults::new(Some(Fault { point, action }))
}

fn source() -> FakeVm {
    let mut vm = FakeVm::new(LAYOUT);
    vm.states = states();
    scribble(&vm.writer(), LAYOUT, &mut Lcg(1), 300);
    vm
}

type Outcome = (
    Result<MigrationStats, SourceError>,
    Result<ReceiveStats, DestinationError>,
    FakeVm,
);

/// Runs the destination on a thread over one end of `pair`, the source here.
fn migrate(src: &mut FakeVm, dst: FakeVm, opts: SendOptions, ropts: ReceiveOptions) -> Outcome {
    let (mut a, b) = Connection::pair().unwrap();
    migrate_over(src, &mut a, dst, b, opts, ropts)
}

fn migrate_over<T: Transport + Send + 'static>(
    src: &mut FakeVm,
    a: &mut Connection,
    mut dst: FakeVm,
    mut b: T,
    opts: SendOptions,
    ropts: ReceiveOptions,
) -> Outcome {
    let dest = thread::spawn(move || {
        let r = receive_migration(&mut dst, &mut b, &ropts);
        (r, dst)
    });
    let s = send_migration(src, a, opts);
    a.shutdown();
    let (r, dst) = dest.join().unwrap();
    (s, r, dst)
}

/// Starts the source's guest: 16 random page writes every 200 us, seeded with `seed`.
fn keep_writing(src: &mut FakeVm, seed: u64) {
    let mut rng = Lcg(seed);
    src.run_guest(move |w| {
        scribble(w, LAYOUT, &mut rng, 16);
        thread::sleep(Duration::from_micros(200));
    });
}

fn assert_source_recovered(src: &FakeVm) {
    assert!(src.running, "source guest must run again");
    assert!(!src.paused);
    assert!(!src.logging(), "dirty logging must be off");
}

#[test]
fn live_round_trip_with_concurrent_guest() {
    let mut src = source();
    keep_writing(&mut src, 7);
    // The writer thread may be starved on a loaded machine: a few writes between passes too,
    // so that every pass leaves something dirty and pre-copy runs its five passes.
    let mut rng = Lcg(70);
    src.between_passes = Some(Box::new(move |w, _| scribble(w, LAYOUT, &mut rng, 8)));
    let mut progress = Vec::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let opts = SendOptions {
        // Only a pass that leaves nothing dirty converges: whether a few dirty pages fit a
        // small limit depends on how fast this machine streamed the bulk pass.
        limits: Limits {
            downtime: Duration::ZERO,
            max_passes: 5,
            ..Limits::default()
        },
        batch_pages: 64,
        progress: Some(Box::new(move |p| {
            let _ = tx.send(p.clone());
        })),
        ..Default::default()
    };
    let ropts = ReceiveOptions::default();
    let received = ropts.progress.clone();
    assert_eq!((received.pass(), received.bytes()), (None, 0));
    let (s, r, dst) = migrate(&mut src, fake_target(LAYOUT), opts, ropts);
    let stats = s.unwrap();
    let rstats = r.unwrap();
    progress.extend(rx.try_iter());
    // The destination's progress, as a status request would read it, went to the end.
    assert_eq!(received.pass(), Some(stats.passes.len() as u32 - 1));
    assert!(
        received.bytes() + 64 >= stats.totals.bytes,
        "{}",
        received.bytes()
    );

    assert_eq!(src.first_difference(&dst), None);
    assert_eq!(dst.states, states());
    assert!(dst.running);
    assert_eq!(dst.calls, ["validate_config", "restore_state", "resume"]);
    // The source stays paused for the caller to stop; logging was on before anything else.
    assert!(src.paused && !src.running);
    assert_eq!(src.calls.first(), Some(&"start_dirty_log"));
    assert!(!src.calls.contains(&"resume"));
    assert!(!src.logging());
    assert!(stats.zero_elision);
    assert!(rstats.pristine && !rstats.reset);
    assert!(
        stats.passes.len() >= 3,
        "a busy guest needs iterative passes:\n{stats}"
    );
    assert_eq!(rstats.passes as usize, stats.passes.len());
    assert_eq!(
        rstats.passes_acknowledged as usize,
        stats.passes.len() - 1,
        "the source waits for every live pass to be applied before it goes on"
    );
    assert_eq!(progress.len(), stats.passes.len() - 1);
    let json: serde_json::Value = serde_json::from_str(&stats.to_json()).unwrap();
    assert_eq!(json["passes"].as_array().unwrap().len(), stats.passes.len());
}

#[test]
fn unix_and_tcp_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let unix = format!("unix:{}", dir.path().join("m.sock").display());
    for uri in [unix.as_str(), "tcp:127.0.0.1:0"] {
        let mut listener = Endpoint::parse(uri).unwrap().listen().unwrap();
        let endpoint = listener.local_endpoint().unwrap();
        let dest = thread::spawn(move || {
            let mut conn = listener.accept().unwrap();
            let mut dst = fake_target(LAYOUT);
            let r = receive_migration(&mut dst, &mut conn, &ReceiveOptions::default());
            (r, dst)
        });
        let mut src = source();
        let mut conn = endpoint.connect(Duration::from_secs(5)).unwrap();
        let stats = send_migration(&mut src, &mut conn, SendOptions::default()).unwrap();
        let (r, dst) = dest.join().unwrap();
        r.unwrap();
        assert_eq!(src.first_difference(&dst), None, "{uri}");
        assert!(stats.zero_elision);
    }
}

#[test]
fn snapshot_file_is_sparse_and_restores() {
    let layout = &[(0, 256 << 20), (0x1_0000_0000, 64 << 20)];
    let mut src = FakeVm::new(layout);
    src.states = states();
    scribble(&src.writer(), layout, &mut Lcg(3), 1000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let endpoint = Endpoint::parse(&format!("file:{}", path.display())).unwrap();
    let mut conn = endpoint.connect(Duration::from_secs(5)).unwrap();
    let stats = send_migration(&mut src, &mut conn, SendOptions::default()).unwrap();
    drop(conn);

    // About 1000 written pages: the file holds their data and little else, not 320 MiB.
    let meta = std::fs::metadata(&path).unwrap();
    let data = stats.totals.pages_sent * PAGE_SIZE as u64;
    assert!(
        meta.len() < data + data / 20 + 64 * 1024,
        "file {} bytes for {data}",
        meta.len()
    );
    assert!(meta.blocks() * 512 < data + data / 10 + 256 * 1024);
    assert_eq!(
        stats.passes[0].pages_sent + stats.passes[0].zero_elided,
        (320 << 20) / 4096
    );

    // Restore into a fresh VM.
    let mut dst = fake_target(layout);
    let mut conn = endpoint.listen().unwrap().accept().unwrap();
    assert!(!conn.has_peer());
    receive_migration(&mut dst, &mut conn, &ReceiveOptions::default()).unwrap();
    assert_eq!(src.first_difference(&dst), None);
    assert_eq!(dst.states, states());

    // Into memory the destination wrote itself: refused unless it may reset first.
    let mut dirty = fake_target(layout);
    dirty.writer().fill(0x1000, 100, 0xee);
    let no_reset = ReceiveOptions {
        reset_if_not_pristine: false,
        ..Default::default()
    };
    let mut conn = endpoint.listen().unwrap().accept().unwrap();
    let err = receive_migration(&mut dirty, &mut conn, &no_reset).unwrap_err();
    assert!(
        matches!(
            err,
            DestinationError::Ram(migration::ram_recv::RamLoadError::ElisionIntoDirtyMemory { .. })
        ),
        "{err}"
    );
    assert!(!dirty.calls.contains(&"resume"));
    let mut conn = endpoint.listen().unwrap().accept().unwrap();
    let r = receive_migration(&mut dirty, &mut conn, &ReceiveOptions::default()).unwrap();
    assert!(r.reset);
    assert_eq!(src.first_difference(&dirty), None);
}

#[test]
fn handshake_disables_elision_into_written_memory() {
    // The destination loaded "firmware" into guest memory and may not reset: it says so, the
    // source sends every page (zero pages as zero records) and the result is still exact.
    let mut src = source();
    let dst = fake_target(LAYOUT);
    dst.writer().fill(0x8000, 4 * PAGE_SIZE, 0x90);
    let ropts = ReceiveOptions {
        reset_if_not_pristine: false,
        ..Default::default()
    };
    let (s, r, dst) = migrate(&mut src, dst, SendOptions::default(), ropts);
    let (stats, rstats) = (s.unwrap(), r.unwrap());
    assert!(!stats.zero_elision);
    assert!(!rstats.pristine);
    assert_eq!(stats.passes[0].zero_elided, 0);
    assert!(stats.passes[0].zero_sent > 0);
    assert!(rstats.zero_pages_freed >= 4, "firmware pages given back");
    assert_eq!(src.first_difference(&dst), None);

    // With reset allowed (the default) the destination resets and elision stays on.
    let mut src = source();
    let dst = fake_target(LAYOUT);
    dst.writer().fill(0x8000, 4 * PAGE_SIZE, 0x90);
    let (s, r, dst) = migrate(
        &mut src,
        dst,
        SendOptions::default(),
        ReceiveOptions::default(),
    );
    assert!(s.unwrap().zero_elision);
    assert!(r.unwrap().reset);
    assert_eq!(src.first_difference(&dst), None);

    // --no-zero-elision: every page goes out even into pristine memory.
    let mut src = source();
    let opts = SendOptions {
        zero_elision: false,
        ..Default::default()
    };
    let (s, _, dst) = migrate(
        &mut src,
        fake_target(LAYOUT),
        opts,
        ReceiveOptions::default(),
    );
    assert!(!s.unwrap().zero_elision);
    assert_eq!(src.first_difference(&dst), None);
}

/// A destination that dies: after `limit` received bytes, or when it is about to send the
/// reply of kind `before` (`Restored`, `Running`), it shuts the socket down and fails every
/// further call.
struct Killed {
    conn: Connection,
    received: usize,
    limit: usize,
    before: Option<u16>,
    dead: bool,
}

const RESTORED: u16 = 0x0105;
const RUNNING: u16 = 0x0102;

impl Killed {
    fn kill(&mut self) -> io::Error {
        self.dead = true;
        self.conn.shutdown();
        io::Error::new(io::ErrorKind::ConnectionAborted, "destination killed")
    }
}

impl Transport for Killed {
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let kind = parts
            .first()
            .filter(|h| h.len() >= 2)
            .map(|h| u16::from_le_bytes([h[0], h[1]]));
        if self.dead || (self.before.is_some() && kind == self.before) {
            return Err(self.kill());
        }
        self.conn.send(parts)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.dead || self.received >= self.limit {
            return Err(self.kill());
        }
        let n = buf.len().min(self.limit - self.received);
        let n = self.conn.recv(&mut buf[..n])?;
        self.received += n;
        Ok(n)
    }

    fn has_peer(&self) -> bool {
        true
    }
}

#[test]
fn destination_killed_mid_stream_then_retry_succeeds() {
    // (bytes the destination reads before dying, dies just before sending this reply)
    let cases = [
        (100, None),
        (40_000, None),
        (400_000, None),
        (usize::MAX, Some(RESTORED)),
    ];
    let mut any_written = false;
    for (limit, before) in cases {
        let mut src = source();
        let (mut a, b) = Connection::pair().unwrap();
        let killed = Killed {
            conn: b,
            received: 0,
            limit,
            before,
            dead: false,
        };
        let (s, r, dst) = migrate_over(
            &mut src,
            &mut a,
            fake_target(LAYOUT),
            killed,
            SendOptions::default(),
            ReceiveOptions::default(),
        );
        let err = s.unwrap_err();
        assert!(r.is_err(), "limit {limit}");
        assert!(
            !dst.running,
            "limit {limit}: the destination never runs without Go"
        );
        assert_source_recovered(&src);
        let paused = src.calls.contains(&"pause");
        assert_eq!(
            src.calls.contains(&"resume"),
            paused,
            "limit {limit}: {err}"
        );
        if !src.calls.is_empty() {
            let last = if paused { "resume" } else { "stop_dirty_log" };
            assert_eq!(src.calls.last(), Some(&last), "limit {limit}");
        }

        // Data reaches guest memory a piece (1 MiB) at a time; what was received before the
        // destination died may or may not have been placed, and is placed before it returns.
        let written = dst.image().iter().any(|&b| b != 0);
        any_written |= written;

        // The guest ran on; a second migration into the same, half-written destination works.
        scribble(&src.writer(), LAYOUT, &mut Lcg(limit as u64), 50);
        let mut dst = dst;
        dst.calls.clear();
        dst.running = false;
        let (s, r, dst) = migrate(
            &mut src,
            dst,
            SendOptions::default(),
            ReceiveOptions::default(),
        );
        let (stats, rstats) = (s.unwrap(), r.unwrap());
        assert_eq!(src.first_difference(&dst), None, "limit {limit}");
        assert!(stats.zero_elision);
        assert_eq!(
            rstats.reset, written,
            "memory written by the first attempt is reset"
        );
        assert_eq!(dst.states, states());
    }
    assert!(any_written, "no case left a half-written destination");
}

/// The partition at the handover: the destination restored, got `Go`, resumed, and its
/// `Running` never arrives. The source cannot know whether the guest runs there: it must not
/// resume it (two copies), and says the outcome is unknown.
#[test]
fn a_destination_lost_after_go_leaves_the_source_paused_and_says_so() {
    let mut src = source();
    let (mut a, b) = Connection::pair().unwrap();
    let killed = Killed {
        conn: b,
        received: 0,
        limit: usize::MAX,
        before: Some(RUNNING),
        dead: false,
    };
    let (s, r, dst) = migrate_over(
        &mut src,
        &mut a,
        fake_target(LAYOUT),
        killed,
        SendOptions {
            io_timeout: Duration::from_millis(500),
            ..SendOptions::default()
        },
        ReceiveOptions::default(),
    );
    let err = s.unwrap_err();
    assert!(err.is_outcome_unknown(), "{err}");
    assert!(err.to_string().contains("may be running there"), "{err}");
    r.expect("the destination committed and runs the guest");
    assert!(dst.running, "the guest runs at the destination");
    assert!(
        src.paused && !src.running && !src.calls.contains(&"resume"),
        "the source must not resume a guest that may run elsewhere: {:?}",
        src.calls
    );
    assert!(!src.logging());
}

/// The commit step's order: `Go` only after `Restored`. A destination whose `Restored` is
/// lost (its sends vanish from then on, nothing is closed) never gets `Go`, discards the
/// guest at its commit deadline, and the source resumes its own: exactly one copy. A source
/// that sent `Go` without waiting for `Restored` would have both sides run it, or none.
#[test]
fn restored_lost_means_no_go_and_the_source_keeps_the_guest() {
    let mut src = source();
    let ropts = ReceiveOptions {
        go_timeout: Duration::from_millis(300),
        faults: fault(FaultPoint::BeforeRestored, FaultAction::Silence),
        ..ReceiveOptions::default()
    };
    let opts = SendOptions {
        io_timeout: Duration::from_millis(600),
        ..SendOptions::default()
    };
    let (s, r, dst) = migrate(&mut src, fake_target(LAYOUT), opts, ropts);
    let err = s.unwrap_err();
    assert!(!err.is_outcome_unknown(), "{err}");
    assert!(matches!(r, Err(DestinationError::NoGo(..))), "{r:?}");
    assert!(!dst.running, "no Go, no guest at the destination");
    assert_source_recovered(&src);
}

/// `Go` is lost (the source's sends vanish after `Restored`): the destination discards the
/// guest at its deadline and says so; its `Error` still reaches the source, which then
/// knows the guest is not running there and resumes it.
#[test]
fn go_lost_the_destination_discards_and_the_source_resumes() {
    let mut src = source();
    let opts = SendOptions {
        io_timeout: Duration::from_secs(5),
        faults: fault(FaultPoint::BeforeGo, FaultAction::Silence),
        ..SendOptions::default()
    };
    let ropts = ReceiveOptions {
        go_timeout: Duration::from_millis(300),
        ..ReceiveOptions::default()
    };
    let (s, r, dst) = migrate(&mut src, fake_target(LAYOUT), opts, ropts);
    let err = s.unwrap_err();
    assert!(matches!(err, SourceError::FailedAfterCommit(_)), "{err}");
    assert!(matches!(r, Err(DestinationError::NoGo(..))), "{r:?}");
    assert!(!dst.running);
    assert_source_recovered(&src);
}

/// A source that stalls after `Restored` past half the destination's commit window does not
/// commit: the destination may already have given up. It resumes, and the destination,
/// which gets `Abort` (or nothing in time), discards.
#[test]
fn a_late_source_does_not_commit() {
    let mut src = source();
    let opts = SendOptions {
        faults: fault(
            FaultPoint::BeforeGo,
            FaultAction::Stall(Duration::from_millis(200)),
        ),
        ..SendOptions::default()
    };
    let ropts = ReceiveOptions {
        go_timeout: Duration::from_millis(300),
        ..ReceiveOptions::default()
    };
    let (s, r, dst) = migrate(&mut src, fake_target(LAYOUT), opts, ropts);
    let err = s.unwrap_err();
    assert!(matches!(err, SourceError::CommitWindow { .. }), "{err}");
    assert!(r.is_err(), "{r:?}");
    assert!(!dst.running);
    assert_source_recovered(&src);
}

/// A destination told to give up once `Go` arrived is too late: the guest is its own and
/// runs; one told before `Go` gives up and the source keeps the guest.
#[test]
fn giving_up_races_the_commit_and_exactly_one_side_wins() {
    // Given up after Go: too late.
    let progress = std::sync::Arc::new(migration::ReceiveProgress::default());
    let mut src = source();
    let ropts = ReceiveOptions {
        progress: progress.clone(),
        faults: fault(
            FaultPoint::BeforeRunning,
            FaultAction::Stall(Duration::from_millis(100)),
        ),
        ..ReceiveOptions::default()
    };
    let giver = {
        let progress = progress.clone();
        thread::spawn(move || {
            while !progress.committed() {
                thread::sleep(Duration::from_millis(1));
            }
            progress.give_up()
        })
    };
    let (s, r, dst) = migrate(&mut src, fake_target(LAYOUT), SendOptions::default(), ropts);
    assert!(!giver.join().unwrap(), "giving up after Go is refused");
    s.expect("the migration completed");
    r.expect("the destination runs the guest");
    assert!(dst.running && !src.running);

    // Given up before the migration reaches Go: the destination never runs it.
    let progress = std::sync::Arc::new(migration::ReceiveProgress::default());
    assert!(progress.give_up());
    let mut src = source();
    let ropts = ReceiveOptions {
        progress,
        ..ReceiveOptions::default()
    };
    let (s, r, dst) = migrate(&mut src, fake_target(LAYOUT), SendOptions::default(), ropts);
    assert!(s.is_err() && r.is_err());
    assert!(!dst.running);
    assert_source_recovered(&src);
}

/// The whole migration's deadline with action `cancel`: a migration that cannot finish in
/// time (a busy guest over a slow link) is given up, the destination told why, the guest
/// stays here.
#[test]
fn a_passed_deadline_cancels_and_the_source_keeps_the_guest() {
    let mut src = source();
    keep_writing(&mut src, 11);
    let opts = SendOptions {
        max_bandwidth: Some(2 << 20),
        batch_pages: 16,
        limits: Limits {
            downtime: Duration::ZERO,
            max_passes: 1000,
            ..Limits::default()
        },
        deadline: Some(MigrationDeadline {
            after: Duration::from_millis(300),
            action: DeadlineAction::Cancel,
        }),
        ..SendOptions::default()
    };
    let started = std::time::Instant::now();
    let (s, r, dst) = migrate(
        &mut src,
        fake_target(LAYOUT),
        opts,
        ReceiveOptions::default(),
    );
    let err = s.unwrap_err();
    assert!(matches!(err, SourceError::DeadlinePassed(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(&r, Err(DestinationError::Aborted(why)) if why.contains("deadline")),
        "{r:?}"
    );
    assert!(!dst.running);
    assert_source_recovered(&src);
}

/// The same deadline with action `switchover`: pre-copy stops after the pass in progress and
/// the rest goes in the final pass; the migration completes.
#[test]
fn a_passed_deadline_can_force_the_switchover() {
    let mut src = source();
    keep_writing(&mut src, 12);
    let opts = SendOptions {
        max_bandwidth: Some(8 << 20),
        limits: Limits {
            downtime: Duration::ZERO,
            max_passes: 1000,
            ..Limits::default()
        },
        deadline: Some(MigrationDeadline {
            after: Duration::from_millis(500),
            action: DeadlineAction::Switchover,
        }),
        ..SendOptions::default()
    };
    let (s, r, dst) = migrate(
        &mut src,
        fake_target(LAYOUT),
        opts,
        ReceiveOptions::default(),
    );
    let stats = s.expect("switched over");
    r.expect("the destination runs it");
    assert_eq!(
        stats.stop_reason,
        migration::StopReason::Deadline,
        "{stats}"
    );
    assert_eq!(src.first_difference(&dst), None);
    assert!(dst.running && !src.running);
}

/// The bandwidth limit throttles the live passes only: with the guest paused the final pass
/// goes as fast as the link allows.
#[test]
fn the_bandwidth_limit_does_not_lengthen_the_downtime() {
    let mut src = source();
    // After the bulk pass the guest rewrites every page: the final pass carries all of them.
    src.between_passes = Some(Box::new(|w, _| {
        for page in 0..total_pages(LAYOUT) {
            w.fill(page_gpa(LAYOUT, page), PAGE_SIZE, 0x5a);
        }
    }));
    let limit = 16 << 20;
    let opts = SendOptions {
        max_bandwidth: Some(limit),
        limits: Limits {
            downtime: Duration::ZERO,
            max_passes: 1,
            ..Limits::default()
        },
        ..SendOptions::default()
    };
    let (s, r, dst) = migrate(
        &mut src,
        fake_target(LAYOUT),
        opts,
        ReceiveOptions::default(),
    );
    let stats = s.unwrap();
    r.unwrap();
    assert_eq!(src.first_difference(&dst), None);
    let last = stats.passes.last().unwrap();
    let throttled = Duration::from_secs_f64(last.bytes as f64 / limit as f64);
    assert!(
        Duration::from_micros(last.duration_us) < throttled / 3,
        "final pass of {} bytes took {} us; at the limit it would take {throttled:?}",
        last.bytes,
        last.duration_us
    );
}

/// A source that sends valid records just fast enough for the per-operation timeouts (here:
/// throttled to 256 KiB/s, seconds for this guest) holds the destination no longer than
/// its overall deadline: the destination refuses, names the deadline, and the source keeps
/// its guest.
#[test]
fn a_trickling_source_meets_the_destinations_overall_deadline() {
    let mut src = source();
    let opts = SendOptions {
        max_bandwidth: Some(256 << 10),
        ..SendOptions::default()
    };
    let ropts = ReceiveOptions {
        deadline: Some(Duration::from_millis(400)),
        ..ReceiveOptions::default()
    };
    let (s, r, dst) = migrate(&mut src, fake_target(LAYOUT), opts, ropts);
    let err = r.expect_err("the destination's deadline passed mid-stream");
    let chain = migration::error_chain(&err);
    assert!(chain.contains("migration deadline passed"), "{chain}");
    let s = s.expect_err("the destination refused");
    assert!(!s.is_outcome_unknown(), "{s}");
    assert!(!dst.running, "the destination never ran the guest");
    assert_source_recovered(&src);
}

#[test]
fn config_rejected_before_the_guest_is_touched() {
    let mut src = source();
    let mut dst = fake_target(LAYOUT);
    dst.vcpus = 4;
    let (s, r, dst) = migrate(
        &mut src,
        dst,
        SendOptions::default(),
        ReceiveOptions::default(),
    );
    let err = s.unwrap_err();
    // The destination's reason arrives unless the socket closed under the source's write
    // first (a race under load); either way the source failed before reading guest memory.
    assert!(
        matches!(&err, SourceError::Destination(m) if m.contains("does not match"))
            || matches!(&err, SourceError::Send(_)),
        "{err}"
    );
    assert!(matches!(r, Err(DestinationError::Config(_))));
    // Dirty logging went on while the destination checked the configuration, and off again
    // (unless the socket closed before the source got that far).
    assert!(
        src.calls.is_empty() || src.calls == ["start_dirty_log", "stop_dirty_log"],
        "{:?}",
        src.calls
    );
    assert!(!src.logging());
    assert!(src.running);
    assert!(!dst.running);
}

#[test]
fn source_side_failures_leave_the_guest_running() {
    for fail in [
        FailAt::StartDirtyLog,
        FailAt::FetchDirtyLog,
        FailAt::Pause,
        FailAt::SaveState,
    ] {
        let mut src = source();
        src.fail_at = Some(fail);
        let (s, r, dst) = migrate(
            &mut src,
            fake_target(LAYOUT),
            SendOptions::default(),
            ReceiveOptions::default(),
        );
        assert!(s.is_err(), "{fail:?}");
        assert!(r.is_err(), "{fail:?}: destination must not complete");
        assert!(!dst.running && !dst.calls.contains(&"resume"), "{fail:?}");
        assert_source_recovered(&src);
        // A pause that failed may have stopped some vCPUs: it is followed by a resume.
        let paused = src.calls.contains(&"pause");
        assert_eq!(
            src.calls.last() == Some(&"resume"),
            paused,
            "{fail:?}: {:?}",
            src.calls
        );
    }
}

/// Once the destination runs the guest, nothing may resume the source's copy: not even a
/// failure to switch dirty logging off, which is no longer on the downtime path.
#[test]
fn after_the_destination_runs_the_source_stays_stopped() {
    let mut src = source();
    src.fail_at = Some(FailAt::StopDirtyLog);
    let (s, r, dst) = migrate(
        &mut src,
        fake_target(LAYOUT),
        SendOptions::default(),
        ReceiveOptions::default(),
    );
    let stats = s.expect("the migration completed");
    r.expect("the destination completed");
    assert!(dst.running);
    assert!(
        src.paused && !src.calls.contains(&"resume"),
        "{:?}",
        src.calls
    );
    let pos = |c| src.calls.iter().position(|x| *x == c);
    assert!(pos("stop_dirty_log") > pos("save_state"), "{:?}", src.calls);
    let phases: Vec<&str> = stats.downtime_phases_us.iter().map(|p| p.0).collect();
    assert_eq!(
        phases,
        [
            "pause",
            "dirty log",
            "final pass",
            "save state",
            "send state",
            "destination restore",
            "commit",
            "destination running"
        ]
    );
}

#[test]
fn destination_failures_are_reported_and_never_resume() {
    for fail in [FailAt::Restore, FailAt::Resume] {
        let mut src = source();
        let mut dst = fake_target(LAYOUT);
        dst.fail_at = Some(fail);
        let (s, r, dst) = migrate(
            &mut src,
            dst,
            SendOptions::default(),
            ReceiveOptions::default(),
        );
        let err = s.unwrap_err();
        // A restore that fails ends the migration before the commit; a start that fails
        // after it is reported as such (the destination then says the guest is not running).
        assert!(
            matches!(&err, SourceError::Destination(m) if m.contains("injected failure"))
                && fail == FailAt::Restore
                || matches!(&err, SourceError::FailedAfterCommit(m) if m.contains("injected failure"))
                    && fail == FailAt::Resume,
            "{fail:?}: {err}"
        );
        assert!(r.is_err());
        assert!(!dst.running);
        assert_source_recovered(&src);
        assert!(
            src.calls
                .ends_with(&["save_state", "stop_dirty_log", "resume"]),
            "{:?}",
            src.calls
        );
    }
}

#[test]
fn a_destination_acknowledging_the_wrong_pass_stops_the_migration() {
    use migration::records::{PassDone, PassMark, Ready};
    use migration::stream::{send_reply, RecordReader};
    use migration::wire::RecordKind;
    let mut src = source();
    let (mut a, mut b) = Connection::pair().unwrap();
    // A destination that answers Ready, reads up to the first PassEnd and acknowledges
    // another pass.
    let dest = thread::spawn(move || {
        let mut r = RecordReader::new(&mut b);
        r.read_stream_header().unwrap();
        let mut answered = false;
        loop {
            let Ok((h, off)) = r.next_header() else {
                return answered;
            };
            if h.kind == RecordKind::RamPages {
                // Its header checksum covers the head only: skip it unchecked.
                let mut skip = vec![0u8; h.len as usize];
                if r.read_exact(&mut skip, "pages").is_err() {
                    return answered;
                }
                continue;
            }
            let Ok(payload) = r.read_payload(&h, off) else {
                return answered;
            };
            let reply = match h.kind {
                RecordKind::MemoryLayout => (
                    RecordKind::Ready,
                    Ready {
                        version: migration::FORMAT_VERSION,
                        pristine: true,
                        local: false,
                    }
                    .encode()
                    .to_vec(),
                ),
                RecordKind::PassEnd => {
                    let m = PassMark::decode(&payload, off, h.kind).unwrap();
                    answered = true;
                    (
                        RecordKind::PassDone,
                        PassDone {
                            pass: m.pass + 7,
                            torn: vec![],
                            more: false,
                        }
                        .encode(),
                    )
                }
                _ => continue,
            };
            if send_reply(r.transport(), reply.0, &reply.1).is_err() {
                return answered;
            }
        }
    });
    let err = send_migration(&mut src, &mut a, SendOptions::default()).unwrap_err();
    drop(a);
    assert!(dest.join().unwrap(), "the fake destination saw a PassEnd");
    assert!(
        matches!(
            err,
            SourceError::PassMismatch {
                expected: 0,
                got: 7
            }
        ),
        "{err}"
    );
    assert_source_recovered(&src);
    assert!(
        !src.calls.contains(&"pause"),
        "never paused: {:?}",
        src.calls
    );
}

/// A cancelled migration ends with an `Abort` record: the destination names the reason and
/// never resumes, the source guest runs on. Cancelled before the first record (it fails in
/// the bulk pass) and from the progress callback after the bulk pass, with a busy guest.
#[test]
fn a_cancelled_migration_aborts_the_destination_and_keeps_the_source() {
    for during in [false, true] {
        let mut src = source();
        let cancel = Cancel::new();
        let mut opts = SendOptions {
            cancel: cancel.clone(),
            batch_pages: 64,
            ..Default::default()
        };
        if during {
            keep_writing(&mut src, 9);
            opts.limits = Limits {
                downtime: Duration::ZERO,
                max_passes: 1000,
                ..Limits::default()
            };
            // After the bulk pass, whatever the pre-copy decides next.
            let c = cancel.clone();
            opts.progress = Some(Box::new(move |_| c.cancel()));
        } else {
            cancel.cancel();
        }
        let (s, r, dst) = migrate(
            &mut src,
            fake_target(LAYOUT),
            opts,
            ReceiveOptions::default(),
        );
        assert!(matches!(s, Err(SourceError::Cancelled)), "{during}: {s:?}");
        match r {
            Err(DestinationError::Aborted(reason)) => {
                assert!(reason.contains("cancelled"), "{reason}")
            }
            other => panic!("{during}: the destination must name the abort: {other:?}"),
        }
        assert!(!dst.running && !dst.calls.contains(&"resume"), "{during}");
        assert_source_recovered(&src);
    }
}

/// A destination that gives up (its flag set, its reading side shut down, as `minivmm receive`
/// does on a signal) fails as given up and tells the source, whose guest runs on.
#[test]
fn a_destination_that_gives_up_tells_the_source() {
    let mut src = source();
    keep_writing(&mut src, 11);
    let (mut a, b) = Connection::pair().unwrap();
    let wake = b.wake_handle().expect("a socket");
    let give_up = Cancel::new();
    let ropts = ReceiveOptions {
        give_up: give_up.clone(),
        ..ReceiveOptions::default()
    };
    let opts = SendOptions {
        limits: Limits {
            downtime: Duration::ZERO,
            max_passes: 1000,
            ..Limits::default()
        },
        batch_pages: 64,
        // After the bulk pass: the destination gives up.
        progress: Some(Box::new(move |_| {
            give_up.cancel();
            // SAFETY: shutdown(2) on a socket this test owns; no memory is involved.
            unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&wake), libc::SHUT_RD) };
        })),
        ..Default::default()
    };
    let (s, r, dst) = migrate_over(&mut src, &mut a, fake_target(LAYOUT), b, opts, ropts);
    assert!(matches!(r, Err(DestinationError::GivenUp)), "{r:?}");
    match s {
        Err(SourceError::Destination(msg)) => {
            assert!(msg.contains("gave the migration up"), "{msg}")
        }
        other => panic!("the source must be told: {other:?}"),
    }
    assert!(!dst.running && !dst.calls.contains(&"resume"));
    assert_source_recovered(&src);
}

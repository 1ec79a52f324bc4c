//! The orchestrator's interface (issue 13, item 3), with real processes: `receive --listen
//! tcp:HOST:0` reports the port it picked (stdout and `status`), `migrate --detach` returns
//! while the migration runs, and both sides' `events` streams tell it step by step, in an
//! order the commit protocol allows.

use std::time::Instant;

use e2e::events::Events;
use e2e::migrate::{assert_keeps_verifying, listening, migrate, migrate_ok, Vm, T};
use e2e::{control, require_kvm, Proc, TempDir};
use vmm::control::protocol::{Event, IncomingStatus, Reply, Request, Side, VmStatus};

const GUEST: &str = "touch=16M rate=2000 verify_ms=100";

#[test]
fn receive_on_port_zero_reports_the_port_it_picked() {
    require_kvm!();
    let dir = TempDir::new("port-zero");
    let mut dst = Vm::receive(&dir, "dst", "tcp:127.0.0.1:0", &[]);
    let ep = listening(&mut dst);
    let port: u16 = ep
        .strip_prefix("tcp:127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a tcp endpoint with a port: {ep}"));
    assert_ne!(port, 0, "the system picked a port");
    let status: IncomingStatus = control(&dst.api, &Request::Status)
        .and_then(Reply::into_result)
        .expect("status");
    assert_eq!(status.listen, ep, "status names the same endpoint");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "it listens there"
    );
}

/// Subscribed before anything happens, both streams tell the whole migration; the detached
/// `migrate` returned before it completed.
#[test]
fn a_detached_migration_is_followed_through_events_and_status_on_both_sides() {
    require_kvm!();
    let dir = TempDir::new("detached");
    let mut src = Vm::run(&dir, "src", "256M", 2, GUEST);
    src.rounds(0, 1);
    let mut dst = Vm::receive(&dir, "dst", "tcp:127.0.0.1:0", &[]);
    let to = listening(&mut dst);
    let src_events = Events::follow("src", &src.api);
    let dst_events = Events::follow("dst", &dst.api);
    dst_events.wait(Side::Destination, T, |e| matches!(e, Event::Waiting { .. }));

    let started = Instant::now();
    let mut m = Proc::minivmm(
        "migrate",
        &[
            "migrate",
            "--detach",
            "--json",
            "--to",
            &to,
            "--api-socket",
            src.api.to_str().expect("utf-8"),
            "--max-bandwidth",
            "16M",
        ],
    );
    let st = m.wait_exit(T).expect("migrate --detach returns");
    assert!(st.success(), "migrate --detach: {}", m.stderr());
    let returned = started.elapsed();
    let returned_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as u64;
    let reply: serde_json::Value =
        serde_json::from_str(&m.lines().join("\n")).expect("one JSON reply");
    assert_eq!(
        (&reply["ok"], &reply["detached"], &reply["to"]),
        (&true.into(), &true.into(), &to.clone().into())
    );

    // While the bulk pass runs (a second at 16 MB/s) both sides' status say what they do.
    src_events.wait(Side::Source, T, |e| matches!(e, Event::Setup { .. }));
    dst_events.wait(Side::Destination, T, |e| {
        matches!(e, Event::Receiving { .. })
    });
    let running: VmStatus = control(&src.api, &Request::Status)
        .and_then(Reply::into_result)
        .expect("source status");
    let migration = running
        .migration
        .expect("the source's status shows the migration");
    assert_eq!(
        (migration.to.as_str(), migration.moved),
        (to.as_str(), false)
    );
    let receiving: IncomingStatus = control(&dst.api, &Request::Status)
        .and_then(Reply::into_result)
        .expect("destination status");
    assert_eq!(
        (receiving.state, receiving.listen.as_str()),
        (
            vmm::control::protocol::IncomingState::Receiving,
            to.as_str()
        )
    );
    let completed = src_events.wait(Side::Source, T, |e| {
        matches!(e, Event::Completed { .. } | Event::Failed { .. })
    });
    let Event::Completed { summary } = &completed.event else {
        panic!("the migration failed: {completed:?}");
    };
    assert!(
        returned_at < completed.time_us,
        "migrate --detach returned ({returned:?} after it started) before the migration \
         completed ({} ms)",
        summary.total_ms
    );
    dst_events.wait(Side::Destination, T, |e| matches!(e, Event::Running));

    // The source: setup, at least one pass (the bulk pass at 16 MB/s takes a second), paused,
    // committed, completed; nothing else.
    let names = src_events.names(Side::Source);
    assert_eq!(names.first(), Some(&"setup"), "{names:?}");
    assert!(names.contains(&"pass"), "{names:?}");
    let tail: Vec<&str> = names.iter().copied().filter(|n| *n != "pass").collect();
    assert_eq!(tail, ["setup", "paused", "committed", "completed"]);
    let passes: Vec<u32> = src_events
        .lines()
        .iter()
        .filter_map(|l| match &l.event {
            Event::Pass { progress, stats } => {
                assert_eq!(stats.dirty_sync_count, u64::from(progress.pass) + 1);
                assert!(stats.transferred_bytes > 0 && stats.total_bytes == 256 << 20);
                Some(progress.pass)
            }
            _ => None,
        })
        .collect();
    assert_eq!(passes, (0..passes.len() as u32).collect::<Vec<_>>());
    assert_eq!(summary.figures.dirty_sync_count, summary.passes);
    assert!(summary.figures.downtime_ms.is_some());

    // The destination: waiting, receiving, restored, committed, running.
    assert_eq!(
        dst_events.names(Side::Destination),
        ["waiting", "receiving", "restored", "committed", "running"]
    );
    // Across the two: one clock (one machine), so the commit protocol's causal order shows:
    // each step is told before the record that lets the other side take the next one goes
    // out. The source's `committed` is told once its write of `Go` returned, the
    // destination's once `Go` arrived: either may come first (seen on a loaded machine), so
    // the two sides' `committed` are not compared, nor the source's with what follows.
    let at = |ev: &Events, side, name: &str| {
        ev.lines()
            .iter()
            .find(|l| l.side == Some(side) && l.event.name() == name)
            .map(|l| l.time_us)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let (src_at, dst_at) = (
        |name| at(&src_events, Side::Source, name),
        |name| at(&dst_events, Side::Destination, name),
    );
    let to_go = [src_at("paused"), dst_at("restored"), src_at("committed")];
    assert!(to_go.is_sorted(), "paused, restored, Go sent: {to_go:?}");
    let to_end = [
        dst_at("restored"),
        dst_at("committed"),
        dst_at("running"),
        completed.time_us,
    ];
    assert!(
        to_end.is_sorted(),
        "restored, Go arrived, running, completed: {to_end:?}"
    );
    // The source ended after its last event went out; its stream closed with it.
    assert!(src.proc.wait_exit(T).is_some_and(|s| s.success()));
    assert!(src_events.wait_end(T).is_some());
    assert_keeps_verifying(&mut dst, 2);
}

/// A detached migration that fails: the `failed` event, and `status` shows why while the
/// guest runs on.
#[test]
fn a_detached_migration_that_fails_says_why_in_events_and_status() {
    require_kvm!();
    let dir = TempDir::new("detached-fail");
    let mut src = Vm::run(&dir, "src", "256M", 1, GUEST);
    src.rounds(0, 1);
    let events = Events::follow("src", &src.api);
    let nowhere = format!("unix:{}", dir.join("nobody.sock").display());
    let r: Reply<serde_json::Value> = control(
        &src.api,
        &serde_json::from_value(serde_json::json!({
            "cmd": "migrate", "to": nowhere, "detach": true
        }))
        .expect("request"),
    )
    .expect("reply");
    assert!(r.is_ok(), "a detached migrate is accepted at once: {r:?}");
    let failed = events.wait(Side::Source, T, |e| matches!(e, Event::Failed { .. }));
    let Event::Failed { reason } = failed.event else {
        unreachable!()
    };
    assert!(reason.contains("nobody.sock"), "{reason}");
    let status: VmStatus = control(&src.api, &Request::Status)
        .and_then(Reply::into_result)
        .expect("status");
    let last = status
        .last_migration
        .expect("the failed migration in status");
    assert_eq!(
        (last.to, last.cancelled, last.error),
        (nowhere, false, reason)
    );
    assert!(status.migration.is_none(), "nothing runs any more");
    src.rounds(0, 2);
}

/// The destination's events when a stream is refused and the next one is taken: `failed`
/// naming why, `waiting` again (a refused configuration spends no attempt), then the whole
/// successful sequence; the refused source says `failed` too and its guest runs on.
#[test]
fn a_refused_stream_then_a_good_one_in_the_destinations_events() {
    require_kvm!();
    let dir = TempDir::new("refused-events");
    let mut small = Vm::run(&dir, "small", "256M", 1, GUEST);
    let mut right = Vm::run(&dir, "right", "512M", 1, GUEST);
    small.rounds(0, 1);
    right.rounds(0, 1);
    let mut dst = Vm::receive(
        &dir,
        "dst",
        "tcp:127.0.0.1:0",
        &["--mem", "512M", "--cpus", "1"],
    );
    let to = listening(&mut dst);
    let dst_events = Events::follow("dst", &dst.api);
    let small_events = Events::follow("small", &small.api);
    dst_events.wait(Side::Destination, T, |e| matches!(e, Event::Waiting { .. }));

    let refused = migrate(&small.api, &to, &[]);
    assert!(!refused.ok, "a 256M guest into --mem 512M is refused");
    let failed = dst_events.wait(Side::Destination, T, |e| matches!(e, Event::Failed { .. }));
    let Event::Failed { reason } = &failed.event else {
        unreachable!()
    };
    assert!(
        reason.contains("256M of memory") && reason.contains("built for 512M"),
        "{reason}"
    );
    let src_failed = small_events.wait(Side::Source, T, |e| matches!(e, Event::Failed { .. }));
    let Event::Failed { reason: told } = &src_failed.event else {
        unreachable!()
    };
    assert!(
        told.contains("512") || told.contains("mem"),
        "the source is told: {told}"
    );
    small.rounds(0, 2);

    migrate_ok(&mut right, &to, &[]);
    dst_events.wait(Side::Destination, T, |e| matches!(e, Event::Running));
    assert_eq!(
        dst_events.names(Side::Destination),
        [
            "waiting",
            "receiving",
            "failed",
            "waiting",
            "receiving",
            "restored",
            "committed",
            "running"
        ]
    );
    assert_keeps_verifying(&mut dst, 1);
}

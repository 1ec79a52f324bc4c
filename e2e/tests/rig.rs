//! Migration between two hosts on one machine (issue 13, item 2): the source in one network
//! namespace, the destination in another, over TCP on a veth pair shaped like 10 GbE or 1 GbE
//! (`scripts/rig.sh`), with mutual TLS (and plaintext on one way back). Idle and busy guests
//! migrate and verify over both links; a link cut in
//! the bulk pass, and one at the commit point, end with the guest running in exactly one
//! place (judged from the guests' `VERIFY-OK` lines, as the fault matrix does); a writer
//! faster than the 1 GbE link converges, throttled. Each test brings up a rig of its own and
//! takes it down when it ends, passed or failed.

use std::thread;
use std::time::{Duration, Instant};

use e2e::events::Events;
use e2e::guest::VerifyOk;
use e2e::migrate::{assert_hashes_match, assert_keeps_verifying, migrate, Vm, T};
use e2e::rig::{rig_available, Guest, Host, Link, Rig, TransportFlags};
use e2e::{control, require_kvm, TempDir};
use vmm::control::protocol::{Done, Event, Reply, Request, ResumeRequest, Side, VmStatus};

/// The guest that writes: 2 vCPUs, verifying every 100 ms.
const BUSY: &str = "touch=16M rate=2000 verify_ms=100";
/// The idle guest: 64 MiB written once, then only verified.
const IDLE: &str = "touch=64M rate=0 verify_ms=100";

/// The transport the faulted tests use: mutual TLS, as between real hosts.
fn transport(rig: &Rig, dir: &TempDir) -> TransportFlags {
    TransportFlags::tls(rig, dir)
}

fn guest(mem: &'static str, cpus: u32, cmdline: &'static str) -> Guest<'static> {
    Guest { mem, cpus, cmdline }
}

fn with<'a>(base: &[&'a str], more: &'a [String]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    v.extend(more.iter().map(String::as_str));
    v
}

/// Migrates `vm` to `to_host` over the rig with `flags`; returns the destination.
fn hop(
    rig: &Rig,
    dir: &TempDir,
    flags: &TransportFlags,
    (vm, to_host): (&mut Vm, Host),
    name: &str,
    cpus: u64,
) -> Vm {
    let (mut dst, to) = rig.receive(dir, to_host, name, &with(&[], &flags.destination), &[]);
    let m = migrate(&vm.api, &to, &with(&["--verify-memory"], &flags.source));
    let summary = match m.reply {
        Some(Reply::Ok(s)) if m.ok => s,
        other => panic!("migration to {to} failed: {other:?}\n{}", m.stderr),
    };
    assert_hashes_match(&summary);
    assert!(
        vm.proc.wait_exit(T).is_some_and(|s| s.success()),
        "the source ends once the destination runs the guest"
    );
    eprintln!(
        "{name}: {} ms total, {} ms downtime, {} passes, {} bytes",
        summary.total_ms, summary.downtime_ms, summary.passes, summary.bytes_sent
    );
    assert_keeps_verifying(&mut dst, cpus);
    dst
}

/// Over 10 GbE with mutual TLS, back over 1 GbE in plaintext.
#[test]
fn idle_and_busy_guests_migrate_over_10gbe_and_1gbe() {
    require_kvm!();
    if !rig_available("idle_and_busy_guests_migrate_over_10gbe_and_1gbe") {
        return;
    }
    let rig = Rig::up();
    let dir = TempDir::new("rig-both");
    rig.shape(Link::TenGbE);
    let mut idle = rig.run_vm(&dir, Host::Src, "idle", guest("512M", 1, IDLE), &[]);
    let mut busy = rig.run_vm(&dir, Host::Src, "busy", guest("256M", 2, BUSY), &[]);
    idle.rounds(0, 1);
    busy.rounds(1, 1);
    // Over TLS there, plaintext back.
    let tls = transport(&rig, &dir);
    let plain = TransportFlags::plaintext();
    let mut idle = hop(&rig, &dir, &tls, (&mut idle, Host::Dst), "idle-10g", 1);
    let mut busy = hop(&rig, &dir, &tls, (&mut busy, Host::Dst), "busy-10g", 2);
    rig.shape(Link::OneGbE);
    hop(&rig, &dir, &plain, (&mut idle, Host::Src), "idle-1g", 1);
    hop(&rig, &dir, &plain, (&mut busy, Host::Src), "busy-1g", 2);
}

/// Whether `vm`'s guest printed `VERIFY-OK` lines after line `from`.
fn advanced(vm: &mut Vm, from: usize) -> bool {
    vm.proc.alive()
        && vm
            .proc
            .lines()
            .iter()
            .skip(from)
            .any(|l| VerifyOk::parse(l).is_some())
}

/// Which of the two guests advance over a second.
fn watch(a: &mut Vm, b: &mut Vm) -> (bool, bool) {
    let (fa, fb) = (a.proc.line_count(), b.proc.line_count());
    thread::sleep(Duration::from_millis(1000));
    (advanced(a, fa), advanced(b, fb))
}

/// `minivmm migrate` of `src` to `to` on a thread of its own.
fn in_background(src: &Vm, to: &str, args: &[&str]) -> thread::JoinHandle<e2e::migrate::Migration> {
    let (api, to) = (src.api.clone(), to.to_string());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        migrate(&api, &to, &args)
    })
}

fn status(vm: &Vm) -> Option<VmStatus> {
    control(&vm.api, &Request::Status)
        .ok()
        .and_then(|r: Reply<VmStatus>| r.into_result().ok())
}

/// Short bounds on both sides, so a cut is noticed within a second or two.
const SOURCE_BOUNDS: &[&str] = &[
    "--io-timeout-ms",
    "1500",
    "--handshake-timeout-ms",
    "3000",
    "--switchover-timeout-ms",
    "3000",
];
const DEST_BOUNDS: &[&str] = &["--io-timeout-ms", "1500", "--commit-timeout-ms", "1000"];

/// The link is cut while the bulk pass runs (over a control and a data connection): both
/// sides time out, the destination never starts the guest, the source's runs on; healed, a
/// fresh migration succeeds.
#[test]
fn a_link_cut_in_the_bulk_pass_leaves_the_guest_at_the_source() {
    require_kvm!();
    if !rig_available("a_link_cut_in_the_bulk_pass_leaves_the_guest_at_the_source") {
        return;
    }
    let rig = Rig::up();
    let dir = TempDir::new("rig-cut-bulk");
    rig.shape(Link::OneGbE);
    let flags = transport(&rig, &dir);
    let mut src = rig.run_vm(&dir, Host::Src, "src", guest("256M", 2, BUSY), &[]);
    src.rounds(0, 1);
    let (mut dst, to) = rig.receive(
        &dir,
        Host::Dst,
        "dst",
        &with(DEST_BOUNDS, &flags.destination),
        &[],
    );
    let dst_events = Events::follow("dst", &dst.api);
    // 16 MiB at 4 MB/s: the bulk pass takes 4 s, the cut comes in its first second. Over two
    // connections: the data connection, which carries the pages, dies with the link too.
    let mut args = with(SOURCE_BOUNDS, &flags.source);
    args.extend(["--max-bandwidth", "4M", "--connections", "2"]);
    let migration = in_background(&src, &to, &args);
    dst_events.wait(Side::Destination, T, |e| {
        matches!(e, Event::Receiving { .. })
    });
    thread::sleep(Duration::from_millis(500));
    rig.cut();
    let m = migration.join().expect("migrate thread");
    assert!(!m.ok, "the migration cannot complete over a cut link");
    assert!(
        !m.stderr.contains("utcome unknown"),
        "before the commit the source knows: {}",
        m.stderr
    );
    dst_events.wait(Side::Destination, T, |e| matches!(e, Event::Failed { .. }));
    rig.heal();
    let (src_runs, dst_runs) = watch(&mut src, &mut dst);
    assert!(src_runs && !dst_runs, "the guest runs at the source only");
    e2e::migrate::assert_no_guest_ran(&dst.proc);
    // Healed, the next migration goes through.
    drop(dst);
    hop(&rig, &dir, &flags, (&mut src, Host::Dst), "after-heal", 2);
}

/// The link is cut while the source holds at the commit point (`before-go:stall`): the
/// destination's commit window passes without `Go` and it discards its copy; the source
/// sends `Go` into the cut link and, hearing nothing, says the outcome is unknown and holds
/// its guest. Healed, nobody runs the guest twice, and the operator's `resume --force` brings
/// it back at the source (or, had `Go` arrived in time, the destination runs it and the
/// source still holds: never both).
#[test]
fn a_link_cut_at_the_commit_point_never_runs_the_guest_twice() {
    require_kvm!();
    if !rig_available("a_link_cut_at_the_commit_point_never_runs_the_guest_twice") {
        return;
    }
    let rig = Rig::up();
    let dir = TempDir::new("rig-cut-commit");
    rig.shape(Link::TenGbE);
    let flags = transport(&rig, &dir);
    let fault = dir.join("src.fault");
    std::fs::write(&fault, "before-go:stall:2500").expect("fault file");
    let env = format!("@{}", fault.display());
    let mut src = rig.run_vm(
        &dir,
        Host::Src,
        "src",
        guest("256M", 2, BUSY),
        &[("MINIVMM_FAULT", &env)],
    );
    src.rounds(0, 1);
    let (mut dst, to) = rig.receive(
        &dir,
        Host::Dst,
        "dst",
        &with(DEST_BOUNDS, &flags.destination),
        &[],
    );
    let dst_events = Events::follow("dst", &dst.api);
    let migration = in_background(&src, &to, &with(SOURCE_BOUNDS, &flags.source));
    // `restored` goes out as the source reaches its stall before `Go`.
    dst_events.wait(Side::Destination, T, |e| matches!(e, Event::Restored));
    rig.cut();
    let m = migration.join().expect("migrate thread");
    std::fs::write(&fault, "").expect("disarm");
    let outcome = dst_events.wait(Side::Destination, T, |e| {
        matches!(e, Event::Failed { .. } | Event::Running)
    });
    rig.heal();
    let (src_runs, dst_runs) = watch(&mut src, &mut dst);
    assert!(!(src_runs && dst_runs), "the guest runs in BOTH places");
    let held = status(&src)
        .and_then(|s| s.migration)
        .is_some_and(|m| m.outcome_unknown);
    assert!(!m.ok, "no Running came back over the cut link");
    match outcome.event {
        Event::Failed { .. } => {
            assert!(!dst_runs, "the destination discarded its copy");
            if held {
                assert!(!src_runs, "a held source is paused");
                assert!(m.stderr.contains("utcome unknown"), "{}", m.stderr);
                let r: Reply<Done> =
                    control(&src.api, &Request::Resume(ResumeRequest { force: false }))
                        .expect("resume");
                assert!(!r.is_ok(), "a plain resume is refused: {r:?}");
                let r: Reply<Done> =
                    control(&src.api, &Request::Resume(ResumeRequest { force: true }))
                        .expect("resume --force");
                assert!(r.is_ok(), "resume --force: {r:?}");
            } else {
                assert!(src_runs, "a source that knows it kept the guest runs it");
            }
            src.rounds(0, 2);
            src.rounds(1, 1);
        }
        _ => {
            assert!(dst_runs && !src_runs, "Go arrived: the destination runs it");
            assert!(held, "the source never heard Running: outcome unknown");
        }
    }
}

/// A guest that dirties memory faster than the 1 GbE link sends it: auto-converge throttles
/// it until the rest fits the downtime limit.
#[test]
fn a_writer_faster_than_the_1gbe_link_is_throttled_until_it_converges() {
    require_kvm!();
    if !rig_available("a_writer_faster_than_the_1gbe_link_is_throttled_until_it_converges") {
        return;
    }
    let rig = Rig::up();
    let dir = TempDir::new("rig-writer");
    rig.shape(Link::OneGbE);
    let flags = transport(&rig, &dir);
    let mut src = rig.run_vm(
        &dir,
        Host::Src,
        "src",
        guest("512M", 1, "touch=64M rate=max verify_ms=200"),
        &[],
    );
    let a = src.rounds(0, 1);
    let b = src.rounds(0, 1);
    // Each rewrite changes a whole page: the guest's own figures say how fast it dirties.
    let writer_bps =
        (b.writes - a.writes) as f64 * 4096.0 / ((b.tsc_ms - a.tsc_ms) as f64 / 1000.0);
    assert!(
        writer_bps > 125e6,
        "the writer ({:.0} MB/s) is faster than 1 Gbit/s",
        writer_bps / 1e6
    );
    let (mut dst, to) = rig.receive(&dir, Host::Dst, "dst", &with(&[], &flags.destination), &[]);
    let started = Instant::now();
    let m = migrate(
        &src.api,
        &to,
        &with(
            &["--downtime-ms", "50", "--max-passes", "30"],
            &flags.source,
        ),
    );
    let summary = match m.reply {
        Some(Reply::Ok(s)) if m.ok => s,
        other => panic!("migration failed: {other:?}\n{}", m.stderr),
    };
    eprintln!(
        "writer ({:.0} MB/s) over 1GbE: {:?}, {} passes, throttle {} %, converged {}, \
         downtime {} ms",
        writer_bps / 1e6,
        started.elapsed(),
        summary.passes,
        summary.max_throttle_pct,
        summary.converged,
        summary.downtime_ms
    );
    assert!(summary.max_throttle_pct > 0, "auto-converge throttled it");
    assert!(
        summary.converged,
        "and it converged: {:?}",
        summary.stats["stop_reason"]
    );
    assert!(src.proc.wait_exit(T).is_some_and(|s| s.success()));
    assert_keeps_verifying(&mut dst, 1);
}

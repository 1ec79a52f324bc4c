//! Live migration between real minivmm processes under real KVM.

use std::time::Duration;

use e2e::guest::{assert_no_failure, VerifyOk};
use e2e::migrate::{
    assert_hashes_match, assert_keeps_verifying, assert_no_guest_ran, migrate, migrate_ok,
    Migration, Vm, T,
};
use e2e::{free_tcp_port, require_kvm, vm_status, Proc, TempDir};
use vmm::control::protocol::{IncomingState, IncomingStatus, Reply, Request};
use vmm::RunState;

const WRITER: &str = "touch=64M rate=5000 seed=11";

#[test]
fn unix_socket_migration_of_a_writing_guest() {
    require_kvm!();
    let dir = TempDir::new("mig-unix");
    let mut src = Vm::run(&dir, "src", "512M", 1, WRITER);
    src.rounds(0, 1);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &[]);
    let stats = migrate_ok(&mut src, &uri, &["--verify-memory"]);
    assert_hashes_match(&stats);
    // A fresh destination is proven pristine, with nothing to reset.
    let report = stats.destination.as_ref().expect("destination report");
    assert_eq!((report.pristine, report.reset), (true, false), "{stats:?}");
    assert_keeps_verifying(&mut dst, 1);
    assert_eq!(vm_status(&dst.api).state, RunState::Running);
}

#[test]
fn tcp_migration_of_a_writing_guest() {
    require_kvm!();
    let dir = TempDir::new("mig-tcp");
    let mut src = Vm::run(&dir, "src", "512M", 1, WRITER);
    src.rounds(0, 1);
    let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
    // Built for the stream's shape before it connects (another shape would be refused).
    let mut dst = Vm::receive(&dir, "dst", &uri, &["--mem", "512M", "--cpus", "1"]);
    let stats = migrate_ok(&mut src, &uri, &["--verify-memory"]);
    assert_hashes_match(&stats);
    assert_keeps_verifying(&mut dst, 1);
    assert_eq!(vm_status(&dst.api).cpus, 1);
}

/// `--connections 3` over unix: the live passes' pages over two data connections, each with
/// a writer and a reader thread, and the guest arrives whole (hashes at the final pause and
/// before the resume).
#[test]
fn three_connections_carry_a_writing_guest() {
    require_kvm!();
    let dir = TempDir::new("mig-conns");
    let mut src = Vm::run(&dir, "src", "512M", 1, WRITER);
    src.rounds(0, 1);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &[]);
    let stats = migrate_ok(
        &mut src,
        &uri,
        &["--verify-memory", "--connections", "3", "--max-passes", "4"],
    );
    assert_hashes_match(&stats);
    assert_eq!(stats.stats["data_connections"], 2, "{:?}", stats.stats);
    assert!(
        stats.passes >= 2,
        "a dirty pass went over them too: {stats:?}"
    );
    assert_keeps_verifying(&mut dst, 1);
}

#[test]
fn file_snapshot_and_restore() {
    require_kvm!();
    let dir = TempDir::new("mig-file");
    let mut src = Vm::run(&dir, "src", "2G", 1, "touch=64M rate=2000 seed=12");
    src.rounds(0, 1);
    let snap = dir.join("vm.snap");
    let uri = format!("file:{}", snap.display());
    let stats = migrate_ok(&mut src, &uri, &["--verify-memory"]);
    let meta = std::fs::metadata(&snap).expect("snapshot written");
    let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    eprintln!(
        "snapshot: apparent {} MiB, allocated {} MiB",
        meta.len() >> 20,
        allocated >> 20
    );
    // Zero and untouched pages take no room: the file holds about the non-zero memory.
    let nonzero = stats.nonzero_bytes.expect("nonzero_bytes");
    let limit = nonzero + (8 << 20);
    assert!(
        allocated <= limit,
        "{allocated} bytes allocated for {nonzero} non-zero"
    );
    assert!(
        meta.len() <= limit,
        "{} bytes for {nonzero} non-zero",
        meta.len()
    );
    let api = dir.join("restored.api");
    let mut dst = Proc::minivmm(
        "restored",
        &[
            "receive",
            "--from",
            &uri,
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    let v = e2e::guest::wait_rounds(&mut dst, 0, 0, 2, T);
    assert!(v.round >= 2, "{v:?}");
    assert_no_failure(&dst);
    assert_eq!(vm_status(&api).state, RunState::Running);
    assert!(stats.mem_hash_source.is_some(), "{stats:?}");
}

/// Both vCPUs write, tick and (`fpu=1`) hold known values in their x87, SSE and AVX
/// registers, which each checks every round: a vCPU restored without its XSAVE state, or
/// with the other's, fails its verifier on the destination.
#[test]
fn two_vcpus_both_writing_keep_running_and_ticking() {
    require_kvm!();
    let dir = TempDir::new("mig-smp");
    let mut src = Vm::run(
        &dir,
        "src",
        "512M",
        2,
        "touch=64M rate=4000 seed=13 hz=100 fpu=1",
    );
    src.rounds(0, 1);
    src.rounds(1, 1);
    let fpu = e2e::guest::fpu_loaded(&src.proc.lines());
    assert_eq!(
        fpu.iter().map(|f| f.0).collect::<Vec<_>>(),
        [0, 1],
        "both CPUs loaded their registers: {fpu:?}"
    );
    if fpu.iter().any(|f| !f.1) {
        eprintln!("NOTE: XCR0 has no AVX here: only x87 and SSE registers are checked");
    }
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &[]);
    let stats = migrate_ok(&mut src, &uri, &["--verify-memory"]);
    assert_hashes_match(&stats);
    let last_src: Vec<VerifyOk> = (0..2)
        .map(|c| {
            *e2e::guest::verify_oks(&src.proc.lines(), c)
                .last()
                .expect("src reports")
        })
        .collect();
    for cpu in [0u64, 1] {
        let after = dst.rounds(cpu, 2);
        let last = last_src[cpu as usize];
        assert!(
            after.writes > last.writes,
            "cpu {cpu} keeps writing: {last:?} -> {after:?}"
        );
        assert!(
            after.ticks > last.ticks,
            "cpu {cpu} timer keeps ticking: {last:?} -> {after:?}"
        );
        // No jump: guest time across the migration advances like the ticks do.
        let dt_ms = after.tsc_ms.saturating_sub(last.tsc_ms) as f64;
        let dticks = (after.ticks - last.ticks) as f64;
        let hz = 100.0;
        let expect = dt_ms * hz / 1000.0;
        assert!(
            dt_ms < 10_000.0 && (dticks - expect).abs() <= expect * 0.5 + 20.0,
            "cpu {cpu}: {dticks} ticks over {dt_ms} ms of guest time at {hz:.0} Hz: {last:?} -> {after:?}"
        );
    }
    assert_no_failure(&dst.proc);
}

#[test]
fn chain_of_ten_migrations() {
    require_kvm!();
    let dir = TempDir::new("mig-chain");
    let mut vm = Vm::run(&dir, "hop0", "256M", 1, "touch=32M rate=3000 seed=14 fpu=1");
    vm.rounds(0, 1);
    for hop in 1..=10 {
        let uri = format!("unix:{}", dir.join(&format!("hop{hop}.sock")).display());
        let mut next = Vm::receive(&dir, &format!("hop{hop}"), &uri, &[]);
        let stats = migrate_ok(&mut vm, &uri, &["--verify-memory"]);
        assert_hashes_match(&stats);
        next.rounds(0, 1);
        assert_no_failure(&next.proc);
        vm = next;
    }
}

/// The other dirty trackers, both ways: write-protecting every page up front (KVM without
/// initially-set bitmaps) and KVM's dirty rings. Two vCPUs write; the first hop's bulk pass
/// is slowed to seconds and the guest must keep verifying at the source during it; the guest
/// verifies its memory after each hop, and the memory hashes match, with the ring even
/// without `--verify-memory` (an experimental tracker always verifies). (Rings small enough to
/// fill during the pass, `ring:4096`, also keep the guest running, but the destination's
/// memory differed in some runs here: README, "Dirty ring".)
#[test]
fn other_dirty_trackers_migrate_a_writer_there_and_back() {
    require_kvm!();
    for tracker in ["bitmap-protect", "ring"] {
        let tag = tracker.replace(':', "-");
        let dir = TempDir::new(&format!("mig-{tag}"));
        let flags = ["--dirty-tracker", tracker];
        let mut vm = Vm::run_with(&dir, "a", "512M", 2, WRITER, &flags, &[]);
        vm.rounds(0, 1);
        for (hop, slow) in [("b", true), ("c", false)] {
            let uri = format!("unix:{}", dir.join(&format!("{hop}.sock")).display());
            let mut next = Vm::receive(&dir, hop, &uri, &flags);
            let verified = |vm: &Vm| {
                let lines = vm.proc.lines();
                lines.iter().filter(|l| l.contains("VERIFY-OK")).count()
            };
            let before = verified(&vm);
            // The ring verifies memory whether asked or not (the second hop does not ask).
            let mut extra = if tracker == "ring" && !slow {
                vec![]
            } else {
                vec!["--verify-memory"]
            };
            if slow {
                // 64 MiB at 16 MB/s: a bulk pass of about 4 s.
                extra.extend(["--max-bandwidth", "16M"]);
            }
            let stats = migrate_ok(&mut vm, &uri, &extra);
            assert_hashes_match(&stats);
            if slow {
                let during = verified(&vm) - before;
                assert!(
                    during >= 2,
                    "{tracker}: {during} VERIFY-OK lines at the source during a {} ms migration",
                    stats.total_ms
                );
            }
            assert_keeps_verifying(&mut next, 2);
            vm = next;
        }
    }
}

#[test]
fn destination_killed_mid_migration_source_keeps_running() {
    require_kvm!();
    let dir = TempDir::new("mig-kill");
    let mut src = Vm::run(&dir, "src", "1G", 1, "touch=256M rate=20000 seed=15");
    src.rounds(0, 1);
    // Slow the stream down so that the kills land inside it.
    for (i, delay_ms) in [30u64, 250, 700].into_iter().enumerate() {
        let uri = format!("unix:{}", dir.join(&format!("k{i}.sock")).display());
        let mut dst = Vm::receive(&dir, &format!("victim{i}"), &uri, &[]);
        let api = src.api.clone();
        let uri2 = uri.clone();
        let mig = std::thread::spawn(move || migrate(&api, &uri2, &["--max-bandwidth", "100M"]));
        std::thread::sleep(Duration::from_millis(delay_ms));
        dst.proc.kill();
        let m = mig.join().expect("migrate thread");
        assert!(
            !m.ok,
            "migration to a killed destination must fail: {:?}",
            m.reply
        );
        assert!(
            !m.stderr.is_empty() || matches!(m.reply, Some(Reply::Error(_))),
            "the failure is reported"
        );
        assert!(src.proc.alive(), "the source survives a failed migration");
        src.rounds(0, 1);
        assert_no_failure(&src.proc);
    }
    let uri = format!("unix:{}", dir.join("final.sock").display());
    let mut dst = Vm::receive(&dir, "final", &uri, &[]);
    let stats = migrate_ok(&mut src, &uri, &["--verify-memory"]);
    assert_hashes_match(&stats);
    assert_keeps_verifying(&mut dst, 1);
}

/// Migrate while the guest fills 512 MiB: the bulk pass finds most of the working set still
/// zero and elides it, so only the dirty log can bring the pages the fill writes afterwards.
/// The destination started all zero, so every page that is non-zero at the final pause went
/// out as data at least once; those the bulk pass did not send must be in the later passes.
/// (Faulting in fresh memory paces the fill here, whatever `fill_rate=` asks, and pre-copy
/// converges within a few short passes: a 1 ms downtime limit makes it take a few more.)
#[test]
fn pages_written_after_the_bulk_pass_arrive() {
    require_kvm!();
    let dir = TempDir::new("mig-late");
    let mut src = Vm::run(
        &dir,
        "src",
        "1G",
        1,
        "touch=512M rate=0 seed=16 fill_rate=200000",
    );
    let layout = src
        .proc
        .wait_line("layout", T, |l| l.starts_with("TESTGUEST layout"));
    let ws_pages: u64 = e2e::kv(&layout)["ws_pages"].parse().expect("ws_pages");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &[]);
    let stats = migrate_ok(
        &mut src,
        &uri,
        &[
            "--verify-memory",
            "--max-bandwidth",
            "400M",
            "--downtime-ms",
            "1",
            "--max-passes",
            "10",
            "--no-auto-converge",
        ],
    );
    let passes = stats.stats["passes"].as_array().expect("passes");
    let sent = |p: &serde_json::Value| p["pages_sent"].as_u64().expect("pages_sent");
    assert_eq!(passes[0]["kind"], "bulk", "{passes:?}");
    let bulk = sent(&passes[0]);
    let later: u64 = passes[1..].iter().map(sent).sum();
    let nonzero = stats.nonzero_bytes.expect("nonzero_bytes") / 4096;
    let after_bulk = nonzero.saturating_sub(bulk);
    eprintln!(
        "working set {ws_pages} pages; at the pause {nonzero} non-zero; bulk pass sent {bulk}, \
         the {} later passes {later}",
        passes.len() - 1
    );
    assert!(
        after_bulk >= 100,
        "only {after_bulk} of the {nonzero} non-zero pages were written after the bulk pass \
         (it sent {bulk}): the fill was not running during the migration"
    );
    assert!(
        later >= after_bulk,
        "the dirty passes sent {later} pages, but {after_bulk} pages non-zero at the pause \
         were not in the bulk pass: {passes:?}"
    );
    assert_hashes_match(&stats);
    dst.proc
        .wait_line("fill done", T, |l| l.starts_with("FILL-DONE"));
    assert_keeps_verifying(&mut dst, 1);
}

/// `migrate --keep-running` to a `file:` snapshot leaves the guest running here (it keeps
/// writing and verifying) and the snapshot restores elsewhere; then a live migration with
/// `--no-zero-elision` sends the zero pages as zero runs instead of leaving them out.
#[test]
fn keep_running_snapshot_then_a_migration_without_zero_elision() {
    require_kvm!();
    let dir = TempDir::new("mig-keep");
    let mut src = Vm::run(&dir, "src", "512M", 1, "touch=32M rate=2000 seed=43");
    src.rounds(0, 1);
    let snap = format!("file:{}", dir.join("running.snap").display());
    let m = migrate(&src.api, &snap, &["--keep-running", "--verify-memory"]);
    assert!(m.ok, "snapshot with --keep-running: {}", m.stderr);
    assert!(
        matches!(&m.reply, Some(Reply::Ok(s)) if s.mem_hash_source.is_some()),
        "{:?}",
        m.reply
    );
    // The source runs on: its status says so and its guest keeps writing and verifying.
    assert_eq!(vm_status(&src.api).state, RunState::Running);
    let before = src.rounds(0, 1);
    let after = src.rounds(0, 1);
    assert!(
        after.writes > before.writes,
        "the guest keeps writing: {before:?} -> {after:?}"
    );
    assert!(src.proc.alive(), "the source keeps its VM");
    // The snapshot is a whole VM: restored elsewhere, it runs and verifies.
    let api = dir.join("restored.api");
    let mut restored = Proc::minivmm(
        "restored",
        &[
            "receive",
            "--from",
            &snap,
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    e2e::guest::wait_rounds(&mut restored, 0, 0, 1, T);
    assert_no_failure(&restored);
    restored.kill();

    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &[]);
    let stats = migrate_ok(&mut src, &uri, &["--no-zero-elision", "--verify-memory"]);
    assert!(!stats.zero_elision, "{stats:?}");
    assert_eq!(stats.pages_zero_elided, 0, "{stats:?}");
    // 512 MiB is 131,072 pages, about 9,000 of them non-zero: the rest went as zero runs.
    assert!(
        stats.pages_zero_sent >= 100_000,
        "zero pages sent as zero runs: {stats:?}"
    );
    assert_hashes_match(&stats);
    assert_keeps_verifying(&mut dst, 1);
}

#[test]
fn idle_4g_guest_costs_only_its_nonzero_memory() {
    require_kvm!();
    let dir = TempDir::new("mig-idle");
    let mut src = Vm::run(&dir, "src", "4G", 1, "touch=64M rate=0 seed=17");
    src.rounds(0, 1);
    let rss_before = src.proc.rss_kib();
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    // Built before the source connects, as QEMU's destination is; still pristine.
    let mut dst = Vm::receive(&dir, "dst", &uri, &["--mem", "4G", "--cpus", "1"]);
    let stats = migrate_ok(&mut src, &uri, &["--verify-memory"]);
    let nonzero = stats.nonzero_bytes.expect("nonzero_bytes");
    let sent = stats.bytes_sent;
    let src_rss = stats.source_rss_kib;
    dst.rounds(0, 1);
    let dst_rss = dst.proc.rss_kib();
    eprintln!(
        "idle 4 GiB, touched 64 MiB: non-zero {} MiB, sent {} MiB, source RSS {} -> {} MiB, destination RSS {} MiB",
        nonzero >> 20, sent >> 20, rss_before >> 10, src_rss >> 10, dst_rss >> 10
    );
    assert!(
        (64 << 20..=72 << 20).contains(&nonzero),
        "non-zero memory {nonzero}"
    );
    assert!(
        sent as f64 <= 1.05 * nonzero as f64,
        "sent {sent} for {nonzero} non-zero bytes"
    );
    assert!(
        dst_rss * 1024 <= nonzero + (32 << 20),
        "destination RSS {dst_rss} KiB"
    );
    assert!(
        src_rss <= rss_before + 8 * 1024,
        "source faulted in memory: {rss_before} -> {src_rss} KiB"
    );
    // The VM built before the stream took on the stream's configuration: a snapshot of it
    // carries the source's command line on.
    let snap = dir.join("onward.snap");
    migrate_ok(&mut dst, &format!("file:{}", snap.display()), &[]);
    let head = std::fs::read(&snap).expect("snapshot");
    let head = String::from_utf8_lossy(&head[..head.len().min(4096)]);
    assert!(head.contains("touch=64M rate=0 seed=17"), "{head}");
}

/// A writer that dirties memory twice as fast as the link (40 MB/s) sends it: without
/// auto-converge pre-copy runs out of passes; with it the vCPUs are throttled until the rest
/// fits the downtime limit.
#[test]
fn auto_converge_throttles_a_writer_faster_than_the_link() {
    require_kvm!();
    let dir = TempDir::new("mig-converge");
    // 20,000 rewrites/s of 4 KiB: 80 MB/s into a 16 MiB working set.
    let writer = "touch=16M rate=20000 seed=23";
    let limits = [
        "--max-bandwidth",
        "40M",
        "--downtime-ms",
        "30",
        "--max-passes",
        "20",
    ];
    let mut outcomes = Vec::new();
    for auto in [false, true] {
        let name = if auto { "auto" } else { "plain" };
        let mut src = Vm::run(&dir, &format!("src-{name}"), "256M", 1, writer);
        src.rounds(0, 1);
        let uri = format!("unix:{}", dir.join(&format!("{name}.sock")).display());
        let mut dst = Vm::receive(&dir, &format!("dst-{name}"), &uri, &[]);
        let mut extra = limits.to_vec();
        if !auto {
            extra.push("--no-auto-converge");
        }
        let stats = migrate_ok(&mut src, &uri, &extra);
        assert_keeps_verifying(&mut dst, 1);
        outcomes.push(stats);
    }
    let (plain, auto) = (&outcomes[0], &outcomes[1]);
    assert!(!plain.converged, "{plain:?}");
    assert_eq!(plain.max_throttle_pct, 0, "{plain:?}");
    assert_eq!(plain.stats["stop_reason"], "max_passes", "{plain:?}");
    assert!(auto.converged, "{auto:?}");
    assert!(auto.max_throttle_pct >= 20, "{auto:?}");
}

/// `migrate --cancel` gives a running migration up: the destination names the reason and
/// starts no guest, the source's guest runs on, and the next migration, into the same
/// destination process (`--attempts 2`: its memory was written, so it must be proven zero or
/// reset before elided pages count), succeeds.
#[test]
fn cancel_gives_the_migration_up_and_the_source_keeps_running() {
    require_kvm!();
    let SlowMigration {
        mut src,
        mut dst,
        uri,
        mig,
        _dir,
        ..
    } = SlowMigration::start("mig-cancel", 27, &["--attempts", "2"]);
    let r = vm_status(&src.api);
    assert_eq!(
        r.migration.as_ref().map(|m| m.to.as_str()),
        Some(uri.as_str()),
        "status shows the migration: {r:?}"
    );
    let mut cancel = e2e::Proc::minivmm(
        "cancel",
        &[
            "migrate",
            "--cancel",
            "--api-socket",
            src.api.to_str().expect("utf-8"),
        ],
    );
    let st = cancel.wait_exit(T).expect("cancel exits");
    assert!(st.success(), "cancel accepted: {}", cancel.stderr());
    let m = mig.join().expect("migrate thread");
    assert!(!m.ok, "a cancelled migration fails: {:?}", m.reply);
    assert!(m.stderr.contains("cancelled"), "{}", m.stderr);
    // The destination counts it as its first attempt and waits for the next.
    let deadline = std::time::Instant::now() + T;
    while !dst
        .proc
        .stderr()
        .contains("The source gave the migration up: cancelled on the source")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            dst.proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_no_guest_ran(&dst.proc);
    let r = e2e::control::<IncomingStatus>(&dst.api, &Request::Status).expect("status");
    assert!(
        matches!(&r, Reply::Ok(s) if s.state == IncomingState::Waiting),
        "{r:?}"
    );
    assert!(
        src.proc.alive(),
        "the source survives a cancelled migration"
    );
    let r = vm_status(&src.api);
    assert!(
        r.migration.is_none() && r.state == RunState::Running,
        "{r:?}"
    );
    src.rounds(0, 1);
    assert_no_failure(&src.proc);
    // Nothing is running now: a second cancel is refused.
    let mut again = e2e::Proc::minivmm(
        "cancel-again",
        &[
            "migrate",
            "--cancel",
            "--api-socket",
            src.api.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(again.wait_exit(T).and_then(|s| s.code()), Some(1));
    assert!(
        again.stderr().contains("no migration is running"),
        "{}",
        again.stderr()
    );

    let stats = migrate_ok(&mut src, &uri, &["--verify-memory"]);
    assert_hashes_match(&stats);
    // Elision into memory the first attempt wrote: only after it was made zero again, and
    // the memory hashes prove the result.
    let reset = stats.destination.as_ref().map(|d| d.reset);
    assert_eq!((stats.zero_elision, reset), (true, Some(true)), "{stats:?}");
    assert_keeps_verifying(&mut dst, 1);
}

/// A source told to end (SIGTERM) in the middle of a migration gives it up with an `Abort`
/// record, so the destination says why the stream ended instead of reporting it truncated.
#[test]
fn a_source_ended_mid_migration_tells_the_destination() {
    require_kvm!();
    let SlowMigration {
        mut src,
        mut dst,
        mig,
        _dir,
        ..
    } = SlowMigration::start("mig-term", 29, &[]);
    src.proc.signal(libc::SIGTERM);
    let st = src.proc.wait_exit(T).expect("source exits");
    assert!(
        st.success(),
        "SIGTERM ends the source cleanly: {}",
        src.proc.stderr()
    );
    assert!(
        !mig.join().expect("migrate thread").ok,
        "the migration failed"
    );
    let st = dst.proc.wait_exit(T).expect("destination exits");
    assert!(!st.success(), "the destination ends non-zero");
    assert!(
        dst.proc
            .stderr()
            .contains("The source gave the migration up"),
        "{}",
        dst.proc.stderr()
    );
    assert_no_guest_ran(&dst.proc);
}

/// A migration in progress: a guest that touched 64 MiB, migrating at 8 MB/s (the bulk pass
/// alone takes 8 s) on a thread, its destination receiving.
struct SlowMigration {
    src: Vm,
    dst: Vm,
    uri: String,
    mig: std::thread::JoinHandle<Migration>,
    // Last: the processes end before their directory goes. Bind it (`_dir`), or a
    // destructuring `let` drops it at once.
    _dir: TempDir,
}

impl SlowMigration {
    /// `receive` gets `dst_args`.
    fn start(tag: &str, seed: u32, dst_args: &[&str]) -> SlowMigration {
        let dir = TempDir::new(tag);
        let guest = format!("touch=64M rate=1000 seed={seed}");
        let mut src = Vm::run(&dir, "src", "512M", 1, &guest);
        src.rounds(0, 1);
        let uri = format!("unix:{}", dir.join("m.sock").display());
        let dst = Vm::receive(&dir, "dst", &uri, dst_args);
        let (api, to) = (src.api.clone(), uri.clone());
        let mig = std::thread::spawn(move || migrate(&api, &to, &["--max-bandwidth", "8M"]));
        // The destination's status says when the bulk pass flows (it lasts 8 s).
        e2e::migrate::wait_bulk_pass_flows(&dst.api);
        SlowMigration {
            src,
            dst,
            uri,
            mig,
            _dir: dir,
        }
    }
}

/// A destination told to end (SIGTERM) in the middle of a migration tells the source why; the
/// source's guest runs on.
#[test]
fn a_destination_ended_mid_migration_tells_the_source() {
    require_kvm!();
    let SlowMigration {
        mut src,
        mut dst,
        mig,
        _dir,
        ..
    } = SlowMigration::start("mig-dterm", 31, &[]);
    dst.proc.signal(libc::SIGTERM);
    let st = dst.proc.wait_exit(T).expect("destination exits");
    assert!(
        st.success(),
        "SIGTERM ends the destination cleanly: {}",
        dst.proc.stderr()
    );
    let m = mig.join().expect("migrate thread");
    assert!(!m.ok, "the migration failed");
    assert!(
        m.stderr.contains("The destination gave the migration up"),
        "{}",
        m.stderr
    );
    assert!(src.proc.alive(), "the source survives");
    src.rounds(0, 1);
    assert_no_failure(&src.proc);
}

/// A source that sends just fast enough for the per-operation timeouts (8 MB/s here: the bulk
/// pass alone would take 8 s) meets the destination's overall `--deadline-ms`: the destination
/// drops it, tells it why and runs nothing; the source's guest runs on.
#[test]
fn a_slow_source_meets_the_destinations_overall_deadline() {
    require_kvm!();
    let SlowMigration {
        mut src,
        mut dst,
        mig,
        _dir,
        ..
    } = SlowMigration::start("mig-ddead", 37, &["--deadline-ms", "2500"]);
    let m = mig.join().expect("migrate thread");
    assert!(!m.ok, "the migration failed");
    assert!(
        m.stderr.contains("the migration deadline passed"),
        "the source is told why: {}",
        m.stderr
    );
    let st = dst
        .proc
        .wait_exit(T)
        .expect("the destination ends its one attempt");
    assert!(!st.success(), "a failed attempt is a failure: {st:?}");
    assert!(
        dst.proc.stderr().contains("the migration deadline passed"),
        "{}",
        dst.proc.stderr()
    );
    assert_no_guest_ran(&dst.proc);
    assert!(src.proc.alive(), "the source survives");
    src.rounds(0, 1);
    assert_no_failure(&src.proc);
}

//! A destination fed a bad, truncated or hostile stream never starts a half-restored guest,
//! and no peer can end it or hold it: probes, resets, garbage and idle peers are refused and
//! logged (with their address) while it goes on listening, a second source is told it is
//! busy, and a configuration out of its limits or a CPU it cannot offer is refused with an
//! `Error` naming what, before any guest memory exists. A destination that may retry resets
//! its memory first.

use std::time::{Duration, Instant};

use e2e::migrate::{
    assert_hashes_match, assert_keeps_verifying, assert_no_guest_ran, migrate, migrate_ok, Vm, T,
};
use e2e::peer::{self, Target};
use e2e::{free_tcp_port, require_kvm, TempDir};
use migration::wire::RecordKind;
use vmm::control::protocol::{IncomingState, IncomingStatus, Reply, Request};

/// With the default `--attempts 1`: a probe, a reset, garbage and an idle peer each end
/// nothing; meanwhile a second idle peer stays connected, and a real migration still comes in.
#[test]
fn probes_resets_garbage_and_idle_peers_do_not_end_the_destination() {
    require_kvm!();
    let dir = TempDir::new("bad-peers");
    let mut src = Vm::run(&dir, "src", "256M", 1, "touch=16M rate=2000 seed=31");
    let port = free_tcp_port();
    let t = Target::Tcp(port);
    let mut dst = Vm::receive(&dir, "dst", &t.uri(), &["--handshake-timeout-ms", "3000"]);
    peer::probe(&t);
    peer::reset(port);
    let (kind, text) = peer::send_and_reply(&t, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("garbage gets a reply");
    assert_eq!(kind, RecordKind::Error);
    assert!(text.contains("not a minivmm migration stream"), "{text}");
    // An idle peer is dropped at the handshake deadline, and told so.
    let started = Instant::now();
    let mut idle = t.connect();
    let (kind, text) = peer::reply(&mut idle, T).expect("the idle peer gets a reply");
    assert_eq!(kind, RecordKind::Error);
    assert!(text.contains("handshake deadline passed"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(dst.proc.alive(), "{}", dst.proc.stderr());
    // Another idle peer holds nobody up: the real source comes in next to it.
    let _idle = t.connect();
    src.rounds(0, 1);
    let stats = migrate_ok(&mut src, &t.uri(), &["--verify-memory"]);
    assert_hashes_match(&stats);
    assert_keeps_verifying(&mut dst, 1);
    let err = dst.proc.stderr();
    assert!(
        err.contains("Connection from 127.0.0.1:")
            && err.contains("closed without sending anything"),
        "the probe is logged with its address: {err}"
    );
    assert!(
        err.contains("refused before a migration began") && err.contains("Bad magic"),
        "the garbage is logged: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A second source while a migration is in progress is told the destination is busy, at
/// once; its guest runs on, and the first migration completes undisturbed. The unix socket
/// the destination listens on is 0600.
#[test]
fn a_second_source_is_told_the_destination_is_busy() {
    require_kvm!();
    let dir = TempDir::new("busy");
    let mut first = Vm::run(&dir, "first", "256M", 1, "touch=16M rate=1000 seed=32");
    let mut second = Vm::run(&dir, "second", "64M", 1, "touch=1M rate=1000 seed=33");
    first.rounds(0, 1);
    let sock = dir.join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    // A umask that would let anyone connect does not.
    let mut dst = Vm::receive(&dir, "dst", &uri, &[]);
    assert_eq!(peer::mode(&sock), 0o600);
    let (api, to) = (first.api.clone(), uri.clone());
    // 16 MiB at 4 MB/s: the bulk pass lasts about 4 s.
    let mig = std::thread::spawn(move || migrate(&api, &to, &["--max-bandwidth", "4M"]));
    e2e::migrate::wait_bulk_pass_flows(&dst.api);
    let started = Instant::now();
    let m = migrate(&second.api, &uri, &[]);
    assert!(!m.ok, "the second migration fails: {:?}", m.reply);
    let said = format!("{} {:?}", m.stderr, m.reply);
    assert!(
        said.contains("busy: receiving a migration from a local process (pid"),
        "{said}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "told at once");
    second.rounds(0, 1);
    let m = mig.join().expect("first migration");
    assert!(m.ok, "the first migration completes: {}", m.stderr);
    assert_keeps_verifying(&mut dst, 1);
    assert!(first.proc.wait_exit(T).is_some_and(|s| s.success()));
    assert!(
        dst.proc.stderr().contains("refused: busy"),
        "{}",
        dst.proc.stderr()
    );
}

/// Configurations a destination refuses before it allocates or maps guest memory, each with
/// an `Error` naming the value and the limit, none of them an attempt (`--attempts 1`, and
/// it goes on waiting): memory beyond its `--max-mem`, beyond the hard limit, 255 vCPUs,
/// more vCPUs than `--max-cpus`, a CPUID feature this host does not offer, nested
/// virtualisation, an MSR this host cannot restore; and, for a destination built with
/// `--mem/--cpus`, another shape.
#[test]
fn configurations_beyond_the_limits_or_the_cpu_are_refused_before_any_memory() {
    require_kvm!();
    let dir = TempDir::new("bad-config");
    let sock = dir.join("mig.sock");
    let t = Target::Unix(sock.clone());
    let mut dst = Vm::receive(
        &dir,
        "dst",
        &t.uri(),
        &["--max-mem", "1G", "--max-cpus", "1"],
    );
    let good = vmm::test_utils::host_migration_config(256 << 20, 1).expect("host config");
    let refuse = |f: &dyn Fn(&mut vmm::persist::MigrationConfig), needle: &str| {
        let mut c = good.clone();
        f(&mut c);
        let text = peer::refusal_of(&t, &c);
        assert!(text.contains(needle), "expected {needle:?} in {text:?}");
        text
    };
    refuse(
        &|c| c.mem_bytes = 3 << 40,
        "the stream's mem_bytes 3298534883328 (3T) is above this destination's --max-mem 1G",
    );
    refuse(
        &|c| c.mem_bytes = 1 << 52,
        "the stream's mem_bytes 4503599627370496 (4096T) is above the maximum of 4T",
    );
    refuse(
        &|c| c.cpus = 255,
        "the stream's cpus 255 is above the maximum of 254",
    );
    refuse(
        &|c| c.cpus = 2,
        "the stream's cpus 2 is above this destination's --max-cpus 1",
    );
    // A leaf 7 feature bit this host's KVM does not offer.
    let leaf7 = good
        .cpuid
        .iter()
        .position(|e| e.leaf == 7 && e.subleaf == 0)
        .expect("leaf 7");
    let bit = (0..32)
        .map(|b| 1u32 << b)
        .find(|b| good.cpuid[leaf7].ebx & b == 0)
        .expect("a bit this host lacks");
    let text = refuse(
        &|c| c.cpuid[leaf7].ebx |= bit,
        &format!("CPUID leaf 0x7 subleaf 0 EBX: the guest has bits {bit:#010x} that this host's KVM does not offer"),
    );
    eprintln!("refused: {text}");
    // Nested virtualisation is never offered (VMX on Intel, SVM on AMD).
    let vendor_amd = good
        .cpuid
        .iter()
        .any(|e| e.leaf == 0 && e.ebx == 0x6874_7541);
    let (leaf, bit) = if vendor_amd {
        (0x8000_0001, 1 << 2)
    } else {
        (1, 1 << 5)
    };
    let i = good
        .cpuid
        .iter()
        .position(|e| e.leaf == leaf)
        .expect("feature leaf");
    refuse(
        &|c| c.cpuid[i].ecx |= bit,
        "that this host's KVM does not offer",
    );
    refuse(
        &|c| c.msrs.push(0x4b56_4dff),
        "the source saves MSR 0x4b564dff of each vCPU, which this host's KVM cannot restore",
    );
    assert!(
        dst.proc.alive(),
        "no refusal is an attempt: {}",
        dst.proc.stderr()
    );
    // The last refusal was sent as the receiver went back to waiting.
    let deadline = Instant::now() + T;
    loop {
        let r = e2e::control::<IncomingStatus>(&dst.api, &Request::Status).expect("status");
        if matches!(&r, Reply::Ok(s) if s.state == IncomingState::Waiting) {
            break;
        }
        assert!(Instant::now() < deadline, "{r:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        dst.proc.rss_kib() < 256 * 1024,
        "nothing of 3T or 4096T was allocated: RSS {} KiB",
        dst.proc.rss_kib()
    );
    assert_no_guest_ran(&dst.proc);
    drop(dst);

    // Built for 512 MiB and one vCPU: a 256 MiB guest is refused, not rebuilt.
    let t = Target::Unix(dir.join("built.sock"));
    let mut built = Vm::receive(&dir, "built", &t.uri(), &["--mem", "512M", "--cpus", "1"]);
    let text = peer::refusal_of(&t, &good);
    assert!(
        text.contains("the stream's guest has 256M of memory and 1 vCPUs; this destination was built for 512M and 1"),
        "{text}"
    );
    assert!(built.proc.alive(), "{}", built.proc.stderr());
}

#[test]
fn truncated_snapshot_is_refused() {
    require_kvm!();
    let dir = TempDir::new("bad-snap");
    let mut src = Vm::run(&dir, "src", "256M", 1, "touch=16M rate=0 seed=21");
    src.rounds(0, 1);
    let snap = dir.join("vm.snap");
    migrate_ok(&mut src, &format!("file:{}", snap.display()), &[]);
    let len = std::fs::metadata(&snap).expect("snapshot").len();
    for cut in [16, len / 2, len - 8] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&snap)
            .expect("open");
        f.set_len(cut).expect("truncate");
        drop(f);
        let mut p = e2e::Proc::minivmm(
            "restore-truncated",
            &[
                "receive",
                "--from",
                &format!("file:{}", snap.display()),
                "--api-socket",
                dir.join("r.api").to_str().unwrap(),
            ],
        );
        let st = p.wait_exit(T).expect("exits");
        assert!(!st.success(), "truncated at {cut}: must fail");
        let err = p.stderr();
        assert!(
            err.contains("error") && !err.contains("panicked"),
            "cut {cut}: {err}"
        );
        assert_no_guest_ran(&p);
    }
}

/// An attempt that dies mid-stream, retried into the same destination process: the destination
/// makes its memory pristine again before it accepts elided pages, and ends identical.
#[test]
fn retry_into_the_same_destination_after_a_broken_attempt() {
    require_kvm!();
    let dir = TempDir::new("retry");
    // The first migration fails at the final pass (the bulk pass is in the destination's
    // memory by then); the fault fires once per process, the retry runs clean.
    let fault = [("MINIVMM_FAULT", "final-pass:fail")];
    let mut src = Vm::run_env(&dir, "src", "1G", 1, "touch=128M rate=5000 seed=22", &fault);
    src.rounds(0, 1);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &["--attempts", "2"]);
    let m = migrate(&src.api, &uri, &[]);
    assert!(
        !m.ok,
        "the injected failure fails the attempt: {:?}",
        m.reply
    );
    assert!(src.proc.alive(), "source survives");
    src.rounds(0, 1);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        dst.proc.alive(),
        "destination waits for the retry: {}",
        dst.proc.stderr()
    );
    let stats = migrate_ok(&mut src, &uri, &["--verify-memory"]);
    assert_hashes_match(&stats);
    assert_keeps_verifying(&mut dst, 1);
}

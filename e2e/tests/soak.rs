//! Soak: ping-pong migrations of a busy 2-vCPU guest (A to B to A ...), alternating unix and
//! tcp, each checked: the destination's guest verifies, the source hands over and ends, the
//! memory hashes match. Every tenth migration is preceded by a faulted attempt at a random
//! pre-commit point (random side, action), aimed at one long-lived `receive --attempts`
//! process: the guest must stay where it was, the long-lived receiver must never run it and
//! must take the next attempt; its file-descriptor count and RSS are sampled after every
//! faulted attempt and must stay flat from start to end (printed).
//!
//! `make test` runs 10 migrations; `make soak` runs 100 (`MINIVMM_SOAK_MIGRATIONS`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::guest::{assert_no_failure, wait_verify};
use e2e::migrate::{assert_hashes_match, migrate, Vm, T};
use e2e::{free_tcp_port, require_kvm, TempDir};
use migration::fault::FaultPoint;
use vmm::control::protocol::Reply;

const GUEST: &str = "touch=32M rate=5000 verify_ms=200";
const FLAGS: &[&str] = &[
    "--verify-memory",
    "--io-timeout-ms",
    "2000",
    "--handshake-timeout-ms",
    "3000",
    "--switchover-timeout-ms",
    "3000",
];
const ACTIONS: &[&str] = &["fail", "silence", "stall:2500"];
/// Added for a faulted attempt, so that it reaches every pre-commit point, `mid-dirty`
/// included: no downtime fits 0 ms while pages are dirty, and at 128 MB/s the bulk pass of
/// 32 MiB lasts long enough (a quarter of a second) that the guest always writes during it.
const FAULTED_FLAGS: &[&str] = &[
    "--downtime-ms",
    "0",
    "--max-passes",
    "3",
    "--max-bandwidth",
    "128M",
];

/// Deterministic pseudo-random numbers, SplitMix64 (the seed is printed, to replay a run).
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

struct Node {
    vm: Vm,
    fault: PathBuf,
}

fn fault_file(dir: &TempDir, name: &str) -> (PathBuf, String) {
    let p = dir.join(&format!("{name}.fault"));
    std::fs::write(&p, "").expect("fault file");
    let env = format!("@{}", p.display());
    (p, env)
}

fn endpoint(dir: &TempDir, n: usize) -> String {
    if n.is_multiple_of(2) {
        format!("unix:{}", dir.join(&format!("m{n}.sock")).display())
    } else {
        format!("tcp:127.0.0.1:{}", free_tcp_port())
    }
}

/// The guest keeps verifying in `node` (new VERIFY-OK lines on both vCPUs, no failure).
fn verifies(node: &mut Node) {
    let from = node.vm.proc.line_count();
    for cpu in 0..2 {
        wait_verify(&mut node.vm.proc, from, cpu, T);
    }
    assert_no_failure(&node.vm.proc);
}

#[test]
fn soak_ping_pong_with_faults() {
    require_kvm!();
    let total: usize = std::env::var("MINIVMM_SOAK_MIGRATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let seed = std::env::var("MINIVMM_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    eprintln!("soak: {total} migrations, seed {seed}");
    let mut rng = Rng(seed);
    // Faults that leave the guest at the source whichever side they hit: every point before
    // `Restored` (from there on a silenced receiver could take the guest).
    let pre_commit: Vec<FaultPoint> = FaultPoint::ALL
        .into_iter()
        .take_while(|p| *p != FaultPoint::BeforeGo)
        .collect();
    let dir = TempDir::new("soak");

    // The long-lived receiver, target of every faulted attempt.
    let (l_fault, l_env) = fault_file(&dir, "long");
    let l_uri = format!("unix:{}", dir.join("long.sock").display());
    let mut long = Node {
        vm: Vm::receive_env(
            &dir,
            "long",
            &l_uri,
            &[
                "--attempts",
                "100",
                "--io-timeout-ms",
                "2000",
                "--handshake-timeout-ms",
                "3000",
            ],
            &[("MINIVMM_FAULT", &l_env)],
        ),
        fault: l_fault,
    };
    let (fault, env) = fault_file(&dir, "a0");
    let mut here = Node {
        vm: Vm::run_env(&dir, "a0", "512M", 2, GUEST, &[("MINIVMM_FAULT", &env)]),
        fault,
    };
    verifies(&mut here);

    let started = Instant::now();
    let mut samples: Vec<(usize, u64)> = Vec::new();
    let mut faulted = 0;
    // Every tenth migration; every fifth in the short run, for more than one sample.
    let every = if total >= 50 { 10 } else { 5 };
    for n in 1..=total {
        if n.is_multiple_of(every) {
            // A faulted attempt at the long-lived receiver: the guest stays here.
            let point = pre_commit[rng.next(pre_commit.len())];
            let action = ACTIONS[rng.next(ACTIONS.len())];
            let on_source = rng.next(2) == 0;
            let spec = format!("{point}:{action}");
            let armed = if on_source { &here.fault } else { &long.fault };
            std::fs::write(armed, &spec).expect("arm");
            let m = migrate(&here.vm.api, &l_uri, &[FLAGS, FAULTED_FLAGS].concat());
            std::fs::write(armed, "").expect("disarm");
            eprintln!(
                "soak {n}: faulted attempt {spec} on the {}: {}",
                if on_source { "source" } else { "receiver" },
                if m.ok {
                    "completed?!"
                } else {
                    "failed, as it must"
                }
            );
            assert!(
                !m.ok,
                "a pre-commit fault {spec} cannot complete: {:?}",
                m.reply
            );
            // Stalled processes finish their stall before the verdict.
            std::thread::sleep(Duration::from_millis(3000));
            assert!(here.vm.proc.alive(), "the source keeps the guest");
            verifies(&mut here);
            assert!(
                long.vm.proc.alive(),
                "the long-lived receiver takes the next attempt"
            );
            e2e::migrate::assert_no_guest_ran(&long.vm.proc);
            faulted += 1;
            // A probe that fails at the first page record: the receiver resets its memory
            // for it and takes nothing more, so every sample is taken in the same state.
            std::fs::write(&here.fault, "mid-bulk:fail").expect("arm");
            let probe = migrate(&here.vm.api, &l_uri, FLAGS);
            std::fs::write(&here.fault, "").expect("disarm");
            assert!(!probe.ok, "the probe fails: {:?}", probe.reply);
            std::thread::sleep(Duration::from_millis(300));
            samples.push((fd_count(long.vm.proc.pid()), long.vm.proc.rss_kib()));
        }
        let uri = endpoint(&dir, n);
        let name = format!("{}{n}", if n.is_multiple_of(2) { "a" } else { "b" });
        let (fault, env) = fault_file(&dir, &name);
        let mut next = Node {
            vm: Vm::receive_env(&dir, &name, &uri, &[], &[("MINIVMM_FAULT", &env)]),
            fault,
        };
        let m = migrate(&here.vm.api, &uri, FLAGS);
        let summary = match m.reply {
            Some(Reply::Ok(s)) if m.ok => s,
            other => panic!("soak {n} to {uri}: {other:?}\n{}", m.stderr),
        };
        assert_hashes_match(&summary);
        assert!(
            here.vm.proc.wait_exit(T).is_some_and(|s| s.success()),
            "soak {n}: the source hands over and ends"
        );
        verifies(&mut next);
        here = next;
    }
    // The long-lived receiver takes one more attempt and runs the guest.
    let m = migrate(&here.vm.api, &l_uri, FLAGS);
    assert!(
        m.ok,
        "the long-lived receiver finally receives: {}",
        m.stderr
    );
    verifies(&mut long);
    eprintln!(
        "soak: {total} migrations and {faulted} faulted attempts in {:.1} s, 0 verification \
         failures; long-lived receiver after each faulted attempt (fds, RSS KiB): {samples:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(samples.len() >= 2, "at least two samples");
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        assert!(
            samples.iter().all(|s| s.0 == first.0),
            "file descriptors leak: {samples:?}"
        );
        assert!(
            last.1 <= first.1 + 4 * 1024,
            "RSS grows from attempt to attempt: {samples:?}"
        );
    }
}

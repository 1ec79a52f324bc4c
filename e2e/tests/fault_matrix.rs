//! The fault matrix: every fault point × every action, on each side of a migration, over unix
//! and over tcp, with real minivmm processes and the built-in test guest (2 vCPUs, a writer,
//! verifying itself). Each cell checks the invariant from what the processes *print*, not
//! from what they claim: afterwards the guest's `VERIFY-OK` lines advance in exactly one
//! process, or, only where the two sides cannot know each other's state, in none while the
//! source says the outcome is unknown; then `resume --force` brings it back. The survivor's
//! guest verifies itself, and a fresh migration from the survivor (with `--verify-memory`)
//! then succeeds; its destination is the next cell's source.
//!
//! Faults are armed through `MINIVMM_FAULT=@FILE`: every process reads its own fault file at
//! the start of each migration, so one long-lived process serves many cells. Short deadlines
//! keep the matrix to a few minutes. Each cell's outcome must be one the protocol allows for
//! it ([`allowed`]); the table goes to `target/fault-matrix-<transport>.md` (README).

use std::fmt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use e2e::control;
use e2e::guest::{assert_no_failure, VerifyOk};
use e2e::migrate::{assert_hashes_match, migrate, Vm, T};
use e2e::{free_tcp_port, require_kvm, TempDir};
use migration::fault::{FaultAction, FaultPoint};
use vmm::control::protocol::{Done, Reply, Request, ResumeRequest};

/// How long a `stall` sleeps: well past every deadline below (a loaded machine stretches
/// everything else).
const STALL_MS: u64 = 3000;
/// The source's bounds (`migrate` flags), and a policy that always runs a dirty pass, so that
/// every cell reaches the `mid-dirty` point: no downtime fits 0 ms while pages are dirty (the
/// third pass is the last live one), and at 128 MB/s the bulk pass of the guest's 16 MiB
/// lasts over 100 ms, long enough that the guest always writes during it (a bulk pass of
/// 20 ms on a quiet machine sometimes saw no write, and pre-copy went straight to the final
/// pass).
const SOURCE_FLAGS: &[&str] = &[
    "--max-bandwidth",
    "128M",
    "--connect-timeout-ms",
    "1500",
    "--io-timeout-ms",
    "1000",
    "--handshake-timeout-ms",
    "1500",
    "--switchover-timeout-ms",
    "1500",
    "--downtime-ms",
    "0",
    "--max-passes",
    "3",
];
/// The destination's bounds (`receive` flags).
const DEST_FLAGS: &[&str] = &[
    "--io-timeout-ms",
    "1000",
    "--handshake-timeout-ms",
    "1500",
    "--commit-timeout-ms",
    "600",
];
/// The guest: 2 vCPUs writing and verifying every 100 ms.
const GUEST: &str = "touch=16M rate=2000 verify_ms=100";
/// How long the observer watches each process for new `VERIFY-OK` lines at least, and at
/// most while neither shows any (a loaded machine may starve a running guest for a while).
const WATCH: Duration = Duration::from_millis(700);
const WATCH_MAX: Duration = Duration::from_secs(8);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Unix,
    Tcp,
}

#[derive(Clone, Copy, Debug)]
struct Cell {
    side: Side,
    point: FaultPoint,
    action: FaultAction,
}

impl Cell {
    fn spec(&self) -> String {
        match self.action {
            FaultAction::Stall(_) => format!("{}:stall:{STALL_MS}", self.point),
            a => format!("{}:{}", self.point, a.name()),
        }
    }
}

/// Where the guest runs after a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// The migration failed; the source's guest runs on.
    Source,
    /// The migration completed; the guest runs at the destination.
    Destination,
    /// The guest runs at the destination; the source never got its confirmation and holds
    /// its paused copy, saying the outcome is unknown (the operator shuts it down).
    DestinationSourceHeld,
    /// The guest runs nowhere; the source says the outcome is unknown, and `resume --force`
    /// runs it there again.
    ForcedSource,
    /// The source process was killed before the commit: the guest ended with it, and the
    /// destination never ran it.
    LostWithSource,
    /// The destination process was killed after the migration completed: the guest ended
    /// with it (the source had handed it over and ended).
    LostWithDestination,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Source => "source",
            Outcome::Destination => "destination",
            Outcome::DestinationSourceHeld => "destination (source held: unknown)",
            Outcome::ForcedSource => "none, source unknown; resume --force: source",
            Outcome::LostWithSource => "none: source killed before the commit",
            Outcome::LostWithDestination => "none: destination killed after completion",
        })
    }
}

/// The outcomes the protocol allows for a cell (FORMAT.md 4.4). More than one where a race
/// decides, e.g. whether a dying destination's socket refuses `Go` (not delivered: the source
/// keeps the guest) or takes it first (unknown).
fn allowed(c: &Cell) -> &'static [Outcome] {
    use FaultAction::*;
    use FaultPoint::*;
    use Outcome::*;
    match (c.side, c.point, c.action) {
        // The source: before `Go` it keeps the guest unless it dies.
        (Side::Source, p, Kill) if p != BeforeRunning && p != AfterRunning => &[LostWithSource],
        (Side::Source, BeforeRunning | AfterRunning, Kill) => &[Destination],
        (Side::Source, BeforeRunning, Fail) => &[DestinationSourceHeld],
        (Side::Source, BeforeRunning | AfterRunning, _) => &[Destination],
        (Side::Source, _, _) => &[Source],
        // The destination: before it sent `Restored` any fault leaves the guest at the source.
        (Side::Destination, BeforeGo, Kill) => &[Source, ForcedSource],
        (Side::Destination, BeforeGo, Stall(_)) => &[ForcedSource, Source],
        (Side::Destination, BeforeGo, Fail) => &[Source],
        (Side::Destination, BeforeGo, Silence) => &[DestinationSourceHeld],
        (Side::Destination, BeforeRunning, Kill) => &[ForcedSource],
        (Side::Destination, BeforeRunning, _) => &[DestinationSourceHeld],
        (Side::Destination, AfterRunning, Kill) => &[LostWithDestination],
        (Side::Destination, AfterRunning, _) => &[Destination],
        (Side::Destination, _, _) => &[Source],
    }
}

fn all_cells() -> Vec<Cell> {
    let actions = [
        FaultAction::Kill,
        FaultAction::Stall(Duration::from_millis(STALL_MS)),
        FaultAction::Fail,
        FaultAction::Silence,
    ];
    let mut cells = Vec::new();
    for side in [Side::Source, Side::Destination] {
        for point in FaultPoint::ALL {
            for action in actions {
                cells.push(Cell {
                    side,
                    point,
                    action,
                });
            }
        }
    }
    cells
}

/// A minivmm process and the fault file it reads before each migration.
struct Node {
    vm: Vm,
    fault: PathBuf,
}

impl Node {
    fn arm(&self, spec: &str) {
        std::fs::write(&self.fault, spec).expect("write fault file");
    }

    fn disarm(&self) {
        let _ = std::fs::write(&self.fault, "");
    }
}

struct Chain {
    dir: TempDir,
    transport: Transport,
    /// `s` or `d`: the side this chain faults.
    side_tag: &'static str,
    n: usize,
}

impl Chain {
    fn fault_env(&self, name: &str) -> (PathBuf, String) {
        let path = self.dir.join(&format!("{name}.fault"));
        std::fs::write(&path, "").expect("fault file");
        let spec = format!("@{}", path.display());
        (path, spec)
    }

    /// A name unique over all chains, for the logs.
    fn name(&self, what: &str) -> String {
        let t = match self.transport {
            Transport::Unix => "u",
            Transport::Tcp => "t",
        };
        format!("{t}{}-{what}{}", self.side_tag, self.n)
    }

    fn boot(&mut self) -> Node {
        self.n += 1;
        let name = self.name("src");
        let (fault, env) = self.fault_env(&name);
        let cmdline = format!("{GUEST} seed={}", self.n);
        let mut vm = Vm::run_env(
            &self.dir,
            &name,
            "256M",
            2,
            &cmdline,
            &[("MINIVMM_FAULT", &env)],
        );
        for cpu in 0..2 {
            vm.rounds(cpu, 1);
        }
        Node { vm, fault }
    }

    fn endpoint(&self) -> String {
        match self.transport {
            Transport::Unix => format!(
                "unix:{}",
                self.dir.join(&format!("m{}.sock", self.n)).display()
            ),
            Transport::Tcp => format!("tcp:127.0.0.1:{}", free_tcp_port()),
        }
    }

    fn receive(&mut self, uri: &str) -> Node {
        self.n += 1;
        let name = self.name("dst");
        let (fault, env) = self.fault_env(&name);
        let vm = Vm::receive_env(
            &self.dir,
            &name,
            uri,
            DEST_FLAGS,
            &[("MINIVMM_FAULT", &env)],
        );
        Node { vm, fault }
    }
}

/// Whether `vm`'s guest prints new `VERIFY-OK` lines from `from` on within the watch.
fn advanced(vm: &mut Vm, from: usize) -> bool {
    vm.proc
        .lines()
        .iter()
        .skip(from)
        .any(|l| VerifyOk::parse(l).is_some())
}

/// Watches both processes: which ones' guests advance. At least [`WATCH`], and until one of
/// them shows progress (at most [`WATCH_MAX`]): the other one's silence is judged over the
/// same window, however long the running one took to show itself.
fn watch(a: &mut Vm, b: &mut Vm) -> (bool, bool) {
    let (fa, fb) = (a.proc.line_count(), b.proc.line_count());
    let started = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(100));
        let ra = a.proc.alive() && advanced(a, fa);
        let rb = b.proc.alive() && advanced(b, fb);
        let waited = started.elapsed();
        if (waited >= WATCH && (ra || rb)) || waited >= WATCH_MAX {
            return (ra, rb);
        }
    }
}

/// Whether the process died of SIGKILL (a `kill` fault).
fn killed(vm: &mut Vm) -> bool {
    use std::os::unix::process::ExitStatusExt;
    vm.proc
        .wait_exit(Duration::from_secs(1))
        .is_some_and(|s| s.signal() == Some(libc::SIGKILL))
}

fn outcome_unknown(api: &Path) -> bool {
    control(api, &Request::Status)
        .ok()
        .and_then(|r: Reply<vmm::control::protocol::VmStatus>| r.into_result().ok())
        .and_then(|s| s.migration)
        .is_some_and(|m| m.outcome_unknown)
}

/// Runs one cell from `src`; returns the outcome and the node the guest survives in.
fn run_cell(chain: &mut Chain, mut src: Node, cell: &Cell) -> (Outcome, Option<Node>) {
    let uri = chain.endpoint();
    let mut dst = chain.receive(&uri);
    match cell.side {
        Side::Source => src.arm(&cell.spec()),
        Side::Destination => dst.arm(&cell.spec()),
    }
    let m = migrate(&src.vm.api, &uri, SOURCE_FLAGS);
    src.disarm();
    dst.disarm();
    // A stalled process finishes its stall (and acts on what it finds) before the verdict.
    if matches!(cell.action, FaultAction::Stall(_)) {
        thread::sleep(Duration::from_millis(STALL_MS + 500));
    } else {
        thread::sleep(Duration::from_millis(200));
    }
    let src_alive = src.vm.proc.alive();
    let (src_runs, dst_runs) = watch(&mut src.vm, &mut dst.vm);
    assert!(
        !(src_runs && dst_runs),
        "{cell:?}: the guest runs in BOTH processes\nmigrate: {}\nsource: {}\ndestination: {}",
        m.stderr,
        src.vm.proc.stderr(),
        dst.vm.proc.stderr()
    );
    let held = src_alive && src.vm.proc.alive() && outcome_unknown(&src.vm.api);
    let outcome = match (src_runs, dst_runs) {
        (true, true) => unreachable!("asserted above"),
        (true, false) => Outcome::Source,
        (false, true) if held => Outcome::DestinationSourceHeld,
        (false, true) => Outcome::Destination,
        (false, false) if held => {
            assert!(
                m.stderr.contains("utcome unknown"),
                "{cell:?}: migrate must say the outcome is unknown: {}",
                m.stderr
            );
            let r: Reply<Done> = control(
                &src.vm.api,
                &Request::Resume(ResumeRequest { force: false }),
            )
            .expect("resume");
            assert!(
                matches!(&r, Reply::Error(e) if e.contains("outcome unknown")),
                "{cell:?}: a plain resume must be refused: {r:?}"
            );
            let r: Reply<Done> =
                control(&src.vm.api, &Request::Resume(ResumeRequest { force: true }))
                    .expect("resume --force");
            assert!(r.is_ok(), "{cell:?}: resume --force: {r:?}");
            Outcome::ForcedSource
        }
        (false, false) if m.ok && killed(&mut dst.vm) => Outcome::LostWithDestination,
        (false, false) if !m.ok && killed(&mut src.vm) => Outcome::LostWithSource,
        (false, false) => panic!(
            "{cell:?}: the guest runs nowhere and nobody says why\nmigrate ok={} {}\nsource: {}\n\
             destination: {}",
            m.ok,
            m.stderr,
            src.vm.proc.stderr(),
            dst.vm.proc.stderr()
        ),
    };
    let survivor = match outcome {
        Outcome::Source | Outcome::ForcedSource => {
            dst.vm.proc.kill();
            Some(src)
        }
        Outcome::Destination | Outcome::DestinationSourceHeld => {
            // The held source ends on the operator's word; a completed one has ended.
            src.vm.proc.kill();
            Some(dst)
        }
        Outcome::LostWithSource | Outcome::LostWithDestination => None,
    };
    (outcome, survivor)
}

/// The survivor's guest verifies, and a clean migration from it succeeds with matching
/// memory hashes: its destination is returned for the next cell.
fn hand_on(chain: &mut Chain, mut node: Node, cell: &Cell) -> Node {
    let from = node.vm.proc.line_count();
    for cpu in 0..2 {
        e2e::guest::wait_verify(&mut node.vm.proc, from, cpu, T);
    }
    assert_no_failure(&node.vm.proc);
    let uri = chain.endpoint();
    let mut next = chain.receive(&uri);
    let mut flags = SOURCE_FLAGS.to_vec();
    flags.push("--verify-memory");
    let m = migrate(&node.vm.api, &uri, &flags);
    let summary = match m.reply {
        Some(Reply::Ok(s)) if m.ok => s,
        other => panic!(
            "after {cell:?}, a fresh migration from the survivor failed: {other:?}\n{}",
            m.stderr
        ),
    };
    assert_hashes_match(&summary);
    assert!(
        node.vm.proc.wait_exit(T).is_some_and(|s| s.success()),
        "the source ends after handing over"
    );
    let from = next.vm.proc.line_count();
    for cpu in 0..2 {
        e2e::guest::wait_verify(&mut next.vm.proc, from, cpu, T);
    }
    next
}

fn run_chain(transport: Transport, side: Side) -> Vec<(Cell, Outcome)> {
    let mut chain = Chain {
        dir: TempDir::new(&format!("matrix-{transport:?}-{side:?}").to_lowercase()),
        transport,
        side_tag: match side {
            Side::Source => "s",
            Side::Destination => "d",
        },
        n: 0,
    };
    let mut src = Some(chain.boot());
    let mut results = Vec::new();
    for cell in all_cells().into_iter().filter(|c| c.side == side) {
        let started = Instant::now();
        let node = src.take().unwrap_or_else(|| chain.boot());
        let (outcome, survivor) = run_cell(&mut chain, node, &cell);
        eprintln!(
            "[matrix {transport:?}] {:?} {} {}: {outcome} ({} ms)",
            cell.side,
            cell.point,
            cell.action.name(),
            started.elapsed().as_millis()
        );
        assert!(
            allowed(&cell).contains(&outcome),
            "{transport:?} {cell:?}: outcome {outcome} is not one of {:?}",
            allowed(&cell)
        );
        src = survivor.map(|n| hand_on(&mut chain, n, &cell));
        results.push((cell, outcome));
    }
    results
}

fn table(results: &[(Cell, Outcome)]) -> String {
    let mut s = String::from(
        "| side | point | kill | stall | fail | silence |\n|---|---|---|---|---|---|\n",
    );
    for side in [Side::Source, Side::Destination] {
        for point in FaultPoint::ALL {
            let cell = |a: &str| {
                results
                    .iter()
                    .find(|(c, _)| c.side == side && c.point == point && c.action.name() == a)
                    .map_or("-".to_string(), |(_, o)| o.to_string())
            };
            s.push_str(&format!(
                "| {} | {point} | {} | {} | {} | {} |\n",
                match side {
                    Side::Source => "source",
                    Side::Destination => "destination",
                },
                cell("kill"),
                cell("stall"),
                cell("fail"),
                cell("silence"),
            ));
        }
    }
    s
}

fn report(transport: Transport, results: &[(Cell, Outcome)]) {
    let t = table(results);
    eprintln!("fault matrix over {transport:?}:\n{t}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let name = format!("fault-matrix-{transport:?}.md").to_lowercase();
    let _ = std::fs::write(dir.join(name), t);
}

/// Four chains at once (each transport, each side), each a line of processes handing the
/// guest on from cell to cell.
#[test]
fn fault_matrix_over_unix_and_tcp() {
    require_kvm!();
    let mut chains = Vec::new();
    for t in [Transport::Unix, Transport::Tcp] {
        for side in [Side::Source, Side::Destination] {
            chains.push((t, side, thread::spawn(move || run_chain(t, side))));
        }
    }
    let mut results: Vec<(Transport, Vec<(Cell, Outcome)>)> = Vec::new();
    let mut failed = None;
    for (t, side, h) in chains {
        match h.join() {
            Ok(r) => match results.iter_mut().find(|(rt, _)| *rt == t) {
                Some((_, all)) => all.extend(r),
                None => results.push((t, r)),
            },
            Err(e) => {
                eprintln!("the {t:?} chain of {side:?} faults failed");
                failed = Some(e);
            }
        }
    }
    if let Some(e) = failed {
        std::panic::resume_unwind(e);
    }
    for (t, r) in &results {
        assert_eq!(r.len(), all_cells().len());
        report(*t, r);
    }
}

/// A vCPU that cannot answer the pause: the VM's console is a pipe nobody reads, so the
/// vCPUs block writing their `VERIFY-OK` lines. The migration fails at the pause, every vCPU
/// runs again (none stays paused), and once the console drains the guest verifies on and a
/// fresh migration succeeds.
#[test]
fn a_vcpu_stuck_on_its_console_fails_the_pause_and_the_guest_runs_on() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    require_kvm!();
    let dir = TempDir::new("stuck-console");
    let api = dir.join("src.api");
    // verify_ms=1: thousands of lines a second fill the pipe at once.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Command::new(e2e::minivmm_bin())
        .args([
            "run",
            "--mem",
            "256M",
            "--cpus",
            "2",
            "--cmdline",
            "touch=16M rate=2000 verify_ms=1",
            "--api-socket",
            api.to_str().expect("utf-8 path"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn minivmm");
    let mut console = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let mut child = KillOnDrop(child);
    // A one-page pipe, set before the guest prints much: it fills at once.
    {
        use std::os::fd::AsRawFd;
        // SAFETY: F_SETPIPE_SZ on our end of the child's stdout pipe; no memory is involved.
        let rc = unsafe { libc::fcntl(console.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        assert!(
            rc >= 4096,
            "F_SETPIPE_SZ: {}",
            std::io::Error::last_os_error()
        );
    }
    let errors = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + T;
    while std::os::unix::net::UnixStream::connect(&api).is_err() {
        assert!(Instant::now() < deadline, "control socket never appeared");
        thread::sleep(Duration::from_millis(20));
    }
    // Wait until the pipe is full and stays so: the vCPUs are stuck writing to it.
    let unread = |fd: &std::process::ChildStdout| -> i32 {
        use std::os::fd::AsRawFd;
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, which points at `n`.
        unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
        n
    };
    let deadline = Instant::now() + T;
    let (mut last, mut still) = (-1, 0);
    loop {
        let n = unread(&console);
        still = if n == last { still + 1 } else { 0 };
        if n >= 3 * 1024 && still >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the console never filled ({n} bytes)"
        );
        last = n;
        thread::sleep(Duration::from_millis(300));
    }
    let uri = format!("unix:{}", dir.join("m.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &[]);
    let m = migrate(&api, &uri, &[]);
    assert!(!m.ok, "the pause cannot complete");
    assert!(
        m.stderr.contains("did not answer"),
        "migrate names the stuck vCPU: {}",
        m.stderr
    );
    assert_eq!(
        e2e::vm_status(&api).state,
        vmm::RunState::Running,
        "a failed pause leaves the VM running"
    );
    e2e::migrate::assert_no_guest_ran(&dst.proc);
    dst.proc.kill();
    // Drain the console: the guest goes on and keeps verifying.
    let reader = thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            match console.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
        (console, out)
    });
    let (console, out) = reader.join().expect("reader");
    let text = String::from_utf8_lossy(&out);
    let fresh = text.lines().rev().take(200).collect::<Vec<_>>();
    assert!(
        fresh
            .iter()
            .any(|l| l.starts_with("VERIFY-OK") && l.contains("cpu=0"))
            && fresh
                .iter()
                .any(|l| l.starts_with("VERIFY-OK") && l.contains("cpu=1")),
        "both vCPUs verify on after the failed pause"
    );
    assert!(
        !text.contains("VERIFY-FAIL"),
        "the guest's memory stayed right"
    );
    // Keep draining while a fresh migration goes through.
    let drain = thread::spawn(move || {
        let mut console = console;
        let mut buf = [0u8; 65536];
        while matches!(console.read(&mut buf), Ok(n) if n > 0) {}
    });
    let uri = format!("unix:{}", dir.join("m2.sock").display());
    let mut dst = Vm::receive(&dir, "dst2", &uri, &[]);
    let m = migrate(&api, &uri, &["--verify-memory"]);
    let summary = match m.reply {
        Some(Reply::Ok(s)) if m.ok => s,
        other => panic!("fresh migration failed: {other:?}\n{}", m.stderr),
    };
    assert_hashes_match(&summary);
    let from = dst.proc.line_count();
    e2e::guest::wait_verify(&mut dst.proc, from, 0, T);
    let _ = child.0.wait();
    drain.join().expect("drain");
    let _ = errors.join();
}

/// A snapshot onto a full filesystem (a small tmpfs): the write fails with ENOSPC, the older
/// snapshot at the target is untouched, no temporary file is left, and the guest runs on.
#[test]
fn a_snapshot_onto_a_full_filesystem_keeps_the_old_one_and_the_guest() {
    require_kvm!();
    // SAFETY: geteuid(2) reads the process's credentials and has no failure mode.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("MINIVMM_REQUIRE_KVM").as_deref() != Ok("1"),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        eprintln!("SKIP: not root");
        return;
    }
    let dir = TempDir::new("full-disk");
    let mnt = dir.join("small");
    std::fs::create_dir(&mnt).expect("mount point");
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(mount.success(), "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let snap = mnt.join("vm.snap");
    std::fs::write(&snap, b"the previous snapshot").expect("old snapshot");
    let mut src = Vm::run(&dir, "src", "256M", 2, "touch=16M rate=2000 verify_ms=100");
    src.rounds(0, 1);
    let uri = format!("file:{}", snap.display());
    let m = migrate(&src.api, &uri, &[]);
    assert!(!m.ok, "16 MiB of guest memory do not fit in 4 MiB");
    assert!(
        m.stderr.contains("No space left on device"),
        "the error names the cause: {}",
        m.stderr
    );
    assert_eq!(
        std::fs::read(&snap).expect("old snapshot"),
        b"the previous snapshot",
        "the previous snapshot is untouched"
    );
    let left: Vec<_> = std::fs::read_dir(&mnt)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from("vm.snap")],
        "no temporary file left"
    );
    src.rounds(0, 2);
    src.rounds(1, 1);
    assert_no_failure(&src.proc);
}

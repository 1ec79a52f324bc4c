//! Local migration between real minivmm processes: guest memory in memfds handed over by
//! descriptor (`run --mem-shared`, `migrate --local`), only state copied.

use e2e::migrate::{
    assert_hashes_match, assert_keeps_verifying, assert_no_guest_ran, migrate, migrate_ok, Vm, T,
};
use e2e::{free_tcp_port, require_kvm, vm_status, TempDir};
use vmm::control::protocol::MigrateSummary;
use vmm::RunState;

/// Two vCPUs writing all the time.
const BUSY: &str = "touch=64M rate=4000 seed=21 hz=100";

fn shared(dir: &TempDir, name: &str, mem: &str, cpus: u32) -> Vm {
    let mut vm = Vm::run_with(dir, name, mem, cpus, BUSY, &["--mem-shared"], &[]);
    for cpu in 0..u64::from(cpus) {
        vm.rounds(cpu, 1);
    }
    vm
}

/// The process maps guest memory from the memfds the first source made.
fn maps_shared_guest_memory(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains("/memfd:minivmm-ram-0x0"))
}

fn assert_local(stats: &MigrateSummary) {
    assert_eq!(stats.passes, 0, "no RAM pass: {stats:?}");
    assert!(
        stats.bytes_sent < 64 << 10,
        "only state crossed: {} bytes",
        stats.bytes_sent
    );
    assert_eq!(stats.stats["local"], true, "{stats:?}");
}

#[test]
fn a_busy_two_vcpu_guest_moves_locally_and_keeps_verifying() {
    require_kvm!();
    let dir = TempDir::new("local-busy");
    let mut src = shared(&dir, "src", "512M", 2);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &["--mem", "512M", "--cpus", "2"]);
    let stats = migrate_ok(&mut src, &uri, &["--local", "--verify-memory"]);
    assert_local(&stats);
    assert_hashes_match(&stats);
    assert!(
        maps_shared_guest_memory(dst.proc.pid()),
        "the destination maps the source's memfds"
    );
    assert_keeps_verifying(&mut dst, 2);
    assert_eq!(vm_status(&dst.api).state, RunState::Running);
}

#[test]
fn refused_from_private_memory_and_over_tcp_the_guest_runs_on() {
    require_kvm!();
    let dir = TempDir::new("local-refused");
    // Private memory: the destination refuses and says why.
    let mut src = Vm::run(&dir, "src", "256M", 1, BUSY);
    src.rounds(0, 1);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &[]);
    let m = migrate(&src.api, &uri, &["--local"]);
    assert!(!m.ok);
    assert!(
        m.stderr.contains("private anonymous") && m.stderr.contains("--mem-shared"),
        "the refusal says why: {}",
        m.stderr
    );
    let st = dst.proc.wait_exit(T).expect("destination exits");
    assert!(!st.success());
    assert_no_guest_ran(&dst.proc);
    src.rounds(0, 2);
    assert_eq!(vm_status(&src.api).state, RunState::Running);

    // Over tcp (and to a snapshot file): refused before anything is sent.
    let tcp = format!("tcp:127.0.0.1:{}", free_tcp_port());
    let mut shared_src = shared(&dir, "shared", "256M", 1);
    let snap = format!("file:{}", dir.join("vm.snap").display());
    for to in [tcp.as_str(), snap.as_str()] {
        let m = migrate(&shared_src.api, to, &["--local"]);
        assert!(!m.ok);
        assert!(
            m.stderr.contains("--local needs a unix:PATH"),
            "{}",
            m.stderr
        );
    }
    assert!(!dir.join("vm.snap").exists());
    shared_src.rounds(0, 2);
    assert_eq!(vm_status(&shared_src.api).state, RunState::Running);
}

#[test]
fn a_failure_before_go_leaves_the_source_running_and_the_destination_never_ran() {
    require_kvm!();
    let dir = TempDir::new("local-before-go");
    let mut src = shared(&dir, "src", "512M", 2);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive_env(
        &dir,
        "dst",
        &uri,
        &["--mem", "512M", "--cpus", "2"],
        &[("MINIVMM_FAULT", "before-go:fail")],
    );
    let m = migrate(&src.api, &uri, &["--local", "--verify-memory"]);
    assert!(!m.ok, "{:?}", m.reply);
    assert!(m.stderr.contains("Injected fault"), "{}", m.stderr);
    let st = dst.proc.wait_exit(T).expect("destination exits");
    assert!(!st.success());
    assert_no_guest_ran(&dst.proc);
    // The source's guest runs on its memory, which nobody else wrote: it keeps verifying.
    assert_keeps_verifying(&mut src, 2);
    assert_eq!(vm_status(&src.api).state, RunState::Running);
}

#[test]
fn back_and_forth_a_to_b_to_a_to_b() {
    require_kvm!();
    let dir = TempDir::new("local-pingpong");
    let mut vm = shared(&dir, "a0", "512M", 2);
    for hop in 1..=3 {
        let uri = format!("unix:{}", dir.join(&format!("mig{hop}.sock")).display());
        let name = format!("{}{hop}", if hop % 2 == 1 { "b" } else { "a" });
        let mut next = Vm::receive(&dir, &name, &uri, &["--mem", "512M", "--cpus", "2"]);
        let stats = migrate_ok(&mut vm, &uri, &["--local", "--verify-memory"]);
        assert_local(&stats);
        assert_hashes_match(&stats);
        assert!(stats.downtime_ms > 0.0);
        assert_keeps_verifying(&mut next, 2);
        vm = next;
    }
    assert!(maps_shared_guest_memory(vm.proc.pid()));
}

#[test]
fn shared_memory_migrates_by_copy_too() {
    require_kvm!();
    let dir = TempDir::new("local-copy");
    let mut src = shared(&dir, "src", "1G", 2);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &[]);
    let stats = migrate_ok(&mut src, &uri, &["--verify-memory"]);
    assert_hashes_match(&stats);
    assert!(stats.passes >= 2);
    // The memfd's holes were skipped, not read (and allocated).
    assert!(
        stats.pages_untouched_skipped > (512 << 20) / 4096,
        "holes found: {stats:?}"
    );
    assert!(!maps_shared_guest_memory(dst.proc.pid()));
    assert_keeps_verifying(&mut dst, 2);
}

/// Huge pages reserved for the test, given back when dropped.
struct HugePages {
    before: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePages {
    /// Reserves `n` more 2 MiB pages; `None` when the kernel cannot find them.
    fn reserve(n: u64) -> Option<HugePages> {
        let read = || -> u64 {
            std::fs::read_to_string(NR_HUGEPAGES)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let before = read();
        std::fs::write(NR_HUGEPAGES, (before + n).to_string()).ok()?;
        let guard = HugePages { before };
        (read() >= before + n).then_some(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

#[test]
fn huge_pages_move_locally() {
    require_kvm!();
    // 256 MiB of guest memory, and some room.
    let Some(_pages) = HugePages::reserve(136) else {
        eprintln!("SKIP: huge_pages_move_locally: cannot reserve huge pages here");
        return;
    };
    let dir = TempDir::new("local-huge");
    let mut src = Vm::run_with(&dir, "src", "256M", 2, BUSY, &["--mem-hugepages"], &[]);
    src.rounds(0, 1);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "dst", &uri, &["--mem", "256M", "--cpus", "2"]);
    let stats = migrate_ok(&mut src, &uri, &["--local", "--verify-memory"]);
    assert_local(&stats);
    assert_hashes_match(&stats);
    assert!(maps_shared_guest_memory(dst.proc.pid()));
    assert_keeps_verifying(&mut dst, 2);
}

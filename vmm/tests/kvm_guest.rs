//! A hand-assembled PVH guest under real KVM: entry in 32-bit protected mode with %ebx at the
//! start info, serial output through the port-I/O bus, and the ways a VM ends (power-off,
//! i8042 reset, triple fault), plus pause/resume of vCPUs that spin or wait for SIPI.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use migration::DirtyBitmap;
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::BootSources;
use vmm::config::{RawConfig, VmConfig};
use vmm::exit::{ExitSignal, GuestFault, VmExit};
use vmm::sync::lock;
use vmm::{require_kvm, RunState, Vmm};

#[allow(dead_code)] // each test binary uses part of the shared guest helpers
mod common;
use common::{GuestFile, MODE_POWER_OFF, MODE_RESET, MODE_SPIN, MODE_TRIPLE_FAULT};

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }
}

struct TestVm {
    vmm: Vmm,
    exit: Arc<ExitSignal>,
    console: Console,
    _kernel: GuestFile,
}

/// A console whose writes block while it is closed: a vCPU that writes to it is stuck, as
/// on a terminal or pipe nobody reads.
#[derive(Clone, Default)]
struct GatedConsole(Arc<(Mutex<bool>, Condvar)>);

impl GatedConsole {
    fn open(&self) {
        *lock(&self.0 .0) = true;
        self.0 .1.notify_all();
    }
}

impl Write for GatedConsole {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let mut open = lock(&self.0 .0);
        while !*open {
            open = vmm::sync::wait(&self.0 .1, open);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A VM of `cpus` vCPUs booting the guest in `mode`, built with serial output to `out` but
/// not started.
fn build(kernel: &GuestFile, cpus: u32, cmdline: &str, out: Box<dyn Write + Send>) -> Vmm {
    let config = VmConfig::new(RawConfig {
        mem: Some("64M".into()),
        cpus: Some(cpus),
        kernel: Some(kernel.0.clone()),
        cmdline: Some(cmdline.into()),
        api_socket: Some("/nonexistent/unused.sock".into()),
        ..Default::default()
    })
    .expect("config");
    let mut sources = BootSources::open(&config).expect("guest opens");
    Vmm::new(config, &mut sources, out).expect("VM builds")
}

fn boot(tag: &str, mode: u8, cpus: u32, cmdline: &str) -> TestVm {
    boot_tracking(tag, mode, cpus, cmdline, None)
}

/// [`boot`] with `--dirty-tracker tracker`.
fn boot_tracking(tag: &str, mode: u8, cpus: u32, cmdline: &str, tracker: Option<&str>) -> TestVm {
    let kernel = GuestFile::new(tag, mode);
    let path = kernel.0.clone();
    let config = VmConfig::new(RawConfig {
        mem: Some("64M".into()),
        cpus: Some(cpus),
        kernel: Some(path),
        cmdline: Some(cmdline.into()),
        api_socket: Some("/nonexistent/unused.sock".into()),
        dirty_tracker: tracker.map(str::to_string),
        ..Default::default()
    })
    .expect("config");
    let mut sources = BootSources::open(&config).expect("guest opens");
    let console = Console::default();
    let mut vmm = Vmm::new(config, &mut sources, Box::new(console.clone())).expect("VM builds");
    let exit = vmm.exit_signal();
    vmm.start().expect("start");
    TestVm {
        vmm,
        exit,
        console,
        _kernel: kernel,
    }
}

fn wait_exit(vm: &TestVm) -> VmExit {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(r) = vm.exit.reason() {
            return r;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("guest did not end; console: {:?}", vm.console.text());
}

#[test]
fn pvh_guest_prints_cmdline_and_powers_off() {
    require_kvm!();
    let mut vm = boot("poweroff", MODE_POWER_OFF, 1, "hello=1 world");
    assert_eq!(wait_exit(&vm), VmExit::PowerOff);
    // 64 MiB: low RAM, BIOS area, RAM from 1 MiB.
    assert_eq!(vm.console.text(), "hello=1 world\n3\n");
    vm.vmm.shutdown();
}

#[test]
fn i8042_reset_ends_the_vm_cleanly() {
    require_kvm!();
    let mut vm = boot("reset", MODE_RESET, 1, "r");
    assert_eq!(wait_exit(&vm), VmExit::Reset);
    assert!(vm.console.text().starts_with("r\n"));
    vm.vmm.shutdown();
}

#[test]
fn triple_fault_is_a_named_error() {
    require_kvm!();
    let mut vm = boot("fault", MODE_TRIPLE_FAULT, 1, "f");
    match wait_exit(&vm) {
        VmExit::Fault(f @ GuestFault::TripleFault { .. }) => {
            assert!(f.to_string().contains("triple fault"), "{f}")
        }
        // Where the emulator cannot deliver the exception it reports an internal error.
        VmExit::Fault(f @ GuestFault::InternalError { .. }) => {
            assert!(f.to_string().contains("KVM_EXIT_INTERNAL_ERROR"), "{f}")
        }
        other => panic!("expected a fault, got {other:?}"),
    }
    vm.vmm.shutdown();
}

fn counter(vm: &TestVm) -> u32 {
    vm.vmm
        .memory()
        .read_obj(GuestAddress(0x2000))
        .expect("counter")
}

fn wait_counter_past(vm: &TestVm, v: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = counter(vm);
        if c != v {
            return c;
        }
        assert!(Instant::now() < deadline, "counter stuck at {v}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn pause_stops_spinning_and_waiting_vcpus_and_resume_restarts() {
    require_kvm!();
    // vCPU 0 spins; vCPU 1 waits for a SIPI inside KVM_RUN and must be kicked out of it.
    let mut vm = boot("spin", MODE_SPIN, 2, "s");
    let c0 = wait_counter_past(&vm, 0);
    wait_counter_past(&vm, c0);
    for _ in 0..3 {
        vm.vmm.pause().expect("pause");
        assert_eq!(vm.vmm.state(), RunState::Paused);
        let a = counter(&vm);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(counter(&vm), a, "a paused guest does not run");
        vm.vmm.pause().expect("pausing twice is harmless");
        vm.vmm.resume().expect("resume");
        assert_eq!(vm.vmm.state(), RunState::Running);
        wait_counter_past(&vm, a);
    }
    assert_eq!(vm.exit.reason(), None);
    vm.vmm.shutdown();
}

/// vCPU 0 is stuck writing to a console nobody reads; vCPU 1 waits for a SIPI and pauses at
/// once. The pause fails, and must not leave vCPU 1 paused (nor vCPU 0, once its write
/// returns and it finds the pause request): the VM is still running. Without the undo the
/// counter never moves again.
#[test]
fn a_pause_that_one_vcpu_cannot_answer_leaves_every_vcpu_running() {
    require_kvm!();
    let kernel = GuestFile::new("stuck", MODE_SPIN);
    let console = GatedConsole::default();
    let mut vmm = build(&kernel, 2, "s", Box::new(console.clone()));
    vmm.set_response_timeout(Duration::from_millis(300));
    vmm.start().expect("start");
    // The guest's first instruction after the start-info check is a serial write.
    std::thread::sleep(Duration::from_millis(200));
    let e = vmm.pause().expect_err("vCPU 0 cannot answer");
    assert!(
        vmm::error_chain(&e).contains("did not answer"),
        "{}",
        vmm::error_chain(&e)
    );
    assert_eq!(
        vmm.state(),
        RunState::Running,
        "a failed pause leaves it running"
    );
    console.open();
    let read = |v: &Vmm| -> u32 { v.memory().read_obj(GuestAddress(0x2000)).expect("counter") };
    let deadline = Instant::now() + Duration::from_secs(30);
    let c = read(&vmm);
    while read(&vmm) == c {
        assert!(
            Instant::now() < deadline,
            "the guest never ran again after the failed pause"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Both vCPUs answer the next pause; the guest then holds still.
    vmm.set_response_timeout(Duration::from_secs(10));
    vmm.pause().expect("pause once unstuck");
    let c = read(&vmm);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(read(&vmm), c);
    vmm.resume().expect("resume");
    vmm.shutdown();
}

/// vCPU 1 cannot start: vCPU 0, which already runs the guest, is stopped again and the VM
/// is failed for good (a destination must not receive into memory a vCPU ran on).
#[test]
fn a_start_that_fails_at_vcpu_k_stops_the_ones_before_it() {
    require_kvm!();
    let kernel = GuestFile::new("startfail", MODE_SPIN);
    let console = Console::default();
    let mut vmm = build(&kernel, 2, "s", Box::new(console.clone()));
    vmm.inject_start_failure(1);
    let e = vmm.start().expect_err("vCPU 1 fails");
    assert!(vmm::error_chain(&e).contains("injected start failure"));
    assert_eq!(vmm.state(), RunState::Failed);
    let read = |v: &Vmm| -> u32 { v.memory().read_obj(GuestAddress(0x2000)).expect("counter") };
    let c = read(&vmm);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(read(&vmm), c, "vCPU 0 was stopped");
    assert!(vmm.start().is_err(), "a failed VM never starts");
    assert!(vmm.pause().is_err() && vmm.resume().is_err());
}

#[test]
fn dirty_logging_sees_guest_writes() {
    for tracker in [None, Some("bitmap-protect"), Some("ring")] {
        dirty_logging_sees_guest_writes_with(tracker);
    }
}

fn dirty_logging_sees_guest_writes_with(tracker: Option<&str>) {
    require_kvm!();
    let mut vm = boot_tracking("dirty", MODE_SPIN, 1, "d", tracker);
    wait_counter_past(&vm, 0);
    vm.vmm.start_dirty_log().expect("dirty log on");
    let c = counter(&vm);
    wait_counter_past(&vm, c);
    vm.vmm.pause().expect("pause");
    let pages = vm.vmm.memory_slots()[0].size as usize / migration::PAGE_SIZE;
    let mut log = DirtyBitmap::new(pages);
    vm.vmm.fetch_dirty_log(0, &mut log).expect("dirty log");
    // The counter at 0x2000 is page 2 of slot 0.
    assert!(
        log.get(2),
        "{tracker:?}: page of the counter is dirty: {:#x}",
        log.words()[0]
    );
    // Fetched: the paused guest wrote nothing since (the initially-set bitmap keeps every
    // page it was not told to clear).
    if tracker.is_some() {
        let mut again = DirtyBitmap::new(pages);
        vm.vmm.fetch_dirty_log(0, &mut again).expect("dirty log");
        assert!(!again.get(2), "{tracker:?}: a fetch re-protects");
    }
    vm.vmm.stop_dirty_log().expect("dirty log off");
    vm.vmm.shutdown();
}

#[test]
fn restore_skeleton_has_the_layout_and_pristine_memory() {
    require_kvm!();
    let config = VmConfig::new(RawConfig {
        mem: Some("4G".into()),
        cpus: Some(2),
        api_socket: Some("/nonexistent/unused.sock".into()),
        ..Default::default()
    })
    .expect("config");
    let kvm = Arc::new(kvm_ioctls::Kvm::new().expect("kvm"));
    let vmm = Vmm::new_for_restore(config, Box::new(Console::default()), kvm).expect("skeleton");
    let slots: Vec<(u64, u64)> = vmm
        .memory_slots()
        .iter()
        .map(|s| (s.guest_addr, s.size))
        .collect();
    assert_eq!(slots, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    assert_eq!(vmm.config().cpus, 2);
    assert_eq!(vmm.state(), RunState::Created);
    // Nothing was written: no kernel, no boot tables.
    let mut page = [0xffu8; 4096];
    for addr in [0u64, 0x6000, 0xe0000, 0xf0000, 0x10_0000] {
        vmm.memory()
            .read_slice(&mut page, GuestAddress(addr))
            .expect("read");
        assert!(page.iter().all(|b| *b == 0), "page {addr:#x} is pristine");
    }
}

/// A vCPU whose dirty ring fills harvests it itself and goes on: the built-in test guest
/// rewrites 16 MiB at 20,000 pages/s with a 256-entry ring and no fetch for two seconds; it
/// keeps verifying, and the one fetch then holds far more pages than the ring (each full
/// exit's harvest was kept).
#[test]
fn a_full_dirty_ring_is_harvested_by_its_vcpu() {
    require_kvm!();
    let config = VmConfig::new(RawConfig {
        mem: Some("128M".into()),
        cmdline: Some("touch=16M rate=20000 seed=5".into()),
        api_socket: Some("/nonexistent/unused.sock".into()),
        dirty_tracker: Some("ring:256".into()),
        ..Default::default()
    })
    .expect("config");
    let mut sources = BootSources::open(&config).expect("test guest");
    let console = Console::default();
    let mut vmm = Vmm::new(config, &mut sources, Box::new(console.clone())).expect("VM builds");
    vmm.start().expect("start");
    let verified = || console.text().matches("VERIFY-OK").count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while verified() == 0 {
        assert!(
            Instant::now() < deadline,
            "no VERIFY-OK: {}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    vmm.start_dirty_log().expect("dirty log on");
    let before = verified();
    std::thread::sleep(Duration::from_secs(2));
    let after = verified();
    assert!(after > before, "the guest verified while its ring filled");
    let pages = vmm.memory_slots()[0].size as usize / migration::PAGE_SIZE;
    let mut log = DirtyBitmap::new(pages);
    vmm.fetch_dirty_log(0, &mut log).expect("fetch");
    assert!(
        log.count() > 1024,
        "{} pages dirty in two seconds: the full rings' harvests were kept",
        log.count()
    );
    assert!(
        !console.text().contains("VERIFY-FAIL"),
        "{}",
        console.text()
    );
    vmm.stop_dirty_log().expect("dirty log off");
    vmm.shutdown();
}

//! Linux guests migrated between minivmm processes.

use std::time::Duration;

use e2e::linux::{self, Boot};
use e2e::migrate::{migrate_ok, Vm, T};
use e2e::{require_file, require_kvm, TempDir};

/// Kernel log timestamps (`[   12.345678]`) of a console text.
fn timestamps(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix('[')?;
            let (ts, _) = rest.split_once(']')?;
            ts.trim().parse().ok()
        })
        .collect()
}

/// The cloud kernel migrated in the middle of its (emulated) early boot: its log continues on
/// the destination's console where it stopped, no line lost or doubled, no jump in time.
#[test]
fn linux_boot_log_continues_on_destination() {
    require_kvm!();
    let Some(vmlinux) = require_file("MINIVMM_VMLINUX", "linux_boot_log_continues_on_destination")
    else {
        return;
    };
    let dir = TempDir::new("mig-linux");
    let mut src_vm = Vm::run_kernel(&dir, "linux-src", &Boot::early(&vmlinux));
    let t = Duration::from_secs(180);
    src_vm
        .proc
        .wait_line("TSC calibration", t, |l| l.contains("tsc: Detected"));
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "linux-dst", &uri, &[]);
    migrate_ok(&mut src_vm, &uri, &["--verify-memory"]);
    // The destination goes on with lines the source never printed.
    let from = dst.proc.line_count();
    let before = src_vm.proc.lines();
    dst.proc
        .wait_line_from(from, "more boot log", t, |l| timestamps(l).len() == 1);
    std::thread::sleep(Duration::from_secs(3));
    let after = dst.proc.lines();
    let src_text = before.join("\n");
    let dst_text = after.join("\n");
    // A line cut by the migration continues on the destination: join the two consoles.
    let all = format!("{src_text}{dst_text}");
    let ts = timestamps(&all);
    assert!(
        ts.len() > timestamps(&src_text).len(),
        "the destination printed more log"
    );
    for w in ts.windows(2) {
        assert!(
            w[1] >= w[0],
            "kernel time goes backwards: {} then {}",
            w[0],
            w[1]
        );
        assert!(
            w[1] - w[0] < 30.0,
            "kernel time jumps: {} then {}",
            w[0],
            w[1]
        );
    }
    let lines: Vec<&str> = all.lines().filter(|l| !timestamps(l).is_empty()).collect();
    for (i, l) in lines.iter().enumerate() {
        assert!(!lines[i + 1..].contains(l), "line printed twice: {l}");
    }
}

/// Hardware KVM only: Linux with 2 vCPUs running the initramfs workload, migrated mid-workload.
#[test]
fn linux_workload_migrates_and_shell_answers() {
    require_kvm!();
    if !linux::require_guest("linux_workload_migrates_and_shell_answers") {
        return;
    }
    let (Some(kernel), Some(initrd)) = (
        require_file("MINIVMM_KERNEL", "linux_workload"),
        require_file("MINIVMM_INITRAMFS", "linux_workload"),
    ) else {
        return;
    };
    let dir = TempDir::new("mig-linux-wl");
    let boot = Boot::new(
        &kernel,
        "console=ttyS0 minivmm.workload=1 touch=256M rate=20000",
        "1G",
    )
    .initrd(&initrd)
    .cpus("2");
    let mut src_vm = Vm::run_kernel(&dir, "linux-wl-src", &boot);
    src_vm
        .proc
        .wait_line("workload verifies", T, |l| l.contains("VERIFY-OK"));
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dst = Vm::receive(&dir, "linux-wl-dst", &uri, &[]);
    migrate_ok(&mut src_vm, &uri, &["--verify-memory"]);
    let from = dst.proc.line_count();
    dst.proc
        .wait_line_from(from, "VERIFY-OK on destination", T, |l| {
            l.contains("VERIFY-OK")
        });
    dst.proc.type_text("echo HELLO-$((6*7))\n");
    dst.proc
        .wait_line_from(from, "shell answer", T, |l| l.contains("HELLO-42"));
    assert!(!dst.proc.lines().iter().any(|l| l.contains("VERIFY-FAIL")));
}

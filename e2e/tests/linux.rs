//! Linux guests. Here (nested KVM, guest kernel mode emulated) the Debian cloud kernel gets
//! through its early boot only; with `MINIVMM_LINUX_GUEST=1` on hardware KVM it boots to our
//! initramfs, answers on the serial console and powers off.

use std::time::Duration;

use e2e::linux::{self, Boot};
use e2e::{require_file, require_kvm, Proc, TempDir};

/// The cloud kernel, entered through the PVH note of its vmlinux, prints its banner and gets as
/// far as its TSC calibration: loader, entry, boot parameters, serial port and timer work.
#[test]
fn cloud_kernel_early_boot_log_on_serial() {
    require_kvm!();
    let Some(vmlinux) = require_file("MINIVMM_VMLINUX", "cloud_kernel_early_boot_log_on_serial")
    else {
        return;
    };
    let dir = TempDir::new("linux-early");
    let api = dir.join("api.sock");
    let mut vm = linux::run_kernel("linux", &Boot::early(&vmlinux), &api);
    let t = Duration::from_secs(180);
    let banner = vm.wait_line("Linux banner", t, |l| l.contains("Linux version"));
    assert!(banner.contains("cloud-amd64"), "{banner}");
    vm.wait_line("TSC calibration", t, |l| l.contains("tsc: Detected"));
    vm.wait_line("command line echoed", t, |l| {
        l.contains("Kernel command line: console=ttyS0")
    });
}

/// The bzImage path: loader and 64-bit entry reach the kernel's own code. Here its decompressor
/// stops on an instruction the emulator does not know; minivmm must say so and exit non-zero.
#[test]
fn cloud_bzimage_enters_kernel_code() {
    require_kvm!();
    let Some(kernel) = require_file("MINIVMM_KERNEL", "cloud_bzimage_enters_kernel_code") else {
        return;
    };
    let dir = TempDir::new("linux-bz");
    let api = dir.join("api.sock");
    let mut vm = linux::run_kernel("bzimage", &Boot::early(&kernel), &api);
    if linux::guest_enabled() {
        vm.wait_line("Linux banner", Duration::from_secs(120), |l| {
            l.contains("Linux version")
        });
        return;
    }
    match vm.try_wait_line_from(0, Duration::from_secs(120), &|l| {
        l.contains("Linux version")
    }) {
        Ok(_) => {} // hardware-backed KVM: the decompressor ran.
        Err(_) => {
            let st = vm.wait_exit(Duration::from_secs(5));
            let err = vm.stderr().to_lowercase();
            assert!(
                st.is_some_and(|s| !s.success()),
                "an emulation failure must end minivmm non-zero: {st:?}"
            );
            assert!(
                err.contains("emulation") || err.contains("internal error"),
                "the error must name the KVM exit reason: {err}"
            );
        }
    }
}

fn boot_to_ready(name: &str, cpus: &str, mem: &str) -> Option<(Proc, TempDir)> {
    let kernel = require_file("MINIVMM_KERNEL", name)?;
    let initrd = require_file("MINIVMM_INITRAMFS", name)?;
    let dir = TempDir::new(name);
    let api = dir.join("api.sock");
    let boot = Boot::new(&kernel, "console=ttyS0 panic=-1", mem)
        .initrd(&initrd)
        .cpus(cpus);
    let mut vm = linux::run_kernel(name, &boot, &api);
    vm.wait_line("ready marker", Duration::from_secs(120), |l| {
        l.contains("MINIVMM-READY")
    });
    Some((vm, dir))
}

fn shell(vm: &mut Proc, cmd: &str, marker: &str) -> String {
    let from = vm.line_count();
    vm.type_text(&format!("{cmd}; echo {marker}-$?\n"));
    vm.wait_line_from(from, marker, Duration::from_secs(30), |l| {
        l.starts_with(&format!("{marker}-"))
    });
    vm.lines()[from..].join("\n")
}

#[test]
fn linux_boots_to_shell_and_powers_off() {
    require_kvm!();
    if !linux::require_guest("linux_boots_to_shell_and_powers_off") {
        return;
    }
    for cpus in ["1", "2"] {
        let Some((mut vm, _dir)) = boot_to_ready("linux-shell", cpus, "512M") else {
            return;
        };
        let out = shell(&mut vm, "grep -c ^processor /proc/cpuinfo", "CPUS");
        assert!(
            out.lines().any(|l| l.trim() == cpus),
            "guest sees {cpus} CPUs: {out}"
        );
        vm.type_text("poweroff -f\n");
        let st = vm.wait_exit(Duration::from_secs(60));
        assert!(
            st.is_some_and(|s| s.success()),
            "poweroff ends minivmm with 0: {st:?}"
        );
    }
}

#[test]
fn linux_sees_4g() {
    require_kvm!();
    if !linux::require_guest("linux_sees_4g") {
        return;
    }
    let Some((mut vm, _dir)) = boot_to_ready("linux-4g", "1", "4G") else {
        return;
    };
    let out = shell(&mut vm, "grep MemTotal /proc/meminfo", "MEM");
    let kib: u64 = out
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .nth(1)
                .filter(|_| l.contains("MemTotal"))
        })
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    assert!(
        kib > 3_600_000 && kib <= 4 * 1024 * 1024,
        "MemTotal {kib} kB"
    );
}

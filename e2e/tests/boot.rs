//! `minivmm run` boots the built-in test guest: it verifies its memory, its timer ticks, a big
//! mostly-idle guest costs only what it touched, and a second vCPU runs its own writer.

use std::time::Duration;

use e2e::guest::{assert_no_failure, wait_rounds, wait_verify};
use e2e::{require_kvm, Proc, TempDir};

const T: Duration = Duration::from_secs(60);

#[test]
fn test_guest_boots_from_embedded_default_and_verifies() {
    require_kvm!();
    let dir = TempDir::new("boot-default");
    let api = dir.join("api.sock");
    let mut vm = Proc::minivmm("vm", &["run", "--api-socket", api.to_str().unwrap()]);
    vm.wait_line("boot banner", T, |l| l.starts_with("TESTGUEST boot"));
    let first = wait_verify(&mut vm, 0, 0, T);
    let later = wait_rounds(&mut vm, 0, 0, 3, T);
    assert!(
        later.round > first.round,
        "rounds advance: {first:?} -> {later:?}"
    );
    assert!(
        later.ticks > first.ticks,
        "timer ticks advance: {first:?} -> {later:?}"
    );
    assert_no_failure(&vm);
}

#[test]
fn big_idle_guest_costs_only_what_it_touched() {
    require_kvm!();
    let dir = TempDir::new("boot-16g");
    let api = dir.join("api.sock");
    let mut vm = Proc::minivmm(
        "vm16g",
        &[
            "run",
            "--mem",
            "16G",
            "--cmdline",
            "touch=64M rate=200 seed=3",
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    wait_rounds(&mut vm, 0, 0, 2, T);
    let rss_mib = vm.rss_kib() / 1024;
    eprintln!("16 GiB guest, touch=64M: host RSS {rss_mib} MiB");
    assert!(
        rss_mib >= 64,
        "RSS {rss_mib} MiB below the touched 64 MiB: not measured?"
    );
    assert!(
        rss_mib <= 64 + 48,
        "RSS {rss_mib} MiB: a 16 GiB guest that touched 64 MiB should cost about 64 MiB"
    );
    assert_no_failure(&vm);
}

#[test]
fn two_vcpus_each_run_their_own_writer() {
    require_kvm!();
    let dir = TempDir::new("boot-smp");
    let api = dir.join("api.sock");
    let mut vm = Proc::minivmm(
        "vm-smp",
        &[
            "run",
            "--cpus",
            "2",
            "--cmdline",
            "touch=32M rate=2000 seed=5",
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    let boot = vm.wait_line("boot banner", T, |l| l.starts_with("TESTGUEST boot"));
    assert!(boot.contains("cpus=2"), "guest should see 2 CPUs: {boot}");
    let a = wait_rounds(&mut vm, 0, 0, 2, T);
    let b = wait_rounds(&mut vm, 0, 1, 2, T);
    assert!(
        a.writes > 0 && b.writes > 0,
        "both writers write: {a:?} {b:?}"
    );
    assert!(b.ticks > 0, "cpu 1 has its own timer: {b:?}");
    assert_no_failure(&vm);
}

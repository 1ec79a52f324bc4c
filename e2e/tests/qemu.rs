//! The very same test guest image boots under QEMU (`-kernel` with its PVH note).

use std::time::Duration;

use e2e::guest::{assert_no_failure, wait_rounds};
use e2e::{require_kvm, Proc, TempDir};

#[test]
fn test_guest_image_boots_under_qemu() {
    require_kvm!();
    assert!(
        !guest::TEST_GUEST_ELF.is_empty(),
        "the test guest image is empty"
    );
    let dir = TempDir::new("qemu");
    let image = dir.join("testguest.elf");
    std::fs::write(&image, guest::TEST_GUEST_ELF).expect("write image");
    let qemu = std::path::Path::new("/usr/bin/qemu-system-x86_64");
    if !qemu.exists() {
        if std::env::var("MINIVMM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("qemu-system-x86_64 missing: `make deps` installs it");
        }
        eprintln!("SKIP: qemu-system-x86_64 not installed");
        return;
    }
    let args = e2e::qemu::args("256M", 2, &image, "touch=16M rate=500 seed=9", None, None);
    let mut q = Proc::spawn("qemu", qemu, &args);
    let boot = q.wait_line("boot banner", Duration::from_secs(60), |l| {
        l.contains("TESTGUEST boot")
    });
    assert!(
        boot.contains("touch=16M"),
        "cmdline reaches the guest: {boot}"
    );
    wait_rounds(&mut q, 0, 0, 2, Duration::from_secs(60));
    wait_rounds(&mut q, 0, 1, 1, Duration::from_secs(60));
    assert_no_failure(&q);
}

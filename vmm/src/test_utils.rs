//! Shared test helpers: the KVM test policy.
//!
//! A test that needs KVM starts with `require_kvm!()`: it runs when `/dev/kvm` opens
//! read-write; otherwise it panics when `MINIVMM_REQUIRE_KVM=1` (CI), else prints
//! `SKIP: <test>: /dev/kvm unavailable` and returns.
//!
//! This is the one implementation: the end-to-end harness (`e2e`) re-exports it.

/// True when `/dev/kvm` can be opened read-write.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The KVM test policy; returns whether the test should run.
pub fn kvm_policy(test: &str) -> bool {
    if kvm_available() {
        return true;
    }
    if std::env::var("MINIVMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: /dev/kvm unavailable and MINIVMM_REQUIRE_KVM=1");
    }
    eprintln!("SKIP: {test}: /dev/kvm unavailable");
    false
}

/// Skip (or, with `MINIVMM_REQUIRE_KVM=1`, fail) the calling test when KVM is unavailable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::test_utils::kvm_policy(module_path!()) {
            return;
        }
    };
}

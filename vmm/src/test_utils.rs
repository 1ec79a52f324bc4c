//! Shared test helpers: the KVM test policy, and the start of a stream as a source on this
//! host would send it.
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

/// The configuration a source on this host sends for a guest of `mem_bytes` and `cpus` (its
/// CPUID and MSRs as a VM built here has them), for tests that craft streams. Needs KVM.
pub fn host_migration_config(
    mem_bytes: u64,
    cpus: u8,
) -> Result<crate::persist::MigrationConfig, crate::VmmError> {
    use crate::config::{KernelSource, VmConfig, MIN_MEM_BYTES};
    let kvm = crate::builder::open_kvm().map_err(crate::VmmError::Build)?;
    let config = VmConfig {
        mem_bytes: MIN_MEM_BYTES,
        cpus,
        kernel: KernelSource::BuiltinTestGuest,
        initrd: None,
        cmdline: String::new(),
        api_socket: "/nonexistent".into(),
        memory: Default::default(),
        dirty_tracker: Default::default(),
    };
    let vmm = crate::Vmm::new_for_restore(config, Box::new(std::io::sink()), kvm.into())?;
    let mut c =
        crate::persist::MigrationConfig::new(vmm.config(), vmm.guest_cpuid(), vmm.saved_msrs());
    c.mem_bytes = mem_bytes;
    Ok(c)
}

/// The first bytes a source sends: the stream header and a `Config` record holding `config`
/// (e.g. [`host_migration_config`] as JSON).
pub fn stream_start(config: &[u8]) -> Vec<u8> {
    use migration::stream::RecordWriter;
    let mut c = migration::Connection::memory();
    let written = RecordWriter::start(&mut c)
        .and_then(|mut w| w.write_record(migration::wire::RecordKind::Config, &[config]));
    match written {
        Ok(_) => c.into_bytes(),
        Err(_) => Vec::new(),
    }
}

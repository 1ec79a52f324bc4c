//! The CPU a guest sees and the vCPU state it carries, under real KVM: no nested
//! virtualisation is offered, every saved MSR is one the vCPUs take back, and a restore either
//! restores every MSR and the TSC rate or fails (naming what), never warns and goes on; a
//! destination takes exactly the MSRs the configuration announced.

use std::sync::Arc;
use std::time::Duration;

use migration::{GuestRam, MigrationTarget};
use vmm::boot::BootSources;
use vmm::config::{DirtyTracker, GuestLimits, RawConfig, VmConfig};
use vmm::error_chain;
use vmm::migrate::target_vm::TargetVm;
use vmm::persist::{MigrationConfig, VmSnapshot};
use vmm::{require_kvm, Vmm};

#[allow(dead_code)] // each test binary uses part of the shared guest helpers
mod common;
use common::{GuestFile, MODE_SPIN};

fn config(kernel: Option<&GuestFile>) -> VmConfig {
    VmConfig::new(RawConfig {
        mem: Some("64M".into()),
        cpus: Some(2),
        kernel: kernel.map(|k| k.0.clone()),
        cmdline: Some("spin".into()),
        api_socket: Some("/nonexistent/unused.sock".into()),
        ..Default::default()
    })
    .expect("config")
}

/// A running two-vCPU spinner, paused, and its state.
fn paused_source(tag: &str) -> (Vmm, VmSnapshot, GuestFile) {
    let kernel = GuestFile::new(tag, MODE_SPIN);
    let config = config(Some(&kernel));
    let mut sources = BootSources::open(&config).expect("guest opens");
    let mut vmm = Vmm::new(config, &mut sources, Box::new(std::io::sink())).expect("builds");
    vmm.start().expect("start");
    std::thread::sleep(Duration::from_millis(50));
    vmm.pause().expect("pause");
    let snapshot = vmm.save_state().expect("save");
    (vmm, snapshot, kernel)
}

/// A VM to restore into, with the source's CPUID.
fn restore_skeleton(source: &Vmm) -> Vmm {
    let kvm = Arc::new(kvm_ioctls::Kvm::new().expect("kvm"));
    let mut vmm =
        Vmm::new_for_restore(config(None), Box::new(std::io::sink()), kvm).expect("skeleton");
    vmm.set_guest_cpuid(source.guest_cpuid().to_vec())
        .expect("the source's CPUID");
    vmm
}

#[test]
fn a_guest_sees_no_nested_virtualisation_and_saves_what_it_restores() {
    require_kvm!();
    let (mut src, snapshot, _k) = paused_source("cpu-offer");
    let cpuid = src.guest_cpuid();
    let has = |leaf: u32, ecx_bit: u32| {
        cpuid
            .iter()
            .any(|e| e.function == leaf && e.index == 0 && e.ecx & ecx_bit != 0)
    };
    assert!(!has(1, 1 << 5), "VMX hidden");
    assert!(!has(0x8000_0001, 1 << 2), "SVM hidden");
    assert!(
        cpuid.iter().all(|e| e.function != 0x8000_000a),
        "no SVM leaf"
    );
    // Every vCPU saved exactly the VM's MSR list, and a VM with the same CPUID takes it all.
    for v in &snapshot.vcpus {
        let saved: Vec<u32> = v.msrs.iter().map(|&(i, _)| i).collect();
        assert_eq!(saved, src.saved_msrs());
    }
    let mut dst = restore_skeleton(&src);
    dst.restore_state(&snapshot).expect("restores everything");
    src.shutdown();
}

#[test]
fn a_refused_msr_or_tsc_rate_fails_the_restore() {
    require_kvm!();
    let (mut src, snapshot, _k) = paused_source("cpu-strict");
    let blobs = snapshot.to_blobs().expect("blobs");
    let tampered = |f: &dyn Fn(&mut VmSnapshot)| {
        let mut s = VmSnapshot::from_blobs(&blobs, 2).expect("decode");
        f(&mut s);
        let mut dst = restore_skeleton(&src);
        dst.restore_state(&s).map_err(|e| error_chain(&e))
    };
    // EFER with a reserved bit: no KVM takes it.
    let err = tampered(&|s| s.vcpus[1].msrs.push((0xc000_0080, 1 << 63))).unwrap_err();
    assert!(
        err.contains("MSR 0xc0000080 (value 0x8000000000000000) was refused by this host's KVM"),
        "{err}"
    );
    // A rate this host's KVM refuses: with TSC scaling, anything from 2^31 kHz on; without
    // it, any rate below the hardware's (a higher one it takes, catching up in software).
    let kvm = kvm_ioctls::Kvm::new().expect("kvm");
    let refused = if kvm.check_extension(kvm_ioctls::Cap::TscControl) {
        u32::MAX
    } else {
        1
    };
    let err = tampered(&|s| s.vcpus[0].tsc_khz = Some(refused)).unwrap_err();
    assert!(
        err.contains(&format!(
            "the TSC rate of {refused} kHz cannot be set on this host"
        )),
        "{err}"
    );
    tampered(&|_| {}).expect("the untouched state restores");
    src.shutdown();
}

#[test]
fn a_destination_takes_exactly_the_announced_msrs() {
    require_kvm!();
    let (mut src, snapshot, _k) = paused_source("cpu-announced");
    let announced = MigrationConfig::new(src.config(), src.guest_cpuid(), src.saved_msrs());
    let limits = GuestLimits {
        max_mem_bytes: 1 << 30,
        max_cpus: 2,
        shape: None,
    };
    let receive = |config: &MigrationConfig, snapshot: &VmSnapshot| {
        let mut t = TargetVm::new(
            "/nonexistent/unused.sock".into(),
            limits,
            DirtyTracker::default(),
        )
        .expect("target");
        t.validate_config(&serde_json::to_vec(config).expect("json"))
            .map_err(|e| error_chain(&e))?;
        assert!(!t.ram_regions().is_empty());
        assert!(t.accepts_state("vcpu1") && !t.accepts_state("vcpu2"));
        let blobs = snapshot.to_blobs().expect("blobs");
        t.restore_state(blobs).map_err(|e| error_chain(&e))
    };
    // One MSR fewer in the state than announced: refused.
    let mut fewer = VmSnapshot::from_blobs(&snapshot.to_blobs().expect("blobs"), 2).expect("d");
    fewer.vcpus[0].msrs.pop();
    let err = receive(&announced, &fewer).unwrap_err();
    assert!(err.contains("the configuration announced"), "{err}");
    receive(&announced, &snapshot).expect("as announced");
    src.shutdown();
}

//! The vmm's decoders of outside input, each with a round-trip oracle: what decodes must
//! encode and decode again to the same value.
//!
//! - [`config`]: the `Config` record's JSON (`MigrationConfig`) and every check a destination
//!   runs on it: the values, its limits, the guest's CPUID against a host's, the MSRs.
//! - [`state`]: device and vCPU state blobs (postcard) into a `VmSnapshot`.
//! - [`control`]: a control-socket request line (`parse_request`).

use kvm_bindings::kvm_cpuid_entry2;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use migration::StateBlob;
use vmm::config::GuestLimits;
use vmm::control::protocol::parse_request;
use vmm::persist::{
    MemoryHash, MigrationConfig, SerialSnapshot, VcpuState, VmSnapshot, VmState, STATE_VERSION,
};

use crate::Id;

#[derive(Arbitrary, Debug)]
pub struct ConfigCase {
    pub json: Json,
    /// The destination host's CPUID: (leaf, subleaf, flags, eax, ebx, ecx, edx); taken as
    /// the guest's own table when `None`.
    pub host: Option<Vec<Cpuid>>,
    /// Flip these bits of the guest's table for the host's: (entry, register, bit).
    pub host_flips: Vec<(u8, u8, u8)>,
    pub max_mem_bytes: u64,
    pub max_cpus: u8,
    pub shape: Option<(u64, u8)>,
    /// MSRs this host restores; the guest's list when `None`.
    pub restorable: Option<Vec<u32>>,
}

/// (leaf, subleaf, flags, eax, ebx, ecx, edx)
pub type Cpuid = (u32, u32, u32, u32, u32, u32, u32);

#[derive(Arbitrary, Debug)]
pub enum Json {
    /// The fields a source writes, with any values, plus maybe one more field.
    Fields {
        mem_bytes: u64,
        cpus: u32,
        cmdline: String,
        cpuid: Vec<Cpuid>,
        msrs: Vec<u32>,
        extra: Option<(String, u64)>,
    },
    Text(String),
}

fn entry(&(function, index, flags, eax, ebx, ecx, edx): &Cpuid) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// Decodes and checks one configuration blob.
pub fn config(case: &ConfigCase) {
    let blob = match &case.json {
        Json::Fields {
            mem_bytes,
            cpus,
            cmdline,
            cpuid,
            msrs,
            extra,
        } => {
            let cpuid: Vec<serde_json::Value> = cpuid
                .iter()
                .take(300)
                .map(|&(leaf, subleaf, flags, eax, ebx, ecx, edx)| {
                    serde_json::json!({
                        "leaf": leaf, "subleaf": subleaf, "flags": flags,
                        "eax": eax, "ebx": ebx, "ecx": ecx, "edx": edx,
                    })
                })
                .collect();
            let mut v = serde_json::json!({
                "mem_bytes": mem_bytes,
                "cpus": cpus,
                "cmdline": cmdline,
                "cpuid": cpuid,
                "msrs": msrs,
            });
            if let Some((k, x)) = extra {
                v[k.as_str()] = (*x).into();
            }
            v.to_string()
        }
        Json::Text(t) => t.clone(),
    };
    let Ok(cfg) = serde_json::from_str::<MigrationConfig>(&blob) else {
        return;
    };
    let guest = cfg.guest_cpuid();
    let mut host: Vec<kvm_cpuid_entry2> = match &case.host {
        Some(h) => h.iter().take(300).map(entry).collect(),
        None => guest.clone(),
    };
    for &(e, reg, bit) in case.host_flips.iter().take(16) {
        if let Some(h) = host.get_mut(usize::from(e) % guest.len().max(1)) {
            let bit = 1 << (bit % 32);
            match reg % 4 {
                0 => h.eax ^= bit,
                1 => h.ebx ^= bit,
                2 => h.ecx ^= bit,
                _ => h.edx ^= bit,
            }
        }
    }
    let limits = GuestLimits {
        max_mem_bytes: case.max_mem_bytes,
        max_cpus: case.max_cpus,
        shape: case.shape,
    };
    let restorable = case.restorable.clone().unwrap_or_else(|| cfg.msrs.clone());
    // In the destination's order: a failed check ends it.
    let checked = cfg
        .check_values()
        .map(|_| ())
        .and_then(|()| cfg.check_limits(&limits))
        .and_then(|()| cfg.check_cpu(&host))
        .and_then(|()| cfg.check_msrs(&restorable));
    if let Err(e) = checked {
        let _ = vmm::error_chain(&e);
    }
    let again: MigrationConfig =
        serde_json::from_str(&serde_json::to_string(&cfg).expect("encode")).expect("decode");
    assert_eq!(again, cfg, "configuration round trip");
}

#[derive(Arbitrary, Debug)]
pub struct StateCase {
    pub cpus: u8,
    pub blobs: Vec<BlobCase>,
}

#[derive(Arbitrary, Debug)]
pub enum BlobCase {
    /// A valid encoding of a default state, then bytes flipped and the end cut.
    Encoded {
        which: Which,
        flips: Vec<(u16, u8)>,
        cut: Option<u16>,
    },
    Raw {
        id: Id,
        version: u32,
        data: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Which {
    Vm,
    Vcpu(u8),
    Serial,
    MemHash,
}

fn encoded(which: Which) -> (String, Vec<u8>) {
    let enc = |v: Result<Vec<u8>, postcard::Error>| v.expect("encode a default state");
    match which {
        Which::Vm => ("vm".into(), enc(postcard::to_allocvec(&VmState::default()))),
        Which::Vcpu(n) => (
            format!("vcpu{}", n % 4),
            enc(postcard::to_allocvec(&VcpuState {
                id: u32::from(n % 4),
                ..Default::default()
            })),
        ),
        Which::Serial => (
            "serial".into(),
            enc(postcard::to_allocvec(&SerialSnapshot::default())),
        ),
        Which::MemHash => (
            "memhash".into(),
            enc(postcard::to_allocvec(&MemoryHash::default())),
        ),
    }
}

/// Decodes a list of state blobs as the destination does before restoring.
pub fn state(case: &StateCase) {
    let blobs: Vec<StateBlob> = case
        .blobs
        .iter()
        .take(16)
        .map(|b| match b {
            BlobCase::Encoded { which, flips, cut } => {
                let (id, mut data) = encoded(*which);
                for &(at, x) in flips {
                    if !data.is_empty() {
                        let i = usize::from(at) % data.len();
                        data[i] ^= x;
                    }
                }
                if let Some(c) = cut {
                    data.truncate(usize::from(*c));
                }
                StateBlob {
                    id,
                    version: STATE_VERSION,
                    data,
                }
            }
            BlobCase::Raw { id, version, data } => StateBlob {
                id: id.text(),
                version: *version,
                data: data.clone(),
            },
        })
        .collect();
    let cpus = case.cpus % 8;
    let Ok(snapshot) = VmSnapshot::from_blobs(&blobs, cpus) else {
        return;
    };
    let again = snapshot.to_blobs().expect("encode a decoded snapshot");
    let back = VmSnapshot::from_blobs(&again, cpus).expect("decode what was encoded");
    assert_eq!(back.to_blobs().expect("encode"), again, "state round trip");
}

/// Parses one control-socket request line.
pub fn control(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(req) = parse_request(line) else {
        return;
    };
    let text = serde_json::to_string(&req).expect("encode a request");
    assert_eq!(
        parse_request(&text).ok(),
        Some(req),
        "request round trip through {text}"
    );
}

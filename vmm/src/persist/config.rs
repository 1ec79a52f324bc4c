//! The configuration blob: what the destination checks before it accepts a single page, and
//! before it allocates, maps or registers any guest memory.
//!
//! It carries the guest's shape (checked with the same limits as the command line, then
//! against the destination's `--max-mem`/`--max-cpus` or its prepared `--mem`/`--cpus`), the
//! CPUID the guest sees (vCPU 0's table; `arch::x86_64::cpuid_compat` compares every leaf
//! with what this host offers) and the MSRs each vCPU's state holds (each must be one this
//! host restores).

use std::collections::HashSet;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::cpuid_compat::{check_cpuid, CpuidError};
use crate::config::{
    check_cmdline, check_cpus, check_mem, format_size, ConfigError, GuestLimits, ShapeFields,
    VmConfig,
};

/// How a stream's configuration names its shape values in errors.
pub const STREAM_FIELDS: ShapeFields = ShapeFields {
    mem: "the stream's mem_bytes",
    cpus: "the stream's cpus",
    cmdline: "the stream's cmdline",
};

/// Most CPUID entries a guest may have (KVM's limit per vCPU).
pub const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// Most MSRs a vCPU's state may hold.
pub const MAX_MSRS: usize = 1024;

/// One CPUID entry as the configuration carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidEntry {
    pub leaf: u32,
    pub subleaf: u32,
    /// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` or 0.
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> CpuidEntry {
        CpuidEntry {
            leaf: e.function,
            subleaf: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: e.leaf,
            index: e.subleaf,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// What a VM is made of, as far as the destination must agree before loading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    pub mem_bytes: u64,
    pub cpus: u32,
    /// The guest command line (informational).
    pub cmdline: String,
    /// The CPUID of vCPU 0 as the guest sees it; the other vCPUs have it with their own APIC
    /// id and topology fields.
    pub cpuid: Vec<CpuidEntry>,
    /// The MSRs each vCPU's state holds (all of them: a state with fewer or others is refused).
    pub msrs: Vec<u32>,
}

/// Why a destination cannot take the incoming VM. Each names the value and the limit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompatError {
    #[error("invalid configuration")]
    Invalid(#[source] ConfigError),
    #[error(
        "the stream's guest has {mem} of memory and {cpus} vCPUs; this destination was built \
         for {built_mem} and {built_cpus} (--mem, --cpus)"
    )]
    Shape {
        mem: String,
        cpus: u8,
        built_mem: String,
        built_cpus: u8,
    },
    #[error("the stream's mem_bytes {mem} is above this destination's --max-mem {max}")]
    MaxMem { mem: String, max: String },
    #[error("the stream's cpus {cpus} is above this destination's --max-cpus {max}")]
    MaxCpus { cpus: u8, max: u8 },
    #[error("the stream's cpuid has {0} entries, the limit is {MAX_CPUID_ENTRIES}")]
    TooManyCpuid(usize),
    #[error("the stream's msrs has {0} entries, the limit is {MAX_MSRS}")]
    TooManyMsrs(usize),
    #[error("the stream's msrs lists MSR {0:#x} twice")]
    DuplicateMsr(u32),
    #[error("the guest's CPU cannot be offered by this host")]
    Cpuid(#[source] CpuidError),
    #[error("the source saves MSR {0:#x} of each vCPU, which this host's KVM cannot restore")]
    Msr(u32),
}

/// `bytes` as `1073741824 (1G)`.
fn shown(bytes: u64) -> String {
    format!("{bytes} ({})", format_size(bytes))
}

impl MigrationConfig {
    /// The configuration of a VM built from `config` whose vCPU 0 has `cpuid` and whose vCPU
    /// states hold `msrs`.
    pub fn new(config: &VmConfig, cpuid: &[kvm_cpuid_entry2], msrs: &[u32]) -> MigrationConfig {
        MigrationConfig {
            mem_bytes: config.mem_bytes,
            cpus: u32::from(config.cpus),
            cmdline: config.cmdline.clone(),
            cpuid: cpuid.iter().map(CpuidEntry::from).collect(),
            msrs: msrs.to_vec(),
        }
    }

    /// The guest's CPUID (vCPU 0's).
    pub fn guest_cpuid(&self) -> Vec<kvm_cpuid_entry2> {
        self.cpuid.iter().map(kvm_cpuid_entry2::from).collect()
    }

    /// The limits every VM meets (those of the command line) and the sizes of the lists;
    /// returns the memory bytes and vCPUs.
    pub fn check_values(&self) -> Result<(u64, u8), CompatError> {
        let invalid = CompatError::Invalid;
        let mem = check_mem(STREAM_FIELDS.mem, self.mem_bytes, &shown(self.mem_bytes))
            .map_err(invalid)?;
        let cpus = check_cpus(STREAM_FIELDS.cpus, u64::from(self.cpus)).map_err(invalid)?;
        check_cmdline(STREAM_FIELDS.cmdline, &self.cmdline).map_err(invalid)?;
        if self.cpuid.len() > MAX_CPUID_ENTRIES {
            return Err(CompatError::TooManyCpuid(self.cpuid.len()));
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(CompatError::TooManyMsrs(self.msrs.len()));
        }
        let mut seen = HashSet::new();
        if let Some(&dup) = self.msrs.iter().find(|&&m| !seen.insert(m)) {
            return Err(CompatError::DuplicateMsr(dup));
        }
        Ok((mem, cpus))
    }

    /// What this destination takes: the VM it was built for, else at most its limits.
    /// Call after [`check_values`](Self::check_values).
    pub fn check_limits(&self, limits: &GuestLimits) -> Result<(), CompatError> {
        let cpus = u8::try_from(self.cpus).unwrap_or(u8::MAX);
        if let Some((built_mem, built_cpus)) = limits.shape {
            if (self.mem_bytes, cpus) != (built_mem, built_cpus) {
                return Err(CompatError::Shape {
                    mem: format_size(self.mem_bytes),
                    cpus,
                    built_mem: format_size(built_mem),
                    built_cpus,
                });
            }
        }
        if self.mem_bytes > limits.max_mem_bytes {
            return Err(CompatError::MaxMem {
                mem: shown(self.mem_bytes),
                max: format_size(limits.max_mem_bytes),
            });
        }
        if cpus > limits.max_cpus {
            return Err(CompatError::MaxCpus {
                cpus,
                max: limits.max_cpus,
            });
        }
        Ok(())
    }

    /// Whether the guest's CPUID can be given to vCPUs of a host that offers `offered`
    /// (`cpuid::guest_cpuid` of its KVM's supported set).
    pub fn check_cpu(&self, offered: &[kvm_cpuid_entry2]) -> Result<(), CompatError> {
        check_cpuid(&self.guest_cpuid(), offered).map_err(CompatError::Cpuid)
    }

    /// Whether every MSR the source saves is one this host's vCPUs take back (`restorable`).
    pub fn check_msrs(&self, restorable: &[u32]) -> Result<(), CompatError> {
        match self.msrs.iter().find(|m| !restorable.contains(m)) {
            Some(&m) => Err(CompatError::Msr(m)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KernelSource, MAX_CMDLINE_LEN};

    fn config() -> MigrationConfig {
        let vm = VmConfig {
            mem_bytes: 1 << 30,
            cpus: 2,
            kernel: KernelSource::BuiltinTestGuest,
            initrd: None,
            cmdline: "touch=1M".into(),
            api_socket: "/x".into(),
            memory: Default::default(),
            dirty_tracker: Default::default(),
        };
        let cpuid = [kvm_cpuid_entry2 {
            function: 1,
            ecx: 0b0110,
            ..Default::default()
        }];
        MigrationConfig::new(&vm, &cpuid, &[0x10, 0xc000_0080])
    }

    fn limits() -> GuestLimits {
        GuestLimits {
            max_mem_bytes: 24 << 30,
            max_cpus: 2,
            shape: None,
        }
    }

    #[test]
    fn the_blob_round_trips_and_refuses_unknown_fields() {
        let c = config();
        let json = serde_json::to_vec(&c).unwrap();
        assert_eq!(serde_json::from_slice::<MigrationConfig>(&json).unwrap(), c);
        assert_eq!(c.guest_cpuid()[0].ecx, 0b0110);
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["cpu_features"] = serde_json::json!([1, 2]);
        assert!(serde_json::from_value::<MigrationConfig>(v).is_err());
    }

    /// The limits of the command line, with the stream's field names.
    #[test]
    fn stream_values_meet_the_command_lines_limits() {
        assert_eq!(config().check_values(), Ok((1 << 30, 2)));
        let err = |f: fn(&mut MigrationConfig)| {
            let mut c = config();
            f(&mut c);
            c.check_values().unwrap_err().to_string()
                + ": "
                + &c.check_values()
                    .err()
                    .and_then(|e| std::error::Error::source(&e).map(|s| s.to_string()))
                    .unwrap_or_default()
        };
        assert_eq!(
            err(|c| c.cpus = 255),
            "invalid configuration: the stream's cpus 255 is above the maximum of 254"
        );
        assert_eq!(
            err(|c| c.cpus = 0),
            "invalid configuration: the stream's cpus must be at least 1"
        );
        // Near the physical-address limit: refused before any bitmap or mapping exists.
        assert_eq!(
            err(|c| c.mem_bytes = 1 << 52),
            "invalid configuration: the stream's mem_bytes 4503599627370496 (4096T) is above \
             the maximum of 4T"
        );
        assert!(err(|c| c.mem_bytes = 4097 << 12 | 1).contains("not a multiple of 4K"));
        assert!(err(|c| c.mem_bytes = 1 << 20).contains("below the minimum of 16M"));
        assert!(err(|c| c.cmdline = "x".repeat(MAX_CMDLINE_LEN)).contains("the maximum is 2048"));
        assert!(err(|c| c.cmdline = "a\0b".into()).contains("NUL"));
        assert!(err(|c| c.msrs = vec![1; MAX_MSRS + 1]).contains("limit is 1024"));
        assert!(err(|c| c.msrs = vec![0x10, 0x10]).contains("MSR 0x10 twice"));
        assert!(err(|c| c.cpuid = vec![c.cpuid[0]; 257]).contains("limit is 256"));
    }

    #[test]
    fn the_destinations_limits_and_shape_bound_the_stream() {
        let c = config();
        assert_eq!(c.check_limits(&limits()), Ok(()));
        let small = GuestLimits {
            max_mem_bytes: 512 << 20,
            ..limits()
        };
        assert_eq!(
            c.check_limits(&small).unwrap_err().to_string(),
            "the stream's mem_bytes 1073741824 (1G) is above this destination's --max-mem 512M"
        );
        let one = GuestLimits {
            max_cpus: 1,
            ..limits()
        };
        assert_eq!(
            c.check_limits(&one).unwrap_err().to_string(),
            "the stream's cpus 2 is above this destination's --max-cpus 1"
        );
        let built = GuestLimits {
            shape: Some((2 << 30, 2)),
            ..limits()
        };
        assert_eq!(
            c.check_limits(&built).unwrap_err().to_string(),
            "the stream's guest has 1G of memory and 2 vCPUs; this destination was built for \
             2G and 2 (--mem, --cpus)"
        );
        let same = GuestLimits {
            shape: Some((1 << 30, 2)),
            ..limits()
        };
        assert_eq!(c.check_limits(&same), Ok(()));
    }

    #[test]
    fn every_saved_msr_must_be_restorable() {
        let c = config();
        assert_eq!(c.check_msrs(&[0xc000_0080, 0x10, 0x1b]), Ok(()));
        assert_eq!(
            c.check_msrs(&[0x10]).unwrap_err().to_string(),
            "the source saves MSR 0xc0000080 of each vCPU, which this host's KVM cannot restore"
        );
    }
}

//! The configuration blob: what the destination checks before it accepts a single page.

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// CPUID feature registers compared between hosts: (leaf, subleaf, register index
/// eax=0 ebx=1 ecx=2 edx=3, name).
const FEATURE_REGS: &[(u32, u32, usize, &str)] = &[
    (0x1, 0, 2, "leaf 1 ECX"),
    (0x1, 0, 3, "leaf 1 EDX"),
    (0x7, 0, 1, "leaf 7 EBX"),
    (0x7, 0, 2, "leaf 7 ECX"),
    (0x7, 0, 3, "leaf 7 EDX"),
    (0xd, 1, 0, "leaf 0xD.1 EAX"),
    (0x8000_0001, 0, 2, "leaf 0x80000001 ECX"),
    (0x8000_0001, 0, 3, "leaf 0x80000001 EDX"),
];

/// What a VM is made of, as far as the destination must agree before loading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationConfig {
    pub mem_bytes: u64,
    pub cpus: u8,
    /// The guest command line (informational).
    pub cmdline: String,
    /// CPUID feature words of the source host's KVM, in `FEATURE_REGS` order.
    pub cpu_features: Vec<u32>,
}

/// Why a destination cannot run the incoming VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompatError {
    #[error("the source's CPU has features this host's KVM lacks: {reg} bits {missing:#x}")]
    CpuFeatures { reg: &'static str, missing: u32 },
    #[error("the source describes {found} CPUID feature words, expected {expected}")]
    FeatureCount { found: usize, expected: usize },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

fn reg(e: &kvm_cpuid_entry2, i: usize) -> u32 {
    [e.eax, e.ebx, e.ecx, e.edx][i]
}

/// The feature words of a CPUID table (0 for absent leaves).
pub fn cpu_features(cpuid: &[kvm_cpuid_entry2]) -> Vec<u32> {
    FEATURE_REGS
        .iter()
        .map(|&(leaf, sub, r, _)| {
            cpuid
                .iter()
                .find(|e| e.function == leaf && e.index == sub)
                .map_or(0, |e| reg(e, r))
        })
        .collect()
}

impl MigrationConfig {
    /// The configuration of a VM built from `config` on a host whose KVM supports `supported`.
    pub fn new(config: &VmConfig, supported: &[kvm_cpuid_entry2]) -> MigrationConfig {
        MigrationConfig {
            mem_bytes: config.mem_bytes,
            cpus: config.cpus,
            cmdline: config.cmdline.clone(),
            cpu_features: cpu_features(supported),
        }
    }

    /// Whether a guest that saw the source's CPU can run on a host with `supported` CPUID.
    pub fn check_cpu(&self, supported: &[kvm_cpuid_entry2]) -> Result<(), CompatError> {
        if self.cpu_features.len() != FEATURE_REGS.len() {
            return Err(CompatError::FeatureCount {
                found: self.cpu_features.len(),
                expected: FEATURE_REGS.len(),
            });
        }
        let here = cpu_features(supported);
        for (i, (&src, &dst)) in self.cpu_features.iter().zip(&here).enumerate() {
            let missing = src & !dst;
            if missing != 0 {
                return Err(CompatError::CpuFeatures {
                    reg: FEATURE_REGS[i].3,
                    missing,
                });
            }
        }
        Ok(())
    }

    /// Basic sanity of values that come from the stream.
    pub fn check_values(&self) -> Result<(), CompatError> {
        if self.cpus == 0 {
            return Err(CompatError::Invalid("0 vCPUs".into()));
        }
        if self.mem_bytes == 0 || !self.mem_bytes.is_multiple_of(4096) {
            return Err(CompatError::Invalid(format!(
                "memory size {} is not a positive multiple of 4 KiB",
                self.mem_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn subset_is_compatible_superset_is_not() {
        let src = [entry(1, 0, 0b0110)];
        let cfg = MigrationConfig {
            mem_bytes: 1 << 30,
            cpus: 1,
            cmdline: String::new(),
            cpu_features: cpu_features(&src),
        };
        assert_eq!(cfg.check_cpu(&[entry(1, 0, 0b1110)]), Ok(()));
        assert_eq!(
            cfg.check_cpu(&[entry(1, 0, 0b0010)]),
            Err(CompatError::CpuFeatures {
                reg: "leaf 1 ECX",
                missing: 0b0100
            })
        );
    }

    #[test]
    fn bad_values_are_refused() {
        let mut cfg = MigrationConfig {
            mem_bytes: 4097,
            cpus: 1,
            cmdline: String::new(),
            cpu_features: vec![],
        };
        assert!(cfg.check_values().is_err());
        cfg.mem_bytes = 1 << 20;
        cfg.cpus = 0;
        assert!(cfg.check_values().is_err());
        cfg.cpus = 1;
        assert!(cfg.check_cpu(&[]).is_err(), "feature count mismatch");
    }
}

//! Whether a guest's CPUID (vCPU 0's table, from a migration's configuration) can be given to
//! this host's vCPUs: every leaf and subleaf the guest sees is compared with what this host
//! offers (`cpuid::guest_cpuid` of its KVM's supported set), register by register, by the rule
//! of what the register holds:
//!
//! - feature bitmaps: the guest's bits must be a subset of the host's (leaf 1 ECX/EDX, 7.x,
//!   0xD.0 EAX/EDX = XCR0, 0xD.1 = XSAVE variants and IA32_XSS, 0x40000001 = KVM features,
//!   0x80000001, 0x80000007/8 EBX...);
//! - values that must match: vendor strings, the CLFLUSH line size, each XSAVE component's
//!   size, offset and flags (0xD.2+: the guest saved its state in that layout), the KVM
//!   signature, and every leaf this table does not know (an exact match is the safe default);
//! - values that must fit: the highest basic, extended and KVM leaf and the highest leaf 7
//!   subleaf, the largest XSAVE area (0xD.0 ECX), the address sizes (0x80000008 EAX);
//! - the vmm's own (per vCPU or per VM: APIC ids, topology leaves 0xB/0x1F/0x8000001E, counts,
//!   HTT, CmpLegacy, the hypervisor bit) and KVM's run-time bits (OSXSAVE, OSPKE, the XSAVE
//!   sizes of the current XCR0): not compared, the destination sets them;
//! - descriptions of the host (model, brand string, cache descriptors, TSC/crystal ratio):
//!   the guest goes on seeing the source's, which is no capability.
//!
//! A leaf the host does not have counts as all zero. The first mismatch is the error, naming
//! the leaf, subleaf, register and bits.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::cpuid::{ECX_CMP_LEGACY, ECX_HYPERVISOR, ECX_OSPKE, ECX_OSXSAVE, EDX_HTT};

/// How one register is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// Feature bits: the guest's must be the host's or fewer (bits in `ours` are not compared).
    Bits { ours: u32 },
    /// The same value on both (bits in `ours` are not compared).
    Same { ours: u32 },
    /// Each field (lowest bit, width) no larger for the guest than for the host.
    AtMost(&'static [(u32, u32)]),
    /// Set by the vmm (per vCPU or VM) or by KVM at run time.
    Ours,
    /// Describes the host; the guest keeps the source's.
    Info,
}

const BITS: Rule = Rule::Bits { ours: 0 };
const SAME: Rule = Rule::Same { ours: 0 };
const MAX: Rule = Rule::AtMost(&[(0, 32)]);
const OURS: [Rule; 4] = [Rule::Ours; 4];
const INFO: [Rule; 4] = [Rule::Info; 4];

/// The rules of leaves `first..=last`, subleaf `subleaf` (`None`: every subleaf), per register
/// (EAX, EBX, ECX, EDX). The first matching row applies; a leaf in no row: all `SAME`.
struct Row {
    first: u32,
    last: u32,
    subleaf: Option<u32>,
    regs: [Rule; 4],
}

const fn row(leaf: u32, subleaf: Option<u32>, regs: [Rule; 4]) -> Row {
    Row {
        first: leaf,
        last: leaf,
        subleaf,
        regs,
    }
}

const RULES: &[Row] = &[
    // Highest basic leaf; vendor.
    row(0x0, Some(0), [MAX, SAME, SAME, SAME]),
    // Signature; brand index, CLFLUSH size, count, APIC id; features.
    row(
        0x1,
        Some(0),
        [
            Rule::Info,
            Rule::Same { ours: !0x0000_ff00 },
            Rule::Bits {
                ours: ECX_OSXSAVE | ECX_HYPERVISOR,
            },
            Rule::Bits { ours: EDX_HTT },
        ],
    ),
    // Cache and TLB descriptors, serial number, deterministic cache parameters.
    Row {
        first: 0x2,
        last: 0x4,
        subleaf: None,
        regs: INFO,
    },
    // MONITOR/MWAIT: line sizes and C-states describe the host, ECX is features.
    row(0x5, Some(0), [Rule::Info, Rule::Info, BITS, Rule::Info]),
    // Thermal and power management.
    row(0x6, Some(0), [BITS, Rule::Info, BITS, Rule::Info]),
    // Structured extended features: highest subleaf, then bitmaps.
    row(
        0x7,
        Some(0),
        [MAX, BITS, Rule::Bits { ours: ECX_OSPKE }, BITS],
    ),
    row(0x7, None, [BITS; 4]),
    // Topology: the vmm's.
    row(0xb, None, OURS),
    // XSAVE: XCR0 mask, size for the current XCR0 (run time), largest size, XCR0 high.
    row(0xd, Some(0), [BITS, Rule::Ours, MAX, BITS]),
    // XSAVE variants, size for XCR0|XSS (run time), IA32_XSS mask.
    row(0xd, Some(1), [BITS, Rule::Ours, BITS, BITS]),
    // Component i: size, offset, flags: the guest's XSAVE areas are laid out so.
    row(0xd, None, [SAME; 4]),
    // TSC/crystal ratio and nominal frequencies: the guest's TSC rate is restored with it.
    Row {
        first: 0x15,
        last: 0x16,
        subleaf: None,
        regs: INFO,
    },
    row(0x1f, None, OURS),
    // KVM: highest leaf and signature; features and hints.
    row(0x4000_0000, Some(0), [MAX, SAME, SAME, SAME]),
    row(0x4000_0001, Some(0), [BITS, SAME, SAME, BITS]),
    // Highest extended leaf; vendor (AMD).
    row(0x8000_0000, Some(0), [MAX, SAME, SAME, SAME]),
    row(
        0x8000_0001,
        Some(0),
        [
            Rule::Info,
            Rule::Info,
            Rule::Bits {
                ours: ECX_CMP_LEGACY,
            },
            BITS,
        ],
    ),
    // Brand string, L1/L2/L3 caches and TLBs.
    Row {
        first: 0x8000_0002,
        last: 0x8000_0006,
        subleaf: None,
        regs: INFO,
    },
    // RAS and advanced power management (invariant TSC in EDX).
    row(0x8000_0007, Some(0), [Rule::Info, BITS, Rule::Info, BITS]),
    // Physical, linear and guest-physical address sizes; features; core count (the vmm's,
    // bits 15:12 and 7:0) and the rest of ECX.
    row(
        0x8000_0008,
        Some(0),
        [
            Rule::AtMost(&[(0, 8), (8, 8), (16, 8)]),
            BITS,
            Rule::Same { ours: 0xf0ff },
            SAME,
        ],
    ),
    // TLB and performance hints, AMD cache topology.
    Row {
        first: 0x8000_0019,
        last: 0x8000_001a,
        subleaf: None,
        regs: INFO,
    },
    row(0x8000_001d, None, INFO),
    row(0x8000_001e, None, OURS),
    // Extended features 2; microcode patch size.
    row(0x8000_0021, Some(0), [BITS, Rule::Info, SAME, SAME]),
];

fn rules(leaf: u32, subleaf: u32) -> [Rule; 4] {
    RULES
        .iter()
        .find(|r| (r.first..=r.last).contains(&leaf) && r.subleaf.is_none_or(|s| s == subleaf))
        .map_or([SAME; 4], |r| r.regs)
}

const REG_NAMES: [&str; 4] = ["EAX", "EBX", "ECX", "EDX"];

/// Why a guest's CPUID cannot be given to this host's vCPUs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    #[error(
        "CPUID leaf {leaf:#x} subleaf {subleaf} {reg}: the guest has bits {missing:#010x} that \
         this host's KVM does not offer (guest {guest:#010x}, host {host:#010x})"
    )]
    Missing {
        leaf: u32,
        subleaf: u32,
        reg: &'static str,
        missing: u32,
        guest: u32,
        host: u32,
    },
    #[error(
        "CPUID leaf {leaf:#x} subleaf {subleaf} {reg} is {guest:#010x} for the guest and \
         {host:#010x} on this host: it must be the same"
    )]
    Differs {
        leaf: u32,
        subleaf: u32,
        reg: &'static str,
        guest: u32,
        host: u32,
    },
    #[error(
        "CPUID leaf {leaf:#x} subleaf {subleaf} {reg} bits {high}:{low} are {guest:#x} for the \
         guest, more than this host's {host:#x}"
    )]
    Exceeds {
        leaf: u32,
        subleaf: u32,
        reg: &'static str,
        high: u32,
        low: u32,
        guest: u32,
        host: u32,
    },
    #[error(
        "CPUID leaf {leaf:#x} subleaf {subleaf} has flags {guest:#x} for the guest and {host:#x} \
         on this host"
    )]
    Flags {
        leaf: u32,
        subleaf: u32,
        guest: u32,
        host: u32,
    },
    #[error("CPUID leaf {leaf:#x} subleaf {subleaf} appears twice in the guest's table")]
    Duplicate { leaf: u32, subleaf: u32 },
    #[error(
        "CPUID leaf {leaf:#x} subleaf {subleaf} of the guest's table is malformed (flags {flags:#x})"
    )]
    Malformed { leaf: u32, subleaf: u32, flags: u32 },
}

fn regs(e: &kvm_cpuid_entry2) -> [u32; 4] {
    [e.eax, e.ebx, e.ecx, e.edx]
}

/// The host's entry for `(leaf, subleaf)`: a subleaf-indexed entry matches its index, another
/// matches any.
fn host_entry(host: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    host.iter().find(|h| {
        h.function == leaf && (h.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || h.index == subleaf)
    })
}

/// Checks that every leaf and subleaf of `guest` (vCPU 0's table) can be offered by a host
/// whose guest table is `host` (see the module documentation for the rules).
pub fn check_cpuid(
    guest: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> Result<(), CpuidError> {
    let mut seen = std::collections::HashSet::new();
    for g in guest {
        let (leaf, subleaf) = (g.function, g.index);
        let indexed = g.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0;
        if g.flags & !KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0 || (!indexed && subleaf != 0) {
            return Err(CpuidError::Malformed {
                leaf,
                subleaf,
                flags: g.flags,
            });
        }
        if !seen.insert((leaf, subleaf)) {
            return Err(CpuidError::Duplicate { leaf, subleaf });
        }
        let h = host_entry(host, leaf, subleaf);
        let rules = rules(leaf, subleaf);
        if let Some(h) = h {
            let vmm_set = rules.iter().all(|r| *r == Rule::Ours);
            if h.flags != g.flags && !vmm_set {
                return Err(CpuidError::Flags {
                    leaf,
                    subleaf,
                    guest: g.flags,
                    host: h.flags,
                });
            }
        }
        let host_regs = h.map_or([0; 4], regs);
        for (i, ((rule, guest), host)) in rules.iter().zip(regs(g)).zip(host_regs).enumerate() {
            check_register(*rule, guest, host).map_err(|m| m.at(leaf, subleaf, REG_NAMES[i]))?;
        }
    }
    Ok(())
}

/// A register mismatch, before it knows where it is.
enum Mismatch {
    Missing {
        missing: u32,
        guest: u32,
        host: u32,
    },
    Differs {
        guest: u32,
        host: u32,
    },
    Exceeds {
        low: u32,
        width: u32,
        guest: u32,
        host: u32,
    },
}

impl Mismatch {
    fn at(self, leaf: u32, subleaf: u32, reg: &'static str) -> CpuidError {
        match self {
            Mismatch::Missing {
                missing,
                guest,
                host,
            } => CpuidError::Missing {
                leaf,
                subleaf,
                reg,
                missing,
                guest,
                host,
            },
            Mismatch::Differs { guest, host } => CpuidError::Differs {
                leaf,
                subleaf,
                reg,
                guest,
                host,
            },
            Mismatch::Exceeds {
                low,
                width,
                guest,
                host,
            } => CpuidError::Exceeds {
                leaf,
                subleaf,
                reg,
                high: low + width - 1,
                low,
                guest,
                host,
            },
        }
    }
}

fn field(value: u32, low: u32, width: u32) -> u32 {
    let v = u64::from(value) >> low;
    (v & ((1u64 << width) - 1)) as u32
}

fn check_register(rule: Rule, guest: u32, host: u32) -> Result<(), Mismatch> {
    match rule {
        Rule::Bits { ours } => {
            let missing = guest & !host & !ours;
            if missing != 0 {
                return Err(Mismatch::Missing {
                    missing,
                    guest,
                    host,
                });
            }
        }
        Rule::Same { ours } => {
            if guest & !ours != host & !ours {
                return Err(Mismatch::Differs { guest, host });
            }
        }
        Rule::AtMost(fields) => {
            for &(low, width) in fields {
                let (g, h) = (field(guest, low, width), field(host, low, width));
                if g > h {
                    return Err(Mismatch::Exceeds {
                        low,
                        width,
                        guest: g,
                        host: h,
                    });
                }
            }
        }
        Rule::Ours | Rule::Info => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::cpuid::{guest_cpuid, vcpu_cpuid, ECX_VMX};
    use super::*;

    fn e(function: u32, index: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
        let indexed = matches!(function, 0x4 | 0x7 | 0xb | 0xd | 0x1f | 0x8000_001d);
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if indexed {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
            ..Default::default()
        }
    }

    /// A plausible host: vendor, features, leaf 7, XSAVE with AVX, KVM leaves, addresses.
    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            e(0x0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            e(
                0x1,
                0,
                [
                    0x000a_0671,
                    0x0002_0800,
                    0x7ffa_3223 & !ECX_VMX,
                    0x0f8b_fbff,
                ],
            ),
            e(0x4, 0, [0x0400_0121, 0x02c0_003f, 0x3f, 0]),
            e(0x7, 0, [0x1, 0x0180_2852, 0x1a01_0104, 0x2001_0000]),
            e(0x7, 1, [0x1c00, 0, 0, 0x4000]),
            e(0xb, 0, [0, 0, 0, 0]),
            e(0xd, 0, [0x7, 0x340, 0x340, 0]),
            e(0xd, 1, [0x1, 0, 0, 0]),
            e(0xd, 2, [0x100, 0x240, 0, 0]),
            e(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            e(0x4000_0001, 0, [0x0100_7efb, 0, 0, 0]),
            e(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            e(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
            e(0x8000_0002, 0, [0x6574_6e49, 0, 0, 0]),
            e(0x8000_0008, 0, [0x3930, 0, 0, 0]),
        ]
    }

    /// The guest table of a host with `supported`, `cpus` vCPUs.
    fn guest_of(supported: &[kvm_cpuid_entry2], cpus: u8) -> Vec<kvm_cpuid_entry2> {
        guest_cpuid(supported, cpus)
    }

    fn with(
        mut t: Vec<kvm_cpuid_entry2>,
        leaf: u32,
        sub: u32,
        f: impl Fn(&mut kvm_cpuid_entry2),
    ) -> Vec<kvm_cpuid_entry2> {
        let found = t.iter_mut().find(|x| x.function == leaf && x.index == sub);
        f(found.expect("leaf in table"));
        t
    }

    #[test]
    fn the_same_host_and_a_smaller_guest_are_compatible() {
        let host = guest_of(&supported(), 2);
        assert_eq!(check_cpuid(&host, &host), Ok(()));
        // Fewer features, a lower leaf 7 subleaf limit, smaller addresses: fine.
        let g = with(host.clone(), 0x7, 0, |x| {
            x.ebx &= !0x2;
            x.eax = 0;
        });
        let g = with(g, 0x8000_0008, 0, |x| x.eax = 0x3028);
        assert_eq!(check_cpuid(&g, &host), Ok(()));
        // Another vCPU count: the vmm's fields differ, nothing else.
        assert_eq!(check_cpuid(&guest_of(&supported(), 5), &host), Ok(()));
    }

    #[test]
    fn per_vcpu_runtime_and_descriptive_fields_are_not_compared() {
        let host = guest_of(&supported(), 2);
        let g = vcpu_cpuid(&host, 1, 2);
        let g = with(g, 0x1, 0, |x| {
            x.eax = 0x0009_06ea; // another model
            x.ecx |= ECX_OSXSAVE;
        });
        let g = with(g, 0x7, 0, |x| x.ecx |= ECX_OSPKE);
        let g = with(g, 0xd, 0, |x| x.ebx = 0x980);
        let g = with(g, 0x8000_0002, 0, |x| x.eax = 0x2044_4d41); // brand string
        assert_eq!(check_cpuid(&g, &host), Ok(()));
    }

    #[test]
    fn a_feature_bit_the_host_lacks_is_named() {
        let host = guest_of(&supported(), 1);
        let g = with(host.clone(), 0x7, 0, |x| x.ebx |= 1 << 5); // AVX2
        assert_eq!(
            check_cpuid(&g, &host),
            Err(CpuidError::Missing {
                leaf: 0x7,
                subleaf: 0,
                reg: "EBX",
                missing: 0x20,
                guest: 0x0180_2872,
                host: 0x0180_2852
            })
        );
        assert_eq!(
            check_cpuid(&g, &host).unwrap_err().to_string(),
            "CPUID leaf 0x7 subleaf 0 EBX: the guest has bits 0x00000020 that this host's KVM \
             does not offer (guest 0x01802872, host 0x01802852)"
        );
        for (leaf, sub, reg) in [
            (0x1, 0, 3usize),
            (0x7, 1, 0),
            (0xd, 0, 0),
            (0xd, 1, 0),
            (0x4000_0001, 0, 0),
            (0x8000_0001, 0, 3),
        ] {
            let g = with(host.clone(), leaf, sub, |x| match reg {
                0 => x.eax |= 1 << 30,
                _ => x.edx |= 1 << 30,
            });
            assert!(
                matches!(check_cpuid(&g, &host), Err(CpuidError::Missing { leaf: l, subleaf: s, .. }) if l == leaf && s == sub),
                "leaf {leaf:#x}.{sub}: {:?}",
                check_cpuid(&g, &host)
            );
        }
    }

    #[test]
    fn values_must_match_or_fit() {
        let host = guest_of(&supported(), 1);
        // XSAVE component 2 laid out elsewhere.
        let g = with(host.clone(), 0xd, 2, |x| x.ebx = 0x280);
        assert!(matches!(
            check_cpuid(&g, &host),
            Err(CpuidError::Differs {
                leaf: 0xd,
                subleaf: 2,
                reg: "EBX",
                ..
            })
        ));
        // A larger XSAVE area.
        let g = with(host.clone(), 0xd, 0, |x| x.ecx = 0xa80);
        assert!(matches!(
            check_cpuid(&g, &host),
            Err(CpuidError::Exceeds { leaf: 0xd, .. })
        ));
        // More physical address bits.
        let g = with(host.clone(), 0x8000_0008, 0, |x| x.eax = 0x3034);
        assert_eq!(
            check_cpuid(&g, &host).unwrap_err().to_string(),
            "CPUID leaf 0x80000008 subleaf 0 EAX bits 7:0 are 0x34 for the guest, more than \
             this host's 0x30"
        );
        // A higher basic leaf, another vendor, another KVM signature, another CLFLUSH size.
        for (leaf, f) in [
            (
                0x0,
                (|x: &mut kvm_cpuid_entry2| x.eax = 0x1f) as fn(&mut kvm_cpuid_entry2),
            ),
            (0x0, |x| x.ebx = 0x6874_7541),
            (0x4000_0000, |x| x.ebx = 0),
            (0x1, |x| x.ebx ^= 0x0000_0800),
        ] {
            let g = with(host.clone(), leaf, 0, f);
            assert!(check_cpuid(&g, &host).is_err(), "leaf {leaf:#x}");
        }
    }

    #[test]
    fn a_leaf_the_host_lacks_counts_as_zero() {
        let host = guest_of(&supported(), 1);
        let mut g = host.clone();
        g.push(e(0x14, 0, [1, 0, 0, 0])); // processor trace
        assert!(matches!(
            check_cpuid(&g, &host),
            Err(CpuidError::Differs { leaf: 0x14, .. })
        ));
        let mut g = host.clone();
        g.push(e(0x14, 0, [0; 4]));
        g.push(e(0x8000_0005, 0, [1, 2, 3, 4])); // caches: descriptive
        assert_eq!(check_cpuid(&g, &host), Ok(()));
        // An XSAVE component the host does not have.
        let mut g = host.clone();
        g.push(e(0xd, 9, [8, 0xa80, 0, 0]));
        assert!(check_cpuid(&g, &host).is_err());
    }

    #[test]
    fn nested_virtualisation_is_not_offered_even_where_kvm_supports_it() {
        let mut s = supported();
        s[1].ecx |= ECX_VMX;
        let host = guest_of(&s, 1);
        let mut g = host.clone();
        g[1].ecx |= ECX_VMX;
        assert!(matches!(
            check_cpuid(&g, &host),
            Err(CpuidError::Missing {
                leaf: 1,
                reg: "ECX",
                missing: ECX_VMX,
                ..
            })
        ));
    }

    #[test]
    fn malformed_tables_are_refused() {
        let host = guest_of(&supported(), 1);
        let mut g = host.clone();
        g.push(host[3]);
        assert!(matches!(
            check_cpuid(&g, &host),
            Err(CpuidError::Duplicate { .. })
        ));
        let g = with(host.clone(), 0x7, 0, |x| x.flags = 0);
        assert!(matches!(
            check_cpuid(&g, &host),
            Err(CpuidError::Flags { leaf: 7, .. })
        ));
        let g = with(host.clone(), 0x1, 0, |x| x.flags = 4);
        assert!(matches!(
            check_cpuid(&g, &host),
            Err(CpuidError::Malformed { leaf: 1, .. })
        ));
        let mut g = host.clone();
        g.push(e(0x8000_0007, 3, [0; 4]));
        assert!(matches!(
            check_cpuid(&g, &host),
            Err(CpuidError::Malformed { .. })
        ));
    }
}

//! CPUID for each vCPU. [`guest_cpuid`] makes the table a guest of this host sees (KVM's
//! supported set with the topology subleaves added and nested virtualisation hidden: its
//! state is not migrated); [`vcpu_cpuid`] patches a table for one vCPU (APIC id, topology).
//! The table of vCPU 0 travels in a migration's configuration and the destination patches it
//! for each of its vCPUs (patching is idempotent), after `cpuid_compat` checked that this host
//! offers all of it.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

pub const LEAF_FEATURES: u32 = 0x1;
pub const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
pub const LEAF_AMD_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
/// AMD's SVM features (nested virtualisation).
const LEAF_SVM: u32 = 0x8000_000a;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

/// 0x8000_0001 ECX: legacy multi-core (CmpLegacy).
pub const ECX_CMP_LEGACY: u32 = 1 << 1;
/// 0x8000_0001 ECX: SVM (AMD nested virtualisation).
pub const ECX_SVM: u32 = 1 << 2;
/// Leaf 1 ECX: VMX (Intel nested virtualisation).
pub const ECX_VMX: u32 = 1 << 5;
/// Leaf 1 ECX: the guest enabled XSAVE (CR4.OSXSAVE), kept by KVM at run time.
pub const ECX_OSXSAVE: u32 = 1 << 27;
pub const ECX_HYPERVISOR: u32 = 1 << 31;
pub const EDX_HTT: u32 = 1 << 28;
/// Leaf 7.0 ECX: the guest enabled protection keys (CR4.PKE), kept by KVM at run time.
pub const ECX_OSPKE: u32 = 1 << 4;
/// Leaf 7.0 EDX: IA32_ARCH_CAPABILITIES (MSR 0x10a) exists.
pub const EDX_ARCH_CAPABILITIES: u32 = 1 << 29;

/// Topology level types of leaves 0xB/0x1F.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` items (ceil(log2(n))).
fn id_bits(n: u8) -> u32 {
    if n <= 1 {
        0
    } else {
        u32::BITS - u32::from(n - 1).leading_zeros()
    }
}

/// The topology leaves (0xB, 0x1F) with their SMT and core subleaves plus the terminating
/// invalid subleaf. KVM reports only subleaf 0 (zeroed) of each, which guests read as "no
/// core level", so every vCPU would be its own package.
fn add_topology_subleaves(entries: &mut Vec<kvm_cpuid_entry2>) {
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        let Some(template) = entries.iter().find(|e| e.function == leaf).copied() else {
            continue;
        };
        entries.retain(|e| e.function != leaf);
        for index in 0..3 {
            entries.push(kvm_cpuid_entry2 {
                function: leaf,
                index,
                flags: template.flags | KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            });
        }
    }
}

/// The CPUID a guest of `cpu_count` vCPUs sees on this host (vCPU 0's), from
/// KVM_GET_SUPPORTED_CPUID's `supported`: topology subleaves added, VMX, SVM and the SVM
/// leaf hidden (nested state is not migrated, so a guest must not start nested guests).
pub fn guest_cpuid(supported: &[kvm_cpuid_entry2], cpu_count: u8) -> Vec<kvm_cpuid_entry2> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| e.function != LEAF_SVM)
        .map(|e| kvm_cpuid_entry2 {
            padding: [0; 3],
            ..*e
        })
        .collect();
    add_topology_subleaves(&mut entries);
    for e in &mut entries {
        match (e.function, e.index) {
            (LEAF_FEATURES, 0) => e.ecx &= !ECX_VMX,
            (LEAF_AMD_EXT_FEATURES, 0) => e.ecx &= !ECX_SVM,
            _ => {}
        }
    }
    patch_cpuid(&mut entries, 0, cpu_count);
    entries
}

/// MSRs whose existence a CPUID bit announces: (MSR, leaf, subleaf, register, bit).
const MSR_FEATURES: &[(u32, u32, u32, usize, u32)] = &[(
    super::msr::MSR_IA32_ARCH_CAPABILITIES,
    LEAF_EXT_FEATURES,
    0,
    3,
    EDX_ARCH_CAPABILITIES,
)];

/// Hides from `entries` every feature whose MSR is not in `restorable` (the MSRs a VM saves):
/// a guest must not read a value that a migration would not carry. Returns whether it hid
/// any.
pub fn hide_unrestorable(entries: &mut [kvm_cpuid_entry2], restorable: &[u32]) -> bool {
    let mut hid = false;
    for &(msr, leaf, subleaf, reg, bit) in MSR_FEATURES {
        if !restorable.contains(&msr) && has(entries, leaf, subleaf, reg, bit) {
            log::info!("MSR {msr:#x} cannot be restored here: its CPUID bit is hidden");
            hide(entries, leaf, subleaf, reg, bit);
            hid = true;
        }
    }
    hid
}

/// Clears a feature bit in `entries` (leaf, subleaf, register index eax=0 .. edx=3).
pub fn hide(entries: &mut [kvm_cpuid_entry2], leaf: u32, subleaf: u32, reg: usize, bit: u32) {
    for e in entries
        .iter_mut()
        .filter(|e| e.function == leaf && e.index == subleaf)
    {
        match reg {
            0 => e.eax &= !bit,
            1 => e.ebx &= !bit,
            2 => e.ecx &= !bit,
            _ => e.edx &= !bit,
        }
    }
}

/// Whether `entries` has a feature bit (as [`hide`] names it).
pub fn has(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32, reg: usize, bit: u32) -> bool {
    entries
        .iter()
        .filter(|e| e.function == leaf && e.index == subleaf)
        .any(|e| [e.eax, e.ebx, e.ecx, e.edx][reg.min(3)] & bit != 0)
}

/// The CPUID of vCPU `cpu_id` of `cpu_count` from the guest's table (a [`guest_cpuid`], or
/// one that came with a migration): one package of `cpu_count` single-thread cores, APIC id
/// = `cpu_id`, hypervisor bit set.
pub fn vcpu_cpuid(guest: &[kvm_cpuid_entry2], cpu_id: u8, cpu_count: u8) -> Vec<kvm_cpuid_entry2> {
    let mut entries = guest.to_vec();
    patch_cpuid(&mut entries, cpu_id, cpu_count);
    entries
}

/// Patch the per-vCPU and topology values of `entries` in place.
fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, cpu_count: u8) {
    let apic_id = u32::from(cpu_id);
    let core_bits = id_bits(cpu_count);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (u32::from(cpu_count) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if cpu_count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cores = u32::from(cpu_count.max(1)) - 1;
                e.eax = (e.eax & 0x3fff) | (cores << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = u32::from(cpu_count);
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_AMD_EXT_FEATURES => {
                if cpu_count > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZES => {
                // ECX[7:0]: cores - 1; ECX[15:12]: APIC id bits for the core number.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (u32::from(cpu_count.max(1)) - 1);
            }
            LEAF_AMD_EXT_APIC_ID => {
                // One thread per core, core id = APIC id, node 0.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_and_count_per_vcpu() {
        let mut e = vec![leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2)];
        patch_cpuid(&mut e, 3, 4);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert!(e[0].ecx & ECX_HYPERVISOR != 0);
        assert!(e[0].edx & EDX_HTT != 0);
        assert!(
            e[1..].iter().all(|x| x.edx == 3),
            "x2APIC id in every subleaf"
        );
        assert_eq!((e[1].ebx, e[1].ecx >> 8), (1, LEVEL_SMT));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 4, LEVEL_CORE));
        assert_eq!(e[3].ecx >> 8, 0, "no level beyond core");
    }

    #[test]
    fn amd_topology_leaves() {
        let mut e = vec![
            leaf(0x8000_0001, 0),
            leaf(0x8000_0008, 0),
            leaf(0x8000_001e, 0),
        ];
        e[1].ecx = 0x1_0000; // PerfTscSize bits are kept
        patch_cpuid(&mut e, 5, 8);
        assert!(e[0].ecx & ECX_CMP_LEGACY != 0);
        assert_eq!(e[1].ecx, 0x1_0000 | (3 << 12) | 7);
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx), (5, 5, 0));
    }

    #[test]
    fn nested_virtualisation_is_hidden() {
        let mut supported = vec![leaf(1, 0), leaf(0x8000_0001, 0), leaf(LEAF_SVM, 0)];
        supported[0].ecx = ECX_VMX | 1;
        supported[1].ecx = ECX_SVM | 1;
        supported[2].eax = 1;
        let g = guest_cpuid(&supported, 1);
        assert_eq!(g.len(), 2, "the SVM leaf is gone");
        assert_eq!(g[0].ecx & (ECX_VMX | 1), 1, "VMX hidden, the rest kept");
        assert_eq!(g[1].ecx & (ECX_SVM | 1), 1, "SVM hidden, the rest kept");
        assert!(!has(&g, 1, 0, 2, ECX_VMX) && has(&g, 1, 0, 2, ECX_HYPERVISOR));
    }

    #[test]
    fn a_feature_whose_msr_is_not_restorable_is_hidden() {
        let mut e = vec![leaf(7, 0)];
        e[0].edx = EDX_ARCH_CAPABILITIES | 1;
        assert!(!hide_unrestorable(&mut e, &[0x10, 0x10a]));
        assert_eq!(e[0].edx, EDX_ARCH_CAPABILITIES | 1);
        assert!(hide_unrestorable(&mut e, &[0x10]));
        assert_eq!(e[0].edx, 1, "only its bit");
        assert!(!hide_unrestorable(&mut e, &[0x10]), "nothing left to hide");
    }

    #[test]
    fn patching_a_patched_table_is_patching_the_original() {
        let supported = vec![leaf(1, 0), leaf(4, 0), leaf(0xb, 0), leaf(0x8000_0008, 0)];
        let g = guest_cpuid(&supported, 4);
        let again = vcpu_cpuid(&g, 0, 4);
        assert_eq!(again, g);
        let mut direct = supported.clone();
        add_topology_subleaves(&mut direct);
        patch_cpuid(&mut direct, 3, 4);
        assert_eq!(vcpu_cpuid(&g, 3, 4), direct);
    }

    #[test]
    fn topology_subleaves_are_added_to_kvms_zeroed_leaf() {
        let supported = vec![leaf(1, 0), leaf(0xb, 0), leaf(0xd, 0)];
        let e = vcpu_cpuid(&guest_cpuid(&supported, 2), 1, 2);
        let topo: Vec<&kvm_cpuid_entry2> = e.iter().filter(|x| x.function == 0xb).collect();
        assert_eq!(topo.len(), 3);
        assert!(topo
            .iter()
            .all(|x| x.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0));
        assert_eq!(
            (topo[1].eax, topo[1].ebx, topo[1].ecx >> 8, topo[1].edx),
            (1, 2, 2, 1)
        );
        assert_eq!(topo[2].ecx >> 8, 0);
        assert!(
            e.iter().all(|x| x.function != 0x1f),
            "0x1F only when KVM lists it"
        );
        assert_eq!(e.iter().filter(|x| x.function == 0xd).count(), 1);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut e = vec![kvm_cpuid_entry2 {
            function: 1,
            edx: EDX_HTT,
            ..Default::default()
        }];
        patch_cpuid(&mut e, 0, 1);
        assert_eq!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[0].ebx >> 24, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            [1u8, 2, 3, 4, 5, 8, 9, 254].map(id_bits),
            [0, 1, 2, 2, 3, 3, 4, 8]
        );
    }
}

//! The CPUID a vCPU sees: KVM's supported leaves, made consistent with this VM's topology, plus
//! the hypervisor timing leaf. Pure data, unit-tested without KVM.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};

/// What varies per vCPU and per VM.
#[derive(Clone, Copy, Debug)]
pub struct CpuidShape {
    /// This vCPU's (x)APIC id.
    pub apic_id: u32,
    /// vCPUs in the VM, each presented as one core of one package.
    pub vcpu_count: u32,
    /// TSC frequency in kHz, for the timing leaf; 0 if unknown.
    pub tsc_khz: u32,
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_HYPERVISOR_BASE: u32 = 0x4000_0000;
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz.
const APIC_TIMER_KHZ: u32 = 1_000_000;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Returns `base` adjusted for one vCPU.
pub fn shape_cpuid(base: &CpuId, shape: CpuidShape) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = base.as_slice().to_vec();
    // Bits needed to number every vCPU as a core (topology leaves report it as a shift).
    let core_bits = shape.vcpu_count.max(1).next_power_of_two().trailing_zeros();

    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (shape.apic_id << 24) | (shape.vcpu_count.min(255) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if shape.vcpu_count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                entry.edx = shape.apic_id;
                match entry.index {
                    // SMT level: one thread per core.
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    // Core level: every vCPU is a core of package 0.
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = shape.vcpu_count;
                        entry.ecx = (2 << 8) | 1;
                    }
                    n => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = n & 0xff;
                    }
                }
            }
            LEAF_HYPERVISOR_BASE => entry.eax = entry.eax.max(LEAF_HYPERVISOR_TIMING),
            _ => {}
        }
    }

    entries.retain(|e| e.function != LEAF_HYPERVISOR_TIMING);
    if entries.len() < KVM_MAX_CPUID_ENTRIES {
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR_TIMING,
            eax: shape.tsc_khz,
            ebx: APIC_TIMER_KHZ,
            ..Default::default()
        });
    } else {
        // KVM filled the whole table: no room for the timing leaf (guests then calibrate
        // their clocks themselves), so do not announce it; the topology above still holds.
        let announced = base.as_slice().iter().find(|e| e.function == LEAF_HYPERVISOR_BASE).map(|e| e.eax);
        for entry in entries.iter_mut().filter(|e| e.function == LEAF_HYPERVISOR_BASE) {
            entry.eax = announced.unwrap_or(entry.eax);
        }
    }
    // At most KVM_MAX_CPUID_ENTRIES entries, as checked: this cannot fail.
    CpuId::from_entries(&entries).unwrap_or_else(|_| base.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 { function: 1, ebx: 0xff00_0801, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 0, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 1, ..Default::default() },
            kvm_cpuid_entry2 { function: 0x4000_0000, eax: 0x4000_0001, ..Default::default() },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid.as_slice().iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    #[test]
    fn apic_id_and_topology_follow_the_vcpu() {
        let c = shape_cpuid(&base(), CpuidShape { apic_id: 3, vcpu_count: 4, tsc_khz: 2_000_000 });
        let leaf1 = find(&c, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0801, "CLFLUSH size and brand kept");
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!((smt.edx, smt.ebx, smt.ecx), (3, 1, 0x100));
        assert_eq!((core.edx, core.eax, core.ebx, core.ecx), (3, 2, 4, 0x201));
    }

    #[test]
    fn timing_leaf_is_added_and_announced() {
        let c = shape_cpuid(&base(), CpuidShape { apic_id: 0, vcpu_count: 1, tsc_khz: 2_500_000 });
        assert_eq!(find(&c, 0x4000_0000, 0).eax, 0x4000_0010);
        let timing = find(&c, 0x4000_0010, 0);
        assert_eq!((timing.eax, timing.ebx), (2_500_000, 1_000_000));
        assert_eq!(find(&c, 1, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn a_full_table_keeps_its_topology_and_drops_the_timing_leaf() {
        let mut entries = base().as_slice().to_vec();
        entries.extend(
            (0..KVM_MAX_CPUID_ENTRIES - 4)
                .map(|i| kvm_cpuid_entry2 { function: 0x8000_0000 + i as u32, ..Default::default() }),
        );
        let full = CpuId::from_entries(&entries).unwrap();
        let c = shape_cpuid(&full, CpuidShape { apic_id: 2, vcpu_count: 4, tsc_khz: 2_500_000 });
        assert_eq!(find(&c, 1, 0).ebx >> 24, 2, "each vCPU keeps its own APIC id");
        assert_eq!(find(&c, 0x4000_0000, 0).eax, 0x4000_0001, "no timing leaf announced");
        assert!(c.as_slice().iter().all(|e| e.function != 0x4000_0010));
    }
}

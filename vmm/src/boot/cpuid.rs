//! The CPUID policy: what each vCPU sees, derived from KVM_GET_SUPPORTED_CPUID.
//!
//! Pure functions over CPUID entries. Every policy first normalises topology
//! (APIC IDs, logical-processor counts) and sets the hypervisor bit; the
//! `Compat` policy then hides the features a shadow-paging KVM (`kvm_pvm`)
//! cannot emulate in a stock kernel (see docs/vmm-boot.md for the table).

use kvm_bindings::kvm_cpuid_entry2;
use runv_vmm_api::config::CpuPolicy;

/// Register of a CPUID leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One feature bit the `Compat` policy clears, with the reason it is cleared.
#[derive(Debug, Clone, Copy)]
pub struct Hidden {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u32,
    pub name: &'static str,
}

/// Features hidden by [`CpuPolicy::Compat`]: instructions `kvm_pvm` fails to
/// emulate (cmpxchg16b, xsave/xrstor) and the extensions that depend on XSAVE.
pub const COMPAT_HIDDEN: &[Hidden] = &[
    Hidden {
        leaf: 1,
        subleaf: 0,
        reg: Reg::Ecx,
        bit: 13,
        name: "cx16",
    },
    Hidden {
        leaf: 1,
        subleaf: 0,
        reg: Reg::Ecx,
        bit: 26,
        name: "xsave",
    },
    Hidden {
        leaf: 1,
        subleaf: 0,
        reg: Reg::Ecx,
        bit: 27,
        name: "osxsave",
    },
    Hidden {
        leaf: 1,
        subleaf: 0,
        reg: Reg::Ecx,
        bit: 28,
        name: "avx",
    },
    Hidden {
        leaf: 1,
        subleaf: 0,
        reg: Reg::Ecx,
        bit: 29,
        name: "f16c",
    },
    Hidden {
        leaf: 1,
        subleaf: 0,
        reg: Reg::Ecx,
        bit: 12,
        name: "fma",
    },
    Hidden {
        leaf: 7,
        subleaf: 0,
        reg: Reg::Ebx,
        bit: 5,
        name: "avx2",
    },
    Hidden {
        leaf: 7,
        subleaf: 0,
        reg: Reg::Ebx,
        bit: 16,
        name: "avx512f",
    },
    Hidden {
        leaf: 7,
        subleaf: 0,
        reg: Reg::Ebx,
        bit: 4,
        name: "hle",
    },
    Hidden {
        leaf: 7,
        subleaf: 0,
        reg: Reg::Ebx,
        bit: 11,
        name: "rtm",
    },
];

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Whether `Auto` resolves to `Compat` on this hypervisor.
pub fn resolve(policy: CpuPolicy, hypervisor: &str) -> CpuPolicy {
    match policy {
        CpuPolicy::Auto if hypervisor == "kvm_pvm" => CpuPolicy::Compat,
        CpuPolicy::Auto => CpuPolicy::Host,
        p => p,
    }
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Applies `policy` (already resolved) to the supported leaves for vCPU `id` of `count`.
pub fn apply(entries: &mut Vec<kvm_cpuid_entry2>, policy: CpuPolicy, id: u8, count: u8) {
    let id32 = u32::from(id);
    let count32 = u32::from(count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id32 << 24) | (count32 << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count32 > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Cores per package, minus one, in EAX[31:26]; one thread per core.
                e.eax = (e.eax & 0x03ff_ffff) | ((count32 - 1) << 26);
            }
            0xb | 0x1f => {
                e.edx = id32;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = 32 - (count32 - 1).leading_zeros().min(32);
                        e.ebx = count32;
                        e.ecx = 1 | (2 << 8);
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            _ => {}
        }
    }
    if policy == CpuPolicy::Compat {
        for h in COMPAT_HIDDEN {
            for e in entries
                .iter_mut()
                .filter(|e| e.function == h.leaf && e.index == h.subleaf)
            {
                *reg_mut(e, h.reg) &= !(1 << h.bit);
            }
        }
        // Leaf 0xD describes XSAVE state components; with XSAVE hidden it must go.
        entries.retain(|e| e.function != 0xd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32, ebx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            ebx,
            ..Default::default()
        }
    }

    #[test]
    fn topology_and_hypervisor_bit_are_set_per_vcpu() {
        let mut v = vec![entry(1, 0, 0, 0xffff_ffff), entry(0xb, 1, 0, 0)];
        apply(&mut v, CpuPolicy::Host, 3, 4);
        assert_eq!(v[0].ebx >> 24, 3);
        assert_eq!((v[0].ebx >> 16) & 0xff, 4);
        assert_ne!(v[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(v[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!((v[1].edx, v[1].ebx, v[1].eax), (3, 4, 2));
    }

    #[test]
    fn compat_hides_cx16_and_xsave_and_drops_leaf_d() {
        let mut v = vec![
            entry(1, 0, (1 << 13) | (1 << 26) | 1, 0),
            entry(7, 0, 0, 1 << 5),
            entry(0xd, 0, 0, 0),
            entry(0xd, 1, 0, 0),
        ];
        let mut host = v.clone();
        apply(&mut host, CpuPolicy::Host, 0, 1);
        assert_ne!(host[0].ecx & (1 << 13), 0, "host policy keeps cx16");
        assert_eq!(host.len(), 4);
        apply(&mut v, CpuPolicy::Compat, 0, 1);
        assert_eq!(v[0].ecx & ((1 << 13) | (1 << 26)), 0);
        assert_ne!(v[0].ecx & 1, 0, "unrelated bits stay");
        assert_eq!(v[1].ebx & (1 << 5), 0);
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn auto_resolves_by_hypervisor() {
        assert_eq!(resolve(CpuPolicy::Auto, "kvm_pvm"), CpuPolicy::Compat);
        assert_eq!(resolve(CpuPolicy::Auto, "kvm"), CpuPolicy::Host);
        assert_eq!(resolve(CpuPolicy::Host, "kvm_pvm"), CpuPolicy::Host);
    }
}

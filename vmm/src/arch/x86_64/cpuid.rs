//! The CPUID the guest sees: KVM's supported set, with topology per vCPU and, where the host's
//! KVM cannot run every instruction a guest kernel uses, a compatibility profile.

use std::fmt;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// Errors of building the guest CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM did not report its supported CPUID.
    #[error("cannot read the CPUID KVM supports")]
    GetSupported(#[source] kvm_ioctls::Error),
    /// The edited CPUID could not be rebuilt.
    #[error("cannot build the guest CPUID table")]
    Build(#[source] vmm_sys_util::fam::Error),
}

/// Which instruction-set features the guest gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuProfile {
    /// Everything KVM supports: SMAP/SMEP, XSAVE/AVX, … The profile for hardware KVM.
    Host,
    /// The host's KVM emulates guest ring 0 (`kvm_pvm`) and its emulator lacks some
    /// instructions: hide the features whose use in the guest kernel it cannot emulate, and the
    /// string-copy hints that make it copy byte by byte. Weaker guest-kernel hardening
    /// (no SMAP/SMEP) and no AVX: only for hosts that need it.
    Compat,
}

impl fmt::Display for CpuProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuProfile::Host => "host",
            CpuProfile::Compat => "compat",
        })
    }
}

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One feature bit: leaf, subleaf, register, bit, and its Linux name.
#[derive(Debug, Clone, Copy)]
pub struct FeatureBit {
    /// CPUID function.
    pub leaf: u32,
    /// CPUID index (subleaf).
    pub subleaf: u32,
    /// Register holding the bit.
    pub reg: Reg,
    /// Bit number.
    pub bit: u8,
    /// Name as in Linux's `/proc/cpuinfo`.
    pub name: &'static str,
}

const fn feat(leaf: u32, subleaf: u32, reg: Reg, bit: u8, name: &'static str) -> FeatureBit {
    FeatureBit {
        leaf,
        subleaf,
        reg,
        bit,
        name,
    }
}

/// Features hidden in the compatibility profile. The `kvm_pvm` emulator fails on `lock
/// cmpxchg16b` (cx16), `xrstor` (xsave), `popcnt`, `clac`/`stac` (smap) and others at guest
/// ring 0; erms/fsrm make the kernel use `rep movsb/stosb`, which it emulates byte by byte.
/// Without XSAVE the AVX family cannot be enabled by the guest kernel, so it is hidden too, so
/// that guest user space that reads CPUID directly is not misled.
pub const COMPAT_HIDDEN: &[FeatureBit] = &[
    feat(1, 0, Reg::Ecx, 12, "fma"),
    feat(1, 0, Reg::Ecx, 13, "cx16"),
    feat(1, 0, Reg::Ecx, 17, "pcid"),
    feat(1, 0, Reg::Ecx, 23, "popcnt"),
    feat(1, 0, Reg::Ecx, 26, "xsave"),
    feat(1, 0, Reg::Ecx, 27, "osxsave"),
    feat(1, 0, Reg::Ecx, 28, "avx"),
    feat(1, 0, Reg::Ecx, 29, "f16c"),
    feat(7, 0, Reg::Ebx, 0, "fsgsbase"),
    feat(7, 0, Reg::Ebx, 5, "avx2"),
    feat(7, 0, Reg::Ebx, 7, "smep"),
    feat(7, 0, Reg::Ebx, 9, "erms"),
    feat(7, 0, Reg::Ebx, 10, "invpcid"),
    feat(7, 0, Reg::Ebx, 16, "avx512f"),
    feat(7, 0, Reg::Ebx, 17, "avx512dq"),
    feat(7, 0, Reg::Ebx, 20, "smap"),
    feat(7, 0, Reg::Ebx, 21, "avx512ifma"),
    feat(7, 0, Reg::Ebx, 23, "clflushopt"),
    feat(7, 0, Reg::Ebx, 24, "clwb"),
    feat(7, 0, Reg::Ebx, 28, "avx512cd"),
    feat(7, 0, Reg::Ebx, 30, "avx512bw"),
    feat(7, 0, Reg::Ebx, 31, "avx512vl"),
    feat(7, 0, Reg::Ecx, 1, "avx512vbmi"),
    feat(7, 0, Reg::Ecx, 3, "pku"),
    feat(7, 0, Reg::Ecx, 4, "ospke"),
    feat(7, 0, Reg::Ecx, 6, "avx512_vbmi2"),
    feat(7, 0, Reg::Ecx, 9, "vaes"),
    feat(7, 0, Reg::Ecx, 10, "vpclmulqdq"),
    feat(7, 0, Reg::Ecx, 11, "avx512_vnni"),
    feat(7, 0, Reg::Ecx, 12, "avx512_bitalg"),
    feat(7, 0, Reg::Ecx, 14, "avx512_vpopcntdq"),
    feat(7, 0, Reg::Ecx, 22, "rdpid"),
    feat(7, 0, Reg::Edx, 4, "fsrm"),
    feat(7, 0, Reg::Edx, 8, "avx512_vp2intersect"),
    feat(7, 0, Reg::Edx, 22, "amx_bf16"),
    feat(7, 0, Reg::Edx, 23, "avx512_fp16"),
    feat(7, 0, Reg::Edx, 24, "amx_tile"),
    feat(7, 0, Reg::Edx, 25, "amx_int8"),
    feat(7, 1, Reg::Eax, 4, "avx_vnni"),
    feat(7, 1, Reg::Eax, 5, "avx512_bf16"),
];

/// Features named on the guest kernel's `clearcpuid=` in the compatibility profile. The rest of
/// [`COMPAT_HIDDEN`] (the AVX family, osxsave, ospke) follows from `xsave` through the kernel's
/// CPUID dependency table. Linux reads at most 127 characters of `clearcpuid=`.
pub const COMPAT_CLEARCPUID: &[&str] = &[
    "xsave",
    "popcnt",
    "cx16",
    "smap",
    "smep",
    "fsgsbase",
    "pcid",
    "invpcid",
    "pku",
    "rdpid",
    "clflushopt",
    "clwb",
    "erms",
    "fsrm",
];

/// Longest `clearcpuid=` value Linux 6.1 reads.
#[cfg(test)]
const CLEARCPUID_MAX: usize = 127;

/// The `clearcpuid=` argument that hides the compatibility profile's features from the guest
/// kernel itself. Needed because `kvm_pvm` does not intercept the guest's CPUID instruction:
/// the guest reads the host's CPUID whatever `KVM_SET_CPUID2` says.
pub fn compat_clearcpuid_arg() -> String {
    format!("clearcpuid={}", COMPAT_CLEARCPUID.join(","))
}

/// Leaves removed whole in the compatibility profile (XSAVE state enumeration).
const COMPAT_REMOVED_LEAVES: &[u32] = &[0xd];

const LEAF1_ECX_HYPERVISOR: u8 = 31;
const LEAF1_ECX_TSC_DEADLINE: u8 = 24;
const LEAF1_ECX_XSAVE: u8 = 26;
const LEAF1_ECX_AVX: u8 = 28;
const LEAF1_EDX_HTT: u8 = 28;

/// Reads KVM's supported CPUID once; per-vCPU tables are derived from it.
///
/// KVM emulates the local APIC's TSC-deadline mode on every host that has
/// `KVM_CAP_TSC_DEADLINE_TIMER`, but Linux 6.1's `KVM_GET_SUPPORTED_CPUID` does not list it
/// (later kernels do): a VMM sets CPUID.1:ECX bit 24 itself (QEMU, Firecracker and Cloud
/// Hypervisor do too), so that the guest arms its timer with one MSR write instead of
/// programming the APIC timer's count. This is part of the CPUID of both profiles, so of the
/// CPUID hash that snapshots and template keys carry (unchanged where KVM lists the bit).
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::GetSupported)?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        set_tsc_deadline(&mut cpuid);
    }
    Ok(cpuid)
}

/// Sets the TSC-deadline bit of leaf 1.
fn set_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        entry.ecx |= 1 << LEAF1_ECX_TSC_DEADLINE;
    }
}

/// The XSAVE state the guest CPUID describes (leaf 0xD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XsaveLayout {
    /// The XCR0 bits the guest may enable (leaf 0xD subleaf 0, EDX:EAX).
    pub xcr0_mask: u64,
    /// The XSAVE area size with every one of them enabled (subleaf 0, ECX).
    pub max_size: u32,
}

/// Checks that a guest CPUID's XSAVE enumeration is one a guest kernel accepts: leaf 1 offers
/// XSAVE exactly when leaf 0xD is there; every user state component in the XCR0 mask (AVX
/// and up, bits 2..=31 except the supervisor ones) has its subleaf with a size and an offset,
/// and the maximum size covers all of them; AVX is offered only with its YMM state. Linux
/// checks the same (and disables XSAVE with "XSAVE consistency problem" when it differs), so
/// a mismatch here would cost the guest its AVX silently. `Ok(None)`: no XSAVE at all.
pub fn xsave_layout(cpuid: &CpuId) -> Result<Option<XsaveLayout>, String> {
    let entry = |leaf: u32, subleaf: u32| {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == leaf && e.index == subleaf)
    };
    let xsave_bit = entry(1, 0).is_some_and(|e| e.ecx & (1 << LEAF1_ECX_XSAVE) != 0);
    let avx_bit = entry(1, 0).is_some_and(|e| e.ecx & (1 << LEAF1_ECX_AVX) != 0);
    let Some(d0) = entry(0xd, 0) else {
        if xsave_bit || avx_bit {
            return Err("leaf 1 offers XSAVE/AVX but leaf 0xd is missing".into());
        }
        return Ok(None);
    };
    if !xsave_bit {
        return Err("leaf 0xd is present but leaf 1 does not offer XSAVE".into());
    }
    let xcr0_mask = u64::from(d0.eax) | (u64::from(d0.edx) << 32);
    if xcr0_mask & 0b11 != 0b11 {
        return Err(format!(
            "XCR0 mask {xcr0_mask:#x} lacks x87/SSE, which XSAVE always has"
        ));
    }
    if avx_bit && xcr0_mask & (1 << 2) == 0 {
        return Err(format!(
            "leaf 1 offers AVX but the XCR0 mask {xcr0_mask:#x} has no YMM state"
        ));
    }
    // The legacy area and the XSAVE header.
    let mut needed = 576u32;
    for bit in 2..32u32 {
        if xcr0_mask & (1 << bit) == 0 {
            continue;
        }
        let component = entry(0xd, bit)
            .filter(|e| e.eax != 0)
            .ok_or_else(|| format!("XCR0 bit {bit} has no size in leaf 0xd subleaf {bit}"))?;
        let end = component
            .ebx
            .checked_add(component.eax)
            .ok_or_else(|| format!("leaf 0xd subleaf {bit}: offset + size overflows"))?;
        needed = needed.max(end);
    }
    if d0.ecx < needed {
        return Err(format!(
            "leaf 0xd says {} bytes for all of XCR0 mask {xcr0_mask:#x}, its components need {needed}",
            d0.ecx
        ));
    }
    Ok(Some(XsaveLayout {
        xcr0_mask,
        max_size: d0.ecx,
    }))
}

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// The CPUID of vCPU `cpu_index` of `vcpu_count`, from KVM's supported set.
pub fn for_vcpu(
    supported: &CpuId,
    profile: CpuProfile,
    cpu_index: u8,
    vcpu_count: u8,
) -> Result<CpuId, CpuidError> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .copied()
        .filter(|e| profile == CpuProfile::Host || !COMPAT_REMOVED_LEAVES.contains(&e.function))
        .collect();
    // Bits of the APIC ID that number the logical CPUs of the package.
    let cpu_bits = u32::BITS - u32::from(vcpu_count.max(1) - 1).leading_zeros();
    for entry in entries.iter_mut() {
        match entry.function {
            1 => {
                entry.ebx = (u32::from(cpu_index) << 24)
                    | (u32::from(vcpu_count) << 16)
                    | (entry.ebx & 0xffff);
                entry.ecx |= 1 << LEAF1_ECX_HYPERVISOR;
                if vcpu_count > 1 {
                    entry.edx |= 1 << LEAF1_EDX_HTT;
                }
            }
            // Cache topology: all vCPUs share the caches of one package, one thread per core.
            4 => {
                entry.eax &= 0x3fff;
                entry.eax |= (u32::from(vcpu_count.max(1)) - 1) << 26;
            }
            // Extended topology: one thread per core, `vcpu_count` cores per package.
            0xb | 0x1f => {
                entry.edx = u32::from(cpu_index);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = cpu_bits;
                        entry.ebx = u32::from(vcpu_count);
                        entry.ecx = (2 << 8) | 1;
                    }
                    n => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = n;
                    }
                }
            }
            _ => {}
        }
        if profile == CpuProfile::Compat {
            let (leaf, subleaf) = (entry.function, entry.index);
            for f in COMPAT_HIDDEN
                .iter()
                .filter(|f| f.leaf == leaf && f.subleaf == subleaf)
            {
                *reg_mut(entry, f.reg) &= !(1 << f.bit);
            }
        }
    }
    CpuId::from_entries(&entries).map_err(CpuidError::Build)
}

/// Whether the feature is set in the table.
pub fn has_feature(cpuid: &CpuId, f: &FeatureBit) -> bool {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == f.leaf && e.index == f.subleaf)
        .is_some_and(|e| {
            let mut e = *e;
            *reg_mut(&mut e, f.reg) & (1 << f.bit) != 0
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_supported() -> CpuId {
        let entry = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            entry(0, 0, 0xd, 0, 0, 0),
            entry(1, 0, 0x806f8, 0x0000_0800, 0xffff_ffff, 0xffff_ffff),
            entry(7, 0, 0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff),
            entry(0xb, 0, 0, 0, 0, 0),
            entry(0xb, 1, 0, 0, 0, 0),
            entry(0xd, 0, 7, 0, 0, 0),
        ])
        .expect("small table")
    }

    #[test]
    fn compat_profile_hides_every_listed_feature_and_xsave_leaf() {
        let cpuid = for_vcpu(&fake_supported(), CpuProfile::Compat, 0, 1).unwrap();
        for f in COMPAT_HIDDEN
            .iter()
            .filter(|f| f.leaf != 7 || f.subleaf == 0)
        {
            assert!(!has_feature(&cpuid, f), "{} still visible", f.name);
        }
        assert!(cpuid.as_slice().iter().all(|e| e.function != 0xd));
        // Not everything is hidden: SSE2 (leaf 1 EDX bit 26) stays.
        assert!(has_feature(&cpuid, &feat(1, 0, Reg::Edx, 26, "sse2")));
    }

    #[test]
    fn host_profile_keeps_smap_smep_and_xsave() {
        let cpuid = for_vcpu(&fake_supported(), CpuProfile::Host, 0, 1).unwrap();
        for name in ["smap", "smep", "xsave", "avx2"] {
            let f = COMPAT_HIDDEN.iter().find(|f| f.name == name).unwrap();
            assert!(has_feature(&cpuid, f), "{name} hidden on host profile");
        }
        assert!(cpuid.as_slice().iter().any(|e| e.function == 0xd));
    }

    #[test]
    fn clearcpuid_names_the_hidden_features() {
        let arg = compat_clearcpuid_arg();
        let value = arg.strip_prefix("clearcpuid=").unwrap();
        // Linux silently drops what is past its buffer: everything must fit.
        assert!(
            value.len() <= CLEARCPUID_MAX,
            "{} chars: {value}",
            value.len()
        );
        for name in value.split(',') {
            assert!(
                COMPAT_HIDDEN.iter().any(|f| f.name == name),
                "{name} is not hidden in the CPUID table"
            );
        }
    }

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// Leaf 1 with XSAVE and AVX, leaf 0xd for x87, SSE and AVX (an AVX-only CPU).
    fn avx_table(d0_ecx: u32, avx_size: u32) -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(1, 0, [0, 0, (1 << 26) | (1 << 28), 0]),
            entry(0xd, 0, [0b111, 832, d0_ecx, 0]),
            entry(0xd, 2, [avx_size, 576, 0, 0]),
        ]
    }

    #[test]
    fn tsc_deadline_is_added_to_leaf_1_only() {
        let mut cpuid = fake_supported();
        for e in cpuid.as_mut_slice().iter_mut() {
            e.ecx = 0;
        }
        set_tsc_deadline(&mut cpuid);
        let tsc_deadline = feat(1, 0, Reg::Ecx, 24, "tsc_deadline_timer");
        assert!(has_feature(&cpuid, &tsc_deadline));
        // Both profiles keep it: the compat profile hides nothing of the APIC timer.
        for profile in [CpuProfile::Host, CpuProfile::Compat] {
            let table = for_vcpu(&cpuid, profile, 0, 2).unwrap();
            assert!(has_feature(&table, &tsc_deadline), "{profile}");
        }
        let others = cpuid.as_slice().iter().filter(|e| e.function != 1);
        assert!(others.clone().count() > 0);
        assert!(others.into_iter().all(|e| e.ecx == 0));
    }

    #[test]
    fn xsave_layout_of_a_consistent_table() {
        let cpuid = CpuId::from_entries(&avx_table(832, 256)).unwrap();
        assert_eq!(
            xsave_layout(&cpuid),
            Ok(Some(XsaveLayout {
                xcr0_mask: 0b111,
                max_size: 832
            }))
        );
    }

    #[test]
    fn xsave_layout_refuses_what_a_guest_kernel_would() {
        let cases: [(&str, Vec<kvm_cpuid_entry2>); 5] = [
            ("max size below the AVX state's end", avx_table(576, 256)),
            ("AVX state without a size", avx_table(832, 0)),
            ("leaf 0xd without leaf 1's XSAVE", {
                let mut t = avx_table(832, 256);
                t[0].ecx = 0;
                t
            }),
            (
                "XSAVE without leaf 0xd",
                vec![entry(1, 0, [0, 0, 1 << 26, 0])],
            ),
            ("AVX without YMM state", {
                let mut t = avx_table(832, 256);
                t[1].eax = 0b11;
                t
            }),
        ];
        for (what, table) in cases {
            let cpuid = CpuId::from_entries(&table).unwrap();
            assert!(xsave_layout(&cpuid).is_err(), "{what} accepted");
        }
    }

    #[test]
    fn xsave_layout_of_the_profiles() {
        // The compat profile removes leaf 0xd and hides XSAVE: consistently nothing.
        let compat = for_vcpu(&fake_supported(), CpuProfile::Compat, 0, 1).unwrap();
        assert_eq!(xsave_layout(&compat), Ok(None));
        let host = CpuId::from_entries(&avx_table(832, 256)).unwrap();
        let host = for_vcpu(&host, CpuProfile::Host, 0, 1).unwrap();
        assert!(matches!(xsave_layout(&host), Ok(Some(_))));
    }

    #[test]
    fn topology_names_each_vcpu() {
        let cpuid = for_vcpu(&fake_supported(), CpuProfile::Host, 3, 4).unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 3, "initial APIC ID");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical CPU count");
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
        let b1 = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0xb && e.index == 1)
            .unwrap();
        assert_eq!((b1.eax, b1.ebx, b1.edx), (2, 4, 3));
    }
}

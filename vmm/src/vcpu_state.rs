//! One vCPU's complete KVM state, read from a stopped vCPU and written back to a fresh one.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Errors of saving and restoring a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: KVM refused to {what}")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The MSR list could not be built.
    #[error("vCPU {index}: cannot build the MSR list")]
    MsrList {
        /// vCPU index.
        index: u8,
        /// Why.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// KVM restored fewer MSRs than saved.
    #[error("vCPU {index}: KVM restored only {set} of {wanted} MSRs (first refused: {first:#x})")]
    PartialMsrs {
        /// vCPU index.
        index: u8,
        /// MSRs set.
        set: usize,
        /// MSRs saved.
        wanted: usize,
        /// The first MSR KVM refused.
        first: u32,
    },
}

/// MSRs saved when KVM lists them: time stamp counter, system-call entry, segment bases,
/// memory types, APIC base and TSC deadline, and KVM's paravirtual clock and event MSRs.
const SAVED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x11,        // MSR_KVM_WALL_CLOCK
    0x12,        // MSR_KVM_SYSTEM_TIME
    0x1b,        // IA32_APIC_BASE
    0x3b,        // IA32_TSC_ADJUST
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0x2ff,       // MTRRdefType
    0x6e0,       // IA32_TSC_DEADLINE
    0xc000_0080, // EFER
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d03, // MSR_KVM_STEAL_TIME
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
];

/// What this host's KVM lets the VMM save: which MSRs, and whether XCRs and XSAVE exist.
#[derive(Debug, Clone, Default)]
pub struct SaveCaps {
    /// MSRs to try, in order: [`SAVED_MSRS`], then the other KVM paravirtual MSRs KVM lists.
    /// Not every one KVM saves is in its index list (MTRRs, EFER), so the fixed list is tried
    /// whole; the ones KVM cannot read are skipped at save time.
    pub msrs: Vec<u32>,
    /// `KVM_GET_XCRS` is supported.
    pub xcrs: bool,
    /// `KVM_GET_XSAVE` is supported.
    pub xsave: bool,
}

/// KVM's own MSR range (`MSR_KVM_*`).
const KVM_MSR_RANGE: std::ops::RangeInclusive<u32> = 0x4b56_4d00..=0x4b56_4dff;

impl SaveCaps {
    /// Asks KVM.
    pub fn probe(kvm: &Kvm) -> SaveCaps {
        let mut msrs = SAVED_MSRS.to_vec();
        if let Ok(listed) = kvm.get_msr_index_list() {
            msrs.extend(
                listed
                    .as_slice()
                    .iter()
                    .copied()
                    .filter(|m| KVM_MSR_RANGE.contains(m) && !SAVED_MSRS.contains(m)),
            );
        }
        SaveCaps {
            msrs,
            xcrs: kvm.check_extension(Cap::Xcrs),
            xsave: kvm.check_extension(Cap::Xsave),
        }
    }
}

/// `kvm_fpu`, which kvm-bindings does not serialise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM keeps about one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (APIC ID).
    pub index: u8,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87 and SSE state.
    pub fpu: FpuState,
    /// Extended control registers, when KVM has them.
    pub xcrs: Option<kvm_xcrs>,
    /// XSAVE area, when KVM has it.
    pub xsave: Option<kvm_xsave>,
    /// Model-specific registers.
    pub msrs: Vec<kvm_msr_entry>,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs and SIPIs.
    pub events: kvm_vcpu_events,
    /// Running, halted, waiting for SIPI…
    pub mp_state: kvm_mp_state,
}

impl VcpuState {
    /// Reads the state of a vCPU that is outside `KVM_RUN` with no I/O completion pending.
    pub fn save(index: u8, fd: &VcpuFd, caps: &SaveCaps) -> Result<VcpuState, VcpuStateError> {
        let kvm = |what| {
            move |source| VcpuStateError::Kvm {
                index,
                what,
                source,
            }
        };
        // MP state and events first: reading them settles what KVM has pending (as QEMU does).
        let mp_state = fd.get_mp_state().map_err(kvm("read the MP state"))?;
        let events = fd.get_vcpu_events().map_err(kvm("read the vCPU events"))?;
        let regs = fd.get_regs().map_err(kvm("read the registers"))?;
        let sregs = fd.get_sregs().map_err(kvm("read the special registers"))?;
        let fpu = FpuState::from(&fd.get_fpu().map_err(kvm("read the FPU"))?);
        let xcrs = caps
            .xcrs
            .then(|| fd.get_xcrs().map_err(kvm("read the XCRs")))
            .transpose()?;
        let xsave = caps
            .xsave
            .then(|| fd.get_xsave().map_err(kvm("read the XSAVE area")))
            .transpose()?;
        let msrs = save_msrs(index, fd, &caps.msrs)?;
        let lapic = fd.get_lapic().map_err(kvm("read the LAPIC"))?;
        Ok(VcpuState {
            index,
            regs,
            sregs,
            fpu,
            xcrs,
            xsave,
            msrs,
            lapic,
            events,
            mp_state,
        })
    }

    /// Writes the state into a fresh vCPU whose CPUID is already set.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let index = self.index;
        let kvm = |what| {
            move |source| VcpuStateError::Kvm {
                index,
                what,
                source,
            }
        };
        fd.set_sregs(&self.sregs)
            .map_err(kvm("set the special registers"))?;
        fd.set_regs(&self.regs).map_err(kvm("set the registers"))?;
        fd.set_fpu(&kvm_fpu::from(&self.fpu))
            .map_err(kvm("set the FPU"))?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm("set the XCRs"))?;
        }
        if let Some(xsave) = &self.xsave {
            // A whole `kvm_xsave` that KVM_GET_XSAVE filled on a VM of the same CPUID (checked
            // by the snapshot header).
            crate::sys::set_xsave(fd, xsave).map_err(kvm("set the XSAVE area"))?;
        }
        // The LAPIC before the MSRs: KVM drops a write of IA32_TSC_DEADLINE while the LAPIC
        // timer is not in TSC-deadline mode (a fresh vCPU's is not), so a guest that had armed a
        // deadline (a tickless idle guest always has) would wait for a timer interrupt that
        // never comes.
        fd.set_lapic(&self.lapic).map_err(kvm("set the LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs)
            .map_err(|source| VcpuStateError::MsrList { index, source })?;
        let set = fd.set_msrs(&msrs).map_err(kvm("set the MSRs"))?;
        if set != self.msrs.len() {
            return Err(VcpuStateError::PartialMsrs {
                index,
                set,
                wanted: self.msrs.len(),
                first: self.msrs.get(set).map_or(0, |m| m.index),
            });
        }
        // A diagnostic read, only when it is logged: restores are on the pod start path.
        let saved_tsc = self.msrs.iter().find(|m| m.index == 0x10);
        if let Some(saved) = saved_tsc.filter(|_| log::log_enabled!(log::Level::Debug)) {
            let mut probe = Msrs::from_entries(&[kvm_msr_entry {
                index: 0x10,
                ..Default::default()
            }])
            .map_err(|source| VcpuStateError::MsrList { index, source })?;
            if fd.get_msrs(&mut probe).map_err(kvm("read the TSC"))? == 1 {
                // kvm_pvm ignores the write: the guest's TSC is the host's.
                log::debug!(
                    "vCPU {index}: TSC saved {}, after restore {}",
                    saved.data,
                    probe.as_slice()[0].data
                );
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("set the vCPU events"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("set the MP state"))?;
        Ok(())
    }
}

/// Reads `wanted` MSRs; one KVM refuses to read (it stops at the first) is left out and logged.
fn save_msrs(index: u8, fd: &VcpuFd, wanted: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut remaining: Vec<u32> = wanted.to_vec();
    let mut saved = Vec::with_capacity(wanted.len());
    while !remaining.is_empty() {
        let entries: Vec<kvm_msr_entry> = remaining
            .iter()
            .map(|&m| kvm_msr_entry {
                index: m,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|source| VcpuStateError::MsrList { index, source })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Kvm {
                index,
                what: "read the MSRs",
                source,
            })?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        if read < remaining.len() {
            log::debug!(
                "vCPU {index}: KVM cannot read MSR {:#x}; not saved",
                remaining[read]
            );
            remaining.drain(..=read);
        } else {
            remaining.clear();
        }
    }
    Ok(saved)
}

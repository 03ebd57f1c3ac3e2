//! Initial vCPU state: registers, segments, FPU, MSRs and local APIC.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::gdt::{self, CodeMode};
use super::layout::GDT_ADDR;

/// Errors of setting up a vCPU's initial state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT into guest memory failed.
    #[error("cannot write the GDT into guest memory")]
    WriteGdt(#[source] vm_memory::GuestMemoryError),
    /// Writing the page tables into guest memory failed.
    #[error("cannot write page tables into guest memory")]
    WritePageTables(#[source] vm_memory::GuestMemoryError),
    /// A KVM ioctl on the vCPU failed.
    #[error("cannot set the vCPU's {what}")]
    Kvm {
        /// What was being set.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    PartialMsrs {
        /// MSRs set.
        set: usize,
        /// MSRs given.
        wanted: usize,
    },
    /// The MSR list could not be built.
    #[error("cannot build the MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back: without it Linux maps RAM uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Local APIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Writes the boot GDT into guest memory and returns the segment registers for it.
fn write_gdt<M: GuestMemory>(
    mem: &M,
    sregs: &mut kvm_sregs,
    mode: CodeMode,
) -> Result<(), RegsError> {
    let table = gdt::boot_gdt(mode);
    for (i, entry) in table.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(RegsError::WriteGdt)?;
    }
    let code = gdt::kvm_segment_from(table[1], gdt::CODE_SELECTOR);
    let data = gdt::kvm_segment_from(table[2], gdt::DATA_SELECTOR);
    let tss = gdt::kvm_segment_from(table[3], gdt::TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    Ok(())
}

/// Puts the boot vCPU in the state the PVH boot protocol asks for: 32-bit protected mode,
/// paging off, flat segments, `%ebx` = address of `hvm_start_info`, at `entry`.
pub fn setup_pvh_boot<M: GuestMemory>(
    vcpu: &VcpuFd,
    mem: &M,
    entry: GuestAddress,
    start_info: GuestAddress,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    write_gdt(mem, &mut sregs, CodeMode::Protected32)?;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))?;
    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.0,
        rbx: start_info.0,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("registers"))
}

/// Sets the state every vCPU (boot or not) starts with: FPU, boot MSRs, LAPIC LINT pins.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))?;

    let boot_msrs = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    let entries: Vec<kvm_msr_entry> = boot_msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(RegsError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if set != entries.len() {
        return Err(RegsError::PartialMsrs {
            set,
            wanted: entries.len(),
        });
    }

    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// Identity-maps the first GiB with 2 MiB pages at `tables` (three pages) and puts the vCPU in
/// 64-bit long mode at ring 0, at `entry`. Used by the tests that run tiny guest programs.
pub fn setup_long_mode<M: GuestMemory>(
    vcpu: &VcpuFd,
    mem: &M,
    tables: GuestAddress,
    entry: GuestAddress,
) -> Result<(), RegsError> {
    let pml4 = tables.0;
    let pdpt = pml4 + 0x1000;
    let pd = pdpt + 0x1000;
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(pdpt | PRESENT_RW, GuestAddress(pml4))
        .map_err(RegsError::WritePageTables)?;
    mem.write_obj(pd | PRESENT_RW, GuestAddress(pdpt))
        .map_err(RegsError::WritePageTables)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | PRESENT_RW | HUGE, GuestAddress(pd + 8 * i))
            .map_err(RegsError::WritePageTables)?;
    }
    let mut sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    write_gdt(mem, &mut sregs, CodeMode::Long64)?;
    sregs.cr3 = pml4;
    sregs.cr4 = X86_CR4_PAE;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))?;
    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.0,
        rsp: tables.0,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("registers"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_changes_only_delivery_mode_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x30;
        regs[APIC_LVT0 + 2] = 0x01; // mask bit 16
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        let v = u32::from_le_bytes([
            regs[APIC_LVT0] as u8,
            regs[APIC_LVT0 + 1] as u8,
            regs[APIC_LVT0 + 2] as u8,
            regs[APIC_LVT0 + 3] as u8,
        ]);
        assert_eq!(v, 0x0001_0730);
    }
}

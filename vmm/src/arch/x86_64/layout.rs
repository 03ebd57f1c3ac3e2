//! Guest physical memory layout of a Nutshell microVM on x86_64.
//!
//! ```text
//! 0x0000_0500  GDT used at PVH entry
//! 0x0000_6000  PVH hvm_start_info, followed by the module list
//! 0x0000_7000  PVH memory map (e820 equivalent)
//! 0x0002_0000  kernel command line (2 KiB)
//! 0x0009_fc00  MP table (reserved up to 1 MiB)
//! 0x0010_0000  high memory: kernel (at its ELF load address), initrd at the top of low RAM
//! 0xc000_0000  MMIO gap up to 4 GiB (IOAPIC, LAPIC, later virtio-mmio devices)
//! 0x1_0000_0000 RAM beyond the gap, when the guest has more than 3 GiB
//! ```

/// Address of the GDT loaded before the PVH entry.
pub const GDT_ADDR: u64 = 0x500;
/// Address of the PVH `hvm_start_info` structure (passed in `%ebx`).
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// Address of the PVH module list (the initrd), right after `hvm_start_info`.
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// Address of the PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Address of the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line Linux on x86 accepts, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the legacy low memory hole (VGA, BIOS).
pub const LOW_MEMORY_HOLE_END: u64 = 0x10_0000;
/// Start of high memory: nothing the VMM writes may be placed below it except boot data.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Address of the IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Address of the local APICs.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Three pages KVM needs for the TSS on Intel hosts, inside the MMIO gap.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Number of IOAPIC pins (GSIs) of the in-kernel irqchip.
pub const IOAPIC_PINS: u8 = 24;
/// IRQ of the first serial port (COM1).
pub const SERIAL_IRQ: u32 = 4;

/// First virtio-mmio slot; the next ones follow every `VIRTIO_MMIO_SIZE` bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio slot; the next ones take the following GSIs.
pub const VIRTIO_GSI_BASE: u32 = 5;
/// Number of virtio-mmio slots: GSIs 5 to 15 (the IOAPIC has 24 pins; 16 and up stay free).
pub const VIRTIO_SLOTS: u32 = 11;

/// The register window and the interrupt of virtio-mmio slot `index` (below
/// [`VIRTIO_SLOTS`]).
pub const fn virtio_slot(index: u32) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
        VIRTIO_GSI_BASE + index,
    )
}

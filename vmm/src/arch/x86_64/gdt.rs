//! Segment descriptors for the GDT the vCPUs start with, and the matching `kvm_segment`s.

use kvm_bindings::kvm_segment;

/// Selector of the code segment (GDT index 1).
pub const CODE_SELECTOR: u16 = 1 << 3;
/// Selector of the data segment (GDT index 2).
pub const DATA_SELECTOR: u16 = 2 << 3;
/// Selector of the task state segment (GDT index 3).
pub const TSS_SELECTOR: u16 = 3 << 3;

/// Descriptor flags (bits 8..16 access byte, bits 20..24 flags nibble, packed as in the
/// descriptor's upper dword bits 8..24).
const CODE32_FLAGS: u16 = 0xc09b; // G, D/B, present, code, readable, accessed
const CODE64_FLAGS: u16 = 0xa09b; // G, L, present, code, readable, accessed
const DATA_FLAGS: u16 = 0xc093; // G, D/B, present, data, writable, accessed
const TSS32_FLAGS: u16 = 0x008b; // present, busy 32-bit TSS, byte granularity

/// Which mode the code segment is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeMode {
    /// 32-bit protected mode (PVH entry).
    Protected32,
    /// 64-bit long mode.
    Long64,
}

/// Encodes one segment descriptor.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The four entries of the boot GDT: null, code, data, TSS.
pub fn boot_gdt(mode: CodeMode) -> [u64; 4] {
    let code = match mode {
        CodeMode::Protected32 => CODE32_FLAGS,
        CodeMode::Long64 => CODE64_FLAGS,
    };
    [
        0,
        descriptor(code, 0, 0xfffff),
        descriptor(DATA_FLAGS, 0, 0xfffff),
        descriptor(TSS32_FLAGS, 0, 0x67),
    ]
}

/// Decodes a descriptor into the `kvm_segment` KVM wants for the hidden segment state.
pub fn kvm_segment_from(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment_round_trips() {
        let gdt = boot_gdt(CodeMode::Protected32);
        let cs = kvm_segment_from(gdt[1], CODE_SELECTOR);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.type_, 0xb);
        assert_eq!((cs.present, cs.s, cs.db, cs.l, cs.g), (1, 1, 1, 0, 1));
        assert_eq!(cs.unusable, 0);
    }

    #[test]
    fn long_mode_code_segment_sets_l_not_db() {
        let cs = kvm_segment_from(boot_gdt(CodeMode::Long64)[1], CODE_SELECTOR);
        assert_eq!((cs.l, cs.db), (1, 0));
    }

    #[test]
    fn tss_is_a_busy_system_segment() {
        let tr = kvm_segment_from(boot_gdt(CodeMode::Protected32)[3], TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s, tr.limit), (0xb, 0, 0x67));
    }

    #[test]
    fn descriptor_places_base_and_limit_bits() {
        let d = descriptor(DATA_FLAGS, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from(d, 0);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, (0xabcde << 12) | 0xfff);
    }
}

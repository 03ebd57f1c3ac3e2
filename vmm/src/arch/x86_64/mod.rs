//! x86_64: memory layout, CPUID, boot registers, MP table and PVH boot information.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod pvh;
pub mod regs;

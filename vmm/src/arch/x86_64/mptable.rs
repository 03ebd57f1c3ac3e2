//! The Intel MultiProcessor Specification (1.4) table that tells the guest kernel its CPUs,
//! its IOAPIC and how ISA interrupts are wired, without ACPI.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IOAPIC_PINS, LOW_MEMORY_HOLE_END};

/// Errors of writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than APIC IDs the table can hold next to the IOAPIC.
    #[error("{0} vCPUs do not fit in an MP table (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    /// Zero vCPUs.
    #[error("an MP table needs at least one vCPU")]
    NoCpus,
    /// The table does not fit before the end of base memory.
    #[error("the MP table ({0} bytes) does not fit below 1 MiB")]
    TooLarge(usize),
    /// Writing into guest memory failed.
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Most vCPUs the table describes: APIC IDs 0..MAX_CPUS, the IOAPIC takes the next ID.
pub const MAX_CPUS: u8 = 254;

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger mode "conforms to the bus": edge, active high on ISA.
const IRQ_FLAGS_CONFORMING: u16 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;
/// CPU signature family 6 and the FPU + APIC feature flags; Linux only reads the APIC bit.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Size of the MP table for `cpus` vCPUs, floating pointer included.
pub fn table_size(cpus: u8) -> usize {
    16 + 44 + 20 * usize::from(cpus) + 8 + 8 + 8 * usize::from(IOAPIC_PINS) + 2 * 8
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The table's bytes, as they are placed at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    let config_addr = base + 16;

    // The configuration table: entries first, the header is filled in once their size is known.
    let mut entries = Vec::new();
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        entries.push(ENTRY_IO_INTERRUPT);
        entries.push(INT_TYPE_INT);
        entries.extend_from_slice(&IRQ_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[0, pin, ioapic_id, pin]);
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.push(ENTRY_LOCAL_INTERRUPT);
        entries.push(kind);
        entries.extend_from_slice(&IRQ_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[0, 0, ALL_LOCAL_APICS, lint]);
    }
    let entry_count = u16::from(cpus) + 2 + u16::from(IOAPIC_PINS) + 2;

    let config_len = 44 + entries.len();
    let mut config = Vec::with_capacity(config_len);
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&(config_len as u16).to_le_bytes());
    config.push(MPC_SPEC_REV);
    config.push(0); // checksum, below
    config.extend_from_slice(b"NUTSHELL");
    config.extend_from_slice(b"MICROVM     ");
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&entry_count.to_le_bytes());
    config.extend_from_slice(&APIC_ADDR.to_le_bytes());
    config.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    config.extend_from_slice(&[0, 0]); // extended table checksum, reserved
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut table = Vec::with_capacity(16 + config.len());
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&(config_addr as u32).to_le_bytes());
    table.push(1); // length in 16-byte units
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    debug_assert_eq!(table.len(), table_size(cpus));
    Ok(table)
}

/// Writes the MP table for `cpus` vCPUs at the start of the EBDA.
pub fn setup<M: GuestMemory>(mem: &M, cpus: u8) -> Result<(), MptableError> {
    let table = build(cpus, EBDA_START)?;
    if EBDA_START + table.len() as u64 > LOW_MEMORY_HOLE_END {
        return Err(MptableError::TooLarge(table.len()));
    }
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        for cpus in [1u8, 2, 8, MAX_CPUS] {
            let t = build(cpus, EBDA_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            let config_addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(config_addr, EBDA_START + 16);
            let config = &t[16..];
            assert_eq!(&config[0..4], b"PCMP");
            let len = u16::from_le_bytes([config[4], config[5]]) as usize;
            assert_eq!(len, config.len());
            assert_eq!(sum(config), 0, "configuration table checksum");
            let count = u16::from_le_bytes([config[34], config[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + 24 + 2);
        }
    }

    #[test]
    fn one_boot_processor_and_ioapic_after_cpus() {
        let t = build(3, 0).unwrap();
        let cpus: Vec<&[u8]> = t[60..60 + 60].chunks(20).collect();
        assert_eq!(cpus.len(), 3);
        assert!(cpus.iter().all(|c| c[0] == ENTRY_PROCESSOR));
        let boot: Vec<u8> = cpus.iter().map(|c| c[3] & CPU_BOOT_PROCESSOR).collect();
        assert_eq!(boot, vec![CPU_BOOT_PROCESSOR, 0, 0]);
        let ioapic = &t[60 + 60 + 8..60 + 60 + 16];
        assert_eq!((ioapic[0], ioapic[1]), (ENTRY_IOAPIC, 3));
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert!(matches!(build(0, 0), Err(MptableError::NoCpus)));
        assert!(matches!(build(255, 0), Err(MptableError::TooManyCpus(255))));
    }
}

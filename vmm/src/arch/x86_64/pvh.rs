//! PVH boot information: `hvm_start_info`, the memory map and the initrd module.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemory};

use super::layout::{
    CMDLINE_ADDR, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, PVH_MEMMAP_ADDR,
    PVH_MODLIST_ADDR, PVH_START_INFO_ADDR,
};

/// Errors of writing the PVH boot information.
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// linux-loader could not write the structures into guest memory.
    #[error("cannot write the PVH boot information into guest memory")]
    Write(#[source] linux_loader::configurator::Error),
}

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// One memory map entry: start, size, type.
pub type MemmapEntry = (u64, u64, u32);

/// The guest's memory map for `ram_size` bytes of RAM: base memory below the EBDA, the EBDA and
/// BIOS area reserved, RAM from 1 MiB to the MMIO gap, and the rest of RAM above 4 GiB.
pub fn memory_map(ram_size: u64) -> Vec<MemmapEntry> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    let low_end = ram_size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if ram_size > MMIO_GAP_START {
        map.push((MMIO_GAP_END, ram_size - MMIO_GAP_START, E820_RAM));
    }
    map
}

/// Writes `hvm_start_info`, the memory map and the optional initrd module descriptor.
/// Returns the address of `hvm_start_info`, for `%ebx` at entry.
pub fn setup<M: GuestMemory>(
    mem: &M,
    ram_size: u64,
    initrd: Option<(GuestAddress, u64)>,
) -> Result<GuestAddress, PvhError> {
    let memmap: Vec<hvm_memmap_table_entry> = memory_map(ram_size)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .into_iter()
        .map(|(addr, size)| hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        })
        .collect();
    if !modules.is_empty() {
        start_info.nr_modules = modules.len() as u32;
        start_info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    let start_addr = GuestAddress(PVH_START_INFO_ADDR);
    let mut params = BootParams::new(&start_info, start_addr);
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(PvhError::Write)?;
    Ok(start_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_low_ram_only() {
        let map = memory_map(128 << 20);
        assert_eq!(
            map.last(),
            Some(&(HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM))
        );
        assert!(map.iter().all(|(a, s, _)| a + s <= 128 << 20));
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let ram = 5u64 << 30;
        let map = memory_map(ram);
        let total_ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // Everything but the reserved EBDA/BIOS area is usable RAM.
        assert_eq!(total_ram, ram - (HIMEM_START - EBDA_START));
        assert!(map
            .iter()
            .all(|(a, s, _)| a + s <= MMIO_GAP_START || *a >= MMIO_GAP_END));
    }

    #[test]
    fn start_info_lands_in_guest_memory() {
        use vm_memory::{Bytes, GuestMemoryMmap};
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)])
            .expect("small test memory");
        let addr = setup(&mem, 16 << 20, Some((GuestAddress(0x80_0000), 4096))).unwrap();
        let magic: u32 = mem.read_obj(addr).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC_VALUE);
        let nr_modules: u32 = mem.read_obj(GuestAddress(addr.0 + 12)).unwrap();
        assert_eq!(nr_modules, 1);
        let module_addr: u64 = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!(module_addr, 0x80_0000);
    }
}

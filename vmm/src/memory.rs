//! Guest RAM: anonymous mappings (untouched pages cost the host nothing) registered with KVM.

use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryRegion};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory as the VMM uses it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors of creating and registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("cannot map {mib} MiB of guest memory")]
    Map {
        /// Size asked for.
        mib: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A snapshot's memory file could not be opened or mapped.
    #[error("cannot map guest memory from {}", .path.display())]
    MapFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {slot}")]
    Register {
        /// Slot number.
        slot: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The RAM ranges of a guest with `size` bytes of memory, around the 32-bit MMIO gap.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Maps `size` bytes of guest RAM. The mappings are private, anonymous and not reserved:
/// pages are allocated on the guest's first touch.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(|source| MemoryError::Map {
        mib: size >> 20,
        source,
    })
}

/// Maps `size` bytes of guest RAM from `path` (regions back to back in the file), private and
/// copy-on-write: pages the guest only reads stay shared with every other VM mapping the same
/// file, through the page cache; a page it writes becomes its own.
pub fn create_from_file(size: u64, path: &std::path::Path) -> Result<GuestMemoryMmap, MemoryError> {
    let err = |source| MemoryError::MapFile {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(err)?;
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let file = file.try_clone().map_err(err)?;
        let mapping = vm_memory::MmapRegion::build(
            Some(vm_memory::FileOffset::new(file, offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| err(std::io::Error::other(e)))?;
        let region = vm_memory::GuestRegionMmap::new(mapping, addr)
            .ok_or_else(|| err(std::io::Error::other("guest region overflows")))?;
        regions.push(region);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| err(std::io::Error::other(e)))
}

/// Gives every region of `mem` to KVM, one slot per region. `mem` must outlive `vm` (see
/// [`crate::sys::register_memory_region`]).
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        crate::sys::register_memory_region(vm, slot, region)
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

/// Host memory of this process, in KiB: resident in total, and resident in guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResidentKib {
    /// Everything resident in this process (VMM and guest RAM).
    pub total: u64,
    /// Guest RAM pages the guest (or the VMM's boot code) touched.
    pub guest: u64,
}

/// Reads this process's resident memory from `/proc/self/smaps`, split into guest RAM and the
/// rest. `None` when smaps cannot be read.
pub fn resident_kib(mem: &GuestMemoryMmap) -> Option<ResidentKib> {
    let starts: Vec<u64> = mem
        .iter()
        .filter_map(|r| mem.get_host_address(r.start_addr()).ok())
        .map(|p| p as u64)
        .collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    Some(resident_from_smaps(&smaps, &starts))
}

fn resident_from_smaps(smaps: &str, guest_starts: &[u64]) -> ResidentKib {
    let mut total = 0;
    let mut guest = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, _)) = first.split_once('-') {
            if let Ok(lo) = u64::from_str_radix(lo, 16) {
                in_guest = guest_starts.contains(&lo);
                continue;
            }
        }
        if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    ResidentKib { total, guest }
}

#[cfg(test)]
mod tests {
    #[test]
    fn smaps_split_guest_and_rest() {
        let smaps = "\
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
Size:              65536 kB
Rss:                1200 kB
55d000000000-55d000100000 r-xp 00000000 08:01 42 /usr/bin/nutshell-vmm
Rss:                 900 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  16 kB
";
        let r = resident_from_smaps(smaps, &[0x7f00_0000_0000]);
        assert_eq!(
            r,
            ResidentKib {
                total: 2116,
                guest: 1200
            }
        );
    }

    use super::*;

    #[test]
    fn ranges_split_around_the_gap() {
        assert_eq!(ram_ranges(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 as u64 + r[1].1 as u64, 4 << 30);
    }
}

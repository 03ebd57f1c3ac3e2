//! Loading the guest: the kernel (an uncompressed `vmlinux` with a PVH entry), the initrd and
//! the command line.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::{Elf, Error as ElfError, PvhBootCapability};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, MMIO_GAP_START};
use crate::memory::GuestMemoryMmap;

/// Errors of loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {}", .path.display())]
    KernelOpen {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not an ELF file.
    #[error("kernel {} is not an ELF vmlinux (nutshell-vmm boots an uncompressed vmlinux with a PVH entry, not a bzImage)", .path.display())]
    KernelNotElf {
        /// The file.
        path: PathBuf,
    },
    /// The kernel does not fit in guest memory.
    #[error("kernel {} does not fit in {mib} MiB of guest memory", .path.display())]
    KernelTooLarge {
        /// The file.
        path: PathBuf,
        /// Guest memory.
        mib: u64,
    },
    /// The kernel failed to load for another reason.
    #[error("cannot load kernel {}", .path.display())]
    KernelLoad {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: loader::Error,
    },
    /// The kernel has no PVH entry note.
    #[error("kernel {} has no PVH entry point (build it with CONFIG_PVH=y)", .path.display())]
    NoPvhEntry {
        /// The file.
        path: PathBuf,
    },
    /// The initrd file cannot be opened or read.
    #[error("cannot read initrd {}", .path.display())]
    InitrdRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Kernel and initrd do not both fit.
    #[error("too little guest memory: the kernel ends at {kernel_end_mib} MiB and the initrd needs {initrd_kib} KiB more, in {mib} MiB of memory")]
    InitrdTooLarge {
        /// Where the kernel ends.
        kernel_end_mib: u64,
        /// Initrd size.
        initrd_kib: u64,
        /// Guest memory.
        mib: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy initrd {} into guest memory", .path.display())]
    InitrdCopy {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The command line is too long or malformed.
    #[error("invalid kernel command line (at most {} bytes in all, including what the VMM appends)", CMDLINE_MAX_SIZE - 1)]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("cannot write the kernel command line into guest memory")]
    CmdlineWrite(#[source] loader::Error),
}

/// Where the guest starts.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// PVH entry point.
    pub entry: GuestAddress,
    /// First byte after the kernel image (bss included).
    pub end: u64,
}

/// Loads the ELF kernel at its physical load address and returns its PVH entry.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    })?;
    let result =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| match e {
            loader::Error::Elf(ElfError::InvalidElfMagicNumber)
            | loader::Error::Elf(ElfError::ReadElfHeader) => BootError::KernelNotElf {
                path: path.to_owned(),
            },
            loader::Error::Elf(ElfError::ReadKernelImage) => BootError::KernelTooLarge {
                path: path.to_owned(),
                mib: ram_size >> 20,
            },
            source => BootError::KernelLoad {
                path: path.to_owned(),
                source,
            },
        })?;
    if result.kernel_end > ram_size.min(MMIO_GAP_START) {
        return Err(BootError::KernelTooLarge {
            path: path.to_owned(),
            mib: ram_size >> 20,
        });
    }
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
            entry,
            end: result.kernel_end,
        }),
        _ => Err(BootError::NoPvhEntry {
            path: path.to_owned(),
        }),
    }
}

const PAGE_SIZE: u64 = 4096;

/// Where an initrd of `size` bytes goes: page-aligned at the top of low RAM, above the kernel.
pub fn initrd_address(ram_size: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let top = ram_size.min(MMIO_GAP_START);
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    let kernel_end = kernel_end.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end.max(HIMEM_START)).then_some(addr)
}

/// Copies the initrd into guest memory; returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<(GuestAddress, u64), BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let addr = initrd_address(ram_size, kernel_end, size).ok_or(BootError::InitrdTooLarge {
        kernel_end_mib: kernel_end.div_ceil(1 << 20),
        initrd_kib: size.div_ceil(1024),
        mib: ram_size >> 20,
    })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge {
        kernel_end_mib: kernel_end.div_ceil(1 << 20),
        initrd_kib: size.div_ceil(1024),
        mib: ram_size >> 20,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| BootError::InitrdCopy {
            path: path.to_owned(),
            source,
        })?;
    Ok((GuestAddress(addr), size))
}

/// The command line the guest gets: the user's kernel parameters, then what the VMM's devices
/// and boot need, then the user's arguments for init (what followed ` -- `), if any.
pub fn build_cmdline(user: &str, vmm_args: &[&str]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    let user = user.trim();
    let (kernel_part, init_part) = match user.strip_prefix("--") {
        Some(rest) if rest.is_empty() || rest.starts_with(' ') => ("", Some(rest.trim())),
        _ => match user.split_once(" -- ") {
            Some((k, i)) => (k.trim(), Some(i.trim())),
            None => (user.strip_suffix(" --").unwrap_or(user), None),
        },
    };
    if !kernel_part.is_empty() {
        cmdline
            .insert_str(kernel_part)
            .map_err(BootError::Cmdline)?;
    }
    for arg in vmm_args {
        cmdline.insert_str(arg).map_err(BootError::Cmdline)?;
    }
    if let Some(init) = init_part.filter(|i| !i.is_empty()) {
        cmdline.insert_init_args(init).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Writes the command line where `hvm_start_info` points.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<(), BootError> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline).map_err(BootError::CmdlineWrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_goes_on_top_and_never_over_the_kernel() {
        let mib = 1u64 << 20;
        assert_eq!(
            initrd_address(64 * mib, 20 * mib, 4096),
            Some(64 * mib - 4096)
        );
        assert_eq!(
            initrd_address(64 * mib, 20 * mib, 5000),
            Some(64 * mib - 8192)
        );
        assert_eq!(initrd_address(64 * mib, 60 * mib, 5 * mib), None);
        assert_eq!(initrd_address(64 * mib, 20 * mib, u64::MAX), None);
        // Above 3 GiB of RAM the initrd still sits below the MMIO gap.
        let addr = initrd_address(8 << 30, 20 * mib, mib).unwrap();
        assert_eq!(addr, MMIO_GAP_START - mib);
    }

    #[test]
    fn cmdline_appends_vmm_args_and_rejects_overlong() {
        let c = build_cmdline(" quiet ", &["console=ttyS0"]).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "quiet console=ttyS0"
        );
        // Arguments for init stay after the VMM's kernel parameters.
        let c = build_cmdline("quiet -- features x", &["console=ttyS0"]).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "quiet console=ttyS0 -- features x"
        );
        let c = build_cmdline("-- only-init", &["console=ttyS0"]).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 -- only-init"
        );
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            build_cmdline(&long, &[]),
            Err(BootError::Cmdline(_))
        ));
    }
}

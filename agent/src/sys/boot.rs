//! What PID 1 sets up in the guest: mounts, the hostname, the clock, entropy, the loopback
//! interface, power off.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

/// Mounts `fstype` from `source` on `target`. Already mounted (`EBUSY`) counts as success, so a
/// kernel that mounted it first (devtmpfs with `CONFIG_DEVTMPFS_MOUNT`) does no harm.
pub fn mount(source: &CStr, target: &CStr, fstype: &CStr, flags: libc::c_ulong) -> io::Result<()> {
    match nix::mount::mount(
        Some(source),
        target,
        Some(fstype),
        MsFlags::from_bits_retain(flags),
        None::<&CStr>,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Remounts the file system at `target` with the mount `flags` it has and the file system
/// options `data` (mount(2) with `MS_REMOUNT`).
pub fn remount(target: &CStr, flags: libc::c_ulong, data: &CStr) -> io::Result<()> {
    nix::mount::mount(
        None::<&CStr>,
        target,
        None::<&CStr>,
        MsFlags::from_bits_retain(flags) | MsFlags::MS_REMOUNT,
        Some(data),
    )
    .map_err(io::Error::from)
}

/// Flushes file system buffers.
pub fn sync() {
    nix::unistd::sync();
}

/// Syncs and powers the machine off with reboot(2). Returns only if that failed, with why.
pub fn power_off() -> io::Error {
    sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF) {
        Err(e) => e.into(),
        Ok(never) => match never {},
    }
}

/// The kernel release (`uname -r`).
pub fn kernel_release() -> io::Result<String> {
    Ok(nix::sys::utsname::uname()?
        .release()
        .to_string_lossy()
        .into_owned())
}

/// sethostname(2).
pub fn set_hostname(name: &str) -> io::Result<()> {
    nix::unistd::sethostname(name)?;
    Ok(())
}

/// Sets `CLOCK_REALTIME` to `nanos` since the Unix epoch.
pub fn set_realtime_nanos(nanos: i64) -> io::Result<()> {
    let ts =
        nix::sys::time::TimeSpec::new((nanos / 1_000_000_000) as _, (nanos % 1_000_000_000) as _);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)?;
    Ok(())
}

/// Sets IFF_UP on the loopback interface `lo`.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) takes plain integers; a non-negative result is a new descriptor.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just created and own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `ifr`, alive for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `ifr`, alive for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `RNDADDENTROPY` of `<linux/random.h>`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Mixes `bytes` into the kernel RNG and credits them as entropy (8 bits per byte).
pub fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    let len = libc::c_int::try_from(bytes.len())
        .ok()
        .and_then(|l| l.checked_mul(8).map(|bits| (l, bits)))
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&len.1.to_ne_bytes());
    info.extend_from_slice(&len.0.to_ne_bytes());
    info.extend_from_slice(bytes);
    // The kernel reads the header as ints and the buffer as u32s: keep it 4-byte aligned.
    let mut words = vec![0u32; info.len().div_ceil(4)];
    for (w, chunk) in words.iter_mut().zip(info.chunks(4)) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u32::from_ne_bytes(b);
    }
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of 8 + buf_size bytes from `words`, which
    // holds exactly that (rounded up to whole u32s) and lives for the call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY as _, words.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `RNDRESEEDCRNG` of `<linux/random.h>`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Reseeds the kernel's CRNG from its input pool now (`RNDRESEEDCRNG`, needs
/// `CAP_SYS_ADMIN`). Without it the kernel reseeds on its own schedule (up to a minute of guest
/// time), and VMs restored from one template would draw the same random bytes meanwhile.
pub fn reseed_crng() -> io::Result<()> {
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts the virtio-fs file system `tag` on `dir` (nodev).
///
/// Not `nosuid`: the containers' root file systems live on it, and their setuid binaries
/// (`sudo`, `ping`, `su`) must work as under runc (a container's bind of its root keeps the
/// flags of this mount). A process with `no_new_privs` still gains nothing from them. `nodev`
/// stays: a device node on the host's file system means nothing to the guest.
pub fn mount_virtiofs(tag: &str, dir: &Path) -> io::Result<()> {
    nix::mount::mount(
        Some(tag),
        dir,
        Some("virtiofs"),
        MsFlags::MS_NODEV,
        None::<&str>,
    )?;
    Ok(())
}

/// Detaches the mount on `dir` (umount2 with MNT_DETACH).
pub fn unmount_lazy(dir: &Path) -> io::Result<()> {
    nix::mount::umount2(dir, MntFlags::MNT_DETACH)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The ioctl numbers are right: on the host, as root, RNDADDENTROPY and RNDRESEEDCRNG are
    /// accepted (a wrong number would give ENOTTY, a wrong layout EINVAL). Adding 32 bytes and
    /// reseeding does the host's RNG no harm.
    #[test]
    fn entropy_and_reseed_ioctls_are_accepted() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (CAP_SYS_ADMIN)");
            return;
        }
        add_entropy(&[0x5a; 32]).unwrap();
        reseed_crng().unwrap();
    }
}

//! The system calls of the agent; all of the crate's `unsafe` is here.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Mounts `fstype` from `source` on `target`. Already mounted (`EBUSY`) counts as success, so a
/// kernel that mounted it first (devtmpfs with `CONFIG_DEVTMPFS_MOUNT`) does no harm.
pub fn mount(source: &CStr, target: &CStr, fstype: &CStr, flags: libc::c_ulong) -> io::Result<()> {
    // SAFETY: all strings are valid NUL-terminated C strings that outlive the call, and a null
    // `data` is allowed; mount(2) reads them and touches no memory of ours otherwise.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(err)
}

/// Flushes file system buffers.
pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Syncs and powers the machine off with reboot(2). Returns only if that failed, with why.
pub fn power_off() -> io::Error {
    sync();
    // SAFETY: reboot(2) takes a plain integer command and touches no memory of ours.
    let rc = unsafe { libc::reboot(libc::RB_POWER_OFF) };
    if rc == 0 {
        return io::Error::other("reboot(2) returned");
    }
    io::Error::last_os_error()
}

/// The kernel release (`uname -r`).
pub fn kernel_release() -> io::Result<String> {
    // SAFETY: utsname is plain data; all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname(2) fills the struct we pass, which lives for the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel NUL-terminates `release` within its length (the array was zeroed too).
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

/// Blocks SIGCHLD in the calling thread, and so in every thread it spawns afterwards: call it
/// before any thread starts, then [`ChildReaper`] receives the signal through a signalfd.
pub fn block_sigchld() -> io::Result<()> {
    let set = sigchld_set()?;
    // SAFETY: `set` is an initialized sigset_t; a null old set is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn sigchld_set() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own.
    if unsafe { libc::sigemptyset(&mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `set` is an initialized sigset_t we own; SIGCHLD is a valid signal number.
    if unsafe { libc::sigaddset(&mut set, libc::SIGCHLD) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(set)
}

/// Waits for SIGCHLD (blocked with [`block_sigchld`]) on a signalfd and reaps every child that
/// exited: as PID 1 the agent inherits every orphan of the guest.
#[derive(Debug)]
pub struct ChildReaper {
    fd: OwnedFd,
}

/// A reaped child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// Its PID.
    pub pid: libc::pid_t,
    /// Its wait status (as waitpid(2) reports it).
    pub status: libc::c_int,
}

impl ChildReaper {
    /// A signalfd for SIGCHLD.
    pub fn new() -> io::Result<Self> {
        let set = sigchld_set()?;
        // SAFETY: `set` is an initialized sigset_t; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(ChildReaper { fd })
    }

    /// Blocks until SIGCHLD arrives, then reaps every exited child and returns them.
    pub fn wait(&self) -> io::Result<Vec<Reaped>> {
        // SAFETY: signalfd_siginfo is plain data; all-zero is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: we read at most `size` bytes into `info`, which is that large.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        Ok(reap_exited())
    }
}

/// Reaps every child that has exited, without blocking (signals coalesce: one SIGCHLD may stand
/// for many exits).
pub fn reap_exited() -> Vec<Reaped> {
    let mut reaped = Vec::new();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid(2) writes the status into our local variable.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return reaped;
        }
        reaped.push(Reaped { pid, status });
    }
}

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` of `<linux/vm_sockets.h>`: `_IO(7, 0xb9)` (the request
/// argument is `c_ulong` on glibc, `c_int` on musl; cast at the call).
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// The guest's vsock CID, or `None` when no guest-to-host transport (virtio-vsock device) is
/// present: the kernel then answers `VMADDR_CID_ANY`, or `VMADDR_CID_LOCAL` (1) when the
/// loopback transport is built in. A guest's own CID is always above `VMADDR_CID_HOST` (2).
pub fn vsock_local_cid() -> io::Result<Option<u32>> {
    use std::os::fd::AsRawFd as _;
    let dev = std::fs::File::open("/dev/vsock")?;
    let mut cid: u32 = libc::VMADDR_CID_ANY;
    // SAFETY: this ioctl writes one u32 into `cid`, which lives for the call.
    if unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID as _,
            &mut cid,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok((cid > libc::VMADDR_CID_HOST && cid != libc::VMADDR_CID_ANY).then_some(cid))
}

/// Sets `CLOCK_REALTIME` to `nanos` since the Unix epoch.
pub fn set_realtime_nanos(nanos: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (nanos % 1_000_000_000) as _,
    };
    // SAFETY: `ts` is a valid timespec that lives for the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
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

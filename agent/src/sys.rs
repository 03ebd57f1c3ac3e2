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

/// A non-blocking vsock stream socket listening on `port` of any local CID (backlog 1).
pub fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    vsock_listen_backlog(port, 1)
}

/// A non-blocking vsock stream socket listening on `port` of any local CID.
pub fn vsock_listen_backlog(port: u32, backlog: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes plain integers; a non-negative result is a new descriptor.
    let raw = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just created and own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm of the length passed, alive for the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a descriptor we own.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Waits until `fd` is readable (a listener: a connection is pending) or `timeout` passes;
/// true when readable. EINTR counts as not yet readable.
pub fn poll_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    timeout: std::time::Duration,
) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, alive for the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(err)
        };
    }
    Ok(rc > 0)
}

/// Accepts one connection on the listener `fd`; the new socket is blocking and close-on-exec
/// (dup2 onto a process's stdio clears that).
pub fn accept_blocking(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: accept4(2) with null address pointers writes no memory of ours.
    let raw = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// sethostname(2).
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, alive for the call.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `CLOCK_REALTIME` to `nanos` since the Unix epoch.
pub fn set_realtime_nanos(nanos: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (nanos / 1_000_000_000) as _,
        tv_nsec: (nanos % 1_000_000_000) as _,
    };
    // SAFETY: `ts` is a valid timespec that lives for the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
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

fn path_cstring(p: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))
}

/// Mounts the virtio-fs file system `tag` on `dir` (nodev).
///
/// Not `nosuid`: the containers' root file systems live on it, and their setuid binaries
/// (`sudo`, `ping`, `su`) must work as under runc (a container's bind of its root keeps the
/// flags of this mount). A process with `no_new_privs` still gains nothing from them. `nodev`
/// stays: a device node on the host's file system means nothing to the guest.
pub fn mount_virtiofs(tag: &str, dir: &std::path::Path) -> io::Result<()> {
    let source = std::ffi::CString::new(tag)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "tag has a NUL byte"))?;
    let target = path_cstring(dir)?;
    // SAFETY: valid NUL-terminated strings alive for the call, null data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"virtiofs".as_ptr(),
            libc::MS_NODEV,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches the mount on `dir` (umount2 with MNT_DETACH).
pub fn unmount_lazy(dir: &std::path::Path) -> io::Result<()> {
    let target = path_cstring(dir)?;
    // SAFETY: a valid NUL-terminated string alive for the call.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Installs a seccomp BPF program on the calling thread with seccomp(2) and
/// `SECCOMP_FILTER_FLAG_*` `flags`. Does not set `no_new_privs` (seccompiler's apply does);
/// the kernel then requires `CAP_SYS_ADMIN`. Allocates nothing unless it fails, so a child
/// may call it between fork(2) and execve(2).
pub fn seccomp_set_mode_filter(prog: &[seccompiler::sock_filter], flags: u32) -> io::Result<()> {
    let len = u16::try_from(prog.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "seccomp program too long"))?;
    let fprog = libc::sock_fprog {
        len,
        // seccompiler's sock_filter is #[repr(C)] with the fields of the kernel's.
        filter: prog.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    // SAFETY: `fprog` points to `len` initialized instructions that outlive the call; the kernel
    // copies the program and writes nothing of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::c_ulong::from(flags),
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if rc > 0 {
        // SECCOMP_FILTER_FLAG_TSYNC: the ID of a thread that could not be synchronized.
        return Err(io::Error::other(format!(
            "thread {rc} cannot take the filter (TSYNC)"
        )));
    }
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
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (CAP_SYS_ADMIN)");
            return;
        }
        add_entropy(&[0x5a; 32]).unwrap();
        reseed_crng().unwrap();
    }
}

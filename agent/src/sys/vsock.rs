//! The guest's vsock: its CID, listeners, waiting for and accepting a connection.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

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
    use nix::sys::socket;
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    socket::bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    socket::listen(&fd, Backlog::new(backlog)?)?;
    Ok(fd)
}

/// Waits until `fd` is readable (a listener: a connection is pending) or `timeout` passes;
/// true when readable. EINTR counts as not yet readable.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match nix::poll::poll(&mut fds, timeout) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Accepts one connection on the listener `fd`; the new socket is blocking and close-on-exec
/// (dup2 onto a process's stdio clears that).
pub fn accept_blocking(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(nix::sys::socket::accept4(fd, SockFlag::SOCK_CLOEXEC)?)
}

//! The shim's system calls in one place. Where `nix` covers a call it is used (kill, setns,
//! poll, shutdown, SO_LINGER, SO_ORIGINAL_DST); what stays `unsafe` — the `pre_exec` hook
//! that moves a VMM into its pod's cgroup and network namespace and hands it the tap, and
//! the raw write(2)/dup2(2)/fcntl(2) that hook may call between fork and exec — is here,
//! each block with its SAFETY argument.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::socket::{getsockopt, setsockopt, sockopt, Shutdown};
use nix::unistd::Pid;

/// SIGKILLs process `pid`.
pub fn sigkill(pid: libc::pid_t) -> io::Result<()> {
    nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).map_err(io::Error::from)
}

/// Moves the calling thread into the network namespace `ns` (a namespace file descriptor).
pub fn setns_net(ns: impl AsFd) -> io::Result<()> {
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Waits until `fd` is readable, for at most `timeout` (`None`: without bound); false on
/// the timeout. An interrupted wait is retried.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
    };
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(n) => return Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// shutdown(2) both directions of socket `fd` (on a listener: wakes a blocked accept).
pub fn shutdown(fd: &impl AsRawFd) -> io::Result<()> {
    nix::sys::socket::shutdown(fd.as_raw_fd(), Shutdown::Both).map_err(io::Error::from)
}

/// Makes closing `sock` send a reset (SO_LINGER with a zero timeout).
pub fn linger_zero(sock: &impl AsFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(sock, sockopt::Linger, &linger).map_err(io::Error::from)
}

/// The IPv4 destination an iptables-redirected connection was made for (SO_ORIGINAL_DST).
pub fn original_dst(sock: &impl AsFd) -> io::Result<SocketAddrV4> {
    let addr = getsockopt(sock, sockopt::OriginalDst).map_err(io::Error::from)?;
    if addr.sin_family != libc::AF_INET as libc::sa_family_t {
        return Err(io::Error::other("not an IPv4 destination"));
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

/// write(2) of `buf` to the raw descriptor `fd` (async-signal-safe: for a forked child).
pub fn write_raw(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: write(2) reads at most `buf.len()` bytes from `buf`, valid for the call; any
    // `fd` is acceptable (a closed or bad one fails with EBADF).
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// In a forked child: `fd` becomes descriptor `target`, inherited by the exec.
fn pass_fd(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2(2)/fcntl(2) on descriptors of this process; no memory is passed.
    let r = unsafe {
        if fd == target {
            // dup2 to itself keeps FD_CLOEXEC: clear it.
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What a VMM's child process does between fork and exec.
#[derive(Debug, Default)]
pub struct ChildSetup {
    /// Open `cgroup.procs` files to write "0" to (joins those cgroups).
    pub cgroup_procs: Vec<RawFd>,
    /// A network namespace to enter.
    pub netns: Option<RawFd>,
    /// A descriptor to pass on, and the number it gets.
    pub pass: Option<(RawFd, RawFd)>,
}

/// Makes `command`'s child do `setup` before its exec: join the cgroups, enter the network
/// namespace, then place the passed descriptor (after the setns: the dup2 may land on the
/// namespace's descriptor). Every descriptor must stay open in the parent until `spawn`
/// returns.
pub fn prepare_child(command: &mut Command, setup: ChildSetup) {
    if setup.cgroup_procs.is_empty() && setup.netns.is_none() && setup.pass.is_none() {
        return;
    }
    // SAFETY: the closure runs in the forked child before exec and only calls write(2),
    // setns(2), dup2(2) and fcntl(2) (async-signal-safe, no allocation) on descriptors that
    // the caller keeps open in the parent until `spawn` returns.
    unsafe {
        command.pre_exec(move || {
            crate::cgroup::join_self(&setup.cgroup_procs)?;
            if let Some(ns) = setup.netns {
                if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            match setup.pass {
                Some((fd, target)) => pass_fd(fd, target),
                None => Ok(()),
            }
        });
    }
}

//! The raw system calls of the container runtime that `nix` does not wrap safely; all of the
//! module's `unsafe` is here.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::unistd::Pid;

/// What [`fork`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// In the parent, with the child's PID.
    Parent(Pid),
    /// In the child.
    Child,
}

/// fork(2) through libc, whose fork handlers leave the allocator usable in the child of a
/// multi-threaded process (glibc and musl both take their malloc locks around fork).
///
/// The child must not return into the caller's normal flow: it ends with [`exit_now`] or an
/// execve. It may allocate, but must not take locks that another thread of the parent could
/// have held at the fork (the logger's, for one).
pub fn fork() -> io::Result<Forked> {
    // SAFETY: fork(2) has no memory-safety preconditions of its own; the contract above (the
    // child only runs our setup code and then exits or execs) keeps the child away from state
    // that other threads of the parent held at the fork.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(Pid::from_raw(pid))),
    }
}

/// clone(2) with fork semantics (no new stack, the child continues here) and `flags` (namespace
/// flags, `CLONE_PARENT`); the child's exit is signalled with SIGCHLD.
///
/// Call it from a single-threaded process (the intermediate child of [`fork`]), or make the
/// child do nothing but system calls until it execs or exits (the pod init): a raw clone runs
/// no fork handlers, so another thread's locks (the allocator's) may stay held in the child.
pub fn clone_fork(flags: libc::c_int) -> io::Result<Forked> {
    let flags = (flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: with a null stack pointer clone(2) behaves as fork(2): the child gets a copy of
    // the address space and continues on its own copy of this stack. The other pointer
    // arguments are null and unused without CLONE_*TID/CLONE_SETTLS. The caller is single
    // threaded, or its child takes no lock (see above), so no lock held by a thread that the
    // child lacks is ever waited for.
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match rc {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(Pid::from_raw(pid as libc::pid_t))),
    }
}

/// Ends the calling process at once with `code`, without running exit handlers or destructors
/// (a forked child must not run the parent's: test harness output, buffered writers).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) never returns and only ends the calling process.
    unsafe { libc::_exit(code) }
}

/// Duplicates `fd` onto `target` (0, 1 or 2); the copy is not close-on-exec.
pub fn dup_onto(fd: BorrowedFd<'_>, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2(2) on a descriptor that `fd` keeps open; replacing `target` is what the
    // caller (a child about to exec) asks for.
    if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes every descriptor from 3 up except those in `keep`, with close_range(2).
pub fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|fd| **fd >= 3)
        .map(|fd| *fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut low: u32 = 3;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > low {
            // SAFETY: close_range(2) takes plain integers; closing descriptors that no Rust
            // object of this (forked, single-threaded) child still uses is intended; the ones
            // in use are in `keep`.
            let rc =
                unsafe { libc::syscall(libc::SYS_close_range, low, fd.saturating_sub(1), 0u32) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        low = fd.saturating_add(1);
    }
    Ok(())
}

/// Closes every descriptor from `first` up, with close_range(2); allocates nothing (safe in the
/// child of a raw clone from a multi-threaded process).
pub fn close_from(first: RawFd) -> io::Result<()> {
    // SAFETY: close_range(2) takes plain integers; the caller no longer uses any descriptor
    // from `first` up.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first as u32, u32::MAX, 0u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the terminal on `fd` the controlling terminal of the calling session leader.
pub fn set_controlling_terminal(fd: RawFd) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal) and touches no memory.
    if unsafe { libc::ioctl(fd, libc::TIOCSCTTY as _, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the window size of the terminal on `fd`.
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ as _, &size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the NIS domain name of the UTS namespace.
pub fn set_domainname(name: &[u8]) -> io::Result<()> {
    // SAFETY: setdomainname(2) reads `len` bytes from the slice, which lives for the call.
    if unsafe { libc::setdomainname(name.as_ptr().cast(), name.len() as _) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// prctl(2) with integer arguments only.
pub fn prctl(option: libc::c_int, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the options used here (PR_SET_NO_NEW_PRIVS, PR_SET_KEEPCAPS,
    // PR_SET_PDEATHSIG) take plain integers and touch no memory of ours.
    if unsafe {
        libc::prctl(
            option,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// execve(2); returns only with why it failed.
pub fn execve(path: &CStr, argv: &[&CStr], envp: &[&CStr]) -> io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: `path` and every pointer in both arrays point to NUL-terminated strings that the
    // caller keeps alive for the call, and both arrays end with a null pointer.
    unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    io::Error::last_os_error()
}

/// pidfd_open(2): a descriptor for the process `pid` that keeps naming it after it exited (so
/// a signal through it never reaches a process that reused the PID).
pub fn pidfd_open(pid: Pid) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open(2) takes a PID and flags (0) and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) })
}

/// pidfd_send_signal(2): `signal` to the process behind `pidfd`; ESRCH once it has exited.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: a null siginfo is allowed (the kernel fills it as for kill(2)); flags are 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unlocks the slave of the pty master `master` (what unlockpt(3) does).
pub fn unlock_pty(master: BorrowedFd<'_>) -> io::Result<()> {
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer, which lives for the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK as _, &unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The number N of the pty whose master is `master` (its slave is `pts/N` of its devpts); fails
/// (ENOTTY) on anything that is not a pty.
pub fn pty_number(master: BorrowedFd<'_>) -> io::Result<u32> {
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int to the pointer, which lives for the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN as _, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// Opens the slave of the pty master `master` through the devpts instance the master came from
/// (TIOCGPTPEER, Linux 4.13+): no path lookup, so no other file can stand in for it. `flags`
/// are open flags (`O_RDWR | O_NOCTTY | O_CLOEXEC`).
pub fn open_pty_peer(master: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: TIOCGPTPEER takes the open flags as an integer argument and returns a new
    // descriptor or -1; it touches no memory of ours.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER as _, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The most descriptors one SCM_RIGHTS message can carry (the kernel's SCM_MAX_FD).
const SCM_MAX_FD: usize = 253;

/// Sends `fd` over the Unix socket `sock` (SCM_RIGHTS, with a one-byte payload).
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let fds = [fd.as_raw_fd()];
    let payload = [0u8; 1];
    sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &[io::IoSlice::new(&payload)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives exactly one descriptor from the next message on the Unix socket `sock`, without
/// waiting (the peer sent it before it reported so on another channel). The received
/// descriptors are close-on-exec. A message with no descriptor or with more than one is an
/// error (`InvalidData`), and every descriptor that came with it is closed; so is EOF.
pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    let mut payload = [0u8; 16];
    // Room for the most a message can carry, so that the kernel never truncates the control
    // data (it would install the descriptors that fit and nix would then refuse to list them).
    // The kernel also truncates when this process runs out of descriptors; the ones it did
    // install then stay open, which only an agent already at its descriptor limit can meet.
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let mut iov = [io::IoSliceMut::new(&mut payload)];
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut received: Vec<OwnedFd> = Vec::new();
    let mut other = false;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::ScmRights(fds) => {
                // SAFETY: the kernel installed these descriptors in this process for this
                // message; nothing else knows them, so each gets exactly one owner here.
                received.extend(
                    fds.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
            _ => other = true,
        }
    }
    if msg.bytes == 0 && received.is_empty() {
        return Err(invalid(
            "the peer closed the socket without sending a descriptor".into(),
        ));
    }
    if other {
        return Err(invalid("unexpected control data".into()));
    }
    if received.len() != 1 {
        return Err(invalid(format!(
            "expected one descriptor, got {}",
            received.len()
        )));
    }
    Ok(received.remove(0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use nix::sys::socket::{
        sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
    };

    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    fn send_raw(sock: &OwnedFd, payload: &[u8], fds: &[RawFd]) {
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
        sendmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &[io::IoSlice::new(payload)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    #[test]
    fn a_descriptor_crosses_a_socketpair() {
        let (a, b) = pair();
        let (r, w) = nix::unistd::pipe().unwrap();
        send_fd(a.as_fd(), w.as_fd()).unwrap();
        drop(w);
        let got = recv_fd(b.as_fd()).unwrap();
        let flags = nix::fcntl::fcntl(&got, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received without close-on-exec"
        );
        std::fs::File::from(got).write_all(b"through").unwrap();
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(out, "through");
    }

    #[test]
    fn nothing_sent_is_an_error_at_once() {
        let (_a, b) = pair();
        let err = recv_fd(b.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    }

    #[test]
    fn a_closed_peer_or_a_message_without_descriptor_is_refused() {
        let (a, b) = pair();
        send_raw(&a, b"x", &[]);
        let err = recv_fd(b.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        drop(a);
        let err = recv_fd(b.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn several_descriptors_are_refused_and_closed() {
        let (a, b) = pair();
        let (r1, w1) = nix::unistd::pipe().unwrap();
        let (r2, w2) = nix::unistd::pipe().unwrap();
        send_raw(&a, b"x", &[w1.as_raw_fd(), w2.as_raw_fd()]);
        drop((w1, w2));
        let err = recv_fd(b.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("got 2"), "{err}");
        // Both write ends are closed: the received copies too, nothing leaked.
        for r in [r1, r2] {
            let mut buf = [0u8; 1];
            assert_eq!(nix::unistd::read(&r, &mut buf).unwrap(), 0);
        }
    }
}

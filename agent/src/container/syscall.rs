//! The raw system calls of the container runtime that `nix` does not wrap safely; all of the
//! module's `unsafe` is here.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

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
/// Call it only from a single-threaded process (the intermediate child of [`fork`]): a raw
/// clone runs no fork handlers, so another thread's locks would stay held in the child.
pub fn clone_fork(flags: libc::c_int) -> io::Result<Forked> {
    let flags = (flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: with a null stack pointer clone(2) behaves as fork(2): the child gets a copy of
    // the address space and continues on its own copy of this stack. The other pointer
    // arguments are null and unused without CLONE_*TID/CLONE_SETTLS. The caller is single
    // threaded, so no lock is held by a thread that the child lacks.
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

/// setrlimit(2) for the raw resource number.
pub fn set_rlimit(resource: libc::c_int, soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit(2) reads one rlimit from the pointer, which lives for the call.
    if unsafe { libc::setrlimit(resource as _, &limit) } < 0 {
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

//! Forking a container process and preparing it up to its execve: the calls of the child
//! between fork and exec, and the pidfd calls that name a process after it exited.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::sys::resource::Resource;
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

/// Sets the NIS domain name of the UTS namespace.
pub fn set_domainname(name: &[u8]) -> io::Result<()> {
    // SAFETY: setdomainname(2) reads `len` bytes from the slice, which lives for the call.
    if unsafe { libc::setdomainname(name.as_ptr().cast(), name.len() as _) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The resources setrlimit(2) knows, by their number (what the spec's names map to).
const RESOURCES: [(libc::c_int, Resource); 16] = [
    (libc::RLIMIT_CPU as libc::c_int, Resource::RLIMIT_CPU),
    (libc::RLIMIT_FSIZE as libc::c_int, Resource::RLIMIT_FSIZE),
    (libc::RLIMIT_DATA as libc::c_int, Resource::RLIMIT_DATA),
    (libc::RLIMIT_STACK as libc::c_int, Resource::RLIMIT_STACK),
    (libc::RLIMIT_CORE as libc::c_int, Resource::RLIMIT_CORE),
    (libc::RLIMIT_RSS as libc::c_int, Resource::RLIMIT_RSS),
    (libc::RLIMIT_NPROC as libc::c_int, Resource::RLIMIT_NPROC),
    (libc::RLIMIT_NOFILE as libc::c_int, Resource::RLIMIT_NOFILE),
    (
        libc::RLIMIT_MEMLOCK as libc::c_int,
        Resource::RLIMIT_MEMLOCK,
    ),
    (libc::RLIMIT_AS as libc::c_int, Resource::RLIMIT_AS),
    (libc::RLIMIT_LOCKS as libc::c_int, Resource::RLIMIT_LOCKS),
    (
        libc::RLIMIT_SIGPENDING as libc::c_int,
        Resource::RLIMIT_SIGPENDING,
    ),
    (
        libc::RLIMIT_MSGQUEUE as libc::c_int,
        Resource::RLIMIT_MSGQUEUE,
    ),
    (libc::RLIMIT_NICE as libc::c_int, Resource::RLIMIT_NICE),
    (libc::RLIMIT_RTPRIO as libc::c_int, Resource::RLIMIT_RTPRIO),
    (libc::RLIMIT_RTTIME as libc::c_int, Resource::RLIMIT_RTTIME),
];

/// setrlimit(2) for the raw resource number; an unknown number is `EINVAL`, as from the
/// kernel.
pub fn set_rlimit(resource: libc::c_int, soft: u64, hard: u64) -> io::Result<()> {
    let (_, resource) = RESOURCES
        .iter()
        .find(|(number, _)| *number == resource)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    nix::sys::resource::setrlimit(*resource, soft as libc::rlim_t, hard as libc::rlim_t)?;
    Ok(())
}

/// prctl(2) for the options a container process needs: `PR_SET_NO_NEW_PRIVS` (argument 1),
/// `PR_SET_KEEPCAPS` (0 or 1) and `PR_SET_PDEATHSIG` (a signal, 0 for none). Others are
/// `EINVAL`.
pub fn prctl(option: libc::c_int, arg: libc::c_ulong) -> io::Result<()> {
    use nix::sys::prctl;
    match option {
        libc::PR_SET_NO_NEW_PRIVS if arg == 1 => prctl::set_no_new_privs()?,
        libc::PR_SET_KEEPCAPS => prctl::set_keepcaps(arg != 0)?,
        libc::PR_SET_PDEATHSIG => {
            let signal = match arg {
                0 => None,
                n => Some(
                    libc::c_int::try_from(n)
                        .ok()
                        .and_then(|n| nix::sys::signal::Signal::try_from(n).ok())
                        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?,
                ),
            };
            prctl::set_pdeathsig(signal)?;
        }
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
    Ok(())
}

/// execve(2); returns only with why it failed.
pub fn execve(path: &CStr, argv: &[&CStr], envp: &[&CStr]) -> io::Error {
    match nix::unistd::execve(path, argv, envp) {
        Err(e) => e.into(),
        Ok(never) => match never {},
    }
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

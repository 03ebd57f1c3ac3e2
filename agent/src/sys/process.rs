//! Cloning a container process and preparing it up to its execve: the calls of the child
//! between clone and exec, and the pidfd calls that name a process after it exited.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::unistd::Pid;

/// What [`clone_fork`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// In the parent, with the child's PID.
    Parent(Pid),
    /// In the child.
    Child,
}

/// clone(2) with fork semantics (no new stack, the child continues here) and `flags` (namespace
/// flags, `CLONE_PARENT`); the child's exit is signalled with SIGCHLD.
///
/// Call it from a single-threaded process, or make the child do nothing but system calls until
/// it execs or exits (the pod init): a raw clone runs no fork handlers, so another thread's
/// locks (the allocator's) may stay held in the child.
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
/// (a child must not run the parent's: test harness output, buffered writers).
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

/// Closes every descriptor from 3 up except those in `keep`, sorted ascending (duplicates
/// allowed), with close_range(2); allocates nothing (safe in a child that shares the agent's
/// memory).
pub fn close_fds_except_sorted(keep: &[RawFd]) -> io::Result<()> {
    let mut low: u32 = 3;
    for fd in keep
        .iter()
        .filter(|fd| **fd >= 3)
        .map(|fd| *fd as u32)
        .chain(std::iter::once(u32::MAX))
    {
        if fd > low {
            // SAFETY: close_range(2) takes plain integers; closing descriptors that no Rust
            // object of this child still uses is intended; the ones in use are in `keep`.
            let rc =
                unsafe { libc::syscall(libc::SYS_close_range, low, fd.saturating_sub(1), 0u32) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        low = low.max(fd.saturating_add(1));
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

/// prlimit64(2) on the calling process for the raw resource number (an unknown one is `EINVAL`,
/// from the kernel). One raw system call, so that a child that shares the agent's memory never
/// enters libc's machinery for the process's other threads (see [`set_groups`]).
pub fn set_rlimit(resource: libc::c_int, soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit64 {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: prlimit64(2) reads one rlimit64 from the pointer, alive for the call; the null
    // old-limit pointer asks for nothing back; PID 0 is the calling process.
    check(unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            0,
            resource,
            &limit as *const libc::rlimit64,
            std::ptr::null_mut::<libc::rlimit64>(),
        )
    })
}

/// setgroups(2) of the calling thread only, as a raw system call. libc's set*id wrappers (musl's
/// as glibc's) apply the change to every thread of the process, through a signal to each of
/// the others; a child that shares the agent's memory (see [`clone_vm_vfork`]) sees the agent's
/// threads there and would change their credentials. The child execs right after, and a
/// single-threaded child has nothing else to change.
pub fn set_groups(groups: &[u32]) -> io::Result<()> {
    // SAFETY: setgroups(2) reads `groups.len()` gids from the slice, alive for the call.
    check(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) })
}

/// setresgid(2) with one gid for all three, of the calling thread only (see [`set_groups`]).
pub fn set_gid(gid: u32) -> io::Result<()> {
    // SAFETY: setresgid(2) takes plain integers.
    check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })
}

/// setresuid(2) with one uid for all three, of the calling thread only (see [`set_groups`]).
pub fn set_uid(uid: u32) -> io::Result<()> {
    // SAFETY: setresuid(2) takes plain integers.
    check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) })
}

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The stack of a child that shares the agent's memory ([`clone_vm_vfork`]): an anonymous
/// mapping whose lowest page is a guard.
#[derive(Debug)]
pub struct ChildStack {
    base: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

impl ChildStack {
    /// A stack of `len` bytes (a multiple of the page size, above one page).
    pub fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a new private anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack {
            base: std::ptr::NonNull::new(base).ok_or_else(io::Error::last_os_error)?,
            len,
        };
        // SAFETY: the first page of the mapping just made, which nothing uses yet.
        if unsafe { libc::mprotect(base, page_size(), libc::PROT_NONE) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The initial stack pointer (the stack grows down), 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        self.base
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(self.len)
            .cast()
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the child that ran on it execed or exited (the
        // vfork clone returned), so nothing uses it.
        unsafe { libc::munmap(self.base.as_ptr(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf(3) with a valid name.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// clone(2) with `CLONE_VM | CLONE_VFORK` (as posix_spawn does): the child runs `entry(arg)` on
/// `stack` in the caller's memory, and the calling thread sleeps until the child execs or
/// exits. No page tables are copied and no copy-on-write faults follow, in the child or in the
/// parent. `namespaces` (`CLONE_NEW*` bits only, else `EINVAL`) puts the child into new
/// namespaces (a container's init); its mount namespace is a copy of the calling thread's. The
/// child's PID (in the caller's PID namespace) is stored in `pid` before the child runs; it
/// exits with SIGCHLD to the caller's process. Returns that PID once the child execed or
/// exited.
///
/// # Safety
/// The child shares every byte of the caller's process memory with its other threads, and runs
/// with the calling thread's thread-local storage. `entry` must therefore:
/// - only borrow what `arg` points to (alive: the calling thread is suspended meanwhile), and
///   leave nothing of its own in the heap at its execve or exit (it may allocate and free: the
///   allocator's locks work across threads of one memory);
/// - make no libc call that acts on the process's other threads or on the calling thread by
///   its cached thread ID (set*id, setrlimit, raise, abort, pthread_*): they are the agent's;
///   raw system calls act on the child alone;
/// - end with execve(2) or `_exit(2)`, never by returning into code that expects a thread.
pub unsafe fn clone_vm_vfork(
    entry: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    stack: &ChildStack,
    arg: *mut libc::c_void,
    pid: &std::sync::atomic::AtomicI32,
    namespaces: libc::c_int,
) -> io::Result<Pid> {
    const NEW_NAMESPACES: libc::c_int = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP;
    if namespaces & !NEW_NAMESPACES != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let flags =
        libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT_SETTID | libc::SIGCHLD | namespaces;
    // SAFETY: `stack` is a mapping of its own that outlives the child's use of it (the caller
    // holds it, and this thread is suspended until the child execs or exits); `pid` is where
    // the kernel writes the child's PID (CLONE_PARENT_SETTID), alive for the call; the rest is
    // the caller's contract above.
    let rc = unsafe { libc::clone(entry, stack.top(), flags, arg, pid.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Pid::from_raw(rc))
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

/// The argument and environment arrays of an execve(2), built ahead: a child that shares the
/// agent's memory then allocates nothing for them. They borrow the strings (`'a`).
#[derive(Debug)]
pub struct ExecArrays<'a> {
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    strings: std::marker::PhantomData<&'a CStr>,
}

impl<'a> ExecArrays<'a> {
    /// Null-terminated arrays of pointers to `argv` and `envp`.
    pub fn new(argv: &[&'a CStr], envp: &[&'a CStr]) -> Self {
        let nul_terminated = |v: &[&'a CStr]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        ExecArrays {
            argv: nul_terminated(argv),
            envp: nul_terminated(envp),
            strings: std::marker::PhantomData,
        }
    }

    /// execve(2) of `path` with these arrays; returns only with why it failed.
    pub fn execve(&self, path: &CStr) -> io::Error {
        // SAFETY: `path` is NUL-terminated; both arrays end with a null pointer and point to
        // NUL-terminated strings that outlive `self` ('a).
        unsafe { libc::execve(path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
        io::Error::last_os_error()
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

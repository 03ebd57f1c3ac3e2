//! The few system calls init needs; all of the crate's `unsafe` is here.

use std::ffi::CStr;
use std::io;

/// Mounts a pseudo file system (`proc`, `sysfs`) with nosuid, nodev and noexec. Already mounted
/// (`EBUSY`) counts as success, so a kernel or earlier init that mounted it does no harm.
pub fn mount_pseudo(fstype: &CStr, target: &CStr) -> io::Result<()> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: all strings are valid NUL-terminated C strings that outlive the call, and a null
    // `data` is allowed; mount(2) reads them and touches no memory of ours otherwise.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
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

/// Mounts the virtio-fs file system tagged `tag` on `target`.
pub fn mount_virtiofs(tag: &CStr, target: &CStr) -> io::Result<()> {
    // SAFETY: all strings are valid NUL-terminated C strings that outlive the call, and a null
    // `data` is allowed; mount(2) reads them and touches no memory of ours otherwise.
    let rc = unsafe {
        libc::mount(
            tag.as_ptr(),
            target.as_ptr(),
            c"virtiofs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Flushes file system buffers.
pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Waits until the console (standard output) has sent everything written to it. A write to a
/// tty returns once the bytes are in the tty's buffer; the UART sends them later, interrupt by
/// interrupt, and a power-off before that loses the end of the output (seen with 2 vCPUs on
/// `kvm_pvm`, where every interrupt is slow). Not a tty: nothing to wait for.
pub fn drain_console() {
    // SAFETY: tcdrain(3) on a descriptor number only waits; a bad or non-tty descriptor makes it
    // fail with EBADF/ENOTTY, which is ignored.
    unsafe { libc::tcdrain(libc::STDOUT_FILENO) };
}

/// What [`reboot`] asks of the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootCmd {
    PowerOff,
    Restart,
}

/// Calls reboot(2). On success it does not return (in a PID namespace the kernel ends the
/// namespace's init instead); a return is always an error.
pub fn reboot(cmd: RebootCmd) -> io::Error {
    let how = match cmd {
        RebootCmd::PowerOff => libc::RB_POWER_OFF,
        RebootCmd::Restart => libc::RB_AUTOBOOT,
    };
    // SAFETY: reboot(2) takes a plain integer command and touches no memory of ours.
    let rc = unsafe { libc::reboot(how) };
    if rc == 0 {
        // Cannot happen for these commands, but do not claim an error that has no errno.
        return io::Error::other("reboot(2) returned");
    }
    io::Error::last_os_error()
}

/// A vsock stream socket.
fn vsock_socket() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

const VSOCK_ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// Listens on vsock `port` (any CID) and accepts one connection.
pub fn vsock_accept_one(port: u32) -> io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let sock = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the given length.
    if unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            VSOCK_ADDR_LEN,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(sock.as_raw_fd(), 1) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept(2) without a peer address.
    let fd = unsafe {
        libc::accept4(
            sock.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Connects to vsock `cid`:`port`.
pub fn vsock_connect(cid: u32, port: u32) -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let sock = vsock_socket()?;
    let addr = vsock_addr(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the given length.
    if unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            VSOCK_ADDR_LEN,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(std::fs::File::from(sock))
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildEnd {
    /// It exited with this code.
    Exited(i32),
    /// A signal ended it.
    Signaled(i32),
}

/// Runs `f` in a child process (fork) that exits with what `f` returns, and waits for it: for
/// an instruction that may raise a signal (SIGILL) that would end init itself.
pub fn in_child(f: fn() -> i32) -> io::Result<ChildEnd> {
    // SAFETY: init is single-threaded here (it starts threads in no mode that calls this), so
    // the child may run any code; it only runs `f` and _exit(2).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = f();
        // SAFETY: _exit(2) ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) writes the status to a local of ours.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    if libc::WIFSIGNALED(status) {
        Ok(ChildEnd::Signaled(libc::WTERMSIG(status)))
    } else {
        Ok(ChildEnd::Exited(libc::WEXITSTATUS(status)))
    }
}

/// The process id, from getpid(2) through the C library.
pub fn getpid() -> i64 {
    // SAFETY: getpid(2) cannot fail and touches no memory.
    i64::from(unsafe { libc::getpid() })
}

/// EFLAGS.ID (bit 21), a flag user code may set and clear (the CPUID-detection bit).
const EFLAGS_ID: u64 = 1 << 21;

/// Makes the 64-bit `getpid` system call with the `syscall` instruction while EFLAGS.ID is
/// set: returns its result and whether ID was still set after it. Returning through SYSRET
/// or IRET restores the caller's flags (the CPU saved them in R11), ID included; the guest
/// kernel's patch 0004, which completes a SYSCALL that arrived as a page fault at
/// `entry_SYSCALL_64`, keeps only the arithmetic flags, DF and AC of R11, so after it ID is
/// clear. ID is cleared again before returning.
pub fn syscall_getpid_keeps_eflags_id() -> (i64, bool) {
    let ret: i64;
    let flags: u64;
    // SAFETY: getpid writes no memory; the instruction clobbers RCX and R11 (declared), and the
    // pushes and pops are balanced on our own stack (no `nostack`). EFLAGS.ID changes nothing
    // but itself.
    unsafe {
        std::arch::asm!(
            "pushfq",
            "or qword ptr [rsp], 0x200000",
            "popfq",
            "syscall",
            "pushfq",
            "pop {flags}",
            "pushfq",
            "and qword ptr [rsp], -0x200001",
            "popfq",
            flags = out(reg) flags,
            inlateout("rax") libc::SYS_getpid => ret,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    (ret, flags & EFLAGS_ID != 0)
}

/// The 32-bit `getpid` (number 20) through `int $0x80`, with a DS prefix byte in front when
/// `prefixed` (`3E CD 80`: the same instruction on any x86 CPU). The guest kernel's patch 0005
/// runs a user `int $0x80` that arrives as #UD as the system call when the bytes at the
/// faulting address are `CD 80`; a #UD reported at the prefix does not match, so the prefixed
/// form gets SIGILL wherever `int $0x80` is not executed by the CPU.
pub fn int80_getpid(prefixed: bool) -> i64 {
    let ret: i32;
    // SAFETY: getpid writes no memory; the kernel's int $0x80 path preserves every register
    // but EAX, and R8-R11 are declared clobbered for older kernels that zeroed them.
    unsafe {
        if prefixed {
            std::arch::asm!(
                ".byte 0x3e, 0xcd, 0x80",
                inlateout("eax") 20i32 => ret,
                lateout("r8") _, lateout("r9") _, lateout("r10") _, lateout("r11") _,
                options(nostack),
            );
        } else {
            std::arch::asm!(
                "int 0x80",
                inlateout("eax") 20i32 => ret,
                lateout("r8") _, lateout("r9") _, lateout("r10") _, lateout("r11") _,
                options(nostack),
            );
        }
    }
    i64::from(ret)
}

/// Reads clock `clock` in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> io::Result<u64> {
    // SAFETY: timespec is plain data; clock_gettime(2) writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The resolution of clock `clock` in nanoseconds (a coarse clock's is the tick, 1/HZ).
pub fn clock_res_ns(clock: libc::clockid_t) -> io::Result<u64> {
    // SAFETY: timespec is plain data; clock_getres(2) writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_getres(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

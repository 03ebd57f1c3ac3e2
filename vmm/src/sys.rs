//! The VMM's `unsafe`, in one place: the system calls and KVM ioctls that neither `nix` nor
//! `kvm-ioctls` offer as safe functions. Each function here is safe to call; its `// SAFETY:`
//! comment says what makes it sound, and where that rests on how the VMM uses it, the doc
//! comment says so. Everything else in the VMM calls the OS through `nix` (mount, pivot_root,
//! unshare, setrlimit, prctl, signals, sockets, fcntl, read/write) or `kvm-ioctls`.
//!
//! A function added here keeps the seccomp allow-lists in mind (`seccomp.rs`): the thread
//! that calls it must be allowed the system call it makes.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_run, kvm_userspace_memory_region, kvm_xsave, KVM_EXIT_INTERNAL_ERROR};
use kvm_ioctls::{VcpuFd, VmFd};
use nix::sys::signal::{self, SigHandler, Signal};
use nix::unistd::{ForkResult, Pid};
use vm_memory::{Address, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress};

// ---- processes and signals ----------------------------------------------------------------

/// Errors of [`fork_single_threaded`].
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// The process has more than one thread: the child could deadlock on a lock another
    /// thread held at the fork.
    #[error("the process has {0} threads; fork needs exactly one")]
    Threads(usize),
    /// The threads could not be counted.
    #[error("cannot count the process's threads")]
    Count(#[source] io::Error),
    /// fork(2) failed.
    #[error(transparent)]
    Fork(nix::Error),
}

/// Forks the process, after checking that it has one thread (`/proc/self/task`).
pub fn fork_single_threaded() -> Result<ForkResult, ForkError> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(ForkError::Count)?
        .count();
    if threads != 1 {
        return Err(ForkError::Threads(threads));
    }
    // SAFETY: the process has one thread (checked just above, and no thread can be started
    // between the check and the fork but by this one), so no lock is held by a thread that
    // does not exist in the child; the child may allocate and make any system call.
    unsafe { nix::unistd::fork() }.map_err(ForkError::Fork)
}

/// Ends the process at once with `code`: no atexit handlers, no flushing of buffers (what a
/// forked child that failed does, so as not to run its parent's handlers twice).
pub fn exit_immediately(code: i32) -> ! {
    // SAFETY: _exit(2) takes a plain integer and does not return; it touches no memory of
    // the process.
    unsafe { libc::_exit(code) }
}

/// The process [`forward_signals`] forwards to.
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::Relaxed);
    if pid <= 0 {
        return;
    }
    if let Ok(signal) = Signal::try_from(signal) {
        // kill(2) is async-signal-safe; the atomic load above is lock-free.
        let _ = signal::kill(Pid::from_raw(pid), signal);
    }
}

/// Installs handlers that send each of `signals` on to `child` (the jail's supervisor
/// forwarding stop signals to the VMM).
pub fn forward_signals(child: Pid, signals: &[Signal]) -> nix::Result<()> {
    FORWARD_TO.store(child.as_raw(), Ordering::Relaxed);
    for s in signals {
        // SAFETY: the handler only loads an atomic and calls kill(2), both async-signal-safe;
        // it touches no other state of the process.
        unsafe { signal::signal(*s, SigHandler::Handler(forward)) }?;
    }
    Ok(())
}

/// Restores the default action of `signal` (before raising it at oneself).
pub fn default_signal_action(signal: Signal) -> nix::Result<()> {
    // SAFETY: the default action runs no code of this process, so no handler can observe
    // state that is being changed.
    unsafe { signal::signal(signal, SigHandler::SigDfl) }.map(drop)
}

/// Locks the securebits to `bits` (`prctl(PR_SET_SECUREBITS)`; `nix` has no wrapper).
pub fn set_securebits(bits: libc::c_ulong) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_SECUREBITS) takes a plain integer; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes a system call that no seccomp filter of the VMM allows (`reboot` with a wrong magic
/// number: harmless where it is let through, it fails with EINVAL or EPERM). A test hook.
pub fn forbidden_syscall() {
    // SAFETY: reboot(2) with a wrong magic number fails and has no other effect; no memory
    // is passed.
    unsafe { libc::syscall(libc::SYS_reboot, 0, 0, 0, 0) };
}

// ---- descriptors ---------------------------------------------------------------------------

/// Descriptor numbers [`take_inherited_fd`] has handed out.
static TAKEN: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Takes ownership of descriptor `fd`, which this process inherited (e.g. `--net-fd`). Refuses
/// the standard streams, a number that is not open, and a number taken before.
pub fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd <= 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is a standard stream"),
        ));
    }
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    if taken.contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} was taken before"),
        ));
    }
    // SAFETY: F_GETFD takes no memory and is harmless on any number.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "descriptor {fd} is close-on-exec: this process opened it, it was not inherited"
            ),
        ));
    }
    taken.push(fd);
    // SAFETY: `fd` is open and was inherited across exec(2): it is not close-on-exec, and
    // everything this process opens itself is (std, nix, kvm-ioctls and the signalfd ask for
    // it; the VMM takes its inherited descriptors at start-up, before it creates any
    // eventfd). std owns only 0–2 (refused above), and each number is handed out once
    // (`TAKEN`), so the OwnedFd is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Blocks until at least one of `fds` is readable or in an error or hang-up state; returns,
/// for each, whether it is. EINTR is retried.
pub fn wait_readable(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds for the duration of the
        // call; poll(2) only writes their `revents` (a number that is not open yields
        // POLLNVAL, no memory effect).
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if r > 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }
}

// ---- tun/tap -------------------------------------------------------------------------------

/// `struct ifreq` as the tun ioctls use it: the name, then the flags.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// The name and flags of the tun/tap device behind `fd` (`TUNGETIFF`).
pub fn tun_get_iff(fd: &OwnedFd) -> io::Result<(String, libc::c_int)> {
    use std::os::fd::AsRawFd;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: TUNGETIFF writes one `struct ifreq` (which `IfReq` lays out in full, 40 bytes)
    // into the buffer it is given; `req` lives for the call. On a descriptor that is not a
    // tun device the ioctl fails without writing.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = req
        .name
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(req.name.len());
    let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
    Ok((name, libc::c_int::from(req.flags)))
}

/// Sets the size of the virtio-net header the tap reads and writes (`TUNSETVNETHDRSZ`).
pub fn tun_set_vnet_hdr_size(fd: &OwnedFd, size: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid for the call.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETVNETHDRSZ,
            &size as *const libc::c_int,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the offloads the tap may hand over (`TUNSETOFFLOAD`, `TUN_F_*` flags).
pub fn tun_set_offload(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---- KVM -----------------------------------------------------------------------------------

/// Gives `region` of guest memory to KVM as memory slot `slot`.
///
/// The VM must not outlive the region's mapping, or the guest could reach whatever the host
/// maps at that address later: `Vm` keeps its memory in a field dropped after its `VmFd` and
/// vCPUs (and `RunningVm` joins the vCPU threads first).
pub fn register_memory_region(
    vm: &VmFd,
    slot: u32,
    region: &GuestRegionMmap,
) -> Result<(), kvm_ioctls::Error> {
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|_| kvm_ioctls::Error::new(libc::EFAULT))?;
    let desc = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: region.start_addr().raw_value(),
        memory_size: region.len(),
        userspace_addr: host as u64,
    };
    // SAFETY: the region is a live mapping of exactly `memory_size` bytes at
    // `userspace_addr` (both taken from the region itself), and it outlives the VM (see the
    // doc comment: the only caller registers the memory of the `Vm` that owns both).
    unsafe { vm.set_user_memory_region(desc) }
}

/// Writes a saved XSAVE area into a vCPU (`KVM_SET_XSAVE`).
pub fn set_xsave(fd: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: `xsave` is a whole `kvm_xsave` (4 KiB), all KVM reads unless the VM enabled
    // dynamic XSAVE features (AMX, KVM_CAP_XSAVE2) — which the VMM never does — so KVM reads
    // nothing past it.
    unsafe { fd.set_xsave(xsave) }
}

/// The suberror of a `KVM_EXIT_INTERNAL_ERROR` exit, `None` after any other exit.
pub fn internal_error_suberror(run: &kvm_run) -> Option<u32> {
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return None;
    }
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills the `internal`
    // member of the exit union; every bit pattern is a valid u32.
    Some(unsafe { run.__bindgen_anon_1.internal.suberror })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::fd::{AsRawFd, IntoRawFd};

    use super::*;

    #[test]
    fn only_inherited_descriptors_are_taken_once() {
        assert!(take_inherited_fd(1).is_err());
        // std opens close-on-exec: never inherited.
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(take_inherited_fd(file.as_raw_fd()).is_err());
        // pipe(2) without O_CLOEXEC, as an inherited descriptor is.
        let (read, write) = nix::unistd::pipe().unwrap();
        let raw = read.into_raw_fd();
        let owned = take_inherited_fd(raw).unwrap();
        assert_eq!(owned.as_raw_fd(), raw);
        assert!(take_inherited_fd(raw).is_err());
        nix::unistd::write(&write, b"x").unwrap();
        assert_eq!(wait_readable(&[raw]).unwrap(), vec![true]);
    }

    #[test]
    fn fork_refuses_a_process_with_threads() {
        // The test harness runs tests on threads of their own.
        let _other = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(1)));
        assert!(matches!(
            fork_single_threaded(),
            Err(ForkError::Threads(n)) if n > 1
        ));
    }
}

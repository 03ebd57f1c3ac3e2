//! SIGCHLD on a signalfd, and reaping: as PID 1 the agent inherits every orphan of the guest.

use std::io;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Blocks SIGCHLD in the calling thread, and so in every thread it spawns afterwards: call it
/// before any thread starts, then [`ChildReaper`] receives the signal through a signalfd.
pub fn block_sigchld() -> io::Result<()> {
    sigchld_set().thread_block()?;
    Ok(())
}

fn sigchld_set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set
}

/// Waits for SIGCHLD (blocked with [`block_sigchld`]) on a signalfd and reaps every child that
/// exited: as PID 1 the agent inherits every orphan of the guest.
#[derive(Debug)]
pub struct ChildReaper {
    fd: SignalFd,
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
        let fd = SignalFd::with_flags(&sigchld_set(), SfdFlags::SFD_CLOEXEC)?;
        Ok(ChildReaper { fd })
    }

    /// Blocks until SIGCHLD arrives, then reaps every exited child and returns them.
    pub fn wait(&self) -> io::Result<Vec<Reaped>> {
        match self.fd.read_signal() {
            Ok(_) | Err(Errno::EINTR) => Ok(reap_exited()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Reaps every child that has exited, without blocking (signals coalesce: one SIGCHLD may stand
/// for many exits). Raw waitpid(2): the containers record the raw wait status.
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

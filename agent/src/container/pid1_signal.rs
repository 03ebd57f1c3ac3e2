//! Signals to a container's init that is PID 1 of its own PID namespace.
//!
//! The kernel drops a signal sent to a namespace's PID 1 from outside when PID 1 has no handler
//! for it (SIGKILL and SIGSTOP aside): its default action never runs. Under runc a program
//! installs its handlers microseconds after StartContainer; in a guest whose kernel is emulated
//! that window is seconds long (the exec, the dynamic loader, the program's own start), and a
//! StopContainer right after StartContainer lost its SIGTERM and waited out the whole grace
//! period. So a signal that init does not handle *yet* is held back and delivered as soon as
//! init has a handler for it (or ignores it), checked every [`POLL`], for at most
//! [`DEFER_FOR`]; then it is sent anyway (and dropped by the kernel, as under runc).

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::sys as syscall;

/// The longest a signal waits for init's handler.
pub const DEFER_FOR: Duration = Duration::from_secs(20);
/// How often init's handlers are checked meanwhile.
const POLL: Duration = Duration::from_millis(100);

/// What a process does with a signal, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// A handler is installed.
    Caught,
    /// `SIG_IGN`.
    Ignored,
    /// `SIG_DFL`: dropped if the process is a namespace's PID 1.
    Default,
}

/// The disposition of `signal` in a `/proc/<pid>/status` text; `None` if the masks are missing.
pub fn disposition(status: &str, signal: Signal) -> Option<Disposition> {
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    let bit = 1u64 << ((signal as i32) - 1);
    let (caught, ignored) = (mask("SigCgt:")?, mask("SigIgn:")?);
    Some(if caught & bit != 0 {
        Disposition::Caught
    } else if ignored & bit != 0 {
        Disposition::Ignored
    } else {
        Disposition::Default
    })
}

fn current(pid: Pid, signal: Signal) -> Option<Disposition> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    disposition(&status, signal)
}

/// Whether `signal` to PID 1 `pid` must wait for a handler: it is not SIGKILL or SIGSTOP and
/// init leaves it at its default.
pub fn must_wait(pid: Pid, signal: Signal) -> bool {
    !matches!(signal, Signal::SIGKILL | Signal::SIGSTOP)
        && current(pid, signal) == Some(Disposition::Default)
}

/// Sends `signal` through `pidfd` (init `pid`) from a thread of its own once init handles or
/// ignores it, or after [`DEFER_FOR`]; stops early if init exits.
pub fn deliver_when_handled(pidfd: OwnedFd, pid: Pid, signal: Signal) {
    let spawned = std::thread::Builder::new()
        .name(format!("signal-{pid}"))
        .spawn(move || {
            let started = Instant::now();
            while started.elapsed() < DEFER_FOR {
                match current(pid, signal) {
                    Some(Disposition::Default) => std::thread::sleep(POLL),
                    // Handled, ignored, or gone (a reused PID is caught by the pidfd below).
                    _ => break,
                }
            }
            let waited = started.elapsed();
            match syscall::pidfd_send_signal(pidfd.as_fd(), signal as libc::c_int) {
                Ok(()) => log::debug!(
                    "{signal} delivered to init (pid {pid}) after {:.2} s",
                    waited.as_secs_f64()
                ),
                Err(e) => log::debug!("{signal} to init (pid {pid}): {e}"),
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot defer {signal} to init (pid {pid}): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_of_proc_status_are_read() {
        let status = "Name:\tsh\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000004\n\
                      SigCgt:\t0000000000004002\n";
        // SIGINT (2) caught, SIGQUIT (3) ignored, SIGTERM (15) caught, SIGUSR1 (10) default.
        assert_eq!(
            disposition(status, Signal::SIGINT),
            Some(Disposition::Caught)
        );
        assert_eq!(
            disposition(status, Signal::SIGQUIT),
            Some(Disposition::Ignored)
        );
        assert_eq!(
            disposition(status, Signal::SIGTERM),
            Some(Disposition::Caught)
        );
        assert_eq!(
            disposition(status, Signal::SIGUSR1),
            Some(Disposition::Default)
        );
        assert_eq!(disposition("Name:\tx\n", Signal::SIGTERM), None);
    }
}

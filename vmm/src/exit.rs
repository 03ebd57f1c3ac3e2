//! Why a VM stopped, and the one place every thread reports it.

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (exit port value 0).
    PowerOff,
    /// The guest rebooted (i8042 reset or a KVM reset event): a microVM stops instead.
    Reset,
    /// The guest kernel panicked (exit port value 1, or a KVM crash event).
    GuestPanic,
    /// The VMM was asked to stop (a signal or its owner).
    Stopped(String),
    /// A vCPU hit a triple fault.
    TripleFault {
        /// The vCPU.
        vcpu: u8,
    },
    /// KVM could not run or emulate the guest.
    KvmError {
        /// The vCPU.
        vcpu: u8,
        /// What happened.
        detail: String,
    },
}

impl VmExit {
    /// Whether the stop is a clean one (the guest or the VMM's owner asked for it).
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::PowerOff | VmExit::Reset | VmExit::Stopped(_))
    }

    /// The process exit status `nutshell-vmm` reports for this stop.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmExit::PowerOff | VmExit::Reset | VmExit::Stopped(_) => 0,
            VmExit::GuestPanic => 2,
            VmExit::TripleFault { .. } | VmExit::KvmError { .. } => 1,
        }
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Reset => write!(f, "guest rebooted (a microVM stops on reboot)"),
            VmExit::GuestPanic => write!(f, "guest kernel panicked"),
            VmExit::Stopped(why) => write!(f, "stopped: {why}"),
            VmExit::TripleFault { vcpu } => write!(f, "vCPU {vcpu}: triple fault"),
            VmExit::KvmError { vcpu, detail } => write!(f, "vCPU {vcpu}: {detail}"),
        }
    }
}

/// Shared by the vCPU threads, devices and the VMM's owner: the first reason wins, and the
/// event wakes whoever waits for the VM to stop.
#[derive(Debug)]
pub struct ExitHandle {
    requested: AtomicBool,
    reason: Mutex<Option<VmExit>>,
    event: EventFd,
}

impl ExitHandle {
    /// A new handle, with no reason yet.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(ExitHandle {
            requested: AtomicBool::new(false),
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// Asks the VM to stop for `reason`, unless it is already stopping.
    pub fn request(&self, reason: VmExit) {
        let mut current = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if current.is_none() {
            log::debug!("exit requested: {reason}");
            *current = Some(reason);
            self.requested.store(true, Ordering::Release);
            // A full eventfd counter only means the waiter is already woken.
            let _ = self.event.write(1);
        }
    }

    /// The reason, once one was requested.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a stop was requested.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }
}

impl AsRawFd for ExitHandle {
    /// Readable once a stop was requested.
    fn as_raw_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let h = ExitHandle::new().unwrap();
        assert!(!h.is_requested());
        h.request(VmExit::PowerOff);
        h.request(VmExit::GuestPanic);
        assert_eq!(h.reason(), Some(VmExit::PowerOff));
        assert_eq!(h.event.read().unwrap(), 1);
    }

    #[test]
    fn exit_codes_separate_clean_panic_and_error() {
        assert_eq!(VmExit::Reset.exit_code(), 0);
        assert_eq!(VmExit::GuestPanic.exit_code(), 2);
        assert_eq!(VmExit::TripleFault { vcpu: 0 }.exit_code(), 1);
        assert!(!VmExit::GuestPanic.is_clean());
    }
}

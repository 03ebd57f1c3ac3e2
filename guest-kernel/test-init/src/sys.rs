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

/// Flushes file system buffers.
pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
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

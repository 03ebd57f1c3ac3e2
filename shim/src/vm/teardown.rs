//! Ending a VMM and removing its sandbox directory (with whatever is mounted under it).

use std::path::Path;
use std::time::Duration;

use super::ExitCell;

/// The children of process `pid` (a jailed VMM's supervisor has one: the VMM).
pub fn children_of(pid: libc::pid_t) -> Vec<libc::pid_t> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| *p > 1)
        .collect()
}

/// SIGKILLs a VMM: the jailed VMM (the supervisor's child; it would also die with its
/// supervisor) first, then the process the shim spawned.
pub fn kill_vmm(pid: libc::pid_t) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for child in children_of(pid) {
        let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
        if comm.trim() == "nutshell-vmm" {
            let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
        }
    }
    // The caller checked that `pid` is the VMM.
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// SIGKILLs the VMM unless it exited, and waits for the reaper to report it.
pub(super) fn kill_and_wait(pid: u32, exit: &ExitCell) {
    if exit.get().is_some() {
        return;
    }
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // `pid` is our child, not yet reported reaped.
        kill_vmm(pid);
    }
    if exit.wait_timeout(Duration::from_secs(10)).is_none() {
        log::error!("VMM pid {pid} not reaped 10 s after SIGKILL");
    }
}

/// How many rounds of unmounting [`remove_sandbox_dir`] tries: mounts can be stacked (the
/// jailed VMM binds the shared directory over itself, the shim mounts root filesystems
/// beneath), and one round may leave a mount that was under another.
const UNMOUNT_ROUNDS: usize = 8;

/// Mount points at or under `dir`, from this process's mountinfo.
fn mounts_under(dir: &Path) -> usize {
    nutshell_protocol::mountinfo::mount_points()
        .unwrap_or_default()
        .iter()
        .filter(|m| m.starts_with(dir))
        .count()
}

/// Unmounts everything under `dir` (deepest first, lazily, again until nothing is mounted
/// there) and removes it.
pub fn remove_sandbox_dir(dir: &Path) {
    let Some(d) = dir.to_str() else { return };
    for _ in 0..UNMOUNT_ROUNDS {
        if mounts_under(dir) == 0 {
            break;
        }
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(d), libc::MNT_DETACH) {
            log::warn!("unmount under {d}: {e}");
        }
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("remove {d}: {e}");
        }
    }
}

//! A node-wide bound on VMs in their start-up at once.
//!
//! Starting a pod's VM (restore or boot, the agent's sandbox set-up, the first container's
//! create) is CPU-bound work in the guest kernel. Past the host's CPU count, more VMs starting
//! at once do not finish sooner: they share the CPUs, and each busy guest also pays its timer
//! ticks in wall-clock time. On a host where guest kernel mode is emulated (kvm_pvm) a tick
//! costs milliseconds, and 16 VMs starting on 2 CPUs spent nearly all their time in ticks: none
//! got its first container created within 5 minutes. With at most as many starting VMs as
//! CPUs, the others wait (cheaply) for a slot and each start runs at close to full speed.
//!
//! The slots are `flock`s on files `slot-<i>` in `<run_dir>/start-slots/`, shared by every shim
//! on the node; a shim that dies releases its slot with its descriptor.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Result, ShimError};

/// The directory under `run_dir` that holds the slot files.
pub const SLOTS_DIR: &str = "start-slots";

/// How often a waiting shim looks for a free slot.
const POLL: Duration = Duration::from_millis(25);

/// A wait longer than this is logged.
const LOG_WAIT: Duration = Duration::from_millis(50);

/// A held slot; released when dropped.
#[derive(Debug)]
pub struct StartSlot {
    file: File,
}

impl Drop for StartSlot {
    fn drop(&mut self) {
        // Closing the file would release the lock too; this only makes the release explicit.
        let _ = self.file.unlock();
    }
}

/// Takes one of `slots` start slots in `run_dir` for sandbox `id`, waiting up to `timeout` for
/// one to be free. `slots == 0` means no bound: `Ok(None)` at once.
pub fn acquire(
    run_dir: &Path,
    slots: u32,
    timeout: Duration,
    id: &str,
) -> Result<Option<StartSlot>> {
    if slots == 0 {
        return Ok(None);
    }
    let dir = run_dir.join(SLOTS_DIR);
    std::fs::create_dir_all(&dir).map_err(ShimError::io(format!("create {}", dir.display())))?;
    let mut files = (0..slots as usize)
        .map(|i| open_slot(&slot_path(&dir, i)))
        .collect::<Result<Vec<File>>>()?;
    let started = Instant::now();
    loop {
        for index in 0..files.len() {
            if try_lock(&files[index], &slot_path(&dir, index))? {
                let waited = started.elapsed();
                if waited > LOG_WAIT {
                    log::info!(
                        "sandbox {id}: waited {:.2} s for start slot {index} of {slots}",
                        waited.as_secs_f64()
                    );
                }
                return Ok(Some(StartSlot {
                    file: files.swap_remove(index),
                }));
            }
        }
        if started.elapsed() >= timeout {
            return Err(ShimError::Vm {
                id: id.to_owned(),
                message: format!(
                    "no VM start slot free within {timeout:?}: {slots} other VMs were starting \
                     on this node all that time (max_starting_vms = {slots})"
                ),
            });
        }
        std::thread::sleep(POLL);
    }
}

fn slot_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("slot-{index}"))
}

fn open_slot(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(ShimError::io(format!("open {}", path.display())))
}

/// An exclusive lock without waiting (`File::try_lock`, a `flock` on Linux): whether this
/// process now holds it.
fn try_lock(file: &File, path: &Path) -> Result<bool> {
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(true),
            Err(TryLockError::WouldBlock) => return Ok(false),
            Err(TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(TryLockError::Error(e)) => {
                return Err(ShimError::io(format!("flock {}", path.display()))(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn zero_slots_is_no_bound() {
        let dir = tempfile::tempdir().unwrap();
        assert!(acquire(dir.path(), 0, Duration::ZERO, "p")
            .unwrap()
            .is_none());
        assert!(!dir.path().join(SLOTS_DIR).exists());
    }

    #[test]
    fn slots_are_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        // Two callers at once, neither waiting: each holds a slot of its own.
        let a = acquire(dir.path(), 2, Duration::ZERO, "p").unwrap();
        let b = acquire(dir.path(), 2, Duration::ZERO, "p").unwrap();
        assert!(a.is_some() && b.is_some());
        // Both taken: a third caller times out with an error that names the setting.
        let e = acquire(dir.path(), 2, Duration::from_millis(60), "p").unwrap_err();
        assert!(e.to_string().contains("max_starting_vms = 2"), "{e}");
        drop(a);
        assert!(acquire(dir.path(), 2, Duration::ZERO, "p")
            .unwrap()
            .is_some());
        drop(b);
    }

    #[test]
    fn a_waiter_gets_the_slot_when_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let held = acquire(dir.path(), 1, Duration::ZERO, "p")
            .unwrap()
            .unwrap();
        let path = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let started = Instant::now();
            let slot = acquire(&path, 1, Duration::from_secs(10), "p").unwrap();
            (slot.is_some(), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(200));
        drop(held);
        let (got, waited) = waiter.join().unwrap();
        assert!(got);
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
    }
}

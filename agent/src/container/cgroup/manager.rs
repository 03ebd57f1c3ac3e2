//! The cgroup directory itself: create, open, processes, freeze, kill, remove, and the file
//! helpers the other parts use.

use std::collections::HashMap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use super::parse::{
    cut, parse_controllers, parse_flat_keyed, parse_max, parse_procs, parse_single_u64,
};
use super::{Cgroup, CgroupError, FREEZE_TIMEOUT, REMOVE_TIMEOUT, WANTED_CONTROLLERS};

/// Checks a relative cgroup path (OCI `cgroupsPath`; a leading `/` means "from the root"):
/// normal components only, no `..`, not empty.
pub fn validate_rel_path(rel: &Path) -> Result<PathBuf, CgroupError> {
    let invalid = |reason| CgroupError::InvalidPath {
        path: rel.to_path_buf(),
        reason,
    };
    let mut clean = PathBuf::new();
    for component in rel.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(name) => clean.push(name),
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(invalid("only plain names are allowed (no '.' or '..')"))
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(invalid("the root cgroup cannot be a container's"));
    }
    Ok(clean)
}

impl Cgroup {
    /// Creates the cgroup `rel` under `root` (and the missing directories between), enabling
    /// [`WANTED_CONTROLLERS`] that the kernel offers in each parent's `cgroup.subtree_control`.
    /// An existing cgroup is reused. A controller that cannot be enabled is logged, not fatal:
    /// [`Cgroup::apply`] then fails for a resource that needs it.
    pub fn create(root: &Path, rel: &Path) -> Result<Self, CgroupError> {
        let rel = validate_rel_path(rel)?;
        let mut dir = root.to_path_buf();
        for component in rel.components() {
            enable_controllers(&dir)?;
            dir.push(component);
            match std::fs::create_dir(&dir) {
                Ok(()) => log::debug!("created cgroup {}", dir.display()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(CgroupError::Mkdir { path: dir, source }),
            }
        }
        Ok(Cgroup { path: dir })
    }

    /// Creates `rel` under `root` as [`Cgroup::create`] does and enables the wanted controllers
    /// in it as well, so that its children need only their directory ([`Cgroup::child`]). The
    /// agent prepares the containers' parent so at boot: a template's snapshot holds it, and
    /// each container's cgroup costs one `mkdir` instead of two with the controllers' files
    /// (each is emulated kernel work in a guest here).
    pub fn create_parent(root: &Path, rel: &Path) -> Result<Self, CgroupError> {
        let parent = Self::create(root, rel)?;
        enable_controllers(&parent.path)?;
        Ok(parent)
    }

    /// Creates (or reuses) the child `name` of this cgroup, which [`Cgroup::create_parent`]
    /// made: only its directory. `name` is one plain name.
    pub fn child(&self, name: &str) -> Result<Self, CgroupError> {
        let rel = validate_rel_path(Path::new(name))?;
        if rel.components().count() != 1 || name.contains('/') {
            return Err(CgroupError::InvalidPath {
                path: PathBuf::from(name),
                reason: "a child cgroup is one plain name",
            });
        }
        let dir = self.path.join(rel);
        match std::fs::create_dir(&dir) {
            Ok(()) => log::debug!("created cgroup {}", dir.display()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Mkdir { path: dir, source }),
        }
        Ok(Cgroup { path: dir })
    }

    /// An existing cgroup `rel` under `root` (for a container created earlier).
    pub fn open(root: &Path, rel: &Path) -> Result<Self, CgroupError> {
        let path = root.join(validate_rel_path(rel)?);
        if !path.is_dir() {
            return Err(CgroupError::Read {
                path,
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        Ok(Cgroup { path })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The controllers enabled for this cgroup (its `cgroup.controllers`).
    pub fn controllers(&self) -> Result<Vec<String>, CgroupError> {
        let file = self.path.join("cgroup.controllers");
        parse_controllers(&read(&file)?).map_err(|source| CgroupError::Parse { path: file, source })
    }

    /// Moves a process into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// The PIDs in this cgroup (not its descendants).
    pub fn procs(&self) -> Result<Vec<u32>, CgroupError> {
        let file = self.path.join("cgroup.procs");
        parse_procs(&read(&file)?).map_err(|source| CgroupError::Parse { path: file, source })
    }

    /// The PIDs in this cgroup and every cgroup beneath it (a container may make its own).
    pub fn procs_recursive(&self) -> Result<Vec<u32>, CgroupError> {
        let mut pids = self.procs()?;
        let mut dirs = vec![self.path.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let sub = Cgroup { path: e.path() };
                    // A child cgroup removed meanwhile is simply gone.
                    pids.extend(sub.procs().unwrap_or_default());
                    dirs.push(sub.path);
                }
            }
        }
        Ok(pids)
    }

    /// `cgroup.events` as key → value (`populated`, `frozen`).
    pub fn events(&self) -> Result<HashMap<String, u64>, CgroupError> {
        self.read_flat("cgroup.events")
    }

    /// Freezes every process of the cgroup and its descendants; returns once `cgroup.events`
    /// says `frozen 1`, or fails after [`FREEZE_TIMEOUT`].
    pub fn freeze(&self) -> Result<(), CgroupError> {
        self.write("cgroup.freeze", "1")?;
        self.wait_frozen(true, FREEZE_TIMEOUT)
    }

    /// Thaws the cgroup; returns once `cgroup.events` says `frozen 0`.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        self.write("cgroup.freeze", "0")?;
        self.wait_frozen(false, FREEZE_TIMEOUT)
    }

    /// Waits until `frozen` of `cgroup.events` is `want`, with a growing sleep (1 ms → 50 ms):
    /// each read is a syscall, and syscalls are expensive in a guest under nested KVM.
    pub fn wait_frozen(&self, want: bool, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if self.events()?.get("frozen").copied().unwrap_or(0) == u64::from(want) {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(CgroupError::FreezeTimeout {
                    path: self.path.clone(),
                    timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Sends SIGKILL to every process of the cgroup and its descendants (`cgroup.kill`, Linux
    /// 5.14+). Returns at once; the processes exit asynchronously.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.write("cgroup.kill", "1")
    }

    /// Removes the cgroup directory, retrying for [`REMOVE_TIMEOUT`] while it is busy (killed
    /// processes still exiting). Kill them first ([`Cgroup::kill_all`]). Already gone is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.remove_within(REMOVE_TIMEOUT)
    }

    /// [`Cgroup::remove`] with another retry budget.
    pub fn remove_within(&self, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => {
                    log::debug!("removed cgroup {}", self.path.display());
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if start.elapsed() >= timeout {
                        return Err(CgroupError::Busy {
                            path: self.path.clone(),
                            timeout,
                        });
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(CgroupError::Rmdir {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
    }

    pub(super) fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.path.join(file);
        write(&path, value)
    }

    pub(super) fn read_u64(&self, file: &str) -> Result<u64, CgroupError> {
        let path = self.path.join(file);
        parse_single_u64(&read(&path)?).map_err(|source| CgroupError::Parse { path, source })
    }

    pub(super) fn read_max(&self, file: &str) -> Result<Option<u64>, CgroupError> {
        let path = self.path.join(file);
        parse_max(&read(&path)?).map_err(|source| CgroupError::Parse { path, source })
    }

    pub(super) fn read_flat(&self, file: &str) -> Result<HashMap<String, u64>, CgroupError> {
        let path = self.path.join(file);
        parse_flat_keyed(&read(&path)?).map_err(|source| CgroupError::Parse { path, source })
    }

    pub(super) fn read_flat_opt(
        &self,
        file: &str,
    ) -> Result<Option<HashMap<String, u64>>, CgroupError> {
        let path = self.path.join(file);
        match self.read_opt(file)? {
            None => Ok(None),
            Some(content) => parse_flat_keyed(&content)
                .map(Some)
                .map_err(|source| CgroupError::Parse { path, source }),
        }
    }

    /// Reads a file that exists only with some controller: `None` when it does not.
    pub(super) fn read_opt(&self, file: &str) -> Result<Option<String>, CgroupError> {
        let path = self.path.join(file);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CgroupError::Read { path, source }),
        }
    }
}

pub(super) fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// One write(2) of the whole value, without creating the file: cgroup files take a value per
/// write, and a missing file means a missing controller, not a file to make.
pub(super) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    use std::io::Write as _;
    let result = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    result.map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: cut(value),
        source,
    })
}

/// Enables in `dir`'s `cgroup.subtree_control` the [`WANTED_CONTROLLERS`] that `dir` has and
/// that are not enabled yet: all at once, then one by one if the kernel refused the set (one
/// controller may be refused, e.g. cpuset when the parent's cpuset is empty).
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available_file = dir.join("cgroup.controllers");
    let available =
        parse_controllers(&read(&available_file)?).map_err(|source| CgroupError::Parse {
            path: available_file,
            source,
        })?;
    let enabled_file = dir.join("cgroup.subtree_control");
    let enabled =
        parse_controllers(&read(&enabled_file)?).map_err(|source| CgroupError::Parse {
            path: enabled_file.clone(),
            source,
        })?;
    let missing: Vec<&str> = WANTED_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| available.iter().any(|a| a == c) && !enabled.iter().any(|e| e == c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let all = missing
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    if write(&enabled_file, &all).is_ok() {
        return Ok(());
    }
    for c in missing {
        if let Err(e) = write(&enabled_file, &format!("+{c}")) {
            log::warn!("controller {c} not enabled in {}: {e}", dir.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn rel_paths_are_strict() {
        assert_eq!(
            validate_rel_path(Path::new("pod/ctr")).unwrap(),
            Path::new("pod/ctr")
        );
        assert_eq!(
            validate_rel_path(Path::new("/pod/ctr")).unwrap(),
            Path::new("pod/ctr")
        );
        assert!(validate_rel_path(Path::new("pod/../../etc")).is_err());
        assert!(validate_rel_path(Path::new("./pod")).is_err());
        assert!(validate_rel_path(Path::new("/")).is_err());
        assert!(validate_rel_path(Path::new("")).is_err());
    }
}

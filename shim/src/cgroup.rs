//! The pod's cgroup on the host: where the VMM process runs, so that the node's accounting and
//! limits (kubelet's pod cgroup above it) apply to the whole microVM.
//!
//! containerd passes the cgroup in the OCI spec of the sandbox (`linux.cgroupsPath`), in one of
//! two forms:
//! - a path, `/k8s.io/<id>` or `/kubepods/besteffort/pod<uid>/<id>` (cgroupfs driver), taken
//!   relative to the root of every hierarchy (a relative path is taken the same way);
//! - systemd's `slice:prefix:name`, e.g. `kubepods-besteffort-pod1.slice:cri-containerd:<id>`,
//!   expanded as runc does (`kubepods.slice/kubepods-besteffort.slice/…/cri-containerd-<id>.scope`).
//!   The directories are made directly in cgroupfs; the scope is not registered with systemd.
//!
//! cgroups v1 (this development machine): one directory per controller hierarchy that Nutshell
//! accounts in (`cpu`, `cpuacct`, `memory`, `pids`; comounted ones count once). v2: one directory
//! in the unified tree. Missing directories are created and remembered; [`PodCgroup::remove`]
//! removes exactly those (deepest first, each only if empty: `rmdir` of a cgroup with a process
//! or a child fails), so no cgroup the shim made is left behind and none it did not make is
//! touched.
//!
//! The VMM enters the cgroup before it runs a single instruction of its own: the shim opens each
//! `cgroup.procs` before the fork and the child writes `0` (itself) into them before `exec`.

use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// The controllers whose v1 hierarchies the VMM joins.
pub const V1_CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];

/// Where the cgroup file systems are mounted.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// The file listing the directories a sandbox's shim created (one a line), in the sandbox
/// directory, so that `delete` after a dead shim can remove them too.
pub const CREATED_LIST: &str = "cgroups";

/// Errors of the pod cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `linux.cgroupsPath` is not a path or slice this module accepts.
    #[error("invalid cgroupsPath {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// No cgroup hierarchy was found under the root.
    #[error(
        "no cgroup hierarchy under {0} (neither cgroup2 nor a v1 controller of {V1_CONTROLLERS:?})"
    )]
    NoHierarchy(PathBuf),
    /// A cgroup directory could not be created.
    #[error("cannot create cgroup {path}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A `cgroup.procs` file could not be opened.
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How the cgroup file systems are laid out under the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cgroups v1: the root of each hierarchy to join (deduplicated).
    V1(Vec<PathBuf>),
    /// cgroups v2: the unified root.
    V2(PathBuf),
}

impl Layout {
    /// Detects the layout under `root` (normally [`DEFAULT_ROOT`]): cgroup2 when the root has
    /// `cgroup.controllers`, else the v1 hierarchies of [`V1_CONTROLLERS`] that are mounted
    /// (a hybrid machine's `unified` mount is not used: the controllers are on v1 there).
    pub fn detect(root: &Path) -> Result<Layout, CgroupError> {
        if root.join("cgroup.controllers").is_file() {
            return Ok(Layout::V2(root.to_owned()));
        }
        let mut hierarchies: Vec<PathBuf> = Vec::new();
        for controller in V1_CONTROLLERS {
            let dir = root.join(controller);
            // `cpu` and `cpuacct` are often one hierarchy (`cpu,cpuacct` with two symlinks).
            let Ok(real) = dir.canonicalize() else {
                log::debug!("cgroup v1 controller {controller} is not mounted");
                continue;
            };
            if real.join("cgroup.procs").is_file() && !hierarchies.contains(&real) {
                hierarchies.push(real);
            }
        }
        if hierarchies.is_empty() {
            return Err(CgroupError::NoHierarchy(root.to_owned()));
        }
        Ok(Layout::V1(hierarchies))
    }

    /// The hierarchy roots.
    fn roots(&self) -> Vec<&Path> {
        match self {
            Layout::V1(h) => h.iter().map(PathBuf::as_path).collect(),
            Layout::V2(root) => vec![root.as_path()],
        }
    }
}

/// `linux.cgroupsPath` as a path relative to each hierarchy's root.
pub fn parse_cgroups_path(path: &str) -> Result<PathBuf, CgroupError> {
    let invalid = |reason| CgroupError::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    if path.contains('\0') || path.contains('\n') {
        return Err(invalid("control characters"));
    }
    let rel = if path.contains(':') {
        systemd_path(path).ok_or_else(|| invalid("not of the form slice:prefix:name"))?
    } else {
        PathBuf::from(path.trim_start_matches('/'))
    };
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return Err(invalid("only plain names are allowed between slashes")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(invalid("the root cgroup is not a pod's"));
    }
    Ok(out)
}

/// systemd's `slice:prefix:name` as cgroupfs directories: each dash of the slice name is one
/// level (`a-b-c.slice` → `a.slice/a-b.slice/a-b-c.slice`), the unit is `prefix-name.scope`
/// (a name that is itself a `.slice` stays as it is).
fn systemd_path(path: &str) -> Option<PathBuf> {
    let mut parts = path.split(':');
    let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || name.is_empty() || name.contains('/') || prefix.contains('/') {
        return None;
    }
    let mut out = PathBuf::new();
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    if slice != "-.slice" {
        let stem = slice.strip_suffix(".slice")?;
        if stem.is_empty() || stem.contains('/') || stem.starts_with('-') || stem.ends_with('-') {
            return None;
        }
        let mut prefix_so_far = String::new();
        for part in stem.split('-') {
            if part.is_empty() {
                return None;
            }
            if !prefix_so_far.is_empty() {
                prefix_so_far.push('-');
            }
            prefix_so_far.push_str(part);
            out.push(format!("{prefix_so_far}.slice"));
        }
    }
    if name.ends_with(".slice") {
        out.push(name);
    } else if prefix.is_empty() {
        out.push(format!("{name}.scope"));
    } else {
        out.push(format!("{prefix}-{name}.scope"));
    }
    Some(out)
}

/// The pod's cgroup: one directory per hierarchy, and the ones this shim created.
#[derive(Debug)]
pub struct PodCgroup {
    dirs: Vec<PathBuf>,
    created: Vec<PathBuf>,
}

impl PodCgroup {
    /// Makes sure `rel` exists in every hierarchy of `layout`, creating what is missing.
    /// On failure, what was created is removed again.
    pub fn create(layout: &Layout, rel: &Path) -> Result<PodCgroup, CgroupError> {
        let mut cgroup = PodCgroup {
            dirs: Vec::new(),
            created: Vec::new(),
        };
        for root in layout.roots() {
            let dir = root.join(rel);
            if let Err(e) = cgroup.make(root, rel) {
                cgroup.remove();
                return Err(e);
            }
            cgroup.dirs.push(dir);
        }
        if let Layout::V2(root) = layout {
            enable_v2_controllers(root, rel);
        }
        if cgroup.created.is_empty() {
            log::info!("cgroup {} exists; the VMM joins it", rel.display());
        } else {
            log::info!("created cgroup {:?} for the VMM", cgroup.created);
        }
        Ok(cgroup)
    }

    /// Creates `root/rel` level by level, recording each directory it made. A parent removed
    /// concurrently (another pod's teardown of a shared parent) is made again, a few times.
    fn make(&mut self, root: &Path, rel: &Path) -> Result<(), CgroupError> {
        let mut attempt = 0;
        'again: loop {
            attempt += 1;
            let mut dir = root.to_owned();
            for part in rel.components() {
                dir.push(part);
                match std::fs::create_dir(&dir) {
                    Ok(()) => self.created.push(dir.clone()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < 5 => {
                        continue 'again;
                    }
                    Err(source) => return Err(CgroupError::Create { path: dir, source }),
                }
            }
            return Ok(());
        }
    }

    /// The pod's directory in each hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The directories this shim created, parents first.
    pub fn created(&self) -> &[PathBuf] {
        &self.created
    }

    /// Opens every `cgroup.procs` of the pod for writing. A process that writes `0` into each
    /// (see [`join_self`]) moves itself into the pod's cgroup.
    pub fn procs_files(&self) -> Result<Vec<File>, CgroupError> {
        self.dirs
            .iter()
            .map(|d| {
                let path = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|source| CgroupError::Open { path, source })
            })
            .collect()
    }

    /// Removes the directories this shim created, deepest first, each only if it is empty;
    /// a cgroup whose last process just exited may stay busy for a moment, so this retries
    /// for up to a second. What cannot be removed is logged and left.
    pub fn remove(&mut self) {
        remove_created(&std::mem::take(&mut self.created));
    }
}

/// Removes `created` (parents first in the list), deepest first, each only if empty.
pub fn remove_created(created: &[PathBuf]) {
    for dir in created.iter().rev() {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => {
                    log::info!("removed cgroup {}", dir.display());
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                // EBUSY: a process or a child cgroup is still in it.
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    log::warn!("cgroup {} left in place: {e}", dir.display());
                    break;
                }
            }
        }
    }
}

/// Writes the list of created directories to `file`.
pub fn save_created(file: &Path, created: &[PathBuf]) -> io::Result<()> {
    let mut text = String::new();
    for dir in created {
        text.push_str(&dir.to_string_lossy());
        text.push('\n');
    }
    std::fs::write(file, text)
}

/// Reads a list written by [`save_created`]; only absolute paths below `root` are kept (the
/// file lives in the shim's own run directory, but a stray line must not reach elsewhere).
pub fn load_created(file: &Path, root: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(PathBuf::from)
        .filter(|p| {
            p.is_absolute()
                && p.starts_with(root)
                && p.components().all(|c| !matches!(c, Component::ParentDir))
        })
        .collect()
}

/// In a forked child before `exec`: writes `0` (the calling process) into each of `procs`.
/// Only async-signal-safe calls (`write(2)`).
pub fn join_self(procs: &[std::os::fd::RawFd]) -> io::Result<()> {
    for fd in procs {
        if crate::sys::write_raw(*fd, b"0")? != 1 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
    }
    Ok(())
}

/// cgroup v2: enables the controllers the pod accounts in for the new levels (best effort:
/// a parent with processes of its own cannot delegate, and the VMM still joins the cgroup).
fn enable_v2_controllers(root: &Path, rel: &Path) {
    let mut parent = root.to_owned();
    for part in rel.components() {
        let available =
            std::fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
        let wanted: Vec<String> = ["cpu", "memory", "pids"]
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if !wanted.is_empty() {
            if let Err(e) = std::fs::write(parent.join("cgroup.subtree_control"), wanted.join(" "))
            {
                log::debug!("cgroup {}: enable {wanted:?}: {e}", parent.display());
            }
        }
        parent.push(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake v1 tree: `cpu,cpuacct` comounted with symlinks, `memory`, `pids`, and a
    /// `cgroup.procs` in each root (cgroupfs makes it in every new directory; a plain
    /// directory does not, which the tests account for).
    fn fake_v1() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for h in ["cpu,cpuacct", "memory", "pids", "unified"] {
            std::fs::create_dir(t.path().join(h)).unwrap();
            std::fs::write(t.path().join(h).join("cgroup.procs"), "").unwrap();
        }
        std::os::unix::fs::symlink("cpu,cpuacct", t.path().join("cpu")).unwrap();
        std::os::unix::fs::symlink("cpu,cpuacct", t.path().join("cpuacct")).unwrap();
        t
    }

    #[test]
    fn paths_and_systemd_slices_parse() {
        assert_eq!(
            parse_cgroups_path("/k8s.io/abc").unwrap(),
            PathBuf::from("k8s.io/abc")
        );
        assert_eq!(
            parse_cgroups_path("kubepods/pod1/c1").unwrap(),
            PathBuf::from("kubepods/pod1/c1")
        );
        assert_eq!(
            parse_cgroups_path("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            parse_cgroups_path("system.slice:nutshell:x").unwrap(),
            PathBuf::from("system.slice/nutshell-x.scope")
        );
        assert_eq!(
            parse_cgroups_path(":cri:x").unwrap(),
            PathBuf::from("system.slice/cri-x.scope")
        );
        for bad in [
            "/",
            "",
            "/a/../b",
            "../x",
            "a\0b",
            "noslice:p:n",
            "a--b.slice:p:n",
            "a.slice:p",
            "a.slice:p:n:extra",
            "a.slice:p:../n",
        ] {
            assert!(parse_cgroups_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn v1_layout_joins_each_hierarchy_once() {
        let t = fake_v1();
        let Layout::V1(h) = Layout::detect(t.path()).unwrap() else {
            panic!("not v1")
        };
        let real = t.path().canonicalize().unwrap();
        assert_eq!(
            h,
            vec![
                real.join("cpu,cpuacct"),
                real.join("memory"),
                real.join("pids")
            ]
        );
    }

    #[test]
    fn v2_layout_is_detected_and_an_empty_root_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(
            Layout::detect(t.path()),
            Err(CgroupError::NoHierarchy(_))
        ));
        std::fs::write(t.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert_eq!(
            Layout::detect(t.path()).unwrap(),
            Layout::V2(t.path().to_owned())
        );
    }

    #[test]
    fn created_directories_are_removed_and_existing_ones_kept() {
        let t = fake_v1();
        let layout = Layout::detect(t.path()).unwrap();
        let real = t.path().canonicalize().unwrap();
        // The parent exists in memory only (as if kubelet had made the pod's cgroup there).
        std::fs::create_dir(real.join("memory/kubepods")).unwrap();
        let mut cg = PodCgroup::create(&layout, Path::new("kubepods/sandbox1")).unwrap();
        assert_eq!(cg.dirs().len(), 3);
        for d in cg.dirs() {
            assert!(d.is_dir(), "{}", d.display());
        }
        assert_eq!(
            cg.created(),
            &[
                real.join("cpu,cpuacct/kubepods"),
                real.join("cpu,cpuacct/kubepods/sandbox1"),
                real.join("memory/kubepods/sandbox1"),
                real.join("pids/kubepods"),
                real.join("pids/kubepods/sandbox1"),
            ]
        );
        // A fake tree has no cgroup.procs in new directories; make them to open them.
        for d in cg.dirs() {
            std::fs::write(d.join("cgroup.procs"), "").unwrap();
        }
        assert_eq!(cg.procs_files().unwrap().len(), 3);
        for d in cg.dirs() {
            std::fs::remove_file(d.join("cgroup.procs")).unwrap();
        }
        // A directory that is not empty (a cgroup still in use) is left.
        std::fs::create_dir(real.join("pids/kubepods/other")).unwrap();
        cg.remove();
        assert!(!real.join("cpu,cpuacct/kubepods").exists());
        assert!(!real.join("memory/kubepods/sandbox1").exists());
        assert!(real.join("memory/kubepods").is_dir(), "not ours: kept");
        assert!(!real.join("pids/kubepods/sandbox1").exists());
        assert!(real.join("pids/kubepods/other").is_dir());
        assert!(cg.created().is_empty());
    }

    #[test]
    fn a_failed_create_removes_what_it_made() {
        let t = fake_v1();
        let layout = Layout::detect(t.path()).unwrap();
        let real = t.path().canonicalize().unwrap();
        // `pids/blocked` is a file: creating the pod's directory under it fails.
        std::fs::write(real.join("pids/blocked"), "").unwrap();
        let err = PodCgroup::create(&layout, Path::new("blocked/pod")).unwrap_err();
        assert!(matches!(err, CgroupError::Create { .. }), "{err}");
        assert!(!real.join("cpu,cpuacct/blocked").exists());
        assert!(!real.join("memory/blocked").exists());
    }

    #[test]
    fn the_created_list_round_trips_and_refuses_strays() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join(CREATED_LIST);
        let root = Path::new("/sys/fs/cgroup");
        let dirs = vec![
            PathBuf::from("/sys/fs/cgroup/memory/k8s.io"),
            PathBuf::from("/sys/fs/cgroup/memory/k8s.io/pod"),
        ];
        save_created(&file, &dirs).unwrap();
        assert_eq!(load_created(&file, root), dirs);
        std::fs::write(
            &file,
            "/etc\nrelative\n/sys/fs/cgroup/../../etc\n/sys/fs/cgroup/pids/x\n",
        )
        .unwrap();
        assert_eq!(
            load_created(&file, root),
            vec![PathBuf::from("/sys/fs/cgroup/pids/x")]
        );
        assert!(load_created(&t.path().join("missing"), root).is_empty());
    }

    #[test]
    fn join_self_reports_a_bad_descriptor() {
        assert!(join_self(&[-1]).is_err());
        assert!(join_self(&[]).is_ok());
    }
}

//! The container's root file system: the spec's mounts, `/dev`, `pivot_root`, masked and
//! read-only paths. Plans are built and validated in the agent ([`RootfsPlan::from_spec`]); the
//! child carries them out ([`RootfsPlan::prepare`] before, [`RootfsPlan::finish`] after
//! `pivot_root`). Child-side errors are plain messages: they travel to the agent over a pipe.

use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chown, Gid, Uid};
use oci_spec::runtime::{LinuxDeviceType, Mount, Spec};

use super::step::{StepResult, Steps};
use super::ContainerError;

/// One mount of the spec, parsed.
#[derive(Debug, Clone)]
pub struct MountPlan {
    source: Option<PathBuf>,
    destination: PathBuf,
    fstype: Option<String>,
    flags: MsFlags,
    propagation: MsFlags,
    data: String,
    bind: bool,
}

/// A device node to create under the container's `/dev`.
#[derive(Debug, Clone)]
pub struct DevicePlan {
    path: PathBuf,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// How the child enters its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RootMode {
    /// `pivot_root` unless the agent's own root is the initramfs (`rootfs`), which cannot be
    /// pivoted away from; then [`RootMode::MoveRoot`].
    #[default]
    Auto,
    /// `pivot_root(".", ".")` and detach the old root.
    PivotRoot,
    /// Detach every mount outside the container's root, move the root onto `/` and chroot
    /// (runc's `--no-pivot`): for an agent that runs from an initramfs.
    MoveRoot,
}

impl RootMode {
    /// `Auto` decided for this process.
    pub fn resolve(self) -> RootMode {
        match self {
            RootMode::Auto => {
                let on_rootfs = fs::read_to_string("/proc/self/mountinfo")
                    .map(|info| {
                        info.lines().any(|line| {
                            let mut fields = line.split(" - ");
                            let (Some(left), Some(right)) = (fields.next(), fields.next()) else {
                                return false;
                            };
                            left.split(' ').nth(4) == Some("/")
                                && right.split(' ').next() == Some("rootfs")
                        })
                    })
                    .unwrap_or(false);
                if on_rootfs {
                    RootMode::MoveRoot
                } else {
                    RootMode::PivotRoot
                }
            }
            mode => mode,
        }
    }
}

/// Everything the child does to the mount namespace.
#[derive(Debug, Clone)]
pub struct RootfsPlan {
    root: PathBuf,
    mode: RootMode,
    readonly: bool,
    propagation: MsFlags,
    shared_root: bool,
    mounts: Vec<MountPlan>,
    /// Devices and `/dev` links are made only when `/dev` is not a bind mount (as runc does).
    setup_dev: bool,
    /// `/dev` is a new file system of the spec's own (runc's default: a tmpfs), empty when
    /// mounted: a node directly in it needs no parent made, no lookup and no clean-up first.
    fresh_dev: bool,
    devices: Vec<DevicePlan>,
    masked: Vec<PathBuf>,
    readonly_paths: Vec<PathBuf>,
}

/// runc's default devices: null, zero, full, random, urandom, tty (all `c`, mode 0666).
const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

impl RootfsPlan {
    /// Validates the root, mounts, devices and paths of `spec`; `mode` is resolved. With
    /// `favordynmods`, cgroup2 mounts carry that option (see [`cgroup2_favors_dynmods`]).
    pub fn from_spec(
        spec: &Spec,
        mode: RootMode,
        favordynmods: bool,
    ) -> Result<Self, ContainerError> {
        let root = spec.root().as_ref().ok_or_else(|| invalid("no root"))?;
        let root_path = root.path();
        if !root_path.is_absolute() {
            return Err(invalid(format!(
                "root path {} is not absolute",
                root_path.display()
            )));
        }
        let meta = fs::metadata(root_path)
            .map_err(|e| invalid(format!("root path {}: {e}", root_path.display())))?;
        if !meta.is_dir() {
            return Err(invalid(format!(
                "root path {} is not a directory",
                root_path.display()
            )));
        }
        let root_path = fs::canonicalize(root_path)
            .map_err(|e| invalid(format!("root path {}: {e}", root_path.display())))?;
        let linux = spec.linux().as_ref();
        let (propagation, shared_root) = match linux.and_then(|l| l.rootfs_propagation().as_deref())
        {
            None | Some("") | Some("rslave") => (MsFlags::MS_SLAVE | MsFlags::MS_REC, false),
            Some("slave") => (MsFlags::MS_SLAVE, false),
            Some("private") => (MsFlags::MS_PRIVATE, false),
            Some("rprivate") => (MsFlags::MS_PRIVATE | MsFlags::MS_REC, false),
            Some("shared") | Some("rshared") => (MsFlags::MS_SLAVE | MsFlags::MS_REC, true),
            Some("unbindable") => (MsFlags::MS_UNBINDABLE, false),
            Some("runbindable") => (MsFlags::MS_UNBINDABLE | MsFlags::MS_REC, false),
            Some(other) => return Err(invalid(format!("rootfsPropagation {other:?}"))),
        };
        let mut mounts = spec
            .mounts()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(MountPlan::from_spec)
            .collect::<Result<Vec<_>, _>>()?;
        if favordynmods {
            for m in &mut mounts {
                m.keep_favordynmods();
            }
        }
        let setup_dev = !mounts
            .iter()
            .any(|m| m.bind && m.destination == Path::new("/dev"));
        let fresh_dev = mounts
            .iter()
            .any(|m| !m.bind && m.destination == Path::new("/dev"));
        let mut devices: Vec<DevicePlan> = DEFAULT_DEVICES
            .iter()
            .map(|(path, major, minor)| DevicePlan {
                path: PathBuf::from(path),
                kind: SFlag::S_IFCHR,
                major: *major,
                minor: *minor,
                mode: 0o666,
                uid: 0,
                gid: 0,
            })
            .collect();
        for d in linux
            .and_then(|l| l.devices().as_deref())
            .unwrap_or_default()
        {
            let kind = match d.typ() {
                LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
                LinuxDeviceType::B => SFlag::S_IFBLK,
                LinuxDeviceType::P => SFlag::S_IFIFO,
                LinuxDeviceType::A => {
                    return Err(invalid(format!(
                        "device {}: type \"a\" is not a node type",
                        d.path().display()
                    )))
                }
            };
            let path = clean_absolute(d.path())
                .filter(|p| p.starts_with("/dev"))
                .ok_or_else(|| {
                    invalid(format!(
                        "device path {} is not under /dev",
                        d.path().display()
                    ))
                })?;
            let (major, minor) = (
                u64::try_from(d.major()).map_err(|_| invalid("negative device major"))?,
                u64::try_from(d.minor()).map_err(|_| invalid("negative device minor"))?,
            );
            devices.retain(|x| x.path != path);
            devices.push(DevicePlan {
                path,
                kind,
                major,
                minor,
                mode: d.file_mode().unwrap_or(0o666) & 0o7777,
                uid: d.uid().unwrap_or(0),
                gid: d.gid().unwrap_or(0),
            });
        }
        let paths = |list: Option<&Vec<String>>| -> Result<Vec<PathBuf>, ContainerError> {
            list.map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|p| {
                    clean_absolute(Path::new(p))
                        .ok_or_else(|| invalid(format!("path {p:?} is not absolute")))
                })
                .collect()
        };
        Ok(RootfsPlan {
            root: root_path,
            mode: mode.resolve(),
            readonly: root.readonly().unwrap_or(false),
            propagation,
            shared_root,
            mounts,
            setup_dev,
            fresh_dev,
            devices,
            masked: paths(linux.and_then(|l| l.masked_paths().as_ref()))?,
            readonly_paths: paths(linux.and_then(|l| l.readonly_paths().as_ref()))?,
        })
    }

    /// In the child, in its new mount namespace: propagation, the spec's mounts under the
    /// root, `/dev`, then `pivot_root` into it. The current directory ends up at `/`.
    pub fn prepare(&self, steps: &mut Steps) -> StepResult {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            self.propagation,
            None::<&str>,
        )
        .map_err(|e| format!("set propagation of /: {e}"))?;
        // pivot_root needs the root to be a mount point.
        mount(
            Some(&self.root),
            &self.root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("bind mount the root {}: {e}", self.root.display()))?;
        steps.mark("root");
        for m in &self.mounts {
            m.apply(&self.root)?;
            if steps.timing() {
                steps.mark(&format!("mount {}", m.destination.display()));
            }
        }
        if self.setup_dev {
            self.make_devices()?;
        }
        steps.mark("devices");
        let pivoted = self.pivot();
        steps.mark("pivot");
        pivoted
    }

    fn make_devices(&self) -> StepResult {
        let old = nix::sys::stat::umask(Mode::empty());
        let result = (|| {
            let dev = secure_join(&self.root, Path::new("/dev"));
            for d in &self.devices {
                // Each system call here is emulated kernel work in the guest: a node directly
                // in a fresh /dev goes there at once (nothing in it yet can be a symlink, a
                // missing parent or an old node).
                let direct = match (self.fresh_dev, d.path.parent(), d.path.file_name()) {
                    (true, Some(parent), Some(name)) if parent == Path::new("/dev") => {
                        Some(dev.join(name))
                    }
                    _ => None,
                };
                let path = match direct {
                    Some(path) => path,
                    None => {
                        let path = secure_join(&self.root, &d.path);
                        if let Some(parent) = path.parent() {
                            fs::create_dir_all(parent)
                                .map_err(|e| format!("create {}: {e}", parent.display()))?;
                        }
                        let _ = fs::remove_file(&path);
                        path
                    }
                };
                let made = mknod(
                    &path,
                    d.kind,
                    Mode::from_bits_truncate(d.mode),
                    makedev(d.major, d.minor),
                );
                match made {
                    Ok(()) => {}
                    // The file system refuses device nodes (the shared directory over virtio-fs
                    // does, so that a guest cannot plant device nodes on the host): bind the
                    // agent's own node instead, as runc does where mknod is not allowed.
                    Err(nix::errno::Errno::EPERM) => {
                        fs::File::create(&path)
                            .map_err(|e| format!("create {}: {e}", d.path.display()))?;
                        nix::mount::mount(
                            Some(&d.path),
                            &path,
                            None::<&str>,
                            nix::mount::MsFlags::MS_BIND,
                            None::<&str>,
                        )
                        .map_err(|e| format!("bind the device {}: {e}", d.path.display()))?;
                        continue;
                    }
                    Err(e) => return Err(format!("mknod {}: {e}", d.path.display())),
                }
                chown(
                    &path,
                    Some(Uid::from_raw(d.uid)),
                    Some(Gid::from_raw(d.gid)),
                )
                .map_err(|e| format!("chown {}: {e}", d.path.display()))?;
            }
            let links = [
                ("/proc/self/fd", "fd"),
                ("/proc/self/fd/0", "stdin"),
                ("/proc/self/fd/1", "stdout"),
                ("/proc/self/fd/2", "stderr"),
                ("pts/ptmx", "ptmx"),
            ];
            for (target, name) in links {
                let link = dev.join(name);
                if name == "ptmx" && !self.fresh_dev {
                    let _ = fs::remove_file(&link);
                }
                match symlink(target, &link) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(format!("symlink /dev/{name}: {e}")),
                }
            }
            if Path::new("/proc/kcore").exists() {
                let _ = symlink("/proc/kcore", dev.join("core"));
            }
            Ok(())
        })();
        nix::sys::stat::umask(old);
        result
    }

    fn pivot(&self) -> StepResult {
        nix::unistd::chdir(&self.root)
            .map_err(|e| format!("chdir {}: {e}", self.root.display()))?;
        if self.mode == RootMode::MoveRoot {
            return self.move_root();
        }
        // pivot_root(".", ".") stacks the old root on top of the new one; unmounting "." then
        // drops the old root without needing a directory for it in the container.
        nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
        // The old root may be shared with the agent's namespace: make sure the unmount does not
        // propagate there.
        mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("make the old root a slave: {e}"))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("unmount the old root: {e}"))?;
        nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
        if self.shared_root {
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_SHARED | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| format!("make / shared: {e}"))?;
        }
        Ok(())
    }

    /// The root of an initramfs has no parent mount, so pivot_root(2) refuses it: detach every
    /// mount that is neither the container's root, under it, nor above it (the agent's /proc,
    /// /sys, /dev …, which the container must not reach), then move the root onto `/` and
    /// chroot into it. The current directory is the root.
    fn move_root(&self) -> StepResult {
        let mut outside = nutshell_protocol::mountinfo::mount_points()
            .map_err(|e| format!("read mountinfo: {e}"))?;
        outside.retain(|p| {
            p != Path::new("/") && !p.starts_with(&self.root) && !self.root.starts_with(p)
        });
        // Deepest first.
        outside.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        outside.dedup();
        for path in outside {
            match umount2(&path, MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
                Err(e) => return Err(format!("detach {}: {e}", path.display())),
            }
        }
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(|e| format!("move the root onto /: {e}"))?;
        nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
        nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
        Ok(())
    }

    /// In the child after `pivot_root`: masked paths, read-only paths, a read-only root.
    pub fn finish(&self) -> StepResult {
        for path in &self.masked {
            mask(path)?;
        }
        for path in &self.readonly_paths {
            make_readonly(path)?;
        }
        if self.readonly {
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(|e| format!("remount / read-only: {e}"))?;
        }
        Ok(())
    }
}

impl MountPlan {
    /// A cgroup2 mount in the root cgroup namespace sets the options of the whole hierarchy
    /// anew: without `favordynmods` it would turn that off for the agent too.
    fn keep_favordynmods(&mut self) {
        if self.fstype.as_deref() == Some("cgroup2")
            && !self.data.split(',').any(|o| o == FAVORDYNMODS)
        {
            if !self.data.is_empty() {
                self.data.push(',');
            }
            self.data.push_str(FAVORDYNMODS);
        }
    }

    fn from_spec(m: &Mount) -> Result<Self, ContainerError> {
        let destination = clean_absolute(m.destination()).ok_or_else(|| {
            invalid(format!(
                "mount destination {} is not absolute",
                m.destination().display()
            ))
        })?;
        if destination == Path::new("/") {
            return Err(invalid("a mount on / is not supported"));
        }
        let mut flags = MsFlags::empty();
        let mut propagation = MsFlags::empty();
        let mut data: Vec<&str> = Vec::new();
        let mut bind = matches!(m.typ().as_deref(), Some("bind"));
        for opt in m.options().as_deref().unwrap_or_default() {
            match parse_option(opt) {
                Some(MountOption::Set(f)) => flags |= f,
                Some(MountOption::Clear(f)) => flags &= !f,
                Some(MountOption::Propagation(f)) => propagation |= f,
                Some(MountOption::Bind(rec)) => {
                    bind = true;
                    if rec {
                        flags |= MsFlags::MS_REC;
                    }
                }
                None => data.push(opt),
            }
        }
        if bind && m.source().is_none() {
            return Err(invalid(format!(
                "bind mount on {} has no source",
                destination.display()
            )));
        }
        let fstype = match m.typ().as_deref() {
            // cgroup v2 only in the guest, as runc does on a unified host.
            Some("cgroup") | Some("cgroup2") => Some("cgroup2".to_string()),
            Some("bind") | None => None,
            Some(t) => Some(t.to_string()),
        };
        if !bind && fstype.is_none() {
            return Err(invalid(format!(
                "mount on {} has neither a type nor bind",
                destination.display()
            )));
        }
        Ok(MountPlan {
            source: m.source().clone(),
            destination,
            fstype,
            flags,
            propagation,
            data: data.join(","),
            bind,
        })
    }

    fn apply(&self, root: &Path) -> StepResult {
        let target = secure_join(root, &self.destination);
        let dest = self.destination.display();
        if self.bind {
            let source = self.source.as_deref().unwrap_or(Path::new(""));
            let is_dir = fs::metadata(source)
                .map_err(|e| format!("bind source {}: {e}", source.display()))?
                .is_dir();
            make_mount_point(&target, is_dir).map_err(|e| format!("mount point {dest}: {e}"))?;
            let rec = self.flags & MsFlags::MS_REC;
            mount(
                Some(source),
                &target,
                None::<&str>,
                MsFlags::MS_BIND | rec,
                None::<&str>,
            )
            .map_err(|e| format!("bind mount {} on {dest}: {e}", source.display()))?;
            let remount = self.flags & !(MsFlags::MS_REC | MsFlags::MS_REMOUNT | MsFlags::MS_BIND);
            if !remount.is_empty() {
                mount(
                    None::<&str>,
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | rec | remount,
                    None::<&str>,
                )
                .map_err(|e| format!("remount {dest} with its flags: {e}"))?;
            }
        } else {
            make_mount_point(&target, true).map_err(|e| format!("mount point {dest}: {e}"))?;
            let fstype = self.fstype.as_deref().unwrap_or_default();
            let source = self
                .source
                .as_deref()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(fstype));
            let data = (!self.data.is_empty()).then_some(self.data.as_str());
            let result = mount(Some(&source), &target, Some(fstype), self.flags, data);
            match result {
                Ok(()) => {}
                // sysfs needs a network namespace of its own; the container shares the
                // sandbox's, so bind the agent's /sys instead (as runc does).
                Err(nix::Error::EPERM) if fstype == "sysfs" => {
                    mount(
                        Some("/sys"),
                        &target,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REC,
                        None::<&str>,
                    )
                    .map_err(|e| format!("bind /sys on {dest}: {e}"))?;
                }
                Err(e) => return Err(format!("mount {fstype} on {dest}: {e}")),
            }
        }
        if !self.propagation.is_empty() {
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                self.propagation,
                None::<&str>,
            )
            .map_err(|e| format!("set propagation of {dest}: {e}"))?;
        }
        Ok(())
    }
}

enum MountOption {
    Set(MsFlags),
    Clear(MsFlags),
    Propagation(MsFlags),
    Bind(bool),
}

fn parse_option(opt: &str) -> Option<MountOption> {
    use MountOption::{Bind, Clear, Propagation, Set};
    Some(match opt {
        "ro" => Set(MsFlags::MS_RDONLY),
        "rw" => Clear(MsFlags::MS_RDONLY),
        "nosuid" => Set(MsFlags::MS_NOSUID),
        "suid" => Clear(MsFlags::MS_NOSUID),
        "nodev" => Set(MsFlags::MS_NODEV),
        "dev" => Clear(MsFlags::MS_NODEV),
        "noexec" => Set(MsFlags::MS_NOEXEC),
        "exec" => Clear(MsFlags::MS_NOEXEC),
        "sync" => Set(MsFlags::MS_SYNCHRONOUS),
        "async" => Clear(MsFlags::MS_SYNCHRONOUS),
        "dirsync" => Set(MsFlags::MS_DIRSYNC),
        "remount" => Set(MsFlags::MS_REMOUNT),
        "mand" => Set(MsFlags::MS_MANDLOCK),
        "nomand" => Clear(MsFlags::MS_MANDLOCK),
        "atime" => Clear(MsFlags::MS_NOATIME),
        "noatime" => Set(MsFlags::MS_NOATIME),
        "diratime" => Clear(MsFlags::MS_NODIRATIME),
        "nodiratime" => Set(MsFlags::MS_NODIRATIME),
        "relatime" => Set(MsFlags::MS_RELATIME),
        "norelatime" => Clear(MsFlags::MS_RELATIME),
        "strictatime" => Set(MsFlags::MS_STRICTATIME),
        "nostrictatime" => Clear(MsFlags::MS_STRICTATIME),
        "bind" => Bind(false),
        "rbind" => Bind(true),
        "private" => Propagation(MsFlags::MS_PRIVATE),
        "rprivate" => Propagation(MsFlags::MS_PRIVATE | MsFlags::MS_REC),
        "shared" => Propagation(MsFlags::MS_SHARED),
        "rshared" => Propagation(MsFlags::MS_SHARED | MsFlags::MS_REC),
        "slave" => Propagation(MsFlags::MS_SLAVE),
        "rslave" => Propagation(MsFlags::MS_SLAVE | MsFlags::MS_REC),
        "unbindable" => Propagation(MsFlags::MS_UNBINDABLE),
        "runbindable" => Propagation(MsFlags::MS_UNBINDABLE | MsFlags::MS_REC),
        _ => return None,
    })
}

fn make_mount_point(target: &Path, dir: bool) -> std::io::Result<()> {
    if dir {
        return fs::create_dir_all(target);
    }
    // A file mount point in one request: `mknod` makes the empty file where creating it with
    // `open` would also cost a flush and a release (on virtio-fs, a round trip to the host
    // each), and a look-up first says nothing `mknod` does not (it exists: EEXIST; its
    // directory does not: ENOENT).
    let make = || match mknod(target, SFlag::S_IFREG, Mode::from_bits_truncate(0o666), 0) {
        Ok(()) | Err(nix::Error::EEXIST) => Ok(()),
        Err(e) => Err(std::io::Error::from(e)),
    };
    match make() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)?;
            }
            make()
        }
        done => done,
    }
}

/// Hides `path`: `/dev/null` over a file, a read-only tmpfs over a directory; a path that does
/// not exist is skipped.
fn mask(path: &Path) -> StepResult {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("masked path {}: {e}", path.display())),
    };
    let result = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    result.map_err(|e| format!("mask {}: {e}", path.display()))
}

/// Makes `path` read-only with a bind mount on itself; a path that does not exist is skipped.
fn make_readonly(path: &Path) -> StepResult {
    match mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Ok(()) => {}
        Err(nix::Error::ENOENT) => return Ok(()),
        Err(e) => return Err(format!("bind {} read-only: {e}", path.display())),
    }
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("remount {} read-only: {e}", path.display()))
}

/// `path` as an absolute path without `.`, `..` (lexically, never above `/`) or doubled slashes;
/// `None` if it is relative.
pub fn clean_absolute(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

/// The most symlinks followed in one path (as Linux's MAXSYMLINKS).
const MAX_SYMLINKS: usize = 40;

/// Resolves `path` as if `root` were `/`: `..` and symlinks (absolute or relative) never lead
/// out of `root`. Components that do not exist are appended as they are. The container's
/// rootfs is not yet running anything, so no process races this walk.
pub fn secure_join(root: &Path, path: &Path) -> PathBuf {
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate: PathBuf = std::iter::once(root.as_os_str().to_os_string())
            .chain(resolved.iter().cloned())
            .chain(std::iter::once(part.clone()))
            .collect();
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() && links < MAX_SYMLINKS => {
                links += 1;
                let Ok(target) = fs::read_link(&candidate) else {
                    resolved.push(part);
                    continue;
                };
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(resolved);
    out
}

/// The cgroup2 option that keeps the hierarchy's lock for moving processes ready (see the
/// agent's `init.rs`).
const FAVORDYNMODS: &str = "favordynmods";

/// Whether this process's cgroup2 hierarchy is mounted with `favordynmods` (its super options
/// in `/proc/self/mountinfo`).
pub fn cgroup2_favors_dynmods() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines().any(|line| {
                let Some((_, right)) = line.split_once(" - ") else {
                    return false;
                };
                let mut fields = right.split(' ');
                fields.next() == Some("cgroup2")
                    && fields
                        .nth(1)
                        .is_some_and(|opts| opts.split(',').any(|o| o == FAVORDYNMODS))
            })
        })
        .unwrap_or(false)
}

/// Whether `path` is a character device (the masked-path test wants `/dev/null`).
pub fn is_char_device(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.file_type().is_char_device())
        .unwrap_or(false)
}

fn invalid(msg: impl Into<String>) -> ContainerError {
    ContainerError::InvalidSpec(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_mount_points_are_made_once_with_their_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Missing file and missing directories: both made, the file empty.
        let hosts = root.join("etc/deep/hosts");
        make_mount_point(&hosts, false).unwrap();
        let meta = fs::symlink_metadata(&hosts).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.len(), 0);
        // An existing file keeps its content; a dangling symlink is left as it is.
        fs::write(root.join("etc/hostname"), "image").unwrap();
        make_mount_point(&root.join("etc/hostname"), false).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "image"
        );
        symlink("missing", root.join("etc/resolv.conf")).unwrap();
        make_mount_point(&root.join("etc/resolv.conf"), false).unwrap();
        assert!(fs::symlink_metadata(root.join("etc/resolv.conf"))
            .unwrap()
            .file_type()
            .is_symlink());
        // A file where a directory should be is an error, not a mount point.
        let err = make_mount_point(&root.join("etc/hostname/x"), false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
        // A directory mount point.
        make_mount_point(&root.join("var/run/x"), true).unwrap();
        assert!(root.join("var/run/x").is_dir());
    }

    #[test]
    fn secure_join_stays_in_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("etc")).unwrap();
        symlink("/etc/../../..", root.join("up")).unwrap();
        symlink("../../../../outside", root.join("etc/rel")).unwrap();
        assert_eq!(secure_join(root, Path::new("/../../x")), root.join("x"));
        assert_eq!(
            secure_join(root, Path::new("/up/passwd")),
            root.join("passwd")
        );
        assert_eq!(
            secure_join(root, Path::new("/etc/rel")),
            root.join("outside")
        );
        assert_eq!(
            secure_join(root, Path::new("etc/a/b")),
            root.join("etc/a/b")
        );
    }

    #[test]
    fn secure_join_stops_symlink_loops() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        symlink("b", root.join("a")).unwrap();
        symlink("a", root.join("b")).unwrap();
        assert!(secure_join(root, Path::new("/a/x")).starts_with(root));
    }

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let m: Mount = serde_json::from_str(
            r#"{"destination":"/dev/pts","type":"devpts","source":"devpts",
                "options":["nosuid","noexec","newinstance","ptmxmode=0666","mode=0620","gid=5","rslave"]}"#,
        )
        .unwrap();
        let plan = MountPlan::from_spec(&m).unwrap();
        assert_eq!(plan.flags, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC);
        assert_eq!(plan.propagation, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert_eq!(plan.data, "newinstance,ptmxmode=0666,mode=0620,gid=5");
        assert!(!plan.bind);
    }

    #[test]
    fn cgroup2_mounts_keep_favordynmods_once() {
        let m: Mount = serde_json::from_str(
            r#"{"destination":"/sys/fs/cgroup","type":"cgroup","source":"cgroup",
                "options":["nosuid","noexec","nodev","relatime","ro"]}"#,
        )
        .unwrap();
        let mut plan = MountPlan::from_spec(&m).unwrap();
        plan.keep_favordynmods();
        plan.keep_favordynmods();
        assert_eq!(plan.fstype.as_deref(), Some("cgroup2"));
        assert_eq!(plan.data, "favordynmods");
        let tmpfs: Mount = serde_json::from_str(
            r#"{"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["mode=755"]}"#,
        )
        .unwrap();
        let mut plan = MountPlan::from_spec(&tmpfs).unwrap();
        plan.keep_favordynmods();
        assert_eq!(plan.data, "mode=755");
    }

    #[test]
    fn bad_mounts_are_refused() {
        let relative: Mount =
            serde_json::from_str(r#"{"destination":"proc","type":"proc"}"#).unwrap();
        assert!(MountPlan::from_spec(&relative).is_err());
        let sourceless: Mount =
            serde_json::from_str(r#"{"destination":"/x","options":["rbind"]}"#).unwrap();
        assert!(MountPlan::from_spec(&sourceless).is_err());
        let root: Mount = serde_json::from_str(r#"{"destination":"/","type":"tmpfs"}"#).unwrap();
        assert!(MountPlan::from_spec(&root).is_err());
    }
}

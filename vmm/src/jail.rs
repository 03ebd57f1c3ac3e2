//! The VMM's jail (`nutshell-vmm --jail`): the process the shim spawned stays a small
//! supervisor and forks the real VMM as PID 1 of new PID, mount, IPC and UTS namespaces (the
//! network namespace is the pod's, where the shim spawned it). The VMM sees a read-only tmpfs
//! root holding only what this VM needs, has no core dumps, a bounded number of open files,
//! `no_new_privs`, locked securebits, and only the capabilities the virtio-fs server needs to
//! act for guest users ([`KEPT_CAPS`]); the bounding set is cut to the same.
//!
//! The jail is made in the VMM rather than in the shim because the VMM knows which files it
//! needs (its command line names them); see docs/security.md.
//!
//! The supervisor forwards SIGTERM, SIGINT and SIGHUP to the VMM and ends as the VMM ended (the
//! same exit code, or killed by the same signal), so that whoever spawned it sees no
//! difference. The VMM dies with the supervisor (`PR_SET_PDEATHSIG`).

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use caps::{CapSet, Capability, CapsHashSet};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{self, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::ForkResult;

use nutshell_protocol::error_chain;

use crate::sys;

/// The capabilities the VMM keeps, all for the virtio-fs server acting for guest users (see
/// docs/security.md for each). `CAP_MKNOD` is not among them: the server refuses character and
/// block devices (FIFOs, sockets and regular files need no capability).
pub const KEPT_CAPS: [Capability; 6] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
];

/// Open files the jailed VMM may have: what the virtio-fs guard lets the guest hold, plus the
/// VMM's own.
pub const MAX_OPEN_FILES: u64 = crate::devices::virtio::fs::WANTED_NOFILE;

/// Where the jail's root is built before `pivot_root` (a mount point in the VMM's own mount
/// namespace only; in the host's it stays an empty directory).
pub const JAIL_MOUNT_POINT: &str = "/run/nutshell-vmm-jail";

/// Device nodes in the jail (bound from the host's).
const DEVICES: [&str; 3] = ["/dev/kvm", "/dev/null", "/dev/urandom"];

/// Size of the jail's `/tmp` (a template build's vsock socket and empty shared directory).
const TMP_SIZE: &str = "size=4m,mode=1777";

// securebits (linux/securebits.h).
const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;

/// Errors of building the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call of the set-up failed.
    #[error("jail: {what}")]
    Sys {
        /// The step.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A capability could not be dropped.
    #[error("jail: capabilities")]
    Caps(#[source] caps::errors::CapsError),
    /// The VMM could not be forked into its namespaces.
    #[error("jail: fork")]
    Fork(#[source] sys::ForkError),
    /// A path the VMM needs cannot be put in the jail.
    #[error("jail: {} is not an absolute path", .0.display())]
    Relative(PathBuf),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let what = what.into();
    move |e| JailError::Sys {
        what,
        source: std::io::Error::from(e),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

/// What the jailed VMM may see.
#[derive(Debug, Default, Clone)]
pub struct JailSpec {
    /// Files and directories bound read-only (kernel, initrd, snapshot).
    pub read_only: Vec<PathBuf>,
    /// Directories bound read-write (the sandbox directory, the template cache).
    pub read_write: Vec<PathBuf>,
    /// The shared directory: bound over itself on the host with shared propagation, so that
    /// mounts the shim makes there later appear in the jail.
    pub shared_dir: Option<PathBuf>,
}

/// Which side of the fork this is.
#[derive(Debug)]
pub enum Role {
    /// The jailed VMM: go on and run the VM.
    Jailed,
    /// The supervisor, after the VMM ended: end as it ended.
    Supervisor(WaitStatus),
}

/// Set in the jailed VMM.
static JAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process is a jailed VMM.
pub fn is_jailed() -> bool {
    JAILED.load(Ordering::Relaxed)
}

const FORWARDED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// Forks the VMM into its jail. Returns [`Role::Jailed`] in the jailed VMM, and
/// [`Role::Supervisor`] in the original process once the VMM has ended. Must be called while
/// the process has one thread.
pub fn enter(spec: &JailSpec) -> Result<Role, JailError> {
    let started = Instant::now();
    let spec = normalise(spec)?;
    if let Some(dir) = &spec.shared_dir {
        share_over_itself(dir)?;
    }
    // The stop signals stay blocked across the fork: the VMM reads them from a signalfd, and
    // one that arrives before it is ready stays pending for it.
    let mut stop = SigSet::empty();
    for s in FORWARDED {
        stop.add(s);
    }
    stop.thread_block().map_err(sys("block signals"))?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(sys("new PID namespace"))?;
    match sys::fork_single_threaded().map_err(JailError::Fork)? {
        ForkResult::Child => {
            if let Err(e) = build(&spec) {
                eprintln!("nutshell-vmm: error: {}", error_chain(&e));
                // Without running the parent's atexit handlers or flushing its copied buffers.
                sys::exit_immediately(1);
            }
            JAILED.store(true, Ordering::Relaxed);
            log::info!(
                "jail ready in {:.2} ms (pid 1 of its namespaces, {} capabilities kept)",
                started.elapsed().as_secs_f64() * 1e3,
                KEPT_CAPS.len()
            );
            Ok(Role::Jailed)
        }
        ForkResult::Parent { child } => {
            sys::forward_signals(child, &FORWARDED).map_err(sys("signal handler"))?;
            stop.thread_unblock().map_err(sys("unblock signals"))?;
            let status = loop {
                match waitpid(child, None) {
                    Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                        break status
                    }
                    Ok(_) | Err(nix::Error::EINTR) => continue,
                    Err(e) => return Err(sys("wait for the jailed VMM")(e)),
                }
            };
            if let Some(dir) = &spec.shared_dir {
                // The bind over itself; mounts the shim made beneath go with it.
                let _ = umount2(dir, MntFlags::MNT_DETACH);
            }
            Ok(Role::Supervisor(status))
        }
    }
}

/// Ends the supervisor as the VMM ended: the same exit code, or killed by the same signal
/// (without a core dump).
pub fn mirror(status: WaitStatus) -> ! {
    match status {
        WaitStatus::Exited(_, code) => std::process::exit(code),
        WaitStatus::Signaled(_, sig, _) => {
            let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
            let _ = sys::default_signal_action(sig);
            let mut set = SigSet::empty();
            set.add(sig);
            let _ = set.thread_unblock();
            let _ = signal::raise(sig);
            std::process::exit(128 + sig as i32)
        }
        _ => std::process::exit(1),
    }
}

/// Absolute paths, without duplicates and without paths inside another read-write directory.
fn normalise(spec: &JailSpec) -> Result<JailSpec, JailError> {
    for p in spec
        .read_only
        .iter()
        .chain(&spec.read_write)
        .chain(&spec.shared_dir)
    {
        if !p.is_absolute() {
            return Err(JailError::Relative(p.clone()));
        }
    }
    let mut rw: Vec<PathBuf> = spec.read_write.clone();
    rw.sort();
    rw.dedup();
    // A directory inside another one is already there.
    let rw: Vec<PathBuf> = rw
        .iter()
        .filter(|p| !rw.iter().any(|q| q != *p && p.starts_with(q)))
        .cloned()
        .collect();
    let mut ro: Vec<PathBuf> = spec.read_only.clone();
    ro.sort();
    ro.dedup();
    Ok(JailSpec {
        read_only: ro,
        read_write: rw,
        shared_dir: spec.shared_dir.clone(),
    })
}

/// Binds `dir` over itself with shared propagation in the host's mount namespace, so that the
/// jail's copy (a slave) receives the mounts made there later.
fn share_over_itself(dir: &Path) -> Result<(), JailError> {
    let what = format!("bind {} over itself", dir.display());
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(what.clone()))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(sys(what))
}

/// In the forked child: new namespaces, the new root, limits, capabilities.
fn build(spec: &JailSpec) -> Result<(), JailError> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys("PR_SET_PDEATHSIG"))?;
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
        .map_err(sys("new mount, IPC and UTS namespaces"))?;
    make_root(spec)?;
    let _ = nix::unistd::sethostname("nutshell-vmm");
    limit()?;
    drop_capabilities()
}

/// Creates `target` (a directory, or an empty file when `source` is not one) in the jail's
/// tmpfs, with its parents.
fn mount_point(source: &Path, target: &Path) -> Result<(), JailError> {
    let is_dir = std::fs::metadata(source)
        .map_err(io(format!("{}", source.display())))?
        .is_dir();
    let dir = if is_dir {
        Some(target)
    } else {
        target.parent()
    };
    if let Some(dir) = dir {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io(format!("mkdir {}", dir.display())))?;
    }
    if !is_dir {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(target)
            .map_err(io(format!("create {}", target.display())))?;
    }
    Ok(())
}

/// Binds `source` at the same path under `root`, read-only unless `writable`.
fn bind(root: &Path, source: &Path, writable: bool) -> Result<(), JailError> {
    let rel = source.strip_prefix("/").unwrap_or(source);
    let target = root.join(rel);
    mount_point(source, &target)?;
    let what = format!("bind {}", source.display());
    mount(
        Some(source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(what.clone()))?;
    if !writable {
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(sys(format!("{what} read-only")))?;
    }
    Ok(())
}

fn make_root(spec: &JailSpec) -> Result<(), JailError> {
    // Nothing of this namespace goes back to the host's; the host's mounts still come in
    // (the shared directory's, above all).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(sys("make / a slave"))?;
    let root = Path::new(JAIL_MOUNT_POINT);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(io(format!("mkdir {JAIL_MOUNT_POINT}")))?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=1m,mode=0755"),
    )
    .map_err(sys("the jail's root tmpfs"))?;
    // /tmp first: a read-write directory below it is bound over it.
    let tmp_is_bound = spec
        .read_write
        .iter()
        .any(|p| Path::new("/tmp").starts_with(p));
    if !tmp_is_bound {
        let tmp = root.join("tmp");
        std::fs::create_dir(&tmp).map_err(io("mkdir /tmp"))?;
        mount(
            Some("tmpfs"),
            &tmp,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(TMP_SIZE),
        )
        .map_err(sys("the jail's /tmp"))?;
    }
    for dev in DEVICES {
        bind(root, Path::new(dev), true)?;
    }
    for p in &spec.read_write {
        bind(root, p, true)?;
    }
    let shared_inside = spec
        .shared_dir
        .as_ref()
        .filter(|s| !spec.read_write.iter().any(|p| s.starts_with(p)));
    if let Some(dir) = shared_inside {
        bind(root, dir, true)?;
    }
    for p in &spec.read_only {
        if spec.read_write.iter().any(|q| p.starts_with(q)) {
            continue;
        }
        bind(root, p, false)?;
    }
    // A /proc of the new PID namespace: the virtio-fs server reopens its inodes through
    // /proc/self/fd, and the VMM reads its own /proc/self (smaps, exe).
    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir).map_err(io("mkdir /proc"))?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(sys("mount /proc"))?;
    nix::unistd::chdir(root).map_err(sys("chdir to the jail"))?;
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root"))?;
    // The old root sits on top of the new one now: detach it.
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detach the host's root"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(sys("the jail's root read-only"))
}

/// No core dumps, bounded open files, no new privileges.
fn limit() -> Result<(), JailError> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(sys("RLIMIT_CORE"))?;
    nix::sys::prctl::set_dumpable(false).map_err(sys("PR_SET_DUMPABLE"))?;
    // Lowered to the bound, never raised above the hard limit it had (raising needs
    // CAP_SYS_RESOURCE, which root may lack).
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(sys("RLIMIT_NOFILE"))?;
    let nofile = MAX_OPEN_FILES.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, nofile, nofile).map_err(sys("RLIMIT_NOFILE"))?;
    nix::sys::prctl::set_no_new_privs().map_err(sys("PR_SET_NO_NEW_PRIVS"))
}

/// Locks the securebits, empties the bounding, ambient and inheritable sets and keeps
/// [`KEPT_CAPS`] in the permitted and effective sets.
fn drop_capabilities() -> Result<(), JailError> {
    let bits = SECBIT_NOROOT
        | SECBIT_NOROOT_LOCKED
        | SECBIT_NO_SETUID_FIXUP_LOCKED
        | SECBIT_KEEP_CAPS_LOCKED
        | SECBIT_NO_CAP_AMBIENT_RAISE
        | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    // The setuid fix-up stays on (and locked): when the virtio-fs server takes a guest user's
    // effective uid, the kernel clears its effective capabilities, as it should.
    sys::set_securebits(bits).map_err(io("PR_SET_SECUREBITS"))?;
    let keep: CapsHashSet = KEPT_CAPS.iter().copied().collect();
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(JailError::Caps)?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(JailError::Caps)?;
    caps::clear(None, CapSet::Inheritable).map_err(JailError::Caps)?;
    caps::set(None, CapSet::Effective, &keep).map_err(JailError::Caps)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(JailError::Caps)
}

/// In a jailed VMM, drops every capability of the calling thread (threads that never act for
/// guest users: vCPUs, the vsock and net devices). Capabilities are per thread.
pub fn drop_thread_capabilities() {
    if !is_jailed() {
        return;
    }
    let dropped =
        caps::clear(None, CapSet::Effective).and_then(|()| caps::clear(None, CapSet::Permitted));
    if let Err(e) = dropped {
        log::error!("jail: cannot drop this thread's capabilities: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn nested_read_write_directories_are_bound_once() {
        let spec = JailSpec {
            read_only: vec!["/k/vmlinux".into(), "/k/vmlinux".into()],
            read_write: vec![
                "/run/n/pod".into(),
                "/run/n/pod/shared".into(),
                "/var/cache/t".into(),
                "/run/n/pod".into(),
            ],
            shared_dir: Some("/run/n/pod/shared".into()),
        };
        let n = normalise(&spec).unwrap();
        assert_eq!(
            n.read_write,
            vec![PathBuf::from("/run/n/pod"), PathBuf::from("/var/cache/t")]
        );
        assert_eq!(n.read_only, vec![PathBuf::from("/k/vmlinux")]);
    }

    #[test]
    fn relative_paths_are_refused() {
        let spec = JailSpec {
            read_write: vec!["run/x".into()],
            ..Default::default()
        };
        assert!(matches!(normalise(&spec), Err(JailError::Relative(_))));
    }

    #[test]
    fn kept_capabilities_are_the_fs_servers() {
        let names: Vec<String> = KEPT_CAPS.iter().map(|c| c.to_string()).collect();
        assert!(!names
            .iter()
            .any(|n| n == "CAP_MKNOD" || n == "CAP_SYS_ADMIN"));
        assert_eq!(names.len(), 6);
    }
}

//! The pod's own namespaces in the guest, and its sysctls.
//!
//! Under runc a pod's containers share the IPC and UTS namespaces of its pause container (and
//! its PID namespace with `shareProcessNamespace`). In a Nutshell guest the pause container
//! runs no process, so the agent makes the pod's namespaces itself at CreateSandbox: a small
//! *pod init* process, cloned into new PID, IPC and UTS namespaces (those whose mode is POD),
//! is PID 1 of the pod's PID namespace and reaps the orphans of the containers that share it.
//! Its namespace files are bound at `/run/pod-ns/<kind>`
//! ([`nutshell_protocol::pod_namespace_path`]), the path the shim writes into a container's
//! spec that joins the pod's namespace.
//!
//! The pod's sysctls are written by the pod init, inside those namespaces, before it reports:
//! IPC ones (`kernel.shm*`, `kernel.msg*`, `kernel.sem`, `fs.mqueue.*`) land in the pod's IPC
//! namespace, UTS ones in its UTS namespace, `net.*` in the VM's network namespace (the pod's
//! network), and everything else in the guest kernel, which is the pod's alone. With no
//! namespace of its own (every mode NODE) the agent writes them in the VM's root namespaces.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use nutshell_protocol::{pod_namespace_path, GUEST_POD_NS_DIR};

use crate::sys::{self as syscall, Forked};

/// Most sysctls a pod may set.
pub const MAX_SYSCTLS: usize = 256;
/// Longest sysctl name or value.
const MAX_SYSCTL_LEN: usize = 4096;

/// One of the pod's sysctls, checked and ready to be written without allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    /// As the pod spec names it (`kernel.shm_rmid_forced`).
    pub key: String,
    /// The value written.
    pub value: String,
    path: CString,
}

impl Sysctl {
    /// Checks `key` (dots or, as Kubernetes also allows, slashes between its parts; no empty
    /// part, no `.` or `..`) and `value`.
    pub fn new(key: &str, value: &str) -> Result<Self, String> {
        let sep = if key.contains('/') { '/' } else { '.' };
        let ok_char = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c) || c == sep;
        if key.is_empty()
            || key.len() > MAX_SYSCTL_LEN
            || !key.chars().all(ok_char)
            || key
                .split(sep)
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(format!("bad sysctl name {key:?}"));
        }
        if value.len() > MAX_SYSCTL_LEN || value.contains('\0') {
            return Err(format!("bad value of sysctl {key}"));
        }
        let rel: Vec<&str> = key.split(sep).collect();
        let path = CString::new(format!("/proc/sys/{}", rel.join("/")))
            .map_err(|_| format!("bad sysctl name {key:?}"))?;
        Ok(Sysctl {
            key: key.to_owned(),
            value: value.to_owned(),
            path,
        })
    }

    /// The file under `/proc/sys`.
    pub fn path(&self) -> &Path {
        Path::new(std::ffi::OsStr::new(
            std::str::from_utf8(self.path.as_bytes()).unwrap_or_default(),
        ))
    }
}

/// Errors of the pod's namespaces and sysctls.
#[derive(Debug, thiserror::Error)]
pub enum PodNsError {
    /// A sysctl could not be written (unknown to the guest kernel, a bad value).
    #[error("cannot set sysctl {key}={value}")]
    Sysctl {
        /// Its name.
        key: String,
        /// The value.
        value: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("cannot {what}")]
    Os {
        /// The step.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn os(what: impl Into<String>) -> impl FnOnce(nix::Error) -> PodNsError {
    let what = what.into();
    move |e| PodNsError::Os {
        what,
        source: e.into(),
    }
}

/// Writes every sysctl in the caller's namespaces; on failure, the index and errno. Makes
/// system calls only (no allocation, no lock): the pod init runs it right after a clone from
/// the multi-threaded agent.
fn write_sysctls(sysctls: &[Sysctl]) -> Result<(), (usize, nix::errno::Errno)> {
    for (i, s) in sysctls.iter().enumerate() {
        let fd = nix::fcntl::open(
            s.path.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| (i, e))?;
        nix::unistd::write(&fd, s.value.as_bytes()).map_err(|e| (i, e))?;
    }
    Ok(())
}

fn sysctl_error(s: &Sysctl, errno: nix::errno::Errno) -> PodNsError {
    PodNsError::Sysctl {
        key: s.key.clone(),
        value: s.value.clone(),
        source: errno.into(),
    }
}

/// Writes `sysctls` in the agent's own (the VM's root) namespaces.
pub fn apply_in_root(sysctls: &[Sysctl]) -> Result<(), PodNsError> {
    write_sysctls(sysctls).map_err(|(i, e)| sysctl_error(&sysctls[i], e))
}

/// The kinds of namespace a pod may have of its own, each published at
/// `/run/pod-ns/<kind>`.
pub const KINDS: [&str; 3] = ["pid", "ipc", "uts"];

/// The pod's namespaces: the pod init holding those the pod has of its own, and their files
/// under `/run/pod-ns`.
#[derive(Debug)]
pub struct PodNs {
    init: Option<PodInit>,
    published: Vec<PathBuf>,
}

impl PodNs {
    /// Makes the pod's own namespaces of the kinds in `own` (a pod init cloned into them, which
    /// writes `sysctls` there; with none, the sysctls are written in the VM's root namespaces)
    /// and publishes every kind at `/run/pod-ns/<kind>`: the pod's own, and for the others
    /// (NODE) the VM's root one. containerd writes the path of the pause container's
    /// namespace into an app container's spec whatever the pod's mode (with `hostNetwork`,
    /// the UTS one of a pause that has none: the node's), so the path always stands for the
    /// pod's namespace, which for NODE is the VM's. Any failure leaves nothing.
    pub fn set_up(own: &[&'static str], sysctls: &[Sysctl]) -> Result<PodNs, PodNsError> {
        let mut ns = PodNs {
            init: None,
            published: Vec::new(),
        };
        if own.is_empty() {
            apply_in_root(sysctls)?;
        } else {
            ns.init = Some(PodInit::start(own, sysctls)?);
        }
        let init_pid = ns.init.as_ref().map(|i| i.pid);
        for kind in KINDS {
            let holder = if own.contains(&kind) { init_pid } else { None };
            if let Err(e) = ns.publish(kind, holder) {
                ns.tear_down();
                return Err(e);
            }
        }
        Ok(ns)
    }

    /// The pod init's PID, if the pod has namespaces of its own.
    pub fn init_pid(&self) -> Option<Pid> {
        self.init.as_ref().map(|i| i.pid)
    }

    /// Binds the namespace of `kind` of `holder` (none: the agent's, the VM's root one) at
    /// `/run/pod-ns/<kind>`.
    fn publish(&mut self, kind: &str, holder: Option<Pid>) -> Result<(), PodNsError> {
        std::fs::create_dir_all(GUEST_POD_NS_DIR).map_err(|source| PodNsError::Os {
            what: format!("create {GUEST_POD_NS_DIR}"),
            source,
        })?;
        let target = PathBuf::from(pod_namespace_path(kind));
        File::create(&target).map_err(|source| PodNsError::Os {
            what: format!("create {}", target.display()),
            source,
        })?;
        self.published.push(target.clone());
        let source = match holder {
            Some(pid) => format!("/proc/{pid}/ns/{kind}"),
            None => format!("/proc/self/ns/{kind}"),
        };
        mount(
            Some(source.as_str()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(os(format!("bind {source} at {}", target.display())))
    }

    /// Unpublishes the namespaces and kills the pod init (with it, every process left in the
    /// pod's PID namespace); PID 1's reaper reaps it.
    pub fn tear_down(mut self) {
        for target in self.published.drain(..) {
            let _ = umount2(&target, MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(&target);
        }
        if let Some(init) = self.init.take() {
            init.stop();
        }
    }
}

/// The pod init process, holding the pod's own namespaces.
#[derive(Debug)]
struct PodInit {
    pid: Pid,
    pidfd: Option<OwnedFd>,
}

/// The clone flag of a namespace kind.
fn kind_flag(kind: &str) -> CloneFlags {
    match kind {
        "pid" => CloneFlags::CLONE_NEWPID,
        "ipc" => CloneFlags::CLONE_NEWIPC,
        _ => CloneFlags::CLONE_NEWUTS,
    }
}

impl PodInit {
    /// Clones the pod init into new namespaces of `kinds` (`pid`, `ipc`, `uts`), where it
    /// writes `sysctls` before it reports. A failure kills it again.
    fn start(kinds: &[&'static str], sysctls: &[Sysctl]) -> Result<PodInit, PodNsError> {
        let flags = kinds
            .iter()
            .fold(CloneFlags::empty(), |f, k| f | kind_flag(k));
        let (report_r, report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(os("pipe"))?;
        let name = c"pod-init";
        match syscall::clone_fork(flags.bits()).map_err(|source| PodNsError::Os {
            what: "clone the pod init".into(),
            source,
        })? {
            Forked::Child => pod_init(report_w, name, sysctls),
            Forked::Parent(pid) => {
                drop(report_w);
                let init = PodInit {
                    pid,
                    pidfd: syscall::pidfd_open(pid).ok(),
                };
                // EOF: the sysctls are written; 8 bytes: which one failed and why.
                let mut report = File::from(report_r);
                let mut buf = Vec::new();
                let read = report.read_to_end(&mut buf);
                let result = match (read, buf.len()) {
                    (Ok(_), 0) => Ok(()),
                    (Ok(_), 8) => {
                        let i = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                        let errno = i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
                        match sysctls.get(i) {
                            Some(s) => Err(sysctl_error(s, nix::errno::Errno::from_raw(errno))),
                            None => Err(bad_report()),
                        }
                    }
                    (Ok(_), _) => Err(bad_report()),
                    (Err(source), _) => Err(PodNsError::Os {
                        what: "read the pod init's report".into(),
                        source,
                    }),
                };
                match result {
                    Ok(()) => {
                        log::debug!(
                            "pod init (pid {pid}) holds the pod's {} namespaces; {} sysctls set",
                            kinds.join(", "),
                            sysctls.len()
                        );
                        Ok(init)
                    }
                    Err(e) => {
                        init.stop();
                        Err(e)
                    }
                }
            }
        }
    }

    fn stop(self) {
        let sent = match &self.pidfd {
            Some(fd) => syscall::pidfd_send_signal(fd.as_fd(), libc::SIGKILL).is_ok(),
            None => nix::sys::signal::kill(self.pid, Signal::SIGKILL).is_ok(),
        };
        log::debug!("pod init (pid {}) stopped (SIGKILL sent: {sent})", self.pid);
    }
}

fn bad_report() -> PodNsError {
    PodNsError::Os {
        what: "understand the pod init's report".into(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    }
}

/// The pod init, right after its clone from the multi-threaded agent: system calls only.
fn pod_init(report: OwnedFd, name: &std::ffi::CStr, sysctls: &[Sysctl]) -> ! {
    let _ = nix::sys::prctl::set_name(name);
    if let Err((i, errno)) = write_sysctls(sysctls) {
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&(i as u32).to_le_bytes());
        msg[4..].copy_from_slice(&(errno as i32).to_le_bytes());
        let _ = nix::unistd::write(&report, &msg);
        syscall::exit_now(1);
    }
    // Nothing of the agent's stays open here (its sockets, the containers' streams): only
    // the report pipe, closed last (EOF tells the agent that all went well).
    if let Ok(null) = nix::fcntl::open(c"/dev/null", OFlag::O_RDWR, Mode::empty()) {
        for target in 0..3 {
            let _ = syscall::dup_onto(null.as_fd(), target);
        }
    }
    // The report pipe moves to 3 and everything above goes (closed by number: no owner may
    // close it again), then 3 itself: EOF for the agent.
    let _ = syscall::dup_onto(report.as_fd(), 3);
    std::mem::forget(report);
    let _ = syscall::close_from(4);
    let _ = syscall::close_from(3);
    // SIGCHLD is blocked (inherited from the agent): wait for it, then reap every orphan
    // that the pod's PID namespace handed to its PID 1.
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    loop {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = chld.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_names_become_paths_under_proc_sys() {
        let s = Sysctl::new("kernel.shm_rmid_forced", "1").unwrap();
        assert_eq!(s.path(), Path::new("/proc/sys/kernel/shm_rmid_forced"));
        let s = Sysctl::new("net/ipv4/conf/eth0.100/rp_filter", "2").unwrap();
        assert_eq!(
            s.path(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
        for bad in [
            "",
            "kernel..x",
            ".kernel",
            "kernel/../x",
            "a b",
            "fs.mqueue.*",
        ] {
            assert!(Sysctl::new(bad, "1").is_err(), "{bad}");
        }
        assert!(Sysctl::new("kernel.x", "a\0b").is_err());
    }
}

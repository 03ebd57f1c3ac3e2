//! The sandbox: what `CreateSandbox` sets up once per pod in the guest, and
//! `DestroySandbox` takes down.
//!
//! A sandbox is the guest itself: its hostname, its loopback interface, the shared
//! directory (virtio-fs, tag [`SHARED_FS_TAG`]) that holds the containers' root file systems
//! and volumes, mounted at the path the host asks for, the pod's own namespaces and its
//! sysctls ([`crate::pod_ns`]). The OS calls sit behind [`SandboxOs`] so that validation and
//! ordering are tested on the host.

use std::io;
use std::path::{Path, PathBuf};

use nutshell_protocol::generated::agent as pb;
pub use nutshell_protocol::SHARED_FS_TAG;

use crate::pod_ns::{PodNs, PodNsError, Sysctl, MAX_SYSCTLS};

/// Longest hostname (`HOST_NAME_MAX`).
pub const MAX_HOSTNAME_LEN: usize = 64;

/// Errors of sandbox set-up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A field of the request is invalid.
    #[error("invalid {field}: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        why: String,
    },
    /// A sandbox exists already.
    #[error("sandbox {0} already exists")]
    Exists(String),
    /// No sandbox with this id.
    #[error("no sandbox {0}")]
    NotFound(String),
    /// The pod's namespaces or sysctls could not be set up.
    #[error("pod namespaces and sysctls")]
    PodNs(#[source] PodNsError),
    /// An OS call failed.
    #[error("{what}")]
    Os {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A validated `CreateSandbox` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// The sandbox (pod) id.
    pub id: String,
    /// The guest hostname; empty = leave it.
    pub hostname: String,
    /// Where the shared directory is mounted; `None` = no shared directory.
    pub shared_dir: Option<PathBuf>,
    /// The pod's sysctls, sorted by name.
    pub sysctls: Vec<Sysctl>,
    /// The namespaces the pod has of its own (`pid`, `ipc`, `uts`; the others are the VM's).
    pub own_namespaces: Vec<&'static str>,
}

/// The namespace kinds whose mode is POD in `ns` (absent: all of them).
fn own_namespaces(ns: Option<&pb::PodNamespaces>) -> Vec<&'static str> {
    let Some(ns) = ns else {
        return vec!["pid", "ipc", "uts"];
    };
    let pod = |m: protobuf::EnumOrUnknown<pb::PodNamespaceMode>| {
        m.enum_value() != Ok(pb::PodNamespaceMode::NODE)
    };
    [("pid", ns.pid), ("ipc", ns.ipc), ("uts", ns.uts)]
        .into_iter()
        .filter(|(_, m)| pod(*m))
        .map(|(k, _)| k)
        .collect()
}

impl TryFrom<&pb::CreateSandboxRequest> for SandboxConfig {
    type Error = SandboxError;

    fn try_from(req: &pb::CreateSandboxRequest) -> Result<Self, SandboxError> {
        let invalid = |field, why: &str| SandboxError::Invalid {
            field,
            why: why.to_string(),
        };
        if req.sandbox_id.is_empty()
            || req.sandbox_id.len() > 128
            || !req
                .sandbox_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(invalid(
                "sandbox_id",
                "must be 1-128 characters of [A-Za-z0-9._-]",
            ));
        }
        if req.hostname.len() > MAX_HOSTNAME_LEN
            || !req
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
        {
            return Err(invalid(
                "hostname",
                "must be at most 64 characters of [A-Za-z0-9.-]",
            ));
        }
        let shared_dir = if req.shared_dir.is_empty() {
            None
        } else {
            let p = Path::new(&req.shared_dir);
            // Only beneath /run (the agent's tmpfs): a host request must not mount over
            // /proc, /dev or the agent's own files.
            // Checked on the string: `Path::components` would drop a `.` silently.
            let segments: Vec<&str> = req.shared_dir.split('/').skip(1).collect();
            let normal = segments
                .iter()
                .all(|s| !s.is_empty() && *s != "." && *s != "..");
            if !req.shared_dir.starts_with("/run/") || !normal || segments.len() < 2 {
                return Err(invalid(
                    "shared_dir",
                    "must be an absolute path beneath /run without . or ..",
                ));
            }
            Some(p.to_path_buf())
        };
        if req.sysctls.len() > MAX_SYSCTLS {
            return Err(invalid("sysctls", "more than 256"));
        }
        let mut sysctls = req
            .sysctls
            .iter()
            .map(|(k, v)| Sysctl::new(k, v))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|why| SandboxError::Invalid {
                field: "sysctls",
                why,
            })?;
        sysctls.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(SandboxConfig {
            id: req.sandbox_id.clone(),
            hostname: req.hostname.clone(),
            shared_dir,
            sysctls,
            own_namespaces: own_namespaces(req.namespaces.as_ref()),
        })
    }
}

/// The OS calls of sandbox set-up.
pub trait SandboxOs: Send + Sync {
    /// sethostname(2).
    fn set_hostname(&self, name: &str) -> io::Result<()>;
    /// Brings the loopback interface up.
    fn loopback_up(&self) -> io::Result<()>;
    /// Creates `dir` and mounts the virtio-fs `tag` on it.
    fn mount_shared(&self, tag: &str, dir: &Path) -> io::Result<()>;
    /// Unmounts `dir` (lazily: processes may still hold files).
    fn unmount(&self, dir: &Path) -> io::Result<()>;
    /// Makes the pod's own namespaces of `kinds` with `sysctls` written inside them and
    /// publishes the pod's namespaces (see [`crate::pod_ns`]); `None`: nothing to undo.
    fn pod_namespaces(
        &self,
        kinds: &[&'static str],
        sysctls: &[Sysctl],
    ) -> Result<Option<PodNs>, PodNsError>;
}

/// The real OS of the guest.
#[derive(Debug, Default, Clone, Copy)]
pub struct GuestOs;

impl SandboxOs for GuestOs {
    fn set_hostname(&self, name: &str) -> io::Result<()> {
        crate::sys::set_hostname(name)
    }

    fn loopback_up(&self) -> io::Result<()> {
        crate::sys::loopback_up()
    }

    fn mount_shared(&self, tag: &str, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        crate::sys::mount_virtiofs(tag, dir)
    }

    fn unmount(&self, dir: &Path) -> io::Result<()> {
        crate::sys::unmount_lazy(dir)
    }

    fn pod_namespaces(
        &self,
        kinds: &[&'static str],
        sysctls: &[Sysctl],
    ) -> Result<Option<PodNs>, PodNsError> {
        PodNs::set_up(kinds, sysctls).map(Some)
    }
}

/// A sandbox that is set up: its configuration and the pod's namespaces.
#[derive(Debug)]
pub struct Sandbox {
    /// What CreateSandbox asked for.
    pub cfg: SandboxConfig,
    pod_ns: Option<PodNs>,
}

/// Sets the sandbox up: hostname, loopback, shared directory, then the pod's namespaces and
/// sysctls (after the hostname: a new UTS namespace starts with it).
pub fn set_up(cfg: SandboxConfig, os: &dyn SandboxOs) -> Result<Sandbox, SandboxError> {
    let os_err = |what: String| move |source| SandboxError::Os { what, source };
    if !cfg.hostname.is_empty() {
        os.set_hostname(&cfg.hostname).map_err(os_err(format!(
            "cannot set the hostname to {}",
            cfg.hostname
        )))?;
    }
    os.loopback_up()
        .map_err(os_err("cannot bring the loopback interface up".into()))?;
    if let Some(dir) = &cfg.shared_dir {
        os.mount_shared(SHARED_FS_TAG, dir).map_err(os_err(format!(
            "cannot mount the shared directory (virtio-fs tag {SHARED_FS_TAG}) on {}",
            dir.display()
        )))?;
    }
    let pod_ns = match os.pod_namespaces(&cfg.own_namespaces, &cfg.sysctls) {
        Ok(ns) => ns,
        Err(e) => {
            if let Some(dir) = &cfg.shared_dir {
                let _ = os.unmount(dir);
            }
            return Err(SandboxError::PodNs(e));
        }
    };
    log::debug!(
        "sandbox {} set up (hostname {:?}, shared directory {:?}, own namespaces {:?}, {} sysctls)",
        cfg.id,
        cfg.hostname,
        cfg.shared_dir,
        cfg.own_namespaces,
        cfg.sysctls.len()
    );
    Ok(Sandbox { cfg, pod_ns })
}

/// Takes the sandbox down: stops the pod init, unmounts the shared directory.
pub fn tear_down(sandbox: Sandbox, os: &dyn SandboxOs) -> Result<(), SandboxError> {
    let Sandbox { cfg, pod_ns } = sandbox;
    if let Some(ns) = pod_ns {
        ns.tear_down();
    }
    if let Some(dir) = &cfg.shared_dir {
        os.unmount(dir).map_err(|source| SandboxError::Os {
            what: format!("cannot unmount {}", dir.display()),
            source,
        })?;
    }
    log::debug!("sandbox {} taken down", cfg.id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn req(id: &str, hostname: &str, shared: &str) -> pb::CreateSandboxRequest {
        pb::CreateSandboxRequest {
            sandbox_id: id.into(),
            hostname: hostname.into(),
            shared_dir: shared.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_good_request_validates() {
        let cfg = SandboxConfig::try_from(&req("pod-1", "web-0", "/run/shared")).unwrap();
        assert_eq!(cfg.shared_dir.as_deref(), Some(Path::new("/run/shared")));
        let cfg = SandboxConfig::try_from(&req("pod-1", "", "")).unwrap();
        assert_eq!(cfg.shared_dir, None);
    }

    #[test]
    fn bad_requests_are_refused() {
        for (r, field) in [
            (req("", "h", ""), "sandbox_id"),
            (req("a/b", "h", ""), "sandbox_id"),
            (req("p", "bad host", ""), "hostname"),
            (req("p", &"h".repeat(65), ""), "hostname"),
            (req("p", "h", "/proc"), "shared_dir"),
            (req("p", "h", "/run"), "shared_dir"),
            (req("p", "h", "/run/../proc"), "shared_dir"),
            (req("p", "h", "run/shared"), "shared_dir"),
            (req("p", "h", "/run/./x"), "shared_dir"),
            (
                pb::CreateSandboxRequest {
                    sysctls: [("kernel/../x".to_string(), "1".to_string())].into(),
                    ..req("p", "h", "")
                },
                "sysctls",
            ),
        ] {
            match SandboxConfig::try_from(&r) {
                Err(SandboxError::Invalid { field: f, .. }) => assert_eq!(f, field, "{r:?}"),
                other => panic!("{r:?}: {other:?}"),
            }
        }
    }

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        fail_mount: bool,
    }

    impl SandboxOs for Recorder {
        fn set_hostname(&self, name: &str) -> io::Result<()> {
            self.calls.lock().unwrap().push(format!("hostname {name}"));
            Ok(())
        }
        fn loopback_up(&self) -> io::Result<()> {
            self.calls.lock().unwrap().push("lo up".into());
            Ok(())
        }
        fn mount_shared(&self, tag: &str, dir: &Path) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("mount {tag} {}", dir.display()));
            if self.fail_mount {
                return Err(io::Error::from_raw_os_error(libc::ENODEV));
            }
            Ok(())
        }
        fn unmount(&self, dir: &Path) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("umount {}", dir.display()));
            Ok(())
        }
        fn pod_namespaces(
            &self,
            kinds: &[&'static str],
            sysctls: &[Sysctl],
        ) -> Result<Option<PodNs>, PodNsError> {
            let keys: Vec<&str> = sysctls.iter().map(|s| s.key.as_str()).collect();
            self.calls.lock().unwrap().push(format!(
                "pod namespaces {} sysctls {}",
                kinds.join(","),
                keys.join(",")
            ));
            Ok(None)
        }
    }

    #[test]
    fn set_up_and_tear_down_call_the_os_in_order() {
        let os = Recorder::default();
        let mut r = req("p", "web", "/run/shared");
        r.sysctls
            .insert("kernel.shm_rmid_forced".into(), "1".into());
        r.sysctls.insert("fs.mqueue.msg_max".into(), "100".into());
        r.namespaces = Some(pb::PodNamespaces {
            pid: pb::PodNamespaceMode::NODE.into(),
            ..Default::default()
        })
        .into();
        let cfg = SandboxConfig::try_from(&r).unwrap();
        let sb = set_up(cfg, &os).unwrap();
        tear_down(sb, &os).unwrap();
        assert_eq!(
            *os.calls.lock().unwrap(),
            [
                "hostname web",
                "lo up",
                "mount nutshell /run/shared",
                "pod namespaces ipc,uts sysctls fs.mqueue.msg_max,kernel.shm_rmid_forced",
                "umount /run/shared"
            ]
        );
    }

    #[test]
    fn a_failed_mount_names_the_tag_and_directory() {
        let os = Recorder {
            fail_mount: true,
            ..Default::default()
        };
        let cfg = SandboxConfig::try_from(&req("p", "", "/run/shared")).unwrap();
        let e = set_up(cfg, &os).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot mount the shared directory (virtio-fs tag nutshell) on /run/shared"
        );
    }
}

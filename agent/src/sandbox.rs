//! The sandbox: what `CreateSandbox` sets up once per pod in the guest, and
//! `DestroySandbox` takes down.
//!
//! A sandbox is the guest itself: its hostname, its loopback interface, and the shared
//! directory (virtio-fs, tag [`SHARED_FS_TAG`]) that holds the containers' root file systems
//! and volumes, mounted at the path the host asks for. The OS calls sit behind
//! [`SandboxOs`] so that validation and ordering are tested on the host.

use std::io;
use std::path::{Path, PathBuf};

use nutshell_protocol::generated::agent as pb;
pub use nutshell_protocol::SHARED_FS_TAG;

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
        Ok(SandboxConfig {
            id: req.sandbox_id.clone(),
            hostname: req.hostname.clone(),
            shared_dir,
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
}

/// Sets the sandbox up: hostname, loopback, shared directory.
pub fn set_up(cfg: &SandboxConfig, os: &dyn SandboxOs) -> Result<(), SandboxError> {
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
    log::info!(
        "sandbox {} set up (hostname {:?}, shared directory {:?})",
        cfg.id,
        cfg.hostname,
        cfg.shared_dir
    );
    Ok(())
}

/// Takes the sandbox down: unmounts the shared directory.
pub fn tear_down(cfg: &SandboxConfig, os: &dyn SandboxOs) -> Result<(), SandboxError> {
    if let Some(dir) = &cfg.shared_dir {
        os.unmount(dir).map_err(|source| SandboxError::Os {
            what: format!("cannot unmount {}", dir.display()),
            source,
        })?;
    }
    log::info!("sandbox {} taken down", cfg.id);
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
    }

    #[test]
    fn set_up_and_tear_down_call_the_os_in_order() {
        let os = Recorder::default();
        let cfg = SandboxConfig::try_from(&req("p", "web", "/run/shared")).unwrap();
        set_up(&cfg, &os).unwrap();
        tear_down(&cfg, &os).unwrap();
        assert_eq!(
            *os.calls.lock().unwrap(),
            [
                "hostname web",
                "lo up",
                "mount nutshell /run/shared",
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
        let e = set_up(&cfg, &os).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot mount the shared directory (virtio-fs tag nutshell) on /run/shared"
        );
    }
}

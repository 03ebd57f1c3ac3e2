//! The node policy for untrusted tenants: `[policy]` in `config.toml`.
//!
//! The VM keeps a container off the host's kernel, but a spec can still ask for the host:
//! a bind mount of `/` is shared into the guest over virtio-fs, read and write. The policy
//! decides, at Create and before anything is mounted or started, which host paths a
//! container's bind mounts may come from, whether privileged containers and the node's
//! namespace modes (hostPID, hostIPC, hostNetwork; in a VM they mean the VM's root
//! namespaces) are accepted. A refusal names the path or field and the policy key.
//!
//! ```toml
//! [policy]
//! allowed_host_paths = ["/"]        # default: every host path (a trusted node)
//! refuse_privileged = false
//! refuse_node_namespaces = false
//! ```
//!
//! A host path is allowed when, with `..` and every symlink resolved by the host kernel, it is
//! an allowed prefix or lies beneath one, compared by whole components
//! (`/var/lib/kubelet/podsX` is not under `/var/lib/kubelet/pods`). A prefix may name the pod
//! with `{sandbox_id}` (the CRI sandbox id) or `{pod_uid}` (the pod's UID from the CRI's
//! annotations), each as a whole component, so that a pod reaches its own kubelet volumes and
//! containerd files and no other pod's. The source is opened once (`O_PATH`), checked through
//! that descriptor, and bound from it: a symlink swapped in after the check is not followed.
//!
//! Explicit device requests (`linux.devices` of a container that is not privileged) are
//! refused under every policy: the guest has none of the host's devices and Nutshell passes
//! none in, so dropping them would give the container less than it asked for in silence. A
//! privileged container's device list is the host's (containerd copies it along with the rule
//! that allows every device); it is dropped and the container gets the guest's devices.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{Capability, LinuxDeviceType, LinuxNamespaceType, Spec};
use serde::Deserialize;

use crate::pod::Role;
use crate::spec::{shared_mounts, SharedMount};

/// Annotation: the pod's UID (kubelet's), set by containerd's CRI.
pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";

/// The placeholder for the CRI sandbox id in an allowed prefix.
const SANDBOX_ID_PLACEHOLDER: &str = "{sandbox_id}";
/// The placeholder for the pod's UID in an allowed prefix.
const POD_UID_PLACEHOLDER: &str = "{pod_uid}";

/// `[policy]`: what a container may ask of the host. The defaults accept everything the
/// shim supports (a node whose tenants are trusted); `deploy/config-untrusted.toml` is the
/// strict one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Host paths that bind mounts may come from: absolute prefixes, `{sandbox_id}` and
    /// `{pod_uid}` allowed as whole components.
    pub allowed_host_paths: Vec<String>,
    /// Refuse privileged containers (every device allowed, or `CAP_SYS_ADMIN` in the bounding
    /// set).
    pub refuse_privileged: bool,
    /// Refuse containers that ask for the node's PID, IPC, network or UTS namespace (hostPID,
    /// hostIPC, hostNetwork): in Nutshell they share the VM's root namespace.
    pub refuse_node_namespaces: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_host_paths: vec!["/".to_owned()],
            refuse_privileged: false,
            refuse_node_namespaces: false,
        }
    }
}

/// The pod a container belongs to, for the placeholders of allowed prefixes.
#[derive(Debug, Clone, Copy)]
pub struct PodContext<'a> {
    /// The CRI sandbox id (a standalone container's own id).
    pub sandbox_id: &'a str,
    /// The pod's UID, when the CRI gave one.
    pub pod_uid: Option<&'a str>,
}

impl<'a> PodContext<'a> {
    /// The pod of a container whose spec is `spec`, served by sandbox `sandbox_id`.
    pub fn of(spec: &'a Spec, sandbox_id: &'a str) -> Self {
        PodContext {
            sandbox_id,
            pod_uid: spec
                .annotations()
                .as_ref()
                .and_then(|a| a.get(SANDBOX_UID))
                .map(String::as_str),
        }
    }
}

/// The policy's checks at Create, before anything is made or mounted: the spec, and for a
/// container that runs in the guest, every bind mount's source (a pod's sandbox container
/// shares none with the guest). `prepare_fs` opens the sources again to bind them.
pub fn check_create(
    policy: &Policy,
    spec: &Spec,
    id: &str,
    role: &Role,
    sandbox_id: &str,
) -> Result<(), PolicyError> {
    policy.check_spec(spec, id)?;
    if crate::task::Kind::of(role).runs_container() {
        policy.open_shared_sources(&shared_mounts(spec, id), PodContext::of(spec, sandbox_id))?;
    }
    Ok(())
}

/// A spec the policy refuses, or a host path it cannot check.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A bind mount's source is outside every allowed prefix.
    #[error(
        "refused by the node policy: bind mount of host path {} (resolved: {}) onto {}: not \
         under any of policy.allowed_host_paths {allowed:?}",
        source_path.display(), resolved.display(), destination.display()
    )]
    HostPath {
        /// The source as the spec names it.
        source_path: PathBuf,
        /// The source with `..` and symlinks resolved.
        resolved: PathBuf,
        /// Where the container wanted it.
        destination: PathBuf,
        /// The allowed prefixes, as configured.
        allowed: Vec<String>,
    },
    /// A bind mount's source cannot be opened or resolved.
    #[error("bind mount source {}", path.display())]
    Source {
        /// The source as the spec names it.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An explicit device request.
    #[error(
        "refused by the node policy: linux.devices: {} requested; Nutshell passes no host device into the VM, so explicit \
         device requests are refused (privileged containers get the guest's devices)",
        path.display()
    )]
    Device {
        /// The device's path in the container.
        path: PathBuf,
    },
    /// A privileged container under `refuse_privileged`.
    #[error(
        "refused by the node policy: privileged container ({why}) under \
         policy.refuse_privileged"
    )]
    Privileged {
        /// What makes it privileged.
        why: &'static str,
    },
    /// A node namespace mode under `refuse_node_namespaces`.
    #[error(
        "refused by the node policy: linux.namespaces: no {kind} namespace of its own ({mode}; in Nutshell the VM's root \
         {kind} namespace) under policy.refuse_node_namespaces"
    )]
    NodeNamespace {
        /// pid, ipc, network, uts.
        kind: &'static str,
        /// The Kubernetes name of the mode.
        mode: &'static str,
    },
}

/// The namespaces whose absence from `linux.namespaces` means the node's (the CRI's `NODE`
/// mode): the container would share the runtime's own, which in Nutshell is the VM's root.
const NODE_NAMESPACES: [(LinuxNamespaceType, &str, &str); 4] = [
    (LinuxNamespaceType::Pid, "pid", "hostPID"),
    (LinuxNamespaceType::Ipc, "ipc", "hostIPC"),
    (LinuxNamespaceType::Network, "network", "hostNetwork"),
    (LinuxNamespaceType::Uts, "uts", "hostNetwork"),
];

/// A bind mount's source, opened and checked: bind [`HostSource::mount_source`], not the path
/// the spec named, so that what is mounted is what was checked.
#[derive(Debug)]
pub struct HostSource {
    file: File,
    /// The source with `..` and symlinks resolved (for messages).
    pub resolved: PathBuf,
}

impl HostSource {
    /// The path to give mount(2): the descriptor's magic link, valid while `self` lives (and
    /// in a child forked meanwhile, which inherits the descriptor).
    pub fn mount_source(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

impl Policy {
    /// Checks the parts of `spec` that are not host paths: node namespaces, privilege and
    /// devices. Logs when a privileged container's host device list is dropped.
    pub fn check_spec(&self, spec: &Spec, id: &str) -> Result<(), PolicyError> {
        if self.refuse_node_namespaces {
            let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
            for (typ, kind, mode) in NODE_NAMESPACES {
                let own = namespaces.is_some_and(|list| list.iter().any(|n| n.typ() == typ));
                if !own {
                    return Err(PolicyError::NodeNamespace { kind, mode });
                }
            }
        }
        let privileged = privileged(spec);
        if self.refuse_privileged {
            if let Some(why) = privileged {
                return Err(PolicyError::Privileged { why });
            }
        }
        let devices = spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().as_deref())
            .unwrap_or_default();
        if let Some(first) = devices.first() {
            if allows_every_device(spec) {
                log::info!(
                    "{id}: privileged: its {} host devices are not passed into the VM; it gets \
                     the guest's devices",
                    devices.len()
                );
            } else {
                return Err(PolicyError::Device {
                    path: first.path().clone(),
                });
            }
        }
        Ok(())
    }

    /// Opens a bind mount's `source` (the kernel resolves `..` and symlinks) and checks the
    /// resolved path against `allowed_host_paths`.
    pub fn open_host_source(
        &self,
        source: &Path,
        destination: &Path,
        pod: PodContext<'_>,
    ) -> Result<HostSource, PolicyError> {
        let source_error = |e| PolicyError::Source {
            path: source.to_path_buf(),
            source: e,
        };
        if !source.is_absolute() {
            return Err(source_error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not an absolute path",
            )));
        }
        // O_PATH opens any kind of file (a socket, a device node) without reading it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(source)
            .map_err(source_error)?;
        let resolved = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(source_error)?;
        if !resolved.is_absolute() {
            // Unreachable from this root (another mount namespace's file) or not a path.
            return Err(source_error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("resolves to {}", resolved.display()),
            )));
        }
        if self.allows(&resolved, pod) {
            Ok(HostSource { file, resolved })
        } else {
            Err(PolicyError::HostPath {
                source_path: source.to_path_buf(),
                resolved,
                destination: destination.to_path_buf(),
                allowed: self.allowed_host_paths.clone(),
            })
        }
    }

    /// Opens and checks the sources of `shared`, in order.
    pub fn open_shared_sources(
        &self,
        shared: &[SharedMount],
        pod: PodContext<'_>,
    ) -> Result<Vec<HostSource>, PolicyError> {
        shared
            .iter()
            .map(|m| self.open_host_source(&m.host_source, &m.destination, pod))
            .collect()
    }

    /// Whether the resolved path `path` is an allowed prefix or beneath one.
    fn allows(&self, path: &Path, pod: PodContext<'_>) -> bool {
        self.allowed_host_paths
            .iter()
            .filter_map(|p| expand(p, pod))
            .any(|prefix| {
                // The prefix itself may contain symlinks (/var/run → /run): compare with what
                // it resolves to as well.
                let real = std::fs::canonicalize(&prefix).ok();
                path.starts_with(&prefix) || real.is_some_and(|r| path.starts_with(r))
            })
    }

    /// Checks the configured values; `Err((key, reason))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for p in &self.allowed_host_paths {
            let path = Path::new(p);
            if !path.is_absolute() {
                return Err((
                    "policy.allowed_host_paths",
                    format!("{p:?} is not an absolute path"),
                ));
            }
            for c in path.components() {
                let Component::Normal(name) = c else { continue };
                let name = name.to_string_lossy();
                if name.contains('{')
                    && name != SANDBOX_ID_PLACEHOLDER
                    && name != POD_UID_PLACEHOLDER
                {
                    return Err((
                        "policy.allowed_host_paths",
                        format!(
                            "{p:?}: {name:?} is not {SANDBOX_ID_PLACEHOLDER} or \
                             {POD_UID_PLACEHOLDER} as a whole component"
                        ),
                    ));
                }
            }
            if path.components().any(|c| c == Component::ParentDir) {
                return Err((
                    "policy.allowed_host_paths",
                    format!("{p:?} contains \"..\""),
                ));
            }
        }
        Ok(())
    }
}

/// `prefix` with its placeholders filled in; `None` when a placeholder has no usable value
/// (no pod UID, or one that is not a single plain component): such a prefix allows nothing.
fn expand(prefix: &str, pod: PodContext<'_>) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(prefix).components() {
        match c {
            Component::Normal(name) if name == SANDBOX_ID_PLACEHOLDER => {
                out.push(plain_component(pod.sandbox_id)?);
            }
            Component::Normal(name) if name == POD_UID_PLACEHOLDER => {
                out.push(plain_component(pod.pod_uid?)?);
            }
            Component::ParentDir => return None,
            other => out.push(other),
        }
    }
    Some(out)
}

/// `s` if it is one path component that names a child (not empty, `.`, `..`, no `/`).
fn plain_component(s: &str) -> Option<&str> {
    (!s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')).then_some(s)
}

/// Why `spec` is a privileged container, if it is one: it allows every device (containerd's
/// `WithAllDevicesAllowed`, which the CRI and `ctr run --privileged` set with the host's
/// devices) or keeps `CAP_SYS_ADMIN` in its bounding set (also true of a privileged CRI
/// container under `privileged_without_host_devices`).
fn privileged(spec: &Spec) -> Option<&'static str> {
    if allows_every_device(spec) {
        return Some("linux.resources.devices allows every device");
    }
    let sys_admin = spec
        .process()
        .as_ref()
        .and_then(|p| p.capabilities().as_ref())
        .and_then(|c| c.bounding().as_ref())
        .is_some_and(|b| b.contains(&Capability::SysAdmin));
    sys_admin.then_some("process.capabilities.bounding has CAP_SYS_ADMIN")
}

/// Whether the device cgroup rules allow every device: a rule that allows without a type
/// (or type `a`), major or minor, for all of read, write and mknod.
fn allows_every_device(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().as_ref())
        .is_some_and(|rules| {
            rules.iter().any(|r| {
                r.allow()
                    && matches!(r.typ(), None | Some(LinuxDeviceType::A))
                    && r.major().is_none()
                    && r.minor().is_none()
                    && r.access()
                        .as_deref()
                        .is_none_or(|a| ['r', 'w', 'm'].iter().all(|c| a.contains(*c)))
            })
        })
}

#[cfg(test)]
mod tests;

//! The OCI spec of a container, rewritten for the guest.
//!
//! containerd writes the spec for the host. Inside the VM the root filesystem is the
//! container's directory of the shared (virtio-fs) directory, host bind mounts (volumes,
//! `/etc/hosts`, `resolv.conf`, `/dev/shm`) are bound into the shared directory by the shim and
//! appear under it in the guest, namespace paths name host processes and mean nothing in the
//! guest, and host security labels, hooks, cgroup paths and devices belong to the host.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Spec};

pub use nutshell_protocol::GUEST_SHARED_DIR;

/// A host path bound into the shared directory so that the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedMount {
    /// The host source (a file or directory).
    pub host_source: PathBuf,
    /// Where the container sees it.
    pub destination: PathBuf,
    /// Relative to the shared directory: `<container-id>/mounts/<n>`.
    pub shared_rel: PathBuf,
    /// Read-only bind.
    pub readonly: bool,
}

impl SharedMount {
    /// The path in the guest.
    pub fn guest_path(&self) -> PathBuf {
        Path::new(GUEST_SHARED_DIR).join(&self.shared_rel)
    }
}

/// Whether an OCI mount is a bind of a host path.
fn is_bind(m: &Mount) -> bool {
    let opts = m.options().as_deref().unwrap_or_default();
    m.typ().as_deref() == Some("bind") || opts.iter().any(|o| o == "bind" || o == "rbind")
}

/// The guest path of container `id`'s root filesystem.
pub fn guest_rootfs(id: &str) -> PathBuf {
    Path::new(GUEST_SHARED_DIR).join(id).join("rootfs")
}

/// The host paths of `spec`'s bind mounts that must be shared with the guest, in mount order.
pub fn shared_mounts(spec: &Spec, id: &str) -> Vec<SharedMount> {
    let Some(mounts) = spec.mounts() else {
        return Vec::new();
    };
    mounts
        .iter()
        .filter(|m| is_bind(m))
        .filter_map(|m| Some((m.source().clone()?, m)))
        .enumerate()
        .map(|(n, (host_source, m))| SharedMount {
            host_source,
            destination: m.destination().clone(),
            shared_rel: Path::new(id).join("mounts").join(n.to_string()),
            readonly: m
                .options()
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|o| o == "ro"),
        })
        .collect()
}

/// Rewrites `spec` for the guest: container `id`'s root in the shared directory, bind sources
/// replaced by their shared copies (`shared` from [`shared_mounts`]), namespace paths dropped,
/// host-only fields removed.
pub fn rewrite_for_guest(mut spec: Spec, id: &str, shared: &[SharedMount]) -> Spec {
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(guest_rootfs(id));
    spec.set_root(Some(root));

    if let Some(mounts) = spec.mounts_mut() {
        let mut next = shared.iter();
        for m in mounts.iter_mut() {
            if is_bind(m) && m.source().is_some() {
                if let Some(s) = next.next() {
                    m.set_source(Some(s.guest_path()));
                }
            }
        }
    }

    // Hooks run on the host in runc; here they would run nowhere that makes sense.
    spec.set_hooks(None);

    if let Some(process) = spec.process_mut() {
        process.set_apparmor_profile(None);
        process.set_selinux_label(None);
    }

    if let Some(linux) = spec.linux_mut() {
        if let Some(namespaces) = linux.namespaces_mut() {
            // A network namespace with a path is the pod's network (CNI ran in it on the
            // host): in the guest that is the VM's own network, where the agent configures the
            // pod's interface, so the container joins it (the entry goes). One without a path
            // stays a new, empty namespace, as runc gives it.
            namespaces.retain(|ns| {
                ns.typ() != oci_spec::runtime::LinuxNamespaceType::Network || ns.path().is_none()
            });
            for ns in namespaces.iter_mut() {
                // /proc/<host pid>/ns/... : the guest has its own processes.
                ns.set_path(None);
            }
        }
        linux.set_cgroups_path(None);
        linux.set_devices(None);
        linux.set_mount_label(None);
        linux.set_intel_rdt(None);
    }
    spec
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const HOST_SPEC: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/sh", "-c", "echo hi"],
            "cwd": "/",
            "apparmorProfile": "cri-containerd.apparmor.d",
            "selinuxLabel": "system_u:system_r:container_t:s0"
        },
        "root": {"path": "/run/containerd/io.containerd.runtime.v2.task/k8s.io/web/rootfs", "readonly": true},
        "hostname": "web",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/containerd/sandboxes/pod1/hosts", "options": ["rbind", "rprivate", "rw"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/sandboxes/pod1/shm", "options": ["rbind", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}
        ],
        "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
        "annotations": {"io.kubernetes.cri.container-type": "container"},
        "linux": {
            "cgroupsPath": "/kubepods/besteffort/pod1/web",
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc", "path": "/proc/4242/ns/ipc"},
                {"type": "uts", "path": "/proc/4242/ns/uts"},
                {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1234"}
            ],
            "devices": [{"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0}],
            "mountLabel": "system_u:object_r:container_file_t:s0",
            "resources": {"memory": {"limit": 67108864}}
        }
    }"#;

    fn host_spec() -> Spec {
        serde_json::from_str(HOST_SPEC).unwrap()
    }

    #[test]
    fn root_moves_into_the_shared_directory() {
        let spec = rewrite_for_guest(host_spec(), "web", &[]);
        let root = spec.root().as_ref().unwrap();
        assert_eq!(root.path(), Path::new("/run/shared/web/rootfs"));
        assert_eq!(root.readonly(), Some(true));
    }

    #[test]
    fn bind_mounts_are_shared_and_their_sources_rewritten() {
        let spec = host_spec();
        let shared = shared_mounts(&spec, "web");
        assert_eq!(
            shared,
            vec![
                SharedMount {
                    host_source: "/var/lib/containerd/sandboxes/pod1/hosts".into(),
                    destination: "/etc/hosts".into(),
                    shared_rel: "web/mounts/0".into(),
                    readonly: false,
                },
                SharedMount {
                    host_source: "/run/containerd/sandboxes/pod1/shm".into(),
                    destination: "/dev/shm".into(),
                    shared_rel: "web/mounts/1".into(),
                    readonly: true,
                },
            ]
        );
        let spec = rewrite_for_guest(spec, "web", &shared);
        let sources: Vec<_> = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.source().clone().unwrap())
            .collect();
        assert_eq!(
            sources,
            [
                PathBuf::from("proc"),
                "/run/shared/web/mounts/0".into(),
                "/run/shared/web/mounts/1".into(),
                "tmpfs".into()
            ]
        );
    }

    #[test]
    fn namespaces_lose_their_host_paths_and_the_pod_network_is_the_vms() {
        let spec = rewrite_for_guest(host_spec(), "web", &[]);
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert_eq!(
            namespaces.len(),
            4,
            "every namespace but the pod's network is kept"
        );
        assert!(namespaces.iter().all(|n| n.path().is_none()));
        assert!(!namespaces
            .iter()
            .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network));
    }

    #[test]
    fn a_network_namespace_without_a_path_stays_a_new_one() {
        let text = HOST_SPEC.replace(
            r#"{"type": "network", "path": "/var/run/netns/cni-1234"}"#,
            r#"{"type": "network"}"#,
        );
        let spec = rewrite_for_guest(serde_json::from_str(&text).unwrap(), "web", &[]);
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert_eq!(namespaces.len(), 5);
        assert!(namespaces
            .iter()
            .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network));
    }

    #[test]
    fn host_only_fields_are_dropped_the_rest_kept() {
        let spec = rewrite_for_guest(host_spec(), "web", &[]);
        assert!(spec.hooks().is_none());
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.cgroups_path().is_none());
        assert!(linux.devices().is_none());
        assert!(linux.mount_label().is_none());
        let process = spec.process().as_ref().unwrap();
        assert!(process.apparmor_profile().is_none());
        assert!(process.selinux_label().is_none());
        // What the guest needs stays.
        assert_eq!(process.args().as_ref().unwrap()[2], "echo hi");
        assert_eq!(spec.hostname().as_deref(), Some("web"));
        assert_eq!(
            linux
                .resources()
                .as_ref()
                .unwrap()
                .memory()
                .as_ref()
                .unwrap()
                .limit(),
            Some(64 << 20)
        );
        assert!(spec
            .annotations()
            .as_ref()
            .unwrap()
            .contains_key(crate::pod::CONTAINER_TYPE));
        // And it still serializes to a spec the agent can parse.
        let json = serde_json::to_vec(&spec).unwrap();
        let back: Spec = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, spec);
    }
}

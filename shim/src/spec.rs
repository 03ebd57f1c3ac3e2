//! The OCI spec of a container, rewritten for the guest.
//!
//! containerd writes the spec for the host. Inside the VM the root filesystem is the
//! container's directory of the shared (virtio-fs) directory, host bind mounts (volumes,
//! `/etc/hosts`, `resolv.conf`, `/dev/shm`) are bound into the shared directory by the shim and
//! appear under it in the guest, namespace paths name host processes and mean nothing in the
//! guest, and host security labels, hooks, cgroup paths and devices belong to the host.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

use nutshell_protocol::pod_namespace_path;
use nutshell_protocol::types::{PodNamespaceMode, PodNamespaces, SandboxSpec};
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
    /// `rslave`/`rshared` (`slave`/`shared`): host mounts made later under the source must
    /// appear in the container (the CRI's HostToContainer and Bidirectional propagation; the
    /// direction back cannot cross the VM).
    pub receives_host_mounts: bool,
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

/// The node's `/dev/shm`, which containerd binds into a `hostIPC` container: under Nutshell
/// NODE means the VM's, never the node's, so it is not shared with the guest.
const NODE_DEV_SHM: &str = "/dev/shm";

/// Whether `m` binds the node's `/dev/shm`.
fn binds_node_shm(m: &Mount) -> bool {
    is_bind(m) && m.source().as_deref() == Some(Path::new(NODE_DEV_SHM))
}

/// The guest's kind name of a namespace the pod may have of its own.
fn pod_kind(t: LinuxNamespaceType) -> Option<&'static str> {
    match t {
        LinuxNamespaceType::Pid => Some("pid"),
        LinuxNamespaceType::Ipc => Some("ipc"),
        LinuxNamespaceType::Uts => Some("uts"),
        _ => None,
    }
}

/// What `CreateSandbox` asks of the guest for the sandbox `id`, from the spec of the container
/// that starts the VM: with `pod` (the CRI's pause container), the pod's namespace modes (a
/// namespace the pause spec leaves out is the CRI's NODE mode: the VM's root one) and its
/// sysctls; without (a container of its own, `ctr run`) nothing to share: every mode NODE, and
/// the container applies its sysctls itself.
pub fn sandbox_spec(spec: &Spec, id: &str, hostname: &str, pod: bool) -> SandboxSpec {
    let mut out = SandboxSpec {
        sandbox_id: id.to_owned(),
        hostname: hostname.to_owned(),
        shared_dir: GUEST_SHARED_DIR.to_owned(),
        namespaces: PodNamespaces::NODE,
        ..Default::default()
    };
    if !pod {
        return out;
    }
    let linux = spec.linux().as_ref();
    let listed = |t: LinuxNamespaceType| {
        let present = linux
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|nss| nss.iter().any(|ns| ns.typ() == t));
        if present {
            PodNamespaceMode::Pod
        } else {
            PodNamespaceMode::Node
        }
    };
    out.namespaces = PodNamespaces {
        pid: listed(LinuxNamespaceType::Pid),
        ipc: listed(LinuxNamespaceType::Ipc),
        uts: listed(LinuxNamespaceType::Uts),
    };
    out.sysctls = linux
        .and_then(|l| l.sysctl().clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    out
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
        .filter(|m| is_bind(m) && !binds_node_shm(m))
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
            receives_host_mounts: m
                .options()
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|o| matches!(o.as_str(), "rslave" | "slave" | "rshared" | "shared")),
        })
        .collect()
}

/// Rewrites `spec` for the guest: container `id`'s root in the shared directory, bind sources
/// replaced by their shared copies (`shared` from [`shared_mounts`]), paths to the pod's PID,
/// IPC and UTS namespaces replaced by the guest's (the agent publishes them at
/// [`pod_namespace_path`]), other namespace paths dropped, host-only fields removed.
pub fn rewrite_for_guest(mut spec: Spec, id: &str, shared: &[SharedMount]) -> Spec {
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(guest_rootfs(id));
    spec.set_root(Some(root));

    if let Some(mounts) = spec.mounts_mut() {
        let mut next = shared.iter();
        for m in mounts.iter_mut() {
            if binds_node_shm(m) {
                // hostIPC: a /dev/shm of the guest's instead of the node's.
                m.set_typ(Some("tmpfs".to_owned()));
                m.set_source(Some(PathBuf::from("shm")));
                m.set_options(Some(
                    ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
                        .map(str::to_owned)
                        .to_vec(),
                ));
            } else if is_bind(m) && m.source().is_some() {
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
                // /proc/<host pid>/ns/... names the pause container's namespace (the CRI's POD
                // mode): in the guest that is the pod's own, which the agent publishes. Any
                // other host path means nothing in the guest.
                let guest = match (ns.path(), pod_kind(ns.typ())) {
                    (Some(_), Some(kind)) => Some(PathBuf::from(pod_namespace_path(kind))),
                    _ => None,
                };
                ns.set_path(guest);
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
                    receives_host_mounts: false,
                },
                SharedMount {
                    host_source: "/run/containerd/sandboxes/pod1/shm".into(),
                    destination: "/dev/shm".into(),
                    shared_rel: "web/mounts/1".into(),
                    readonly: true,
                    receives_host_mounts: false,
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
    fn pod_namespaces_become_the_guests_and_the_pod_network_is_the_vms() {
        let spec = rewrite_for_guest(host_spec(), "web", &[]);
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let paths: Vec<_> = namespaces
            .iter()
            .map(|n| (n.typ(), n.path().clone()))
            .collect();
        assert_eq!(
            paths,
            [
                (LinuxNamespaceType::Pid, None),
                (LinuxNamespaceType::Ipc, Some("/run/pod-ns/ipc".into())),
                (LinuxNamespaceType::Uts, Some("/run/pod-ns/uts".into())),
                (LinuxNamespaceType::Mount, None),
            ],
            "every namespace but the pod's network is kept"
        );
    }

    #[test]
    fn a_shared_pid_namespace_is_the_pods() {
        let text = HOST_SPEC.replace(
            r#"{"type": "pid"}"#,
            r#"{"type": "pid", "path": "/proc/4242/ns/pid"}"#,
        );
        let spec = rewrite_for_guest(serde_json::from_str(&text).unwrap(), "web", &[]);
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert_eq!(
            namespaces[0].path().as_deref(),
            Some(Path::new("/run/pod-ns/pid"))
        );
    }

    #[test]
    fn the_pause_spec_gives_the_pods_modes_and_sysctls() {
        // hostIPC and hostNetwork: containerd leaves out the IPC, UTS and network entries.
        let pause: Spec = serde_json::from_str(
            r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"},
                "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}],
                          "sysctl": {"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100"}}}"#,
        )
        .unwrap();
        let sb = sandbox_spec(&pause, "pod1", "web", true);
        assert_eq!(sb.sandbox_id, "pod1");
        assert_eq!(sb.shared_dir, GUEST_SHARED_DIR);
        assert_eq!(
            sb.namespaces,
            PodNamespaces {
                pid: PodNamespaceMode::Pod,
                ipc: PodNamespaceMode::Node,
                uts: PodNamespaceMode::Node,
            }
        );
        assert_eq!(sb.sysctls.len(), 2);
        assert_eq!(sb.sysctls["fs.mqueue.msg_max"], "100");
        // A container without a pod shares nothing.
        let alone = sandbox_spec(&pause, "c1", "c1", false);
        assert_eq!(alone.namespaces, PodNamespaces::NODE);
        assert!(alone.sysctls.is_empty());
    }

    #[test]
    fn the_nodes_dev_shm_never_reaches_the_guest() {
        let text = HOST_SPEC.replace("/run/containerd/sandboxes/pod1/shm", "/dev/shm");
        let spec: Spec = serde_json::from_str(&text).unwrap();
        let shared = shared_mounts(&spec, "web");
        assert_eq!(shared.len(), 1, "{shared:?}");
        let spec = rewrite_for_guest(spec, "web", &shared);
        let shm = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/dev/shm"))
            .unwrap();
        assert_eq!(shm.typ().as_deref(), Some("tmpfs"));
        assert_eq!(shm.source().as_deref(), Some(Path::new("shm")));
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

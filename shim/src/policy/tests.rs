#![allow(clippy::unwrap_used)]

use super::*;

fn strict(allowed: &[&str]) -> Policy {
    Policy {
        allowed_host_paths: allowed.iter().map(|s| (*s).to_owned()).collect(),
        refuse_privileged: true,
        refuse_node_namespaces: true,
    }
}

const POD: PodContext<'static> = PodContext {
    sandbox_id: "sb1",
    pod_uid: Some("uid-1"),
};

fn open(policy: &Policy, source: &Path) -> Result<HostSource, PolicyError> {
    policy.open_host_source(source, Path::new("/mnt"), POD)
}

/// A tree: root/pods/uid-1/vol/file, root/podsX/, root/etc/secret, and a link
/// root/pods/uid-1/vol/escape → root/etc.
fn tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("pods/uid-1/vol")).unwrap();
    std::fs::create_dir_all(root.join("pods/uid-2/vol")).unwrap();
    std::fs::create_dir_all(root.join("podsX")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("pods/uid-1/vol/file"), b"x").unwrap();
    std::fs::write(root.join("etc/secret"), b"x").unwrap();
    std::os::unix::fs::symlink(root.join("etc"), root.join("pods/uid-1/vol/escape")).unwrap();
    std::os::unix::fs::symlink(root.join("pods/uid-1/vol"), root.join("etc/link-into-pods"))
        .unwrap();
    dir
}

fn real(dir: &tempfile::TempDir) -> PathBuf {
    std::fs::canonicalize(dir.path()).unwrap()
}

#[test]
fn the_default_allows_every_host_path() {
    let policy = Policy::default();
    policy.validate().unwrap();
    let s = open(&policy, Path::new("/")).unwrap();
    assert_eq!(s.resolved, Path::new("/"));
    assert!(open(&policy, Path::new("/etc/hostname")).is_ok());
}

#[test]
fn paths_under_a_prefix_pass_by_whole_components() {
    let dir = tree();
    let root = real(&dir);
    let pods = root.join("pods");
    let policy = strict(&[pods.to_str().unwrap()]);
    // The prefix itself and what lies beneath it.
    assert!(open(&policy, &pods).is_ok());
    let f = open(&policy, &pods.join("uid-1/vol/file")).unwrap();
    assert_eq!(f.resolved, pods.join("uid-1/vol/file"));
    // A sibling that shares the prefix's characters is not beneath it.
    let e = open(&policy, &root.join("podsX")).unwrap_err();
    assert!(matches!(e, PolicyError::HostPath { .. }), "{e}");
    // Nor is the host's root.
    let e = open(&policy, Path::new("/")).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("host path /") && text.contains("policy.allowed_host_paths"),
        "{text}"
    );
}

#[test]
fn dot_dot_and_symlinks_are_resolved_before_the_check() {
    let dir = tree();
    let root = real(&dir);
    let pods = root.join("pods");
    let policy = strict(&[pods.to_str().unwrap()]);
    // `..` out of the prefix.
    let e = open(&policy, &pods.join("uid-1/../../etc")).unwrap_err();
    match &e {
        PolicyError::HostPath { resolved, .. } => assert_eq!(resolved, &root.join("etc")),
        other => panic!("{other:?}"),
    }
    // A symlink under the prefix that points out of it.
    let e = open(&policy, &pods.join("uid-1/vol/escape")).unwrap_err();
    assert!(matches!(e, PolicyError::HostPath { .. }), "{e}");
    let e = open(&policy, &pods.join("uid-1/vol/escape/secret")).unwrap_err();
    assert!(matches!(e, PolicyError::HostPath { .. }), "{e}");
    // A symlink outside that points in is judged by where it leads.
    let s = open(&policy, &root.join("etc/link-into-pods/file")).unwrap();
    assert_eq!(s.resolved, pods.join("uid-1/vol/file"));
    // A missing source is an error naming it.
    let e = open(&policy, &pods.join("nothing")).unwrap_err();
    assert!(matches!(e, PolicyError::Source { .. }), "{e}");
    assert!(e.to_string().contains("nothing"), "{e}");
}

#[test]
fn a_prefix_through_a_symlink_matches_its_target() {
    let dir = tree();
    let root = real(&dir);
    std::os::unix::fs::symlink(root.join("pods"), root.join("pods-link")).unwrap();
    let policy = strict(&[root.join("pods-link").to_str().unwrap()]);
    assert!(open(&policy, &root.join("pods/uid-1/vol/file")).is_ok());
    assert!(open(&policy, &root.join("etc/secret")).is_err());
}

#[test]
fn placeholders_confine_a_pod_to_its_own_directories() {
    let dir = tree();
    let root = real(&dir);
    let policy = strict(&[&format!("{}/pods/{{pod_uid}}", root.display())]);
    policy.validate().unwrap();
    assert!(open(&policy, &root.join("pods/uid-1/vol/file")).is_ok());
    let e = open(&policy, &root.join("pods/uid-2/vol")).unwrap_err();
    assert!(matches!(e, PolicyError::HostPath { .. }), "{e}");
    // Without a pod UID, or with one that is not a plain name, the prefix allows nothing.
    for uid in [None, Some(".."), Some("a/b"), Some("")] {
        let pod = PodContext {
            sandbox_id: "sb1",
            pod_uid: uid,
        };
        let got = policy.open_host_source(&root.join("pods/uid-1/vol"), Path::new("/v"), pod);
        assert!(got.is_err(), "{uid:?}");
    }
    let sandboxes = strict(&[&format!("{}/{{sandbox_id}}", root.display())]);
    let pod = PodContext {
        sandbox_id: "pods",
        pod_uid: None,
    };
    assert!(sandboxes
        .open_host_source(&root.join("pods/uid-2"), Path::new("/v"), pod)
        .is_ok());
}

#[test]
fn bad_prefixes_are_refused_naming_the_key() {
    for bad in ["relative/path", "/a/../b", "/a/{pod}", "/a/x{pod_uid}"] {
        let (key, reason) = strict(&[bad]).validate().unwrap_err();
        assert_eq!(key, "policy.allowed_host_paths");
        assert!(reason.contains(bad), "{reason}");
    }
}

#[test]
fn the_mount_source_is_the_checked_file() {
    let dir = tree();
    let root = real(&dir);
    let policy = strict(&[root.join("pods").to_str().unwrap()]);
    let s = open(&policy, &root.join("pods/uid-1/vol")).unwrap();
    let via_fd = s.mount_source();
    // Swap the checked directory for a symlink out of the prefix: the descriptor still
    // names the directory that was checked.
    std::fs::rename(root.join("pods/uid-1/vol"), root.join("pods/uid-1/moved")).unwrap();
    std::os::unix::fs::symlink(root.join("etc"), root.join("pods/uid-1/vol")).unwrap();
    assert_eq!(
        std::fs::read_link(&via_fd).unwrap(),
        root.join("pods/uid-1/moved")
    );
    assert!(via_fd.join("file").exists());
    assert!(!via_fd.join("secret").exists());
}

fn spec(linux: serde_json::Value, process: serde_json::Value) -> Spec {
    serde_json::from_value(serde_json::json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": "rootfs"},
        "linux": linux,
    }))
    .unwrap()
}

fn own_namespaces() -> serde_json::Value {
    serde_json::json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
        {"type": "network", "path": "/var/run/netns/cni-1"}
    ])
}

fn process(caps: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0},
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}
    })
}

/// containerd's default device rules: deny all, then the usual nodes.
fn default_rules() -> serde_json::Value {
    serde_json::json!([
        {"allow": false, "access": "rwm"},
        {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"}
    ])
}

#[test]
fn an_ordinary_container_passes_the_strict_policy() {
    let s = spec(
        serde_json::json!({"namespaces": own_namespaces(),
                           "resources": {"devices": default_rules()}}),
        process(&["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]),
    );
    strict(&[]).check_spec(&s, "c").unwrap();
}

#[test]
fn explicit_devices_are_refused_under_every_policy() {
    let s = spec(
        serde_json::json!({
            "namespaces": own_namespaces(),
            "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
            "resources": {"devices": [
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"}
            ]}
        }),
        process(&["CAP_CHOWN"]),
    );
    for policy in [Policy::default(), strict(&[])] {
        let e = policy.check_spec(&s, "c").unwrap_err();
        assert!(matches!(e, PolicyError::Device { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("/dev/fuse") && text.contains("linux.devices"),
            "{text}"
        );
    }
}

#[test]
fn a_privileged_containers_host_devices_are_dropped_or_refused_by_the_knob() {
    // What `ctr run --privileged` and a privileged CRI container look like.
    let s = spec(
        serde_json::json!({
            "namespaces": own_namespaces(),
            "devices": [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}],
            "resources": {"devices": [{"allow": true, "access": "rwm"}]}
        }),
        process(&["CAP_SYS_ADMIN", "CAP_CHOWN"]),
    );
    Policy::default().check_spec(&s, "c").unwrap();
    let e = strict(&[]).check_spec(&s, "c").unwrap_err();
    assert!(matches!(e, PolicyError::Privileged { .. }), "{e}");
    assert!(e.to_string().contains("policy.refuse_privileged"), "{e}");
    // Privileged by its capabilities alone (privileged_without_host_devices).
    let caps_only = spec(
        serde_json::json!({"namespaces": own_namespaces(),
                           "resources": {"devices": default_rules()}}),
        process(&["CAP_SYS_ADMIN"]),
    );
    Policy::default().check_spec(&caps_only, "c").unwrap();
    let e = strict(&[]).check_spec(&caps_only, "c").unwrap_err();
    assert!(e.to_string().contains("CAP_SYS_ADMIN"), "{e}");
    // Such a container's devices are explicit requests again.
    let mut with_device = caps_only.clone();
    let mut linux = with_device.linux().clone().unwrap();
    linux.set_devices(s.linux().as_ref().unwrap().devices().clone());
    with_device.set_linux(Some(linux));
    let e = Policy::default().check_spec(&with_device, "c").unwrap_err();
    assert!(matches!(e, PolicyError::Device { .. }), "{e}");
}

#[test]
fn node_namespaces_are_refused_by_the_knob() {
    for (drop, mode) in [
        ("pid", "hostPID"),
        ("ipc", "hostIPC"),
        ("network", "hostNetwork"),
        ("uts", "hostNetwork"),
    ] {
        let namespaces: Vec<_> = own_namespaces()
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["type"] != drop)
            .cloned()
            .collect();
        let s = spec(
            serde_json::json!({"namespaces": namespaces}),
            process(&["CAP_CHOWN"]),
        );
        Policy::default().check_spec(&s, "c").unwrap();
        let e = strict(&[]).check_spec(&s, "c").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(mode)
                && text.contains("linux.namespaces")
                && text.contains("policy.refuse_node_namespaces"),
            "{text}"
        );
    }
    // A network namespace without a path (a new, empty one) is the container's own.
    let s = spec(
        serde_json::json!({"namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network"}
        ]}),
        process(&[]),
    );
    strict(&[]).check_spec(&s, "c").unwrap();
}

#![allow(clippy::unwrap_used)]
//! The containerd harness for real: a private containerd, a locally built image imported and
//! run with runc, and nothing left behind after drop. Needs root and containerd (slow lane).

use std::path::Path;
use std::time::{Duration, Instant};

use nutshell_protocol::procfs::alive;
use nutshell_test_support::containerd::{
    process_tree, remove_namespace_cgroups, shim_pids, Containerd, ContainerdOptions, CRI_NAMESPACE,
};
use nutshell_test_support::cri::{self, CriClient};
use nutshell_test_support::image;

#[test]
#[ignore = "slow lane: needs root, containerd and runc"]
fn private_containerd_runs_a_local_image_and_leaves_nothing_behind() {
    let cache = tempfile::tempdir().unwrap();
    let tarball = image::busybox_image("docker.io/nutshell/harness-test:1")
        .unwrap()
        .tarball(cache.path())
        .unwrap();

    let containerd = Containerd::start(&ContainerdOptions::default()).unwrap();
    let dir = containerd.dir().to_owned();
    let pid = containerd.pid().unwrap();
    let ctr = containerd.ctr();
    ctr.import_image(&tarball).unwrap();
    let images = ctr.output(&["images", "ls", "-q"]).unwrap();
    assert!(
        images.contains("docker.io/nutshell/harness-test:1"),
        "{images}"
    );

    let out = ctr
        .output(&[
            "run",
            "--rm",
            "docker.io/nutshell/harness-test:1",
            "harness-echo",
            "/bin/sh",
            "-c",
            "echo hello from pid $$",
        ])
        .unwrap();
    // PID 1: the shell runs in its own PID namespace, in a container.
    assert_eq!(out.trim(), "hello from pid 1");

    // A container still running when the harness goes away is killed with it.
    ctr.output(&[
        "run",
        "-d",
        "docker.io/nutshell/harness-test:1",
        "harness-idle",
        "/bin/sleep",
        "3600",
    ])
    .unwrap();
    let shims = shim_pids(containerd.address(), containerd.namespace());
    assert_eq!(shims.len(), 1, "one shim for the idle container");

    drop(containerd);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "containerd still runs"
    );
    for shim in shims {
        assert!(!alive(shim), "shim {shim} still runs");
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(dir.to_str().unwrap()),
        "mounts left: {mounts}"
    );
}

#[test]
#[ignore = "slow lane: needs root, containerd and runc"]
fn a_cri_pod_left_running_is_removed_with_the_harness() {
    const IMAGE: &str = "docker.io/nutshell/harness-test:1";
    const PAUSE: &str = "docker.io/nutshell/harness-pause:1";
    let cache = tempfile::tempdir().unwrap();
    let app = image::busybox_image(IMAGE)
        .unwrap()
        .tarball(cache.path())
        .unwrap();
    let pause = image::busybox_image(PAUSE)
        .unwrap()
        .cmd(&["/bin/sleep", "2147483647"])
        .tarball(cache.path())
        .unwrap();
    let logs = tempfile::tempdir().unwrap();
    let parent = format!("nutshell-harness-cri-{}", std::process::id());

    // The harness's own namespace is not the CRI's: the pod below lives in `k8s.io`.
    let containerd = Containerd::start(&ContainerdOptions {
        sandbox_image: Some(PAUSE.into()),
        runtimes: Vec::new(),
        ..ContainerdOptions::default()
    })
    .unwrap();
    assert_ne!(containerd.namespace(), CRI_NAMESPACE);
    let ctr = containerd.ctr_in(CRI_NAMESPACE);
    ctr.import_image(&app).unwrap();
    ctr.import_image(&pause).unwrap();
    let mut client = CriClient::connect(containerd.address()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(client.image_present(IMAGE).unwrap() && client.image_present(PAUSE).unwrap()) {
        assert!(Instant::now() < deadline, "the CRI does not see the images");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A runc pod on the node's network (no CNI here; no hostname in the node's UTS namespace).
    let mut pod = cri::pod_config("left", "uid-left", logs.path());
    pod.hostname.clear();
    pod.linux.as_mut().unwrap().cgroup_parent = format!("/{parent}");
    cri::namespace_modes(&mut pod).network = cri::api::NamespaceMode::Node as i32;
    let sandbox = client.run_pod_sandbox(&pod, "runc").unwrap();
    let app_cfg = cri::container_config("app", IMAGE, &["sleep", "3600"], "app.log");
    let app = client.create_container(&sandbox, &app_cfg, &pod).unwrap();
    client.start_container(&app).unwrap();
    client
        .wait_state(
            &app,
            cri::ContainerState::ContainerRunning,
            Duration::from_secs(60),
            Duration::from_millis(20),
        )
        .unwrap();
    let shims = shim_pids(containerd.address(), CRI_NAMESPACE);
    assert_eq!(shims.len(), 1, "one shim for the pod");
    let tree = process_tree(&shims);
    assert!(tree.len() >= 3, "shim, pause and app: {tree:?}");

    // Nobody stops the pod: the harness does, with its shim and processes.
    drop(client);
    drop(containerd);
    for pid in &tree {
        assert!(!alive(*pid), "process {pid} of the CRI pod still runs");
    }
    remove_namespace_cgroups(Path::new("/sys/fs/cgroup"), &parent);
    let left = Path::new("/sys/fs/cgroup/memory").join(&parent);
    assert!(!left.exists(), "{} left (not empty)", left.display());
}

#[test]
fn containerd_that_cannot_start_is_an_error_with_its_log() {
    let opts = ContainerdOptions {
        binary: "/nonexistent/containerd".into(),
        ..ContainerdOptions::default()
    };
    let err = Containerd::start(&opts).unwrap_err();
    assert!(err.to_string().contains("cannot start"), "{err}");
}

#![allow(clippy::unwrap_used)]
//! The containerd harness for real: a private containerd, a locally built image imported and
//! run with runc, and nothing left behind after drop. Needs root and containerd (slow lane).

use std::path::Path;

use nutshell_bench::containerd::{shim_pids, Containerd, ContainerdOptions};
use nutshell_bench::image;

/// Running, not gone and not a zombie waiting for init to reap it.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .next();
    !matches!(state, Some("Z" | "X"))
}

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
fn containerd_that_cannot_start_is_an_error_with_its_log() {
    let opts = ContainerdOptions {
        binary: "/nonexistent/containerd".into(),
        ..ContainerdOptions::default()
    };
    let err = Containerd::start(&opts).unwrap_err();
    assert!(err.to_string().contains("cannot start"), "{err}");
}

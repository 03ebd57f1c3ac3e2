//! Slow lane: Nutshell as a containerd runtime for real. A private containerd (its own socket,
//! root and state) runs a locally built busybox image with
//! `ctr run --runtime io.containerd.nutshell.v2`: the container runs in a microVM (its kernel
//! is the guest's, not the host's), its output and exit code reach `ctr`, and nothing is left
//! on the host afterwards.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;

use nutshell_bench::containerd::{Containerd, ContainerdOptions};
use nutshell_bench::image;
use nutshell_tests::{guest_artifact, shim_binary, target_dir, template_cache, vmm_binary};

const IMAGE: &str = "docker.io/nutshell/e2e-busybox:1";

/// PIDs of `nutshell-vmm` processes whose command line names `run_dir`.
fn vmms_under(run_dir: &Path) -> Vec<u32> {
    let needle = run_dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == "nutshell-vmm")
                .unwrap_or(false)
        })
        .collect()
}

#[test]
#[ignore = "slow lane: needs root, containerd and the guest kernel (scripts/test.sh runs it)"]
fn ctr_runs_a_container_in_a_nutshell_microvm() {
    let kernel = guest_artifact("vmlinux").unwrap();
    let initramfs = guest_artifact("initramfs.cpio").unwrap();
    let vmm = vmm_binary().unwrap();
    let shim = shim_binary().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "kernel = {:?}\ninitramfs = {:?}\nvmm = {:?}\nrun_dir = {:?}\n\
             boot_timeout_secs = 300\nrpc_timeout_secs = 120\ntemplate_dir = {:?}\n",
            kernel,
            initramfs,
            vmm,
            run_dir,
            template_cache()
        ),
    )
    .unwrap();
    // containerd finds `containerd-shim-nutshell-v2` on its PATH and the shim reads its config
    // from NUTSHELL_CONFIG; both are inherited from this process, which starts containerd.
    let path = format!(
        "{}:{}",
        shim.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    std::env::set_var("PATH", path);
    std::env::set_var("NUTSHELL_CONFIG", &config);

    let tarball = image::busybox_image(IMAGE)
        .unwrap()
        .tarball(&target_dir().join("nutshell").join("bench-images"))
        .unwrap();
    let containerd = Containerd::start(&ContainerdOptions::default()).unwrap();
    let ctr = containerd.ctr();
    ctr.import_image(&tarball).unwrap();

    let host_release = Command::new("uname").arg("-r").output().unwrap().stdout;
    let host_release = String::from_utf8(host_release).unwrap();
    let run = |id: &str, script: &str| {
        ctr.command()
            .args([
                "run",
                "--rm",
                "--runtime",
                "io.containerd.nutshell.v2",
                IMAGE,
                id,
            ])
            .args(["sh", "-c", script])
            .output()
            .unwrap()
    };

    let out = run(
        "e2e-hello",
        "echo hello from nutshell; uname -r; echo to-stderr >&2",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stdout}\n{stderr}\n{}",
        containerd.log_tail(4000)
    );
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("hello from nutshell"), "{stdout}");
    let guest_release = lines.next().unwrap_or_default();
    assert!(
        !guest_release.is_empty() && guest_release != host_release.trim(),
        "the container ran on the host kernel ({guest_release:?})"
    );
    assert!(stderr.contains("to-stderr"), "{stderr}");

    // The exit code reaches ctr.
    let out = run("e2e-exit", "exit 3");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        containerd.log_tail(8000)
    );

    // Nothing is left: no VMM, no sandbox directory.
    assert_eq!(vmms_under(&run_dir), Vec::<u32>::new());
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "left under {}: {left:?}",
        run_dir.display()
    );
}

//! `nutshell-demo`: runs one container in a Nutshell microVM through a real containerd, as an
//! operator would with `ctr run --runtime io.containerd.nutshell.v2`, and shows what it printed.
//!
//! It starts a private containerd (its own socket, root and state, stopped on exit), builds the
//! busybox image locally from Debian's busybox-static and imports it, then runs the container.
//! `containerd-shim-nutshell-v2` must be on `PATH` and `NUTSHELL_CONFIG` name its config
//! (`scripts/demo.sh` sets both).

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use nutshell_test_support::containerd::{Containerd, ContainerdOptions};
use nutshell_test_support::image;

const IMAGE: &str = "docker.io/nutshell/demo-busybox:1";

const SCRIPT: &str = "echo \"Hello from a container in a Nutshell microVM\"; \
    echo \"guest kernel: $(uname -r)\"; echo \"hostname: $(hostname)\"; \
    echo \"memory: $(grep MemTotal /proc/meminfo)\"; echo \"pid: $$\"";

fn run() -> anyhow::Result<i32> {
    let cache = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tarball = image::busybox_image(IMAGE)?
        .tarball(&cache)
        .context("building the busybox image")?;
    let containerd = Containerd::start(&ContainerdOptions::default())?;
    let ctr = containerd.ctr();
    ctr.import_image(&tarball)?;
    eprintln!("[nutshell-demo] ctr run --runtime io.containerd.nutshell.v2 {IMAGE} demo sh -c ...");
    let started = Instant::now();
    let status = ctr
        .command()
        .args([
            "run",
            "--rm",
            "--runtime",
            "io.containerd.nutshell.v2",
            IMAGE,
            "demo",
        ])
        .args(["sh", "-c", SCRIPT])
        .status()
        .context("running ctr")?;
    eprintln!(
        "[nutshell-demo] the container exited with {status} after {:.1} s (the VM is restored \
         from an agent-ready template; the first run on a machine builds it: one guest boot, \
         slow on a kvm_pvm host where the guest kernel's ring 0 is emulated)",
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        eprintln!("{}", containerd.log_tail(4000));
    }
    Ok(status.code().unwrap_or(1))
}

fn main() -> ExitCode {
    match run() {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("nutshell-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

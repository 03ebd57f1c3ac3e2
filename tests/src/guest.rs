//! Driving containers in a guest through the agent API, as the shim does: the guest's OCI spec
//! of a container and the host ends of its stdio streams.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use nutshell_protocol::client::connect_hybrid_retry;
use nutshell_protocol::GUEST_SHARED_DIR;
use oci_spec::runtime::{LinuxNamespaceType, ProcessBuilder, RootBuilder, Spec};

/// The default OCI spec (runc's) with `args` (PATH=/bin), the guest rootfs path of container
/// `id` (`<shared>/<id>/rootfs`, writable), the sandbox's hostname, and no network namespace of
/// its own (the pod's is the VM's).
pub fn container_spec(id: &str, args: &[&str]) -> Result<Spec> {
    let mut spec = Spec::default();
    // Inherit the sandbox's hostname (CreateSandbox) instead of the default spec's.
    spec.set_hostname(None);
    let process = ProcessBuilder::default()
        .args(args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .env(vec!["PATH=/bin".to_string()])
        .cwd("/")
        .build()
        .context("OCI process")?;
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path(format!("{GUEST_SHARED_DIR}/{id}/rootfs"))
            .readonly(false)
            .build()
            .context("OCI root")?,
    ));
    let mut linux = spec.linux().clone().context("the default spec has linux")?;
    let ns: Vec<_> = linux
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.typ() != LinuxNamespaceType::Network)
        .collect();
    linux.set_namespaces(Some(ns));
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// Connects the host ends of a process's streams in threads (before the RPC that creates the
/// process, as the shim does); each thread returns everything it read until EOF, or gives up
/// after `timeout` without data.
pub fn connect_streams(
    uds: &Path,
    ports: &[u32],
    timeout: Duration,
) -> Vec<JoinHandle<Result<Vec<u8>>>> {
    ports
        .iter()
        .map(|&port| {
            let uds = uds.to_path_buf();
            std::thread::spawn(move || {
                let mut s: UnixStream =
                    connect_hybrid_retry(&uds, port, timeout, Duration::from_millis(20))
                        .with_context(|| format!("connect to guest port {port}"))?;
                s.set_read_timeout(Some(timeout))?;
                let mut out = Vec::new();
                s.read_to_end(&mut out)
                    .with_context(|| format!("read guest port {port}"))?;
                Ok(out)
            })
        })
        .collect()
}

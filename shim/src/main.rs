//! `containerd-shim-nutshell-v2`: the containerd shim v2 of Nutshell. Runtime type
//! `io.containerd.nutshell.v2`; each pod (or each container without a pod) runs in a KVM
//! microVM of its own, where nutshell-agent runs its containers.
//!
//! containerd runs `containerd-shim-nutshell-v2 -namespace N -id ID -address A start` in the
//! bundle directory; `start` answers the address of the shim serving the container's pod,
//! spawning it first if there is none ([`pod::grouping`]). The served process implements the
//! Task API ([`service::Service`]).

mod cgroup;
mod config;
mod convert;
mod error;
mod events;
mod hostfs;
mod net;
mod pod;
mod policy;
mod portforward;
mod sandbox;
mod service;
mod spec;
mod start_gate;
mod state;
mod stdio;
mod sys;
mod task;
mod vm;

use std::os::unix::fs::FileTypeExt as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use containerd_shim::api::DeleteResponse;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Flags, Shim, StartOpts};

use crate::config::Config;

/// The runtime id containerd knows this shim by.
const RUNTIME_ID: &str = "io.containerd.nutshell.v2";

/// When this shim process started: the reference of the host-side timings it logs.
static STARTED: OnceLock<Instant> = OnceLock::new();

/// Time since this shim process started (zero if `main` did not record it).
pub(crate) fn since_start() -> std::time::Duration {
    STARTED.get().map(Instant::elapsed).unwrap_or_default()
}

/// The shim process.
struct NutshellShim {
    namespace: String,
    id: String,
    bundle: String,
    /// The address this shim serves on (`-socket unix://PATH`; empty for `start`/`delete`).
    socket: String,
    config: Result<Config, String>,
    exit: Arc<ExitSignal>,
}

impl Shim for NutshellShim {
    type T = service::Service;

    fn new(_runtime_id: &str, args: &Flags, config: &mut containerd_shim::Config) -> Self {
        let ours = Config::load(None).map_err(|e| error::chain(&e));
        if let Ok(c) = &ours {
            config.default_log_level = c.log_filter().to_string().to_lowercase();
        }
        NutshellShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            socket: args.socket.clone(),
            config: ours,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd runs `start` in the bundle directory.
        let spec = containerd_shim::util::read_spec_from_file(".")?;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let grouping = pod::grouping(&opts.id, &annotations)
            .map_err(|e| containerd_shim::Error::InvalidArgument(e.to_string()))?;
        // The pod's shim is running already (an app container): its address, no new process.
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &grouping);
        match pod::shim_serves(&address, pod::GROUP_SHIM_CONNECT_TIMEOUT) {
            Ok(true) => {
                containerd_shim::util::write_address(&address)?;
                return Ok(address);
            }
            Ok(false) => {}
            Err(e) => {
                return Err(containerd_shim::Error::Other(format!(
                    "the shim of {grouping:?} is not answering: {e}"
                )))
            }
        }
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // The shim serving this container died: clean up what it left.
        if let Ok(config) = &self.config {
            let spec =
                oci_spec::runtime::Spec::load(Path::new(&self.bundle).join("config.json")).ok();
            let annotations = spec
                .as_ref()
                .and_then(|s| s.annotations().clone())
                .unwrap_or_default();
            if let Ok(role) = pod::Role::from_annotations(&self.id, &annotations) {
                let paths = vm::SandboxPaths::new(&config.run_dir, role.sandbox_id(&self.id));
                if task::Kind::of(&role).boots_vm() {
                    cleanup_sandbox(&paths);
                    if let Some(netns) = spec.as_ref().and_then(net::netns_path) {
                        if let Err(e) = net::clean_up_after_dead_shim(&netns) {
                            log::warn!("{}", error::chain(&e));
                        }
                    }
                } else {
                    vm::remove_sandbox_dir(&paths.shared().join(&self.id));
                }
            }
        }
        remove_dead_shim_socket(&Path::new(&self.bundle).join("address"));
        let mut resp = DeleteResponse::new();
        resp.exit_status = 128 + 9;
        resp.exited_at = containerd_shim::util::timestamp().ok().into();
        Ok(resp)
    }

    fn wait(&mut self) {
        self.exit.wait();
        // The shim crate removes the socket after this returns, but finds its path in the
        // bundle's `address` file, which containerd may have removed with the bundle by then
        // (a pod's last task deleted, Shutdown sent): the socket stayed in /run/containerd/s.
        // containerd sent Shutdown; nothing is to connect any more.
        if let Some(path) = socket_path(&self.socket) {
            match std::fs::remove_file(&path) {
                Ok(()) => log::debug!("removed the shim's socket {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
            }
        }
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        log::info!(
            "{RUNTIME_ID} {} serving namespace {} ({})",
            env!("CARGO_PKG_VERSION"),
            self.namespace,
            self.id
        );
        if let Err(e) = &self.config {
            log::error!("configuration: {e}");
        }
        let service = service::Service::new(
            self.namespace.clone(),
            self.config.clone(),
            publisher,
            Arc::clone(&self.exit),
        );
        exit_on_signals(service.clone());
        service
    }
}

/// Kills a VMM left by a dead shim (by its PID file, only if it still is a nutshell-vmm) and
/// removes the sandbox directory.
fn cleanup_sandbox(paths: &vm::SandboxPaths) {
    if let Some(pid) = std::fs::read_to_string(paths.pid_file())
        .ok()
        .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
        .filter(|pid| *pid > 1)
    {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = comm.trim() == "nutshell-vmm"
            && String::from_utf8_lossy(&cmdline).contains(&*paths.dir.to_string_lossy());
        if ours {
            // The PID was checked to be this sandbox's VMM; its jailed child goes too.
            vm::kill_vmm(pid);
        }
    }
    // The VMM is gone (or going): its cgroup, if this sandbox's shim made it, goes too.
    let created = cgroup::load_created(
        &paths.dir.join(cgroup::CREATED_LIST),
        Path::new(cgroup::DEFAULT_ROOT),
    );
    cgroup::remove_created(&created);
    vm::remove_sandbox_dir(Path::new(&paths.dir));
}

/// Removes the socket named in `address_file` (the bundle's `address`) when no shim serves
/// on it any more: a killed shim leaves it in /run/containerd/s. A socket that accepts a
/// connection stays: a pod's shim still serves the pod's other containers.
fn remove_dead_shim_socket(address_file: &Path) {
    let Ok(address) = std::fs::read_to_string(address_file) else {
        return;
    };
    let Some(path) = socket_path(&address) else {
        return;
    };
    let path = path.as_path();
    match UnixStream::connect(path) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Ok(()) => log::info!("removed the dead shim's socket {}", path.display()),
                Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
            }
        }
        _ => {}
    }
}

/// The socket file of a shim address `unix://PATH`: only an absolute path to an existing
/// socket (never a regular file, never an abstract or relative address).
fn socket_path(address: &str) -> Option<std::path::PathBuf> {
    let path = Path::new(address.trim().strip_prefix("unix://")?);
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    (path.is_absolute() && is_socket).then(|| path.to_owned())
}

/// This process's children: the VMMs it spawned (by the parent PID in `/proc/<pid>/stat`).
pub(crate) fn child_pids() -> Vec<libc::pid_t> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| nutshell_protocol::procfs::parse_ppid(&stat))
                == Some(me)
        })
        .collect()
}

/// SIGTERM or SIGINT ends the served shim through [`service::Service::terminate`]. The crate
/// only logs them; containerd's own shims exit on them.
fn exit_on_signals(service: service::Service) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot watch SIGTERM/SIGINT: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                service.terminate(if signal == SIGTERM {
                    "SIGTERM"
                } else {
                    "SIGINT"
                });
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot watch SIGTERM/SIGINT: {e}");
    }
}

fn main() {
    STARTED.get_or_init(Instant::now);
    containerd_shim::run::<NutshellShim>(RUNTIME_ID, None);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn a_dead_shims_socket_is_removed_and_a_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let address_file = dir.path().join("address");
        let socket = dir.path().join("shim.sock");
        std::fs::write(&address_file, format!("unix://{}", socket.display())).unwrap();

        let listener = UnixListener::bind(&socket).unwrap();
        remove_dead_shim_socket(&address_file);
        assert!(socket.exists(), "a live shim's socket was removed");

        // The shim died: the file stays, connecting is refused.
        drop(listener);
        remove_dead_shim_socket(&address_file);
        assert!(!socket.exists(), "a dead shim's socket stays");
    }

    #[test]
    fn the_parent_pid_is_read_past_the_command_name() {
        // This test process is a child of the test harness, not of itself.
        assert!(!child_pids().contains(&(std::process::id() as libc::pid_t)));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        assert!(child_pids().contains(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn only_sockets_named_by_an_absolute_unix_address_go() {
        let dir = tempfile::tempdir().unwrap();
        let address_file = dir.path().join("address");
        // A dead shim's socket: only the address's form keeps it.
        let socket = dir.path().join("shim.sock");
        drop(UnixListener::bind(&socket).unwrap());
        let cwd = std::env::current_dir().unwrap();
        let relative = format!(
            "{}{}",
            "../".repeat(cwd.components().count() - 1),
            socket.strip_prefix("/").unwrap().display()
        );
        assert!(Path::new(&relative).exists(), "{relative}");
        for address in [
            format!("{}", socket.display()),
            format!("unix://{relative}"),
        ] {
            std::fs::write(&address_file, &address).unwrap();
            remove_dead_shim_socket(&address_file);
            assert!(socket.exists(), "removed for {address:?}");
        }
        // A plain file is never removed.
        let file = dir.path().join("plain");
        std::fs::write(&file, b"not a socket").unwrap();
        std::fs::write(&address_file, format!("unix://{}", file.display())).unwrap();
        remove_dead_shim_socket(&address_file);
        assert!(file.exists());
        // No address file: nothing to do. The well-formed address removes the socket.
        remove_dead_shim_socket(&dir.path().join("missing"));
        assert!(socket.exists());
        std::fs::write(&address_file, format!("unix://{}", socket.display())).unwrap();
        remove_dead_shim_socket(&address_file);
        assert!(!socket.exists());
    }
}

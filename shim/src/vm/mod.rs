//! One sandbox's microVM: its host directory, the `nutshell-vmm` child process, its logs, and
//! the agent inside.
//!
//! `<run_dir>/<sandbox-id>/` holds `vsock.sock` (hybrid vsock), `console.log`, `vmm.pid` and
//! `shared/` (exported to the guest with virtio-fs, tag `nutshell`; containers' root
//! filesystems are mounted at `shared/<container-id>/rootfs`). Teardown removes all of it.
//!
//! The shim is a child subreaper and the containerd-shim crate's SIGCHLD handler reaps every
//! child, so the VMM's exit is learned from the crate's exit monitor, not from `Child::wait`.

mod args;
mod control;
mod launch;
mod logs;
mod teardown;
mod template;

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nutshell_protocol::client::{AgentClient, ClientError, ConnectOptions};
use nutshell_protocol::types::{ProcessExit, SandboxSpec};

use crate::cgroup::PodCgroup;
use crate::config::{Config, VirtioFs};
use crate::error::{Result, ShimError};
use crate::net::PodNetwork;
use crate::pod::VmSize;
pub use args::vmm_args;
use args::vmm_supports_shared_dir;
pub(crate) use launch::unsubscribe;
use launch::{pod_cgroup, Launch, LaunchError};
use logs::clean_line;
pub use nutshell_protocol::SHARED_FS_TAG as FS_TAG;
use teardown::kill_and_wait;
pub use teardown::{kill_vmm, remove_sandbox_dir};
use template::pod_template;

/// The descriptor number the VMM finds the pod's tap at (`--net-fd`).
pub const NET_FD: RawFd = 3;

/// First guest vsock port handed out for stdio streams.
pub const FIRST_STDIO_PORT: u32 = 0x4000_0000;

/// How the VMM ended: its exit code, or 128 + signal.
pub type VmExitCode = i32;

/// A handle with no VM behind it, for unit tests: its directory is `dir`, its agent client's
/// peer is gone (every agent call fails at once) and its PID does not fit a `pid_t`, so that
/// [`SandboxVm::stop`] can never signal a process.
#[cfg(test)]
pub fn detached(id: &str, dir: &Path) -> SandboxVm {
    let (agent_end, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    SandboxVm {
        id: id.to_owned(),
        dir: dir.to_path_buf(),
        pid: u32::MAX,
        size: VmSize {
            vcpus: 1,
            memory_mib: 128,
        },
        agent: AgentClient::from_stream(agent_end, Duration::from_secs(1))
            .expect("a client over a socketpair"),
        blocking: Mutex::new(None),
        exit: Arc::new(ExitCell::default()),
        cgroup: Mutex::new(None),
        net: None,
    }
}

/// What the VM's watcher calls when the VMM exits.
pub type OnExit = Box<dyn FnOnce(VmExitCode) + Send>;

/// A running sandbox VM.
pub struct SandboxVm {
    /// The sandbox id.
    pub id: String,
    /// `<run_dir>/<id>`.
    pub dir: PathBuf,
    /// The VMM's PID.
    pub pid: u32,
    /// The size it was given.
    pub size: VmSize,
    agent: AgentClient,
    /// The one connection for the calls that block until something happens in the guest
    /// (WaitProcess, GetOOMEvent), made on first use: ttrpc carries concurrent calls on one
    /// connection, and the agent serves each blocked one on a thread of that connection's
    /// pool. A connection per call made the guest accept it and start (then end) a ttrpc
    /// connection's six threads at every exec, which this host's emulated guest kernel paid
    /// for on the exec's path.
    blocking: Mutex<Option<Arc<AgentClient>>>,
    exit: Arc<ExitCell>,
    cgroup: Mutex<Option<PodCgroup>>,
    net: Option<PodNetwork>,
}

impl std::fmt::Debug for SandboxVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxVm")
            .field("id", &self.id)
            .field("pid", &self.pid)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// The VMM's exit code, set once by the exit watcher.
type ExitCell = nutshell_protocol::exit_cell::ExitCell<VmExitCode>;

/// Paths of a sandbox's directory.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    /// `<run_dir>/<id>`.
    pub dir: PathBuf,
}

impl SandboxPaths {
    /// The paths of sandbox `id` under `run_dir`.
    pub fn new(run_dir: &Path, id: &str) -> Self {
        SandboxPaths {
            dir: run_dir.join(id),
        }
    }
    /// The hybrid vsock socket.
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    /// The guest console.
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The shared directory.
    pub fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }
    /// The VMM's control socket (`--api-sock`: Pause, Resume, Stats, Snapshot, Shutdown).
    pub fn api(&self) -> PathBuf {
        self.dir.join("vmm.sock")
    }
    /// The VMM's PID file (for `delete` after a shim crash).
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("vmm.pid")
    }
}

impl SandboxVm {
    /// Creates the sandbox directory with its empty shared directory.
    pub fn create_dir(config: &Config, id: &str) -> Result<SandboxPaths> {
        let paths = SandboxPaths::new(&config.run_dir, id);
        if paths.dir.exists() {
            return Err(ShimError::AlreadyExists {
                kind: "sandbox directory",
                id: paths.dir.display().to_string(),
            });
        }
        std::fs::create_dir_all(paths.shared()).map_err(ShimError::io(format!(
            "create {}",
            paths.shared().display()
        )))?;
        Ok(paths)
    }

    /// Starts the VMM on a directory made by [`SandboxVm::create_dir`], waits for the agent
    /// and creates the sandbox `sandbox` in the guest (id, hostname, the pod's namespace modes
    /// and sysctls: [`crate::spec::sandbox_spec`]). On any failure the VMM is stopped and the
    /// directory (with any mount under it) removed. `on_exit` is called once, from the watcher
    /// thread, when the VMM exits. With `cgroups_path` (the spec's `linux.cgroupsPath`) the
    /// VMM runs in that cgroup on the host, created if missing and removed by [`Self::stop`].
    /// With `net` (the pod's network, attached) the VM's NIC is on its tap and the guest is
    /// given its addresses and routes; its redirect goes with [`Self::stop`] (or at once,
    /// on failure).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: &Config,
        paths: &SandboxPaths,
        sandbox: &SandboxSpec,
        size: VmSize,
        cgroups_path: Option<&str>,
        net: Option<PodNetwork>,
        on_exit: OnExit,
    ) -> Result<SandboxVm> {
        let mut cgroup = None;
        let mut net = net;
        let result = match cgroups_path {
            Some(path) => pod_cgroup(path, paths).map(|cg| cgroup = Some(cg)),
            None => Ok(()),
        }
        .and_then(|()| {
            Self::spawn_and_connect(config, sandbox, size, paths, &mut cgroup, &mut net, on_exit)
        });
        match result {
            Ok(vm) => Ok(vm),
            Err(e) => {
                // Still here: the VM never owned it (the VMM is gone, or never ran).
                if let Some(mut cg) = cgroup {
                    cg.remove();
                }
                if let Some(net) = net {
                    net.detach();
                }
                remove_sandbox_dir(&paths.dir);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_and_connect(
        config: &Config,
        sandbox: &SandboxSpec,
        size: VmSize,
        paths: &SandboxPaths,
        cgroup: &mut Option<PodCgroup>,
        net: &mut Option<PodNetwork>,
        on_exit: OnExit,
    ) -> Result<SandboxVm> {
        let id = sandbox.sandbox_id.as_str();
        let virtio_fs = match config.virtio_fs {
            VirtioFs::On => true,
            VirtioFs::Off => false,
            VirtioFs::Auto => vmm_supports_shared_dir(&config.vmm),
        };
        if !virtio_fs {
            log::warn!(
                "sandbox {id}: {} has no --shared-dir (virtio-fs): containers will have no root filesystem",
                config.vmm.display()
            );
        }
        let template = config
            .templates
            .then(|| pod_template(config, id, size, virtio_fs))
            .flatten();
        // The VMM's copy of the tap is made at each spawn; the shim's closes once the VM is up.
        let tap = net.as_mut().and_then(PodNetwork::take_tap);
        let launch = Launch {
            config,
            paths,
            id,
            cgroup: cgroup.as_ref(),
            netns_fd: net.as_ref().map(PodNetwork::netns_fd),
            tap_fd: tap.as_ref().map(AsRawFd::as_raw_fd),
        };
        let mac = net.as_ref().map(PodNetwork::mac);
        let on_exit: ExitSlot = Arc::new(Mutex::new(Some(on_exit)));
        let started = Instant::now();
        let (pid, exit, agent) = match &template {
            Some(t) => {
                // Armed once the restored VM answers: a failed restore's exit is not the pod's.
                let unarmed: ExitSlot = Arc::new(Mutex::new(None));
                let args = vmm_args(config, paths, size, virtio_fs, mac, Some(t));
                match launch.run(&args, &unarmed) {
                    Ok(up) => {
                        let slot = on_exit.lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let Some(cb) = slot {
                            arm(&unarmed, &up.1, cb);
                        }
                        up
                    }
                    Err(LaunchError::ExitedEarly(e)) => {
                        log::warn!(
                            "sandbox {id}: restore from template {} impossible ({}); booting cold",
                            t.key,
                            crate::error::chain(&e)
                        );
                        let args = vmm_args(config, paths, size, virtio_fs, mac, None);
                        launch
                            .run(&args, &on_exit)
                            .map_err(LaunchError::into_inner)?
                    }
                    Err(e) => return Err(e.into_inner()),
                }
            }
            None => {
                let args = vmm_args(config, paths, size, virtio_fs, mac, None);
                launch
                    .run(&args, &on_exit)
                    .map_err(LaunchError::into_inner)?
            }
        };
        drop(tap);
        let vm = SandboxVm {
            id: id.to_owned(),
            dir: paths.dir.clone(),
            pid,
            size,
            agent,
            blocking: Mutex::new(None),
            exit,
            cgroup: Mutex::new(cgroup.take()),
            net: net.take(),
        };
        log::info!(
            "sandbox {id}: agent answered {:.2} s after the VMM spawn ({})",
            started.elapsed().as_secs_f64(),
            if template.is_some() {
                "template"
            } else {
                "cold boot"
            }
        );
        // A VM restored from a template starts with the template's clock and RNG state, shared
        // by every VM from it: give it the host's clock and fresh entropy first (harmless
        // after a cold boot).
        if let Err(e) = vm.agent.refresh_guest_now() {
            vm.stop();
            return Err(ShimError::agent("RefreshGuest")(e));
        }
        if let Err(e) = vm.configure_network() {
            vm.stop();
            return Err(e);
        }
        if let Err(e) = vm.agent.create_sandbox(sandbox) {
            vm.stop();
            return Err(ShimError::agent("CreateSandbox")(e));
        }
        Ok(vm)
    }

    /// Gives the guest's NIC the pod's MAC, MTU, addresses and routes.
    fn configure_network(&self) -> Result<()> {
        let Some(net) = &self.net else {
            return Ok(());
        };
        let started = Instant::now();
        let got = self
            .agent
            .update_interface(&net.interface, &net.routes)
            .map_err(ShimError::agent("UpdateInterface"))?;
        // What the guest says is only logged (cut and masked: it is the guest's text).
        log::info!(
            "sandbox {}: guest network configured in {:.1} ms: {} has MAC {}, MTU {}, \
             {} addresses, {} routes; port-forward {}",
            self.id,
            started.elapsed().as_secs_f64() * 1000.0,
            clean_line(&got.name),
            clean_line(&got.mac),
            got.mtu,
            got.addresses.len(),
            net.routes.len(),
            net.forward_port()
                .map_or_else(|| "off".to_owned(), |p| format!("via 127.0.0.1:{p}"))
        );
        Ok(())
    }

    /// The agent client for ordinary calls (bounded by the RPC timeout).
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The shared connection to the agent without RPC timeout, for the calls that block
    /// (WaitProcess, GetOOMEvent); connected on first use.
    pub fn blocking_agent(&self) -> Result<Arc<AgentClient>> {
        let mut slot = self.blocking.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = slot.as_ref() {
            return Ok(Arc::clone(client));
        }
        let opts = ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            rpc_timeout: Duration::ZERO,
            ..Default::default()
        };
        let client = AgentClient::connect(&self.vsock(), &opts)
            .map(Arc::new)
            .map_err(ShimError::agent("connect"))?;
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Forgets `client` as the shared blocking connection (it failed): the next call connects
    /// again.
    fn forget_blocking(&self, client: &Arc<AgentClient>) {
        let mut slot = self.blocking.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            *slot = None;
        }
    }

    /// Blocks until process `exec_id` (empty: init) of container `id` has exited in the guest;
    /// how it exited. On the shared blocking connection; if that connection fails while the
    /// VM runs, it is made again once and the wait repeated (the agent keeps the exit).
    pub fn wait_process(&self, id: &str, exec_id: &str) -> Result<ProcessExit> {
        let mut reconnected = false;
        loop {
            let agent = self.blocking_agent()?;
            match agent.wait_process(id, exec_id) {
                Ok(exit) => return Ok(exit),
                Err(ClientError::Transport(e)) if !reconnected && self.exited().is_none() => {
                    log::warn!("{id}/{exec_id}: WaitProcess: {e}; connecting again");
                    self.forget_blocking(&agent);
                    reconnected = true;
                }
                Err(e) => return Err(ShimError::agent("WaitProcess")(e)),
            }
        }
    }

    /// The hybrid vsock socket.
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// The shared directory on the host.
    pub fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// The VMM's exit status, if it exited.
    pub fn exited(&self) -> Option<VmExitCode> {
        self.exit.get()
    }

    /// Stops the VM: asks the agent to power off, then SIGKILLs the VMM if it is still there;
    /// then unmounts everything under the sandbox directory and removes it.
    pub fn stop(&self) {
        if self.exit.get().is_none() {
            match self.agent.shutdown() {
                Ok(()) => {
                    if self.exit.wait_timeout(Duration::from_secs(10)).is_none() {
                        log::warn!("sandbox {}: the guest did not power off in 10 s", self.id);
                    }
                }
                Err(e) => log::debug!("sandbox {}: agent Shutdown: {e}", self.id),
            }
            kill_and_wait(self.pid, &self.exit);
        }
        if let Some(mut cg) = self.cgroup.lock().unwrap_or_else(|e| e.into_inner()).take() {
            cg.remove();
        }
        if let Some(net) = &self.net {
            net.detach();
        }
        remove_sandbox_dir(&self.dir);
    }
}

/// What the watcher of one VMM process calls when it exits: empty while the process is not
/// (yet) the sandbox's VM, e.g. a restore that may still fall back to a cold boot.
type ExitSlot = Arc<Mutex<Option<OnExit>>>;

/// Hands `on_exit` to a VMM's watcher through `slot`; calls it at once if the VMM exited
/// already (the watcher found the slot empty then).
fn arm(slot: &ExitSlot, exit: &ExitCell, on_exit: OnExit) {
    let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
    match exit.get() {
        Some(code) => {
            drop(guard);
            on_exit(code);
        }
        None => *guard = Some(on_exit),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_armed_callback_runs_once_even_after_an_early_exit() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let record = |calls: &Arc<Mutex<Vec<VmExitCode>>>| -> OnExit {
            let calls = Arc::clone(calls);
            Box::new(move |code| calls.lock().unwrap().push(code))
        };
        // Armed before the exit: the watcher's path takes it.
        let slot: ExitSlot = Arc::new(Mutex::new(None));
        let exit = ExitCell::default();
        arm(&slot, &exit, record(&calls));
        assert!(slot.lock().unwrap().is_some());
        // Armed after the exit (the watcher found the slot empty): called at once.
        let slot: ExitSlot = Arc::new(Mutex::new(None));
        let exit = ExitCell::default();
        exit.set(9);
        arm(&slot, &exit, record(&calls));
        assert!(slot.lock().unwrap().is_none());
        assert_eq!(*calls.lock().unwrap(), vec![9]);
    }
}

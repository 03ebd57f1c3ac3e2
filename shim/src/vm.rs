//! One sandbox's microVM: its host directory, the `nutshell-vmm` child process, its logs, and
//! the agent inside.
//!
//! `<run_dir>/<sandbox-id>/` holds `vsock.sock` (hybrid vsock), `console.log`, `vmm.pid` and
//! `shared/` (exported to the guest with virtio-fs, tag `nutshell`; containers' root
//! filesystems are mounted at `shared/<container-id>/rootfs`). Teardown removes all of it.
//!
//! The shim is a child subreaper and the containerd-shim crate's SIGCHLD handler reaps every
//! child, so the VMM's exit is learned from the crate's exit monitor, not from `Child::wait`.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, Subject, Topic, MONITOR};
use nutshell_protocol::client::{AgentClient, ClientError, ConnectOptions};
use nutshell_protocol::ratelimit::Window;
use nutshell_protocol::types::{SandboxSpec, ServingStatus};
use nutshell_protocol::vmm_client::{VmmClient, VmmClientError, VmmStats};

use crate::cgroup::{self, Layout, PodCgroup};
use crate::config::{Config, VirtioFs};
use crate::error::{Result, ShimError};
use crate::net::PodNetwork;
use crate::pod::VmSize;
pub use nutshell_protocol::SHARED_FS_TAG as FS_TAG;

/// The descriptor number the VMM finds the pod's tap at (`--net-fd`).
pub const NET_FD: RawFd = 3;

/// First guest vsock port handed out for stdio streams.
pub const FIRST_STDIO_PORT: u32 = 0x4000_0000;

/// Longest line of VMM stderr or guest console logged; the rest is cut.
const MAX_LOG_LINE: usize = 512;

/// How long a call waits for the VMM's control socket to accept.
// Pod-level Pause/Resume/Stats: the Task API wiring comes with the sandbox/task split.
const CONTROL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on one control call (Pause waits for every vCPU to leave the guest).
// Pod-level Pause/Resume/Stats: the Task API wiring comes with the sandbox/task split.
const CONTROL_RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Guest console lines logged per second at most (the guest writes what it wants).
const CONSOLE_LINES_PER_SEC: u32 = 50;

/// How the VMM ended: its exit code, or 128 + signal.
pub type VmExitCode = i32;

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
    next_port: AtomicU32,
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

/// The VMM's exit status, once known.
#[derive(Default)]
struct ExitCell {
    code: Mutex<Option<VmExitCode>>,
    cv: Condvar,
}

impl ExitCell {
    fn set(&self, code: VmExitCode) {
        let mut g = self.code.lock().unwrap_or_else(|e| e.into_inner());
        *g = Some(code);
        self.cv.notify_all();
    }

    fn get(&self) -> Option<VmExitCode> {
        *self.code.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self, timeout: Duration) -> Option<VmExitCode> {
        let g = self.code.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |c| c.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

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

/// Whether the VMM binary accepts `--shared-dir` (asked once per process).
fn vmm_supports_shared_dir(vmm: &Path) -> bool {
    static SUPPORT: OnceLock<bool> = OnceLock::new();
    *SUPPORT.get_or_init(|| {
        let child = Command::new(vmm)
            .arg("--help")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            return false;
        };
        let mut help = String::new();
        let read = child
            .stdout
            .take()
            .map(|mut out| out.read_to_string(&mut help));
        // The crate's reaper may have reaped it already; that is fine.
        let _ = child.wait();
        matches!(read, Some(Ok(_))) && help.contains("--shared-dir")
    })
}

/// The VMM's command line for a sandbox: a cold boot of the configured kernel, or with
/// `template` a restore of it; `net_mac`: the VM has a NIC with this MAC on the tap at
/// [`NET_FD`] (a restored NIC keeps the template's MAC, and the agent sets the pod's).
pub fn vmm_args(
    config: &Config,
    paths: &SandboxPaths,
    size: VmSize,
    virtio_fs: bool,
    net_mac: Option<&str>,
    template: Option<&nutshell_template::Template>,
) -> Vec<String> {
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let mut args = vec![
        // The VMM jails itself (namespaces, a root of its own files, capabilities, seccomp).
        "--jail".to_owned(),
    ];
    match template {
        Some(t) => args.extend(t.restore_args()),
        None => args.extend([
            "--kernel".to_owned(),
            p(&config.kernel),
            "--initrd".to_owned(),
            p(&config.initramfs),
            "--memory-mib".to_owned(),
            size.memory_mib.to_string(),
            "--vcpus".to_owned(),
            size.vcpus.to_string(),
            "--cmdline".to_owned(),
            config.kernel_cmdline.clone(),
        ]),
    }
    args.extend([
        "--vsock-uds".to_owned(),
        p(&paths.vsock()),
        "--api-sock".to_owned(),
        p(&paths.api()),
        "--console".to_owned(),
        p(&paths.console()),
        "--log-level".to_owned(),
        config.log_filter().to_string().to_lowercase(),
    ]);
    if virtio_fs {
        args.extend(["--shared-dir".to_owned(), p(&paths.shared())]);
        if template.is_none() {
            args.extend(["--fs-tag".to_owned(), FS_TAG.to_owned()]);
        }
    }
    if let Some(mac) = net_mac {
        args.extend(["--net-fd".to_owned(), NET_FD.to_string()]);
        if template.is_none() {
            args.extend(["--net-mac".to_owned(), mac.to_owned()]);
        }
    }
    args
}

/// Cuts a log line to [`MAX_LOG_LINE`] and masks control characters.
fn clean_line(line: &str) -> String {
    line.trim_end()
        .chars()
        .take(MAX_LOG_LINE)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
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
            next_port: AtomicU32::new(FIRST_STDIO_PORT),
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
            .update_interface(&net.interface)
            .map_err(ShimError::agent("UpdateInterface"))?;
        self.agent
            .update_routes(&net.routes)
            .map_err(ShimError::agent("UpdateRoutes"))?;
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

    /// A new connection to the agent without RPC timeout, for a call that blocks
    /// (WaitProcess, GetOOMEvent).
    pub fn blocking_agent(&self) -> Result<AgentClient> {
        let opts = ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            rpc_timeout: Duration::ZERO,
            ..Default::default()
        };
        AgentClient::connect(
            &SandboxPaths {
                dir: self.dir.clone(),
            }
            .vsock(),
            &opts,
        )
        .map_err(ShimError::agent("connect"))
    }

    /// The hybrid vsock socket.
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// A client of the VMM's control socket (one connection per call: calls are rare).
    fn control(&self) -> Result<VmmClient> {
        let path = SandboxPaths {
            dir: self.dir.clone(),
        }
        .api();
        VmmClient::connect(&path, CONTROL_CONNECT_TIMEOUT, CONTROL_RPC_TIMEOUT)
            .map_err(|e| self.control_error("connect", e))
    }

    fn control_error(&self, what: &str, e: VmmClientError) -> ShimError {
        if e.is_precondition() {
            return ShimError::FailedPrecondition(format!(
                "sandbox {}: VMM {what}: {}",
                self.id,
                crate::error::chain(&e)
            ));
        }
        ShimError::Vm {
            id: self.id.clone(),
            message: format!("VMM control socket {what}: {}", crate::error::chain(&e)),
        }
    }

    /// Pauses the whole VM (every vCPU; the pod's processes stop with it). FAILED_PRECONDITION
    /// if it is paused already or stopping.
    pub fn pause(&self) -> Result<()> {
        self.control()?
            .pause()
            .map_err(|e| self.control_error("Pause", e))?;
        log::info!("sandbox {}: VM paused", self.id);
        Ok(())
    }

    /// Resumes a paused VM. FAILED_PRECONDITION if it is running.
    pub fn resume(&self) -> Result<()> {
        self.control()?
            .resume()
            .map_err(|e| self.control_error("Resume", e))?;
        log::info!("sandbox {}: VM resumed", self.id);
        Ok(())
    }

    /// The VM's size, the VMM's resident guest memory and its uptime.
    pub fn stats(&self) -> Result<VmmStats> {
        self.control()?
            .stats()
            .map_err(|e| self.control_error("Stats", e))
    }

    /// The shared directory on the host.
    pub fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// A fresh guest port for a stdio stream.
    pub fn next_port(&self) -> u32 {
        self.next_port.fetch_add(1, Ordering::Relaxed)
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
                    if self.exit.wait(Duration::from_secs(10)).is_none() {
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

/// The template a pod's VM is restored from, found or built now; `None` (logged) when it
/// cannot be had: the VM then boots cold.
fn pod_template(
    config: &Config,
    id: &str,
    size: VmSize,
    virtio_fs: bool,
) -> Option<nutshell_template::Template> {
    let template = nutshell_template::TemplateConfig {
        vmm: config.vmm.clone(),
        kernel: config.kernel.clone(),
        initrd: config.initramfs.clone(),
        cmdline: config.kernel_cmdline.clone(),
        vcpus: u8::try_from(size.vcpus).unwrap_or(u8::MAX),
        memory_mib: size.memory_mib,
        fs_tag: virtio_fs.then(|| FS_TAG.to_owned()),
        cpu_profile: nutshell_template::CpuProfile::Auto,
        cache_dir: config.template_dir.clone(),
        ready_timeout: Duration::from_secs(config.boot_timeout_secs),
        jail: true,
    };
    let started = Instant::now();
    match nutshell_template::ensure(&template) {
        Ok(t) => {
            log::info!(
                "sandbox {id}: template {} {} in {:.3} s",
                t.key,
                if t.built { "built" } else { "found" },
                started.elapsed().as_secs_f64()
            );
            Some(t)
        }
        Err(e) => {
            log::warn!(
                "sandbox {id}: no template ({}); booting cold",
                nutshell_protocol::error_chain(&e)
            );
            None
        }
    }
}

/// Why a VMM launch failed.
enum LaunchError {
    /// The VMM exited before its agent answered (a restore that may fall back to a cold boot).
    ExitedEarly(ShimError),
    /// Anything else.
    Other(ShimError),
}

impl LaunchError {
    fn into_inner(self) -> ShimError {
        match self {
            LaunchError::ExitedEarly(e) | LaunchError::Other(e) => e,
        }
    }
}

/// What every VMM launch of one sandbox shares: where it runs and what it inherits.
struct Launch<'a> {
    config: &'a Config,
    paths: &'a SandboxPaths,
    id: &'a str,
    cgroup: Option<&'a PodCgroup>,
    netns_fd: Option<RawFd>,
    tap_fd: Option<RawFd>,
}

impl Launch<'_> {
    /// Spawns the VMM with `args` (in the pod's cgroup and network namespace, the tap at
    /// [`NET_FD`]), starts its watcher (which calls what `on_exit` holds when it exits) and its
    /// log followers, and connects to its agent. On failure the VMM is gone.
    fn run(
        &self,
        args: &[String],
        on_exit: &ExitSlot,
    ) -> std::result::Result<(u32, Arc<ExitCell>, AgentClient), LaunchError> {
        let (config, paths, id) = (self.config, self.paths, self.id);
        // Subscribe before spawning so that an immediate exit is not missed.
        let sub = monitor_subscribe(Topic::Pid).map_err(|e| {
            LaunchError::Other(ShimError::Internal(format!("subscribe to exits: {e}")))
        })?;
        // Opened before the fork: the child only writes to them (async-signal-safe).
        let procs = match self.cgroup.map(PodCgroup::procs_files).transpose() {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => {
                unsubscribe(sub.id);
                return Err(LaunchError::Other(e.into()));
            }
        };
        let fds: Vec<RawFd> = procs.iter().map(AsRawFd::as_raw_fd).collect();
        let (netns_fd, tap_fd) = (self.netns_fd, self.tap_fd);
        let mut command = Command::new(&config.vmm);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !fds.is_empty() || tap_fd.is_some() {
            // SAFETY: the closure runs in the forked child before exec and only calls write(2),
            // setns(2), dup2(2) and fcntl(2) (async-signal-safe) on descriptors that stay open
            // in the parent until `spawn` returns (the caller holds the tap and the network
            // namespace's descriptor).
            unsafe {
                command.pre_exec(move || {
                    cgroup::join_self(&fds)?;
                    // Before the tap's dup2, which may land on the namespace's descriptor.
                    if let Some(ns) = netns_fd {
                        if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    match tap_fd {
                        Some(fd) => pass_fd(fd, NET_FD),
                        None => Ok(()),
                    }
                });
            }
        }
        let spawned = command.spawn();
        drop(procs);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                unsubscribe(sub.id);
                return Err(LaunchError::Other(ShimError::io(format!(
                    "spawn {}",
                    config.vmm.display()
                ))(e)));
            }
        };
        let pid = child.id();
        log::info!(
            "sandbox {id}: spawned {} (pid {pid}) {:.3} s after the shim started: {}",
            config.vmm.display(),
            crate::since_start().as_secs_f64(),
            args.join(" ")
        );
        let _ = std::fs::write(paths.pid_file(), format!("{pid}\n"));

        let exit = Arc::new(ExitCell::default());
        {
            let exit = Arc::clone(&exit);
            let on_exit = Arc::clone(on_exit);
            let id = id.to_owned();
            let pid = i32::try_from(pid).unwrap_or(i32::MAX);
            let watcher = std::thread::Builder::new()
                .name(format!("vmm-watch-{id}"))
                .spawn(move || {
                    let code = loop {
                        match sub.rx.recv() {
                            Ok(ev) => {
                                if let Subject::Pid(p) = ev.subject {
                                    if p == pid {
                                        break ev.exit_code;
                                    }
                                }
                            }
                            // The monitor went away: the shim is exiting.
                            Err(_) => break 255,
                        }
                    };
                    unsubscribe(sub.id);
                    if code == 128 + libc::SIGSYS {
                        log::error!(
                            "sandbox {id}: VMM (pid {pid}) killed by SIGSYS: a seccomp filter refused a system call (the host's audit log or dmesg names it)"
                        );
                    } else {
                        log::info!("sandbox {id}: VMM (pid {pid}) exited with status {code}");
                    }
                    let callback = {
                        let mut slot = on_exit.lock().unwrap_or_else(|e| e.into_inner());
                        exit.set(code);
                        slot.take()
                    };
                    if let Some(callback) = callback {
                        callback(code);
                    }
                });
            if let Err(e) = watcher {
                kill_vmm(pid);
                return Err(LaunchError::Other(ShimError::io("spawn the VMM watcher")(
                    e,
                )));
            }
        }
        if let Some(stderr) = child.stderr.take() {
            let id = id.to_owned();
            let _ = std::thread::Builder::new()
                .name(format!("vmm-log-{id}"))
                .spawn(move || {
                    for line in BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        log::info!("vmm[{id}]: {}", clean_line(&line));
                    }
                });
        }
        spawn_console_tail(id.to_owned(), paths.console(), Arc::clone(&exit));
        // The child is reaped by the crate's SIGCHLD handler; dropping `Child` does not wait.
        drop(child);
        match connect_agent(config, paths, &exit) {
            Ok(agent) => Ok((pid, exit, agent)),
            Err(e) => {
                let early = exit.get().is_some();
                kill_and_wait(pid, &exit);
                Err(if early {
                    LaunchError::ExitedEarly(e)
                } else {
                    LaunchError::Other(e)
                })
            }
        }
    }
}

/// The pod's cgroup for the VMM, made (where missing) in every hierarchy; the directories made
/// are listed in the sandbox directory for `delete` after a dead shim.
fn pod_cgroup(cgroups_path: &str, paths: &SandboxPaths) -> Result<PodCgroup> {
    let rel = cgroup::parse_cgroups_path(cgroups_path)?;
    let layout = Layout::detect(Path::new(cgroup::DEFAULT_ROOT))?;
    let mut cg = PodCgroup::create(&layout, &rel)?;
    if let Err(e) = cgroup::save_created(&paths.dir.join(cgroup::CREATED_LIST), cg.created()) {
        cg.remove();
        return Err(ShimError::io("record the created cgroups")(e));
    }
    log::info!(
        "sandbox {}: the VMM runs in cgroup {} ({:?})",
        paths
            .dir
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        rel.display(),
        cg.dirs()
    );
    Ok(cg)
}

/// Ends a subscription to the crate's exit monitor.
/// In a forked child: `fd` becomes descriptor `target`, inherited by the exec.
fn pass_fd(fd: RawFd, target: RawFd) -> std::io::Result<()> {
    // SAFETY: dup2(2)/fcntl(2) on descriptors of this process; no memory is passed.
    let r = unsafe {
        if fd == target {
            // dup2 to itself keeps FD_CLOEXEC: clear it.
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Ends a subscription to the crate's exit monitor.
pub(crate) fn unsubscribe(id: i64) {
    if let Ok(mut m) = MONITOR.lock() {
        let _ = m.unsubscribe(id);
    }
}

/// The children of process `pid` (a jailed VMM's supervisor has one: the VMM).
pub fn children_of(pid: libc::pid_t) -> Vec<libc::pid_t> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| *p > 1)
        .collect()
}

/// SIGKILLs a VMM: the jailed VMM (the supervisor's child; it would also die with its
/// supervisor) first, then the process the shim spawned.
pub fn kill_vmm(pid: libc::pid_t) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for child in children_of(pid) {
        let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
        if comm.trim() == "nutshell-vmm" {
            let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
        }
    }
    // The caller checked that `pid` is the VMM.
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// SIGKILLs the VMM unless it exited, and waits for the reaper to report it.
fn kill_and_wait(pid: u32, exit: &ExitCell) {
    if exit.get().is_some() {
        return;
    }
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // `pid` is our child, not yet reported reaped.
        kill_vmm(pid);
    }
    if exit.wait(Duration::from_secs(10)).is_none() {
        log::error!("VMM pid {pid} not reaped 10 s after SIGKILL");
    }
}

/// How many rounds of unmounting [`remove_sandbox_dir`] tries: mounts can be stacked (the
/// jailed VMM binds the shared directory over itself, the shim mounts root filesystems
/// beneath), and one round may leave a mount that was under another.
const UNMOUNT_ROUNDS: usize = 8;

/// Mount points at or under `dir`, from this process's mountinfo.
fn mounts_under(dir: &Path) -> usize {
    nutshell_protocol::mountinfo::mount_points()
        .unwrap_or_default()
        .iter()
        .filter(|m| m.starts_with(dir))
        .count()
}

/// Unmounts everything under `dir` (deepest first, lazily, again until nothing is mounted
/// there) and removes it.
pub fn remove_sandbox_dir(dir: &Path) {
    let Some(d) = dir.to_str() else { return };
    for _ in 0..UNMOUNT_ROUNDS {
        if mounts_under(dir) == 0 {
            break;
        }
        if let Err(e) = containerd_shim::mount::umount_recursive(Some(d), libc::MNT_DETACH) {
            log::warn!("unmount under {d}: {e}");
        }
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("remove {d}: {e}");
        }
    }
}

/// Connects to the agent while the guest boots; fails early if the VMM exits.
fn connect_agent(config: &Config, paths: &SandboxPaths, exit: &ExitCell) -> Result<AgentClient> {
    let timeout = config.agent_timeout();
    let deadline = Instant::now() + timeout;
    let opts = ConnectOptions {
        connect_timeout: Duration::from_secs(1),
        retry_interval: Duration::from_millis(20),
        rpc_timeout: Duration::from_secs(config.rpc_timeout_secs),
        ..Default::default()
    };
    let vm_err = |message: String| ShimError::Vm {
        id: paths
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        message,
    };
    loop {
        if let Some(code) = exit.get() {
            return Err(vm_err(format!(
                "the VMM exited with status {code} before the agent answered"
            )));
        }
        match AgentClient::connect(&paths.vsock(), &opts) {
            Ok(agent) => {
                return match agent.check() {
                    Ok(ServingStatus::Serving) => Ok(agent),
                    Ok(s) => Err(vm_err(format!("the agent is not serving ({s:?})"))),
                    Err(e) => Err(ShimError::agent("Health.Check")(e)),
                };
            }
            Err(ClientError::Timeout { .. }) if Instant::now() < deadline => {}
            Err(e) if Instant::now() < deadline => {
                log::debug!("agent connect: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(vm_err(format!(
                    "the agent did not answer within {} s: {}",
                    timeout.as_secs(),
                    crate::error::chain(&e)
                )))
            }
        }
    }
}

/// Follows the guest console file and logs its lines with the sandbox id, rate-limited.
fn spawn_console_tail(id: String, path: PathBuf, exit: Arc<ExitCell>) {
    let _ = std::thread::Builder::new()
        .name(format!("console-{id}"))
        .spawn(move || {
            let mut pos = 0u64;
            let mut partial = Vec::new();
            let mut limit = Window::new(CONSOLE_LINES_PER_SEC, Duration::from_secs(1));
            loop {
                let done = exit.get().is_some();
                let mut buf = Vec::new();
                if let Ok(mut f) = std::fs::File::open(&path) {
                    if f.seek(SeekFrom::Start(pos)).is_ok() {
                        // At most 64 KiB per round: the guest cannot make us buffer more.
                        if let Ok(n) = f.take(64 << 10).read_to_end(&mut buf) {
                            pos += n as u64;
                        }
                    }
                }
                partial.extend_from_slice(&buf);
                while let Some(nl) = partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=nl).collect();
                    log_console_line(&id, &mut limit, &line);
                }
                // A line longer than the cap is logged cut, and counts against the limit.
                if partial.len() > MAX_LOG_LINE {
                    log_console_line(&id, &mut limit, &partial);
                    partial.clear();
                }
                if done && buf.is_empty() {
                    break;
                }
                if buf.is_empty() {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
}

/// Logs one guest console line if `limit` admits it, and the count of lines it dropped.
fn log_console_line(id: &str, limit: &mut Window, line: &[u8]) {
    let verdict = limit.check();
    if verdict.dropped_before > 0 {
        log::warn!(
            "guest[{id}]: {} console lines not logged (rate limit)",
            verdict.dropped_before
        );
    }
    if verdict.admit {
        log::info!(
            "guest[{id}]: {}",
            clean_line(&String::from_utf8_lossy(line))
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use nutshell_protocol::generated::vmm as vpb;
    use nutshell_protocol::generated::vmm_ttrpc;
    use nutshell_protocol::ttrpc::{self, TtrpcContext};

    #[test]
    fn vmm_command_line_follows_the_contract() {
        let config = Config {
            run_dir: "/run/nutshell".into(),
            ..Config::default()
        };
        let paths = SandboxPaths::new(&config.run_dir, "pod1");
        let size = VmSize {
            vcpus: 2,
            memory_mib: 512,
        };
        let template = nutshell_template::Template {
            dir: "/var/cache/nutshell/templates/k1".into(),
            key: "k1".into(),
            built: false,
        };
        let args = vmm_args(&config, &paths, size, true, None, Some(&template)).join(" ");
        for want in [
            "--restore /var/cache/nutshell/templates/k1 --template-key k1",
            "--vsock-uds /run/nutshell/pod1/vsock.sock",
            "--api-sock /run/nutshell/pod1/vmm.sock",
            "--shared-dir /run/nutshell/pod1/shared",
            "--console /run/nutshell/pod1/console.log",
            "--jail",
        ] {
            assert!(args.contains(want), "{want} missing in {args}");
        }
        for unwanted in [
            "--kernel",
            "--initrd",
            "--memory-mib",
            "--vcpus",
            "--cmdline",
            "--fs-tag",
        ] {
            assert!(
                !args.contains(unwanted),
                "{unwanted} with --restore: {args}"
            );
        }
        let args = vmm_args(
            &config,
            &paths,
            size,
            true,
            Some("02:42:0a:00:00:05"),
            Some(&template),
        )
        .join(" ");
        assert!(
            args.contains("--net-fd 3") && !args.contains("--net-mac"),
            "{args}"
        );
        let args = vmm_args(&config, &paths, size, true, None, None).join(" ");
        for want in [
            "--kernel /usr/local/share/nutshell/vmlinux",
            "--initrd /usr/local/share/nutshell/initramfs.cpio",
            "--memory-mib 512",
            "--vcpus 2",
            "--vsock-uds /run/nutshell/pod1/vsock.sock",
            "--shared-dir /run/nutshell/pod1/shared",
            "--fs-tag nutshell",
            "--console /run/nutshell/pod1/console.log",
            "--api-sock /run/nutshell/pod1/vmm.sock",
            "--jail",
        ] {
            assert!(args.contains(want), "{want} missing in {args}");
        }
        assert!(!args.contains("--restore"), "{args}");
        let args = vmm_args(&config, &paths, size, false, None, None).join(" ");
        assert!(!args.contains("--shared-dir") && !args.contains("--fs-tag"));
        let cold = config;
        let args = vmm_args(&cold, &paths, size, true, None, None).join(" ");
        assert!(
            !args.contains("--net-fd"),
            "no NIC without a pod network: {args}"
        );
        let args = vmm_args(&cold, &paths, size, true, Some("02:42:0a:00:00:05"), None).join(" ");
        assert!(
            args.contains("--net-fd 3 --net-mac 02:42:0a:00:00:05"),
            "{args}"
        );
    }

    /// A stand-in VMM control service: Pause/Resume follow a paused flag like the VMM's
    /// (an illegal transition is FAILED_PRECONDITION), Stats reports fixed numbers.
    struct FakeVmm {
        paused: Mutex<bool>,
    }

    impl vmm_ttrpc::Vmm for FakeVmm {
        fn pause(&self, _: &TtrpcContext, _: vpb::PauseRequest) -> ttrpc::Result<vpb::Empty> {
            self.flip(true)
        }
        fn resume(&self, _: &TtrpcContext, _: vpb::ResumeRequest) -> ttrpc::Result<vpb::Empty> {
            self.flip(false)
        }
        fn stats(
            &self,
            _: &TtrpcContext,
            _: vpb::StatsRequest,
        ) -> ttrpc::Result<vpb::StatsResponse> {
            let mut r = vpb::StatsResponse::new();
            r.vcpus = 2;
            r.memory_bytes = 256 << 20;
            r.rss_bytes = 40 << 20;
            r.uptime_millis = 1500;
            Ok(r)
        }
    }

    impl FakeVmm {
        fn flip(&self, to: bool) -> ttrpc::Result<vpb::Empty> {
            let mut paused = self.paused.lock().unwrap();
            if *paused == to {
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    "illegal transition",
                )));
            }
            *paused = to;
            Ok(vpb::Empty::new())
        }
    }

    fn vm_in(dir: &Path) -> SandboxVm {
        let (agent_end, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        SandboxVm {
            id: "pod1".into(),
            dir: dir.to_path_buf(),
            pid: 0,
            size: VmSize {
                vcpus: 2,
                memory_mib: 256,
            },
            agent: AgentClient::from_stream(agent_end, Duration::from_secs(1)).unwrap(),
            next_port: AtomicU32::new(FIRST_STDIO_PORT),
            exit: Arc::new(ExitCell::default()),
            cgroup: Mutex::new(None),
            net: None,
        }
    }

    #[test]
    fn pod_pause_resume_and_stats_go_through_the_control_socket() {
        let dir = tempfile::tempdir().unwrap();
        let vm = vm_in(dir.path());
        // No VMM listening: a clear error, not a hang.
        assert!(matches!(vm.stats(), Err(ShimError::Vm { .. })));
        let service = Arc::new(FakeVmm {
            paused: Mutex::new(false),
        });
        let addr = format!(
            "unix://{}",
            SandboxPaths::new(dir.path(), "").api().display()
        );
        let mut server = ttrpc::Server::new()
            .bind(&addr)
            .unwrap()
            .register_service(vmm_ttrpc::create_vmm(service.clone()));
        server.start().unwrap();
        vm.pause().unwrap();
        assert!(*service.paused.lock().unwrap());
        assert!(
            matches!(vm.pause(), Err(ShimError::FailedPrecondition(_))),
            "pausing a paused VM"
        );
        vm.resume().unwrap();
        assert!(!*service.paused.lock().unwrap());
        assert!(matches!(vm.resume(), Err(ShimError::FailedPrecondition(_))));
        assert_eq!(
            vm.stats().unwrap(),
            VmmStats {
                vcpus: 2,
                memory_bytes: 256 << 20,
                rss_bytes: 40 << 20,
                uptime: Duration::from_millis(1500),
            }
        );
        server.shutdown();
    }

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

    #[test]
    fn log_lines_are_cut_and_masked() {
        assert_eq!(clean_line("a\x1b[2Jb\r\n"), "a?[2Jb");
        assert_eq!(clean_line(&"x".repeat(5000)).len(), MAX_LOG_LINE);
    }
}

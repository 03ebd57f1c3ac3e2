//! What the agent's container RPCs do: the sandbox, the container registry, each container's
//! cgroup, its stdio streams and OOM events, tied together. The ttrpc handlers in
//! [`crate::service`] only convert messages and map errors; the work is here.
//!
//! Every container gets the cgroup `<cgroup_root>/nutshell/<id>` (cgroup v2), made before its
//! init runs and placed by the registry's hook before init does anything; the spec's
//! `linux.resources` are applied to it, and its `memory.events` are watched for OOM kills. The
//! container's record in [`Containers`] owns the cgroup from then on.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::unistd::Pid;
use nutshell_protocol::generated::agent as pb;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
    Process, Spec,
};

use crate::container::cgroup::{Cgroup, CgroupError, CgroupStats, OomWatcher};
use crate::container::{ContainerError, Containers, HookError, Stdio, DEFAULT_REMOVE_TIMEOUT};
use crate::pod_ns::PodNsError;
use crate::sandbox::{self, Sandbox, SandboxConfig, SandboxError, SandboxOs};
use crate::stdio::{self, Listen, StdioError, StdioPorts};

/// The containers' cgroups' parent, under the cgroup root.
const CGROUP_PARENT: &str = "nutshell";

/// Container cgroups made at boot under [`CGROUP_PARENT`] (`spare0`, `spare1`), which the
/// first containers take instead of making their own: a template's snapshot holds them, and
/// making a cgroup with its controllers is ~0.15 s of emulated kernel work in a guest here.
/// Two cover a pod with a sidecar; a further container makes its own, named by its id. A VM
/// booted without a template (`templates = false`) pays for both at boot and gets one back
/// per container: on hardware KVM each is well under a millisecond.
const SPARE_CGROUPS: usize = 2;

/// Largest OCI spec or process JSON accepted.
pub const MAX_SPEC_LEN: usize = 1 << 20;

/// Errors of the container RPCs, each with the ttrpc code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// A request field is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The sandbox could not be set up or taken down.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The container registry refused or failed.
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// The stdio streams could not be connected.
    #[error(transparent)]
    Stdio(#[from] StdioError),
    /// A cgroup operation failed.
    #[error("cgroup of container {id}")]
    Cgroup {
        /// Container.
        id: String,
        /// The cause.
        #[source]
        source: CgroupError,
    },
    /// The OOM event source is gone.
    #[error("the OOM watcher stopped")]
    OomWatcherGone,
}

impl PodError {
    /// The ttrpc code of this error.
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            PodError::Invalid(_) => Code::INVALID_ARGUMENT,
            PodError::Sandbox(SandboxError::Invalid { .. }) => Code::INVALID_ARGUMENT,
            PodError::Sandbox(SandboxError::Exists(_)) => Code::ALREADY_EXISTS,
            PodError::Sandbox(SandboxError::NotFound(_)) => Code::NOT_FOUND,
            PodError::Sandbox(SandboxError::Os { .. }) => Code::INTERNAL,
            PodError::Sandbox(SandboxError::PodNs(PodNsError::Sysctl { .. })) => {
                Code::INVALID_ARGUMENT
            }
            PodError::Sandbox(SandboxError::PodNs(_)) => Code::INTERNAL,
            PodError::Container(e) => match e {
                ContainerError::NotFound(_) | ContainerError::ProcessNotFound { .. } => {
                    Code::NOT_FOUND
                }
                ContainerError::AlreadyExists(_) | ContainerError::ProcessExists { .. } => {
                    Code::ALREADY_EXISTS
                }
                ContainerError::InvalidState { .. } | ContainerError::ProcessExited(_) => {
                    Code::FAILED_PRECONDITION
                }
                ContainerError::InvalidSpec(_)
                | ContainerError::Seccomp(_)
                | ContainerError::Setup(_) => Code::INVALID_ARGUMENT,
                ContainerError::NotSupported(_) => Code::UNIMPLEMENTED,
                _ => Code::INTERNAL,
            },
            PodError::Stdio(StdioError::InvalidPorts(_)) => Code::INVALID_ARGUMENT,
            PodError::Stdio(StdioError::Timeout { .. }) => Code::DEADLINE_EXCEEDED,
            PodError::Stdio(_) => Code::INTERNAL,
            PodError::Cgroup { source, .. } => match source {
                CgroupError::Unsupported { .. } => Code::UNIMPLEMENTED,
                CgroupError::Invalid { .. } | CgroupError::InvalidPath { .. } => {
                    Code::INVALID_ARGUMENT
                }
                _ => Code::INTERNAL,
            },
            PodError::OomWatcherGone => Code::UNAVAILABLE,
        }
    }
}

/// A process's exit as WaitProcess reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code or 128 + signal.
    pub status: i32,
    /// When it was reaped.
    pub at: SystemTime,
}

/// The pod in this guest: sandbox state, containers, cgroups, OOM events.
pub struct Pod {
    containers: Arc<Containers>,
    listen: Box<dyn Listen + Send + Sync>,
    sandbox_os: Box<dyn SandboxOs>,
    cgroup_root: PathBuf,
    /// `<cgroup_root>/nutshell` with the controllers on, made at boot; `None` if that failed
    /// (each container's cgroup then makes it).
    containers_cgroup: Option<Cgroup>,
    /// Empty cgroups under `containers_cgroup` made at boot, taken by the first containers.
    spare_cgroups: Mutex<Vec<Cgroup>>,
    accept_timeout: Duration,
    sandbox: Mutex<Option<Sandbox>>,
    oom: Option<OomWatcher>,
    oom_events: Mutex<mpsc::Receiver<String>>,
}

/// The [`SPARE_CGROUPS`] under `parent`, the one to take first last; one that cannot be made is
/// logged and left out.
fn make_spare_cgroups(parent: &Cgroup) -> Vec<Cgroup> {
    (0..SPARE_CGROUPS)
        .rev()
        .filter_map(|i| {
            parent
                .child(&format!("spare{i}"))
                .map_err(|e| log::warn!("spare container cgroup {i} not made at boot: {e}"))
                .ok()
        })
        .collect()
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("cgroup_root", &self.cgroup_root)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pod {
    /// A pod over `containers` (shared with PID 1's reaper), making streams with `listen`,
    /// sandboxes with `sandbox_os`, cgroups under `cgroup_root` (cgroup v2).
    pub fn new(
        containers: Arc<Containers>,
        listen: Box<dyn Listen + Send + Sync>,
        sandbox_os: Box<dyn SandboxOs>,
        cgroup_root: PathBuf,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let oom = match OomWatcher::start(tx) {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!("no OOM events: {e}");
                None
            }
        };
        let containers_cgroup = match Cgroup::create_parent(&cgroup_root, Path::new(CGROUP_PARENT))
        {
            Ok(cg) => Some(cg),
            Err(e) => {
                log::warn!(
                    "containers' parent cgroup not made at boot (each container's makes it): {e}"
                );
                None
            }
        };
        let spare_cgroups = containers_cgroup
            .as_ref()
            .map(make_spare_cgroups)
            .unwrap_or_default();
        crate::alloc::prepare_child_arenas();
        Pod {
            containers,
            listen,
            sandbox_os,
            cgroup_root,
            containers_cgroup,
            spare_cgroups: Mutex::new(spare_cgroups),
            accept_timeout: stdio::ACCEPT_TIMEOUT,
            sandbox: Mutex::new(None),
            oom,
            oom_events: Mutex::new(rx),
        }
    }

    /// Sets how long stdio streams may take to connect (tests shorten it).
    pub fn set_accept_timeout(&mut self, timeout: Duration) {
        self.accept_timeout = timeout;
    }

    /// CreateSandbox: hostname, loopback, shared directory.
    pub fn create_sandbox(&self, req: &pb::CreateSandboxRequest) -> Result<(), PodError> {
        let cfg = SandboxConfig::try_from(req)?;
        let mut current = lock(&self.sandbox);
        if let Some(existing) = current.as_ref() {
            return Err(SandboxError::Exists(existing.cfg.id.clone()).into());
        }
        *current = Some(sandbox::set_up(cfg, self.sandbox_os.as_ref())?);
        Ok(())
    }

    /// DestroySandbox: stops the pod init, unmounts the shared directory.
    pub fn destroy_sandbox(&self, id: &str) -> Result<(), PodError> {
        let mut current = lock(&self.sandbox);
        match current.take() {
            Some(sb) if sb.cfg.id == id => {
                sandbox::tear_down(sb, self.sandbox_os.as_ref())?;
                Ok(())
            }
            other => {
                *current = other;
                Err(SandboxError::NotFound(id.to_string()).into())
            }
        }
    }

    /// CreateContainer: accepts the stdio streams, makes the cgroup with the spec's resources,
    /// and creates the container (init waits for StartContainer).
    pub fn create_container(&self, req: &pb::CreateContainerRequest) -> Result<Pid, PodError> {
        let id = &req.container_id;
        let spec: Spec = parse_json("oci_spec_json", &req.oci_spec_json)?;
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .ok_or_else(|| PodError::Invalid("the spec has no root".into()))?;
        if !root.is_absolute() || !root.is_dir() {
            return Err(PodError::Invalid(format!(
                "root path {} is not an existing absolute directory",
                root.display()
            )));
        }
        if self.containers.state(id).is_ok() {
            return Err(ContainerError::AlreadyExists(id.clone()).into());
        }
        self.check_pid_mode(&spec)?;
        let began = Instant::now();
        let ports = req.stdio.as_ref().map(StdioPorts::from).unwrap_or_default();
        let streams = stdio::accept_streams(
            self.listen.as_ref(),
            &ports,
            req.terminal,
            self.accept_timeout,
        )?;
        let accepted = began.elapsed();
        let cgroup = self.make_cgroup(
            id,
            spec.linux().as_ref().and_then(|l| l.resources().as_ref()),
        )?;
        let cgrouped = began.elapsed();
        let place = |pid: Pid| -> Result<(), HookError> {
            cgroup.add_process(pid.as_raw() as u32)?;
            Ok(())
        };
        let created = self.containers.create(
            id,
            &spec,
            Stdio {
                stdin: streams.stdin,
                stdout: streams.stdout,
                stderr: streams.stderr,
            },
            req.terminal,
            &place,
        );
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                if let Err(re) = cgroup.remove_within(Duration::from_secs(2)) {
                    log::warn!("container {id}: cannot remove its cgroup: {re}");
                }
                return Err(e.into());
            }
        };
        if let Some(w) = &self.oom {
            if let Err(e) = w.watch(id, &cgroup) {
                log::warn!("container {id}: no OOM events: {e}");
            }
        }
        // The container's record owns its cgroup from here on.
        if let Err(e) = self.containers.set_cgroup(id, cgroup) {
            log::warn!("container {id}: {e}");
        }
        log::debug!(
            "container {id} created (init pid {pid}) in {:.2} s: stdio {:.2} s, cgroup {:.2} s, \
             process {:.2} s",
            began.elapsed().as_secs_f64(),
            accepted.as_secs_f64(),
            cgrouped.saturating_sub(accepted).as_secs_f64(),
            began.elapsed().saturating_sub(cgrouped).as_secs_f64()
        );
        Ok(pid)
    }

    /// Refuses the CRI's TARGET PID namespace mode. A container asks for a PID namespace of
    /// its own (the CRI's CONTAINER mode), the pod's (POD) or none (the VM's, NODE); the
    /// container records know which have their own.
    ///
    /// The CRI's TARGET mode (`kubectl debug --target`) reaches the agent as the pod's PID
    /// namespace, exactly like POD: containerd names the target's task PID, and every container
    /// of a Nutshell pod has the VMM's. kubelet asks for TARGET only in pods whose containers
    /// have PID namespaces of their own, so a container that joins the pod's PID namespace in
    /// such a pod is refused as not supported rather than run in a namespace without its target.
    fn check_pid_mode(&self, spec: &Spec) -> Result<(), PodError> {
        let pid_ns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .and_then(|nss| {
                nss.iter()
                    .find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Pid)
            });
        let Some(ns) = pid_ns else {
            return Ok(());
        };
        let joins_pod = ns
            .path()
            .as_ref()
            .is_some_and(|p| *p == Path::new(&nutshell_protocol::pod_namespace_path("pid")));
        if joins_pod && self.containers.any_own_pidns() {
            return Err(ContainerError::NotSupported(
                "the PID namespace mode TARGET (a container sharing the PID namespace of \
                 another container of a pod whose containers have their own; kubectl debug \
                 --target)"
                    .into(),
            )
            .into());
        }
        Ok(())
    }

    /// The cgroup a new container `id` gets: a spare made at boot while one is left, else
    /// `nutshell/<id>`: only its directory under the prepared parent; the parent as well when
    /// there is none or a container with the whole hierarchy removed it.
    fn container_cgroup(&self, id: &str) -> Result<Cgroup, CgroupError> {
        // A privileged container may have removed a spare (or the whole hierarchy).
        if let Some(spare) = lock(&self.spare_cgroups)
            .pop()
            .filter(|spare| spare.path().is_dir())
        {
            log::debug!("container {id} takes cgroup {}", spare.path().display());
            return Ok(spare);
        }
        match self
            .containers_cgroup
            .as_ref()
            .map(|parent| parent.child(id))
        {
            Some(Err(CgroupError::Mkdir { source, .. }))
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Some(made) => return made,
            None => {}
        }
        Cgroup::create(&self.cgroup_root, &Path::new(CGROUP_PARENT).join(id))
    }

    fn make_cgroup(
        &self,
        id: &str,
        resources: Option<&LinuxResources>,
    ) -> Result<Cgroup, PodError> {
        let cg_err = |source| PodError::Cgroup {
            id: id.to_string(),
            source,
        };
        let cgroup = self.container_cgroup(id).map_err(cg_err)?;
        if let Some(r) = resources {
            if let Err(e) = cgroup.apply(r) {
                let _ = cgroup.remove();
                return Err(cg_err(e));
            }
        }
        Ok(cgroup)
    }

    /// StartContainer.
    pub fn start_container(&self, id: &str) -> Result<(), PodError> {
        // Each clock read is a system call in the guest: only at debug level.
        let begun = log::log_enabled!(log::Level::Debug).then(Instant::now);
        self.containers.start(id)?;
        match begun {
            Some(begun) => log::debug!(
                "container {id} started (execve done after {:.2} s)",
                begun.elapsed().as_secs_f64()
            ),
            None => log::debug!("container {id} started"),
        }
        Ok(())
    }

    /// ExecProcess: runs the process at once in the running container.
    pub fn exec_process(&self, req: &pb::ExecProcessRequest) -> Result<Pid, PodError> {
        let id = &req.container_id;
        if req.exec_id.is_empty() {
            return Err(PodError::Invalid("exec_id is empty".into()));
        }
        // Each clock read is a system call in the guest: only at debug level.
        let begun = log::log_enabled!(log::Level::Debug).then(std::time::Instant::now);
        let process: Process = parse_json("process_json", &req.process_json)?;
        let ports = req.stdio.as_ref().map(StdioPorts::from).unwrap_or_default();
        let streams = stdio::accept_streams(
            self.listen.as_ref(),
            &ports,
            req.terminal,
            self.accept_timeout,
        )?;
        let accepted = begun.map(|t| t.elapsed());
        let cgroup = self.containers.cgroup(id)?;
        let place = |pid: Pid| -> Result<(), HookError> {
            if let Some(cg) = &cgroup {
                cg.add_process(pid.as_raw() as u32)?;
            }
            Ok(())
        };
        let pid = self.containers.exec(
            id,
            &req.exec_id,
            &process,
            Stdio {
                stdin: streams.stdin,
                stdout: streams.stdout,
                stderr: streams.stderr,
            },
            req.terminal,
            &place,
        )?;
        log::debug!("container {id}: exec {} (pid {pid})", req.exec_id);
        if let (Some(begun), Some(accepted)) = (begun, accepted) {
            log::debug!(
                "container {id}: exec {} running after {:.2} s (streams {:.2} s)",
                req.exec_id,
                begun.elapsed().as_secs_f64(),
                accepted.as_secs_f64()
            );
        }
        Ok(pid)
    }

    /// SignalProcess.
    pub fn signal_process(&self, req: &pb::SignalProcessRequest) -> Result<(), PodError> {
        let signal = i32::try_from(req.signal)
            .map_err(|_| PodError::Invalid(format!("signal {}", req.signal)))?;
        self.containers
            .signal(&req.container_id, exec_id(&req.exec_id), signal, req.all)?;
        Ok(())
    }

    /// WaitProcess: blocks until the process has exited.
    pub fn wait_process(&self, id: &str, exec: &str) -> Result<Exit, PodError> {
        let status = self.containers.wait(id, exec_id(exec))?;
        Ok(Exit {
            status: status.code,
            at: status.exited_at,
        })
    }

    /// ListPids: every process of the container.
    pub fn list_pids(&self, id: &str) -> Result<Vec<u32>, PodError> {
        Ok(self
            .containers
            .pids(id)?
            .into_iter()
            .filter_map(|p| u32::try_from(p.as_raw()).ok())
            .collect())
    }

    fn cgroup_op<T>(
        &self,
        id: &str,
        op: impl FnOnce(&Cgroup) -> Result<T, CgroupError>,
    ) -> Result<T, PodError> {
        let cg = self
            .containers
            .cgroup(id)?
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))?;
        op(&cg).map_err(|source| PodError::Cgroup {
            id: id.to_string(),
            source,
        })
    }

    /// StatsContainer, from the container's cgroup.
    pub fn stats(&self, id: &str) -> Result<CgroupStats, PodError> {
        self.cgroup_op(id, Cgroup::stats)
    }

    /// UpdateContainer: applies new resources to the cgroup.
    pub fn update(&self, id: &str, r: &pb::LinuxResources) -> Result<(), PodError> {
        let resources = resources_from_pb(r)?;
        self.cgroup_op(id, |cg| cg.apply(&resources))
    }

    /// PauseContainer: freezes the cgroup.
    pub fn pause(&self, id: &str) -> Result<(), PodError> {
        self.cgroup_op(id, Cgroup::freeze)?;
        if let Err(e) = self.containers.set_paused(id, true) {
            let _ = self.cgroup_op(id, Cgroup::thaw);
            return Err(e.into());
        }
        Ok(())
    }

    /// ResumeContainer: thaws the cgroup.
    pub fn resume(&self, id: &str) -> Result<(), PodError> {
        self.cgroup_op(id, Cgroup::thaw)?;
        self.containers.set_paused(id, false)?;
        Ok(())
    }

    /// ResizeTty.
    pub fn resize(&self, req: &pb::ResizeTtyRequest) -> Result<(), PodError> {
        let rows = u16::try_from(req.rows).map_err(|_| PodError::Invalid("rows".into()))?;
        let cols = u16::try_from(req.columns).map_err(|_| PodError::Invalid("columns".into()))?;
        self.containers
            .resize_pty(&req.container_id, exec_id(&req.exec_id), rows, cols)?;
        Ok(())
    }

    /// CloseStdin.
    pub fn close_stdin(&self, id: &str, exec: &str) -> Result<(), PodError> {
        self.containers.close_stdin(id, exec_id(exec))?;
        Ok(())
    }

    /// RemoveProcess: forgets an exec'd process that has exited (its pidfd and stdin with it).
    pub fn remove_process(&self, id: &str, exec: &str) -> Result<(), PodError> {
        self.containers.remove_exec(id, exec)?;
        Ok(())
    }

    /// GetOOMEvent: blocks until a container's cgroup has an OOM kill.
    pub fn next_oom_event(&self) -> Result<String, PodError> {
        lock(&self.oom_events)
            .recv()
            .map_err(|_| PodError::OomWatcherGone)
    }

    /// RemoveContainer: kills what is left, forgets the container, removes its cgroup.
    pub fn remove_container(&self, id: &str, timeout_secs: u32) -> Result<(), PodError> {
        let timeout = match timeout_secs {
            0 => DEFAULT_REMOVE_TIMEOUT,
            s => Duration::from_secs(u64::from(s)),
        };
        // A paused container is thawed first, so that SIGKILL can end it.
        if self.containers.state(id)? == crate::container::State::Paused {
            self.resume(id)?;
        }
        let cgroup = self.containers.remove(id, timeout)?;
        if let Some(w) = &self.oom {
            w.unwatch(id);
        }
        if let Some(cg) = cgroup {
            if let Err(e) = cg.kill_all().and_then(|()| cg.remove_within(timeout)) {
                log::warn!("container {id}: cannot remove its cgroup: {e}");
            }
        }
        log::debug!("container {id} removed");
        Ok(())
    }
}

fn exec_id(exec: &str) -> Option<&str> {
    (!exec.is_empty()).then_some(exec)
}

fn parse_json<T: serde::de::DeserializeOwned>(field: &str, bytes: &[u8]) -> Result<T, PodError> {
    if bytes.len() > MAX_SPEC_LEN {
        return Err(PodError::Invalid(format!(
            "{field} is {} bytes, more than {MAX_SPEC_LEN}",
            bytes.len()
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| PodError::Invalid(format!("{field}: {e}")))
}

/// The OCI resources of an UpdateContainer request; 0 (or empty) fields stay as they are.
pub fn resources_from_pb(r: &pb::LinuxResources) -> Result<LinuxResources, PodError> {
    let bad = |e: oci_spec::OciSpecError| PodError::Invalid(format!("resources: {e}"));
    let mut cpu = LinuxCpuBuilder::default();
    if r.cpu_shares != 0 {
        cpu = cpu.shares(r.cpu_shares);
    }
    if r.cpu_quota != 0 {
        cpu = cpu.quota(r.cpu_quota);
    }
    if r.cpu_period != 0 {
        cpu = cpu.period(r.cpu_period);
    }
    if !r.cpuset_cpus.is_empty() {
        cpu = cpu.cpus(r.cpuset_cpus.clone());
    }
    if !r.cpuset_mems.is_empty() {
        cpu = cpu.mems(r.cpuset_mems.clone());
    }
    let mut memory = LinuxMemoryBuilder::default();
    if r.memory_limit_bytes != 0 {
        memory = memory.limit(r.memory_limit_bytes);
    }
    if r.memory_swap_bytes != 0 {
        memory = memory.swap(r.memory_swap_bytes);
    }
    let mut b = LinuxResourcesBuilder::default()
        .cpu(cpu.build().map_err(bad)?)
        .memory(memory.build().map_err(bad)?);
    if r.pids_limit != 0 {
        b = b.pids(
            LinuxPidsBuilder::default()
                .limit(r.pids_limit)
                .build()
                .map_err(bad)?,
        );
    }
    b.build().map_err(bad)
}

/// Nanoseconds since the Unix epoch (0 before it).
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The StatsContainer reply of cgroup stats; "unlimited" and absent controllers are 0.
pub fn stats_to_pb(s: &CgroupStats) -> pb::StatsContainerResponse {
    let mut out = pb::StatsContainerResponse::new();
    if let Some(c) = &s.cpu {
        out.cpu = Some(pb::CpuStats {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        })
        .into();
    }
    if let Some(m) = &s.memory {
        out.memory = Some(pb::MemoryStats {
            usage_bytes: m.usage_bytes,
            limit_bytes: m.limit_bytes.unwrap_or(0),
            max_usage_bytes: m.max_usage_bytes.unwrap_or(0),
            oom_kills: m.oom_kills,
            anon_bytes: m.anon_bytes,
            file_bytes: m.file_bytes,
            ..Default::default()
        })
        .into();
    }
    if let Some(p) = &s.pids {
        out.pids = Some(pb::PidsStats {
            current: p.current,
            limit: p.limit.unwrap_or(0),
            ..Default::default()
        })
        .into();
    }
    if let Some(io) = &s.io {
        out.io = Some(pb::IoStats {
            read_bytes: io.read_bytes,
            write_bytes: io.write_bytes,
            ..Default::default()
        })
        .into();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_containers_take_the_spare_cgroups_made_at_boot() {
        let root = tempfile::tempdir().unwrap();
        // A cgroup root and the containers' parent, as the kernel would show them.
        for dir in [root.path().to_path_buf(), root.path().join(CGROUP_PARENT)] {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
            std::fs::write(dir.join("cgroup.subtree_control"), "\n").unwrap();
        }
        let pod = Pod::new(
            Arc::new(Containers::new()),
            Box::new(crate::stdio::VsockListen),
            Box::new(crate::sandbox::GuestOs),
            root.path().to_path_buf(),
        );
        let parent = root.path().join(CGROUP_PARENT);
        assert!(parent.join("spare0").is_dir() && parent.join("spare1").is_dir());
        assert_eq!(
            pod.make_cgroup("c1", None).unwrap().path(),
            parent.join("spare0")
        );
        // A spare gone (a privileged container removed it) is passed over.
        std::fs::remove_dir(parent.join("spare1")).unwrap();
        assert_eq!(
            pod.make_cgroup("c2", None).unwrap().path(),
            parent.join("c2")
        );
        // No spare left: a cgroup of its own, named by the container.
        assert_eq!(
            pod.make_cgroup("c3", None).unwrap().path(),
            parent.join("c3")
        );
    }

    #[test]
    fn update_resources_keep_zero_fields_unset() {
        let r = resources_from_pb(&pb::LinuxResources {
            memory_limit_bytes: 64 << 20,
            pids_limit: 32,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(r.memory().as_ref().unwrap().swap(), None);
        assert_eq!(r.pids().as_ref().unwrap().limit(), 32);
        assert_eq!(r.cpu().as_ref().unwrap().shares(), None);
    }

    #[test]
    fn oversized_or_malformed_json_is_invalid() {
        let e = parse_json::<Spec>("oci_spec_json", b"{not json").unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT);
        let big = vec![b' '; MAX_SPEC_LEN + 1];
        let e = parse_json::<Spec>("oci_spec_json", &big).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[test]
    fn errors_map_to_the_codes_the_shim_acts_on() {
        let nf: PodError = ContainerError::NotFound("c".into()).into();
        assert_eq!(nf.code(), ttrpc::Code::NOT_FOUND);
        let ex: PodError = ContainerError::AlreadyExists("c".into()).into();
        assert_eq!(ex.code(), ttrpc::Code::ALREADY_EXISTS);
        let st: PodError = ContainerError::InvalidState {
            id: "c".into(),
            state: crate::container::State::Stopped,
            op: "start",
        }
        .into();
        assert_eq!(st.code(), ttrpc::Code::FAILED_PRECONDITION);
        let ns: PodError = ContainerError::NotSupported("user namespaces".into()).into();
        assert_eq!(ns.code(), ttrpc::Code::UNIMPLEMENTED);
    }

    #[test]
    fn stats_map_unlimited_to_zero() {
        let s = CgroupStats {
            memory: Some(crate::container::cgroup::MemoryStats {
                usage_bytes: 10,
                limit_bytes: None,
                ..Default::default()
            }),
            ..Default::default()
        };
        let pb = stats_to_pb(&s);
        assert_eq!(pb.memory.usage_bytes, 10);
        assert_eq!(pb.memory.limit_bytes, 0);
        assert!(pb.cpu.is_none());
    }
}

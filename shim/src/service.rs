//! The Task API that containerd calls, on top of one microVM per sandbox.
//!
//! Handlers are thin: each calls a `do_*` method returning [`crate::error::Result`], and the
//! error becomes a ttrpc status in one place ([`ShimError`]'s `From`). Slow work (booting a
//! VM) runs without holding the state lock, so `State`/`Wait` stay answerable meanwhile.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};
use nutshell_protocol::client::ClientError;
use oci_spec::runtime::Spec;

use crate::config::Config;
use crate::convert::{config_path_from_options, now, timestamp_from_nanos, with_console_size};
use crate::error::{Result, ShimError};
use crate::events::{Event, Events};
use crate::hostfs::{open_bundle_log, prepare_fs, remove_container_dir};
use crate::net::PodNetwork;
use crate::pod::{validate_id, ResourceRequest, Role};
use crate::policy::PodContext;
use crate::state::{TaskState, Transition};
use crate::stdio::{StdioCopy, StdioPaths};
use crate::vm::{SandboxVm, VmExitCode};

/// Why a Create fails once SIGTERM or SIGINT came.
const TERMINATING: &str = "the shim is exiting (SIGTERM or SIGINT)";

/// Bound on waiting for a process's output to drain after it exited.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

/// One process: a container's init (exec id empty) or an exec.
#[derive(Debug)]
struct Process {
    state: TaskState,
    stdio: StdioPaths,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    /// The OCI `process` JSON of an exec.
    exec_spec: Vec<u8>,
    /// The terminal size (rows, columns) containerd set on an exec before its Start: the
    /// exec does not exist in the guest yet, so the size goes into its process spec.
    console_size: Option<(u32, u32)>,
    /// containerd closed the stdin of an exec before its Start: closed right after it.
    stdin_closed: bool,
    copy: Option<Arc<StdioCopy>>,
}

impl Process {
    fn new(stdio: StdioPaths) -> Self {
        Process {
            state: TaskState::Created,
            stdio,
            exit_status: 0,
            exited_at: None,
            exec_spec: Vec::new(),
            console_size: None,
            stdin_closed: false,
            copy: None,
        }
    }

    /// Records the exit; false if it was recorded already.
    fn exited(&mut self, id: &str, status: u32, at: Timestamp) -> bool {
        if self.state.apply(Transition::Exit, id).is_err() {
            return false;
        }
        self.exit_status = status;
        self.exited_at = Some(at);
        true
    }
}

#[derive(Debug)]
struct Container {
    bundle: String,
    role: Role,
    sandbox_id: String,
    init: Process,
    execs: HashMap<String, Process>,
    /// The signal a pod sandbox container was killed with (its "exit" is the VM's stop).
    kill_signal: Option<u32>,
    /// The write end of `<bundle>/log` of a container that joined its pod's shim (see
    /// [`open_bundle_log`]); closed when the container is deleted.
    _bundle_log: Option<std::fs::File>,
}

impl Container {
    fn process(&self, id: &str, exec_id: &str) -> Result<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs.get(exec_id).ok_or_else(|| ShimError::NotFound {
            kind: "exec",
            id: format!("{id}/{exec_id}"),
        })
    }

    fn process_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| ShimError::NotFound {
                kind: "exec",
                id: format!("{id}/{exec_id}"),
            })
    }
}

#[derive(Debug, Default)]
struct State {
    sandboxes: HashMap<String, Arc<SandboxVm>>,
    containers: HashMap<String, Container>,
    /// Ids whose Create is in progress (the VM may be booting).
    creating: HashSet<String>,
    /// SIGTERM or SIGINT came: no new task, the shim is going away ([`Service::terminate`]).
    terminating: bool,
}

/// What the service shares with its threads.
struct Inner {
    namespace: String,
    config: std::result::Result<Config, String>,
    state: Mutex<State>,
    changed: Condvar,
    events: Events,
    exit: Arc<ExitSignal>,
}

/// The Task service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

/// The exit status of a process whose VM exited with `code`.
fn status_after_vm_exit(code: VmExitCode, kill_signal: Option<u32>) -> u32 {
    match kill_signal {
        Some(sig) => 128 + sig,
        None if code == 0 => 0,
        // The VM went away under the process: as if SIGKILLed.
        None => 128 + 9,
    }
}

impl Service {
    /// A service publishing to containerd through `publisher` in `namespace`; `exit` is
    /// signalled by `Shutdown`.
    pub fn new(
        namespace: String,
        config: std::result::Result<Config, String>,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Service {
        let events = Events::start(publisher, namespace.clone());
        Service {
            inner: Arc::new(Inner {
                namespace,
                config,
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                events,
                exit,
            }),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, event: Event) {
        self.events.publish(event);
    }

    fn config(&self, options: Option<&Any>) -> Result<Config> {
        if let Some(path) = options.map(config_path_from_options).transpose()?.flatten() {
            return Ok(Config::load(Some(&path))?);
        }
        self.config
            .clone()
            .map_err(|e| ShimError::InvalidArgument(format!("configuration: {e}")))
    }

    /// Called by a VM's watcher: every process of the sandbox ends.
    fn vm_exited(&self, sandbox_id: &str, code: VmExitCode) {
        let mut events: Vec<Event> = Vec::new();
        {
            let mut st = self.lock();
            let at = now();
            for (id, c) in st.containers.iter_mut() {
                if c.sandbox_id != sandbox_id {
                    continue;
                }
                let status = status_after_vm_exit(code, c.kill_signal);
                if c.init.exited(id, status, at.clone()) {
                    events.push(crate::events::exit(id, id, status, &at));
                }
                for (eid, p) in c.execs.iter_mut() {
                    if p.exited(eid, status, at.clone()) {
                        events.push(crate::events::exit(id, eid, status, &at));
                    }
                }
            }
            self.changed.notify_all();
        }
        for e in events {
            self.publish(e);
        }
    }

    /// Waits for a process in the guest (on its own connection) and records its exit.
    fn watch_process(self: &Arc<Self>, vm: Arc<SandboxVm>, id: String, exec_id: String) {
        let inner = Arc::clone(self);
        let name = format!("wait-{id}-{exec_id}");
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let result = vm.blocking_agent().and_then(|a| {
                a.wait_process(&id, &exec_id)
                    .map_err(ShimError::agent("WaitProcess"))
            });
            let (status, at) = match result {
                Ok(exit) => (
                    exit.exit_status,
                    timestamp_from_nanos(exit.exited_at_unix_nanos),
                ),
                // The VM's exit ends the process; vm_exited records it.
                Err(_) if vm.exited().is_some() => return,
                Err(e) => {
                    log::error!("{id}/{exec_id}: wait: {}", crate::error::chain(&e));
                    (255, now())
                }
            };
            let copy = {
                let st = inner.lock();
                st.containers
                    .get(&id)
                    .and_then(|c| c.process(&id, &exec_id).ok())
                    .and_then(|p| p.copy.clone())
            };
            if let Some(copy) = copy {
                copy.wait_outputs(OUTPUT_DRAIN);
            }
            let mut st = inner.lock();
            let Some(c) = st.containers.get_mut(&id) else {
                return;
            };
            let Ok(p) = c.process_mut(&id, &exec_id) else {
                return;
            };
            let process_id = if exec_id.is_empty() {
                id.clone()
            } else {
                exec_id.clone()
            };
            if p.exited(&process_id, status, at.clone()) {
                inner.changed.notify_all();
                drop(st);
                inner.publish(crate::events::exit(&id, &process_id, status, &at));
            }
        });
        if let Err(e) = spawned {
            log::error!("cannot start a waiter thread: {e}");
        }
    }

    /// Forwards the guest's OOM events of a sandbox until the VM goes.
    fn watch_oom(self: &Arc<Self>, vm: Arc<SandboxVm>) {
        let inner = Arc::clone(self);
        let _ = std::thread::Builder::new()
            .name(format!("oom-{}", vm.id))
            .spawn(move || {
                let Ok(agent) = vm.blocking_agent() else {
                    return;
                };
                loop {
                    match agent.get_oom_event() {
                        Ok(container_id) => {
                            log::info!("sandbox {}: OOM in {container_id}", vm.id);
                            inner.publish(crate::events::oom(container_id));
                        }
                        Err(ClientError::Status {
                            code: nutshell_protocol::ttrpc::Code::UNIMPLEMENTED,
                            ..
                        }) => {
                            log::debug!("sandbox {}: the agent has no OOM events yet", vm.id);
                            return;
                        }
                        Err(e) => {
                            if vm.exited().is_none() {
                                log::warn!("sandbox {}: GetOOMEvent: {e}", vm.id);
                            }
                            return;
                        }
                    }
                }
            });
    }
}
impl Service {
    fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    fn do_create(&self, req: &CreateTaskRequest) -> Result<CreateTaskResponse> {
        let id = req.id.clone();
        validate_id(&id)?;
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented("create from a checkpoint"));
        }
        let spec_path = Path::new(&req.bundle).join("config.json");
        let spec = Spec::load(&spec_path)
            .map_err(|e| ShimError::InvalidArgument(format!("{}: {e}", spec_path.display())))?;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let role = Role::from_annotations(&id, &annotations)?;
        let sandbox_id = role.sandbox_id(&id).to_owned();
        // Both checks run before anything is made: nothing to undo. The policy's first, so
        // that a strict node names its own key for a hostNetwork pod.
        let config = self.inner.config(req.options.as_ref())?;
        crate::policy::check_create(&config.policy, &spec, &id, &role, &sandbox_id)?;
        if role.starts_vm() {
            crate::net::refuse_node_network(&spec)?;
        }

        {
            let mut st = self.inner.lock();
            if st.terminating {
                return Err(ShimError::FailedPrecondition(TERMINATING.into()));
            }
            if st.containers.contains_key(&id) || st.creating.contains(&id) {
                return Err(ShimError::AlreadyExists { kind: "task", id });
            }
            if role.starts_vm() && st.sandboxes.contains_key(&sandbox_id) {
                return Err(ShimError::AlreadyExists {
                    kind: "sandbox",
                    id: sandbox_id,
                });
            }
            if !role.starts_vm() && !st.sandboxes.contains_key(&sandbox_id) {
                return Err(ShimError::NotFound {
                    kind: "sandbox",
                    id: sandbox_id,
                });
            }
            st.creating.insert(id.clone());
        }
        let result = self.create_unlocked(req, &config, &spec, &role, &sandbox_id);
        let mut st = self.inner.lock();
        if st.terminating {
            // `terminate` set the flag and took the VMs to stop under this same lock, so this
            // VM is not among them; it waits for this Create to leave `creating`.
            drop(st);
            if role.starts_vm() {
                if let Ok((vm, ..)) = &result {
                    vm.stop();
                }
            }
            self.inner.lock().creating.remove(&id);
            result?;
            return Err(ShimError::FailedPrecondition(TERMINATING.into()));
        }
        st.creating.remove(&id);
        let (vm, stdio, copy) = result?;
        let pid = vm.pid;
        if role.starts_vm() {
            st.sandboxes.insert(sandbox_id.clone(), Arc::clone(&vm));
        }
        let mut init = Process::new(stdio);
        init.copy = copy.map(Arc::new);
        st.containers.insert(
            id.clone(),
            Container {
                bundle: req.bundle.clone(),
                role: role.clone(),
                sandbox_id,
                init,
                execs: HashMap::new(),
                kill_signal: None,
                _bundle_log: if role.starts_vm() {
                    None
                } else {
                    open_bundle_log(&req.bundle)
                },
            },
        );
        drop(st);
        if role.starts_vm() {
            self.inner.watch_oom(Arc::clone(&vm));
        }
        self.inner.publish(crate::events::create(req, pid));
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    /// The slow part of Create: boot the VM if this container starts one, mount, call the agent.
    fn create_unlocked(
        &self,
        req: &CreateTaskRequest,
        config: &Config,
        spec: &Spec,
        role: &Role,
        sandbox_id: &str,
    ) -> Result<(Arc<SandboxVm>, StdioPaths, Option<StdioCopy>)> {
        let id = &req.id;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let pod = PodContext::of(spec, sandbox_id);
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        // A VM start holds a start slot until this function returns: the VM's start and its
        // first container's create.
        let (vm, guest_spec, _slot) = if role.starts_vm() {
            let request = match role {
                Role::PodSandbox { .. } => ResourceRequest::from_annotations(&annotations)?,
                _ => ResourceRequest::from_spec(spec),
            };
            let size = request.vm_size(config)?;
            let hostname = spec.hostname().clone().unwrap_or_else(|| id.clone());
            let slot = crate::start_gate::acquire(
                &config.run_dir,
                config.max_starting_vms,
                config.agent_timeout(),
                sandbox_id,
            )?;
            let paths = SandboxVm::create_dir(config, sandbox_id)?;
            // The container's file systems are mounted before the boot: a bad mount fails fast.
            let guest_spec = if role.runs_process() {
                match prepare_fs(req, spec, &paths.shared(), &config.policy, pod) {
                    Ok(json) => Some(json),
                    Err(e) => {
                        crate::vm::remove_sandbox_dir(&paths.dir);
                        return Err(e);
                    }
                }
            } else {
                None
            };
            let weak: Weak<Inner> = Arc::downgrade(self.inner());
            let sid = sandbox_id.to_owned();
            let on_exit = Box::new(move |code| {
                if let Some(inner) = weak.upgrade() {
                    inner.vm_exited(&sid, code);
                }
            });
            let cgroups_path = spec
                .linux()
                .as_ref()
                .and_then(|l| l.cgroups_path().clone())
                .map(|p| p.to_string_lossy().into_owned());
            // The pod's CNI network, if the CRI made one: its interface goes into the VM.
            let vsock = paths.vsock();
            let net = match crate::net::netns_path(spec).map(|p| PodNetwork::attach(&p, &vsock)) {
                None => None,
                Some(Ok(net)) => net,
                Some(Err(e)) => {
                    crate::vm::remove_sandbox_dir(&paths.dir);
                    return Err(e.into());
                }
            };
            let sandbox = crate::spec::sandbox_spec(
                spec,
                sandbox_id,
                &hostname,
                matches!(role, Role::PodSandbox { .. }),
            );
            let vm = SandboxVm::start(
                config,
                &paths,
                &sandbox,
                size,
                cgroups_path.as_deref(),
                net,
                on_exit,
            )?;
            (Arc::new(vm), guest_spec, slot)
        } else {
            let vm = {
                let st = self.inner.lock();
                st.sandboxes
                    .get(sandbox_id)
                    .cloned()
                    .ok_or_else(|| ShimError::NotFound {
                        kind: "sandbox",
                        id: sandbox_id.to_owned(),
                    })?
            };
            if vm.exited().is_some() {
                return Err(ShimError::FailedPrecondition(format!(
                    "sandbox {sandbox_id}: the VM is not running"
                )));
            }
            match prepare_fs(req, spec, &vm.shared(), &config.policy, pod) {
                Ok(json) => (vm, Some(json), None),
                Err(e) => {
                    remove_container_dir(&vm.shared(), id);
                    return Err(e);
                }
            }
        };
        let Some(json) = guest_spec else {
            return Ok((vm, stdio, None));
        };
        let ports = stdio.ports(|| vm.next_port());
        let copy = StdioCopy::start(&vm.vsock(), &stdio, ports, id);
        let started = Instant::now();
        match vm
            .agent()
            .create_container(id, json, ports, stdio.terminal)
            .map_err(ShimError::agent("CreateContainer"))
        {
            Ok(()) => {
                log::info!(
                    "{id}: CreateContainer in the guest took {:.3} s",
                    started.elapsed().as_secs_f64()
                );
                Ok((vm, stdio, Some(copy)))
            }
            Err(e) => {
                drop(copy);
                remove_container_dir(&vm.shared(), id);
                if role.starts_vm() {
                    vm.stop();
                }
                Err(e)
            }
        }
    }

    fn lookup_vm(&self, id: &str) -> Result<(Arc<SandboxVm>, Role)> {
        let st = self.inner.lock();
        let c = st.containers.get(id).ok_or_else(|| ShimError::NotFound {
            kind: "task",
            id: id.to_owned(),
        })?;
        let vm =
            st.sandboxes.get(&c.sandbox_id).cloned().ok_or_else(|| {
                ShimError::FailedPrecondition(format!("task {id}: its VM is gone"))
            })?;
        Ok((vm, c.role.clone()))
    }

    fn do_start(&self, req: &StartRequest) -> Result<StartResponse> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let (vm, role) = self.lookup_vm(id)?;
        let (stdio, exec_spec, console_size) = {
            let st = self.inner.lock();
            let c = st.containers.get(id).ok_or_else(|| ShimError::NotFound {
                kind: "task",
                id: id.to_owned(),
            })?;
            let p = c.process(id, exec_id)?;
            p.state.next(Transition::Start, id)?;
            (p.stdio.clone(), p.exec_spec.clone(), p.console_size)
        };
        let mut copy = None;
        let started = Instant::now();
        if exec_id.is_empty() {
            if role.runs_process() {
                vm.agent()
                    .start_container(id)
                    .map_err(ShimError::agent("StartContainer"))?;
                log::info!(
                    "{id}: StartContainer in the guest took {:.3} s",
                    started.elapsed().as_secs_f64()
                );
            }
        } else {
            let exec_spec = match console_size {
                Some((rows, cols)) if stdio.terminal => with_console_size(&exec_spec, rows, cols)?,
                _ => exec_spec,
            };
            let ports = stdio.ports(|| vm.next_port());
            let c = StdioCopy::start(&vm.vsock(), &stdio, ports, &format!("{id}/{exec_id}"));
            vm.agent()
                .exec_process(id, exec_id, exec_spec, ports, stdio.terminal)
                .map_err(ShimError::agent("ExecProcess"))?;
            log::info!(
                "{id}/{exec_id}: ExecProcess in the guest took {:.3} s",
                started.elapsed().as_secs_f64()
            );
            copy = Some(Arc::new(c));
        }
        let resize = {
            let mut st = self.inner.lock();
            let c = st
                .containers
                .get_mut(id)
                .ok_or_else(|| ShimError::NotFound {
                    kind: "task",
                    id: id.to_owned(),
                })?;
            let p = c.process_mut(id, exec_id)?;
            p.state.apply(Transition::Start, id)?;
            if copy.is_some() {
                p.copy = copy;
            }
            // A resize that arrived while the exec was being started went into no spec.
            let resize = p
                .console_size
                .filter(|s| !exec_id.is_empty() && Some(*s) != console_size);
            let close_stdin = !exec_id.is_empty() && p.stdin_closed;
            self.inner.changed.notify_all();
            (resize, close_stdin)
        };
        let (resize, close_stdin) = resize;
        if close_stdin {
            if let Err(e) = vm.agent().close_stdin(id, exec_id) {
                log::warn!("{id}/{exec_id}: CloseStdin: {e}");
            }
        }
        if let Some((rows, cols)) = resize {
            if let Err(e) = vm.agent().resize_tty(id, exec_id, rows, cols) {
                log::warn!("{id}/{exec_id}: ResizeTty: {e}");
            }
        }
        if role.runs_process() {
            self.inner
                .watch_process(Arc::clone(&vm), id.to_owned(), exec_id.to_owned());
        }
        self.inner
            .publish(crate::events::start(id, exec_id, vm.pid));
        Ok(StartResponse {
            pid: vm.pid,
            ..Default::default()
        })
    }

    fn do_delete(&self, req: &DeleteRequest) -> Result<DeleteResponse> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let (vm, role) = self.lookup_vm(id)?;
        if !exec_id.is_empty() {
            let mut st = self.inner.lock();
            let c = st
                .containers
                .get_mut(id)
                .ok_or_else(|| ShimError::NotFound {
                    kind: "task",
                    id: id.to_owned(),
                })?;
            let p = c.process_mut(id, exec_id)?;
            p.state.apply(Transition::Delete, exec_id)?;
            let resp = DeleteResponse {
                pid: vm.pid,
                exit_status: p.exit_status,
                exited_at: p.exited_at.clone().into(),
                ..Default::default()
            };
            c.execs.remove(exec_id);
            return Ok(resp);
        }
        {
            let st = self.inner.lock();
            let c = st.containers.get(id).ok_or_else(|| ShimError::NotFound {
                kind: "task",
                id: id.to_owned(),
            })?;
            c.init.state.next(Transition::Delete, id)?;
            if role.starts_vm() {
                let others: Vec<&String> = st
                    .containers
                    .iter()
                    .filter(|(cid, o)| *cid != id && o.sandbox_id == c.sandbox_id)
                    .map(|(cid, _)| cid)
                    .collect();
                if !others.is_empty() {
                    return Err(ShimError::FailedPrecondition(format!(
                        "sandbox {id} still has containers {others:?}"
                    )));
                }
            }
        }
        if role.starts_vm() {
            // The container goes with its VM: the guest's power-off (the agent syncs first)
            // ends whatever it left, so the guest's RemoveContainer (unmounts, cgroup removal:
            // about a second of guest-kernel work where that is emulated) would be wasted.
            vm.stop();
        } else if vm.exited().is_none() {
            if let Err(e) = vm.agent().remove_container(id, 0) {
                log::warn!("{id}: agent RemoveContainer: {}", crate::error::chain(&e));
            }
        }
        remove_container_dir(&vm.shared(), id);
        let mut st = self.inner.lock();
        if role.starts_vm() {
            st.sandboxes.remove(role.sandbox_id(id));
        }
        let mut c = st
            .containers
            .remove(id)
            .ok_or_else(|| ShimError::NotFound {
                kind: "task",
                id: id.to_owned(),
            })?;
        // Created and never started: it ends here.
        if c.init.state == TaskState::Created {
            c.init.exited(id, 128 + 9, now());
        }
        let _ = c.init.state.apply(Transition::Delete, id);
        self.inner.changed.notify_all();
        drop(st);
        let exited_at = c.init.exited_at.clone().unwrap_or_else(now);
        self.inner.publish(crate::events::delete(
            id,
            vm.pid,
            c.init.exit_status,
            &exited_at,
        ));
        Ok(DeleteResponse {
            pid: vm.pid,
            exit_status: c.init.exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn do_exec(&self, req: &ExecProcessRequest) -> Result<()> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        validate_id(exec_id)?;
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| ShimError::InvalidArgument("exec without a process spec".into()))?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec.value).map_err(|e| {
            ShimError::InvalidArgument(format!("exec {exec_id}: process spec: {e}"))
        })?;
        let mut st = self.inner.lock();
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| ShimError::NotFound {
                kind: "task",
                id: id.to_owned(),
            })?;
        if !c.role.runs_process() {
            return Err(ShimError::FailedPrecondition(format!(
                "{id} is a pod sandbox: it runs no process to exec in"
            )));
        }
        if c.init.state != TaskState::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "cannot exec in {id}: it is {}",
                c.init.state
            )));
        }
        if c.execs.contains_key(exec_id) {
            return Err(ShimError::AlreadyExists {
                kind: "exec",
                id: format!("{id}/{exec_id}"),
            });
        }
        let mut p = Process::new(StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        });
        p.exec_spec = spec.value.clone();
        c.execs.insert(exec_id.to_owned(), p);
        drop(st);
        self.inner.publish(crate::events::exec_added(id, exec_id));
        Ok(())
    }

    fn do_kill(&self, req: &KillRequest) -> Result<()> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let (vm, role) = self.lookup_vm(id)?;
        {
            let mut st = self.inner.lock();
            let c = st
                .containers
                .get_mut(id)
                .ok_or_else(|| ShimError::NotFound {
                    kind: "task",
                    id: id.to_owned(),
                })?;
            let p = c.process(id, exec_id)?;
            if matches!(p.state, TaskState::Stopped | TaskState::Deleted) {
                return Err(ShimError::NotFound {
                    kind: "process",
                    id: format!("{id}/{exec_id} (already exited)"),
                });
            }
            if !role.runs_process() {
                c.kill_signal = Some(req.signal);
            }
        }
        if role.runs_process() {
            return vm
                .agent()
                .signal_process(id, exec_id, req.signal, req.all)
                .map_err(ShimError::agent("SignalProcess"));
        }
        // The pod sandbox's "process" is the VM: stopping it ends every task of the pod.
        let _ = std::thread::Builder::new()
            .name(format!("stop-{}", vm.id))
            .spawn(move || vm.stop());
        Ok(())
    }

    fn do_state(&self, req: &StateRequest) -> Result<StateResponse> {
        let st = self.inner.lock();
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let c = st.containers.get(id).ok_or_else(|| ShimError::NotFound {
            kind: "task",
            id: id.to_owned(),
        })?;
        let p = c.process(id, exec_id)?;
        let pid = st.sandboxes.get(&c.sandbox_id).map_or(0, |vm| vm.pid);
        Ok(StateResponse {
            id: id.to_owned(),
            bundle: c.bundle.clone(),
            pid,
            status: p.state.status().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: p.exit_status,
            exited_at: p.exited_at.clone().into(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        })
    }

    fn do_wait(&self, req: &WaitRequest) -> Result<WaitResponse> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let mut st = self.inner.lock();
        loop {
            let c = st.containers.get(id).ok_or_else(|| ShimError::NotFound {
                kind: "task",
                id: id.to_owned(),
            })?;
            let p = c.process(id, exec_id)?;
            if matches!(p.state, TaskState::Stopped | TaskState::Deleted) {
                return Ok(WaitResponse {
                    exit_status: p.exit_status,
                    exited_at: p.exited_at.clone().into(),
                    ..Default::default()
                });
            }
            st = self
                .inner
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    fn do_pids(&self, req: &PidsRequest) -> Result<PidsResponse> {
        let (vm, role) = self.lookup_vm(&req.id)?;
        let pids = if role.runs_process() {
            vm.agent()
                .list_pids(&req.id)
                .map_err(ShimError::agent("ListPids"))?
        } else {
            vec![vm.pid]
        };
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn do_stats(&self, req: &StatsRequest) -> Result<StatsResponse> {
        let (vm, role) = self.lookup_vm(&req.id)?;
        if !role.runs_process() {
            return crate::convert::pod_stats_response(&vm.stats()?);
        }
        let s = vm
            .agent()
            .stats_container(&req.id)
            .map_err(ShimError::agent("StatsContainer"))?;
        crate::convert::container_stats_response(&s)
    }

    fn do_update(&self, req: &UpdateTaskRequest) -> Result<()> {
        let (vm, role) = self.lookup_vm(&req.id)?;
        if !role.runs_process() {
            return Err(ShimError::Unimplemented("resizing a pod's VM"));
        }
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| ShimError::InvalidArgument("update without resources".into()))?;
        let res = crate::convert::resources_from_oci(&any.value)?;
        vm.agent()
            .update_container(&req.id, &res)
            .map_err(ShimError::agent("UpdateContainer"))
    }

    fn do_close_io(&self, req: &CloseIORequest) -> Result<()> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let (vm, _) = self.lookup_vm(id)?;
        if !req.stdin {
            return Ok(());
        }
        {
            let mut st = self.inner.lock();
            let c = st
                .containers
                .get_mut(id)
                .ok_or_else(|| ShimError::NotFound {
                    kind: "task",
                    id: id.to_owned(),
                })?;
            let p = c.process_mut(id, exec_id)?;
            // Always remembered: an exec being started closes it afterwards (do_start).
            p.stdin_closed = true;
            if !exec_id.is_empty() && p.state == TaskState::Created {
                // ctr closes an exec's stdin before its Start, when the process does not exist
                // in the guest yet.
                return Ok(());
            }
        }
        vm.agent()
            .close_stdin(id, exec_id)
            .map_err(ShimError::agent("CloseStdin"))
    }

    fn do_resize_pty(&self, req: &ResizePtyRequest) -> Result<()> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let (vm, _) = self.lookup_vm(id)?;
        {
            let mut st = self.inner.lock();
            let c = st
                .containers
                .get_mut(id)
                .ok_or_else(|| ShimError::NotFound {
                    kind: "task",
                    id: id.to_owned(),
                })?;
            let p = c.process_mut(id, exec_id)?;
            if !p.stdio.terminal {
                return Err(ShimError::FailedPrecondition(format!(
                    "{id}/{exec_id} has no terminal"
                )));
            }
            // Always remembered: an exec being started applies it afterwards (do_start).
            p.console_size = Some((req.height, req.width));
            if !exec_id.is_empty() && p.state == TaskState::Created {
                // containerd sizes an exec's terminal before its Start, when the process does
                // not exist in the guest yet: the size goes into its spec at Start.
                return Ok(());
            }
        }
        vm.agent()
            .resize_tty(id, exec_id, req.height, req.width)
            .map_err(ShimError::agent("ResizeTty"))
    }

    fn do_pause_resume(&self, id: &str, pause: bool) -> Result<()> {
        let (vm, role) = self.lookup_vm(id)?;
        let t = if pause {
            Transition::Pause
        } else {
            Transition::Resume
        };
        {
            let st = self.inner.lock();
            let c = st.containers.get(id).ok_or_else(|| ShimError::NotFound {
                kind: "task",
                id: id.to_owned(),
            })?;
            c.init.state.next(t, id)?;
        }
        if !role.runs_process() {
            // The pod sandbox's task is its VM: pausing it stops every vCPU, so the pod's
            // containers pause with it (under runc, pausing the pause container freezes only
            // that container).
            if pause {
                vm.pause()?;
            } else {
                vm.resume()?;
            }
        } else if pause {
            vm.agent()
                .pause_container(id)
                .map_err(ShimError::agent("PauseContainer"))?;
        } else {
            vm.agent()
                .resume_container(id)
                .map_err(ShimError::agent("ResumeContainer"))?;
        }
        {
            let mut st = self.inner.lock();
            if let Some(c) = st.containers.get_mut(id) {
                c.init.state.apply(t, id)?;
            }
        }
        self.inner.publish(crate::events::paused(id, pause));
        Ok(())
    }

    /// Ends the shim on SIGTERM or SIGINT (`signal`), as containerd's own shims exit on them:
    /// new tasks are refused, every VM is stopped (its containers die with it), a VMM still
    /// starting for a Create in flight is killed (the shim's children are its VMMs), and the
    /// process exits once those Creates have failed and cleaned up, or after 30 s. containerd
    /// sees the shim gone, runs `shim delete` for its containers and reports them exited.
    pub fn terminate(&self, signal: &str) {
        let vms: Vec<Arc<SandboxVm>> = {
            let mut st = self.inner.lock();
            if std::mem::replace(&mut st.terminating, true) {
                return;
            }
            st.sandboxes.values().cloned().collect()
        };
        log::warn!(
            "{signal}: stopping {} VM(s) and exiting; containerd reports their tasks exited",
            vms.len()
        );
        for vm in vms {
            vm.stop();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Again on every round: a Create past its start slot may spawn a VMM meanwhile.
            for pid in crate::child_pids() {
                log::info!("{signal}: killing child process {pid} (a VMM still starting)");
                // SAFETY: kill(2) has no memory effects. `pid` was a child of this process a
                // moment ago; the crate's reaper could have reaped it since, but a PID is
                // reused only after the whole PID space has been cycled through.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let creating = self.inner.lock().creating.len();
            if creating == 0 {
                break;
            }
            if Instant::now() > deadline {
                log::warn!("{signal}: {creating} Create(s) still in flight after 30 s; exiting");
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.inner.exit.signal();
    }

    fn do_shutdown(&self) -> Result<()> {
        let vms: Vec<Arc<SandboxVm>> = {
            let st = self.inner.lock();
            if !st.containers.is_empty() || !st.creating.is_empty() {
                // containerd asks after each Delete; the shim stays while it has tasks.
                return Ok(());
            }
            st.sandboxes.values().cloned().collect()
        };
        for vm in vms {
            vm.stop();
        }
        self.inner.exit.signal();
        Ok(())
    }
}

fn reply<T>(method: &str, r: Result<T>) -> TtrpcResult<T> {
    r.map_err(|e| {
        log::warn!("{method}: {}", crate::error::chain(&e));
        e.into()
    })
}

impl Task for Service {
    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        reply("State", self.do_state(&req))
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        log::info!("Create {} (bundle {})", req.id, req.bundle);
        reply("Create", self.do_create(&req))
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        log::info!("Start {} {}", req.id, req.exec_id);
        reply("Start", self.do_start(&req))
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        log::info!("Delete {} {}", req.id, req.exec_id);
        reply("Delete", self.do_delete(&req))
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        reply("Pids", self.do_pids(&req))
    }

    fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        reply("Pause", self.do_pause_resume(&req.id, true)).map(|()| Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        reply("Resume", self.do_pause_resume(&req.id, false)).map(|()| Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: containerd_shim::api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        reply("Checkpoint", Err(ShimError::Unimplemented("checkpoint")))
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        log::info!(
            "Kill {} {} signal {} all {}",
            req.id,
            req.exec_id,
            req.signal,
            req.all
        );
        reply("Kill", self.do_kill(&req)).map(|()| Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        log::info!("Exec {} {}", req.id, req.exec_id);
        reply("Exec", self.do_exec(&req)).map(|()| Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        reply("ResizePty", self.do_resize_pty(&req)).map(|()| Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        reply("CloseIO", self.do_close_io(&req)).map(|()| Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        reply("Update", self.do_update(&req)).map(|()| Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        reply("Wait", self.do_wait(&req))
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        reply("Stats", self.do_stats(&req))
    }

    fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self.lookup_vm(&req.id).map_or(0, |(vm, _)| vm.pid);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        log::info!("Shutdown");
        reply("Shutdown", self.do_shutdown()).map(|()| Empty::new())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn vm_exit_statuses() {
        assert_eq!(status_after_vm_exit(0, None), 0);
        assert_eq!(status_after_vm_exit(2, None), 137);
        assert_eq!(status_after_vm_exit(0, Some(15)), 143);
    }

    #[test]
    fn process_exit_is_recorded_once() {
        let mut p = Process::new(StdioPaths::default());
        p.state.apply(Transition::Start, "c").unwrap();
        assert!(p.exited("c", 3, now()));
        assert!(!p.exited("c", 9, now()));
        assert_eq!(p.exit_status, 3);
        assert_eq!(p.state, TaskState::Stopped);
    }
}

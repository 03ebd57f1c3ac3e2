//! The Task API that containerd calls, on top of one microVM per sandbox.
//!
//! Handlers are thin: validate, look the task up in the registry (sandbox id → [`Sandbox`],
//! task id → its sandbox), delegate to the task's [`Instance`] or its sandbox, map the error in
//! one place ([`ShimError`]'s `From`). The registry's lock is short and never held across an
//! agent call; each sandbox locks its task table, each task its processes. Slow work (booting a
//! VM) runs without any lock, so `State`/`Wait` stay answerable meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};

mod create;
mod delete;
#[cfg(test)]
mod tests;

use crate::config::Config;
use crate::convert::{config_path_from_options, with_console_size};
use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::pod::validate_id;
use crate::sandbox::{Sandbox, TaskRef};
use crate::state::{TaskState, Transition};
use crate::stdio::StdioPaths;
use crate::task::{task_not_found, Process};

/// Why a Create fails once SIGTERM or SIGINT came.
const TERMINATING: &str = "the shim is exiting (SIGTERM or SIGINT)";

/// The sandboxes of this shim and where each task is.
#[derive(Debug, Default)]
struct Registry {
    sandboxes: HashMap<String, Arc<Sandbox>>,
    /// Task id → its sandbox's id.
    tasks: HashMap<String, String>,
    /// Ids whose Create is in progress (the VM may be booting).
    creating: HashSet<String>,
    /// SIGTERM or SIGINT came: no new task, the shim is going away ([`Service::terminate`]).
    terminating: bool,
}

/// What the service shares with its threads.
struct Inner {
    namespace: String,
    config: std::result::Result<Config, String>,
    registry: Mutex<Registry>,
    events: Arc<Events>,
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

impl Service {
    /// A service publishing to containerd through `publisher` in `namespace`; `exit` is
    /// signalled by `Shutdown`.
    pub fn new(
        namespace: String,
        config: std::result::Result<Config, String>,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Service {
        let events = Arc::new(Events::start(publisher, namespace.clone()));
        Service::with_events(namespace, config, events, exit)
    }

    /// A service publishing through `events` (containerd's publisher, or a channel in tests).
    fn with_events(
        namespace: String,
        config: std::result::Result<Config, String>,
        events: Arc<Events>,
        exit: Arc<ExitSignal>,
    ) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace,
                config,
                registry: Mutex::new(Registry::default()),
                events,
                exit,
            }),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn config(&self, options: Option<&Any>) -> Result<Config> {
        if let Some(path) = options.map(config_path_from_options).transpose()?.flatten() {
            return Ok(Config::load(Some(&path))?);
        }
        self.inner
            .config
            .clone()
            .map_err(|e| ShimError::InvalidArgument(format!("configuration: {e}")))
    }

    /// Task `id` and its sandbox.
    fn lookup(&self, id: &str) -> Result<(Arc<Sandbox>, TaskRef)> {
        let sandbox = {
            let reg = self.registry();
            let sandbox_id = reg.tasks.get(id).ok_or_else(|| task_not_found(id))?;
            reg.sandboxes.get(sandbox_id).cloned().ok_or_else(|| {
                ShimError::FailedPrecondition(format!("task {id}: its VM is gone"))
            })?
        };
        let task = sandbox.task(id)?;
        Ok((sandbox, task))
    }

    fn do_start(&self, req: &StartRequest) -> Result<StartResponse> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let (sandbox, task) = self.lookup(id)?;
        let core = task.core();
        let (stdio, exec_spec, console_size) = {
            let procs = core.lock();
            let p = procs.get(id, exec_id)?;
            p.state.next(Transition::Start, id)?;
            (p.stdio.clone(), p.exec_spec.clone(), p.console_size)
        };
        let mut copy = None;
        if exec_id.is_empty() {
            task.start(&sandbox)?;
        } else {
            let exec_spec = match console_size {
                Some((rows, cols)) if stdio.terminal => with_console_size(&exec_spec, rows, cols)?,
                _ => exec_spec,
            };
            copy = Some(Arc::new(
                sandbox.exec_process(id, exec_id, exec_spec, &stdio)?,
            ));
        }
        let (resize, close_stdin) = {
            let mut procs = core.lock();
            let p = procs.get_mut(id, exec_id)?;
            p.state.apply(Transition::Start, id)?;
            if copy.is_some() {
                p.copy = copy;
            }
            // A resize that arrived while the exec was being started went into no spec.
            let resize = p
                .console_size
                .filter(|s| !exec_id.is_empty() && Some(*s) != console_size);
            let close_stdin = !exec_id.is_empty() && p.stdin_closed;
            drop(procs);
            core.notify();
            (resize, close_stdin)
        };
        let vm = &sandbox.vm;
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
        if task.waits_in_guest() {
            sandbox.watch_process(Arc::clone(&task), exec_id.to_owned());
        }
        self.inner
            .events
            .publish(crate::events::start(id, exec_id, vm.pid));
        Ok(StartResponse {
            pid: vm.pid,
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
        let (_, task) = self.lookup(id)?;
        task.check_exec()?;
        {
            let mut procs = task.core().lock();
            let init = &procs.get(id, "")?.state;
            if *init != TaskState::Running {
                return Err(ShimError::FailedPrecondition(format!(
                    "cannot exec in {id}: it is {init}"
                )));
            }
            if procs.execs.contains_key(exec_id) {
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
            procs.execs.insert(exec_id.to_owned(), p);
        }
        self.inner
            .events
            .publish(crate::events::exec_added(id, exec_id));
        Ok(())
    }

    fn do_kill(&self, req: &KillRequest) -> Result<()> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let (sandbox, task) = self.lookup(id)?;
        let state = task.core().lock().get(id, exec_id)?.state;
        if matches!(state, TaskState::Stopped | TaskState::Deleted) {
            return Err(ShimError::NotFound {
                kind: "process",
                id: format!("{id}/{exec_id} (already exited)"),
            });
        }
        task.kill(&sandbox, exec_id, req.signal, req.all)
    }

    fn do_state(&self, req: &StateRequest) -> Result<StateResponse> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let (sandbox, task) = self.lookup(id)?;
        let core = task.core();
        let procs = core.lock();
        let p = procs.get(id, exec_id)?;
        Ok(StateResponse {
            id: id.to_owned(),
            bundle: core.bundle.clone(),
            pid: sandbox.vm.pid,
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
        let (_, task) = self.lookup(&req.id)?;
        let (exit_status, exited_at) = task.core().wait(&req.exec_id)?;
        Ok(WaitResponse {
            exit_status,
            exited_at: exited_at.into(),
            ..Default::default()
        })
    }

    fn do_pids(&self, req: &PidsRequest) -> Result<PidsResponse> {
        let (sandbox, task) = self.lookup(&req.id)?;
        Ok(PidsResponse {
            processes: task
                .pids(&sandbox)?
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
        let (sandbox, task) = self.lookup(&req.id)?;
        task.stats(&sandbox)
    }

    fn do_update(&self, req: &UpdateTaskRequest) -> Result<()> {
        let (sandbox, task) = self.lookup(&req.id)?;
        let resources = req.resources.as_ref().map(|any| any.value.as_slice());
        task.update(&sandbox, resources)
    }

    fn do_close_io(&self, req: &CloseIORequest) -> Result<()> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let (sandbox, task) = self.lookup(id)?;
        if !req.stdin {
            return Ok(());
        }
        {
            let mut procs = task.core().lock();
            let p = procs.get_mut(id, exec_id)?;
            // Always remembered: an exec being started closes it afterwards (do_start).
            p.stdin_closed = true;
            if !exec_id.is_empty() && p.state == TaskState::Created {
                // ctr closes an exec's stdin before its Start, when the process does not exist
                // in the guest yet.
                return Ok(());
            }
        }
        sandbox
            .vm
            .agent()
            .close_stdin(id, exec_id)
            .map_err(ShimError::agent("CloseStdin"))
    }

    fn do_resize_pty(&self, req: &ResizePtyRequest) -> Result<()> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let (sandbox, task) = self.lookup(id)?;
        {
            let mut procs = task.core().lock();
            let p = procs.get_mut(id, exec_id)?;
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
        sandbox
            .vm
            .agent()
            .resize_tty(id, exec_id, req.height, req.width)
            .map_err(ShimError::agent("ResizeTty"))
    }

    fn do_pause_resume(&self, id: &str, pause: bool) -> Result<()> {
        let (sandbox, task) = self.lookup(id)?;
        let t = if pause {
            Transition::Pause
        } else {
            Transition::Resume
        };
        task.core().lock().get(id, "")?.state.next(t, id)?;
        task.pause(&sandbox, pause)?;
        {
            let mut procs = task.core().lock();
            if !procs.removed {
                procs.init.state.apply(t, id)?;
            }
        }
        self.inner.events.publish(crate::events::paused(id, pause));
        Ok(())
    }

    /// Ends the shim on SIGTERM or SIGINT (`signal`), as containerd's own shims exit on them:
    /// new tasks are refused, every VM is stopped (its containers die with it), a VMM still
    /// starting for a Create in flight is killed (the shim's children are its VMMs), and the
    /// process exits once those Creates have failed and cleaned up, or after 30 s. containerd
    /// sees the shim gone, runs `shim delete` for its containers and reports them exited.
    pub fn terminate(&self, signal: &str) {
        let sandboxes: Vec<Arc<Sandbox>> = {
            let mut reg = self.registry();
            if std::mem::replace(&mut reg.terminating, true) {
                return;
            }
            reg.sandboxes.values().cloned().collect()
        };
        log::warn!(
            "{signal}: stopping {} VM(s) and exiting; containerd reports their tasks exited",
            sandboxes.len()
        );
        for sandbox in sandboxes {
            sandbox.vm.stop();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Again on every round: a Create past its start slot may spawn a VMM meanwhile.
            for pid in crate::child_pids() {
                log::info!("{signal}: killing child process {pid} (a VMM still starting)");
                // `pid` was a child of this process a moment ago; the crate's reaper could have
                // reaped it since, but a PID is reused only after the whole PID space has been
                // cycled through.
                let _ = crate::sys::sigkill(pid);
            }
            let creating = self.registry().creating.len();
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
        let sandboxes: Vec<Arc<Sandbox>> = {
            let reg = self.registry();
            if !reg.tasks.is_empty() || !reg.creating.is_empty() {
                // containerd asks after each Delete; the shim stays while it has tasks.
                return Ok(());
            }
            reg.sandboxes.values().cloned().collect()
        };
        for sandbox in sandboxes {
            sandbox.vm.stop();
        }
        self.inner.exit.signal();
        Ok(())
    }
}

/// Logs a failed call once (with its chain) and turns it into a ttrpc status.
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
        let task_pid = self
            .lookup(&req.id)
            .map_or(0, |(sandbox, _)| sandbox.vm.pid);
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

//! Tasks: what containerd calls a container, one per role behind the narrow [`Instance`] trait
//! (runwasi's shape). Each task holds its own processes and their [`TaskState`]s behind its own
//! mutex; what differs by role (what Start, Kill, Stats… do in the guest or to the VM) is in the
//! role's type: [`PodSandbox`] (the pause container: its "process" is the VM),
//! [`AppContainer`] (joins its pod's VM) and [`Standalone`] (a container with a VM of its own).
//! The role is matched once, in [`Kind::of`], where a task is created.
//!
//! No method here is called with a lock held across an agent or VMM call: the processes' mutex
//! is taken only around reads and transitions.

mod container;
mod pod_sandbox;

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use containerd_shim::api::StatsResponse;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;

use crate::error::{Result, ShimError};
use crate::events::Event;
use crate::pod::Role;
use crate::sandbox::Sandbox;
use crate::state::{TaskState, Transition};
use crate::stdio::{StdioCopy, StdioPaths};
use crate::vm::VmExitCode;
pub use container::{AppContainer, Standalone};
pub use pod_sandbox::PodSandbox;

/// What a task is to its sandbox: the role of a container, matched once at Create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The pod's sandbox (pause) container: it starts the VM and runs no process.
    PodSandbox,
    /// An app container joining its pod's VM.
    AppContainer,
    /// A container with a VM of its own.
    Standalone,
}

impl Kind {
    /// The kind of a container of `role`.
    pub fn of(role: &Role) -> Kind {
        match role {
            Role::PodSandbox { .. } => Kind::PodSandbox,
            Role::PodContainer { .. } => Kind::AppContainer,
            Role::Standalone => Kind::Standalone,
        }
    }

    /// Whether its Create boots the sandbox's VM (and its Delete stops it).
    pub fn boots_vm(self) -> bool {
        !matches!(self, Kind::AppContainer)
    }

    /// Whether it is a container in the guest (the pause container is not).
    pub fn runs_container(self) -> bool {
        !matches!(self, Kind::PodSandbox)
    }

    /// The task of this kind over `core`.
    pub fn instance(self, core: TaskCore) -> Box<dyn Instance> {
        match self {
            Kind::PodSandbox => Box::new(PodSandbox::new(core)),
            Kind::AppContainer => Box::new(AppContainer::new(core)),
            Kind::Standalone => Box::new(Standalone::new(core)),
        }
    }
}

/// What differs between the kinds of task. The common bookkeeping (process states, stdio,
/// waiting) is in [`TaskCore`], reached through [`Instance::core`].
pub trait Instance: Send + Sync {
    /// The task's id, bundle and processes.
    fn core(&self) -> &TaskCore;

    /// Starts the init process in the guest (after the Start transition was checked).
    fn start(&self, sandbox: &Sandbox) -> Result<()>;

    /// Whether its processes live in the guest, so that each started one is waited there.
    fn waits_in_guest(&self) -> bool;

    /// Refuses an exec where the task runs no process to exec in.
    fn check_exec(&self) -> Result<()>;

    /// Sends `signal` to process `exec_id` (empty: init), to all its processes with `all`.
    fn kill(&self, sandbox: &Sandbox, exec_id: &str, signal: u32, all: bool) -> Result<()>;

    /// The host-visible PIDs of the task.
    fn pids(&self, sandbox: &Sandbox) -> Result<Vec<u32>>;

    /// Metrics for containerd.
    fn stats(&self, sandbox: &Sandbox) -> Result<StatsResponse>;

    /// Applies new resource limits (the OCI `LinuxResources` JSON of an Update).
    fn update(&self, sandbox: &Sandbox, resources: Option<&[u8]>) -> Result<()>;

    /// Freezes (`pause`) or thaws the task.
    fn pause(&self, sandbox: &Sandbox, pause: bool) -> Result<()>;

    /// Whether the task's Delete ends its sandbox (the VM goes with it).
    fn ends_sandbox(&self) -> bool;

    /// The guest (or VM) side of Delete, once the Delete transition was checked.
    fn delete(&self, sandbox: &Sandbox);
}

/// One process: a container's init (exec id empty) or an exec.
#[derive(Debug)]
pub struct Process {
    pub state: TaskState,
    pub stdio: StdioPaths,
    pub exit_status: u32,
    pub exited_at: Option<Timestamp>,
    /// The OCI `process` JSON of an exec.
    pub exec_spec: Vec<u8>,
    /// The terminal size (rows, columns) containerd set on an exec before its Start: the
    /// exec does not exist in the guest yet, so the size goes into its process spec.
    pub console_size: Option<(u32, u32)>,
    /// containerd closed the stdin of an exec before its Start: closed right after it.
    pub stdin_closed: bool,
    pub copy: Option<std::sync::Arc<StdioCopy>>,
}

impl Process {
    pub fn new(stdio: StdioPaths) -> Self {
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
    pub fn exited(&mut self, id: &str, status: u32, at: Timestamp) -> bool {
        if self.state.apply(Transition::Exit, id).is_err() {
            return false;
        }
        self.exit_status = status;
        self.exited_at = Some(at);
        true
    }
}

/// A task's processes.
#[derive(Debug)]
pub struct Processes {
    pub init: Process,
    pub execs: HashMap<String, Process>,
    /// The signal a pod sandbox was killed with (its "exit" is the VM's stop).
    pub kill_signal: Option<u32>,
    /// A Delete of the task is under way: another Delete answers NOT_FOUND at once instead of
    /// deleting it in the guest a second time.
    pub deleting: bool,
    /// Deleted and out of its sandbox: a Wait still blocked on it answers NOT_FOUND.
    pub removed: bool,
}

impl Processes {
    /// Process `exec_id` (empty: init) of task `id`.
    pub fn get(&self, id: &str, exec_id: &str) -> Result<&Process> {
        if self.removed {
            return Err(task_not_found(id));
        }
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs.get(exec_id).ok_or_else(|| ShimError::NotFound {
            kind: "exec",
            id: format!("{id}/{exec_id}"),
        })
    }

    /// Process `exec_id` (empty: init) of task `id`, to change.
    pub fn get_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Process> {
        if self.removed {
            return Err(task_not_found(id));
        }
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

/// NOT_FOUND for task `id`.
pub fn task_not_found(id: &str) -> ShimError {
    ShimError::NotFound {
        kind: "task",
        id: id.to_owned(),
    }
}

/// What every kind of task has: its id, bundle and processes, with a condition variable
/// signalled on every change of their states (Wait).
#[derive(Debug)]
pub struct TaskCore {
    pub id: String,
    pub bundle: String,
    procs: Mutex<Processes>,
    changed: Condvar,
    /// The write end of `<bundle>/log` of a container that joined its pod's shim (see
    /// [`crate::hostfs::open_bundle_log`]); closed when the task goes.
    _bundle_log: Option<std::fs::File>,
}

impl TaskCore {
    /// A created task whose init process has `init`.
    pub fn new(
        id: String,
        bundle: String,
        init: Process,
        bundle_log: Option<std::fs::File>,
    ) -> Self {
        TaskCore {
            id,
            bundle,
            procs: Mutex::new(Processes {
                init,
                execs: HashMap::new(),
                kill_signal: None,
                deleting: false,
                removed: false,
            }),
            changed: Condvar::new(),
            _bundle_log: bundle_log,
        }
    }

    /// The processes, locked (briefly: never across an agent call).
    pub fn lock(&self) -> MutexGuard<'_, Processes> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the waiters after a change made under [`Self::lock`].
    pub fn notify(&self) {
        self.changed.notify_all();
    }

    /// Blocks until process `exec_id` exited; its status and time.
    pub fn wait(&self, exec_id: &str) -> Result<(u32, Option<Timestamp>)> {
        let mut procs = self.lock();
        loop {
            let p = procs.get(&self.id, exec_id)?;
            if matches!(p.state, TaskState::Stopped | TaskState::Deleted) {
                return Ok((p.exit_status, p.exited_at.clone()));
            }
            procs = self.changed.wait(procs).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Records that the VM exited with `code`: every process ends; their exit events.
    pub fn vm_exited(&self, code: VmExitCode, at: &Timestamp) -> Vec<Event> {
        let id = self.id.as_str();
        let mut events = Vec::new();
        let mut procs = self.lock();
        let status = status_after_vm_exit(code, procs.kill_signal);
        if procs.init.exited(id, status, at.clone()) {
            events.push(crate::events::exit(id, id, status, at));
        }
        for (eid, p) in procs.execs.iter_mut() {
            if p.exited(eid, status, at.clone()) {
                events.push(crate::events::exit(id, eid, status, at));
            }
        }
        drop(procs);
        self.notify();
        events
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::convert::now;

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

    #[test]
    fn roles_map_to_kinds_once() {
        let sid = "pod".to_owned();
        let pod = Kind::of(&Role::PodSandbox {
            sandbox_id: sid.clone(),
        });
        let app = Kind::of(&Role::PodContainer { sandbox_id: sid });
        let alone = Kind::of(&Role::Standalone);
        assert!(pod.boots_vm() && !pod.runs_container());
        assert!(!app.boots_vm() && app.runs_container());
        assert!(alone.boots_vm() && alone.runs_container());
    }

    #[test]
    fn a_removed_task_answers_not_found() {
        let core = TaskCore::new(
            "c".into(),
            "/b".into(),
            Process::new(StdioPaths::default()),
            None,
        );
        assert!(core.lock().get("c", "").is_ok());
        core.lock().removed = true;
        core.notify();
        assert!(matches!(core.wait(""), Err(ShimError::NotFound { .. })));
    }
}

//! One sandbox: its VM, the tasks in it (behind the sandbox's own mutex), the allocation of
//! guest ports for stdio streams, and the watcher threads (process exits, OOM events, the VM's
//! exit). The service keeps a registry of sandboxes; everything about one VM is here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use containerd_shim::api::CreateTaskRequest;
use nutshell_protocol::client::ClientError;
use oci_spec::runtime::Spec;

use crate::config::Config;
use crate::convert::{now, timestamp_from_nanos};
use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::hostfs::{prepare_fs, remove_container_dir};
use crate::net::PodNetwork;
use crate::pod::ResourceRequest;
use crate::policy::PodContext;
use crate::start_gate::StartSlot;
use crate::stdio::{StdioCopy, StdioPaths};
use crate::task::{Instance, Kind};
use crate::vm::{SandboxVm, VmExitCode, FIRST_STDIO_PORT};

/// Bound on waiting for a process's output to drain after it exited.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

/// A task as the sandbox holds it.
pub type TaskRef = Arc<dyn Instance>;

/// A sandbox: one VM and the tasks in it.
pub struct Sandbox {
    /// The sandbox id.
    pub id: String,
    /// Its VM.
    pub vm: Arc<SandboxVm>,
    tasks: Mutex<HashMap<String, TaskRef>>,
    next_port: AtomicU32,
    events: Arc<Events>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

/// A sandbox just booted for the Create of its first task.
pub struct Booted {
    pub sandbox: Arc<Sandbox>,
    /// The first task's spec for the guest, if it is a container.
    pub guest_spec: Option<Vec<u8>>,
    /// The start slot, held until the first task's create in the guest is done.
    pub slot: Option<StartSlot>,
}

impl Sandbox {
    /// Boots the VM of sandbox `sandbox_id` for the Create `req` of a task of `kind` (one
    /// that [`Kind::boots_vm`]): a start slot, the sandbox directory, the container's file
    /// systems (mounted before the boot: a bad mount fails fast), the pod's network, the VM.
    pub fn boot(
        config: &Config,
        req: &CreateTaskRequest,
        spec: &Spec,
        kind: Kind,
        sandbox_id: &str,
        events: Arc<Events>,
    ) -> Result<Booted> {
        let id = &req.id;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let request = match kind {
            Kind::PodSandbox => ResourceRequest::from_annotations(&annotations)?,
            Kind::AppContainer | Kind::Standalone => ResourceRequest::from_spec(spec),
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
        let guest_spec = if kind.runs_container() {
            let pod = PodContext::of(spec, sandbox_id);
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
        // Filled once the sandbox exists; a VM exiting before has no task to end.
        let this: Arc<OnceLock<Weak<Sandbox>>> = Arc::new(OnceLock::new());
        let on_exit = {
            let this = Arc::clone(&this);
            Box::new(move |code| {
                if let Some(sandbox) = this.get().and_then(Weak::upgrade) {
                    sandbox.vm_exited(code);
                }
            })
        };
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
        let sandbox_spec =
            crate::spec::sandbox_spec(spec, sandbox_id, &hostname, kind == Kind::PodSandbox);
        let vm = SandboxVm::start(
            config,
            &paths,
            &sandbox_spec,
            size,
            cgroups_path.as_deref(),
            net,
            on_exit,
        )?;
        let sandbox = Sandbox::new(sandbox_id.to_owned(), Arc::new(vm), events);
        let _ = this.set(Arc::downgrade(&sandbox));
        Ok(Booted {
            sandbox,
            guest_spec,
            slot,
        })
    }

    fn new(id: String, vm: Arc<SandboxVm>, events: Arc<Events>) -> Arc<Sandbox> {
        Arc::new(Sandbox {
            id,
            vm,
            tasks: Mutex::new(HashMap::new()),
            next_port: AtomicU32::new(FIRST_STDIO_PORT),
            events,
        })
    }

    /// A sandbox over a [`crate::vm::detached`] VM handle in `dir`, for unit tests.
    #[cfg(test)]
    pub fn detached(id: &str, dir: &std::path::Path, events: Arc<Events>) -> Arc<Sandbox> {
        Sandbox::new(
            id.to_owned(),
            Arc::new(crate::vm::detached(id, dir)),
            events,
        )
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, TaskRef>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Task `id` of this sandbox.
    pub fn task(&self, id: &str) -> Result<TaskRef> {
        self.tasks()
            .get(id)
            .cloned()
            .ok_or_else(|| crate::task::task_not_found(id))
    }

    /// Adds a created task.
    pub fn insert(&self, task: TaskRef) {
        self.tasks().insert(task.core().id.clone(), task);
    }

    /// Removes task `id`.
    pub fn remove(&self, id: &str) -> Option<TaskRef> {
        self.tasks().remove(id)
    }

    /// The ids of its tasks other than `id`, sorted.
    pub fn other_tasks(&self, id: &str) -> Vec<String> {
        let mut ids: Vec<String> = self.tasks().keys().filter(|k| *k != id).cloned().collect();
        ids.sort();
        ids
    }

    /// A fresh guest port for a stdio stream.
    pub fn next_port(&self) -> u32 {
        self.next_port.fetch_add(1, Ordering::Relaxed)
    }

    /// Prepares the file systems of app container `req.id` joining this sandbox; its spec for
    /// the guest.
    pub fn prepare_join(
        &self,
        config: &Config,
        req: &CreateTaskRequest,
        spec: &Spec,
    ) -> Result<Vec<u8>> {
        if self.vm.exited().is_some() {
            return Err(ShimError::FailedPrecondition(format!(
                "sandbox {}: the VM is not running",
                self.id
            )));
        }
        let pod = PodContext::of(spec, &self.id);
        prepare_fs(req, spec, &self.vm.shared(), &config.policy, pod).inspect_err(|_| {
            remove_container_dir(&self.vm.shared(), &req.id);
        })
    }

    /// Creates container `id` in the guest from `guest_spec`, its stdio copied from `stdio`.
    /// On failure its directory in the shared directory is removed.
    pub fn create_container(
        &self,
        id: &str,
        guest_spec: Vec<u8>,
        stdio: &StdioPaths,
    ) -> Result<StdioCopy> {
        let ports = stdio.ports(|| self.next_port());
        let copy = StdioCopy::start(&self.vm.vsock(), stdio, ports, id);
        let started = Instant::now();
        match self
            .vm
            .agent()
            .create_container(id, guest_spec, ports, stdio.terminal)
            .map_err(ShimError::agent("CreateContainer"))
        {
            Ok(()) => {
                log::info!(
                    "{id}: CreateContainer in the guest took {:.3} s",
                    started.elapsed().as_secs_f64()
                );
                Ok(copy)
            }
            Err(e) => {
                drop(copy);
                remove_container_dir(&self.vm.shared(), id);
                Err(e)
            }
        }
    }

    /// Starts exec `exec_id` of container `id` in the guest; its stdio copy.
    pub fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        exec_spec: Vec<u8>,
        stdio: &StdioPaths,
    ) -> Result<StdioCopy> {
        let started = Instant::now();
        let ports = stdio.ports(|| self.next_port());
        let copy = StdioCopy::start(&self.vm.vsock(), stdio, ports, &format!("{id}/{exec_id}"));
        self.vm
            .agent()
            .exec_process(id, exec_id, exec_spec, ports, stdio.terminal)
            .map_err(ShimError::agent("ExecProcess"))?;
        log::info!(
            "{id}/{exec_id}: ExecProcess in the guest took {:.3} s",
            started.elapsed().as_secs_f64()
        );
        Ok(copy)
    }

    /// Called by the VM's watcher: every process of the sandbox ends.
    fn vm_exited(&self, code: VmExitCode) {
        let tasks: Vec<TaskRef> = self.tasks().values().cloned().collect();
        let at = now();
        for task in tasks {
            for e in task.core().vm_exited(code, &at) {
                self.events.publish(e);
            }
        }
    }

    /// Waits for process `exec_id` of `task` in the guest (on its own connection) and records
    /// its exit.
    pub fn watch_process(self: &Arc<Self>, task: TaskRef, exec_id: String) {
        let sandbox = Arc::clone(self);
        let id = task.core().id.clone();
        let name = format!("wait-{id}-{exec_id}");
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let vm = &sandbox.vm;
            let result = vm.wait_process(&id, &exec_id);
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
            log::debug!("{id}/{exec_id}: WaitProcess returned {status}");
            let core = task.core();
            let copy = core
                .lock()
                .get(&id, &exec_id)
                .ok()
                .and_then(|p| p.copy.clone());
            if let Some(copy) = copy {
                copy.wait_outputs(OUTPUT_DRAIN);
                log::debug!("{id}/{exec_id}: outputs drained");
            }
            let mut procs = core.lock();
            let Ok(p) = procs.get_mut(&id, &exec_id) else {
                return;
            };
            let process_id = if exec_id.is_empty() {
                id.clone()
            } else {
                exec_id.clone()
            };
            if p.exited(&process_id, status, at.clone()) {
                drop(procs);
                core.notify();
                sandbox
                    .events
                    .publish(crate::events::exit(&id, &process_id, status, &at));
            }
        });
        if let Err(e) = spawned {
            log::error!("cannot start a waiter thread: {e}");
        }
    }

    /// Forwards the guest's OOM events until the VM goes.
    pub fn watch_oom(self: &Arc<Self>) {
        let sandbox = Arc::clone(self);
        let _ = std::thread::Builder::new()
            .name(format!("oom-{}", self.id))
            .spawn(move || {
                let vm = &sandbox.vm;
                let Ok(agent) = vm.blocking_agent() else {
                    return;
                };
                loop {
                    match agent.get_oom_event() {
                        Ok(container_id) => {
                            log::info!("sandbox {}: OOM in {container_id}", vm.id);
                            sandbox.events.publish(crate::events::oom(container_id));
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

//! Delete: of an exec (its record goes), or of a task: the checks, the claim that makes a
//! second Delete meanwhile NOT_FOUND, the guest (or VM) side through the task's instance, then
//! the registry, the sandbox's table and the waiters.

use containerd_shim::api::{DeleteRequest, DeleteResponse};
use containerd_shim::protos::protobuf::MessageField;

use super::Service;
use crate::convert::now;
use crate::error::{Result, ShimError};
use crate::hostfs::remove_container_dir;
use crate::state::{TaskState, Transition};
use crate::task::task_not_found;

impl Service {
    pub(super) fn do_delete(&self, req: &DeleteRequest) -> Result<DeleteResponse> {
        let (id, exec_id) = (req.id.as_str(), req.exec_id.as_str());
        let (sandbox, task) = self.lookup(id)?;
        let core = task.core();
        let pid = sandbox.vm.pid;
        if !exec_id.is_empty() {
            let mut procs = core.lock();
            let p = procs.get_mut(id, exec_id)?;
            p.state.apply(Transition::Delete, exec_id)?;
            let resp = DeleteResponse {
                pid,
                exit_status: p.exit_status,
                exited_at: p.exited_at.clone().into(),
                ..Default::default()
            };
            procs.execs.remove(exec_id);
            drop(procs);
            // The agent keeps an exec's record (pidfd, stdin) until told: without this, every
            // exec probe of a long-lived pod would leave one behind in the guest.
            if let Err(e) = sandbox.vm.agent().remove_process(id, exec_id) {
                log::warn!("{id}/{exec_id}: RemoveProcess in the guest: {e}");
            }
            return Ok(resp);
        }
        if task.ends_sandbox() {
            let others = sandbox.other_tasks(id);
            if !others.is_empty() {
                return Err(ShimError::FailedPrecondition(format!(
                    "sandbox {id} still has containers {others:?}"
                )));
            }
        }
        {
            // Claimed under the lock: a Delete that comes while this one is in the guest
            // finds the task going.
            let mut procs = core.lock();
            if procs.deleting {
                return Err(task_not_found(id));
            }
            procs.get(id, "")?.state.next(Transition::Delete, id)?;
            procs.deleting = true;
        }
        task.delete(&sandbox);
        remove_container_dir(&sandbox.vm.shared(), id);
        {
            let mut reg = self.registry();
            if reg.tasks.remove(id).is_none() {
                return Err(task_not_found(id));
            }
            if task.ends_sandbox() {
                reg.sandboxes.remove(&sandbox.id);
            }
        }
        sandbox.remove(id);
        let (exit_status, exited_at) = {
            let mut procs = core.lock();
            // Created and never started: it ends here.
            if procs.init.state == TaskState::Created {
                procs.init.exited(id, 128 + 9, now());
            }
            let _ = procs.init.state.apply(Transition::Delete, id);
            procs.removed = true;
            let exited_at = procs.init.exited_at.clone().unwrap_or_else(now);
            (procs.init.exit_status, exited_at)
        };
        core.notify();
        self.inner
            .events
            .publish(crate::events::delete(id, pid, exit_status, &exited_at));
        Ok(DeleteResponse {
            pid,
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }
}

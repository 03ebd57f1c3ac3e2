//! The pod sandbox (pause) container: it runs no process; its task is the pod's VM. Kill stops
//! the VM, Pause/Resume/Stats go to the VMM's control socket, Delete stops the VM.

use std::sync::Arc;

use containerd_shim::api::StatsResponse;

use super::{Instance, TaskCore};
use crate::error::{Result, ShimError};
use crate::sandbox::Sandbox;

/// The CRI's sandbox container of a pod.
#[derive(Debug)]
pub struct PodSandbox {
    core: TaskCore,
}

impl PodSandbox {
    pub fn new(core: TaskCore) -> Self {
        PodSandbox { core }
    }
}

impl Instance for PodSandbox {
    fn core(&self) -> &TaskCore {
        &self.core
    }

    fn start(&self, _sandbox: &Sandbox) -> Result<()> {
        // Its VM runs already: nothing to start in the guest.
        Ok(())
    }

    fn waits_in_guest(&self) -> bool {
        false
    }

    fn check_exec(&self) -> Result<()> {
        Err(ShimError::FailedPrecondition(format!(
            "{} is a pod sandbox: it runs no process to exec in",
            self.core.id
        )))
    }

    fn kill(&self, sandbox: &Sandbox, _exec_id: &str, signal: u32, _all: bool) -> Result<()> {
        self.core.lock().kill_signal = Some(signal);
        // The pod sandbox's "process" is the VM: stopping it ends every task of the pod.
        let vm = Arc::clone(&sandbox.vm);
        let _ = std::thread::Builder::new()
            .name(format!("stop-{}", vm.id))
            .spawn(move || vm.stop());
        Ok(())
    }

    fn pids(&self, sandbox: &Sandbox) -> Result<Vec<u32>> {
        Ok(vec![sandbox.vm.pid])
    }

    fn stats(&self, sandbox: &Sandbox) -> Result<StatsResponse> {
        crate::convert::pod_stats_response(&sandbox.vm.stats()?)
    }

    fn update(&self, _sandbox: &Sandbox, _resources: Option<&[u8]>) -> Result<()> {
        Err(ShimError::Unimplemented("resizing a pod's VM"))
    }

    fn pause(&self, sandbox: &Sandbox, pause: bool) -> Result<()> {
        // Pausing the VM stops every vCPU, so the pod's containers pause with it (under runc,
        // pausing the pause container freezes only that container).
        if pause {
            sandbox.vm.pause()
        } else {
            sandbox.vm.resume()
        }
    }

    fn ends_sandbox(&self) -> bool {
        true
    }

    fn delete(&self, sandbox: &Sandbox) {
        sandbox.vm.stop();
    }
}

//! Containers in the guest: an app container of a pod, and a standalone container (a VM of its
//! own). Both run their processes through the agent; they differ in whether their Delete ends
//! the VM.

use std::time::Instant;

use containerd_shim::api::StatsResponse;

use super::{Instance, TaskCore};
use crate::error::{Result, ShimError};
use crate::sandbox::Sandbox;

/// An app container of a pod: it joins the VM its pod sandbox started.
#[derive(Debug)]
pub struct AppContainer {
    core: TaskCore,
}

/// A container without CRI annotations: its Create booted a VM of its own, its Delete stops it.
#[derive(Debug)]
pub struct Standalone {
    core: TaskCore,
}

impl AppContainer {
    pub fn new(core: TaskCore) -> Self {
        AppContainer { core }
    }
}

impl Standalone {
    pub fn new(core: TaskCore) -> Self {
        Standalone { core }
    }
}

/// Starts container `id`'s init process in the guest.
fn start(sandbox: &Sandbox, id: &str) -> Result<()> {
    let started = Instant::now();
    sandbox
        .vm
        .agent()
        .start_container(id)
        .map_err(ShimError::agent("StartContainer"))?;
    log::info!(
        "{id}: StartContainer in the guest took {:.3} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn kill(sandbox: &Sandbox, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
    sandbox
        .vm
        .agent()
        .signal_process(id, exec_id, signal, all)
        .map_err(ShimError::agent("SignalProcess"))
}

fn pids(sandbox: &Sandbox, id: &str) -> Result<Vec<u32>> {
    sandbox
        .vm
        .agent()
        .list_pids(id)
        .map_err(ShimError::agent("ListPids"))
}

fn stats(sandbox: &Sandbox, id: &str) -> Result<StatsResponse> {
    let s = sandbox
        .vm
        .agent()
        .stats_container(id)
        .map_err(ShimError::agent("StatsContainer"))?;
    crate::convert::container_stats_response(&s)
}

fn update(sandbox: &Sandbox, id: &str, resources: Option<&[u8]>) -> Result<()> {
    let json =
        resources.ok_or_else(|| ShimError::InvalidArgument("update without resources".into()))?;
    let resources = crate::convert::resources_from_oci(json)?;
    sandbox
        .vm
        .agent()
        .update_container(id, &resources)
        .map_err(ShimError::agent("UpdateContainer"))
}

fn pause(sandbox: &Sandbox, id: &str, pause: bool) -> Result<()> {
    let agent = sandbox.vm.agent();
    if pause {
        agent
            .pause_container(id)
            .map_err(ShimError::agent("PauseContainer"))
    } else {
        agent
            .resume_container(id)
            .map_err(ShimError::agent("ResumeContainer"))
    }
}

/// The container methods of [`Instance`], the same for both kinds.
macro_rules! container_instance {
    () => {
        fn core(&self) -> &TaskCore {
            &self.core
        }

        fn start(&self, sandbox: &Sandbox) -> Result<()> {
            start(sandbox, &self.core.id)
        }

        fn waits_in_guest(&self) -> bool {
            true
        }

        fn check_exec(&self) -> Result<()> {
            Ok(())
        }

        fn kill(&self, sandbox: &Sandbox, exec_id: &str, signal: u32, all: bool) -> Result<()> {
            kill(sandbox, &self.core.id, exec_id, signal, all)
        }

        fn pids(&self, sandbox: &Sandbox) -> Result<Vec<u32>> {
            pids(sandbox, &self.core.id)
        }

        fn stats(&self, sandbox: &Sandbox) -> Result<StatsResponse> {
            stats(sandbox, &self.core.id)
        }

        fn update(&self, sandbox: &Sandbox, resources: Option<&[u8]>) -> Result<()> {
            update(sandbox, &self.core.id, resources)
        }

        fn pause(&self, sandbox: &Sandbox, pause_it: bool) -> Result<()> {
            pause(sandbox, &self.core.id, pause_it)
        }
    };
}

impl Instance for AppContainer {
    container_instance!();

    fn ends_sandbox(&self) -> bool {
        false
    }

    fn delete(&self, sandbox: &Sandbox) {
        let id = &self.core.id;
        if sandbox.vm.exited().is_none() {
            if let Err(e) = sandbox.vm.agent().remove_container(id, 0) {
                log::warn!("{id}: agent RemoveContainer: {}", crate::error::chain(&e));
            }
        }
    }
}

impl Instance for Standalone {
    container_instance!();

    fn ends_sandbox(&self) -> bool {
        true
    }

    fn delete(&self, sandbox: &Sandbox) {
        // The container goes with its VM: the guest's power-off (the agent syncs first) ends
        // whatever it left, so the guest's RemoveContainer (unmounts, cgroup removal: about a
        // second of guest-kernel work where that is emulated) would be wasted.
        sandbox.vm.stop();
    }
}

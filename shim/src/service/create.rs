//! Create: the checks, the registry's bookkeeping around the slow part (booting the sandbox's
//! VM, or joining one), and the task of the container's kind.

use std::path::Path;
use std::sync::Arc;

use containerd_shim::api::{CreateTaskRequest, CreateTaskResponse};
use oci_spec::runtime::Spec;

use super::{Service, TERMINATING};
use crate::config::Config;
use crate::error::{Result, ShimError};
use crate::hostfs::open_bundle_log;
use crate::pod::{validate_id, Role};
use crate::sandbox::{Booted, Sandbox, TaskRef};
use crate::stdio::StdioPaths;
use crate::task::{Kind, Process, TaskCore};

/// A task made by the slow part of Create, not yet registered.
struct Created {
    sandbox: Arc<Sandbox>,
    task: TaskRef,
    /// Its Create booted the sandbox.
    new_sandbox: bool,
}

impl Service {
    pub(super) fn do_create(&self, req: &CreateTaskRequest) -> Result<CreateTaskResponse> {
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
        let kind = Kind::of(&role);
        // Both checks run before anything is made: nothing to undo. The policy's first, so
        // that a strict node names its own key for a hostNetwork pod.
        let config = self.config(req.options.as_ref())?;
        crate::policy::check_create(&config.policy, &spec, &id, &role, &sandbox_id)?;
        if kind.boots_vm() {
            crate::net::refuse_node_network(&spec)?;
        }
        {
            let mut reg = self.registry();
            if reg.terminating {
                return Err(ShimError::FailedPrecondition(TERMINATING.into()));
            }
            if reg.tasks.contains_key(&id) || reg.creating.contains(&id) {
                return Err(ShimError::AlreadyExists { kind: "task", id });
            }
            let exists = reg.sandboxes.contains_key(&sandbox_id);
            if kind.boots_vm() && exists {
                return Err(ShimError::AlreadyExists {
                    kind: "sandbox",
                    id: sandbox_id,
                });
            }
            if !kind.boots_vm() && !exists {
                return Err(ShimError::NotFound {
                    kind: "sandbox",
                    id: sandbox_id,
                });
            }
            reg.creating.insert(id.clone());
        }
        let result = self.create_unlocked(req, &config, &spec, kind, &sandbox_id);
        let mut reg = self.registry();
        if reg.terminating {
            // `terminate` set the flag and took the VMs to stop under this same lock, so this
            // VM is not among them; it waits for this Create to leave `creating`.
            drop(reg);
            if let Ok(created) = &result {
                if created.new_sandbox {
                    created.sandbox.vm.stop();
                }
            }
            self.registry().creating.remove(&id);
            result?;
            return Err(ShimError::FailedPrecondition(TERMINATING.into()));
        }
        reg.creating.remove(&id);
        let created = result?;
        let pid = created.sandbox.vm.pid;
        if created.new_sandbox {
            reg.sandboxes
                .insert(sandbox_id.clone(), Arc::clone(&created.sandbox));
        }
        reg.tasks.insert(id, sandbox_id);
        created.sandbox.insert(created.task);
        drop(reg);
        if created.new_sandbox {
            created.sandbox.watch_oom();
        }
        self.inner.events.publish(crate::events::create(req, pid));
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    /// The slow part of Create: boot the VM if this task starts one, mount, call the agent.
    fn create_unlocked(
        &self,
        req: &CreateTaskRequest,
        config: &Config,
        spec: &Spec,
        kind: Kind,
        sandbox_id: &str,
    ) -> Result<Created> {
        let id = &req.id;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        // A VM start holds a start slot until this function returns: the VM's start and its
        // first container's create.
        let (sandbox, guest_spec, _slot, new_sandbox) = if kind.boots_vm() {
            let events = Arc::clone(&self.inner.events);
            let Booted {
                sandbox,
                guest_spec,
                slot,
            } = Sandbox::boot(config, req, spec, kind, sandbox_id, events)?;
            (sandbox, guest_spec, slot, true)
        } else {
            let sandbox = self
                .registry()
                .sandboxes
                .get(sandbox_id)
                .cloned()
                .ok_or_else(|| ShimError::NotFound {
                    kind: "sandbox",
                    id: sandbox_id.to_owned(),
                })?;
            let json = sandbox.prepare_join(config, req, spec)?;
            (sandbox, Some(json), None, false)
        };
        let copy = match guest_spec {
            None => None,
            Some(json) => match sandbox.create_container(id, json, &stdio) {
                Ok(copy) => Some(Arc::new(copy)),
                Err(e) => {
                    if new_sandbox {
                        sandbox.vm.stop();
                    }
                    return Err(e);
                }
            },
        };
        let mut init = Process::new(stdio);
        init.copy = copy;
        let bundle_log = if new_sandbox {
            None
        } else {
            open_bundle_log(&req.bundle)
        };
        let core = TaskCore::new(id.clone(), req.bundle.clone(), init, bundle_log);
        Ok(Created {
            sandbox,
            task: Arc::from(kind.instance(core)),
            new_sandbox,
        })
    }
}

//! The ttrpc services of the agent API: `Health` (Check, Version) and `Agent`.
//!
//! Every `Agent` method of `protocol/protos/agent.proto` is served. The handlers are thin:
//! the sandbox and container methods (CreateSandbox … GetOOMEvent) call [`Pod`] and map its
//! [`PodError`] to a ttrpc status in one place ([`PodError::code`]); UpdateInterface and
//! UpdateRoutes call [`crate::network`]; Shutdown answers, then powers off through the injected
//! [`ShutdownAction`]; RefreshGuest sets the clock and feeds the RNG through the injected
//! [`RefreshAction`]. Without an installed pod the container methods answer
//! FAILED_PRECONDITION. The injected actions let the service run on the host in tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nutshell_protocol::generated::agent as pb;
use nutshell_protocol::generated::agent_ttrpc;
use nutshell_protocol::types::{AgentVersion, ServingStatus};
use nutshell_protocol::AGENT_API_VERSION;
use ttrpc::TtrpcContext;

use crate::network::{self, NetworkError};
use crate::pod::{stats_to_pb, unix_nanos, Pod, PodError};
use crate::refresh::{Refresh, RefreshAction, RefreshError};

/// How long Shutdown waits after answering before it acts, so that the reply leaves the guest
/// first (ttrpc sends it only after the handler returned).
pub const SHUTDOWN_REPLY_GRACE: Duration = Duration::from_millis(100);

/// What Shutdown does once it has answered: in the guest, sync and power off.
pub trait ShutdownAction: Send + Sync {
    /// Called on a thread of its own, [`SHUTDOWN_REPLY_GRACE`] after the reply.
    fn shutdown(&self);
}

impl<F: Fn() + Send + Sync> ShutdownAction for F {
    fn shutdown(&self) {
        self()
    }
}

/// Errors of the agent's ttrpc server.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Binding or starting the server failed.
    #[error("ttrpc server on {addr}")]
    Server {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: ttrpc::Error,
    },
}

/// State shared by the handlers.
pub struct AgentService {
    version: AgentVersion,
    shutting_down: AtomicBool,
    on_shutdown: Arc<dyn ShutdownAction>,
    refresh: OnceLock<Arc<dyn RefreshAction>>,
    pod: OnceLock<Arc<Pod>>,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService")
            .field("version", &self.version)
            .field("shutting_down", &self.shutting_down)
            .finish_non_exhaustive()
    }
}

impl AgentService {
    /// A service that reports `kernel_release` in Version and runs `on_shutdown` after Shutdown.
    pub fn new(kernel_release: String, on_shutdown: Arc<dyn ShutdownAction>) -> Arc<Self> {
        Arc::new(AgentService {
            version: AgentVersion {
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                api_version: AGENT_API_VERSION,
                kernel_release,
            },
            shutting_down: AtomicBool::new(false),
            on_shutdown,
            refresh: OnceLock::new(),
            pod: OnceLock::new(),
        })
    }

    /// Installs what RefreshGuest does (in the guest: [`crate::refresh::SystemRefresh`]);
    /// without one, RefreshGuest answers FAILED_PRECONDITION. Only the first call counts.
    pub fn set_refresh_action(&self, action: Arc<dyn RefreshAction>) {
        let _ = self.refresh.set(action);
    }

    /// Installs the pod the container RPCs act on; without one they answer
    /// FAILED_PRECONDITION. Only the first call counts.
    pub fn set_pod(&self, pod: Arc<Pod>) {
        let _ = self.pod.set(pod);
    }

    fn pod(&self) -> Result<&Pod, ttrpc::Error> {
        self.pod.get().map(|p| p.as_ref()).ok_or_else(|| {
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::FAILED_PRECONDITION,
                "this agent runs no containers (no pod installed)",
            ))
        })
    }

    fn do_refresh(&self, req: pb::RefreshGuestRequest) -> Result<(), RefreshError> {
        let refresh = Refresh::new(req.unix_nanos, req.entropy)?;
        let action = self.refresh.get().ok_or(RefreshError::Unavailable)?;
        action.refresh(&refresh)?;
        // The clock as read back, so that the host can check it on the console.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        log::debug!(
            "guest refreshed: wall clock {}.{:09} ({}), {} entropy bytes",
            now.as_secs(),
            now.subsec_nanos(),
            if refresh.unix_nanos.is_some() {
                "set"
            } else {
                "kept"
            },
            refresh.entropy.len()
        );
        Ok(())
    }

    /// The ttrpc method table of both services, for `ttrpc::Server::register_service`.
    pub fn methods(
        self: &Arc<Self>,
    ) -> HashMap<String, Box<dyn ttrpc::MethodHandler + Send + Sync>> {
        let mut methods = agent_ttrpc::create_health(self.clone());
        methods.extend(agent_ttrpc::create_agent(self.clone()));
        methods
    }

    /// A ttrpc server of this service on `addr` (`vsock://-1:1024` in the guest,
    /// `unix:///path` in tests), started.
    pub fn serve(self: &Arc<Self>, addr: &str) -> Result<ttrpc::Server, ServiceError> {
        let err = |source: ttrpc::Error| ServiceError::Server {
            addr: addr.to_string(),
            source,
        };
        let mut server = ttrpc::Server::new()
            .bind(addr)
            .map_err(err)?
            .register_service(self.methods());
        server.start().map_err(err)?;
        Ok(server)
    }

    fn do_check(&self) -> ServingStatus {
        if self.shutting_down.load(Ordering::SeqCst) {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        }
    }

    fn do_shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            log::info!("shutdown already requested");
            return;
        }
        log::info!("shutdown requested: powering off");
        let action = self.on_shutdown.clone();
        let spawned = std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || {
                std::thread::sleep(SHUTDOWN_REPLY_GRACE);
                action.shutdown();
            });
        if let Err(e) = spawned {
            // No thread for the grace period: act now, the reply may be lost.
            log::warn!("cannot spawn the shutdown thread ({e}); shutting down at once");
            self.on_shutdown.shutdown();
        }
    }
}

impl agent_ttrpc::Health for AgentService {
    fn check(
        &self,
        _ctx: &TtrpcContext,
        _: pb::CheckRequest,
    ) -> ttrpc::Result<pb::HealthCheckResponse> {
        Ok(self.do_check().into())
    }

    fn version(
        &self,
        _ctx: &TtrpcContext,
        _: pb::VersionRequest,
    ) -> ttrpc::Result<pb::VersionResponse> {
        Ok((&self.version).into())
    }
}

/// The ttrpc status of a failed container RPC: its code, and the error with its causes.
fn status(method: &str, e: &PodError) -> ttrpc::Error {
    let message = nutshell_protocol::error_chain(e);
    log::warn!("{method}: {message}");
    ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), message))
}

/// The ttrpc status of a failed network RPC.
fn network_status(method: &str, e: &NetworkError) -> ttrpc::Error {
    let message = nutshell_protocol::error_chain(e);
    log::warn!("{method}: {message}");
    ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), message))
}

/// An empty reply, or the error's status.
fn reply(method: &str, result: Result<(), PodError>) -> ttrpc::Result<pb::Empty> {
    result
        .map(|()| pb::Empty::new())
        .map_err(|e| status(method, &e))
}

impl agent_ttrpc::Agent for AgentService {
    fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateSandboxRequest,
    ) -> ttrpc::Result<pb::Empty> {
        reply("CreateSandbox", self.pod()?.create_sandbox(&req))
    }

    fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: pb::DestroySandboxRequest,
    ) -> ttrpc::Result<pb::Empty> {
        reply(
            "DestroySandbox",
            self.pod()?.destroy_sandbox(&req.sandbox_id),
        )
    }

    fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        reply(
            "CreateContainer",
            self.pod()?.create_container(&req).map(drop),
        )
    }

    fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::StartContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        reply(
            "StartContainer",
            self.pod()?.start_container(&req.container_id),
        )
    }

    fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RemoveContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let pod = self.pod()?;
        reply(
            "RemoveContainer",
            pod.remove_container(&req.container_id, req.timeout_secs),
        )
    }

    fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ExecProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        reply("ExecProcess", self.pod()?.exec_process(&req).map(drop))
    }

    fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        reply("SignalProcess", self.pod()?.signal_process(&req))
    }

    fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WaitProcessRequest,
    ) -> ttrpc::Result<pb::WaitProcessResponse> {
        let exit = self
            .pod()?
            .wait_process(&req.container_id, &req.exec_id)
            .map_err(|e| status("WaitProcess", &e))?;
        Ok(pb::WaitProcessResponse {
            exit_status: exit.status,
            exited_at_unix_nanos: unix_nanos(exit.at),
            ..Default::default()
        })
    }

    fn list_pids(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ListPidsRequest,
    ) -> ttrpc::Result<pb::ListPidsResponse> {
        let pids = self
            .pod()?
            .list_pids(&req.container_id)
            .map_err(|e| status("ListPids", &e))?;
        Ok(pb::ListPidsResponse {
            pids,
            ..Default::default()
        })
    }

    fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::StatsContainerRequest,
    ) -> ttrpc::Result<pb::StatsContainerResponse> {
        let stats = self
            .pod()?
            .stats(&req.container_id)
            .map_err(|e| status("StatsContainer", &e))?;
        Ok(stats_to_pb(&stats))
    }

    fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let resources = req.resources.clone().unwrap_or_default();
        reply(
            "UpdateContainer",
            self.pod()?.update(&req.container_id, &resources),
        )
    }

    fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::PauseContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        reply("PauseContainer", self.pod()?.pause(&req.container_id))
    }

    fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ResumeContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        reply("ResumeContainer", self.pod()?.resume(&req.container_id))
    }

    fn resize_tty(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ResizeTtyRequest,
    ) -> ttrpc::Result<pb::Empty> {
        reply("ResizeTty", self.pod()?.resize(&req))
    }

    fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CloseStdinRequest,
    ) -> ttrpc::Result<pb::Empty> {
        reply(
            "CloseStdin",
            self.pod()?.close_stdin(&req.container_id, &req.exec_id),
        )
    }

    fn remove_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RemoveProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        reply(
            "RemoveProcess",
            self.pod()?.remove_process(&req.container_id, &req.exec_id),
        )
    }

    fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _: pb::GetOOMEventRequest,
    ) -> ttrpc::Result<pb::OOMEvent> {
        let id = self
            .pod()?
            .next_oom_event()
            .map_err(|e| status("GetOOMEvent", &e))?;
        Ok(pb::OOMEvent {
            container_id: id,
            ..Default::default()
        })
    }

    fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateInterfaceRequest,
    ) -> ttrpc::Result<pb::Interface> {
        let iface = req.interface.into_option().unwrap_or_default();
        let routes = req.routes.into_option().unwrap_or_default();
        network::update_interface(&iface, &routes.routes)
            .map_err(|e| network_status("UpdateInterface", &e))
    }

    fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateRoutesRequest,
    ) -> ttrpc::Result<pb::Routes> {
        let routes = req.routes.into_option().unwrap_or_default();
        network::update_routes(&routes).map_err(|e| network_status("UpdateRoutes", &e))
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _: pb::ShutdownRequest) -> ttrpc::Result<pb::Empty> {
        self.do_shutdown();
        Ok(pb::Empty::new())
    }

    fn refresh_guest(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RefreshGuestRequest,
    ) -> ttrpc::Result<pb::Empty> {
        self.do_refresh(req)
            .map(|()| pb::Empty::new())
            .map_err(|e| {
                let code = match e {
                    RefreshError::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
                    RefreshError::Unavailable => ttrpc::Code::FAILED_PRECONDITION,
                    _ => ttrpc::Code::INTERNAL,
                };
                let message = match std::error::Error::source(&e) {
                    Some(cause) => format!("{e}: {cause}"),
                    None => e.to_string(),
                };
                ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
            })
    }
}

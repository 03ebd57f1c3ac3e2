//! The ttrpc services of the agent API: `Health` (Check, Version) and `Agent`.
//!
//! Served now: Check, Version, Shutdown, RefreshGuest. Every other `Agent` method answers UNIMPLEMENTED with
//! "not implemented yet: <Method>". The power-off that follows Shutdown is injected as a
//! [`ShutdownAction`], so that the service runs on the host in tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nutshell_protocol::generated::agent as pb;
use nutshell_protocol::generated::agent_ttrpc;
use nutshell_protocol::types::{not_implemented, AgentVersion, ServingStatus};
use nutshell_protocol::AGENT_API_VERSION;
use ttrpc::TtrpcContext;

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
        })
    }

    /// Installs what RefreshGuest does (in the guest: [`crate::refresh::SystemRefresh`]);
    /// without one, RefreshGuest answers FAILED_PRECONDITION. Only the first call counts.
    pub fn set_refresh_action(&self, action: Arc<dyn RefreshAction>) {
        let _ = self.refresh.set(action);
    }

    fn do_refresh(&self, req: pb::RefreshGuestRequest) -> Result<(), RefreshError> {
        let refresh = Refresh::new(req.unix_nanos, req.entropy)?;
        let action = self.refresh.get().ok_or(RefreshError::Unavailable)?;
        action.refresh(&refresh)?;
        // The clock as read back, so that the host can check it on the console.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        log::info!(
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

/// Methods defined in the API but not served yet: each answers UNIMPLEMENTED, naming itself.
macro_rules! not_served {
    ($($method:ident($req:ident) -> $resp:ident = $name:literal;)*) => {
        $(
            fn $method(&self, _ctx: &TtrpcContext, _: pb::$req) -> ttrpc::Result<pb::$resp> {
                log::debug!("{} called: not implemented yet", $name);
                Err(not_implemented($name))
            }
        )*
    };
}

impl agent_ttrpc::Agent for AgentService {
    not_served! {
        create_sandbox(CreateSandboxRequest) -> Empty = "CreateSandbox";
        destroy_sandbox(DestroySandboxRequest) -> Empty = "DestroySandbox";
        create_container(CreateContainerRequest) -> Empty = "CreateContainer";
        start_container(StartContainerRequest) -> Empty = "StartContainer";
        remove_container(RemoveContainerRequest) -> Empty = "RemoveContainer";
        exec_process(ExecProcessRequest) -> Empty = "ExecProcess";
        signal_process(SignalProcessRequest) -> Empty = "SignalProcess";
        wait_process(WaitProcessRequest) -> WaitProcessResponse = "WaitProcess";
        list_pids(ListPidsRequest) -> ListPidsResponse = "ListPids";
        stats_container(StatsContainerRequest) -> StatsContainerResponse = "StatsContainer";
        update_container(UpdateContainerRequest) -> Empty = "UpdateContainer";
        pause_container(PauseContainerRequest) -> Empty = "PauseContainer";
        resume_container(ResumeContainerRequest) -> Empty = "ResumeContainer";
        resize_tty(ResizeTtyRequest) -> Empty = "ResizeTty";
        close_stdin(CloseStdinRequest) -> Empty = "CloseStdin";
        get_oom_event(GetOOMEventRequest) -> OOMEvent = "GetOOMEvent";
        update_interface(UpdateInterfaceRequest) -> Interface = "UpdateInterface";
        update_routes(UpdateRoutesRequest) -> Routes = "UpdateRoutes";
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

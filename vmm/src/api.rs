//! The VMM control socket: `nutshell.vmm.v1.Vmm` (protocol/protos/vmm.proto) served over ttrpc
//! on a Unix socket: Pause, Resume, Snapshot, Stats, Shutdown.
//!
//! Handlers are thin: they validate the request, call a `do_*` function that returns a
//! [`ApiError`], and map that error to a ttrpc status in one place ([`to_status`]).

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nutshell_protocol::generated::vmm as pb;
use nutshell_protocol::generated::vmm_ttrpc;
use ttrpc::TtrpcContext;

use crate::exit::{ExitHandle, VmExit};
use crate::vm::{RunningVm, VmError};

/// How long Shutdown waits after answering before it stops the VM.
const SHUTDOWN_REPLY_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// Longest snapshot directory path accepted.
pub const MAX_PATH_LEN: usize = 4096;

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Not supported yet.
    #[error("not supported yet: {0}")]
    Unsupported(&'static str),
    /// The VM is gone (stopping).
    #[error("the VM is stopping")]
    Gone,
    /// The VM refused.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The socket could not be set up.
    #[error("control socket {}", .path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The ttrpc server failed to start.
    #[error("control socket server")]
    Server(#[source] ttrpc::Error),
}

/// The ttrpc status of an error: illegal transitions are FAILED_PRECONDITION, bad requests
/// INVALID_ARGUMENT, the rest INTERNAL. The message is the whole error chain.
pub fn to_status(e: &ApiError) -> ttrpc::Error {
    let code = match e {
        ApiError::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
        ApiError::Unsupported(_) => ttrpc::Code::UNIMPLEMENTED,
        ApiError::Gone | ApiError::Vm(VmError::IllegalTransition { .. }) => {
            ttrpc::Code::FAILED_PRECONDITION
        }
        ApiError::Vm(VmError::DeviceState(_)) => ttrpc::Code::FAILED_PRECONDITION,
        _ => ttrpc::Code::INTERNAL,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, nutshell_protocol::error_chain(e)))
}

/// The VM the control socket acts on; `None` once the VMM is tearing it down.
pub type SharedVm = Arc<Mutex<Option<RunningVm>>>;

/// The control service.
pub struct ControlService {
    vm: SharedVm,
    exit: Arc<ExitHandle>,
    started: Instant,
}

impl std::fmt::Debug for ControlService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlService")
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

/// What Snapshot leaves behind: the VM in the state it found it (a running VM is paused for
/// the snapshot and resumed after it).
fn validate_snapshot_dir(dir: &str) -> Result<PathBuf, ApiError> {
    if dir.is_empty() || dir.len() > MAX_PATH_LEN || dir.contains('\0') {
        return Err(ApiError::Invalid(format!(
            "snapshot directory must be a non-empty path of at most {MAX_PATH_LEN} bytes"
        )));
    }
    let path = PathBuf::from(dir);
    if !path.is_absolute() {
        return Err(ApiError::Invalid(format!(
            "snapshot directory {dir:?} is not absolute"
        )));
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(ApiError::Invalid(format!(
            "snapshot directory {dir:?} contains .."
        )));
    }
    match std::fs::symlink_metadata(&path) {
        Ok(m) if !m.is_dir() => Err(ApiError::Invalid(format!(
            "{dir:?} exists and is not a directory"
        ))),
        Ok(_) => Ok(path),
        Err(_) => match path.parent() {
            Some(parent) if parent.is_dir() => Ok(path),
            _ => Err(ApiError::Invalid(format!(
                "the parent of {dir:?} is not a directory"
            ))),
        },
    }
}

/// Longest template key accepted (a hex SHA-256 is 64 bytes).
pub const MAX_TEMPLATE_KEY_LEN: usize = 128;

/// A template key to mark a snapshot with: `None` when empty; printable ASCII without spaces.
fn validate_template_key(key: &str) -> Result<Option<&str>, ApiError> {
    if key.is_empty() {
        return Ok(None);
    }
    if key.len() > MAX_TEMPLATE_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::Invalid(format!(
            "a template key is at most {MAX_TEMPLATE_KEY_LEN} printable ASCII characters without spaces"
        )));
    }
    Ok(Some(key))
}

impl ControlService {
    /// A service acting on `vm`.
    pub fn new(vm: SharedVm, exit: Arc<ExitHandle>, started: Instant) -> Arc<Self> {
        Arc::new(ControlService { vm, exit, started })
    }

    fn with_vm<T>(
        &self,
        f: impl FnOnce(&mut RunningVm) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut guard = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_mut() {
            Some(vm) if !self.exit.is_requested() => f(vm),
            _ => Err(ApiError::Gone),
        }
    }

    fn do_pause(&self) -> Result<(), ApiError> {
        self.with_vm(|vm| Ok(vm.pause()?))
    }

    fn do_resume(&self) -> Result<(), ApiError> {
        self.with_vm(|vm| Ok(vm.resume()?))
    }

    fn do_snapshot(&self, dir: &str, template_key: &str) -> Result<(), ApiError> {
        let dir = validate_snapshot_dir(dir)?;
        let template_key = validate_template_key(template_key)?;
        self.with_vm(|vm| {
            if let Some(key) = template_key {
                vm.set_template_key(key);
            }
            let was_running = vm.state() == crate::VmRunState::Running;
            if was_running {
                vm.pause()?;
            }
            let result = vm.snapshot(&dir);
            if was_running {
                vm.resume()?;
            }
            Ok(result?)
        })
    }

    fn do_stats(&self) -> Result<pb::StatsResponse, ApiError> {
        self.with_vm(|vm| {
            let mut r = pb::StatsResponse::new();
            r.vcpus = vm.vcpu_count() as u32;
            r.memory_bytes = vm.ram_size();
            r.rss_bytes = crate::memory::resident_kib(vm.memory()).map_or(0, |r| r.total << 10);
            r.uptime_millis = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            Ok(r)
        })
    }

    fn do_shutdown(&self, grace_secs: u32) -> Result<(), ApiError> {
        if grace_secs != 0 {
            return Err(ApiError::Unsupported(
                "a grace period (ask the agent to shut down, then call Shutdown with 0)",
            ));
        }
        log::info!("shutdown requested over the control socket");
        // The stop tears the server down: let the reply leave first (ttrpc sends it only after
        // the handler returned).
        let reason = || VmExit::Stopped("shutdown requested over the control socket".into());
        let exit = self.exit.clone();
        let spawned = std::thread::Builder::new()
            .name("api-shutdown".into())
            .spawn(move || {
                std::thread::sleep(SHUTDOWN_REPLY_GRACE);
                exit.request(reason());
            });
        if spawned.is_err() {
            self.exit.request(reason());
        }
        Ok(())
    }
}

fn reply<T>(what: &str, r: Result<T, ApiError>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        log::warn!("control socket: {what} refused: {e}");
        to_status(&e)
    })
}

impl vmm_ttrpc::Vmm for ControlService {
    fn shutdown(&self, _: &TtrpcContext, req: pb::ShutdownRequest) -> ttrpc::Result<pb::Empty> {
        reply("Shutdown", self.do_shutdown(req.grace_secs)).map(|()| pb::Empty::new())
    }

    fn pause(&self, _: &TtrpcContext, _: pb::PauseRequest) -> ttrpc::Result<pb::Empty> {
        reply("Pause", self.do_pause()).map(|()| pb::Empty::new())
    }

    fn resume(&self, _: &TtrpcContext, _: pb::ResumeRequest) -> ttrpc::Result<pb::Empty> {
        reply("Resume", self.do_resume()).map(|()| pb::Empty::new())
    }

    fn stats(&self, _: &TtrpcContext, _: pb::StatsRequest) -> ttrpc::Result<pb::StatsResponse> {
        reply("Stats", self.do_stats())
    }

    fn snapshot(&self, _: &TtrpcContext, req: pb::SnapshotRequest) -> ttrpc::Result<pb::Empty> {
        reply(
            "Snapshot",
            self.do_snapshot(&req.directory, &req.template_key),
        )
        .map(|()| pb::Empty::new())
    }
}

/// The running control socket; [`ControlSocket::stop`] (or drop) stops serving and removes
/// the socket file.
pub struct ControlSocket {
    server: Option<ttrpc::Server>,
    path: PathBuf,
}

impl std::fmt::Debug for ControlSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlSocket")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ControlSocket {
    /// Serves `service` on the Unix socket `path`. A stale socket (nobody listening) is
    /// replaced; a live one, or anything that is not a socket, is an error.
    pub fn serve(path: &Path, service: Arc<ControlService>) -> Result<Self, ApiError> {
        let err = |source| ApiError::Socket {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(err(std::io::Error::other("exists and is not a socket")));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(err(std::io::Error::other("in use by another process")));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        let addr = format!("unix://{}", path.display());
        let mut server = ttrpc::Server::new()
            .bind(&addr)
            .map_err(ApiError::Server)?
            .register_service(vmm_ttrpc::create_vmm(service));
        if let Err(e) = server.start() {
            let _ = std::fs::remove_file(path);
            return Err(ApiError::Server(e));
        }
        log::info!("control socket on {}", path.display());
        Ok(ControlSocket {
            server: Some(server),
            path: path.to_path_buf(),
        })
    }

    /// Stops serving and removes the socket.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn snapshot_directories_are_validated() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        for bad in [
            "".to_owned(),
            "relative/dir".to_owned(),
            "/a/../b".to_owned(),
            "/x\0y".to_owned(),
            file.to_string_lossy().into_owned(),
            tmp.path()
                .join("no/such/parent")
                .to_string_lossy()
                .into_owned(),
            format!("/{}", "a".repeat(MAX_PATH_LEN)),
        ] {
            assert!(
                matches!(validate_snapshot_dir(&bad), Err(ApiError::Invalid(_))),
                "{bad:?} accepted"
            );
        }
        validate_snapshot_dir(&tmp.path().to_string_lossy()).unwrap();
        validate_snapshot_dir(&tmp.path().join("new").to_string_lossy()).unwrap();
    }

    #[test]
    fn template_keys_are_validated() {
        assert_eq!(validate_template_key("").unwrap(), None);
        assert_eq!(validate_template_key("ab12").unwrap(), Some("ab12"));
        for bad in [
            "a b",
            "a\nb",
            "\u{e9}",
            &"a".repeat(MAX_TEMPLATE_KEY_LEN + 1),
        ] {
            assert!(
                matches!(validate_template_key(bad), Err(ApiError::Invalid(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn errors_map_to_status_codes() {
        let code = |e: ApiError| match to_status(&e) {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            code(ApiError::Invalid("x".into())),
            ttrpc::Code::INVALID_ARGUMENT
        );
        assert_eq!(code(ApiError::Gone), ttrpc::Code::FAILED_PRECONDITION);
        assert_eq!(
            code(ApiError::Vm(VmError::IllegalTransition {
                op: "resume",
                state: crate::VmRunState::Running
            })),
            ttrpc::Code::FAILED_PRECONDITION
        );
        assert_eq!(code(ApiError::Unsupported("x")), ttrpc::Code::UNIMPLEMENTED);
    }
}

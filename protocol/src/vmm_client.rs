//! Client of the VMM control API (`nutshell.vmm.v1.Vmm`, protos/vmm.proto), served by
//! `nutshell-vmm --api-sock PATH` over ttrpc on a plain Unix socket.
//!
//! The shim uses it for pod-level Pause, Resume and Stats, and the template builder to
//! snapshot an agent-ready VM. Unlike the agent, the VMM is trusted host code, but its replies
//! still pass through [`VmmStats`] so callers see plain numbers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::generated::vmm as pb;
use crate::generated::vmm_ttrpc;

/// Errors of the VMM control client.
#[derive(Debug, thiserror::Error)]
pub enum VmmClientError {
    /// The control socket could not be connected within the bound.
    #[error("cannot connect to the VMM control socket {} within {timeout:?}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The bound that passed.
        timeout: Duration,
        /// The last attempt's error.
        #[source]
        source: ttrpc::Error,
    },
    /// The call failed on the transport (connection closed, timeout).
    #[error("VMM control socket transport")]
    Transport(#[source] ttrpc::Error),
    /// The VMM refused the call.
    #[error("the VMM returned {code:?}: {message}")]
    Status {
        /// The ttrpc status code (FAILED_PRECONDITION: not possible in the VM's state).
        code: ttrpc::Code,
        /// The VMM's message.
        message: String,
    },
}

impl VmmClientError {
    /// Whether the VMM refused because of the VM's state (paused when asked to pause, a
    /// device busy for a snapshot, the VM stopping): the same call may succeed later.
    pub fn is_precondition(&self) -> bool {
        matches!(
            self,
            VmmClientError::Status {
                code: ttrpc::Code::FAILED_PRECONDITION,
                ..
            }
        )
    }
}

impl From<ttrpc::Error> for VmmClientError {
    fn from(e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => VmmClientError::Status {
                code: s.code(),
                message: s.message().to_owned(),
            },
            e => VmmClientError::Transport(e),
        }
    }
}

/// What `Stats` reports about the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmmStats {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Resident memory of the guest RAM in the VMM process.
    pub rss_bytes: u64,
    /// Time since the VMM started.
    pub uptime: Duration,
}

/// A connected client of one VMM's control socket.
#[derive(Clone)]
pub struct VmmClient {
    client: vmm_ttrpc::VmmClient,
    rpc_timeout: Duration,
}

impl std::fmt::Debug for VmmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmClient")
            .field("rpc_timeout", &self.rpc_timeout)
            .finish_non_exhaustive()
    }
}

impl VmmClient {
    /// Connects to the control socket at `path`, retrying every 10 ms for at most
    /// `connect_timeout` while the VMM has not created it yet; each call is then bounded by
    /// `rpc_timeout`.
    pub fn connect(
        path: &Path,
        connect_timeout: Duration,
        rpc_timeout: Duration,
    ) -> Result<Self, VmmClientError> {
        let addr = format!("unix://{}", path.display());
        let deadline = Instant::now() + connect_timeout;
        loop {
            match ttrpc::Client::connect(&addr) {
                Ok(c) => {
                    return Ok(VmmClient {
                        client: vmm_ttrpc::VmmClient::new(c),
                        rpc_timeout,
                    })
                }
                Err(source) if Instant::now() >= deadline => {
                    return Err(VmmClientError::Connect {
                        path: path.to_path_buf(),
                        timeout: connect_timeout,
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn ctx(&self) -> ttrpc::context::Context {
        let nanos = i64::try_from(self.rpc_timeout.as_nanos()).unwrap_or(i64::MAX);
        ttrpc::context::with_timeout(nanos)
    }

    /// Pauses every vCPU (FAILED_PRECONDITION if the VM is paused already).
    pub fn pause(&self) -> Result<(), VmmClientError> {
        self.client.pause(self.ctx(), &pb::PauseRequest::new())?;
        Ok(())
    }

    /// Resumes the vCPUs (FAILED_PRECONDITION if the VM is running).
    pub fn resume(&self) -> Result<(), VmmClientError> {
        self.client.resume(self.ctx(), &pb::ResumeRequest::new())?;
        Ok(())
    }

    /// The VM's size, resident memory and uptime.
    pub fn stats(&self) -> Result<VmmStats, VmmClientError> {
        let r = self.client.stats(self.ctx(), &pb::StatsRequest::new())?;
        Ok(VmmStats {
            vcpus: r.vcpus,
            memory_bytes: r.memory_bytes,
            rss_bytes: r.rss_bytes,
            uptime: Duration::from_millis(r.uptime_millis),
        })
    }

    /// Snapshots the VM into `dir` (a directory the VMM can write; a running VM is paused for
    /// it and resumed after). With `template_key` the snapshot is marked as that template's,
    /// which `nutshell-vmm --restore DIR --template-key KEY` checks.
    pub fn snapshot(&self, dir: &Path, template_key: Option<&str>) -> Result<(), VmmClientError> {
        let mut req = pb::SnapshotRequest::new();
        req.directory = dir.to_string_lossy().into_owned();
        req.template_key = template_key.unwrap_or_default().to_owned();
        self.client.snapshot(self.ctx(), &req)?;
        Ok(())
    }

    /// Stops the VM at once (the VMM exits after answering).
    pub fn shutdown(&self) -> Result<(), VmmClientError> {
        let mut req = pb::ShutdownRequest::new();
        req.grace_secs = 0;
        self.client.shutdown(self.ctx(), &req)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn connect_gives_up_after_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.sock");
        let started = Instant::now();
        let err = VmmClient::connect(&path, Duration::from_millis(50), Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(err, VmmClientError::Connect { .. }), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn statuses_keep_their_code() {
        let e = VmmClientError::from(ttrpc::Error::RpcStatus(ttrpc::get_status(
            ttrpc::Code::FAILED_PRECONDITION,
            "paused",
        )));
        assert!(e.is_precondition(), "{e:?}");
        let e = VmmClientError::from(ttrpc::Error::RpcStatus(ttrpc::get_status(
            ttrpc::Code::INTERNAL,
            "x",
        )));
        assert!(!e.is_precondition());
    }
}

//! The VMM's control socket: pod-level Pause, Resume and Stats.

use std::time::Duration;

use nutshell_protocol::vmm_client::{VmmClient, VmmClientError, VmmStats};

use super::{SandboxPaths, SandboxVm};
use crate::error::{Result, ShimError};

/// How long a call waits for the VMM's control socket to accept.
const CONTROL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on one control call (Pause waits for every vCPU to leave the guest).
const CONTROL_RPC_TIMEOUT: Duration = Duration::from_secs(10);

impl SandboxVm {
    /// A client of the VMM's control socket (one connection per call: calls are rare).
    fn control(&self) -> Result<VmmClient> {
        let path = SandboxPaths {
            dir: self.dir.clone(),
        }
        .api();
        VmmClient::connect(&path, CONTROL_CONNECT_TIMEOUT, CONTROL_RPC_TIMEOUT)
            .map_err(|e| self.control_error("connect", e))
    }

    fn control_error(&self, what: &str, e: VmmClientError) -> ShimError {
        if e.is_precondition() {
            return ShimError::FailedPrecondition(format!(
                "sandbox {}: VMM {what}: {}",
                self.id,
                crate::error::chain(&e)
            ));
        }
        ShimError::Vm {
            id: self.id.clone(),
            message: format!("VMM control socket {what}: {}", crate::error::chain(&e)),
        }
    }

    /// Pauses the whole VM (every vCPU; the pod's processes stop with it). FAILED_PRECONDITION
    /// if it is paused already or stopping.
    pub fn pause(&self) -> Result<()> {
        self.control()?
            .pause()
            .map_err(|e| self.control_error("Pause", e))?;
        log::info!("sandbox {}: VM paused", self.id);
        Ok(())
    }

    /// Resumes a paused VM. FAILED_PRECONDITION if it is running.
    pub fn resume(&self) -> Result<()> {
        self.control()?
            .resume()
            .map_err(|e| self.control_error("Resume", e))?;
        log::info!("sandbox {}: VM resumed", self.id);
        Ok(())
    }

    /// The VM's size, the VMM's resident guest memory and its uptime.
    pub fn stats(&self) -> Result<VmmStats> {
        self.control()?
            .stats()
            .map_err(|e| self.control_error("Stats", e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use nutshell_protocol::generated::vmm as vpb;
    use nutshell_protocol::generated::vmm_ttrpc;
    use nutshell_protocol::ttrpc::{self, TtrpcContext};

    use super::*;

    /// A stand-in VMM control service: Pause/Resume follow a paused flag like the VMM's
    /// (an illegal transition is FAILED_PRECONDITION), Stats reports fixed numbers.
    struct FakeVmm {
        paused: Mutex<bool>,
    }

    impl vmm_ttrpc::Vmm for FakeVmm {
        fn pause(&self, _: &TtrpcContext, _: vpb::PauseRequest) -> ttrpc::Result<vpb::Empty> {
            self.flip(true)
        }
        fn resume(&self, _: &TtrpcContext, _: vpb::ResumeRequest) -> ttrpc::Result<vpb::Empty> {
            self.flip(false)
        }
        fn stats(
            &self,
            _: &TtrpcContext,
            _: vpb::StatsRequest,
        ) -> ttrpc::Result<vpb::StatsResponse> {
            let mut r = vpb::StatsResponse::new();
            r.vcpus = 2;
            r.memory_bytes = 256 << 20;
            r.rss_bytes = 40 << 20;
            r.uptime_millis = 1500;
            Ok(r)
        }
    }

    impl FakeVmm {
        fn flip(&self, to: bool) -> ttrpc::Result<vpb::Empty> {
            let mut paused = self.paused.lock().unwrap();
            if *paused == to {
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    "illegal transition",
                )));
            }
            *paused = to;
            Ok(vpb::Empty::new())
        }
    }

    #[test]
    fn pod_pause_resume_and_stats_go_through_the_control_socket() {
        let dir = tempfile::tempdir().unwrap();
        let vm = crate::vm::detached("pod1", dir.path());
        // No VMM listening: a clear error, not a hang.
        assert!(matches!(vm.stats(), Err(ShimError::Vm { .. })));
        let service = Arc::new(FakeVmm {
            paused: Mutex::new(false),
        });
        let addr = format!(
            "unix://{}",
            SandboxPaths::new(dir.path(), "").api().display()
        );
        let mut server = ttrpc::Server::new()
            .bind(&addr)
            .unwrap()
            .register_service(vmm_ttrpc::create_vmm(service.clone()));
        server.start().unwrap();
        vm.pause().unwrap();
        assert!(*service.paused.lock().unwrap());
        assert!(
            matches!(vm.pause(), Err(ShimError::FailedPrecondition(_))),
            "pausing a paused VM"
        );
        vm.resume().unwrap();
        assert!(!*service.paused.lock().unwrap());
        assert!(matches!(vm.resume(), Err(ShimError::FailedPrecondition(_))));
        assert_eq!(
            vm.stats().unwrap(),
            VmmStats {
                vcpus: 2,
                memory_bytes: 256 << 20,
                rss_bytes: 40 << 20,
                uptime: Duration::from_millis(1500),
            }
        );
        server.shutdown();
    }
}

//! A CRI client that drives containerd's CRI plugin the way kubelet does, over its Unix
//! socket (gRPC, `runtime.v1`), with a blocking API for tests and the benchmark runner.
//!
//! kubelet's order for a pod: `RunPodSandbox` (with the RuntimeClass handler) →
//! `CreateContainer` (with the sandbox config) → `StartContainer`; `ExecSync` for probes and
//! `kubectl exec`; `StopPodSandbox` → `RemovePodSandbox` on delete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// The CRI's `runtime.v1` messages, for callers that fill in more than the helpers here do.
pub use k8s_cri::v1 as api;
pub use k8s_cri::v1::{ContainerConfig, ContainerState, PodSandboxConfig, PodSandboxState};

/// Errors of the CRI client.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The client's own tokio runtime could not be built.
    #[error("cannot build the CRI client's runtime")]
    Runtime(#[source] std::io::Error),
    /// The CRI socket did not accept a connection.
    #[error("cannot connect to the CRI socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// A CRI call failed (the runtime's answer, or the transport's).
    #[error("CRI {call}: {code:?}: {message}")]
    Call {
        /// The call, e.g. `RunPodSandbox`.
        call: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// A reply lacked a field the call needs.
    #[error("CRI {call}: the reply has no {field}")]
    Incomplete {
        /// The call.
        call: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// A container did not reach the awaited state in time, or exited first.
    #[error("container {id} is {state:?} after {waited:?}, not {want:?}")]
    NotInState {
        /// The container.
        id: String,
        /// Its last state.
        state: cri::ContainerState,
        /// The state waited for.
        want: cri::ContainerState,
        /// How long we waited.
        waited: Duration,
    },
    /// A CRI log line is not `<time> <stream> <F|P> <text>`.
    #[error("malformed CRI log line: {0:?}")]
    MalformedLog(String),
}

/// The result of the CRI client's calls.
pub type Result<T, E = CriError> = std::result::Result<T, E>;

/// Maps a failed call's status to [`CriError::Call`].
fn call_failed(call: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
    move |status| CriError::Call {
        call,
        code: status.code(),
        message: status.message().to_owned(),
    }
}

/// How long [`CriClient::connect`] waits for the CRI plugin to finish its start.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether `err` is containerd's answer while its CRI plugin is still starting: containerd
/// serves its sockets before the plugin has recovered its pods (after a restart it first
/// reconnects to every running shim), and every CRI call fails with this until then.
fn is_not_initialized(err: &CriError) -> bool {
    matches!(err, CriError::Call { code: tonic::Code::Unknown, message, .. }
        if message.contains("not initialized"))
}

/// A connected CRI client with its own single-threaded runtime.
pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl std::fmt::Debug for CriClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriClient").finish_non_exhaustive()
    }
}

/// A pod's network, from `PodSandboxStatus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    /// The pod's IP (empty on the node's network).
    pub ip: String,
    /// The network namespace containerd made for it (none on the node's network).
    pub netns: Option<PathBuf>,
}

/// The result of `ExecSync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code of the command.
    pub exit_code: i32,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

impl CriClient {
    /// Connects to the CRI socket at `socket` (containerd's `--address`) and waits (up to
    /// 60 s) until the CRI plugin serves calls, as kubelet does after a containerd restart.
    pub fn connect(socket: &Path) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let path: PathBuf = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                // The URI is required by the API but unused: the connector dials the socket.
                Endpoint::try_from("http://[::]:50051")?
                    .connect_timeout(Duration::from_secs(10))
                    .timeout(Duration::from_secs(300))
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .map_err(|source| CriError::Connect {
                path: socket.to_path_buf(),
                source,
            })?;
        let mut client = CriClient {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        };
        client.wait_initialized(INIT_TIMEOUT)?;
        Ok(client)
    }

    /// Calls `Version` until the CRI plugin has finished starting (see
    /// [`is_not_initialized`]) or `timeout` passes; any other failure ends the wait at once.
    /// Returns how long it waited.
    fn wait_initialized(&mut self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            match self.version() {
                Ok(_) => return Ok(started.elapsed()),
                Err(e) if is_not_initialized(&e) && started.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `Version`: the runtime's name and version.
    pub fn version(&mut self) -> Result<cri::VersionResponse> {
        let req = cri::VersionRequest {
            version: "v1".into(),
        };
        Ok(self
            .rt
            .block_on(self.runtime.version(req))
            .map_err(call_failed("Version"))?
            .into_inner())
    }

    /// `ImageStatus`: whether `image` is present in containerd's `k8s.io` namespace.
    pub fn image_present(&mut self, image: &str) -> Result<bool> {
        let req = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        let resp = self
            .rt
            .block_on(self.images.image_status(req))
            .map_err(call_failed("ImageStatus"))?
            .into_inner();
        Ok(resp.image.is_some())
    }

    /// `RunPodSandbox` with the RuntimeClass handler `handler`; returns the sandbox id.
    pub fn run_pod_sandbox(&mut self, config: &PodSandboxConfig, handler: &str) -> Result<String> {
        let req = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        Ok(self
            .rt
            .block_on(self.runtime.run_pod_sandbox(req))
            .map_err(call_failed("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id)
    }

    /// `CreateContainer` in the pod `pod_id`; returns the container id.
    pub fn create_container(
        &mut self,
        pod_id: &str,
        config: &ContainerConfig,
        sandbox: &PodSandboxConfig,
    ) -> Result<String> {
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox.clone()),
        };
        Ok(self
            .rt
            .block_on(self.runtime.create_container(req))
            .map_err(call_failed("CreateContainer"))?
            .into_inner()
            .container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&mut self, id: &str) -> Result<()> {
        let req = cri::StartContainerRequest {
            container_id: id.into(),
        };
        self.rt
            .block_on(self.runtime.start_container(req))
            .map_err(call_failed("StartContainer"))?;
        Ok(())
    }

    /// `StopContainer` with a grace period of `timeout` (then SIGKILL); returns once the
    /// container has stopped.
    pub fn stop_container(&mut self, id: &str, timeout: Duration) -> Result<()> {
        let req = cri::StopContainerRequest {
            container_id: id.into(),
            timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        };
        self.rt
            .block_on(self.runtime.stop_container(req))
            .map_err(call_failed("StopContainer"))?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub fn remove_container(&mut self, id: &str) -> Result<()> {
        let req = cri::RemoveContainerRequest {
            container_id: id.into(),
        };
        self.rt
            .block_on(self.runtime.remove_container(req))
            .map_err(call_failed("RemoveContainer"))?;
        Ok(())
    }

    /// `ContainerStatus`: (state, exit code).
    pub fn container_state(&mut self, id: &str) -> Result<(cri::ContainerState, i32)> {
        let req = cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let status = self
            .rt
            .block_on(self.runtime.container_status(req))
            .map_err(call_failed("ContainerStatus"))?
            .into_inner()
            .status
            .ok_or(CriError::Incomplete {
                call: "ContainerStatus",
                field: "status",
            })?;
        Ok((status.state(), status.exit_code))
    }

    /// Polls `ContainerStatus` until the container has exited; returns its exit code.
    pub fn wait_exited(&mut self, id: &str, timeout: Duration) -> Result<i32> {
        self.wait_state(
            id,
            cri::ContainerState::ContainerExited,
            timeout,
            Duration::from_millis(200),
        )
    }

    /// Polls `ContainerStatus` every `interval` until the container is in `want`; returns its
    /// exit code then. A container that has exited while another state is awaited is an error
    /// at once (it cannot get there any more).
    pub fn wait_state(
        &mut self,
        id: &str,
        want: cri::ContainerState,
        timeout: Duration,
        interval: Duration,
    ) -> Result<i32> {
        let started = std::time::Instant::now();
        loop {
            let (state, code) = self.container_state(id)?;
            if state == want {
                return Ok(code);
            }
            let gone = state == cri::ContainerState::ContainerExited;
            if gone || started.elapsed() > timeout {
                return Err(CriError::NotInState {
                    id: id.to_owned(),
                    state,
                    want,
                    waited: started.elapsed(),
                });
            }
            std::thread::sleep(interval);
        }
    }

    /// `ExecSync`: runs `cmd` in the container and collects its output.
    pub fn exec_sync(&mut self, id: &str, cmd: &[&str], timeout: Duration) -> Result<ExecResult> {
        let req = cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        };
        let resp = self
            .rt
            .block_on(self.runtime.exec_sync(req))
            .map_err(call_failed("ExecSync"))?
            .into_inner();
        Ok(ExecResult {
            exit_code: resp.exit_code,
            stdout: resp.stdout,
            stderr: resp.stderr,
        })
    }

    /// `ListPodSandbox`: the ids of every pod sandbox.
    pub fn list_pod_sandboxes(&mut self) -> Result<Vec<String>> {
        Ok(self
            .pod_sandbox_states()?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// `ListPodSandbox`: (id, state) of every pod sandbox.
    pub fn pod_sandbox_states(&mut self) -> Result<Vec<(String, cri::PodSandboxState)>> {
        let resp = self
            .rt
            .block_on(
                self.runtime
                    .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }),
            )
            .map_err(call_failed("ListPodSandbox"))?
            .into_inner();
        Ok(resp
            .items
            .into_iter()
            .map(|p| (p.id.clone(), p.state()))
            .collect())
    }

    /// `PodSandboxStatus` (verbose): the pod's network as containerd set it up.
    pub fn pod_network(&mut self, id: &str) -> Result<PodNetwork> {
        let resp = self
            .rt
            .block_on(
                self.runtime
                    .pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: id.into(),
                        verbose: true,
                    }),
            )
            .map_err(call_failed("PodSandboxStatus"))?
            .into_inner();
        let ip = resp
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        // containerd's verbose info: {"info": "{... \"runtimeSpec\": {\"linux\": {\"namespaces\": ...}}}"}
        let netns = resp
            .info
            .get("info")
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            .and_then(|info| {
                info["runtimeSpec"]["linux"]["namespaces"]
                    .as_array()?
                    .iter()
                    .find(|ns| ns["type"] == "network")?["path"]
                    .as_str()
                    .map(PathBuf::from)
            });
        Ok(PodNetwork { ip, netns })
    }

    /// `ListContainers`: (id, pod sandbox id, state) of every container.
    pub fn container_states(&mut self) -> Result<Vec<(String, String, cri::ContainerState)>> {
        let resp = self
            .rt
            .block_on(
                self.runtime
                    .list_containers(cri::ListContainersRequest { filter: None }),
            )
            .map_err(call_failed("ListContainers"))?
            .into_inner();
        Ok(resp
            .containers
            .into_iter()
            .map(|c| (c.id.clone(), c.pod_sandbox_id.clone(), c.state()))
            .collect())
    }

    /// `StopPodSandbox`: stops every container of the pod and the sandbox.
    pub fn stop_pod_sandbox(&mut self, id: &str) -> Result<()> {
        let req = cri::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.rt
            .block_on(self.runtime.stop_pod_sandbox(req))
            .map_err(call_failed("StopPodSandbox"))?;
        Ok(())
    }

    /// `PortForward`: the URL on containerd's streaming server where the pod's `ports` are
    /// forwarded (kubelet hands it to the API server; a client speaks the kubelet streaming
    /// protocol to it, once).
    pub fn port_forward(&mut self, id: &str, ports: &[i32]) -> Result<String> {
        let req = cri::PortForwardRequest {
            pod_sandbox_id: id.into(),
            port: ports.to_vec(),
        };
        let resp = self
            .rt
            .block_on(self.runtime.port_forward(req))
            .map_err(call_failed("PortForward"))?;
        Ok(resp.into_inner().url)
    }

    /// `RemovePodSandbox`.
    pub fn remove_pod_sandbox(&mut self, id: &str) -> Result<()> {
        let req = cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.rt
            .block_on(self.runtime.remove_pod_sandbox(req))
            .map_err(call_failed("RemovePodSandbox"))?;
        Ok(())
    }
}

/// A pod config as kubelet sends it: metadata, a log directory, Linux options.
pub fn pod_config(name: &str, uid: &str, log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.display().to_string(),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption::default()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The namespace modes of `pod` (made if absent), for a caller to change: kubelet's
/// `hostNetwork`/`hostPID`/`hostIPC` and `shareProcessNamespace` live there.
pub fn namespace_modes(pod: &mut PodSandboxConfig) -> &mut cri::NamespaceOption {
    pod.linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options
        .get_or_insert_with(Default::default)
}

/// A container config: `image` running `command`, logging to `log_path` (relative to the
/// pod's log directory).
pub fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    log_path: &str,
) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: log_path.into(),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// Parses the CRI log format kubelet reads (`<RFC3339Nano> <stdout|stderr> <F|P> <line>`),
/// returning (stream, line) pairs; partial lines (`P`) are joined with what follows.
pub fn parse_cri_log(text: &str) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut partial: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(ts), Some(stream), Some(tag), rest) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CriError::MalformedLog(line.to_owned()));
        };
        if !ts.contains('T') || !matches!(stream, "stdout" | "stderr") {
            return Err(CriError::MalformedLog(line.to_owned()));
        }
        let acc = partial.entry(stream.to_string()).or_default();
        acc.push_str(rest.unwrap_or(""));
        match tag {
            "F" => out.push((stream.to_string(), std::mem::take(acc))),
            "P" => {}
            _ => return Err(CriError::MalformedLog(line.to_owned())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_parse_and_join_partials() {
        let log = "2026-11-28T16:00:00.000000001Z stdout F hello\n\
                   2026-11-28T16:00:00.000000002Z stderr P par\n\
                   2026-11-28T16:00:00.000000003Z stderr F tial\n";
        assert_eq!(
            parse_cri_log(log).unwrap(),
            [
                ("stdout".to_string(), "hello".to_string()),
                ("stderr".to_string(), "partial".to_string())
            ]
        );
    }

    #[test]
    fn only_the_starting_plugins_answer_is_waited_out() {
        let call = |code, message: &str| CriError::Call {
            call: "Version",
            code,
            message: message.to_owned(),
        };
        // containerd 1.6's answer while its CRI plugin recovers state.
        assert!(is_not_initialized(&call(
            tonic::Code::Unknown,
            "server is not initialized yet"
        )));
        assert!(!is_not_initialized(&call(
            tonic::Code::Unimplemented,
            "unknown service runtime.v1.RuntimeService"
        )));
        assert!(!is_not_initialized(&call(tonic::Code::Unknown, "boom")));
        assert!(!is_not_initialized(&CriError::MalformedLog("x".into())));
    }

    #[test]
    fn malformed_cri_log_lines_are_errors() {
        assert!(parse_cri_log("hello world\n").is_err());
        assert!(parse_cri_log("2026-11-28T16:00:00Z stdin F x\n").is_err());
        assert!(parse_cri_log("2026-11-28T16:00:00Z stdout X x\n").is_err());
    }
}

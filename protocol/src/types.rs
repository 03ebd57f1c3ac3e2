//! Domain types of the agent API and their conversions from and to the generated messages.
//!
//! Conversions *from* a reply validate it: the reply comes from the guest, which is untrusted.

use crate::generated::agent as pb;

/// Longest version string or kernel release accepted from the guest.
pub const MAX_VERSION_LEN: usize = 128;

/// An invalid message from the peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TypesError {
    /// A string field is empty.
    #[error("{field} is empty")]
    Empty {
        /// The field.
        field: &'static str,
    },
    /// A string field is longer than allowed.
    #[error("{field} is {len} bytes long, more than {max}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A string field has a character outside printable ASCII.
    #[error("{field} has a character that is not printable ASCII")]
    NotPrintable {
        /// The field.
        field: &'static str,
    },
    /// A number is outside the range this field allows.
    #[error("{field} has the value {value}, out of range")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value.
        value: i64,
    },
    /// A list is longer than allowed.
    #[error("{field} has {len} entries, more than {max}")]
    TooMany {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An enum field has a value this side does not know.
    #[error("{field} has the unknown value {value}")]
    UnknownEnum {
        /// The field.
        field: &'static str,
        /// The raw value.
        value: i32,
    },
}

/// A line of guest output made safe to log: trailing white space dropped, at most `max`
/// characters, control characters (escape sequences, carriage returns) masked as `?`.
pub fn clean_line(line: &str, max: usize) -> String {
    line.trim_end()
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Checks that `value` is 1..=`max` bytes of printable ASCII (space to `~`).
pub fn validate_printable(field: &'static str, value: &str, max: usize) -> Result<(), TypesError> {
    if value.is_empty() {
        return Err(TypesError::Empty { field });
    }
    if value.len() > max {
        return Err(TypesError::TooLong {
            field,
            len: value.len(),
            max,
        });
    }
    if !value.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(TypesError::NotPrintable { field });
    }
    Ok(())
}

/// Whether the agent serves its API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServingStatus {
    /// The agent does not say.
    Unknown,
    /// The agent serves requests.
    Serving,
    /// The agent is up but does not serve (shutting down).
    NotServing,
}

impl From<ServingStatus> for pb::HealthCheckResponse {
    fn from(s: ServingStatus) -> Self {
        use pb::health_check_response::ServingStatus as P;
        let status = match s {
            ServingStatus::Unknown => P::UNKNOWN,
            ServingStatus::Serving => P::SERVING,
            ServingStatus::NotServing => P::NOT_SERVING,
        };
        pb::HealthCheckResponse {
            status: status.into(),
            ..Default::default()
        }
    }
}

impl TryFrom<&pb::HealthCheckResponse> for ServingStatus {
    type Error = TypesError;

    fn try_from(r: &pb::HealthCheckResponse) -> Result<Self, TypesError> {
        use pb::health_check_response::ServingStatus as P;
        match r.status.enum_value() {
            Ok(P::UNKNOWN) => Ok(ServingStatus::Unknown),
            Ok(P::SERVING) => Ok(ServingStatus::Serving),
            Ok(P::NOT_SERVING) => Ok(ServingStatus::NotServing),
            Err(value) => Err(TypesError::UnknownEnum {
                field: "status",
                value,
            }),
        }
    }
}

/// What `Version` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentVersion {
    /// Version of nutshell-agent.
    pub agent_version: String,
    /// Version of the agent API ([`crate::AGENT_API_VERSION`] of the agent's build).
    pub api_version: u32,
    /// The guest kernel's release (`uname -r`).
    pub kernel_release: String,
}

impl From<&AgentVersion> for pb::VersionResponse {
    fn from(v: &AgentVersion) -> Self {
        pb::VersionResponse {
            agent_version: v.agent_version.clone(),
            api_version: v.api_version,
            kernel_release: v.kernel_release.clone(),
            ..Default::default()
        }
    }
}

impl TryFrom<&pb::VersionResponse> for AgentVersion {
    type Error = TypesError;

    fn try_from(r: &pb::VersionResponse) -> Result<Self, TypesError> {
        validate_printable("agent_version", &r.agent_version, MAX_VERSION_LEN)?;
        validate_printable("kernel_release", &r.kernel_release, MAX_VERSION_LEN)?;
        Ok(AgentVersion {
            agent_version: r.agent_version.clone(),
            api_version: r.api_version,
            kernel_release: r.kernel_release.clone(),
        })
    }
}

/// Longest container, exec or sandbox id accepted from the guest.
pub const MAX_ID_LEN: usize = 256;

/// Most PIDs accepted in one `ListPids` reply.
pub const MAX_PIDS: usize = 65_536;

/// Highest exit status a process can have: an exit code is 0..=255, a signal 128 + 1..=64.
pub const MAX_EXIT_STATUS: i32 = 255;

/// What `CreateSandbox` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The sandbox id (the pod's, or the container's own without a pod).
    pub sandbox_id: String,
    /// The guest's hostname.
    pub hostname: String,
    /// Name servers for the guest's resolv.conf.
    pub dns_servers: Vec<String>,
    /// Search domains for the guest's resolv.conf.
    pub dns_search: Vec<String>,
    /// Guest path where the agent mounts the shared directory (virtio-fs).
    pub shared_dir: String,
    /// Annotations of the sandbox.
    pub annotations: std::collections::HashMap<String, String>,
    /// The pod's sysctls, by name (`kernel.shm_rmid_forced`).
    pub sysctls: std::collections::BTreeMap<String, String>,
    /// Which namespaces the pod has of its own.
    pub namespaces: PodNamespaces,
}

/// Whether a pod has a namespace of its own of a kind, or uses the VM's root one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PodNamespaceMode {
    /// The pod's own, published at [`crate::pod_namespace_path`] for its containers to join.
    #[default]
    Pod,
    /// The VM's root namespace (the CRI's NODE mode; never the node's).
    Node,
}

impl From<PodNamespaceMode> for pb::PodNamespaceMode {
    fn from(m: PodNamespaceMode) -> Self {
        match m {
            PodNamespaceMode::Pod => pb::PodNamespaceMode::POD,
            PodNamespaceMode::Node => pb::PodNamespaceMode::NODE,
        }
    }
}

/// The pod's namespace modes for PID, IPC and UTS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodNamespaces {
    /// PID (NODE: `hostPID`).
    pub pid: PodNamespaceMode,
    /// IPC (NODE: `hostIPC`).
    pub ipc: PodNamespaceMode,
    /// UTS (NODE: `hostNetwork`).
    pub uts: PodNamespaceMode,
}

impl PodNamespaces {
    /// Every namespace the VM's root one (a container without a pod: nothing to share).
    pub const NODE: PodNamespaces = PodNamespaces {
        pid: PodNamespaceMode::Node,
        ipc: PodNamespaceMode::Node,
        uts: PodNamespaceMode::Node,
    };
}

impl From<PodNamespaces> for pb::PodNamespaces {
    fn from(n: PodNamespaces) -> Self {
        pb::PodNamespaces {
            pid: pb::PodNamespaceMode::from(n.pid).into(),
            ipc: pb::PodNamespaceMode::from(n.ipc).into(),
            uts: pb::PodNamespaceMode::from(n.uts).into(),
            ..Default::default()
        }
    }
}

/// Guest vsock ports of a process's stdio streams; 0 = not connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioPorts {
    /// Port of stdin (0 with a terminal).
    pub stdin: u32,
    /// Port of stdout (with a terminal: the one stream of the pty, both ways).
    pub stdout: u32,
    /// Port of stderr (0 with a terminal).
    pub stderr: u32,
}

impl From<StdioPorts> for pb::StdioPorts {
    fn from(p: StdioPorts) -> Self {
        pb::StdioPorts {
            stdin: p.stdin,
            stdout: p.stdout,
            stderr: p.stderr,
            ..Default::default()
        }
    }
}

/// How a process ended, as `WaitProcess` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// Exit code, or 128 + signal number.
    pub exit_status: u32,
    /// When, in nanoseconds since the Unix epoch.
    pub exited_at_unix_nanos: u64,
}

impl TryFrom<&pb::WaitProcessResponse> for ProcessExit {
    type Error = TypesError;

    fn try_from(r: &pb::WaitProcessResponse) -> Result<Self, TypesError> {
        let exit_status = u32::try_from(r.exit_status)
            .ok()
            .filter(|s| *s <= MAX_EXIT_STATUS as u32)
            .ok_or(TypesError::OutOfRange {
                field: "exit_status",
                value: i64::from(r.exit_status),
            })?;
        Ok(ProcessExit {
            exit_status,
            exited_at_unix_nanos: r.exited_at_unix_nanos,
        })
    }
}

/// Checks a `ListPids` reply: at most [`MAX_PIDS`], none zero.
pub fn validate_pids(pids: &[u32]) -> Result<(), TypesError> {
    if pids.len() > MAX_PIDS {
        return Err(TypesError::TooMany {
            field: "pids",
            len: pids.len(),
            max: MAX_PIDS,
        });
    }
    if pids.contains(&0) {
        return Err(TypesError::OutOfRange {
            field: "pids",
            value: 0,
        });
    }
    Ok(())
}

/// Resource usage of a container inside the guest (counters; any value is plausible).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerStats {
    /// CPU time in microseconds: total, user, system.
    pub cpu_usage_usec: u64,
    /// User CPU time in microseconds.
    pub cpu_user_usec: u64,
    /// System CPU time in microseconds.
    pub cpu_system_usec: u64,
    /// Periods throttled.
    pub cpu_nr_throttled: u64,
    /// Time throttled in microseconds.
    pub cpu_throttled_usec: u64,
    /// Memory in use.
    pub memory_usage_bytes: u64,
    /// Memory limit.
    pub memory_limit_bytes: u64,
    /// Peak memory use.
    pub memory_max_usage_bytes: u64,
    /// OOM kills.
    pub memory_oom_kills: u64,
    /// Anonymous memory.
    pub memory_anon_bytes: u64,
    /// Page cache.
    pub memory_file_bytes: u64,
    /// Number of processes.
    pub pids_current: u64,
    /// Process limit.
    pub pids_limit: u64,
    /// Bytes read from block devices.
    pub io_read_bytes: u64,
    /// Bytes written to block devices.
    pub io_write_bytes: u64,
}

impl From<&pb::StatsContainerResponse> for ContainerStats {
    fn from(r: &pb::StatsContainerResponse) -> Self {
        let cpu = r.cpu.get_or_default();
        let mem = r.memory.get_or_default();
        let pids = r.pids.get_or_default();
        let io = r.io.get_or_default();
        ContainerStats {
            cpu_usage_usec: cpu.usage_usec,
            cpu_user_usec: cpu.user_usec,
            cpu_system_usec: cpu.system_usec,
            cpu_nr_throttled: cpu.nr_throttled,
            cpu_throttled_usec: cpu.throttled_usec,
            memory_usage_bytes: mem.usage_bytes,
            memory_limit_bytes: mem.limit_bytes,
            memory_max_usage_bytes: mem.max_usage_bytes,
            memory_oom_kills: mem.oom_kills,
            memory_anon_bytes: mem.anon_bytes,
            memory_file_bytes: mem.file_bytes,
            pids_current: pids.current,
            pids_limit: pids.limit,
            io_read_bytes: io.read_bytes,
            io_write_bytes: io.write_bytes,
        }
    }
}

/// Linux resources of a container for `UpdateContainer`; `None` leaves a value as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPU shares (relative weight).
    pub cpu_shares: Option<u64>,
    /// CFS quota in microseconds per period; -1 = unlimited.
    pub cpu_quota: Option<i64>,
    /// CFS period in microseconds.
    pub cpu_period: Option<u64>,
    /// CPUs the container may use.
    pub cpuset_cpus: Option<String>,
    /// Memory nodes the container may use.
    pub cpuset_mems: Option<String>,
    /// Memory limit in bytes.
    pub memory_limit_bytes: Option<i64>,
    /// Memory + swap limit in bytes.
    pub memory_swap_bytes: Option<i64>,
    /// Process limit.
    pub pids_limit: Option<i64>,
}

impl From<&Resources> for pb::LinuxResources {
    fn from(r: &Resources) -> Self {
        pb::LinuxResources {
            cpu_shares: r.cpu_shares.unwrap_or(0),
            cpu_quota: r.cpu_quota.unwrap_or(0),
            cpu_period: r.cpu_period.unwrap_or(0),
            cpuset_cpus: r.cpuset_cpus.clone().unwrap_or_default(),
            cpuset_mems: r.cpuset_mems.clone().unwrap_or_default(),
            memory_limit_bytes: r.memory_limit_bytes.unwrap_or(0),
            memory_swap_bytes: r.memory_swap_bytes.unwrap_or(0),
            pids_limit: r.pids_limit.unwrap_or(0),
            ..Default::default()
        }
    }
}

/// The error every agent method that is defined but not served yet answers with: ttrpc code
/// UNIMPLEMENTED, message "not implemented yet: `method`".
pub fn not_implemented(method: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(
        ttrpc::Code::UNIMPLEMENTED,
        format!("not implemented yet: {method}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(agent: &str, kernel: &str) -> pb::VersionResponse {
        pb::VersionResponse::from(&AgentVersion {
            agent_version: agent.into(),
            api_version: 1,
            kernel_release: kernel.into(),
        })
    }

    #[test]
    fn version_round_trips() {
        let v = AgentVersion {
            agent_version: "0.1.0".into(),
            api_version: 1,
            kernel_release: "6.1.0-nutshell".into(),
        };
        assert_eq!(
            AgentVersion::try_from(&pb::VersionResponse::from(&v)),
            Ok(v)
        );
    }

    #[test]
    fn version_rejects_hostile_strings() {
        let long = "x".repeat(MAX_VERSION_LEN + 1);
        assert!(matches!(
            AgentVersion::try_from(&version(&long, "6.1")),
            Err(TypesError::TooLong {
                field: "agent_version",
                ..
            })
        ));
        assert_eq!(
            AgentVersion::try_from(&version("0.1", "6.1\x1b[2J")),
            Err(TypesError::NotPrintable {
                field: "kernel_release"
            })
        );
        assert_eq!(
            AgentVersion::try_from(&version("", "6.1")),
            Err(TypesError::Empty {
                field: "agent_version"
            })
        );
        assert!(AgentVersion::try_from(&version("0.1", "6.1\u{e9}")).is_err());
    }

    #[test]
    fn serving_status_round_trips_and_rejects_unknown() {
        for s in [
            ServingStatus::Unknown,
            ServingStatus::Serving,
            ServingStatus::NotServing,
        ] {
            assert_eq!(
                ServingStatus::try_from(&pb::HealthCheckResponse::from(s)),
                Ok(s)
            );
        }
        let mut r = pb::HealthCheckResponse::new();
        r.status = protobuf::EnumOrUnknown::from_i32(42);
        assert_eq!(
            ServingStatus::try_from(&r),
            Err(TypesError::UnknownEnum {
                field: "status",
                value: 42
            })
        );
    }

    #[test]
    fn wait_reply_is_range_checked() {
        let reply = |s: i32| pb::WaitProcessResponse {
            exit_status: s,
            exited_at_unix_nanos: 7,
            ..Default::default()
        };
        assert_eq!(
            ProcessExit::try_from(&reply(137)),
            Ok(ProcessExit {
                exit_status: 137,
                exited_at_unix_nanos: 7
            })
        );
        for bad in [-1, 256, i32::MAX, i32::MIN] {
            assert!(matches!(
                ProcessExit::try_from(&reply(bad)),
                Err(TypesError::OutOfRange { .. })
            ));
        }
    }

    #[test]
    fn pids_are_bounded_and_nonzero() {
        assert!(validate_pids(&[1, 2, 3]).is_ok());
        assert!(validate_pids(&[]).is_ok());
        assert!(matches!(
            validate_pids(&[1, 0]),
            Err(TypesError::OutOfRange { .. })
        ));
        assert!(matches!(
            validate_pids(&vec![1; MAX_PIDS + 1]),
            Err(TypesError::TooMany { .. })
        ));
    }

    #[test]
    fn unset_resources_stay_zero() {
        let r = pb::LinuxResources::from(&Resources {
            memory_limit_bytes: Some(64 << 20),
            ..Default::default()
        });
        assert_eq!(r.memory_limit_bytes, 64 << 20);
        assert_eq!(r.cpu_quota, 0);
        assert_eq!(r.cpuset_cpus, "");
    }

    #[test]
    fn not_implemented_says_which_method() {
        match not_implemented("CreateContainer") {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED);
                assert_eq!(s.message(), "not implemented yet: CreateContainer");
            }
            e => panic!("unexpected {e:?}"),
        }
    }
}

//! Pods: which VM a container belongs to, which shim serves it, and how big its VM is.
//!
//! With the CRI's annotations a pod is one sandbox (pause) container plus app containers that
//! name the sandbox's id; the pod gets one shim and one microVM. Without them (`ctr run`) each
//! container is a sandbox of its own.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

use crate::config::Config;
use crate::error::{Result, ShimError};

/// Annotation: `sandbox` or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// Annotation: the pod sandbox's id.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Annotation: the pod's CFS quota in microseconds (sum of its containers' limits).
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// Annotation: the pod's CFS period in microseconds.
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// Annotation: the pod's memory limit in bytes.
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// Longest id accepted (containerd allows 76 characters; leave room).
pub const MAX_ID_LEN: usize = 128;

/// What a container is to its VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The CRI's sandbox (pause) container: it starts the pod's VM and runs no process.
    PodSandbox {
        /// The pod's sandbox id.
        sandbox_id: String,
    },
    /// An app container of a pod: it joins the VM of `sandbox_id`.
    PodContainer {
        /// The pod's sandbox id.
        sandbox_id: String,
    },
    /// A container without CRI annotations: a VM of its own, named after the container.
    Standalone,
}

impl Role {
    /// The role of container `id` from its spec's annotations.
    pub fn from_annotations(id: &str, annotations: &HashMap<String, String>) -> Result<Role> {
        match annotations.get(CONTAINER_TYPE).map(String::as_str) {
            None => Ok(Role::Standalone),
            Some("sandbox") => {
                let sandbox_id = annotations
                    .get(SANDBOX_ID)
                    .cloned()
                    .unwrap_or_else(|| id.to_owned());
                validate_id(&sandbox_id)?;
                Ok(Role::PodSandbox { sandbox_id })
            }
            Some("container") => {
                let sandbox_id = annotations.get(SANDBOX_ID).cloned().ok_or_else(|| {
                    ShimError::InvalidArgument(format!(
                        "container {id}: {CONTAINER_TYPE}=container without {SANDBOX_ID}"
                    ))
                })?;
                validate_id(&sandbox_id)?;
                if sandbox_id == id {
                    return Err(ShimError::InvalidArgument(format!(
                        "container {id}: an app container cannot be its own sandbox"
                    )));
                }
                Ok(Role::PodContainer { sandbox_id })
            }
            Some(other) => Err(ShimError::InvalidArgument(format!(
                "container {id}: unknown {CONTAINER_TYPE} {other:?}"
            ))),
        }
    }

    /// The id of the sandbox (VM) that serves container `id`.
    pub fn sandbox_id<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            Role::PodSandbox { sandbox_id } | Role::PodContainer { sandbox_id } => sandbox_id,
            Role::Standalone => id,
        }
    }
}

/// The grouping key of the `start` subcommand: every container of a pod gets the address of
/// the one shim of its sandbox; a standalone container gets a shim of its own.
pub fn grouping(id: &str, annotations: &HashMap<String, String>) -> Result<String> {
    Ok(Role::from_annotations(id, annotations)?
        .sandbox_id(id)
        .to_owned())
}

/// How long `start` waits for the shim already on a group's socket to take a connection.
pub const GROUP_SHIM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a shim serves `address` (`unix://PATH`, as `containerd_shim::socket_address`
/// makes it): `Ok(true)` when a connection to it completes, `Ok(false)` when nothing does (no
/// socket, or a dead shim's: refused), an error when the connection neither completes nor fails
/// within `timeout` (a wedged shim whose backlog is full).
///
/// `start` asks this before it spawns a shim: a pod's app containers find their sandbox's shim
/// here and get its address at once, as containerd's own runc shim does, instead of each
/// spawning a second shim process whose only work is to find the socket taken and exit.
pub fn shim_serves(address: &str, timeout: Duration) -> std::io::Result<bool> {
    let Some(path) = address.strip_prefix("unix://") else {
        return Ok(false);
    };
    let path = std::path::PathBuf::from(path);
    let (tx, rx) = mpsc::channel();
    // A connect blocks only while the listener's backlog is full; the thread is left behind
    // (and ends with this short-lived process) when it does not return.
    std::thread::Builder::new()
        .name("shim-probe".into())
        .spawn(move || {
            let _ = tx.send(UnixStream::connect(&path));
        })?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(_stream)) => Ok(true),
        Ok(Err(_)) => Ok(false),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the shim on {address} took no connection within {} s",
                timeout.as_secs_f64()
            ),
        )),
    }
}

/// Checks an id used in host paths: 1..=[`MAX_ID_LEN`] of `[A-Za-z0-9_.-]`, not `.` or `..`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ShimError::InvalidArgument(format!(
            "id {:?} is not 1..={MAX_ID_LEN} characters of [A-Za-z0-9_.-]",
            id.chars().take(MAX_ID_LEN + 8).collect::<String>()
        )))
    }
}

/// The size of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
}

/// What the pod (or standalone container) asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceRequest {
    /// CFS quota in microseconds per period (0 or less: no CPU limit).
    pub cpu_quota: i64,
    /// CFS period in microseconds.
    pub cpu_period: u64,
    /// Memory limit in bytes (0: none).
    pub memory_bytes: u64,
}

impl ResourceRequest {
    /// From the pod sandbox annotations; absent ones are 0.
    pub fn from_annotations(annotations: &HashMap<String, String>) -> Result<Self> {
        fn num<T: std::str::FromStr + Default>(
            a: &HashMap<String, String>,
            key: &str,
        ) -> Result<T> {
            match a.get(key) {
                None => Ok(T::default()),
                Some(v) if v.is_empty() => Ok(T::default()),
                Some(v) => v.trim().parse().map_err(|_| {
                    ShimError::InvalidArgument(format!("annotation {key}={v:?} is not a number"))
                }),
            }
        }
        Ok(ResourceRequest {
            cpu_quota: num(annotations, SANDBOX_CPU_QUOTA)?,
            cpu_period: num(annotations, SANDBOX_CPU_PERIOD)?,
            memory_bytes: num(annotations, SANDBOX_MEMORY)?,
        })
    }

    /// From a container's own `linux.resources` (standalone containers).
    pub fn from_spec(spec: &oci_spec::runtime::Spec) -> Self {
        let res = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        let cpu = res.and_then(|r| r.cpu().as_ref());
        let mem = res
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit());
        ResourceRequest {
            cpu_quota: cpu.and_then(|c| c.quota()).unwrap_or(0),
            cpu_period: cpu.and_then(|c| c.period()).unwrap_or(0),
            memory_bytes: mem.and_then(|m| u64::try_from(m).ok()).unwrap_or(0),
        }
    }

    /// The VM: the configured defaults plus what the pod asks for (as Kata does: the base
    /// VM runs the guest kernel and agent, the pod's limits come on top), within the limits.
    pub fn vm_size(&self, config: &Config) -> Result<VmSize> {
        let mut vcpus = u64::from(config.default_vcpus);
        if self.cpu_quota > 0 && self.cpu_period > 0 {
            let quota = self.cpu_quota.unsigned_abs();
            vcpus += quota.div_ceil(self.cpu_period);
        }
        let memory_mib = config
            .default_memory_mib
            .saturating_add(self.memory_bytes.div_ceil(1 << 20));
        if vcpus > u64::from(config.max_vcpus) {
            return Err(ShimError::InvalidArgument(format!(
                "the pod needs {vcpus} vCPUs, more than max_vcpus ({})",
                config.max_vcpus
            )));
        }
        if memory_mib > config.max_memory_mib {
            return Err(ShimError::InvalidArgument(format!(
                "the pod needs {memory_mib} MiB, more than max_memory_mib ({})",
                config.max_memory_mib
            )));
        }
        Ok(VmSize {
            vcpus: u32::try_from(vcpus).unwrap_or(config.max_vcpus),
            memory_mib,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_serving_shim_is_found_a_dead_one_not_and_a_wedged_one_is_an_error() {
        use nix::sys::socket::{
            bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.sock");
        let address = format!("unix://{}", path.display());
        let t = Duration::from_secs(5);
        assert!(!shim_serves(&address, t).unwrap(), "no socket");
        assert!(
            !shim_serves(&path.display().to_string(), t).unwrap(),
            "not unix://"
        );
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(shim_serves(&address, t).unwrap(), "a listening shim");
        // A dead shim: its socket refuses connections. Shut down rather than only dropped: a
        // process that another test spawns at that moment holds a copy of the descriptor
        // until its execve, and the socket would listen on through it.
        nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&listener),
            nix::sys::socket::Shutdown::Both,
        )
        .unwrap();
        drop(listener);
        assert!(path.exists());
        assert!(!shim_serves(&address, t).unwrap(), "a dead shim's socket");
        std::fs::remove_file(&path).unwrap();

        // A shim that accepts nothing: its backlog fills, and a connect would block.
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let addr = UnixAddr::new(&path).unwrap();
        bind(std::os::fd::AsRawFd::as_raw_fd(&listener), &addr).unwrap();
        listen(&listener, Backlog::new(0).unwrap()).unwrap();
        let mut queued = Vec::new();
        loop {
            let s = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            match connect(std::os::fd::AsRawFd::as_raw_fd(&s), &addr) {
                Ok(()) => queued.push(s),
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => panic!("filling the backlog: {e}"),
            }
            assert!(queued.len() < 1000, "the backlog never filled");
        }
        let e = shim_serves(&address, Duration::from_millis(300)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("took no connection"), "{e}");
    }

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn roles_from_annotations() {
        assert_eq!(
            Role::from_annotations("c1", &HashMap::new()).unwrap(),
            Role::Standalone
        );
        let sandbox = ann(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "pod1")]);
        assert_eq!(
            Role::from_annotations("pod1", &sandbox).unwrap(),
            Role::PodSandbox {
                sandbox_id: "pod1".into()
            }
        );
        let app = ann(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "pod1")]);
        let role = Role::from_annotations("web", &app).unwrap();
        assert_eq!(
            role,
            Role::PodContainer {
                sandbox_id: "pod1".into()
            }
        );
        let kind = crate::task::Kind::of(&role);
        assert!(!kind.boots_vm() && kind.runs_container());
        assert_eq!(role.sandbox_id("web"), "pod1");
    }

    #[test]
    fn bad_annotations_are_invalid_arguments() {
        for a in [
            ann(&[(CONTAINER_TYPE, "container")]),
            ann(&[(CONTAINER_TYPE, "pod")]),
            ann(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "../etc")]),
            ann(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "web")]),
            ann(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "a/b")]),
        ] {
            let e = Role::from_annotations("web", &a).unwrap_err();
            assert_eq!(
                e.code(),
                containerd_shim::protos::ttrpc::Code::INVALID_ARGUMENT,
                "{a:?}"
            );
        }
    }

    #[test]
    fn pod_containers_group_under_their_sandbox() {
        let sandbox = ann(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "pod1")]);
        let app = ann(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "pod1")]);
        assert_eq!(grouping("pod1", &sandbox).unwrap(), "pod1");
        assert_eq!(grouping("web", &app).unwrap(), "pod1");
        assert_eq!(grouping("db", &app).unwrap(), "pod1");
        assert_eq!(grouping("solo", &HashMap::new()).unwrap(), "solo");
        // One shim per pod: the crate derives the socket from (address, namespace, grouping).
        let addr = |id: &str, a: &HashMap<String, String>| {
            containerd_shim::socket_address(
                "/run/containerd/containerd.sock",
                "k8s.io",
                &grouping(id, a).unwrap(),
            )
        };
        assert_eq!(addr("web", &app), addr("pod1", &sandbox));
        assert_ne!(addr("solo", &HashMap::new()), addr("pod1", &sandbox));
    }

    #[test]
    fn ids_are_checked() {
        for good in ["a", "0123abcdef", "pod_1.x-y", &"a".repeat(MAX_ID_LEN)] {
            validate_id(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "é",
            &"a".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    fn config() -> Config {
        Config {
            default_vcpus: 1,
            default_memory_mib: 256,
            max_vcpus: 4,
            max_memory_mib: 2048,
            ..Config::default()
        }
    }

    #[test]
    fn vm_is_sized_from_annotations_plus_defaults() {
        let none = ResourceRequest::from_annotations(&HashMap::new()).unwrap();
        assert_eq!(
            none.vm_size(&config()).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        let pod = ann(&[
            (SANDBOX_CPU_QUOTA, "150000"),
            (SANDBOX_CPU_PERIOD, "100000"),
            (SANDBOX_MEMORY, "536870912"),
        ]);
        let req = ResourceRequest::from_annotations(&pod).unwrap();
        assert_eq!(
            req.vm_size(&config()).unwrap(),
            VmSize {
                vcpus: 3,
                memory_mib: 768
            }
        );
        // Unlimited quota (-1) adds no vCPU; a partial MiB rounds up.
        let pod = ann(&[
            (SANDBOX_CPU_QUOTA, "-1"),
            (SANDBOX_CPU_PERIOD, "100000"),
            (SANDBOX_MEMORY, "1"),
        ]);
        let req = ResourceRequest::from_annotations(&pod).unwrap();
        assert_eq!(
            req.vm_size(&config()).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 257
            }
        );
    }

    #[test]
    fn vm_size_limits_and_bad_numbers() {
        let big_cpu = ann(&[
            (SANDBOX_CPU_QUOTA, "400000"),
            (SANDBOX_CPU_PERIOD, "100000"),
        ]);
        let e = ResourceRequest::from_annotations(&big_cpu)
            .unwrap()
            .vm_size(&config())
            .unwrap_err();
        assert!(e.to_string().contains("max_vcpus"), "{e}");
        let big_mem = ann(&[(SANDBOX_MEMORY, &(4u64 << 30).to_string())]);
        let e = ResourceRequest::from_annotations(&big_mem)
            .unwrap()
            .vm_size(&config())
            .unwrap_err();
        assert!(e.to_string().contains("max_memory_mib"), "{e}");
        let e = ResourceRequest::from_annotations(&ann(&[(SANDBOX_MEMORY, "lots")])).unwrap_err();
        assert_eq!(
            e.code(),
            containerd_shim::protos::ttrpc::Code::INVALID_ARGUMENT
        );
    }
}

//! The shim's errors and the one place they become ttrpc status codes for containerd.

use containerd_shim::protos::ttrpc;
use nutshell_protocol::client::ClientError;
use nutshell_protocol::ttrpc::Code as AgentCode;
use ttrpc::Code;

use crate::state::{TaskState, Transition};

/// What can go wrong serving the Task API.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// No task, exec or sandbox with this id.
    #[error("{kind} {id} not found")]
    NotFound {
        /// Task, exec or sandbox.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// A task or exec with this id exists already.
    #[error("{kind} {id} already exists")]
    AlreadyExists {
        /// Task or exec.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// The request is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The task is not in a state that allows the call.
    #[error("task {id}: cannot {transition} when {from}")]
    IllegalTransition {
        /// The task or exec.
        id: String,
        /// The state it is in.
        from: TaskState,
        /// What was asked.
        transition: Transition,
    },
    /// A call that needs another one first (e.g. I/O not set up, VM not running).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Not supported by this runtime.
    #[error("not supported yet: {0}")]
    Unimplemented(&'static str),
    /// The agent in the guest answered with an error status; its code is kept.
    #[error("agent {method}")]
    Agent {
        /// The agent method.
        method: &'static str,
        /// The error.
        #[source]
        source: ClientError,
    },
    /// The VM could not be started or reached.
    #[error("sandbox {id}: {message}")]
    Vm {
        /// The sandbox.
        id: String,
        /// What failed.
        message: String,
    },
    /// A host operation failed (files, mounts, processes).
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The pod's cgroup on the host could not be made or joined.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// The pod's network could not be moved into its VM.
    #[error(transparent)]
    Network(#[from] crate::net::NetError),
    /// The node policy refuses the container (or cannot check a host path of it).
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// Anything else the host got wrong.
    #[error("{0}")]
    Internal(String),
}

impl ShimError {
    /// An [`ShimError::Io`] with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimError {
        let context = context.into();
        move |source| ShimError::Io { context, source }
    }

    /// An [`ShimError::Agent`] for `method`.
    pub fn agent(method: &'static str) -> impl FnOnce(ClientError) -> ShimError {
        move |source| ShimError::Agent { method, source }
    }

    /// The ttrpc code containerd gets for this error.
    pub fn code(&self) -> Code {
        match self {
            ShimError::NotFound { .. } => Code::NOT_FOUND,
            ShimError::AlreadyExists { .. } => Code::ALREADY_EXISTS,
            ShimError::InvalidArgument(_) | ShimError::Config(_) => Code::INVALID_ARGUMENT,
            ShimError::IllegalTransition { .. } | ShimError::FailedPrecondition(_) => {
                Code::FAILED_PRECONDITION
            }
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Agent { source, .. } => match source {
                // The guest's code passes through only where it is one containerd acts on; an
                // unexpected code from a hostile guest is just an internal error.
                ClientError::Status { code, .. } => match code {
                    AgentCode::NOT_FOUND => Code::NOT_FOUND,
                    AgentCode::ALREADY_EXISTS => Code::ALREADY_EXISTS,
                    AgentCode::INVALID_ARGUMENT => Code::INVALID_ARGUMENT,
                    AgentCode::FAILED_PRECONDITION => Code::FAILED_PRECONDITION,
                    AgentCode::UNIMPLEMENTED => Code::UNIMPLEMENTED,
                    AgentCode::DEADLINE_EXCEEDED => Code::DEADLINE_EXCEEDED,
                    AgentCode::RESOURCE_EXHAUSTED => Code::RESOURCE_EXHAUSTED,
                    _ => Code::INTERNAL,
                },
                ClientError::InvalidReply(_) => Code::INTERNAL,
                _ => Code::UNAVAILABLE,
            },
            ShimError::Vm { .. } => Code::UNAVAILABLE,
            ShimError::Cgroup(crate::cgroup::CgroupError::InvalidPath { .. }) => {
                Code::INVALID_ARGUMENT
            }
            ShimError::Cgroup(_) => Code::INTERNAL,
            ShimError::Network(
                crate::net::NetError::Unsupported(_)
                | crate::net::NetError::Netns { .. }
                | crate::net::NetError::NodeNetwork,
            ) => Code::FAILED_PRECONDITION,
            ShimError::Network(_) => Code::INTERNAL,
            ShimError::Policy(crate::policy::PolicyError::Source { .. }) => Code::INVALID_ARGUMENT,
            ShimError::Policy(_) => Code::PERMISSION_DENIED,
            ShimError::Io { .. } | ShimError::Internal(_) => Code::INTERNAL,
        }
    }
}

pub use nutshell_protocol::error_chain as chain;

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), chain(&e)))
    }
}

/// Result of the shim's domain functions.
pub type Result<T> = std::result::Result<T, ShimError>;

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: ShimError) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_owned()),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn each_error_maps_to_its_code() {
        let cases = [
            (
                ShimError::NotFound {
                    kind: "task",
                    id: "a".into(),
                },
                Code::NOT_FOUND,
            ),
            (
                ShimError::AlreadyExists {
                    kind: "exec",
                    id: "e".into(),
                },
                Code::ALREADY_EXISTS,
            ),
            (
                ShimError::InvalidArgument("x".into()),
                Code::INVALID_ARGUMENT,
            ),
            (
                ShimError::IllegalTransition {
                    id: "a".into(),
                    from: TaskState::Stopped,
                    transition: Transition::Start,
                },
                Code::FAILED_PRECONDITION,
            ),
            (
                ShimError::FailedPrecondition("x".into()),
                Code::FAILED_PRECONDITION,
            ),
            (ShimError::Unimplemented("checkpoint"), Code::UNIMPLEMENTED),
            (
                ShimError::Vm {
                    id: "p".into(),
                    message: "gone".into(),
                },
                Code::UNAVAILABLE,
            ),
            (ShimError::Internal("x".into()), Code::INTERNAL),
            (
                ShimError::Policy(crate::policy::PolicyError::Device {
                    path: "/dev/fuse".into(),
                }),
                Code::PERMISSION_DENIED,
            ),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let (c, message) = status(e);
            assert_eq!(c, code, "{text}");
            assert!(message.starts_with(&text), "{message}");
        }
    }

    #[test]
    fn agent_codes_pass_through_only_when_expected() {
        let agent = |code: AgentCode| ShimError::Agent {
            method: "CreateContainer",
            source: ClientError::Status {
                code,
                message: "not implemented yet: CreateContainer".into(),
            },
        };
        let (code, message) = status(agent(AgentCode::UNIMPLEMENTED));
        assert_eq!(code, Code::UNIMPLEMENTED);
        assert!(
            message.contains("CreateContainer") && message.contains("not implemented yet"),
            "{message}"
        );
        assert_eq!(status(agent(AgentCode::NOT_FOUND)).0, Code::NOT_FOUND);
        // A guest cannot make containerd believe in, say, an authentication problem.
        assert_eq!(status(agent(AgentCode::UNAUTHENTICATED)).0, Code::INTERNAL);
        assert_eq!(status(agent(AgentCode::OK)).0, Code::INTERNAL);
        let transport = ShimError::Agent {
            method: "StartContainer",
            source: ClientError::Transport(nutshell_protocol::ttrpc::Error::LocalClosed),
        };
        assert_eq!(status(transport).0, Code::UNAVAILABLE);
    }

    #[test]
    fn chain_prints_each_cause_once() {
        let e = ShimError::Io {
            context: "mount rootfs".into(),
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        };
        let (_, message) = status(e);
        assert!(message.starts_with("mount rootfs: "), "{message}");
        assert_eq!(message.matches("Operation not permitted").count(), 1);
    }
}

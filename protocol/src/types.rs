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
    /// An enum field has a value this side does not know.
    #[error("{field} has the unknown value {value}")]
    UnknownEnum {
        /// The field.
        field: &'static str,
        /// The raw value.
        value: i32,
    },
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

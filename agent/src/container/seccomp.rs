//! OCI seccomp → BPF. A stub until the seccomp work lands (the lead replaces this file): any
//! spec that asks for seccomp is refused with "not supported yet", so no container ever runs
//! without the filter it asked for.

use oci_spec::runtime::LinuxSeccomp;

/// Why a seccomp profile could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// This build cannot compile seccomp profiles.
    #[error("seccomp is not supported yet")]
    NotSupported,
}

/// Compiles the OCI seccomp profile into a BPF program for [`seccompiler::apply_filter`].
pub fn compile(_seccomp: &LinuxSeccomp) -> Result<seccompiler::BpfProgram, SeccompError> {
    Err(SeccompError::NotSupported)
}

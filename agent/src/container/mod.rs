//! OCI containers in the guest.

pub mod cgroup;
pub mod seccomp;

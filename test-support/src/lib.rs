//! The harness that the end-to-end tests (`tests/`) and the benchmark (`benchmarks/`) share.
//!
//! - [`cri`]: a blocking CRI client (containerd's CRI plugin over its socket, as kubelet
//!   drives it).
//! - [`containerd`]: a private containerd (own root, state, socket, config) that is stopped on
//!   drop, and a `ctr` wrapper bound to it.
//! - [`image`]: OCI images built locally from the host's Debian binaries, cached by input hash.

pub mod containerd;
pub mod cri;
pub mod image;

//! Nutshell's benchmarks and the containerd harness the end-to-end tests share.
//!
//! - [`cri`]: a blocking CRI client (containerd's CRI plugin over its socket, as kubelet
//!   drives it).
//! - [`containerd`]: a private containerd (own root, state, socket, config) that is stopped on
//!   drop, and a `ctr` wrapper bound to it.
//! - [`image`]: OCI images built locally from the host's Debian binaries, cached by input hash.
//! - [`nutshell`]: the shim config and VM template directory the benchmark runs Nutshell with.
//! - [`runner`]: the workloads under each runtime in interleaved order.
//! - [`report`], [`stats`], [`parse`]: what the runs produce and how it is summarized.

pub mod containerd;
pub mod cri;
pub mod image;
pub mod nutshell;
pub mod parse;
pub mod report;
pub mod runner;
pub mod stats;

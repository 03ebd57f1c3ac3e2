//! Nutshell's benchmarks. The containerd, CRI and image harness they run on is
//! `nutshell-test-support`, shared with the end-to-end tests.
//!
//! - [`nutshell`]: the shim config and VM template directory the benchmark runs Nutshell with.
//! - [`runner`]: the workloads under each runtime in interleaved order.
//! - [`report`], [`stats`], [`parse`]: what the runs produce and how it is summarized.

pub mod nutshell;
pub mod parse;
pub mod report;
pub mod runner;
pub mod stats;

//! `nutshell-agent`: PID 1 of a Nutshell guest.
//!
//! The library holds everything that can run without being PID 1, so that the RPC service is
//! tested on the host over a Unix socket: [`service`] (the ttrpc handlers, with the power-off
//! injected as a [`service::ShutdownAction`]) and [`logger`] (the console logger). [`sys`] holds
//! the system calls of PID 1, [`init`] the PID 1 sequence, [`container`] the OCI containers
//! (its own system calls in `container::syscall`).

pub mod alloc;
pub mod container;
pub mod forward;
pub mod init;
pub mod logger;
pub mod network;
pub mod pod;
pub mod pod_ns;
pub mod refresh;
pub mod sandbox;
pub mod service;
pub mod stdio;
pub mod switch_root;
pub mod sys;

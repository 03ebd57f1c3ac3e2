//! `nutshell-agent`: PID 1 of a Nutshell guest.
//!
//! The library holds everything that can run without being PID 1, so that the RPC service is
//! tested on the host over a Unix socket: [`service`] (the ttrpc handlers, with the power-off
//! injected as a [`service::ShutdownAction`]) and [`logger`] (the console logger). [`sys`] holds
//! the system calls (all the crate's `unsafe`), [`init`] the PID 1 sequence.

pub mod init;
pub mod logger;
pub mod refresh;
pub mod service;
pub mod sys;

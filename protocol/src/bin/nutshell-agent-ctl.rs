//! `nutshell-agent-ctl`: calls a guest agent through the VMM's hybrid vsock socket.
//!
//! A tool for operators and for the demo: `health`, `version`, `refresh` and `shutdown` against the agent
//! of a VM started with `nutshell-vmm --vsock-uds PATH`. It waits for the guest to boot (up to
//! `--timeout` seconds) before its first call.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use nutshell_protocol::client::{AgentClient, ConnectOptions};

/// Calls the Nutshell guest agent of a running microVM.
#[derive(Debug, Parser)]
#[command(name = "nutshell-agent-ctl", version, about)]
struct Args {
    /// The VM's hybrid vsock socket (nutshell-vmm --vsock-uds PATH).
    #[arg(long, value_name = "PATH")]
    uds: PathBuf,

    /// Seconds to wait for the guest to boot and the agent to answer (before or after the
    /// call).
    #[arg(long, value_name = "SECS", default_value_t = 120, global = true)]
    timeout: u64,

    /// What to ask, in order (e.g. `health version shutdown`).
    #[command(subcommand)]
    call: Call,
}

#[derive(Debug, Subcommand)]
enum Call {
    /// Whether the agent serves requests.
    Health,
    /// The agent's version, API version and guest kernel release.
    Version,
    /// Health, then give the guest the host's wall clock and 64 random bytes
    /// (Agent.RefreshGuest), as the shim does after restoring a VM from a template.
    Refresh,
    /// Health and version, then ask the guest to power off.
    Shutdown,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nutshell-agent-ctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)] // the tool's output
fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let opts = ConnectOptions {
        connect_timeout: Duration::from_secs(args.timeout),
        ..ConnectOptions::default()
    };
    let client = AgentClient::connect(&args.uds, &opts)
        .with_context(|| format!("cannot reach the agent through {}", args.uds.display()))?;
    let health = client.check().context("Health")?;
    println!(
        "agent health: {health:?} ({:.2} s after this tool started)",
        started.elapsed().as_secs_f64()
    );
    if matches!(args.call, Call::Version | Call::Shutdown) {
        let v = client.version().context("Version")?;
        println!(
            "agent version: {} (API {}), guest kernel {}",
            v.agent_version, v.api_version, v.kernel_release
        );
    }
    if matches!(args.call, Call::Refresh) {
        client.refresh_guest_now().context("RefreshGuest")?;
        println!("guest clock and entropy refreshed");
    }
    if matches!(args.call, Call::Shutdown) {
        client.shutdown().context("Shutdown")?;
        println!("shutdown requested");
    }
    Ok(())
}

//! `nutshell-agent-ctl`: calls a guest agent through the VMM's hybrid vsock socket.
//!
//! A tool for operators and for the demo: `health`, `version`, `refresh`, `shutdown`, and
//! `sandbox` and `run` for a container, against the agent of a VM started with
//! `nutshell-vmm --vsock-uds PATH`. It waits for the guest to boot (up to `--timeout` seconds)
//! before its first call.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use nutshell_protocol::client::{connect_hybrid_retry, AgentClient, ConnectOptions};
use nutshell_protocol::types::{SandboxSpec, StdioPorts};
use nutshell_protocol::GUEST_SHARED_DIR;

/// The exit status of `run` when the tool itself fails (as `docker run` and `podman run`):
/// every other status is the container's.
const RUN_TOOL_FAILED: u8 = 125;

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
    /// Health, then create the sandbox (Agent.CreateSandbox) as the shim does before its first
    /// container: the agent mounts the VM's shared directory (nutshell-vmm --shared-dir) at
    /// /run/shared in the guest, where `run` finds container root file systems.
    Sandbox {
        /// The sandbox id (also the guest's hostname).
        #[arg(long, value_name = "ID", default_value = "pod")]
        id: String,
    },
    /// Health, then run one container to its end: CreateContainer with the OCI runtime spec in
    /// FILE, StartContainer, its stdout and stderr copied to this tool's, WaitProcess,
    /// RemoveContainer. The spec is the guest's view: `root.path` is a directory under
    /// /run/shared (DIR/ID/rootfs of the VM's --shared-dir DIR is /run/shared/ID/rootfs), so a
    /// sandbox must exist (`sandbox`). Exit status: the container's (128 + N after signal N),
    /// or 125 when this tool fails.
    Run {
        /// The container id.
        #[arg(long, value_name = "ID")]
        id: String,
        /// The OCI runtime spec (config.json), with paths as the guest sees them.
        #[arg(long, value_name = "FILE")]
        spec: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let failed = if matches!(args.call, Call::Run { .. }) {
        ExitCode::from(RUN_TOOL_FAILED)
    } else {
        ExitCode::FAILURE
    };
    match run(args) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("nutshell-agent-ctl: error: {e:#}");
            failed
        }
    }
}

/// Makes the calls; the exit status (0, or the container's after `run`).
#[allow(clippy::print_stdout)] // the tool's output
fn run(args: Args) -> anyhow::Result<u8> {
    let started = Instant::now();
    let opts = ConnectOptions {
        connect_timeout: Duration::from_secs(args.timeout),
        ..ConnectOptions::default()
    };
    let client = AgentClient::connect(&args.uds, &opts)
        .with_context(|| format!("cannot reach the agent through {}", args.uds.display()))?;
    let health = client.check().context("Health")?;
    let health = format!(
        "agent health: {health:?} ({:.2} s after this tool started)",
        started.elapsed().as_secs_f64()
    );
    if matches!(args.call, Call::Run { .. }) {
        // The container's output is stdout, alone.
        eprintln!("{health}");
    } else {
        println!("{health}");
    }
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
    match &args.call {
        Call::Sandbox { id } => {
            client
                .create_sandbox(&SandboxSpec {
                    sandbox_id: id.clone(),
                    hostname: id.clone(),
                    shared_dir: GUEST_SHARED_DIR.into(),
                    ..SandboxSpec::default()
                })
                .context("CreateSandbox")?;
            println!("sandbox {id} created (shared directory at {GUEST_SHARED_DIR})");
            Ok(0)
        }
        Call::Run { id, spec } => run_container(&args.uds, &opts, &client, id, spec),
        _ => Ok(0),
    }
}

/// `run`: the container's stdout and stderr go to this tool's, its progress to stderr (stdout
/// is the container's alone).
fn run_container(
    uds: &Path,
    opts: &ConnectOptions,
    client: &AgentClient,
    id: &str,
    spec: &Path,
) -> anyhow::Result<u8> {
    let spec_json =
        std::fs::read(spec).with_context(|| format!("cannot read {}", spec.display()))?;
    // Guest ports of the streams, per run of this tool (the shim counts up from 0x4000_0000;
    // two runs against one VM at the same time get different ports).
    let base = 0x6000_0000 | ((std::process::id() << 1) & 0x0fff_fffe);
    let ports = StdioPorts {
        stdin: 0,
        stdout: base,
        stderr: base + 1,
    };
    // The agent accepts the streams while it handles CreateContainer: connect first.
    let stdout = copy_stream(uds, ports.stdout, opts.connect_timeout, io::stdout);
    let stderr = copy_stream(uds, ports.stderr, opts.connect_timeout, io::stderr);
    // WaitProcess blocks until the exit: a connection of its own, without an RPC deadline.
    let waiter = AgentClient::connect(
        uds,
        &ConnectOptions {
            rpc_timeout: Duration::ZERO,
            ..opts.clone()
        },
    )
    .context("a second connection for WaitProcess")?;
    let t = Instant::now();
    client
        .create_container(id, spec_json, ports, false)
        .context("CreateContainer")?;
    client.start_container(id).context("StartContainer")?;
    let started = t.elapsed();
    let exit = waiter.wait_process(id, "").context("WaitProcess")?;
    let ran = t.elapsed();
    // Both streams end when the container's last holder of them exits.
    for (name, h) in [("stdout", stdout), ("stderr", stderr)] {
        match h.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("nutshell-agent-ctl: container {id}'s {name}: {e:#}"),
            Err(_) => eprintln!("nutshell-agent-ctl: container {id}'s {name}: copy panicked"),
        }
    }
    client.remove_container(id, 0).context("RemoveContainer")?;
    eprintln!(
        "nutshell-agent-ctl: container {id} exited with status {} (created and started in \
         {:.2} s, exited {:.2} s after CreateContainer); removed",
        exit.exit_status,
        started.as_secs_f64(),
        ran.as_secs_f64()
    );
    Ok(u8::try_from(exit.exit_status).unwrap_or(u8::MAX))
}

/// Connects to guest `port` in a thread (retrying until the agent listens, at most `timeout`)
/// and copies what arrives to `out` until EOF; returns the byte count.
fn copy_stream<W: io::Write + 'static>(
    uds: &Path,
    port: u32,
    timeout: Duration,
    out: fn() -> W,
) -> JoinHandle<anyhow::Result<u64>> {
    let uds = uds.to_path_buf();
    std::thread::spawn(move || {
        let mut s = connect_hybrid_retry(&uds, port, timeout, Duration::from_millis(20))
            .with_context(|| format!("cannot connect to guest port {port}"))?;
        let mut out = out();
        let n = io::copy(&mut s, &mut out).context("copy")?;
        out.flush().context("flush")?;
        Ok(n)
    })
}

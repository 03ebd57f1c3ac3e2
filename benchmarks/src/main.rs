//! `nutshell-bench`: the same workloads under runc, Nutshell and runsc, side by side.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use nutshell_bench::nutshell;
use nutshell_bench::runner::{self, Plan, RunConfig, Workload};
use nutshell_test_support::containerd::{self, find_on_path, RuntimeSpec};

/// Runs each workload under every runtime in interleaved order (A B, B A, A B …) against a private
/// containerd, and writes `latest.md` (medians, min–max, ratios to runc), `latest.json` (raw
/// samples) and SVG plots into the output directory; prints the table.
///
/// Workloads: startup (`ctr run` to first output, serially and N in parallel; a CRI pod from
/// RunPodSandbox to its container running), cpu (sysbench
/// cpu), memory (sysbench memory, page-fault allocation), syscalls (getpid, 1-byte reads),
/// fileio (fio and file creation on the rootfs and on a bind-mounted volume), density (host
/// PSS of idle containers), network (iperf3 both ways and TCP round trips between the host and
/// a pod on a CNI bridge of the run's own). A runtime whose shim is not installed, or whose
/// first container fails, is reported as not available. Needs root, containerd, runc,
/// sysbench, fio, iperf3 and the CNI plugins (scripts/setup.sh installs them; runsc too). The default run takes under 20 minutes on a 2-core machine,
/// `--quick` under 3.
#[derive(Debug, Parser)]
#[command(name = "nutshell-bench", version)]
struct Args {
    /// A short run: fewer repetitions, smaller sizes.
    #[arg(long)]
    quick: bool,
    /// Serial start-up repetitions (`ctr run` and CRI pods) instead of the plan's (4, or 1 with
    /// `--quick`): for comparing two builds, whose start-up differs by less than one run's noise.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    startup_reps: Option<u64>,
    /// Base time budget of one case in seconds instead of the plan's 60 (0 with `--quick`): no
    /// new round starts once it is spent. Raise it with `--startup-reps` so that every
    /// repetition runs.
    #[arg(long, value_name = "SECONDS")]
    case_budget: Option<u64>,
    /// Run only these workloads (repeat or separate with commas).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Workload>,
    /// Runtimes in interleaving order: runc, nutshell, runsc, or NAME=io.containerd.X.vN for
    /// another shim. runc is always the baseline and is added first if missing.
    #[arg(long, value_delimiter = ',', default_value = "runc,nutshell,runsc")]
    runtimes: Vec<String>,
    /// Where the report goes.
    #[arg(long, default_value_os_t = default_out())]
    out: PathBuf,
    /// Where built image archives are cached.
    #[arg(long, default_value_os_t = default_cache())]
    cache_dir: PathBuf,
    /// Where Nutshell's agent-ready VM templates are kept (default: CACHE_DIR/templates). The
    /// first Nutshell container of a run builds one when none is there (a warm-up, not
    /// counted); later runs reuse it.
    #[arg(long)]
    template_dir: Option<PathBuf>,
    /// The cargo target directory with Nutshell's release builds and guest artifacts
    /// (scripts/setup.sh builds them).
    #[arg(long, default_value_os_t = default_target())]
    target_dir: PathBuf,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn default_out() -> PathBuf {
    repo_root().join("benchmarks").join("results")
}

fn default_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

fn default_cache() -> PathBuf {
    default_target().join("nutshell").join("bench-images")
}

/// Makes the private containerd run this repository's Nutshell build: its shim first on `PATH`
/// and `NUTSHELL_CONFIG` naming a config of the benchmark's own (both are inherited by
/// containerd and the shims it starts). An operator's `NUTSHELL_CONFIG` is kept. Returns
/// why Nutshell cannot run, if it cannot, and what its warm-up will do.
fn prepare_nutshell(args: &Args, scratch: &Path) -> Result<(Option<String>, Option<PathBuf>)> {
    let template_dir = args
        .template_dir
        .clone()
        .unwrap_or_else(|| args.cache_dir.join("templates"));
    if let Some(config) = std::env::var_os(nutshell::CONFIG_ENV) {
        log::info!(
            "nutshell: using NUTSHELL_CONFIG={} as set",
            Path::new(&config).display()
        );
        return Ok((None, None));
    }
    let artifacts = nutshell::Artifacts::in_target(&args.target_dir);
    if let Some(missing) = artifacts.missing() {
        return Ok((Some(missing), None));
    }
    std::fs::create_dir_all(&template_dir)
        .with_context(|| format!("template directory {}", template_dir.display()))?;
    let config = scratch.join("nutshell.toml");
    let text = nutshell::config_toml(&artifacts, &scratch.join("run"), &template_dir)
        .context("nutshell config")?;
    std::fs::write(&config, text).context("nutshell config")?;
    if let Some(dir) = artifacts.shim.parent() {
        let mut paths = vec![dir.to_path_buf()];
        paths.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        std::env::set_var("PATH", std::env::join_paths(paths).context("PATH")?);
    }
    std::env::set_var(nutshell::CONFIG_ENV, &config);
    log::info!(
        "nutshell: shim {}, templates in {}",
        artifacts.shim.display(),
        template_dir.display()
    );
    Ok((None, Some(template_dir)))
}

/// A directory for runsc's debug logs (`--debug --debug-log=DIR/`), when set.
const RUNSC_DEBUG_ENV: &str = "NUTSHELL_BENCH_RUNSC_DEBUG";

fn runtime_spec(arg: &str, scratch: &std::path::Path) -> Result<RuntimeSpec> {
    Ok(match arg {
        "runc" => RuntimeSpec::runc(),
        "nutshell" => RuntimeSpec::nutshell(),
        "runsc" => {
            // Debian's runsc has no shim: the runc shim runs it through a wrapper that gives
            // it the pod's network on a CNI network and none otherwise.
            match find_on_path("runsc") {
                Some(runsc) => {
                    let wrapper = scratch.join("runsc");
                    let debug = std::env::var_os(RUNSC_DEBUG_ENV).map(PathBuf::from);
                    let script = containerd::runsc_wrapper(&runsc, debug.as_deref());
                    std::fs::write(&wrapper, script).context("runsc wrapper")?;
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
                        .context("runsc wrapper")?;
                    RuntimeSpec::runsc(wrapper)
                }
                // Not a file: the runner reports runsc as not installed.
                None => RuntimeSpec::runsc(PathBuf::from("runsc")),
            }
        }
        other => match other.split_once('=') {
            Some((name, ty)) if !name.is_empty() && ty.starts_with("io.containerd.") => {
                RuntimeSpec {
                    name: name.to_owned(),
                    runtime_type: ty.to_owned(),
                    binary_name: None,
                    config_path: None,
                }
            }
            _ => bail!(
                "unknown runtime {other:?}: use runc, nutshell, runsc or NAME=io.containerd.X.v2"
            ),
        },
    })
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    if let Err(e) = handle_interrupts() {
        eprintln!("nutshell-bench: cannot handle SIGINT/SIGTERM: {e}");
        return ExitCode::FAILURE;
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if containerd::interrupted() => {
            eprintln!("nutshell-bench: interrupted; everything it started is removed, no report");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("nutshell-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT and SIGTERM abandon the run with a clean teardown ([`containerd::interrupt`]): no
/// containerd, shim, VM, mount or cgroup of the run is left. A second signal exits at once.
/// Blocks both signals in this thread (and so in every thread started later; children get an
/// empty mask from `std::process`) and takes them in a thread of their own.
fn handle_interrupts() -> nix::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    std::thread::spawn(move || {
        let mut first = true;
        while let Ok(signal) = set.wait() {
            if !first {
                eprintln!("nutshell-bench: {signal} again: exiting now, leaving what runs");
                std::process::exit(130);
            }
            first = false;
            log::warn!(
                "{signal}: stopping the run: containerd, shims, VMs and mounts are being removed \
                 (a second signal exits at once)"
            );
            containerd::interrupt();
        }
    });
    Ok(())
}

/// The run's scratch directory (the Nutshell config and run_dir): mounts a killed shim left in
/// it are detached before it is removed, so that removing it cannot reach into a rootfs.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        containerd::detach_mounts_under(self.0.path());
    }
}

fn run(args: Args) -> Result<()> {
    let scratch = Scratch(
        tempfile::Builder::new()
            .prefix("nutshell-bench-")
            .tempdir()
            .context("temporary directory")?,
    );
    log::info!("scratch directory {}", scratch.path().display());
    let mut runtimes = vec![RuntimeSpec::runc()];
    for r in &args.runtimes {
        let spec = runtime_spec(r, scratch.path())?;
        if !runtimes.iter().any(|s| s.name == spec.name) {
            runtimes.push(spec);
        }
    }
    // Static (musl): a dynamically linked program costs seconds of page faults to start in a
    // guest whose kernel is emulated, which every probe container would pay.
    let probe = args
        .target_dir
        .join("x86_64-unknown-linux-musl")
        .join("release")
        .join("nutshell-bench-probe");
    if !probe.is_file() {
        bail!(
            "{} is missing: scripts/setup.sh builds it (cargo build --release -p \
             nutshell-bench-probe --target x86_64-unknown-linux-musl)",
            probe.display()
        );
    }
    let mut unavailable = BTreeMap::new();
    let mut template_dir = None;
    if runtimes.iter().any(|r| r.name == "nutshell") {
        let (missing, dir) = prepare_nutshell(&args, scratch.path())?;
        if let Some(m) = missing {
            unavailable.insert("nutshell".to_owned(), m);
        }
        template_dir = dir;
    }
    let mut plan = Plan::new(args.quick);
    if let Some(n) = args.startup_reps {
        plan.startup_reps = n as usize;
    }
    if let Some(s) = args.case_budget {
        plan.case_budget = Duration::from_secs(s);
    }
    let config = RunConfig {
        plan,
        only: args.only,
        runtimes,
        cache_dir: args.cache_dir,
        probe,
        unavailable,
        template_dir,
    };
    let results = runner::run(config).context("benchmark run")?;
    let md = results.write(&args.out).context("report")?;
    println!("{}", results.machine.line());
    for rt in results.runtimes.iter().filter(|r| !r.available) {
        println!(
            "{}: not available: {}",
            rt.name,
            rt.reason.as_deref().unwrap_or("")
        );
    }
    println!("\n{}", results.table());
    println!(
        "wall time {:.0} s; report: {}",
        results.wall_s,
        md.display()
    );
    Ok(())
}

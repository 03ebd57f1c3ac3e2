//! The benchmark runner: images, runtime availability, the workloads in interleaved order.

mod network;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::nutshell;
use crate::parse;
use crate::report::{Machine, MetricResult, Results, RuntimeStatus};
use crate::stats::interleave;
use nutshell_test_support::containerd::RuntimeSpec;
use nutshell_test_support::containerd::{
    find_on_path, process_tree, remove_namespace_cgroups, shim_pids, CniNetwork, Containerd,
    ContainerdError, ContainerdOptions, Ctr, CRI_NAMESPACE,
};
use nutshell_test_support::cri::{self, CriClient};
use nutshell_test_support::image::{self, ImageError, ImageSpec};

/// The busybox image (start-up, density).
pub const BUSYBOX_IMAGE: &str = "docker.io/nutshell/busybox:latest";
/// The workload image: busybox, sysbench, fio, the probe.
pub const TOOLS_IMAGE: &str = "docker.io/nutshell/bench-tools:latest";
/// The CRI's sandbox (pause) image: busybox sleeping. Under runc it is the pod's sandbox
/// container; under Nutshell the VM is the sandbox and its command never runs.
pub const PAUSE_IMAGE: &str = "docker.io/nutshell/bench-pause:latest";

/// Errors that stop a whole run (a runtime failing only marks that runtime).
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// containerd failed.
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    /// An image could not be built.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The run was interrupted (SIGINT or SIGTERM).
    #[error("interrupted")]
    Interrupted,
    /// A file of the runner could not be written.
    #[error("cannot prepare {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A workload: one family of measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Workload {
    /// `ctr run` to first output, serially and N in parallel; a CRI pod to its container
    /// running.
    Startup,
    /// `sysbench cpu`.
    Cpu,
    /// `sysbench memory` and page-fault-heavy allocation.
    Memory,
    /// getpid and 1-byte reads in a loop.
    Syscalls,
    /// fio and file creation on the rootfs and on a volume.
    Fileio,
    /// Host PSS of idle containers.
    Density,
    /// TCP between the host and a pod on a CNI network: iperf3 both ways, request/response
    /// round trips.
    Network,
}

impl Workload {
    /// All workloads in report order.
    pub const ALL: [Workload; 7] = [
        Workload::Startup,
        Workload::Cpu,
        Workload::Memory,
        Workload::Syscalls,
        Workload::Fileio,
        Workload::Density,
        Workload::Network,
    ];

    /// The workload's name in flags and reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Startup => "startup",
            Workload::Cpu => "cpu",
            Workload::Memory => "memory",
            Workload::Syscalls => "syscalls",
            Workload::Fileio => "fileio",
            Workload::Density => "density",
            Workload::Network => "network",
        }
    }
}

/// Sizes and repetitions of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `--quick`.
    pub quick: bool,
    /// Serial start-up repetitions.
    pub startup_reps: usize,
    /// Parallel start-up: the values of N.
    pub parallel: Vec<usize>,
    /// Repetitions of each parallel start-up case.
    pub parallel_reps: usize,
    /// `ExecSync`s of `true` into each CRI start-up pod's running container (each a sample of
    /// the exec-latency row).
    pub exec_reps: usize,
    /// Repetitions of the throughput workloads.
    pub reps: usize,
    /// Whether sysbench and fio run (the `--quick` run leaves them out: see
    /// [`crate::report::QUICK_NOTE`]).
    pub tools: bool,
    /// `sysbench --time` in seconds.
    pub sysbench_s: u32,
    /// MiB hashed by the pure-compute probe (SHA-256, no system calls).
    pub compute_mib: u64,
    /// Idle containers started at once by the density workload.
    pub density_batch: usize,
    /// Page-fault allocation: MiB per round and rounds.
    pub fault_mib: u64,
    /// Rounds of the page-fault allocation.
    pub fault_rounds: u64,
    /// Syscall loop count.
    pub syscalls: u64,
    /// Time limit of each timed probe loop (page faults, each syscall loop, file creation), s.
    pub probe_s: u64,
    /// fio file size in MiB.
    pub fio_mib: u64,
    /// fio `--runtime` of each job, s.
    pub fio_runtime_s: u64,
    /// Files created by the file-creation probe.
    pub files: u64,
    /// Idle container counts for density, ascending: one set of pods grows through them.
    pub density: Vec<usize>,
    /// Repetitions of density.
    pub density_reps: usize,
    /// `iperf3 --time` of each direction, s.
    pub iperf3_s: u32,
    /// Timed TCP round trips per pod (at most; see `round_trip_s`).
    pub round_trips: u64,
    /// Time limit of the round trips, s.
    pub round_trip_s: u64,
    /// Base time budget of one case (a metric's runs under every runtime), scaled per workload
    /// by [`Plan::budget`]: no new round (one run per runtime) starts after it is spent, but
    /// every case gets one round. This bounds the run when a runtime is slow (a VM per
    /// container on emulated KVM); fewer samples then show as a smaller `n`.
    pub case_budget: Duration,
}

impl Plan {
    /// The time budget of one case of workload `w`: the base budget scaled by what one round
    /// costs (a start-up case is one container per runtime, a file I/O round a dozen fio jobs).
    pub fn budget(&self, w: Workload) -> Duration {
        let scale = match w {
            Workload::Startup => 0.5,
            Workload::Cpu | Workload::Memory => 1.0,
            Workload::Syscalls => 0.75,
            Workload::Fileio => 1.5,
            // One round: its pods are the expensive part, and their PSS varies little.
            Workload::Density => 0.0,
            // A pod per runtime and round, iperf3 loaded in it (slow in a guest here).
            Workload::Network => 1.0,
        };
        self.case_budget.mul_f64(scale)
    }

    /// The default plan (under 20 minutes here with Nutshell on emulated KVM) or the `--quick`
    /// one (one round of everything, under 3).
    pub fn new(quick: bool) -> Self {
        if quick {
            // Every Nutshell container costs ~13 s on emulated KVM: ten of them, one round each.
            Plan {
                quick,
                startup_reps: 1,
                parallel: vec![2],
                parallel_reps: 1,
                exec_reps: 3,
                reps: 1,
                tools: false,
                sysbench_s: 2,
                compute_mib: 256,
                density_batch: 4,
                fault_mib: 64,
                fault_rounds: 2,
                syscalls: 200_000,
                probe_s: 1,
                fio_mib: 4,
                fio_runtime_s: 1,
                files: 300,
                density: vec![1, 2],
                density_reps: 1,
                iperf3_s: 2,
                round_trips: 500,
                round_trip_s: 3,
                case_budget: Duration::ZERO,
            }
        } else {
            Plan {
                quick,
                startup_reps: 4,
                parallel: vec![1, 4, 16],
                parallel_reps: 2,
                exec_reps: 5,
                reps: 5,
                tools: true,
                sysbench_s: 5,
                compute_mib: 1024,
                density_batch: 4,
                fault_mib: 256,
                fault_rounds: 4,
                syscalls: 2_000_000,
                probe_s: 5,
                // fio lays its file out first: at Nutshell's ~1 MiB/s over virtio-fs here,
                // 64 MiB cost minutes per location.
                fio_mib: 8,
                fio_runtime_s: 4,
                files: 2000,
                density: vec![1, 10, 20],
                density_reps: 1,
                iperf3_s: 5,
                round_trips: 5000,
                round_trip_s: 5,
                case_budget: Duration::from_secs(60),
            }
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Sizes and repetitions.
    pub plan: Plan,
    /// Workloads to run (all when empty).
    pub only: Vec<Workload>,
    /// Runtimes in interleaving order; runc first is the baseline.
    pub runtimes: Vec<RuntimeSpec>,
    /// Where built image archives are cached.
    pub cache_dir: PathBuf,
    /// The probe binary put into the workload image.
    pub probe: PathBuf,
    /// Runtimes already known not to be usable (runtime name → why), e.g. a missing guest
    /// kernel; they are reported as not available without a container.
    pub unavailable: BTreeMap<String, String>,
    /// Nutshell's VM template directory, when the benchmark owns it: the report says whether
    /// the warm-up container built a template there.
    pub template_dir: Option<PathBuf>,
}

/// A runtime as the run sees it.
#[derive(Debug)]
struct Runtime {
    spec: RuntimeSpec,
    unavailable: Option<String>,
    /// Seconds the warm-up container took (not counted in any median).
    warmup_s: Option<f64>,
    /// What the warm-up did.
    warmup_note: Option<String>,
}

/// One benchmark run against a private containerd.
#[derive(Debug)]
pub struct Runner {
    config: RunConfig,
    containerd: Containerd,
    ctr: Ctr,
    runtimes: Vec<Runtime>,
    volume: tempfile::TempDir,
    next_id: u64,
    metrics: Vec<MetricResult>,
    case_budget: Duration,
    /// Errors whose process report was printed ([`Runner::record`]).
    reported: std::collections::HashSet<String>,
}

/// Runs `config` from start to end: containerd up, images imported, runtimes checked, the
/// workloads, containerd down.
pub fn run(config: RunConfig) -> Result<Results, RunnerError> {
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let machine = Machine::detect();
    let mut runner = Runner::new(config)?;
    runner.check_runtimes();
    let check = || {
        if nutshell_test_support::containerd::interrupted() {
            return Err(RunnerError::Interrupted);
        }
        Ok(())
    };
    check()?;
    let workloads: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|w| runner.config.runs(*w))
        .collect();
    let mut workload_wall_s = Vec::with_capacity(workloads.len());
    for w in &workloads {
        log::info!(
            "workload {} (budget {:?})",
            w.name(),
            runner.config.plan.budget(*w)
        );
        let t = Instant::now();
        runner.workload(*w);
        check()?;
        let took = t.elapsed().as_secs_f64();
        log::info!("workload {} took {took:.0} s", w.name());
        workload_wall_s.push((w.name().to_owned(), took));
    }
    let runtimes = runner
        .runtimes
        .iter()
        .map(|r| RuntimeStatus {
            name: r.spec.name.clone(),
            runtime_type: r.spec.runtime_type.clone(),
            available: r.unavailable.is_none(),
            reason: r.unavailable.clone(),
            warmup_s: r.warmup_s,
            warmup_note: r.warmup_note.clone(),
        })
        .collect();
    let results = Results {
        machine,
        started_unix,
        wall_s: started.elapsed().as_secs_f64(),
        quick: runner.config.plan.quick,
        workloads: workloads.iter().map(|w| w.name().to_owned()).collect(),
        workload_wall_s,
        runtimes,
        metrics: std::mem::take(&mut runner.metrics),
    };
    drop(runner);
    Ok(results)
}

/// The workload image: busybox plus sysbench, fio and the probe with their libraries.
pub fn tools_image(probe: &Path) -> Result<ImageSpec, ImageError> {
    let sysbench = image::host_binary("sysbench", &["/usr/bin/sysbench"])?;
    let fio = image::host_binary("fio", &["/usr/bin/fio"])?;
    image::with_busybox(ImageSpec::new(TOOLS_IMAGE))?
        .binary(&sysbench, "/usr/bin/sysbench")?
        .binary(&fio, "/usr/bin/fio")?
        .binary(probe, "/usr/bin/nutshell-bench-probe")?
        .dir("/data", 0o1777)?
        .dir("/vol", 0o755)
}

impl RunConfig {
    /// Whether workload `w` is to run.
    pub fn runs(&self, w: Workload) -> bool {
        self.only.is_empty() || self.only.contains(&w)
    }

    /// Whether the run's pods need a CNI network: the CRI start-up row's and the network
    /// workload's (a Nutshell pod on the node's network is refused, so every runtime's CRI
    /// pod gets the same CNI network).
    pub fn needs_cni(&self) -> bool {
        self.runs(Workload::Startup) || self.runs(Workload::Network)
    }
}

impl Runner {
    fn new(config: RunConfig) -> Result<Self, RunnerError> {
        let busybox = image::busybox_image(BUSYBOX_IMAGE)?.tarball(&config.cache_dir)?;
        let tools = tools_image(&config.probe)?.tarball(&config.cache_dir)?;
        let opts = ContainerdOptions {
            runtimes: config.runtimes.clone(),
            // Imported into the CRI's namespace by the CRI start-up row (`CriPods::new`).
            sandbox_image: Some(PAUSE_IMAGE.to_owned()),
            // The CRI pods get a bridge and subnet of the run's own (removed with the
            // containerd).
            cni: config.needs_cni().then(CniNetwork::for_this_process),
            ..ContainerdOptions::default()
        };
        let containerd = Containerd::start(&opts)?;
        let ctr = containerd.ctr();
        for tarball in [&busybox, &tools] {
            ctr.import_image(tarball)?;
        }
        let volume = tempfile::Builder::new()
            .prefix("nutshell-bench-vol-")
            .tempdir()
            .map_err(|source| RunnerError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let runtimes = config
            .runtimes
            .iter()
            .map(|spec| Runtime {
                spec: spec.clone(),
                unavailable: None,
                warmup_s: None,
                warmup_note: None,
            })
            .collect();
        Ok(Runner {
            config,
            containerd,
            ctr,
            runtimes,
            volume,
            next_id: 0,
            metrics: Vec::new(),
            case_budget: Duration::ZERO,
            reported: Default::default(),
        })
    }

    /// Marks runtimes whose shim or binary is missing, or whose first container fails. That
    /// first container is each runtime's warm-up (for Nutshell it builds the VM template when
    /// none is cached): timed and reported, never counted in a median.
    fn check_runtimes(&mut self) {
        for i in 0..self.runtimes.len() {
            let spec = self.runtimes[i].spec.clone();
            let reason = if let Some(known) = self.config.unavailable.get(&spec.name) {
                Some(known.clone())
            } else if let Some(shim) = spec
                .shim_binary_name()
                .filter(|s| find_on_path(s).is_none())
            {
                Some(format!("{shim} is not installed (not on PATH)"))
            } else if let Some(bin) = spec.binary_name.as_ref().filter(|b| !b.is_file()) {
                Some(format!("{} is not installed (not on PATH)", bin.display()))
            } else {
                let id = self.id("warmup", &spec.name);
                let template_dir = self
                    .config
                    .template_dir
                    .clone()
                    .filter(|_| spec.name == "nutshell");
                let before = template_dir.as_deref().map(nutshell::templates);
                let started = Instant::now();
                // A template build boots the guest once: minutes on emulated KVM.
                match self.run_to_end(&spec, BUSYBOX_IMAGE, &id, &["/bin/true"], &[], 600) {
                    Ok(_) => {
                        let s = started.elapsed().as_secs_f64();
                        log::info!("runtime {}: warm-up container took {s:.1} s", spec.name);
                        self.runtimes[i].warmup_s = Some(s);
                        if let (Some(dir), Some(before)) = (&template_dir, &before) {
                            let after = nutshell::templates(dir);
                            self.runtimes[i].warmup_note =
                                Some(nutshell::warmup_note(before, &after).to_owned());
                        }
                        None
                    }
                    Err(e) => Some(format!("its first container failed: {e}")),
                }
            };
            if let Some(r) = &reason {
                log::warn!("runtime {}: not available: {r}", spec.name);
            }
            self.runtimes[i].unavailable = reason;
        }
    }

    fn available(&self) -> Vec<RuntimeSpec> {
        self.runtimes
            .iter()
            .filter(|r| r.unavailable.is_none())
            .map(|r| r.spec.clone())
            .collect()
    }

    fn id(&mut self, what: &str, runtime: &str) -> String {
        self.next_id += 1;
        format!("nb-{what}-{runtime}-{}", self.next_id)
    }

    fn metric(&mut self, workload: Workload, name: &str, unit: &str, higher: bool) -> usize {
        if let Some(i) = self
            .metrics
            .iter()
            .position(|m| m.workload == workload.name() && m.name == name)
        {
            return i;
        }
        self.metrics.push(MetricResult {
            workload: workload.name().to_owned(),
            name: name.to_owned(),
            unit: unit.to_owned(),
            higher_is_better: higher,
            samples: BTreeMap::new(),
            errors: BTreeMap::new(),
            not_supported: None,
        });
        self.metrics.len() - 1
    }

    fn record(&mut self, m: usize, runtime: &str, value: Result<f64, String>) {
        let metric = &mut self.metrics[m];
        match value {
            Ok(v) => metric
                .samples
                .entry(runtime.to_owned())
                .or_default()
                .push(v),
            Err(e) => {
                log::warn!("{} {} under {runtime}: {e}", metric.workload, metric.name);
                // While a hung call still waits: where each shim thread is. Not for a run being
                // interrupted, a row not measured by design, or an error already reported (the
                // CRI case records one failure under each of its three rows).
                let report = !nutshell_test_support::containerd::interrupted()
                    && !e.starts_with("not measured")
                    && self.reported.insert(e.clone());
                metric.errors.entry(runtime.to_owned()).or_default().push(e);
                if report {
                    self.containerd.keep_diagnostics();
                }
            }
        }
    }

    fn workload(&mut self, w: Workload) {
        self.case_budget = self.config.plan.budget(w);
        match w {
            Workload::Startup => self.startup(),
            Workload::Cpu => self.cpu(),
            Workload::Memory => self.memory(),
            Workload::Syscalls => self.syscalls(),
            Workload::Fileio => self.fileio(),
            Workload::Density => self.density(),
            Workload::Network => self.network(),
        }
    }

    /// Runs `run` for every (repetition, runtime) in interleaved order; stops before a new
    /// round once the case's budget is spent.
    fn interleaved(&mut self, reps: usize, mut run: impl FnMut(&mut Self, &RuntimeSpec)) {
        let specs = self.available();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let budget = self.case_budget;
        let started = Instant::now();
        let mut round = 0;
        for (rep, name) in interleave(&names, reps) {
            if nutshell_test_support::containerd::interrupted() {
                break;
            }
            let new_round = rep != round;
            round = rep;
            if new_round && started.elapsed() > budget {
                log::info!(
                    "time budget of {budget:?} spent: {rep} of {reps} repetitions of this case"
                );
                break;
            }
            if let Some(spec) = specs.iter().find(|s| s.name == name) {
                run(self, spec);
            }
        }
    }

    fn startup(&mut self) {
        let serial = self.metric(Workload::Startup, "ctr run to first output", "ms", false);
        let cri = self.metric(
            Workload::Startup,
            "CRI RunPodSandbox to container running",
            "ms",
            false,
        );
        let reps = self.config.plan.startup_reps;
        self.interleaved(reps, |r, spec| {
            let v = r.first_outputs(spec, 1).map(|t| t[0]);
            r.record(serial, &spec.name, v);
        });
        for n in self.config.plan.parallel.clone() {
            let m = self.metric(
                Workload::Startup,
                &format!("{n} in parallel, all first outputs"),
                "ms",
                false,
            );
            let reps = self.config.plan.parallel_reps;
            self.interleaved(reps, |r, spec| {
                let v = r
                    .first_outputs(spec, n)
                    .map(|t| t.iter().copied().fold(0.0, f64::max));
                r.record(m, &spec.name, v);
            });
        }
        let create_start = self.metric(
            Workload::Startup,
            "CRI CreateContainer + StartContainer",
            "ms",
            false,
        );
        let exec = self.metric(
            Workload::Startup,
            "CRI ExecSync of `true` into a running container",
            "ms",
            false,
        );
        self.cri_startup([cri, create_start, exec]);
    }

    /// The CRI start-up row: for each runtime in turn, a pod through containerd's CRI as
    /// kubelet starts one (`RunPodSandbox` with the runtime's name as handler, then
    /// `CreateContainer`, `StartContainer`), timed until `ContainerStatus` says running; then
    /// `CreateContainer` + `StartContainer` alone, and `ExecSync`s of `true` into the running
    /// container (each one a sample of `metrics[2]`); every pod is stopped and removed before
    /// the next.
    fn cri_startup(&mut self, metrics: [usize; 3]) {
        let pods = if self.containerd.cni().is_none() {
            Err("the run's containerd has no CNI network".to_owned())
        } else {
            CriPods::new(&self.containerd, &self.config.cache_dir)
        };
        let mut pods = match pods {
            Ok(pods) => pods,
            Err(e) => {
                for spec in self.available() {
                    for m in metrics {
                        self.record(m, &spec.name, Err(format!("CRI set-up failed: {e}")));
                    }
                }
                return;
            }
        };
        let [running, create_start, exec] = metrics;
        let reps = self.config.plan.startup_reps;
        let exec_reps = self.config.plan.exec_reps;
        self.interleaved(reps, |r, spec| {
            let name = r.id("cri", &spec.name);
            match pods.start_to_running(&name, &spec.name, exec_reps) {
                Ok(times) => {
                    r.record(running, &spec.name, Ok(times.running_ms));
                    r.record(create_start, &spec.name, Ok(times.create_start_ms));
                    for v in times.exec_ms {
                        r.record(exec, &spec.name, v);
                    }
                }
                Err(e) => {
                    for m in metrics {
                        r.record(m, &spec.name, Err(e.clone()));
                    }
                }
            }
        });
    }

    fn cpu(&mut self) {
        let plan = self.config.plan.clone();
        let sysbench = plan
            .tools
            .then(|| self.metric(Workload::Cpu, "sysbench cpu (1 thread)", "events/s", true));
        let compute = self.metric(
            Workload::Cpu,
            "SHA-256, no syscalls (container clock)",
            "MiB/s",
            true,
        );
        // One container per round: a Nutshell container start costs more than either run here.
        // The SHA-256 probe is timed by the container's own clock: timing it on the host
        // between marker lines does not work for Nutshell, whose output reached the host in
        // one piece at the end.
        let mut script = format!("nutshell-bench-probe compute {}", plan.compute_mib);
        if plan.tools {
            script = format!(
                "sysbench cpu --cpu-max-prime=10000 --threads=1 --time={} run && {script}",
                plan.sysbench_s
            );
        }
        self.interleaved(plan.reps, |r, spec| {
            let out = r.tools(spec, "cpu", &["sh", "-c", &script], &[], 300);
            if let Some(m) = sysbench {
                r.record_parsed(m, &spec.name, &out, parse::sysbench_cpu_events_per_s);
            }
            r.record_parsed(compute, &spec.name, &out, |o| {
                parse::probe_value(o, "compute_mib_per_s")
            });
        });
    }

    fn memory(&mut self) {
        let plan = self.config.plan.clone();
        let sysbench = plan.tools.then(|| {
            self.metric(
                Workload::Memory,
                "sysbench memory (1 MiB blocks)",
                "MiB/s",
                true,
            )
        });
        let faults = self.metric(Workload::Memory, "page-fault allocation", "faults/s", true);
        let mut script = format!(
            "nutshell-bench-probe faults {} {} {}",
            plan.fault_mib, plan.fault_rounds, plan.probe_s
        );
        if plan.tools {
            script = format!(
                "sysbench memory --memory-block-size=1M --memory-total-size=1000G --threads=1 \
                 --time={} run && {script}",
                plan.sysbench_s
            );
        }
        self.interleaved(plan.reps, |r, spec| {
            let out = r.tools(spec, "mem", &["sh", "-c", &script], &[], 300);
            if let Some(m) = sysbench {
                r.record_parsed(m, &spec.name, &out, parse::sysbench_memory_mib_per_s);
            }
            r.record_parsed(faults, &spec.name, &out, |o| {
                parse::probe_value(o, "faults_per_s")
            });
        });
    }

    fn syscalls(&mut self) {
        let getpid = self.metric(Workload::Syscalls, "getpid loop", "calls/s", true);
        let read = self.metric(
            Workload::Syscalls,
            "1-byte read of /dev/zero",
            "calls/s",
            true,
        );
        let plan = self.config.plan.clone();
        let (count, secs) = (plan.syscalls.to_string(), plan.probe_s.to_string());
        self.interleaved(plan.reps, |r, spec| {
            let args = ["nutshell-bench-probe", "syscalls", &count, &secs];
            let out = r.tools(spec, "sys", &args, &[], 300);
            r.record_parsed(getpid, &spec.name, &out, |o| {
                parse::probe_value(o, "getpid_per_s")
            });
            r.record_parsed(read, &spec.name, &out, |o| {
                parse::probe_value(o, "read_per_s")
            });
        });
    }

    /// fio (sequential and random reads and writes) and file creation, on the container's
    /// rootfs and on a bind-mounted host directory, all in one container per round; fio runs
    /// once for both (its start-up alone costs over a minute in a Nutshell guest here).
    fn fileio(&mut self) {
        let plan = self.config.plan.clone();
        let volume = self.volume.path().to_string_lossy().into_owned();
        let locations = [("rootfs", "/data"), ("volume", "/vol")];
        let jobs = [
            ("seqwrite", "sequential write 1 MiB", "MiB/s"),
            ("seqread", "sequential read 1 MiB", "MiB/s"),
            ("randwrite", "random write 4 KiB", "IOPS"),
            ("randread", "random read 4 KiB", "IOPS"),
        ];
        let mut metrics = Vec::new();
        for (loc, _) in locations {
            let mut job_metrics = Vec::new();
            if plan.tools {
                for (job, label, unit) in jobs {
                    job_metrics.push((
                        format!("{loc}-{job}"),
                        job,
                        self.metric(Workload::Fileio, &format!("{loc}: {label}"), unit, true),
                    ));
                }
            }
            let create = self.metric(
                Workload::Fileio,
                &format!("{loc}: create 4 KiB files"),
                "files/s",
                true,
            );
            metrics.push((job_metrics, create));
        }
        let mut script = String::from("set -e");
        if plan.tools {
            // Every job after the first waits for the one before (stonewall): one at a time.
            let mut fio = format!(
                "fio --output-format=json --size={}M --runtime={} --ioengine=psync",
                plan.fio_mib, plan.fio_runtime_s
            );
            for (loc, dir) in locations {
                let file = format!("--directory={dir} --filename=fio.dat");
                fio += &format!(
                    " --name={loc}-seqwrite {file} --stonewall --rw=write --bs=1M --end_fsync=1 \
                     --name={loc}-seqread {file} --stonewall --rw=read --bs=1M \
                     --name={loc}-randwrite {file} --stonewall --rw=randwrite --bs=4k \
                     --end_fsync=1 \
                     --name={loc}-randread {file} --stonewall --rw=randread --bs=4k --unlink=1"
                );
            }
            script += &format!("; echo '{}fio'; {fio}", parse::SECTION_MARKER);
        }
        for (loc, dir) in locations {
            script += &format!(
                "; echo '{}files {loc}'; nutshell-bench-probe files {dir} {} {}",
                parse::SECTION_MARKER,
                plan.files,
                plan.probe_s,
            );
        }
        let mount = format!("type=bind,src={volume},dst=/vol,options=rbind:rw");
        self.interleaved(plan.reps, |r, spec| {
            let out = r.tools(spec, "fileio", &["sh", "-c", &script], &[&mount], 600);
            let fio_jobs = out.as_deref().map_err(String::clone).and_then(|o| {
                parse::section(o, "fio")
                    .and_then(parse::fio_jobs)
                    .map_err(|e| e.to_string())
            });
            for ((loc, _), (job_metrics, create)) in locations.iter().zip(&metrics) {
                for (name, job, m) in job_metrics {
                    let v = fio_jobs.as_ref().map_err(String::clone).and_then(|jobs| {
                        jobs.iter()
                            .find(|j| j.name == *name)
                            .map(|j| match *job {
                                "seqwrite" => j.write_mib_s,
                                "seqread" => j.read_mib_s,
                                "randwrite" => j.write_iops,
                                _ => j.read_iops,
                            })
                            .ok_or_else(|| format!("fio job {name} missing"))
                    });
                    r.record(*m, &spec.name, v);
                }
                let files_section = format!("files {loc}");
                r.record_parsed(*create, &spec.name, &out, |o| {
                    parse::section(o, &files_section)
                        .and_then(|t| parse::probe_value(t, "create_per_s"))
                });
            }
        });
    }

    /// Host PSS per idle container: one set of idle containers per runtime grows through the
    /// plan's counts (1, then 10, then 20), measured at each, then removed.
    fn density(&mut self) {
        let plan = self.config.plan.clone();
        let metrics: Vec<(usize, usize)> = plan
            .density
            .iter()
            .map(|&k| {
                let m = self.metric(
                    Workload::Density,
                    &format!("{k} idle: host PSS per container"),
                    "MiB",
                    false,
                );
                (k, m)
            })
            .collect();
        self.interleaved(plan.density_reps, |r, spec| {
            let mut ids = Vec::new();
            for &(k, m) in &metrics {
                let v = r
                    .grow_idle(spec, &mut ids, k)
                    .and_then(|()| r.idle_pss_mib());
                let failed = v.is_err();
                r.record(m, &spec.name, v.map(|total| total / k as f64));
                if failed {
                    // The larger counts would measure a set that is not what they say.
                    for &(k2, m2) in metrics.iter().filter(|(k2, _)| *k2 > k) {
                        r.record(
                            m2,
                            &spec.name,
                            Err(format!("not measured: {k} idle failed before {k2}")),
                        );
                    }
                    break;
                }
            }
            r.remove_all(&ids);
        });
    }

    /// Starts idle containers (`sleep`, no stdio) until `ids` has `k`, a batch at a time.
    fn grow_idle(
        &mut self,
        spec: &RuntimeSpec,
        ids: &mut Vec<String>,
        k: usize,
    ) -> Result<(), String> {
        let batch = self.config.plan.density_batch.max(1);
        while ids.len() < k {
            let mut waits = Vec::new();
            for _ in 0..batch.min(k - ids.len()) {
                let id = self.id("idle", &spec.name);
                ids.push(id.clone());
                let mut cmd = self.ctr.command();
                // No stdio: an idle container prints nothing, and the figure is the
                // container's cost, not that of copying its output.
                cmd.args(["run", "-d", "--null-io"])
                    .args(spec.ctr_run_args())
                    .args([BUSYBOX_IMAGE, &id, "/bin/sleep", "3600"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                let child = cmd.spawn().map_err(|e| format!("ctr: {e}"))?;
                waits.push(std::thread::spawn(move || {
                    wait_child(child, Duration::from_secs(300))
                }));
            }
            for w in waits {
                let (status, _, stderr) =
                    w.join()
                        .unwrap_or((None, String::new(), "waiter panicked".to_owned()));
                match status {
                    Some(true) => {}
                    Some(false) => {
                        return Err(format!("ctr run -d failed: {}", last_line(&stderr, "")))
                    }
                    None => return Err("ctr run -d timed out after 300 s".to_owned()),
                }
            }
        }
        Ok(())
    }

    /// PSS of every shim's process tree in the namespace (MiB), once the shims settled.
    fn idle_pss_mib(&self) -> Result<f64, String> {
        // Let the shims settle (lazy allocations, page cache) before measuring.
        std::thread::sleep(Duration::from_secs(2));
        let shims = shim_pids(self.containerd.address(), self.containerd.namespace());
        if shims.is_empty() {
            return Err("no shim process found".to_owned());
        }
        let kib: u64 = process_tree(&shims)
            .iter()
            .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
            .filter_map(|text| parse::smaps_rollup_pss_kib(&text).ok())
            .sum();
        Ok(kib as f64 / 1024.0)
    }

    /// Removes containers, a batch at a time in parallel (a Nutshell VM's shutdown is guest
    /// work; one at a time, 20 of them took minutes).
    fn remove_all(&self, ids: &[String]) {
        for chunk in ids.chunks(self.config.plan.density_batch.max(1)) {
            std::thread::scope(|scope| {
                for id in chunk {
                    let ctr = self.ctr.clone();
                    scope.spawn(move || ctr.remove_container(id));
                }
            });
        }
    }

    /// Records what `parse` finds in a run's output, or the run's error.
    fn record_parsed(
        &mut self,
        m: usize,
        runtime: &str,
        out: &Result<String, String>,
        parse: impl FnOnce(&str) -> Result<f64, parse::ParseError>,
    ) {
        let v = out
            .as_deref()
            .map_err(String::clone)
            .and_then(|o| parse(o).map_err(|e| e.to_string()));
        self.record(m, runtime, v);
    }

    /// Runs `args` in the workload image to completion; its standard output.
    fn tools(
        &mut self,
        spec: &RuntimeSpec,
        what: &str,
        args: &[&str],
        mounts: &[&str],
        timeout_s: u64,
    ) -> Result<String, String> {
        let id = self.id(what, &spec.name);
        self.run_to_end(spec, TOOLS_IMAGE, &id, args, mounts, timeout_s)
    }

    fn run_to_end(
        &self,
        spec: &RuntimeSpec,
        image: &str,
        id: &str,
        args: &[&str],
        mounts: &[&str],
        timeout_s: u64,
    ) -> Result<String, String> {
        let mut cmd = self.ctr.command();
        cmd.args(["run", "--rm"]).args(spec.ctr_run_args());
        for m in mounts {
            cmd.args(["--mount", m]);
        }
        cmd.args([image, id])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|e| format!("ctr: {e}"))?;
        let (status, stdout, stderr) = wait_child(child, Duration::from_secs(timeout_s));
        match status {
            Some(true) => Ok(stdout),
            Some(false) => {
                self.ctr.remove_container(id);
                Err(format!(
                    "exited with an error: {}",
                    last_line(&stderr, &stdout)
                ))
            }
            None => {
                self.ctr.remove_container(id);
                Err(format!("timed out after {timeout_s} s"))
            }
        }
    }

    /// Starts `n` `ctr run --rm … echo ready` at once; each one's time to its first output (ms).
    fn first_outputs(&mut self, spec: &RuntimeSpec, n: usize) -> Result<Vec<f64>, String> {
        // Bounded by n: 16 Nutshell VMs at once take about 150 s here (two at a time through
        // the shim's start slots, ~19 s a pair).
        let timeout = Duration::from_secs(60 + 15 * n as u64);
        let ids: Vec<String> = (0..n).map(|_| self.id("start", &spec.name)).collect();
        let (tx, rx) = mpsc::channel();
        let start = Instant::now();
        let mut children = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let mut cmd = self.ctr.command();
            cmd.args(["run", "--rm"])
                .args(spec.ctr_run_args())
                .args([BUSYBOX_IMAGE, id, "/bin/echo", "ready"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    kill_all(&mut children);
                    return Err(format!("ctr: {e}"));
                }
            };
            if let Some(mut out) = child.stdout.take() {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut byte = [0u8; 1];
                    let first = matches!(out.read(&mut byte), Ok(1));
                    let _ = tx.send((i, first.then(|| start.elapsed())));
                    let _ = std::io::copy(&mut out, &mut std::io::sink());
                });
            }
            children.push(child);
        }
        drop(tx);
        let mut times = vec![None; n];
        let mut error = None;
        for _ in 0..n {
            match rx.recv_timeout(timeout.saturating_sub(start.elapsed())) {
                Ok((i, Some(t))) => times[i] = Some(t.as_secs_f64() * 1000.0),
                Ok((_, None)) => error = Some("a container printed nothing".to_owned()),
                Err(_) => {
                    error = Some(format!("no first output within {timeout:?}"));
                    break;
                }
            }
        }
        for (child, id) in children.iter_mut().zip(&ids) {
            let remaining = timeout
                .saturating_sub(start.elapsed())
                .max(Duration::from_secs(5));
            let deadline = Instant::now() + remaining;
            let ok = loop {
                match child.try_wait() {
                    Ok(Some(s)) => break s.success(),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break false;
                    }
                }
            };
            if !ok {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                self.ctr.remove_container(id);
                error.get_or_insert_with(|| format!("ctr run failed: {}", last_line(&err, "")));
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(times.into_iter().map(|t| t.unwrap_or(f64::NAN)).collect()),
        }
    }
}

/// Where the cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Pods through the private containerd's CRI: the images in the CRI's namespace, a client, a
/// log directory and a cgroup parent of their own. On drop, every pod still there is stopped
/// and removed, and the (then empty) cgroup parent too.
struct CriPods {
    client: CriClient,
    log_dir: tempfile::TempDir,
    cgroup_parent: String,
}

impl CriPods {
    /// Imports the busybox and pause images into the CRI's namespace, connects and waits until
    /// the CRI sees both images (it learns about imports from containerd's events).
    fn new(containerd: &Containerd, cache_dir: &Path) -> Result<Self, String> {
        let busybox = image::busybox_image(BUSYBOX_IMAGE)
            .and_then(|i| i.tarball(cache_dir))
            .map_err(|e| error_chain(&e))?;
        let pause = image::busybox_image(PAUSE_IMAGE)
            .map(|i| i.cmd(&["/bin/sleep", "2147483647"]))
            .and_then(|i| i.tarball(cache_dir))
            .map_err(|e| error_chain(&e))?;
        let ctr = containerd.ctr_in(CRI_NAMESPACE);
        for tarball in [&busybox, &pause] {
            ctr.import_image(tarball).map_err(|e| error_chain(&e))?;
        }
        let log_dir = tempfile::Builder::new()
            .prefix("nutshell-bench-pods-")
            .tempdir()
            .map_err(|e| format!("pod log directory: {e}"))?;
        let mut client = CriClient::connect(containerd.address()).map_err(|e| error_chain(&e))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = client
                .image_present(BUSYBOX_IMAGE)
                .map_err(|e| error_chain(&e))?
                && client
                    .image_present(PAUSE_IMAGE)
                    .map_err(|e| error_chain(&e))?;
            if seen {
                break;
            }
            if Instant::now() > deadline {
                return Err("the CRI does not see the imported images after 60 s".to_owned());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(CriPods {
            client,
            log_dir,
            cgroup_parent: format!("nutshell-bench-cri-{}", std::process::id()),
        })
    }

    /// Imports the image archive `tarball` (named `name`) into the CRI's namespace and waits
    /// until the CRI sees it.
    fn add_image(
        &mut self,
        containerd: &Containerd,
        tarball: &Path,
        name: &str,
    ) -> Result<(), String> {
        containerd
            .ctr_in(CRI_NAMESPACE)
            .import_image(tarball)
            .map_err(|e| error_chain(&e))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self
            .client
            .image_present(name)
            .map_err(|e| error_chain(&e))?
        {
            if Instant::now() > deadline {
                return Err(format!("the CRI does not see {name} after 60 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// A pod under `handler` on the CNI network (a network namespace of its own), its one
    /// container running `command` in `image`; returns once the container is running. A pod
    /// that failed on the way is removed.
    fn start_on_pod_network(
        &mut self,
        name: &str,
        handler: &str,
        image: &str,
        command: &[String],
    ) -> Result<network::NetPod, String> {
        let pod_cfg = cri_pod_config(name, self.log_dir.path(), &self.cgroup_parent);
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        let app_cfg = cri::container_config("server", image, &command, &format!("{name}.log"));
        let started = Instant::now();
        let id = match self.client.run_pod_sandbox(&pod_cfg, handler) {
            Ok(id) => id,
            Err(e) => {
                // A sandbox containerd left (a timeout on our side) is removed too.
                let _ = self.remove_all();
                return Err(error_chain(&e));
            }
        };
        let up = (|| {
            let net = self.client.pod_network(&id).map_err(|e| error_chain(&e))?;
            let ip: std::net::Ipv4Addr = net
                .ip
                .parse()
                .map_err(|e| format!("the pod's IP {:?}: {e}", net.ip))?;
            let ctr = self
                .client
                .create_container(&id, &app_cfg, &pod_cfg)
                .map_err(|e| error_chain(&e))?;
            self.client
                .start_container(&ctr)
                .map_err(|e| error_chain(&e))?;
            self.client
                .wait_state(
                    &ctr,
                    cri::ContainerState::ContainerRunning,
                    Duration::from_secs(300),
                    Duration::from_millis(20),
                )
                .map_err(|e| error_chain(&e))?;
            Ok::<_, String>(ip)
        })();
        match up {
            Ok(ip) => {
                log::info!(
                    "network pod {name} under {handler}: {ip}, running after {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                Ok(network::NetPod { id, ip })
            }
            Err(e) => {
                if let Err(r) = self.remove(&id) {
                    log::warn!("network pod {name} could not be removed: {r}");
                }
                Err(e)
            }
        }
    }

    /// One pod under `handler`: milliseconds from `RunPodSandbox` until its container is
    /// running, then `exec_reps` `ExecSync`s of `true` into it, each timed. The pod is stopped
    /// and removed afterwards, also when a step failed; a pod that cannot be removed makes the
    /// sample an error.
    fn start_to_running(
        &mut self,
        name: &str,
        handler: &str,
        exec_reps: usize,
    ) -> Result<CriTimes, String> {
        let pod_cfg = cri_pod_config(name, self.log_dir.path(), &self.cgroup_parent);
        let app_cfg = cri::container_config(
            "app",
            BUSYBOX_IMAGE,
            &["sh", "-c", "echo ready; exec sleep 3600"],
            &format!("{name}-app.log"),
        );
        let started = Instant::now();
        let pod = self
            .client
            .run_pod_sandbox(&pod_cfg, handler)
            .map_err(|e| error_chain(&e));
        let sandbox_ms = ms(started.elapsed());
        let measured = pod.clone().and_then(|pod| {
            let id = self
                .client
                .create_container(&pod, &app_cfg, &pod_cfg)
                .map_err(|e| error_chain(&e))?;
            let created_ms = ms(started.elapsed());
            self.client
                .start_container(&id)
                .map_err(|e| error_chain(&e))?;
            let started_ms = ms(started.elapsed());
            self.client
                .wait_state(
                    &id,
                    cri::ContainerState::ContainerRunning,
                    Duration::from_secs(300),
                    Duration::from_millis(5),
                )
                .map_err(|e| error_chain(&e))?;
            let running_ms = ms(started.elapsed());
            log::info!(
                "CRI pod {name} under {handler}: sandbox ready at {sandbox_ms:.0} ms, container \
                 created at {created_ms:.0} ms, started at {started_ms:.0} ms, running at \
                 {running_ms:.0} ms"
            );
            let exec_ms = (0..exec_reps)
                .map(|_| self.exec_true(&id))
                .collect::<Vec<_>>();
            log::info!("CRI pod {name} under {handler}: ExecSync of true: {exec_ms:.0?} ms");
            Ok(CriTimes {
                running_ms,
                create_start_ms: started_ms - sandbox_ms,
                exec_ms,
            })
        });
        let removed = match &pod {
            Ok(pod) => self.remove(pod),
            // RunPodSandbox failed: containerd cleans up after itself, but a sandbox it left
            // (a timeout on our side) is removed too.
            Err(_) => self.remove_all(),
        };
        match (measured, removed) {
            (Ok(v), Ok(())) => Ok(v),
            (Err(e), _) => Err(e),
            (Ok(v), Err(e)) => Err(format!(
                "running after {:.0} ms, but the pod could not be removed: {e}",
                v.running_ms
            )),
        }
    }

    /// Milliseconds of one `ExecSync` of `true` into the running container `id`; a non-zero
    /// exit is an error.
    fn exec_true(&mut self, id: &str) -> Result<f64, String> {
        let started = Instant::now();
        let result = self
            .client
            .exec_sync(id, &["true"], Duration::from_secs(120))
            .map_err(|e| error_chain(&e))?;
        let took = ms(started.elapsed());
        match result.exit_code {
            0 => Ok(took),
            code => Err(format!(
                "ExecSync of true exited with {code}: {}",
                String::from_utf8_lossy(&result.stderr)
            )),
        }
    }

    /// `StopPodSandbox` (stops its containers), then `RemovePodSandbox`.
    fn remove(&mut self, pod: &str) -> Result<(), String> {
        let stopped = self.client.stop_pod_sandbox(pod);
        let removed = self.client.remove_pod_sandbox(pod);
        stopped.and(removed).map_err(|e| error_chain(&e))
    }

    /// Stops and removes every pod the CRI knows of (they are all ours: the containerd is).
    fn remove_all(&mut self) -> Result<(), String> {
        let pods = self
            .client
            .list_pod_sandboxes()
            .map_err(|e| error_chain(&e))?;
        let mut result = Ok(());
        for pod in pods {
            log::info!("removing CRI pod {pod}");
            if let Err(e) = self.remove(&pod) {
                result = Err(e);
            }
        }
        result
    }
}

impl Drop for CriPods {
    fn drop(&mut self) {
        if let Err(e) = self.remove_all() {
            log::warn!("CRI pods left behind: {e}");
        }
        remove_namespace_cgroups(Path::new(CGROUP_ROOT), &self.cgroup_parent);
    }
}

/// The times of one CRI start-up pod, in milliseconds.
#[derive(Debug)]
struct CriTimes {
    /// From `RunPodSandbox` until the container is running.
    running_ms: f64,
    /// `CreateContainer` and `StartContainer` (from the sandbox ready to `StartContainer`
    /// returned).
    create_start_ms: f64,
    /// Each `ExecSync` of `true` into the running container.
    exec_ms: Vec<Result<f64, String>>,
}

/// A benchmark pod: on the run's CNI network (a network namespace of its own, which the CRI
/// gives the CNI plugins: every runtime's pod starts with the same network set-up, as under
/// kubelet) and under `cgroup_parent`, as kubelet puts every pod under a parent cgroup
/// (containerd then gives the sandbox `linux.cgroupsPath`); its own UTS namespace too, so it
/// keeps its hostname.
fn cri_pod_config(name: &str, log_dir: &Path, cgroup_parent: &str) -> cri::PodSandboxConfig {
    let mut pod = cri::pod_config(name, &format!("uid-{name}"), log_dir);
    if let Some(linux) = pod.linux.as_mut() {
        linux.cgroup_parent = format!("/{cgroup_parent}");
    }
    pod
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

use nutshell_protocol::error_chain;

fn kill_all(children: &mut [Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits for `child` up to `timeout` (killing it then); (success, stdout, stderr), success
/// `None` on timeout.
fn wait_child(mut child: Child, timeout: Duration) -> (Option<bool>, String, String) {
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let mut buf = Vec::new();
                let _ = p.read_to_end(&mut buf);
                s = String::from_utf8_lossy(&buf).into_owned();
            }
            s
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s.success()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    (status, stdout, stderr)
}

fn last_line(stderr: &str, stdout: &str) -> String {
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    text.trim()
        .lines()
        .last()
        .unwrap_or("(no output)")
        .chars()
        .take(300)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_bounded() {
        let quick = Plan::new(true);
        let full = Plan::new(false);
        assert!(quick.reps < full.reps && quick.sysbench_s < full.sysbench_s);
        assert_eq!(full.parallel, [1, 4, 16]);
        assert_eq!(full.density, [1, 10, 20]);
        // One set of idle pods grows through the counts.
        for plan in [&quick, &full] {
            assert!(plan.density.windows(2).all(|w| w[0] < w[1]), "{plan:?}");
        }
        // Quick: one round of every case; the full plan's start-up cases a few.
        assert_eq!(quick.budget(Workload::Startup), Duration::ZERO);
        assert!(full.budget(Workload::Startup) > Duration::ZERO);
        assert_eq!(full.budget(Workload::Density), Duration::ZERO);
    }

    #[test]
    fn cri_pods_get_a_network_namespace_of_their_own() {
        let pod = cri_pod_config("nb-net-runc-4", Path::new("/l"), "parent-8");
        assert_eq!(pod.hostname, "nb-net-runc-4");
        assert_eq!(pod.log_directory, "/l");
        assert_eq!(
            pod.metadata.as_ref().map(|m| m.uid.as_str()),
            Some("uid-nb-net-runc-4")
        );
        let linux = pod.linux.as_ref().unwrap();
        assert_eq!(linux.cgroup_parent, "/parent-8");
        let ns = linux
            .security_context
            .as_ref()
            .unwrap()
            .namespace_options
            .as_ref()
            .unwrap();
        assert_eq!(ns.network(), cri::api::NamespaceMode::Pod);
        assert_eq!(ns.pid(), cri::api::NamespaceMode::Pod);
    }

    #[test]
    fn the_cri_start_up_row_and_the_network_workload_need_a_cni_network() {
        let config = |only: Vec<Workload>| RunConfig {
            plan: Plan::new(true),
            only,
            runtimes: vec![RuntimeSpec::runc()],
            cache_dir: PathBuf::from("/c"),
            probe: PathBuf::from("/p"),
            unavailable: BTreeMap::new(),
            template_dir: None,
        };
        assert!(config(vec![]).runs(Workload::Network));
        assert!(config(vec![Workload::Network]).runs(Workload::Network));
        assert!(!config(vec![Workload::Cpu]).runs(Workload::Network));
        assert!(config(vec![]).needs_cni());
        assert!(config(vec![Workload::Startup]).needs_cni());
        assert!(config(vec![Workload::Network]).needs_cni());
        assert!(!config(vec![Workload::Cpu, Workload::Memory]).needs_cni());
        assert_eq!(Workload::ALL.last(), Some(&Workload::Network));
        assert_eq!(Workload::Network.name(), "network");
    }

    #[test]
    fn error_chains_print_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }

    #[test]
    fn cri_set_up_failure_names_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("absent.sock");
        let e = CriClient::connect(&socket).unwrap_err();
        let text = error_chain(&e);
        assert!(
            text.starts_with("cannot connect to the CRI socket"),
            "{text}"
        );
        assert!(text.contains("absent.sock"), "{text}");
    }
}

//! The results of a run and their report: Markdown table, raw JSON, SVG plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use crate::stats::{ratio, summarize, Summary};

/// What a `--quick` report says it left out.
pub const QUICK_NOTE: &str = "A `--quick` run leaves out sysbench and fio (their rows are not in \
    it): in a Nutshell guest whose kernel mode is emulated, loading them (dynamic linking, \
    thousands of page faults) takes 40-90 s per container. The default run has them.";

/// The baseline every ratio is taken against.
pub const BASELINE: &str = "runc";

/// Errors of writing the report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A report file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error("cannot draw {path}: {reason}")]
    Plot {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// The machine a run ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// Host kernel release.
    pub kernel: String,
    /// `hardware`, `emulated (kvm_pvm)` or `none`.
    pub kvm: String,
    /// The 1, 5 and 15 minute load averages when the run started (other work on the machine
    /// widens the ranges).
    pub load_avg: String,
}

impl Machine {
    /// Reads the machine's description from `/proc` and `/sys`.
    pub fn detect() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpu: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".to_owned()),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib: mem_total_kib(&meminfo).unwrap_or(0) as f64 / (1024.0 * 1024.0),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned()),
            kvm: kvm_kind(
                Path::new("/sys/module/kvm_pvm").exists(),
                Path::new("/dev/kvm").exists(),
            )
            .to_owned(),
            load_avg: fs::read_to_string("/proc/loadavg")
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
        }
    }

    /// True when KVM's ring 0 is emulated (`kvm_pvm`).
    pub fn emulated_kvm(&self) -> bool {
        self.kvm.starts_with("emulated")
    }

    /// One line: CPU, cores, memory, kernel, KVM, load.
    pub fn line(&self) -> String {
        format!(
            "{}, {} cores, {:.1} GiB, Linux {}, KVM: {}; load average at start {}",
            self.cpu, self.cores, self.memory_gib, self.kernel, self.kvm, self.load_avg
        )
    }
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM UTC` (civil-from-days, proleptic Gregorian).
pub fn utc(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60
    )
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// What KVM is here: `kvm_pvm` means guest ring 0 is emulated in software.
pub fn kvm_kind(kvm_pvm: bool, dev_kvm: bool) -> &'static str {
    match (kvm_pvm, dev_kvm) {
        (true, _) => "emulated (kvm_pvm: guest kernel mode is emulated)",
        (false, true) => "hardware",
        (false, false) => "none (/dev/kvm missing)",
    }
}

/// A runtime of the run and whether it could run.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeStatus {
    /// Handler name.
    pub name: String,
    /// Shim runtime type.
    pub runtime_type: String,
    /// Whether its containers ran.
    pub available: bool,
    /// Why not.
    pub reason: Option<String>,
    /// Seconds its warm-up container took (not in any median): for Nutshell the VM template
    /// build when none was cached.
    pub warmup_s: Option<f64>,
    /// What the warm-up did (e.g. "template build").
    pub warmup_note: Option<String>,
}

/// One measured quantity, with raw samples and errors per runtime.
#[derive(Debug, Clone, Serialize)]
pub struct MetricResult {
    /// The workload.
    pub workload: String,
    /// What was measured.
    pub name: String,
    /// Its unit.
    pub unit: String,
    /// Higher is better (throughput) or lower is (time, memory).
    pub higher_is_better: bool,
    /// Raw samples by runtime, in the order they were taken.
    pub samples: BTreeMap<String, Vec<f64>>,
    /// Failed runs by runtime.
    pub errors: BTreeMap<String, Vec<String>>,
    /// Set when the benchmark cannot measure this yet (why): every column says so, and no
    /// figure stands in for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_supported: Option<String>,
}

impl MetricResult {
    /// The summary of one runtime's samples.
    pub fn summary(&self, runtime: &str) -> Option<Summary> {
        summarize(self.samples.get(runtime)?)
    }

    /// Median of `runtime` over the median of runc.
    pub fn ratio(&self, runtime: &str) -> Option<f64> {
        ratio(
            self.summary(runtime)?.median,
            self.summary(BASELINE)?.median,
        )
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The machine.
    pub machine: Machine,
    /// Start, seconds since the epoch.
    pub started_unix: u64,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
    /// Whether it was a `--quick` run.
    pub quick: bool,
    /// The workloads that ran.
    pub workloads: Vec<String>,
    /// Wall time of each workload that ran, seconds, in run order.
    pub workload_wall_s: Vec<(String, f64)>,
    /// The runtimes, available or not.
    pub runtimes: Vec<RuntimeStatus>,
    /// Every metric.
    pub metrics: Vec<MetricResult>,
}

fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 0.1 || a == 0.0 || !a.is_finite() {
        format!("{v:.2}")
    } else {
        significant(v)
    }
}

/// `v` (below 0.1) with two significant digits: 0.0123 → `0.012`, not `0.01`.
fn significant(v: f64) -> String {
    let decimals = (1 - v.abs().log10().floor() as i32).clamp(2, 12) as usize;
    format!("{v:.decimals$}")
}

/// A ratio as the table shows it: two decimals, or two significant digits below 0.1 (a
/// Nutshell figure a thousand times below runc's is `0.0011×`, not `0.00×`).
fn fmt_ratio(r: f64) -> String {
    if r.abs() >= 0.1 || r == 0.0 || !r.is_finite() {
        format!("{r:.2}×")
    } else {
        format!("{}×", significant(r))
    }
}

impl Results {
    /// The table: one row per metric, for each runtime `median (min–max)` and the ratio to runc;
    /// a runtime that could not run says so in its column.
    pub fn table(&self) -> String {
        let mut s = String::from("| workload | metric | unit |");
        let mut sep = String::from("|---|---|---|");
        for rt in &self.runtimes {
            let _ = write!(s, " {} median (min–max) |", rt.name);
            sep.push_str("---|");
            if rt.name != BASELINE {
                let _ = write!(s, " {} / runc |", rt.name);
                sep.push_str("---|");
            }
        }
        s.push('\n');
        s.push_str(&sep);
        s.push('\n');
        for m in &self.metrics {
            let better = if m.higher_is_better { "↑" } else { "↓" };
            let _ = write!(s, "| {} | {} | {} {better} |", m.workload, m.name, m.unit);
            for rt in &self.runtimes {
                let cell = if !rt.available {
                    "not available".to_owned()
                } else if m.not_supported.is_some() {
                    "not supported yet".to_owned()
                } else if let Some(sum) = m.summary(&rt.name) {
                    let failed = m.errors.get(&rt.name).map_or(0, Vec::len);
                    let mut c = format!(
                        "{} ({}–{}, n={})",
                        fmt_value(sum.median),
                        fmt_value(sum.min),
                        fmt_value(sum.max),
                        sum.n
                    );
                    if failed > 0 {
                        let _ = write!(c, ", {failed} failed");
                    }
                    c
                } else if let Some(e) = m.errors.get(&rt.name).and_then(|e| e.first()) {
                    format!(
                        "failed: {}",
                        e.replace('|', "/").chars().take(80).collect::<String>()
                    )
                } else {
                    "—".to_owned()
                };
                let _ = write!(s, " {cell} |");
                if rt.name != BASELINE {
                    let r = m.ratio(&rt.name).map_or_else(|| "—".to_owned(), fmt_ratio);
                    let _ = write!(s, " {r} |");
                }
            }
            s.push('\n');
        }
        s
    }

    /// The workloads with their wall times where known: `startup (212 s), cpu (80 s)`.
    fn workload_times(&self) -> String {
        self.workloads
            .iter()
            .map(
                |w| match self.workload_wall_s.iter().find(|(name, _)| name == w) {
                    Some((_, s)) => format!("{w} ({s:.0} s)"),
                    None => w.clone(),
                },
            )
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The Markdown report.
    pub fn markdown(&self, plots: &[String]) -> String {
        let mut s = String::from("# Nutshell benchmarks\n\n");
        let _ = writeln!(s, "Machine: {}\n", self.machine.line());
        let _ = writeln!(
            s,
            "Run: {} run, {:.0} s wall, started {}; workloads: {}.\n",
            if self.quick { "`--quick`" } else { "default" },
            self.wall_s,
            utc(self.started_unix),
            self.workload_times()
        );
        if self.quick {
            s.push_str(QUICK_NOTE);
            s.push_str("\n\n");
        }
        s.push_str("## Runtimes\n\n");
        for rt in &self.runtimes {
            match &rt.reason {
                None => {
                    let _ = write!(s, "- **{}** (`{}`): ran", rt.name, rt.runtime_type);
                    match (rt.warmup_s, &rt.warmup_note) {
                        (Some(w), Some(note)) => {
                            let _ = write!(s, "; {note}: {w:.1} s (warm-up, not counted)");
                        }
                        (Some(w), None) => {
                            let _ = write!(s, "; warm-up container: {w:.1} s (not counted)");
                        }
                        _ => {}
                    }
                    s.push('\n');
                }
                Some(r) => {
                    let _ = writeln!(
                        s,
                        "- **{}** (`{}`): not available: {r}",
                        rt.name, rt.runtime_type
                    );
                }
            }
        }
        s.push_str("\n## Results\n\nMedians with min–max and the number of runs n; ↑ higher is better, ↓ lower is better. \
                     Runs were interleaved (A B, B A, A B …) across runtimes; each workload has a time \
                     budget, and a slow runtime gets fewer runs (smaller n) rather than a longer run.\n\n");
        s.push_str(&self.table());
        for m in &self.metrics {
            if let Some(why) = &m.not_supported {
                let _ = write!(
                    s,
                    "\n{} / {}: not supported yet: {why}\n",
                    m.workload, m.name
                );
            }
        }
        if !plots.is_empty() {
            s.push_str(
                "\n## Plots\n\nMedians as a ratio to runc (1.0 = as runc), per workload.\n\n",
            );
            for p in plots {
                let _ = writeln!(s, "![{p}]({p})");
            }
        }
        s.push_str(HOW_TO_READ);
        if self.machine.emulated_kvm() {
            s.push_str(EMULATED_NOTE);
        }
        s
    }

    /// Writes `latest.md`, `latest.json` and one SVG per workload into `dir`; returns the
    /// Markdown path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, ReportError> {
        let write = |path: PathBuf, data: &[u8]| {
            fs::write(&path, data).map_err(|source| ReportError::Write { path, source })
        };
        fs::create_dir_all(dir).map_err(|source| ReportError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        write(dir.join("latest.json"), &json)?;
        let mut plots = Vec::new();
        for w in &self.workloads {
            let name = format!("latest-{w}.svg");
            if self.plot(w, &dir.join(&name))? {
                plots.push(name);
            }
        }
        let md = dir.join("latest.md");
        write(md.clone(), self.markdown(&plots).as_bytes())?;
        Ok(md)
    }

    /// A bar chart of `workload`'s ratios to runc per runtime with min–max whiskers; false when
    /// there is nothing to draw.
    pub fn plot(&self, workload: &str, path: &Path) -> Result<bool, ReportError> {
        let metrics: Vec<&MetricResult> = self
            .metrics
            .iter()
            .filter(|m| m.workload == workload && m.summary(BASELINE).is_some())
            .collect();
        let runtimes: Vec<&str> = self
            .runtimes
            .iter()
            .filter(|r| r.available)
            .map(|r| r.name.as_str())
            .collect();
        if metrics.is_empty() || runtimes.is_empty() {
            return Ok(false);
        }
        let err = |e: &dyn std::fmt::Display| ReportError::Plot {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        // (metric index, runtime index, ratio of median, of min, of max)
        let mut bars = Vec::new();
        let mut top: f64 = 1.2;
        for (mi, m) in metrics.iter().enumerate() {
            let Some(base) = m.summary(BASELINE) else {
                continue;
            };
            for (ri, rt) in runtimes.iter().enumerate() {
                if let Some(sum) = m.summary(rt) {
                    let r = |v: f64| ratio(v, base.median).unwrap_or(0.0);
                    bars.push((mi, ri, r(sum.median), r(sum.min), r(sum.max)));
                    top = top.max(r(sum.max) * 1.1);
                }
            }
        }
        let height = 120 + 40 * metrics.len() as u32;
        let root = SVGBackend::new(path, (900, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let n = metrics.len() as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{workload}: ratio to runc"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(330)
            .build_cartesian_2d(0.0..top, 0.0..n)
            .map_err(|e| err(&e))?;
        let labels: Vec<String> = metrics.iter().map(|m| m.name.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(metrics.len() * 2 + 1)
            .y_label_formatter(&|y| {
                let i = (n - y - 0.5).round();
                if (n - y - 0.5 - i).abs() < 0.01 && i >= 0.0 && (i as usize) < labels.len() {
                    labels[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .x_desc("median / runc median (whiskers: min–max)")
            .draw()
            .map_err(|e| err(&e))?;
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN];
        let slot = 0.8 / runtimes.len() as f64;
        for (mi, ri, med, lo, hi) in &bars {
            let y0 = n - 1.0 - *mi as f64 + 0.1 + slot * *ri as f64;
            let color = colors[ri % colors.len()];
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.0, y0), (*med, y0 + slot * 0.9)],
                    color.mix(0.6).filled(),
                )))
                .map_err(|e| err(&e))?;
            let yc = y0 + slot * 0.45;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(*lo, yc), (*hi, yc)],
                    BLACK.stroke_width(1),
                )))
                .map_err(|e| err(&e))?;
        }
        for (ri, rt) in runtimes.iter().enumerate() {
            let color = colors[ri % colors.len()];
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.0, 0.0), (0.0, 0.0)],
                    color.mix(0.6).filled(),
                )))
                .map_err(|e| err(&e))?
                .label(*rt)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(1.0, 0.0), (1.0, n)],
                BLACK.stroke_width(1),
            )))
            .map_err(|e| err(&e))?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        Ok(true)
    }
}

const HOW_TO_READ: &str = "
## How to read the ratios

Each ratio is the runtime's median over runc's median for the same metric, measured in the same
run with the runs interleaved. Read it with the arrow of its unit:

- **startup** (ms ↓): a ratio of 3 means starting a container to its first output takes three
  times as long as with runc. It includes everything `ctr run` waits for: the shim, for Nutshell
  the VM (restore or boot) and the agent. The parallel rows measure until the last of N
  containers printed. The CRI row times a pod as kubelet starts one, from `RunPodSandbox`
  (the pod's sandbox: runc's pause container, Nutshell's VM) through `CreateContainer` and
  `StartContainer` until `ContainerStatus` says running; it does not wait for output. Its pods
  are on the run's CNI bridge, with the same CNI set-up under every runtime (under runsc,
  `runsc start` also moves the pod's addresses into gVisor's netstack).
- **cpu** (events/s ↑): below 1 means slower compute; guest user mode runs at native speed under
  KVM, so anything far from 1 is overhead worth a look.
- **memory** (MiB/s, faults/s ↑): bandwidth should be near 1; page-fault-heavy allocation
  measures the guest kernel's fault path plus EPT/shadow paging.
- **syscalls** (calls/s ↑): the cost of entering the kernel; for a VM the guest kernel, for
  gVisor its Sentry.
- **fileio** (MiB/s, IOPS, files/s ↑): the rootfs rows go through the container's root
  filesystem (overlayfs for runc, virtio-fs for Nutshell); the volume rows through a bind-mounted
  host directory. Buffered I/O: reads are mostly served by a page cache (the host's for runc, the
  guest's for Nutshell).
- **density** (MiB ↓): host PSS of everything a container costs (the shim's process tree: shim,
  container processes, for Nutshell the VMM with guest memory actually touched), divided by the
  number of idle containers. Above 1 means more memory per container than runc.
- **network** (Gbit/s ↑, µs ↓): TCP between the host and a pod on a CNI bridge of the run's own
  (Debian's `bridge` and `host-local` plugins; the pod's veth for runc, the same veth wired to
  the VM's virtio-net by tc redirects for Nutshell, the veth read and written by gVisor's netstack
  through a packet socket for runsc). Throughput is Debian's `iperf3` (one stream, the host the client) as the
  receiving side counted it, host → pod and pod → host (`--reverse`); the round trips are one
  connection with `TCP_NODELAY`, a 1-byte request and its echo at a time (the probe's echo
  server in the pod), p50 and p99 of one pod's round trips. A ratio below 1 for throughput, or
  above 1 for a round trip, is the cost of the runtime's network path.
";

const EMULATED_NOTE: &str = "
**This machine's KVM is emulated (`kvm_pvm`)**: guest user mode runs at native speed, but every
instruction of the guest kernel is emulated (about 1 µs each). For Nutshell the **cpu** and
**sysbench memory** rows come closest to hardware KVM: they run guest user code (the guest reads
the time through kvm-clock in the vDSO, without a system call; the SHA-256 loop makes no system
call at all), yet even they pay the busy guest's timer tick (20 Hz, ~5 ms of emulated kernel
each, ~10% of the CPU). **startup**, **page-fault**, **syscalls** and **fileio** ratios
are distorted (each guest kernel entry costs milliseconds; loading a dynamically linked program
such as fio costs over a minute of page faults) and say nothing about hardware KVM. **density**
is meaningful for the host processes. **network** is bounded by the guest kernel for Nutshell:
its TCP/IP stack, the virtio-net driver and every interrupt run in emulated ring 0, so its
throughput and round trips measure the emulator, not the VMM's virtio-net path (on hardware KVM
the guest's stack runs natively); runc's figures are the host kernel's veth and bridge. An idle one-vCPU guest is tickless and takes no host CPU;
a guest of more vCPUs keeps its 20 Hz tick here (about 9% of a host CPU each: it boots with
`nopv`, without kvm-clock).
";

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> Results {
        let mut samples = BTreeMap::new();
        samples.insert("runc".to_owned(), vec![100.0, 110.0, 90.0]);
        samples.insert("runsc".to_owned(), vec![200.0, 220.0, 180.0]);
        Results {
            machine: Machine {
                cpu: "Test CPU".into(),
                cores: 2,
                memory_gib: 24.0,
                kernel: "6.1.0".into(),
                kvm: kvm_kind(true, true).into(),
                load_avg: "0.50 0.40 0.30".into(),
            },
            started_unix: 0,
            wall_s: 12.0,
            quick: true,
            workloads: vec!["startup".into()],
            workload_wall_s: vec![("startup".into(), 11.5)],
            runtimes: vec![
                RuntimeStatus {
                    name: "runc".into(),
                    runtime_type: "io.containerd.runc.v2".into(),
                    available: true,
                    reason: None,
                    warmup_s: Some(0.2),
                    warmup_note: None,
                },
                RuntimeStatus {
                    name: "runsc".into(),
                    runtime_type: "io.containerd.runc.v2".into(),
                    available: true,
                    reason: None,
                    warmup_s: Some(0.2),
                    warmup_note: None,
                },
                RuntimeStatus {
                    name: "nutshell".into(),
                    runtime_type: "io.containerd.nutshell.v2".into(),
                    available: false,
                    reason: Some("containerd-shim-nutshell-v2 is not installed".into()),
                    warmup_s: None,
                    warmup_note: None,
                },
            ],
            metrics: vec![MetricResult {
                workload: "startup".into(),
                name: "ctr run to first output".into(),
                unit: "ms".into(),
                higher_is_better: false,
                samples,
                errors: BTreeMap::new(),
                not_supported: None,
            }],
        }
    }

    #[test]
    fn table_has_medians_ranges_ratios_and_unavailable_columns() {
        let t = results().table();
        assert!(t.contains("| 100.0 (90.00–110.0, n=3) |"), "{t}");
        assert!(t.contains("| 200.0 (180.0–220.0, n=3) | 2.00× |"), "{t}");
        assert!(t.contains("| not available | — |"), "{t}");
    }

    #[test]
    fn an_unsupported_metric_says_so_in_every_available_column() {
        let mut r = results();
        r.metrics.push(MetricResult {
            workload: "startup".into(),
            name: "CRI".into(),
            unit: "ms".into(),
            higher_is_better: false,
            samples: BTreeMap::new(),
            errors: BTreeMap::new(),
            not_supported: Some("no CRI client".into()),
        });
        let t = r.table();
        let row = t.lines().find(|l| l.contains("| CRI |")).unwrap();
        assert_eq!(row.matches("not supported yet").count(), 2, "{row}");
        assert!(row.contains("| not available | — |"), "{row}");
        assert!(r
            .markdown(&[])
            .contains("startup / CRI: not supported yet: no CRI client"));
    }

    #[test]
    fn markdown_tells_the_machine_and_emulation() {
        let md = results().markdown(&[]);
        assert!(md.contains("Test CPU, 2 cores, 24.0 GiB, Linux 6.1.0, KVM: emulated"));
        assert!(md.contains("not available: containerd-shim-nutshell-v2 is not installed"));
        assert!(md.contains("KVM is emulated"));
        assert!(md.contains("workloads: startup (12 s)."), "{md}");
    }

    #[test]
    fn report_files_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let md = results().write(dir.path()).unwrap();
        assert!(md.is_file());
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join("latest.json")).unwrap()).unwrap();
        assert_eq!(json["metrics"][0]["samples"]["runc"][2], 90.0);
        let svg = fs::read_to_string(dir.path().join("latest-startup.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("runsc"));
    }

    #[test]
    fn small_values_and_ratios_keep_two_significant_digits() {
        assert_eq!(fmt_value(12_345.6), "12346");
        assert_eq!(fmt_value(123.45), "123.5");
        assert_eq!(fmt_value(0.63), "0.63");
        assert_eq!(fmt_value(0.0123), "0.012");
        assert_eq!(fmt_value(0.000456), "0.00046");
        assert_eq!(fmt_value(0.0), "0.00");
        assert_eq!(fmt_ratio(2.0), "2.00×");
        assert_eq!(fmt_ratio(0.5), "0.50×");
        assert_eq!(fmt_ratio(0.00112), "0.0011×");
        assert_eq!(fmt_ratio(0.00003), "0.000030×");
    }

    #[test]
    fn machine_parsing() {
        assert_eq!(
            cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 9B14\n").as_deref(),
            Some("AMD EPYC 9B14")
        );
        assert_eq!(
            mem_total_kib("MemTotal:       24000000 kB\n"),
            Some(24_000_000)
        );
        assert_eq!(kvm_kind(false, true), "hardware");
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400 + 3_660), "2000-02-29 01:01 UTC");
        assert_eq!(utc(1_795_881_179), "2026-11-28 15:52 UTC");
    }
}

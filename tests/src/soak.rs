//! The fault soak (docs/security.md, "Fault soak"): pod cycles through containerd's CRI, as
//! kubelet drives them, with faults injected, then a count of everything the runtime could
//! leave behind.
//!
//! A cycle is RunPodSandbox → CreateContainer → StartContainer → ExecSync → StopContainer →
//! RemoveContainer → StopPodSandbox → RemovePodSandbox. The faults ([`Fault`]): SIGKILL to the
//! pod's shim or to its VMM after RunPodSandbox, after StartContainer or during an ExecSync; an
//! ExecSync that times out followed by the container's removal while the pod's VM still runs;
//! one containerd restart. After a fault the calls that follow may fail; the pod is then
//! removed through the CRI as kubelet would (StopPodSandbox, RemovePodSandbox, retried), and
//! that must succeed. Without a fault every call must succeed.
//!
//! Leaks ([`Leaks`]) are counted after every cycle (so that a leak is traced to the cycle and
//! fault that made it) and at the end: shim and VMM processes, mounts under the shim's run
//! directory, the template cache and containerd's directories, the pods' cgroups, network
//! namespaces (where the pods' taps live) and veths on the CNI bridge, the shims' sockets, and
//! entries under the run directory and the template cache.
//!
//! `nutshell-soak --cycles N` runs it; `tests/tests/soak.rs` runs one cycle per fault in CI.
#![allow(missing_docs)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use nutshell_test_support::containerd::{shim_pids, shim_socket};

use crate::cri_rig::{Rig, CONTROLLERS, HANDLER, IMAGE, NAMESPACE};
use crate::{jailed_vmm, left_under_run_dir, template_cache, vmms_under};
use nutshell_test_support::cri::{container_config, CriClient};

/// The process a fault kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The pod's shim (`containerd-shim-nutshell-v2`).
    Shim,
    /// The pod's VMM (the jailed `nutshell-vmm`, not its supervisor).
    Vmm,
}

/// When in a cycle a process is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Once RunPodSandbox has returned (the VM runs, no container yet).
    AfterRunPod,
    /// Once StartContainer has returned.
    AfterStart,
    /// While an ExecSync is in flight.
    DuringExec,
}

/// What goes wrong in a cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: every call must succeed.
    None,
    /// SIGKILL to a process at a phase.
    Kill(Target, Phase),
    /// An ExecSync that outlives its timeout, then StopContainer and RemoveContainer while
    /// the pod's VM runs (the CRI validation suite's ExecSync timeout test does this). The
    /// container's directory in the pod's shared directory must go at once.
    ExecTimeoutThenRemove,
    /// containerd stops and starts again while the container runs.
    ContainerdRestart,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::None => write!(f, "none"),
            Fault::Kill(t, p) => {
                let t = match t {
                    Target::Shim => "shim",
                    Target::Vmm => "VMM",
                };
                let p = match p {
                    Phase::AfterRunPod => "after RunPodSandbox",
                    Phase::AfterStart => "after StartContainer",
                    Phase::DuringExec => "during ExecSync",
                };
                write!(f, "SIGKILL {t} {p}")
            }
            Fault::ExecTimeoutThenRemove => write!(f, "ExecSync timeout, remove container"),
            Fault::ContainerdRestart => write!(f, "containerd restart"),
        }
    }
}

/// One round of faults: every fault once, a clean cycle first. [`plan`] repeats it.
pub const ROUND: [Fault; 9] = [
    Fault::None,
    Fault::Kill(Target::Shim, Phase::AfterRunPod),
    Fault::Kill(Target::Vmm, Phase::AfterRunPod),
    Fault::ExecTimeoutThenRemove,
    Fault::Kill(Target::Shim, Phase::AfterStart),
    Fault::Kill(Target::Vmm, Phase::AfterStart),
    Fault::ContainerdRestart,
    Fault::Kill(Target::Shim, Phase::DuringExec),
    Fault::Kill(Target::Vmm, Phase::DuringExec),
];

/// The faults of `cycles` cycles: [`ROUND`] over and over, with one containerd restart in the
/// whole run (later rounds have a clean cycle in its place).
pub fn plan(cycles: usize) -> Vec<Fault> {
    let mut restarted = false;
    (0..cycles)
        .map(|i| match ROUND[i % ROUND.len()] {
            Fault::ContainerdRestart if restarted => Fault::None,
            Fault::ContainerdRestart => {
                restarted = true;
                Fault::ContainerdRestart
            }
            f => f,
        })
        .collect()
}

/// How one cycle went.
#[derive(Debug, Clone)]
pub struct CycleReport {
    /// Its number, from 0.
    pub index: usize,
    /// Its fault.
    pub fault: Fault,
    /// Wall time, the pod's removal and the wait for its processes to go included.
    pub duration: Duration,
    /// CRI calls that failed after the fault (expected: the pod's shim or VM was gone).
    pub tolerated: Vec<String>,
    /// What went wrong that must not: a failed call without a fault, a pod the CRI could not
    /// remove, a container directory left while its pod ran.
    pub failures: Vec<String>,
    /// Leaks counted after the cycle (cumulative: what earlier cycles left is counted again).
    pub leaks: Leaks,
}

/// What the runtime left behind; every count must be zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leaks {
    /// Shim processes of the rig's containerd namespace.
    pub shims: Vec<String>,
    /// `nutshell-vmm` processes (supervisors and jailed VMMs) of the rig's run directory.
    pub vmms: Vec<String>,
    /// Mount points under the run directory, the template cache or containerd's directory.
    pub mounts: Vec<String>,
    /// Cgroups under the pods' cgroup parent, in any hierarchy.
    pub cgroups: Vec<String>,
    /// The pods' network namespaces (their taps live there) that still exist.
    pub netns: Vec<String>,
    /// Interfaces (veths) still attached to the rig's CNI bridge.
    pub veths: Vec<String>,
    /// Shim sockets (containerd's `-socket` of each shim seen) that still exist.
    pub sockets: Vec<String>,
    /// Entries under the run directory (the start-slot files excepted, unless still held).
    pub run_dir: Vec<String>,
    /// Entries under the template cache other than finished templates and their lock files.
    pub template_dir: Vec<String>,
}

impl Leaks {
    /// (name, items) of every kind.
    pub fn kinds(&self) -> [(&'static str, &[String]); 9] {
        [
            ("processes (shims)", &self.shims),
            ("processes (VMMs)", &self.vmms),
            ("mounts", &self.mounts),
            ("cgroups", &self.cgroups),
            ("netns (taps)", &self.netns),
            ("veths", &self.veths),
            ("sockets", &self.sockets),
            ("run dir entries", &self.run_dir),
            ("template dir entries", &self.template_dir),
        ]
    }

    /// The number of leaked things.
    pub fn total(&self) -> usize {
        self.kinds().iter().map(|(_, v)| v.len()).sum()
    }
}

impl fmt::Display for Leaks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, items) in self.kinds() {
            writeln!(f, "  {name:<22} {}", items.len())?;
            for i in items.iter().take(5) {
                writeln!(f, "      {i}")?;
            }
            if items.len() > 5 {
                writeln!(f, "      … {} more", items.len() - 5)?;
            }
        }
        Ok(())
    }
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// Every cycle.
    pub cycles: Vec<CycleReport>,
    /// Leaks at the end.
    pub leaks: Leaks,
    /// Wall time of the cycles (the rig's start excluded).
    pub duration: Duration,
}

impl SoakReport {
    /// Every failure of every cycle, with its cycle and fault.
    pub fn failures(&self) -> Vec<String> {
        self.cycles
            .iter()
            .flat_map(|c| {
                c.failures
                    .iter()
                    .map(move |f| format!("cycle {} ({}): {f}", c.index, c.fault))
            })
            .collect()
    }

    /// Whether the soak passed: no failure and nothing leaked.
    pub fn passed(&self) -> bool {
        self.failures().is_empty() && self.leaks.total() == 0
    }
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.cycles.len().max(1);
        let mut times: Vec<Duration> = self.cycles.iter().map(|c| c.duration).collect();
        times.sort();
        let median = times.get(times.len() / 2).copied().unwrap_or_default();
        let max = times.last().copied().unwrap_or_default();
        writeln!(
            f,
            "soak: {} cycles in {:.1} s: {:.1} s per cycle (mean), median {:.1} s, max {:.1} s",
            self.cycles.len(),
            self.duration.as_secs_f64(),
            self.duration.as_secs_f64() / n as f64,
            median.as_secs_f64(),
            max.as_secs_f64()
        )?;
        let mut faults: Vec<Fault> = Vec::new();
        for c in &self.cycles {
            if !faults.contains(&c.fault) {
                faults.push(c.fault);
            }
        }
        for fault in faults {
            let of: Vec<&CycleReport> = self.cycles.iter().filter(|c| c.fault == fault).collect();
            let secs: f64 = of.iter().map(|c| c.duration.as_secs_f64()).sum();
            let tolerated: usize = of.iter().map(|c| c.tolerated.len()).sum();
            writeln!(
                f,
                "  {:<38} {:>4} cycles, {:>6.1} s mean, {:>3} CRI calls failed after the fault",
                fault.to_string(),
                of.len(),
                secs / of.len() as f64,
                tolerated
            )?;
        }
        writeln!(
            f,
            "leaks after the last cycle ({} in all):",
            self.leaks.total()
        )?;
        write!(f, "{}", self.leaks)?;
        let failures = self.failures();
        writeln!(f, "failures: {}", failures.len())?;
        for fl in failures {
            writeln!(f, "  {fl}")?;
        }
        write!(f, "result: {}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

/// What the soak remembers of the pods it ran, to count their leftovers.
#[derive(Debug, Default)]
struct Seen {
    netns: Vec<PathBuf>,
    sockets: Vec<PathBuf>,
}

/// Runs `cycles` cycles on `rig` (a fresh one: no pods), calling `progress` after each.
pub fn run(rig: &mut Rig, cycles: usize, mut progress: impl FnMut(&CycleReport)) -> SoakReport {
    let started = Instant::now();
    let mut seen = Seen::default();
    let mut reports = Vec::with_capacity(cycles);
    for (index, fault) in plan(cycles).into_iter().enumerate() {
        let report = cycle(rig, index, fault, &mut seen);
        progress(&report);
        reports.push(report);
    }
    let duration = started.elapsed();
    let leaks = count_leaks(rig, &seen);
    SoakReport {
        cycles: reports,
        leaks,
        duration,
    }
}

/// The record of one cycle's calls: failures before the fault are failures, after it tolerated.
struct Calls {
    faulted: bool,
    tolerated: Vec<String>,
    failures: Vec<String>,
}

impl Calls {
    /// Records the outcome of `call`; returns its value if it succeeded.
    fn check<T, E: fmt::Display>(&mut self, call: &str, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) if self.faulted => {
                self.tolerated.push(format!("{call}: {e}"));
                None
            }
            Err(e) => {
                self.failures.push(format!("{call}: {e}"));
                None
            }
        }
    }
}

fn cycle(rig: &mut Rig, index: usize, fault: Fault, seen: &mut Seen) -> CycleReport {
    let started = Instant::now();
    let mut calls = Calls {
        faulted: false,
        tolerated: Vec::new(),
        failures: Vec::new(),
    };
    let name = format!("soak-{index}");
    let pod_cfg = rig.pod(&name);
    let pod = calls.check("RunPodSandbox", rig.cri.run_pod_sandbox(&pod_cfg, HANDLER));
    if let Some(pod) = &pod {
        if let Ok(net) = rig.cri.pod_network(pod) {
            seen.netns.extend(net.netns);
        }
        seen.sockets
            .extend(rig.shims().into_iter().filter_map(shim_socket));
        pod_cycle(rig, pod, &pod_cfg, index, fault, &mut calls);
    }
    // Remove the pod as kubelet would (again if the cycle did): every pod of the rig, until
    // the CRI has none.
    remove_pods(rig, &mut calls);
    settle(rig);
    let leaks = count_leaks(rig, seen);
    CycleReport {
        index,
        fault,
        duration: started.elapsed(),
        tolerated: calls.tolerated,
        failures: calls.failures,
        leaks,
    }
}

/// The container's part of a cycle, on a running pod.
fn pod_cycle(
    rig: &mut Rig,
    pod: &str,
    pod_cfg: &k8s_cri::v1::PodSandboxConfig,
    index: usize,
    fault: Fault,
    calls: &mut Calls,
) {
    let kill_at = |phase: Phase, rig: &Rig, calls: &mut Calls| {
        if let Fault::Kill(target, p) = fault {
            if p == phase {
                calls.faulted = true;
                if let Err(e) = kill(rig, target) {
                    calls.failures.push(format!("inject the fault: {e}"));
                }
            }
        }
    };
    kill_at(Phase::AfterRunPod, rig, calls);
    let cfg = container_config(
        "app",
        IMAGE,
        &["sleep", "2147483647"],
        &format!("soak-{index}.log"),
    );
    let Some(app) = calls.check(
        "CreateContainer",
        rig.cri.create_container(pod, &cfg, pod_cfg),
    ) else {
        return;
    };
    let started = calls.check("StartContainer", rig.cri.start_container(&app));
    kill_at(Phase::AfterStart, rig, calls);
    if fault == Fault::ContainerdRestart && started.is_some() {
        rig.containerd.stop_daemon();
        if let Err(e) = rig.containerd.start_again() {
            calls.failures.push(format!("restart containerd: {e}"));
            return;
        }
        match CriClient::connect(rig.containerd.address()) {
            Ok(c) => rig.cri = c,
            Err(e) => {
                calls
                    .failures
                    .push(format!("connect to the restarted containerd: {e}"));
                return;
            }
        }
    }
    match fault {
        Fault::Kill(target, Phase::DuringExec) => {
            let address = rig.containerd.address().to_owned();
            let id = app.clone();
            let exec = std::thread::spawn(move || {
                CriClient::connect(&address)
                    .and_then(|mut c| c.exec_sync(&id, &["sleep", "30"], Duration::from_secs(120)))
                    .map(|_| ())
            });
            // The ExecSync is in flight (containerd → shim → agent) when the kill comes.
            std::thread::sleep(Duration::from_secs(2));
            calls.faulted = true;
            if let Err(e) = kill(rig, target) {
                calls.failures.push(format!("inject the fault: {e}"));
            }
            match exec.join() {
                Ok(r) => {
                    calls.check("ExecSync (killed)", r);
                }
                Err(_) => calls.failures.push("the ExecSync thread panicked".into()),
            }
        }
        Fault::ExecTimeoutThenRemove => {
            // containerd answers DeadlineExceeded after the timeout and kills the exec.
            match rig
                .cri
                .exec_sync(&app, &["sleep", "60"], Duration::from_secs(2))
            {
                Ok(r) => calls.failures.push(format!(
                    "ExecSync of sleep 60 with a 2 s timeout returned {}",
                    r.exit_code
                )),
                Err(e) => calls.tolerated.push(format!("ExecSync (timed out): {e}")),
            }
            calls.check(
                "StopContainer",
                rig.cri.stop_container(&app, Duration::from_secs(10)),
            );
            calls.check("RemoveContainer", rig.cri.remove_container(&app));
            // The pod's VM still runs: the container's directory in the shared directory must
            // already be gone (it was left, busy, while the VMM held handles under it).
            let dir = rig.run_dir.join(pod).join("shared").join(&app);
            if dir.exists() {
                calls.failures.push(format!(
                    "{} left after RemoveContainer while the pod runs",
                    dir.display()
                ));
            }
            return;
        }
        _ => {
            let want = format!("soak-{index}\n");
            if let Some(r) = calls.check(
                "ExecSync",
                rig.cri.exec_sync(
                    &app,
                    &["echo", &want[..want.len() - 1]],
                    Duration::from_secs(120),
                ),
            ) {
                let out = String::from_utf8_lossy(&r.stdout);
                if !calls.faulted && (r.exit_code != 0 || out != want) {
                    calls.failures.push(format!(
                        "ExecSync: exit {} stdout {out:?} stderr {:?}",
                        r.exit_code,
                        String::from_utf8_lossy(&r.stderr)
                    ));
                }
            }
        }
    }
    calls.check(
        "StopContainer",
        rig.cri.stop_container(&app, Duration::from_secs(10)),
    );
    calls.check("RemoveContainer", rig.cri.remove_container(&app));
}

/// StopPodSandbox and RemovePodSandbox of every pod the CRI lists, retried as kubelet retries
/// (a few times, seconds apart); a pod still there at the end is a failure.
fn remove_pods(rig: &mut Rig, calls: &mut Calls) {
    const ATTEMPTS: usize = 5;
    for attempt in 1..=ATTEMPTS {
        let pods = match rig.cri.list_pod_sandboxes() {
            Ok(p) => p,
            Err(e) => {
                calls.failures.push(format!("ListPodSandbox: {e}"));
                return;
            }
        };
        if pods.is_empty() {
            return;
        }
        let mut errors = Vec::new();
        for pod in pods {
            if let Err(e) = rig
                .cri
                .stop_pod_sandbox(&pod)
                .and_then(|()| rig.cri.remove_pod_sandbox(&pod))
            {
                errors.push(format!("remove pod {pod} (attempt {attempt}): {e}"));
            }
        }
        if errors.is_empty() {
            return;
        }
        if attempt == ATTEMPTS {
            calls.failures.extend(errors);
        } else {
            calls.tolerated.extend(errors);
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

/// SIGKILL to the pod's shim or VMM (the rig runs one pod at a time).
fn kill(rig: &Rig, target: Target) -> Result<(), String> {
    let pids: Vec<u32> = match target {
        Target::Shim => rig.shims(),
        Target::Vmm => vmms_under(&rig.run_dir)
            .into_iter()
            .map(|supervisor| jailed_vmm(supervisor).unwrap_or(supervisor))
            .collect(),
    };
    if pids.is_empty() {
        return Err(format!("no {target:?} process to kill"));
    }
    for pid in pids {
        let pid = Pid::from_raw(i32::try_from(pid).map_err(|e| e.to_string())?);
        signal::kill(pid, Signal::SIGKILL).map_err(|e| format!("kill {pid}: {e}"))?;
    }
    Ok(())
}

/// Waits (up to 60 s) for the pod's shim and VMM processes to go after its removal.
fn settle(rig: &Rig) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(rig.shims().is_empty() && vmm_processes(&rig.run_dir).is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every `nutshell-vmm` process of `run_dir`: the supervisors (or unjailed VMMs) and their
/// jailed VMMs.
fn vmm_processes(run_dir: &Path) -> Vec<u32> {
    vmms_under(run_dir)
        .into_iter()
        .flat_map(|pid| std::iter::once(pid).chain(jailed_vmm(pid)))
        .collect()
}

fn count_leaks(rig: &Rig, seen: &Seen) -> Leaks {
    let shown = |p: &Path| p.display().to_string();
    let templates = template_cache();
    let roots = [
        rig.run_dir.clone(),
        templates.clone(),
        rig.containerd.dir().to_owned(),
    ];
    let mounts = nutshell_protocol::mountinfo::mount_points()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| roots.iter().any(|r| m.starts_with(r)))
        .map(|m| shown(&m))
        .collect();
    let mut cgroups = Vec::new();
    let hierarchies = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_else(|_| {
            CONTROLLERS
                .iter()
                .map(|c| Path::new("/sys/fs/cgroup").join(c))
                .collect()
        });
    for h in hierarchies {
        let parent = h.join(&rig.cgroup_parent);
        for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                cgroups.push(shown(&e.path()));
            }
        }
    }
    let veths = std::fs::read_dir(
        Path::new("/sys/class/net")
            .join(&rig.cni.bridge)
            .join("brif"),
    )
    .map(|d| {
        d.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    })
    .unwrap_or_default();
    let template_dir = std::fs::read_dir(&templates)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let finished = e.path().join("state").is_file();
                    let lock = name.ends_with(".lock") && e.path().is_file();
                    !(finished || lock)
                })
                .map(|e| shown(&e.path()))
                .collect()
        })
        .unwrap_or_default();
    Leaks {
        shims: shim_pids(rig.containerd.address(), NAMESPACE)
            .into_iter()
            .map(|p| p.to_string())
            .collect(),
        vmms: vmm_processes(&rig.run_dir)
            .into_iter()
            .map(|p| p.to_string())
            .collect(),
        mounts,
        cgroups,
        netns: seen
            .netns
            .iter()
            .filter(|p| p.exists())
            .map(|p| shown(p))
            .collect(),
        veths,
        sockets: seen
            .sockets
            .iter()
            .filter(|p| p.exists())
            .map(|p| shown(p))
            .collect(),
        run_dir: left_under_run_dir(&rig.run_dir),
        template_dir,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_covers_every_fault_and_restarts_containerd_once() {
        let p = plan(ROUND.len());
        for f in ROUND {
            assert!(p.contains(&f), "{f} missing");
        }
        let long = plan(200);
        assert_eq!(long.len(), 200);
        assert_eq!(
            long.iter()
                .filter(|f| **f == Fault::ContainerdRestart)
                .count(),
            1
        );
        assert_eq!(plan(3), ROUND[..3].to_vec());
    }

    #[test]
    fn leaks_count_every_kind() {
        let mut l = Leaks::default();
        assert_eq!(l.total(), 0);
        l.mounts.push("/run/x".into());
        l.sockets.push("/run/s".into());
        assert_eq!(l.total(), 2);
        assert!(l.to_string().contains("mounts"));
    }
}

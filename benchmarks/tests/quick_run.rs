#![allow(clippy::unwrap_used)]
//! `nutshell-bench --quick --only cpu` end to end with runc, Nutshell (this repository's shim,
//! VMM and guest), a second handler of the runc shim (`runc-b`, so that a ratio near 1 is
//! checked) and a runtime that is not installed: the report and the JSON are produced, runc and
//! Nutshell both have figures (Nutshell's container ran in a microVM, its VM template built by
//! the warm-up container in a fresh template directory), a missing runtime says "not
//! available". Then `--only startup` in the same cache (the template restored): the CRI row.
//! Needs root, containerd, runc, sysbench, /dev/kvm and scripts/setup.sh's builds (slow lane).

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "slow lane: needs root, containerd, runc and the guest kernel"]
fn quick_run_reports_runc_and_nutshell_figures_and_unavailable_runtimes() {
    let out = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_nutshell-bench"))
        .args([
            "--quick",
            "--only",
            "cpu",
            "--runtimes",
            "runc,nutshell,absent=io.containerd.absent.v2,runc-b=io.containerd.runc.v2",
        ])
        .arg("--out")
        .arg(out.path())
        .arg("--cache-dir")
        .arg(cache.path())
        // The benchmark's own Nutshell config, not one from the environment.
        .env_remove("NUTSHELL_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("| cpu | SHA-256, no syscalls (container clock) |"),
        "{stdout}"
    );

    let md = std::fs::read_to_string(out.path().join("latest.md")).unwrap();
    assert!(md.contains("Machine: "), "{md}");
    assert!(
        md.contains("**absent** (`io.containerd.absent.v2`): not available: containerd-shim-absent-v2 is not installed"),
        "{md}"
    );
    assert!(md.contains("latest-cpu.svg"), "{md}");
    assert!(out.path().join("latest-cpu.svg").is_file());

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("latest.json")).unwrap()).unwrap();
    let runtimes = json["runtimes"].as_array().unwrap();
    let status = |name: &str| {
        runtimes
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing in {json}"))
            .clone()
    };
    assert_eq!(status("runc")["available"], true);
    assert_eq!(status("absent")["available"], false);
    // Nutshell ran: the warm-up container built the VM template in the fresh template
    // directory (timed, not counted), then every cpu metric has Nutshell figures.
    let nutshell = status("nutshell");
    assert_eq!(nutshell["available"], true, "{nutshell}\n{stderr}");
    assert_eq!(nutshell["warmup_note"], "template build", "{nutshell}");
    assert!(nutshell["warmup_s"].as_f64().unwrap() > 0.0, "{nutshell}");
    assert!(
        cache.path().join("templates").read_dir().unwrap().count() > 0,
        "no template in the benchmark's template directory"
    );
    assert!(md.contains("template build: "), "{md}");
    let metrics = json["metrics"].as_array().unwrap();
    // --quick leaves sysbench out (and says so): SHA-256 without syscalls only.
    assert_eq!(metrics.len(), 1, "{metrics:?}");
    assert_eq!(metrics[0]["name"], "SHA-256, no syscalls (container clock)");
    assert!(md.contains(nutshell_bench::report::QUICK_NOTE), "{md}");
    for metric in metrics {
        assert_eq!(metric["workload"], "cpu");
        for rt in ["runc", "nutshell"] {
            let v = metric["samples"][rt].as_array();
            assert!(
                v.is_some_and(|v| !v.is_empty() && v.iter().all(|x| x.as_f64().unwrap() > 0.0)),
                "{rt}: {metric}"
            );
        }
    }
    let metric = &metrics[0];
    let runc = metric["samples"]["runc"].as_array().unwrap();
    assert!(
        (1..=2).contains(&runc.len()),
        "one or two quick repetitions (the time budget may stop after one): {metric}"
    );
    // The second runc handler ran as often as runc, and its ratio is near 1.
    assert_eq!(status("runc-b")["available"], true);
    let b = metric["samples"]["runc-b"].as_array().unwrap();
    assert_eq!(b.len(), runc.len());
    // The row has runc-b's ratio and says "not available" in the missing runtime's column.
    let row = md
        .lines()
        .find(|l| l.starts_with("| cpu | SHA-256"))
        .unwrap();
    assert!(row.contains("not available"), "{row}");
    let ratio: f64 = row
        .split('|')
        .map(str::trim)
        .rev()
        .find_map(|c| c.strip_suffix('×'))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (0.5..2.0).contains(&ratio),
        "runc-b / runc = {ratio}: {row}"
    );

    quick_startup_run_times_the_cri_path_for_runc_and_nutshell(cache.path());
    a_run_interrupted_by_sigint_leaves_nothing_running(cache.path());
}

/// SIGINT while Nutshell pods run (the density workload's idle pods): the benchmark exits with
/// 130 and no report, and nothing it started is left: no containerd, shim or VM process, no
/// shim socket, no mount, no directory, no cgroup of its namespace.
fn a_run_interrupted_by_sigint_leaves_nothing_running(cache: &Path) {
    use std::io::{BufRead, BufReader};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    let out = tempfile::tempdir().unwrap();
    let mut child = quick_run(&["density"], out.path(), cache)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let reader = {
        let log = Arc::clone(&log);
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        })
    };
    let logged = || log.lock().unwrap().clone();
    let path_after = |marker: &str| -> Option<String> {
        let text = logged();
        let rest = &text[text.find(marker)? + marker.len()..];
        Some(rest.split_whitespace().next()?.to_owned())
    };
    let mentions = |pid: u32, needle: &str| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
    };
    let pids = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    };

    // Wait until a Nutshell VM of the run is up.
    let deadline = Instant::now() + Duration::from_secs(300);
    let scratch = loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended early:\n{}",
            logged()
        );
        assert!(
            Instant::now() < deadline,
            "no VM within 300 s:\n{}",
            logged()
        );
        if let Some(scratch) = path_after("scratch directory ") {
            if logged().contains("workload density")
                && pids().into_iter().any(|p| mentions(p, &scratch))
            {
                break scratch;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let ctrd = path_after(") in ").unwrap_or_else(|| panic!("no containerd dir:\n{}", logged()));
    let namespace = format!("nutshell-{}-", child.id());
    // The shims' sockets (in /run/containerd/s, outside the run's directories).
    let sockets: Vec<_> = pids()
        .into_iter()
        .filter(|&p| mentions(p, &ctrd))
        .filter_map(nutshell_test_support::containerd::shim_socket)
        .collect();
    assert!(!sockets.is_empty(), "no shim socket found:\n{}", logged());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running 120 s after SIGINT:\n{}", logged());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    reader.join().unwrap();
    let log = logged();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("SIGINT: stopping the run"), "{log}");
    assert!(
        !out.path().join("latest.md").exists(),
        "a report after SIGINT"
    );

    let left: Vec<u32> = pids()
        .into_iter()
        .filter(|&p| mentions(p, &ctrd) || mentions(p, &scratch))
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}\n{log}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounted: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&ctrd) || l.contains(&scratch))
        .collect();
    assert!(mounted.is_empty(), "mounts left: {mounted:?}");
    for dir in [&ctrd, &scratch] {
        assert!(!Path::new(dir).exists(), "{dir} left");
    }
    let sockets_left: Vec<_> = sockets.iter().filter(|s| s.exists()).collect();
    assert!(
        sockets_left.is_empty(),
        "shim sockets left: {sockets_left:?}"
    );
    let cgroups: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .filter_map(|h| std::fs::read_dir(h.path()).ok())
        .flatten()
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| p.contains(&namespace))
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
}

/// `nutshell-bench --quick --only startup` with runc and Nutshell: the CRI row (a pod through
/// containerd's CRI, `RunPodSandbox` → container running) has figures for both runtimes, as
/// many for one as for the other (interleaved), and its pods and their cgroup parent are gone
/// afterwards.
/// Runs with `cache`, where the first run left the VM template (one template build per test run,
/// not one per run).
fn quick_startup_run_times_the_cri_path_for_runc_and_nutshell(cache: &Path) {
    let out = tempfile::tempdir().unwrap();
    let child = quick_run(&["startup"], out.path(), cache)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let run = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("latest.json")).unwrap()).unwrap();
    let metric = json["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| {
            m["workload"] == "startup" && m["name"] == "CRI RunPodSandbox to container running"
        })
        .unwrap_or_else(|| panic!("no CRI row in {json}"))
        .clone();
    assert!(metric["not_supported"].is_null(), "{metric}");
    let samples = |rt: &str| -> Vec<f64> {
        metric["samples"][rt]
            .as_array()
            .unwrap_or_else(|| panic!("no {rt} samples: {metric}\n{stderr}"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let errors = |rt: &str| metric["errors"][rt].as_array().map_or(0, Vec::len);
    let (runc, nutshell) = (samples("runc"), samples("nutshell"));
    assert!(!runc.is_empty() && !nutshell.is_empty(), "{metric}");
    // Interleaved: as many attempts under one runtime as under the other.
    assert_eq!(
        runc.len() + errors("runc"),
        nutshell.len() + errors("nutshell"),
        "{metric}"
    );
    assert!(
        runc.len() + errors("runc") <= 3,
        "at most the quick plan's repetitions: {metric}"
    );
    for v in runc.iter().chain(&nutshell) {
        assert!(*v > 0.0 && *v < 300_000.0, "{metric}");
    }
    let md = std::fs::read_to_string(out.path().join("latest.md")).unwrap();
    let row = md
        .lines()
        .find(|l| l.contains("| CRI RunPodSandbox to container running |"))
        .unwrap();
    assert!(
        !row.contains("not supported") && !row.contains("failed"),
        "{row}"
    );

    // Every pod was stopped and removed: their cgroup parent is gone (rmdir needs it empty).
    for hierarchy in ["memory", "pids"] {
        let parent = Path::new("/sys/fs/cgroup")
            .join(hierarchy)
            .join(format!("nutshell-bench-cri-{pid}"));
        assert!(!parent.exists(), "{} left", parent.display());
    }
}

/// `nutshell-bench --quick --only ONLY --runtimes runc,nutshell` writing to `out`, with `cache`
/// and the benchmark's own Nutshell config (not one from the environment).
fn quick_run(only: &[&str], out: &Path, cache: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nutshell-bench"));
    cmd.arg("--quick")
        .arg("--only")
        .arg(only.join(","))
        .args(["--runtimes", "runc,nutshell", "--out"])
        .arg(out)
        .arg("--cache-dir")
        .arg(cache)
        .env_remove("NUTSHELL_CONFIG");
    cmd
}

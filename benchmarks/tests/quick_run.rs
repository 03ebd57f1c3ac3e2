#![allow(clippy::unwrap_used)]
//! `nutshell-bench --quick --only cpu` end to end with runc, a second handler of the runc shim
//! (`runc-b`, a second runtime that really runs, so ratios are computed), a runtime that is not
//! installed, and nutshell (available or not): the report and the JSON are produced, runc has
//! figures, a missing runtime says "not available". Needs root, containerd, runc, sysbench
//! (slow lane).

use std::process::Command;

#[test]
#[ignore = "slow lane: needs root, containerd, runc and sysbench"]
fn quick_run_reports_runc_figures_and_unavailable_runtimes() {
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
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("| cpu | sysbench cpu (1 thread) |"),
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
    // Nutshell runs once its shim is installed; until then it is reported, not fatal.
    let nutshell = status("nutshell");
    let metric = &json["metrics"][0];
    assert_eq!(metric["workload"], "cpu");
    let runc = metric["samples"]["runc"].as_array().unwrap();
    assert_eq!(runc.len(), 2, "two quick repetitions");
    assert!(runc.iter().all(|v| v.as_f64().unwrap() > 0.0), "{metric}");
    if nutshell["available"] == true {
        assert!(
            metric["samples"]["nutshell"].as_array().is_some(),
            "{metric}"
        );
    } else {
        assert!(
            nutshell["reason"].as_str().unwrap().len() > 10,
            "{nutshell}"
        );
        assert!(md.contains("**nutshell**"), "{md}");
    }
    // The second runc handler ran as often as runc, and its ratio is near 1.
    assert_eq!(status("runc-b")["available"], true);
    let b = metric["samples"]["runc-b"].as_array().unwrap();
    assert_eq!(b.len(), runc.len());
    // The row has runc-b's ratio and says "not available" in the missing runtime's column.
    let row = md.lines().find(|l| l.starts_with("| cpu |")).unwrap();
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
}

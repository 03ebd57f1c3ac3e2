//! `nutshell-agent-ctl` against no VM: a clear error within its timeout.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;
use std::time::{Duration, Instant};

const CTL: &str = env!("CARGO_BIN_EXE_nutshell-agent-ctl");

#[test]
fn missing_vm_socket_is_a_clear_error_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("no-vm.sock");
    let uds = uds.to_str().unwrap();
    // `--timeout` before the call and after it (as the README writes it).
    for args in [
        ["--uds", uds, "--timeout", "1", "health"],
        ["--uds", uds, "health", "--timeout", "1"],
    ] {
        let started = Instant::now();
        let out = Command::new(CTL).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?}: --timeout ignored"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot reach the agent through"), "{err}");
        assert!(err.contains("no-vm.sock"), "{err}");
    }
}

#[test]
fn run_without_a_vm_exits_125_not_a_container_status() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("no-vm.sock");
    let spec = dir.path().join("config.json");
    std::fs::write(&spec, "{}").unwrap();
    let out = Command::new(CTL)
        .arg("--uds")
        .arg(&uds)
        .args(["--timeout", "1", "run", "--id", "c1", "--spec"])
        .arg(&spec)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the agent through"), "{err}");
}

#[test]
fn help_lists_the_calls() {
    let out = Command::new(CTL).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "health",
        "version",
        "refresh",
        "shutdown",
        "sandbox",
        "run",
        "--uds",
        "--timeout",
    ] {
        assert!(help.contains(word), "--help lacks {word}");
    }
}

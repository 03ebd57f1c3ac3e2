//! `nutshell-soak`: the fault soak (see `nutshell_tests::soak` and docs/security.md).

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use nutshell_tests::cri_rig::rig;
use nutshell_tests::soak::{self, ROUND};

const USAGE: &str = "\
usage: nutshell-soak [--cycles N]

Runs N pod cycles through containerd's CRI on a private containerd with the nutshell runtime
handler (RunPodSandbox, CreateContainer, StartContainer, ExecSync, StopContainer,
RemoveContainer, StopPodSandbox, RemovePodSandbox), injecting faults in a fixed rotation of
9 cycles: none; SIGKILL to the shim, then to the VMM, after RunPodSandbox; an ExecSync that
times out, then the container removed while the pod runs; SIGKILL to the shim, then the VMM,
after StartContainer; one containerd restart (later rounds run a clean cycle instead);
SIGKILL to the shim, then the VMM, during an ExecSync. After a fault the pod is removed
through the CRI as kubelet would, which must succeed.

Afterwards it counts what is left: shim and VMM processes, mounts, cgroups, network
namespaces (taps), veths, shim sockets, entries under the shim's run directory and the
template cache. It prints each count, the duration and the time per cycle, and exits 1 if a
count is not zero or a cycle failed.

Needs root, KVM, containerd and the guest artifacts (scripts/setup.sh); run from the
repository (it finds the binaries under target/, or $NUTSHELL_SHIM and $NUTSHELL_VMM).

options:
  --cycles N   number of cycles (default 9: every fault once)
  -h, --help   this text";

fn parse_args() -> Result<Option<usize>> {
    let mut cycles = ROUND.len();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--cycles" => {
                let n = args.next().context("--cycles needs a number")?;
                cycles = n
                    .parse()
                    .with_context(|| format!("--cycles {n}: not a number"))?;
            }
            other => match other.strip_prefix("--cycles=") {
                Some(n) => {
                    cycles = n
                        .parse()
                        .with_context(|| format!("--cycles={n}: not a number"))?
                }
                None => bail!("unknown argument {other:?}\n\n{USAGE}"),
            },
        }
    }
    if cycles == 0 {
        bail!("--cycles must be at least 1");
    }
    Ok(Some(cycles))
}

fn main() -> ExitCode {
    let cycles = match parse_args() {
        Ok(Some(n)) => n,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("nutshell-soak: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut rig = rig("soak");
    let report = soak::run(&mut rig, cycles, |c| {
        eprintln!(
            "cycle {:>4} {:<38} {:>6.1} s  failed calls after the fault {}  failures {}  leaks {}",
            c.index,
            c.fault.to_string(),
            c.duration.as_secs_f64(),
            c.tolerated.len(),
            c.failures.len(),
            c.leaks.total()
        );
        for f in &c.failures {
            eprintln!("    failure: {f}");
        }
    });
    println!("{report}");
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

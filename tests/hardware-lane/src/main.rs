//! `nutshell-hwlane`: writes the hardware-KVM lane's report from the consoles of its runs and
//! exits non-zero when a binding case failed.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use nutshell_hwlane::{render, summary, Lane, ReportInput};

/// Turns the L1 console (and the `kvm_pvm` run's output) into report.md; exit status 1 when
/// the lane failed.
#[derive(Debug, Parser)]
#[command(name = "nutshell-hwlane", version, about)]
struct Args {
    /// The serial console of an L1 boot for the binding cases (one CPU); once per boot, in
    /// boot order.
    #[arg(long, value_name = "PATH", required = true)]
    l1_console: Vec<PathBuf>,
    /// The serial console of an L1 boot for the informative cases (two CPUs); nothing in it
    /// fails the lane, not even a boot that never started its test program.
    #[arg(long, value_name = "PATH")]
    l1_informative_console: Vec<PathBuf>,
    /// Output of the same cases on this host's KVM (lane `pvm`), for the figures beside L1's.
    #[arg(long, value_name = "PATH")]
    pvm_output: Option<PathBuf>,
    /// Wall seconds of the L1 run.
    #[arg(long, value_name = "SECS")]
    l1_wall: Option<f64>,
    /// Wall seconds of the `kvm_pvm` run.
    #[arg(long, value_name = "SECS")]
    pvm_wall: Option<f64>,
    /// One line naming the run (date, machine).
    #[arg(long, value_name = "TEXT", default_value = "")]
    context: String,
    /// Where to write the Markdown report.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

fn read_lossy(path: &PathBuf) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[allow(clippy::print_stdout)] // the closing count is the tool's output
fn run(args: &Args) -> anyhow::Result<bool> {
    let mut l1 = Lane::merge(
        args.l1_console
            .iter()
            .map(|p| read_lossy(p).map(|text| Lane::parse(&text, "l1")))
            .collect::<anyhow::Result<_>>()?,
    );
    for path in &args.l1_informative_console {
        l1.add_informative_run(Lane::parse(&read_lossy(path)?, "l1"));
    }
    let pvm = args
        .pvm_output
        .as_ref()
        .map(|p| read_lossy(p).map(|text| Lane::parse(&text, "pvm")))
        .transpose()?;
    let report = render(&ReportInput {
        l1: &l1,
        pvm: pvm.as_ref(),
        l1_wall: args.l1_wall,
        pvm_wall: args.pvm_wall,
        context: &args.context,
    });
    std::fs::write(&args.out, &report)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprint!("{report}");
    print!("{}", summary(&l1));
    Ok(l1.passed())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "nutshell-hwlane: the lane failed (report: {})",
                args.out.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("nutshell-hwlane: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `nutshell-bench`: Nutshell against runc, side by side. Not implemented yet.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("nutshell-bench: not supported yet (the benchmark suite is not implemented)");
    ExitCode::FAILURE
}

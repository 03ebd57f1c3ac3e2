//! `containerd-shim-nutshell-v2`: the containerd shim v2 of Nutshell.
//!
//! Not implemented yet: the Task API over ttrpc comes with the shim issue. Until then the
//! binary refuses to run, so that containerd reports a clear error instead of a hung task.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("containerd-shim-nutshell-v2: not supported yet (the shim is not implemented)");
    ExitCode::FAILURE
}

//! `nutshell-agent`: PID 1 of a Nutshell guest. Not implemented yet (agent issue).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("nutshell-agent: not supported yet (the guest agent is not implemented)");
    ExitCode::FAILURE
}

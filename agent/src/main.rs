//! `nutshell-agent`: PID 1 of a Nutshell guest (see the library for the parts).
//!
//! It must never hang silently and never panic: a failure is logged on the console, then the
//! guest powers off; a panic is logged by the hook, which powers off too.

use nutshell_agent::{init, logger, switch_root, sys};

fn main() {
    // Before any thread: every thread inherits the blocked SIGCHLD, the reaper reads it.
    let sigchld = sys::block_sigchld();
    logger::init(init::DEFAULT_LEVEL);
    std::panic::set_hook(Box::new(|info| {
        log::error!("panic: {info}; powering off");
        init::power_off_or_die();
    }));
    if std::process::id() != 1 {
        log::error!("nutshell-agent runs as PID 1 of a Nutshell guest only; exiting");
        std::process::exit(1);
    }
    if switch_root::already_switched() {
        log::info!("running from a tmpfs root (left the initramfs)");
    } else {
        // Returns only if the switch failed; on success this process is replaced.
        let e = switch_root::switch_to_tmpfs();
        log::warn!(
            "cannot leave the initramfs ({e}); containers enter their roots with a move mount"
        );
    }
    let Err(e) = sigchld
        .map_err(init::InitError::Reaper)
        .and_then(|()| init::run());
    log::error!("{}; powering off", chain(&e));
    init::power_off_or_die();
}

use nutshell_protocol::error_chain as chain;

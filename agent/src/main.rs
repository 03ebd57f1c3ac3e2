//! `nutshell-agent`: PID 1 of a Nutshell guest (see the library for the parts).
//!
//! It must never hang silently and never panic: a failure is logged on the console, then the
//! guest powers off; a panic is logged by the hook, which powers off too.

use nutshell_agent::{init, logger, switch_root, sys};

/// dlmalloc rather than musl's allocator (mallocng), which hands freed memory back to the
/// kernel eagerly: the next request maps and faults it in again, and in a guest whose kernel is
/// emulated each page fault and `mmap` costs milliseconds. dlmalloc keeps what it got (it trims
/// only above 2 MiB free). Measured, the two builds alternating: a pod's start 2.86 -> 2.75 s,
/// its network set-up 123 -> 95 ms, ExecSync of `true` 0.67 -> 0.62 s (docs/agent.md).
/// A container process between its clone and its execve allocates from an arena of its own
/// instead, so that killing it can never leave dlmalloc's lock held (`nutshell_agent::alloc`).
#[global_allocator]
static ALLOC: nutshell_agent::alloc::AgentAllocator = nutshell_agent::alloc::AgentAllocator;

fn main() {
    // Before any thread: every thread inherits the blocked SIGCHLD, the reaper reads it.
    let sigchld = sys::block_sigchld();
    logger::init(init::DEFAULT_LEVEL);
    std::panic::set_hook(Box::new(|info| {
        // A container process before its execve runs this hook too (it shares the agent's
        // memory): powering off from there would act in the container's PID namespace, whose
        // init `reboot` kills. It ends alone instead; the agent reports its set-up as failed.
        if nutshell_agent::alloc::in_child() {
            sys::exit_now(nutshell_agent::container::SETUP_FAILED);
        }
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

//! The PID 1 sequence: mounts, logging level, orphan reaping, the ttrpc server on vsock.

use std::ffi::CStr;
use std::io;
use std::sync::Arc;

use log::LevelFilter;
use nutshell_protocol::{AGENT_VSOCK_PORT, PORT_FORWARD_VSOCK_PORT};

use crate::container::Containers;
use crate::service::{AgentService, ServiceError};
use crate::{logger, sys};

/// Why PID 1 could not come up.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount failed.
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        /// File system type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `/proc/cmdline` is unreadable.
    #[error("cannot read /proc/cmdline")]
    Cmdline(#[source] io::Error),
    /// uname(2) failed.
    #[error("cannot read the kernel release")]
    KernelRelease(#[source] io::Error),
    /// SIGCHLD handling could not be set up.
    #[error("cannot set up the child reaper")]
    Reaper(#[source] io::Error),
    /// The vsock CID cannot be read.
    #[error("cannot read the vsock CID from /dev/vsock")]
    VsockCid(#[source] io::Error),
    /// No virtio-vsock device: nothing could ever reach the API.
    #[error("no virtio-vsock device (start nutshell-vmm with --vsock-uds): the agent API is unreachable")]
    NoVsock,
    /// The ttrpc server did not start.
    #[error("cannot serve the agent API")]
    Serve(#[source] ServiceError),
}

/// One mount of the guest's base file systems.
struct Mount {
    source: &'static CStr,
    target: &'static str,
    target_c: &'static CStr,
    fstype: &'static CStr,
    flags: libc::c_ulong,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// In order: `/sys/fs/cgroup` exists only once sysfs is mounted, `/dev/pts` once `/dev` is.
const MOUNTS: [Mount; 6] = [
    Mount {
        source: c"proc",
        target: "/proc",
        target_c: c"/proc",
        fstype: c"proc",
        flags: NOSUID_NODEV_NOEXEC,
    },
    Mount {
        source: c"sysfs",
        target: "/sys",
        target_c: c"/sys",
        fstype: c"sysfs",
        flags: NOSUID_NODEV_NOEXEC,
    },
    Mount {
        source: c"devtmpfs",
        target: "/dev",
        target_c: c"/dev",
        fstype: c"devtmpfs",
        flags: libc::MS_NOSUID,
    },
    // The guest's own devpts. Containers open their ptys in their own instance (see
    // container/tty.rs); one whose /dev is a bind of the guest's finds them here.
    Mount {
        source: c"devpts",
        target: "/dev/pts",
        target_c: c"/dev/pts",
        fstype: c"devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
    },
    Mount {
        source: c"tmpfs",
        target: "/run",
        target_c: c"/run",
        fstype: c"tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
    },
    Mount {
        source: c"cgroup2",
        target: "/sys/fs/cgroup",
        target_c: c"/sys/fs/cgroup",
        fstype: c"cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
    },
];

fn mount_all() -> Result<(), InitError> {
    for m in &MOUNTS {
        // The initramfs has the top-level directories; a missing one is made here. In sysfs
        // mkdir fails, but the kernel made /sys/fs/cgroup already.
        let _ = std::fs::create_dir_all(m.target);
        sys::mount(m.source, m.target_c, m.fstype, m.flags).map_err(|source| InitError::Mount {
            fstype: m.fstype.to_str().unwrap_or("?"),
            target: m.target,
            source,
        })?;
        log::debug!("mounted {} on {}", m.fstype.to_string_lossy(), m.target);
    }
    Ok(())
}

/// Remounts the cgroup2 hierarchy with `favordynmods` (Linux 6.0 on). Without it every move of
/// a process into a cgroup (each container process is placed in its container's) waits for an
/// RCU grace period, which the guest kernel here makes last 0.1-0.3 s; with it the lock behind
/// those moves stays in its slow, always-ready mode, and forks and exits take it at a small
/// cost. A kernel without the option keeps working as before.
fn favor_cgroup_changes() {
    match sys::remount(c"/sys/fs/cgroup", NOSUID_NODEV_NOEXEC, c"favordynmods") {
        Ok(()) => log::debug!("cgroup2 remounted with favordynmods"),
        Err(e) => log::warn!(
            "cgroup2: no favordynmods ({e}): moving a process into a cgroup waits for RCU"
        ),
    }
}

/// Reaps every child that exits, forever, on a thread of its own, and hands each exit to the
/// container registry (which ignores PIDs that are not its processes).
fn start_reaper(containers: Arc<Containers>) -> Result<(), InitError> {
    let reaper = sys::ChildReaper::new().map_err(InitError::Reaper)?;
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || loop {
            match reaper.wait() {
                Ok(reaped) => {
                    for r in reaped {
                        log::debug!("reaped pid {} (wait status {:#x})", r.pid, r.status);
                        containers.on_exit(r.pid, r.status);
                    }
                }
                Err(e) => {
                    log::error!("child reaper: {e}; orphans are no longer reaped");
                    return;
                }
            }
        })
        .map_err(InitError::Reaper)?;
    Ok(())
}

/// Brings PID 1 up and serves the agent API; returns only on an error. `SIGCHLD` must have been
/// blocked ([`sys::block_sigchld`]) before any thread started.
pub fn run() -> Result<std::convert::Infallible, InitError> {
    mount_all()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(InitError::Cmdline)?;
    if let Some(level) = logger::level_from_cmdline(&cmdline) {
        logger::init(level);
    }
    favor_cgroup_changes();
    log::debug!("kernel command line: {}", cmdline.trim());
    // The registry of containers: the reaper routes exits to it; the RPC service will call it.
    let containers = Arc::new(Containers::new());
    start_reaper(containers.clone())?;
    let release = sys::kernel_release().map_err(InitError::KernelRelease)?;

    // Binding to VMADDR_CID_ANY succeeds even without a transport; without this check a guest
    // with no vsock device would idle forever, unreachable.
    let cid = sys::vsock_local_cid()
        .map_err(InitError::VsockCid)?
        .ok_or(InitError::NoVsock)?;
    log::debug!("vsock CID {cid}");

    // Before serving: a template is snapshotted once the agent answers.
    match crate::network::bring_up_dark() {
        Ok(nics) => log::debug!("up without addresses: lo, {nics:?}"),
        Err(e) => {
            log::warn!("cannot bring the interfaces up at boot (a pod's network does it): {e}")
        }
    }
    let service = AgentService::new(release.clone(), Arc::new(power_off_or_die));
    service.set_refresh_action(Arc::new(crate::refresh::SystemRefresh));
    service.set_pod(Arc::new(crate::pod::Pod::new(
        containers,
        Box::new(crate::stdio::VsockListen),
        Box::new(crate::sandbox::GuestOs),
        std::path::PathBuf::from("/sys/fs/cgroup"),
    )));
    let addr = format!("vsock://-1:{AGENT_VSOCK_PORT}");
    let _server = service.serve(&addr).map_err(InitError::Serve)?;
    // Port-forward is one feature of the pod, not the agent's reason to be: without it the
    // API still serves.
    if let Err(e) = crate::forward::serve_vsock() {
        log::error!("cannot serve port-forward on vsock port {PORT_FORWARD_VSOCK_PORT}: {e}");
    }
    // The guest's uptime splits the boot time into kernel and agent (the log's own clock
    // starts with the agent).
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    // The clocksource says whether clock reads stay in user mode (tsc, kvm-clock) or are
    // system calls (jiffies), which a slow guest kernel makes costly.
    let clocksource =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_default();
    log::info!(
        "nutshell-agent {} serving on vsock port {AGENT_VSOCK_PORT} (kernel {release}, uptime {}s, clocksource {})",
        env!("CARGO_PKG_VERSION"),
        uptime.split_whitespace().next().unwrap_or("?"),
        clocksource.trim()
    );
    // The server runs on its own threads; PID 1 must not return.
    loop {
        std::thread::park();
    }
}

/// The default log level before the command line is read.
pub const DEFAULT_LEVEL: LevelFilter = LevelFilter::Info;

/// Syncs and powers off; if even that fails, exits, which panics the kernel: the VMM then exits
/// with status 2 instead of the guest hanging.
pub fn power_off_or_die() {
    let err = sys::power_off();
    log::error!("power off failed: {err}; exiting (kernel panic)");
    std::process::exit(1);
}

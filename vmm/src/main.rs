//! `nutshell-vmm`: boots one microVM and runs it until the guest powers off.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nutshell_vmm::api::{ControlService, ControlSocket, SharedVm};
use nutshell_vmm::arch::x86_64::cpuid::CpuProfile;
use nutshell_vmm::devices::virtio::fs::FsConfig;
use nutshell_vmm::devices::virtio::manager::{Backend, DeviceConfig};
use nutshell_vmm::devices::virtio::net::tap::Tap;
use nutshell_vmm::devices::virtio::net::{NetConfig, DEFAULT_MAC};
use nutshell_vmm::devices::virtio::vsock::VsockConfig;
use nutshell_vmm::jail::{self, JailSpec, Role};
use nutshell_vmm::seccomp::{self, ThreadKind};
use nutshell_vmm::{
    boot_linux, Console, CpuProfileChoice, LinuxConfig, MachineConfig, RestoreConfig, RunningVm,
    Vm, VmExit,
};

/// Boots a Linux guest in a KVM microVM and runs it until the guest powers off or reboots.
///
/// Exit status: 0 when the guest powered off or rebooted or the VMM was stopped by
/// SIGTERM/SIGINT; 1 on an error (bad input, KVM failure, triple fault); 2 when the guest
/// kernel panicked.
#[derive(Debug, Parser)]
#[command(name = "nutshell-vmm", version, about, long_about)]
struct Args {
    /// Uncompressed vmlinux with a PVH entry (e.g. target/nutshell/vmlinux).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["restore", "print_machine_id"]
    )]
    kernel: Option<PathBuf>,

    /// Initrd: an uncompressed newc cpio archive (see nutshell-initramfs).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line chosen by the user; the VMM appends what its devices need
    /// (console=ttyS0 reboot=k panic=-1 ...).
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,

    /// Restore the VM snapshotted in this directory instead of booting a kernel; its memory,
    /// vCPUs and devices come from the snapshot. A vsock device in the snapshot is attached to
    /// the new socket given with --vsock-uds, a virtio-fs device to the directory given with
    /// --shared-dir (its tag is the snapshot's).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "memory_mib", "vcpus", "nic_without_tap"]
    )]
    restore: Option<PathBuf>,

    /// With --restore: refuse the snapshot unless it is the template of this key.
    #[arg(long, value_name = "KEY")]
    template_key: Option<String>,

    /// Print what restoring a snapshot on this host depends on beyond the snapshot's files
    /// (VMM version, snapshot format, the resolved CPU profile and the guest CPUID hash for
    /// --vcpus), one line, and exit. A snapshot cache (nutshell-template, the shim) keys its
    /// snapshots by it; --restore refuses a snapshot taken with another CPUID anyway.
    #[arg(long, conflicts_with_all = ["restore", "kernel", "jail"])]
    print_machine_id: bool,

    /// Serve the VMM control API (ttrpc: Pause, Resume, Snapshot, Stats, Shutdown) on this Unix
    /// socket; it is removed at exit. Snapshot writes into a directory the VMM can see (when
    /// jailed: one under a directory of --console, --vsock-uds or --api-sock).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,

    /// Guest memory in MiB. Pages cost host memory only once the guest touches them.
    #[arg(long, value_name = "N", default_value_t = 128)]
    memory_mib: u64,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,

    /// Write the guest console (COM1) to this file instead of standard output.
    #[arg(long, value_name = "PATH")]
    console: Option<PathBuf>,

    /// Guest CPU features: auto (compat on kvm_pvm hosts, host elsewhere), host (all that KVM
    /// supports) or compat (hide what a software-emulated ring 0 cannot run).
    #[arg(long, value_enum, default_value_t = ProfileArg::Auto)]
    cpu_profile: ProfileArg,

    /// Add a virtio-vsock device: the VMM listens on this Unix socket (a client writes
    /// `CONNECT <port>\n`, reads `OK <hostport>\n`, then talks to the guest's vsock port), and
    /// guest connections to host port P go to the Unix socket `PATH_P`.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,

    /// The guest's vsock context id (with --vsock-uds).
    #[arg(long, value_name = "N", default_value_t = nutshell_vmm::devices::virtio::vsock::DEFAULT_GUEST_CID)]
    vsock_cid: u64,

    /// Add a virtio-fs device exporting this host directory (the sandbox's shared directory);
    /// the guest mounts it with `mount -t virtiofs TAG /mnt`. With --restore, the snapshot's
    /// virtio-fs device exports this directory.
    #[arg(long, value_name = "PATH")]
    shared_dir: Option<PathBuf>,

    /// The virtio-fs tag (with --shared-dir), 1 to 36 bytes.
    #[arg(long, value_name = "TAG", default_value = nutshell_vmm::devices::virtio::fs::DEFAULT_TAG, requires = "shared_dir")]
    fs_tag: String,

    /// Add a virtio-net device on this inherited descriptor of a tap (created with
    /// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, in the network namespace the VMM runs in; the VMM
    /// opens nothing by name). With --restore, the snapshot's NIC runs on this one.
    #[arg(long, value_name = "FD")]
    net_fd: Option<i32>,

    /// Add a virtio-net device without a tap (the guest's packets go nowhere), for a snapshot
    /// whose restores attach their own tap with --net-fd (a template).
    #[arg(long, conflicts_with = "net_fd")]
    nic_without_tap: bool,

    /// The MAC address in the NIC's config space (with --net-fd, for a cold boot; a restored
    /// NIC keeps its template's, and the agent sets the pod's).
    #[arg(long, value_name = "MAC", value_parser = parse_mac, requires = "net_fd")]
    net_mac: Option<[u8; 6]>,

    /// Run jailed: this process stays a small supervisor and forks the VMM into new PID,
    /// mount, IPC and UTS namespaces with a root that holds only the files this VM needs, no
    /// capabilities but the virtio-fs server's, no_new_privs, and per-thread seccomp filters
    /// (see docs/security.md). The exit status is the VMM's.
    #[arg(long)]
    jail: bool,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: log::LevelFilter,
}

/// `aa:bb:cc:dd:ee:ff`, a unicast address.
fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mac = nutshell_protocol::netlink::parse_mac(text)
        .ok_or_else(|| format!("{text:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    if mac[0] & 1 != 0 {
        return Err(format!("{text:?} is a multicast address"));
    }
    Ok(mac)
}

/// Takes over the tap descriptor of `--net-fd`.
fn take_tap(fd: Option<i32>) -> anyhow::Result<Option<Tap>> {
    let Some(fd) = fd else { return Ok(None) };
    let owned =
        nutshell_vmm::sys::take_inherited_fd(fd).with_context(|| format!("--net-fd {fd}"))?;
    let tap = Tap::from_fd(owned).with_context(|| format!("--net-fd {fd}"))?;
    log::info!("virtio-net on tap {} (descriptor {fd})", tap.name());
    Ok(Some(tap))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProfileArg {
    Auto,
    Host,
    Compat,
}

fn main() -> ExitCode {
    let started_at = Instant::now();
    let mut args = Args::parse();
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .parse_default_env()
        .format_target(false)
        .init();
    if args.jail {
        match jail(&mut args) {
            Ok(Role::Jailed) => {}
            Ok(Role::Supervisor(status)) => jail::mirror(status),
            Err(e) => {
                eprintln!("nutshell-vmm: error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    match run(args, started_at) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(exit)) => {
            if exit.is_clean() {
                log::info!("VM exit: {exit}");
            } else {
                log::error!("VM exit: {exit}");
            }
            ExitCode::from(exit.exit_code())
        }
        Err(e) => {
            eprintln!("nutshell-vmm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn restore(
    dir: &Path,
    args: &Args,
    tap: Option<Tap>,
    cpu_profile: CpuProfileChoice,
    started_at: Instant,
    expect: (Option<String>, Option<u8>, Option<u64>),
) -> anyhow::Result<RunningVm> {
    let vm = Vm::restore(
        dir,
        RestoreConfig {
            console: console(args),
            cpu_profile,
            started_at: Some(started_at),
            expect_vcpus: expect.1,
            expect_memory_mib: expect.2,
            expect_template_key: expect.0,
            backends: backends(args, tap),
        },
    )?
    .start()?;
    log::info!(
        "restored {} in {:.2} ms",
        dir.display(),
        started_at.elapsed().as_secs_f64() * 1e3
    );
    Ok(vm)
}

/// The host side of each device a restore re-attaches, from the command line.
fn backends(args: &Args, tap: Option<Tap>) -> Vec<Backend> {
    let vsock = args.vsock_uds.clone().map(Backend::Vsock);
    let fs = args.shared_dir.clone().map(Backend::Fs);
    let net = tap.map(Backend::Net);
    vsock.into_iter().chain(fs).chain(net).collect()
}

/// The devices of a cold-booted VM, from the command line.
fn devices(args: &Args, tap: Option<Tap>) -> Vec<DeviceConfig> {
    let vsock = args.vsock_uds.clone().map(|uds_path| {
        DeviceConfig::Vsock(VsockConfig {
            guest_cid: args.vsock_cid,
            uds_path,
        })
    });
    let fs = args.shared_dir.clone().map(|shared_dir| {
        DeviceConfig::Fs(FsConfig {
            shared_dir,
            tag: args.fs_tag.clone(),
        })
    });
    let net = match tap {
        Some(tap) => Some(Some(tap)),
        None if args.nic_without_tap => Some(None),
        None => None,
    }
    .map(|tap| {
        DeviceConfig::Net(NetConfig {
            mac: args.net_mac.unwrap_or(DEFAULT_MAC),
            tap,
        })
    });
    vsock.into_iter().chain(fs).chain(net).collect()
}

fn console(args: &Args) -> Console {
    args.console.clone().map_or(Console::Stdout, Console::File)
}

fn cold_boot(
    args: &Args,
    tap: Option<Tap>,
    cpu_profile: CpuProfileChoice,
    started_at: Instant,
) -> anyhow::Result<RunningVm> {
    let kernel = args
        .kernel
        .clone()
        .context("--kernel or --restore is needed")?;
    Ok(boot_linux(LinuxConfig {
        kernel,
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        machine: MachineConfig {
            memory_mib: args.memory_mib,
            vcpus: args.vcpus,
            console: console(args),
            cpu_profile,
            started_at: Some(started_at),
            devices: devices(args, tap),
        },
    })?)
}

/// What the jailed VMM sees: the files its command line names.
fn jail_spec(args: &Args) -> JailSpec {
    let parent = |p: &PathBuf| {
        std::path::absolute(p)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
    };
    let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
    let read_only = [&args.kernel, &args.initrd, &args.restore]
        .into_iter()
        .flatten()
        .map(absolute)
        .collect();
    let read_write = [&args.vsock_uds, &args.console, &args.api_sock]
        .into_iter()
        .flatten()
        .filter_map(parent)
        .chain(args.shared_dir.iter().map(absolute))
        .collect();
    JailSpec {
        read_only,
        read_write,
        shared_dir: args.shared_dir.as_ref().map(absolute),
    }
}

/// Enters the jail (see [`jail::enter`]); in the jailed VMM, turns the seccomp filters on.
fn jail(args: &mut Args) -> anyhow::Result<Role> {
    // Decided before the jail hides /sys.
    nutshell_vmm::host::detect_flavour();
    if matches!(args.cpu_profile, ProfileArg::Auto) {
        args.cpu_profile = match CpuProfileChoice::Auto.resolve() {
            CpuProfile::Host => ProfileArg::Host,
            CpuProfile::Compat => ProfileArg::Compat,
        };
    }
    let role = jail::enter(&jail_spec(args))?;
    if matches!(role, Role::Jailed) {
        let mode = seccomp::configure(seccomp::Mode::Kill)?;
        log::info!("seccomp filters: {mode:?}");
    }
    Ok(role)
}

/// Runs the VM to its end; `None` when there was no VM to run (--print-machine-id).
fn run(args: Args, started_at: Instant) -> anyhow::Result<Option<VmExit>> {
    let signals = StopSignals::block().context("cannot set up signal handling")?;
    let cpu_profile = match args.cpu_profile {
        ProfileArg::Auto => CpuProfileChoice::Auto,
        ProfileArg::Host => CpuProfileChoice::Fixed(CpuProfile::Host),
        ProfileArg::Compat => CpuProfileChoice::Fixed(CpuProfile::Compat),
    };
    if args.print_machine_id {
        println!("{}", machine_id(cpu_profile, args.vcpus)?);
        return Ok(None);
    }
    if args.template_key.is_some() && args.restore.is_none() {
        anyhow::bail!("--template-key is used with --restore only");
    }
    let tap = take_tap(args.net_fd)?;
    let vm = if let Some(dir) = &args.restore {
        restore(
            dir,
            &args,
            tap,
            cpu_profile,
            started_at,
            (args.template_key.clone(), None, None),
        )?
    } else {
        cold_boot(&args, tap, cpu_profile, started_at)?
    };
    let exit = vm.exit_handle();
    let shared: SharedVm = Arc::new(Mutex::new(Some(vm)));
    // The control socket's threads inherit the filter of the thread that starts them.
    let api = args
        .api_sock
        .clone()
        .map(|path| {
            let service = ControlService::new(shared.clone(), exit.clone(), started_at);
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || {
                    // The control socket never acts for guest users.
                    jail::drop_thread_capabilities();
                    seccomp::install_or_exit(ThreadKind::Api);
                    ControlSocket::serve(&path, service)
                })
                .context("spawn the control socket's thread")?
                .join()
                .map_err(|_| anyhow::anyhow!("the control socket's thread panicked"))?
                .map_err(anyhow::Error::from)
        })
        .transpose()?;
    seccomp::install(ThreadKind::Main)?;
    if let Some(signal) = signals.wait_or(&*exit) {
        exit.request(VmExit::Stopped(format!("received {signal}")));
    }
    if let Some(api) = api {
        api.stop();
    }
    let vm = shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .context("the VM is gone")?;
    Ok(Some(vm.wait()))
}

/// What a restore on this host depends on beyond the snapshot's files (--print-machine-id).
fn machine_id(cpu_profile: CpuProfileChoice, vcpus: u8) -> anyhow::Result<String> {
    let profile = cpu_profile.resolve();
    let cpuid = nutshell_vmm::vm::guest_cpuid_hash(profile, vcpus)
        .context("the guest CPUID of this host")?;
    Ok(format!(
        "nutshell-vmm {} snapshot-format {} cpu-profile {profile} vcpus {vcpus} cpuid {cpuid:08x}",
        nutshell_vmm::snapshot::VMM_VERSION,
        nutshell_vmm::snapshot::FORMAT_VERSION
    ))
}

/// SIGTERM, SIGINT and SIGHUP, blocked in every thread and read from a signalfd, so that a
/// stop request is handled in one place and the VM is torn down cleanly.
struct StopSignals {
    fd: SignalFd,
}

impl StopSignals {
    const SIGNALS: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

    /// Blocks the signals in this thread (threads spawned later inherit the mask).
    fn block() -> std::io::Result<Self> {
        let mut set = SigSet::empty();
        for s in Self::SIGNALS {
            set.add(s);
        }
        set.thread_block()?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC)?;
        Ok(StopSignals { fd })
    }

    /// Waits until either a stop signal arrives (returns its name) or `other` is readable.
    fn wait_or(&self, other: &dyn AsRawFd) -> Option<&'static str> {
        loop {
            let ready =
                nutshell_vmm::sys::wait_readable(&[self.fd.as_fd().as_raw_fd(), other.as_raw_fd()])
                    .ok()?;
            if ready[0] {
                if let Ok(Some(info)) = self.fd.read_signal() {
                    return Some(match Signal::try_from(info.ssi_signo as libc::c_int) {
                        Ok(Signal::SIGTERM) => "SIGTERM",
                        Ok(Signal::SIGINT) => "SIGINT",
                        _ => "SIGHUP",
                    });
                }
            }
            if ready[1] {
                return None;
            }
        }
    }
}

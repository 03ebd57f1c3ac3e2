//! `nutshell-vmm`: boots one microVM and runs it until the guest powers off.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use nutshell_vmm::arch::x86_64::cpuid::CpuProfile;
use nutshell_vmm::devices::virtio::fs::FsConfig;
use nutshell_vmm::devices::virtio::vsock::VsockConfig;
use nutshell_vmm::{
    boot_linux, Console, CpuProfileChoice, LinuxConfig, MachineConfig, RestoreConfig, Vm, VmExit,
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
    #[arg(long, value_name = "PATH", required_unless_present = "restore")]
    kernel: Option<PathBuf>,

    /// Initrd: an uncompressed newc cpio archive (see nutshell-initramfs).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line chosen by the user; the VMM appends what its devices need
    /// (console=ttyS0 reboot=k panic=-1 ...).
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,

    /// Restore the VM snapshotted in this directory instead of booting a kernel; its memory,
    /// vCPUs and devices come from the snapshot.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["kernel", "initrd", "cmdline", "memory_mib", "vcpus", "vsock_uds", "shared_dir"]
    )]
    restore: Option<PathBuf>,

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
    /// the guest mounts it with `mount -t virtiofs TAG /mnt`.
    #[arg(long, value_name = "PATH")]
    shared_dir: Option<PathBuf>,

    /// The virtio-fs tag (with --shared-dir), 1 to 36 bytes.
    #[arg(long, value_name = "TAG", default_value = nutshell_vmm::devices::virtio::fs::DEFAULT_TAG, requires = "shared_dir")]
    fs_tag: String,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: log::LevelFilter,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProfileArg {
    Auto,
    Host,
    Compat,
}

fn main() -> ExitCode {
    let started_at = Instant::now();
    let args = Args::parse();
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .parse_default_env()
        .format_target(false)
        .init();
    match run(args, started_at) {
        Ok(exit) => {
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

fn run(args: Args, started_at: Instant) -> anyhow::Result<VmExit> {
    let signals = StopSignals::block().context("cannot set up signal handling")?;
    let console = args.console.map_or(Console::Stdout, Console::File);
    let cpu_profile = match args.cpu_profile {
        ProfileArg::Auto => CpuProfileChoice::Auto,
        ProfileArg::Host => CpuProfileChoice::Fixed(CpuProfile::Host),
        ProfileArg::Compat => CpuProfileChoice::Fixed(CpuProfile::Compat),
    };
    let vm = if let Some(dir) = args.restore {
        let vm = Vm::restore(
            &dir,
            RestoreConfig {
                console,
                cpu_profile,
                started_at: Some(started_at),
                expect_vcpus: None,
                expect_memory_mib: None,
            },
        )?
        .start()?;
        log::info!(
            "restored {} in {:.2} ms",
            dir.display(),
            started_at.elapsed().as_secs_f64() * 1e3
        );
        vm
    } else {
        let kernel = args.kernel.context("--kernel or --restore is needed")?;
        boot_linux(LinuxConfig {
            kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
            machine: MachineConfig {
                memory_mib: args.memory_mib,
                vcpus: args.vcpus,
                console,
                cpu_profile,
                started_at: Some(started_at),
                vsock: args.vsock_uds.map(|uds_path| VsockConfig {
                    guest_cid: args.vsock_cid,
                    uds_path,
                }),
                fs: args.shared_dir.map(|shared_dir| FsConfig {
                    shared_dir,
                    tag: args.fs_tag,
                }),
            },
        })?
    };
    let exit = vm.exit_handle();
    if let Some(signal) = signals.wait_or(&*exit) {
        exit.request(VmExit::Stopped(format!("received {signal}")));
    }
    Ok(vm.wait())
}

/// SIGTERM, SIGINT and SIGHUP, blocked in every thread and read from a signalfd, so that a
/// stop request is handled in one place and the VM is torn down cleanly.
struct StopSignals {
    fd: std::os::fd::OwnedFd,
}

impl StopSignals {
    const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

    /// Blocks the signals in this thread (threads spawned later inherit the mask).
    fn block() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: `set` is a plain sigset_t, initialised by sigemptyset before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is valid and writable; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in Self::SIGNALS {
                libc::sigaddset(&mut set, s);
            }
        }
        // SAFETY: `set` is initialised; the old mask is not needed.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        // SAFETY: `set` is initialised; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        Ok(StopSignals { fd })
    }

    /// Waits until either a stop signal arrives (returns its name) or `other` is readable.
    fn wait_or(&self, other: &dyn std::os::fd::AsRawFd) -> Option<&'static str> {
        use std::os::fd::AsRawFd;
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: other.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return None;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                // SAFETY: signalfd_siginfo is plain data; the read fills at most its size.
                let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
                // SAFETY: reading into `info`, a writable buffer of the given size.
                let n = unsafe {
                    libc::read(
                        self.fd.as_raw_fd(),
                        (&mut info as *mut libc::signalfd_siginfo).cast(),
                        std::mem::size_of::<libc::signalfd_siginfo>(),
                    )
                };
                if n > 0 {
                    return Some(match info.ssi_signo as libc::c_int {
                        libc::SIGTERM => "SIGTERM",
                        libc::SIGINT => "SIGINT",
                        _ => "SIGHUP",
                    });
                }
            }
            if fds[1].revents != 0 {
                return None;
            }
        }
    }
}

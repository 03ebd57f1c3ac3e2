//! Per-thread seccomp filters: one allow-list per kind of thread of the VMM, installed by the
//! thread itself before it serves the guest (a vCPU before its first `KVM_RUN`, a device's
//! event loop before its first wait). Anything else kills the process (`SIGSYS`).
//!
//! | thread | spawned by | serves |
//! |---|---|---|
//! | main | — | start-up, template build, then waits for a stop signal and tears the VM down |
//! | `vcpuN` | main | `KVM_RUN` exits: port I/O and MMIO (console, virtio-mmio registers) |
//! | `vsock` | main | the vsock device: guest packets ↔ Unix sockets |
//! | `virtio-fs` | main | FUSE requests on the shared directory |
//! | `virtio-net` | main | frames between the guest and the tap |
//! | api | main | the control socket (ttrpc; its worker threads inherit the filter) |
//!
//! The filters are on only when [`configure`] turned them on (the `nutshell-vmm` binary does
//! with `--jail`); in a library user (the tests) [`install`] does nothing.
//! `NUTSHELL_VMM_SECCOMP=log` logs refused system calls (audit log, `dmesg`) instead of
//! killing; `off` turns the filters off. `NUTSHELL_VMM_TEST_SIGSYS=<kind>` makes the thread of
//! that kind issue a forbidden system call right after its filter is in place (a test hook:
//! the call is `reboot` with bad arguments, harmless even where it is let through).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The kinds of threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread.
    Main,
    /// A vCPU.
    Vcpu,
    /// The vsock device's event loop.
    Vsock,
    /// The virtio-fs device's event loop.
    Fs,
    /// The virtio-net device's event loop.
    Net,
    /// The control socket.
    Api,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Vsock,
        ThreadKind::Fs,
        ThreadKind::Net,
        ThreadKind::Api,
    ];

    /// The name used in `NUTSHELL_VMM_TEST_SIGSYS` and the logs.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Fs => "fs",
            ThreadKind::Net => "net",
            ThreadKind::Api => "api",
        }
    }

    /// The kind of a virtio device's thread, by the device's name.
    pub fn of_device(name: &str) -> Option<ThreadKind> {
        match name {
            "vsock" => Some(ThreadKind::Vsock),
            "virtio-fs" => Some(ThreadKind::Fs),
            "virtio-net" => Some(ThreadKind::Net),
            _ => None,
        }
    }
}

/// What a refused system call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No filters.
    Off,
    /// Kill the process (the default with filters on).
    Kill,
    /// Log it and let it through (to find what a thread needs).
    Log,
}

/// Errors of building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built.
    #[error("seccomp filter for the {0} thread")]
    Build(&'static str, #[source] seccompiler::BackendError),
    /// The filter could not be installed.
    #[error("install the seccomp filter of the {0} thread")]
    Install(&'static str, #[source] seccompiler::Error),
    /// `NUTSHELL_VMM_SECCOMP` has a value other than `kill`, `log` or `off`.
    #[error("NUTSHELL_VMM_SECCOMP={0:?}: expected kill, log or off")]
    BadMode(String),
}

#[derive(Debug)]
struct Settings {
    mode: Mode,
    test_sigsys: Option<String>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Turns the filters on (`Mode::Kill`, unless `NUTSHELL_VMM_SECCOMP` says otherwise) for every
/// thread that calls [`install`] from now on. Once per process; later calls change nothing.
pub fn configure(mode: Mode) -> Result<Mode, SeccompError> {
    let mode = match std::env::var("NUTSHELL_VMM_SECCOMP").ok().as_deref() {
        None | Some("") => mode,
        Some("kill") => Mode::Kill,
        Some("log") => Mode::Log,
        Some("off") => Mode::Off,
        Some(other) => return Err(SeccompError::BadMode(other.to_owned())),
    };
    let settings = SETTINGS.get_or_init(|| Settings {
        mode,
        test_sigsys: std::env::var("NUTSHELL_VMM_TEST_SIGSYS").ok(),
    });
    Ok(settings.mode)
}

/// The mode in force.
pub fn mode() -> Mode {
    SETTINGS.get().map_or(Mode::Off, |s| s.mode)
}

/// Installs the filter of `kind` on the calling thread (when filters are on).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(settings) = SETTINGS.get() else {
        return Ok(());
    };
    let action = match settings.mode {
        Mode::Off => return Ok(()),
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let program = program(kind, action)?;
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install(kind.name(), e))?;
    if settings.test_sigsys.as_deref() == Some(kind.name()) {
        log::warn!(
            "NUTSHELL_VMM_TEST_SIGSYS: the {} thread makes a forbidden system call",
            kind.name()
        );
        crate::sys::forbidden_syscall();
    }
    Ok(())
}

/// Installs the filter of `kind`, and ends the process if that fails: a thread that serves
/// the guest never runs unfiltered when filters are on.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        log::error!("{}", nutshell_protocol::error_chain(&e));
        std::process::exit(1);
    }
}

/// The compiled filter of `kind`, refusing with `mismatch`.
pub fn program(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let rules = rules(kind).map_err(|e| SeccompError::Build(kind.name(), e))?;
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .and_then(BpfProgram::try_from)
        .map_err(|e| SeccompError::Build(kind.name(), e))
}

/// What every thread does: memory, locks, time, signals, logging, ending.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_gettid,
    libc::SYS_getpid,
    // A panic aborts: abort(3) raises SIGABRT.
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Files by descriptor and by name (the main thread's start-up and teardown, the control
/// socket's snapshots).
const FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    // std's create_dir on x86_64 (a Snapshot over the control socket makes its directory).
    libc::SYS_mkdir,
    libc::SYS_unlinkat,
    libc::SYS_unlink,
    libc::SYS_rmdir,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_rename,
    libc::SYS_readlink,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_dup,
    libc::SYS_dup3,
];

/// Threads of a thread pool: spawning, joining.
const THREADS: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
];

/// Sockets and polling (vsock, the control socket, the main thread's wait).
const SOCKETS: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_socketpair,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
];

/// What the virtio-fs server does on the shared directory, acting for guest users.
const FS_SERVER: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_copy_file_range,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    // Acting for a guest user: per-thread effective uid and gid, umask for creation.
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
    libc::SYS_umask,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// What a virtio-fs reset does on the vCPU that wrote the status register: the passthrough
/// forgets its inodes and opens the shared directory's root again.
const FS_RESET: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_fcntl,
    libc::SYS_umask,
];

/// ioctl types a thread may use (the high byte of the request number's low 16 bits).
const KVM_IOCTL: u64 = 0xAE;
const TUN_IOCTL: u64 = 0x54;

fn ioctl_of_types(types: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    types
        .iter()
        .map(|t| {
            SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(0xff00),
                t << 8,
            )?])
        })
        .collect()
}

fn ioctl_requests(requests: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    requests
        .iter()
        .map(|r| {
            SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                *r,
            )?])
        })
        .collect()
}

/// The allow-list of `kind`: system call number → rules (empty: always allowed).
pub fn rules(
    kind: ThreadKind,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |list: &[i64]| {
        for nr in list {
            rules.insert(*nr, Vec::new());
        }
    };
    allow(COMMON);
    let ioctl = match kind {
        ThreadKind::Main => {
            allow(FILES);
            allow(SOCKETS);
            allow(THREADS);
            // Teardown stops the VM; start-up checks the tap (and a terminal, TCGETS).
            Some(ioctl_of_types(&[KVM_IOCTL, TUN_IOCTL])?)
        }
        // KVM_RUN and the vCPU's state; a tap's offloads when the guest starts its NIC (the
        // activation runs on the vCPU that wrote the status register); a virtio-fs reset by
        // the guest's driver (same path) reopens the shared directory's root.
        ThreadKind::Vcpu => {
            allow(FS_RESET);
            Some(ioctl_of_types(&[KVM_IOCTL, TUN_IOCTL])?)
        }
        ThreadKind::Vsock => {
            allow(SOCKETS);
            // Non-blocking mode of accepted and connected sockets, bytes waiting.
            Some(ioctl_requests(&[libc::FIONBIO, libc::FIONREAD])?)
        }
        ThreadKind::Fs => {
            allow(FS_SERVER);
            None
        }
        ThreadKind::Net => {
            allow(&[
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
            ]);
            Some(ioctl_of_types(&[TUN_IOCTL])?)
        }
        ThreadKind::Api => {
            allow(FILES);
            allow(SOCKETS);
            allow(THREADS);
            // Pause and snapshot read the vCPUs' and the VM's state.
            Some(ioctl_of_types(&[KVM_IOCTL, TUN_IOCTL])?)
        }
    };
    if let Some(rule) = ioctl {
        rules.insert(libc::SYS_ioctl, rule);
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_kind_compiles() {
        for kind in ThreadKind::ALL {
            let p = program(kind, SeccompAction::KillProcess).unwrap();
            assert!(!p.is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn no_thread_may_exec_or_trace() {
        for kind in ThreadKind::ALL {
            let r = rules(kind).unwrap();
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_reboot,
                libc::SYS_bpf,
                libc::SYS_init_module,
            ] {
                assert!(!r.contains_key(&nr), "{kind:?} allows {nr}");
            }
        }
        // Only the fs server changes credentials.
        for kind in ThreadKind::ALL {
            let r = rules(kind).unwrap();
            assert_eq!(
                r.contains_key(&libc::SYS_setresuid),
                kind == ThreadKind::Fs,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn device_names_map_to_kinds() {
        assert_eq!(ThreadKind::of_device("vsock"), Some(ThreadKind::Vsock));
        assert_eq!(ThreadKind::of_device("virtio-fs"), Some(ThreadKind::Fs));
        assert_eq!(ThreadKind::of_device("virtio-net"), Some(ThreadKind::Net));
        assert_eq!(ThreadKind::of_device("x"), None);
    }

    #[test]
    fn a_filtered_thread_is_killed_by_a_forbidden_call() {
        // In a forked child, so that the kill does not take the test process.
        // SAFETY: the child makes system calls only (no allocation, no locks) and _exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let p = program(ThreadKind::Net, SeccompAction::KillProcess).unwrap();
                if seccompiler::apply_filter(&p).is_err() {
                    // SAFETY: ends the child at once.
                    unsafe { libc::_exit(3) };
                }
                // SAFETY: reboot with bad arguments; refused by the filter.
                unsafe { libc::syscall(libc::SYS_reboot, 0, 0, 0, 0) };
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert!(
                    matches!(
                        status,
                        nix::sys::wait::WaitStatus::Signaled(
                            _,
                            nix::sys::signal::Signal::SIGSYS,
                            _
                        )
                    ),
                    "{status:?}"
                );
            }
        }
    }
}

//! The system calls of the agent: all of the crate's `unsafe` is in this module.
//!
//! Calls that `nix` wraps safely go through `nix` (mount, umount2, reboot, uname, sethostname,
//! clock_settime, the signal mask and signalfd, sockets, poll, accept4, prctl). The rest are
//! raw calls, each with its `// SAFETY:` contract: clone (the child's rules are the caller's
//! contract), the vfork-style clone of a container process, its stack and its execve, set*id and
//! prlimit64 of the calling thread alone, `_exit`, `dup2` onto a fixed number, close_range,
//! pidfd_open and pidfd_send_signal (not in nix 0.32), setdomainname, waitpid (the raw wait
//! status is what the containers record), the terminal, vsock, network-flag and entropy ioctls,
//! seccomp(2) and the descriptors that arrive with SCM_RIGHTS.
//!
//! - [`boot`]: what PID 1 sets up in the guest (mounts, clock, entropy, power off).
//! - [`reaper`]: SIGCHLD on a signalfd, and reaping.
//! - [`vsock`]: the guest's vsock listeners.
//! - [`process`]: cloning and preparing a container process up to its execve.
//! - [`pty`]: terminals, and passing a descriptor over a Unix socket.

pub mod boot;
pub mod process;
pub mod pty;
pub mod reaper;
pub mod vsock;

pub use boot::{
    add_entropy, kernel_release, loopback_up, mount, mount_virtiofs, power_off, remount,
    reseed_crng, set_hostname, set_realtime_nanos, sync, unmount_lazy,
};
pub use process::{
    clone_fork, clone_vm_vfork, close_fds_except_sorted, close_from, dup_onto, exit_now,
    pidfd_open, pidfd_send_signal, prctl, seccomp_set_mode_filter, set_domainname, set_gid,
    set_groups, set_rlimit, set_uid, ChildStack, ExecArrays, Forked,
};
pub use pty::{
    open_pty_peer, pty_number, recv_fd, send_fd, set_controlling_terminal, set_window_size,
    unlock_pty,
};
pub use reaper::{block_sigchld, reap_exited, ChildReaper, Reaped};
pub use vsock::{
    accept_blocking, poll_readable, vsock_listen, vsock_listen_backlog, vsock_local_cid,
};

//! Starting a container's init or an exec'd process: the fork, the child's setup, and the
//! pipes between them.
//!
//! The agent is multi-threaded, so it forks once (libc's fork keeps the allocator usable) into
//! an intermediate process `I`; `I` (single-threaded) joins namespaces given by path and
//! clones the real process `P` with the new namespaces and `CLONE_PARENT`, so that `P` is the
//! agent's own child (its exit reaches the agent's reaper) and the PID 1 of a new PID
//! namespace. `I` reports `P`'s PID and exits. `P` then waits for "go" (the agent has placed
//! it in its cgroups), sets itself up, reports "ready", waits for "start" and execs.
//!
//! Two pipes, both close-on-exec: `report` (children → agent: framed messages, then EOF when
//! `P` execs) and `sync` (agent → `P`: one byte for "go", one for "start"). Errors in the
//! children before the exec travel as text over `report` and become the create error. For a
//! terminal, a third channel: a Unix socketpair over which `P`, once inside its root, sends the
//! master of the pty it opened there (see `tty`); it does so before "ready", so the agent
//! takes it right after "ready" without waiting.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::socket::{AddressFamily, SockFlag, SockType};
use nix::unistd::Pid;

use super::process::ProcessPlan;
use super::rootfs::RootfsPlan;
use super::step::{StepResult, Steps};
use super::tty;
use super::{ContainerError, Stdio};
use crate::sys::{self as syscall, Forked};

/// Frame tags on the report pipe.
const TAG_PID: u8 = b'P';
const TAG_READY: u8 = b'R';
const TAG_ERROR: u8 = b'E';
/// The longest error message a child sends (one write stays below PIPE_BUF: atomic).
const MAX_MESSAGE: usize = 2048;

/// Exit code of a child that failed before its exec.
const SETUP_FAILED: i32 = 127;

/// The container-wide part that only init does.
#[derive(Debug)]
pub struct InitPart {
    /// New namespaces for the clone (`CLONE_NEW*`, without cgroup).
    pub clone_flags: CloneFlags,
    /// Whether the process unshares a cgroup namespace after it was placed in its cgroup.
    pub new_cgroupns: bool,
    /// Mounts and root.
    pub rootfs: RootfsPlan,
    /// Hostname and domain name.
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    /// `net.*`, `kernel.*` … written under /proc/sys after the pivot.
    pub sysctls: Vec<(String, String)>,
}

/// What the child of one spawn does.
#[derive(Debug)]
pub struct SpawnPlan {
    /// Namespaces to join before the clone (init: paths from the spec).
    pub join: Vec<(File, CloneFlags)>,
    /// Exec: a pidfd of the container's init, whose namespaces the process enters. The spawn
    /// then takes one fork from a thread that entered them first (one `setns` through the
    /// pidfd), instead of a fork, a `setns` per namespace and a clone.
    pub enter: Option<OwnedFd>,
    /// Init only.
    pub init: Option<InitPart>,
    /// The process part.
    pub process: ProcessPlan,
    /// Compiled seccomp filter.
    pub seccomp: Option<seccompiler::BpfProgram>,
}

/// A spawned child, set up and waiting for "start".
#[derive(Debug)]
pub struct Pending {
    /// Its PID (in the agent's PID namespace).
    pub pid: Pid,
    sync: File,
    report: File,
}

/// The child's side of a spawn, before it execs.
struct ChildFds {
    sync: OwnedFd,
    report: OwnedFd,
    stdio: [Option<OwnedFd>; 3],
    devnull: OwnedFd,
    /// `P`'s end of the terminal socket.
    terminal: Option<OwnedFd>,
}

/// Forks and sets up the child up to the point where it waits for "start". `placed` is called
/// with the child's PID before it does anything in its new namespaces; an error there kills
/// the child. `on_pid` is called as soon as the PID is known, before the child can exit on its
/// own, so that the caller can route its exit status. With `terminal`, the child opens a pty
/// inside the container (and ignores `stdio`); the master comes back with the result, checked
/// to be a pty master.
pub fn spawn(
    plan: &SpawnPlan,
    stdio: Stdio,
    terminal: bool,
    on_pid: &mut dyn FnMut(Pid),
    placed: &dyn Fn(Pid) -> Result<(), super::HookError>,
) -> Result<(Pending, Option<OwnedFd>), ContainerError> {
    let io_err = |what: &'static str| move |e| ContainerError::Io { what, source: e };
    let (report_r, report_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| io_err("pipe")(e.into()))?;
    let (sync_r, sync_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| io_err("pipe")(e.into()))?;
    let devnull: OwnedFd = File::open("/dev/null")
        .map_err(io_err("open /dev/null"))?
        .into();
    let (terminal_ours, terminal_child) = if terminal {
        let (ours, child) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| io_err("socketpair")(e.into()))?;
        (Some(ours), Some(child))
    } else {
        (None, None)
    };
    let fds = ChildFds {
        sync: sync_r,
        report: report_w,
        stdio: [stdio.stdin, stdio.stdout, stdio.stderr],
        devnull,
        terminal: terminal_child,
    };
    let forked = std::time::Instant::now();
    let mut report = File::from(report_r);
    let mut sync = File::from(sync_w);
    let pid = match &plan.enter {
        // The agent's copies of the child's ends go in there: EOF on `report` means the child
        // execed or died.
        Some(pidfd) => fork_inside(plan, fds, pidfd.as_fd())?,
        None => {
            match syscall::fork().map_err(io_err("fork"))? {
                Forked::Child => intermediate(plan, fds),
                Forked::Parent(_) => {}
            }
            drop(fds);
            match read_frame(&mut report)? {
                Some((TAG_PID, payload)) if payload.len() == 4 => {
                    let pid = i32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    Pid::from_raw(pid)
                }
                Some((TAG_ERROR, msg)) => return Err(ContainerError::Setup(text(&msg))),
                Some(_) => return Err(ContainerError::Setup("bad message from the child".into())),
                None => {
                    return Err(ContainerError::Setup(
                        "the child exited during setup".into(),
                    ))
                }
            }
        }
    };
    let pid_after = forked.elapsed();
    on_pid(pid);
    let kill = |pid: Pid| {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    };
    if let Err(e) = placed(pid) {
        kill(pid);
        return Err(ContainerError::Hook(e));
    }
    if let Err(e) = sync.write_all(b"g") {
        kill(pid);
        return Err(ContainerError::Io {
            what: "signal the child",
            source: e,
        });
    }
    match read_frame(&mut report) {
        Ok(Some((TAG_READY, steps))) => {
            log::debug!(
                "spawn of pid {pid}: fork and clone {:.2} s, set-up {:.2} s ({})",
                pid_after.as_secs_f64(),
                forked.elapsed().saturating_sub(pid_after).as_secs_f64(),
                text(&steps)
            );
            let master = match terminal_ours.as_ref().map(receive_terminal).transpose() {
                Ok(master) => master,
                Err(e) => {
                    kill(pid);
                    return Err(e);
                }
            };
            Ok((Pending { pid, sync, report }, master))
        }
        Ok(Some((TAG_ERROR, msg))) => {
            kill(pid);
            Err(ContainerError::Setup(text(&msg)))
        }
        Ok(_) => {
            kill(pid);
            Err(ContainerError::Setup(
                "the child exited during setup".into(),
            ))
        }
        Err(e) => {
            kill(pid);
            Err(e)
        }
    }
}

/// The pty master the child sent over `socket` (already queued: it sends before "ready").
fn receive_terminal(socket: &OwnedFd) -> Result<OwnedFd, ContainerError> {
    let master = syscall::recv_fd(socket.as_fd())
        .map_err(|e| ContainerError::Setup(format!("terminal: no pty from the child: {e}")))?;
    tty::check_master(master.as_fd())?;
    Ok(master)
}

impl Pending {
    /// Lets the child exec and waits until it did (the report pipe closes on exec).
    pub fn start(mut self) -> Result<(), ContainerError> {
        self.sync.write_all(b"s").map_err(|e| ContainerError::Io {
            what: "start the child",
            source: e,
        })?;
        match read_frame(&mut self.report)? {
            None => Ok(()),
            Some((TAG_ERROR, msg)) => Err(ContainerError::Setup(text(&msg))),
            Some(_) => Err(ContainerError::Setup("bad message from the child".into())),
        }
    }
}

fn text(msg: &[u8]) -> String {
    String::from_utf8_lossy(msg).into_owned()
}

/// Reads one `[tag][u32 len][payload]` frame; `None` on EOF before a frame.
fn read_frame(report: &mut File) -> Result<Option<(u8, Vec<u8>)>, ContainerError> {
    let io = |e| ContainerError::Io {
        what: "read from the child",
        source: e,
    };
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match report.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(ContainerError::Setup(
                    "truncated message from the child".into(),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(ContainerError::Setup(
            "over-long message from the child".into(),
        ));
    }
    let mut payload = vec![0u8; len];
    report.read_exact(&mut payload).map_err(io)?;
    Ok(Some((head[0], payload)))
}

fn write_frame(fd: &OwnedFd, tag: u8, payload: &[u8]) {
    let payload = &payload[..payload.len().min(MAX_MESSAGE)];
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(tag);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    let _ = nix::unistd::write(fd, &frame);
}

/// Every namespace an exec'd process shares with the container's init.
const EXEC_NAMESPACES: CloneFlags = CloneFlags::CLONE_NEWNS
    .union(CloneFlags::CLONE_NEWPID)
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWUTS)
    .union(CloneFlags::CLONE_NEWNET)
    .union(CloneFlags::CLONE_NEWCGROUP);

/// Exec: forks the process from a thread of its own that first entered the namespaces of the
/// init behind `pidfd` (its own file system context, so that it may enter a mount namespace;
/// one `setns` for all of them). The thread ends with the fork; the child is the agent's own
/// and already in the container's PID namespace. Returns its PID.
fn fork_inside(
    plan: &SpawnPlan,
    fds: ChildFds,
    pidfd: std::os::fd::BorrowedFd<'_>,
) -> Result<Pid, ContainerError> {
    let io = |what: &'static str| {
        move |e: nix::Error| ContainerError::Io {
            what,
            source: e.into(),
        }
    };
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<Pid, ContainerError> {
                nix::sched::unshare(CloneFlags::CLONE_FS)
                    .map_err(io("unshare the file system context"))?;
                nix::sched::setns(pidfd, EXEC_NAMESPACES)
                    .map_err(io("enter the container's namespaces"))?;
                match syscall::fork().map_err(|e| ContainerError::Io {
                    what: "fork",
                    source: e,
                })? {
                    Forked::Child => {
                        close_inherited(plan, &fds);
                        run_child(plan, fds)
                    }
                    Forked::Parent(pid) => {
                        drop(fds);
                        Ok(pid)
                    }
                }
            })
            .join()
            .unwrap_or_else(|_| Err(ContainerError::Setup("the exec thread panicked".into())))
    })
}

/// In a forked child: closes every descriptor it inherited but its own (those of other
/// containers' spawns, inherited from other threads, would keep their report pipes open).
fn close_inherited(plan: &SpawnPlan, fds: &ChildFds) {
    let mut keep: Vec<RawFd> = vec![
        fds.sync.as_raw_fd(),
        fds.report.as_raw_fd(),
        fds.devnull.as_raw_fd(),
    ];
    keep.extend(fds.stdio.iter().flatten().map(|fd| fd.as_raw_fd()));
    keep.extend(fds.terminal.iter().map(|fd| fd.as_raw_fd()));
    keep.extend(plan.join.iter().map(|(f, _)| f.as_raw_fd()));
    if let Err(e) = syscall::close_fds_except(&keep) {
        fail(&fds.report, format!("close inherited descriptors: {e}"));
    }
}

/// The real child: its set-up, then the exec; a failure goes to the agent as text.
fn run_child(plan: &SpawnPlan, fds: ChildFds) -> ! {
    let report = fds.report.try_clone();
    match child(plan, fds) {
        Ok(never) => match never {},
        Err(msg) => {
            if let Ok(report) = report {
                fail(&report, msg)
            }
            syscall::exit_now(SETUP_FAILED)
        }
    }
}

/// The intermediate process: joins namespaces, clones the real child, reports its PID, exits.
fn intermediate(plan: &SpawnPlan, fds: ChildFds) -> ! {
    close_inherited(plan, &fds);
    for (ns, flag) in &plan.join {
        if let Err(e) = nix::sched::setns(ns.as_fd(), *flag) {
            fail(&fds.report, format!("join namespace {flag:?}: {e}"));
        }
    }
    let flags = plan
        .init
        .as_ref()
        .map(|i| i.clone_flags)
        .unwrap_or(CloneFlags::empty())
        | CloneFlags::CLONE_PARENT;
    match syscall::clone_fork(flags.bits()) {
        Err(e) => fail(&fds.report, format!("clone: {e}")),
        Ok(Forked::Parent(pid)) => {
            write_frame(&fds.report, TAG_PID, &pid.as_raw().to_le_bytes());
            syscall::exit_now(0)
        }
        Ok(Forked::Child) => run_child(plan, fds),
    }
}

fn fail(report: &OwnedFd, msg: String) -> ! {
    write_frame(report, TAG_ERROR, msg.as_bytes());
    syscall::exit_now(SETUP_FAILED)
}

/// Reads the one-byte command `what` from the agent; EOF (the agent gave up) ends the child.
fn wait_for(sync: &OwnedFd) {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(sync, &mut byte) {
            Ok(1) => return,
            Err(nix::Error::EINTR) => continue,
            _ => syscall::exit_now(SETUP_FAILED),
        }
    }
}

/// The real child, from "go" to execve.
fn child(plan: &SpawnPlan, fds: ChildFds) -> StepResult<std::convert::Infallible> {
    wait_for(&fds.sync);
    let mut steps = Steps::new();
    if let Some(init) = &plan.init {
        if init.new_cgroupns {
            nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
                .map_err(|e| format!("unshare the cgroup namespace: {e}"))?;
        }
    }
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    // A terminal is opened later, inside the container's root.
    if fds.terminal.is_none() {
        for (target, fd) in fds.stdio.iter().enumerate() {
            let fd = fd.as_ref().unwrap_or(&fds.devnull);
            syscall::dup_onto(fd.as_fd(), target as RawFd)
                .map_err(|e| format!("dup stdio: {e}"))?;
        }
    }
    // The originals of the descriptors now on 0-2 must not reach the container.
    for fd in fds.stdio.iter().flatten() {
        if fd.as_raw_fd() > 2 {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(|e| format!("mark stdio close-on-exec: {e}"))?;
        }
    }
    steps.mark("stdio");
    if let Some(init) = &plan.init {
        init.rootfs.prepare(&mut steps)?;
        for (key, value) in &init.sysctls {
            let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&path, value).map_err(|e| format!("sysctl {key}={value}: {e}"))?;
        }
        steps.mark("sysctls");
        init.rootfs.finish()?;
        steps.mark("masked and read-only paths");
        if let Some(name) = &init.hostname {
            nix::unistd::sethostname(name).map_err(|e| format!("sethostname {name}: {e}"))?;
        }
        if let Some(name) = &init.domainname {
            syscall::set_domainname(name.as_bytes())
                .map_err(|e| format!("setdomainname {name}: {e}"))?;
        }
    }
    // Init is in its root now; an exec joined the container's mount namespace, whose root
    // setns made its own. Before the limits (RLIMIT_NOFILE) and the credentials change.
    if let Some(socket) = &fds.terminal {
        tty::open_in_container(socket.as_fd(), plan.process.uid())?;
    }
    plan.process.apply_limits()?;
    let executable = plan.process.resolve_executable()?;
    let (early, late) = match (&plan.seccomp, plan.process.no_new_privileges()) {
        (Some(prog), false) => (Some(prog), None),
        (Some(prog), true) => (None, Some(prog)),
        (None, _) => (None, None),
    };
    plan.process.apply_credentials(early)?;
    steps.mark("process");
    write_frame(&fds.report, TAG_READY, steps.text().as_bytes());
    wait_for(&fds.sync);
    if let Some(prog) = late {
        super::seccomp::apply(prog).map_err(|e| format!("apply seccomp: {e}"))?;
    }
    let (argv, envp) = plan.process.argv_envp();
    // The agent blocks SIGCHLD in every thread (its reaper reads a signalfd); a blocked mask
    // survives execve, and the container must start with none blocked, as under runc.
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .map_err(|e| format!("reset the signal mask: {e}"))?;
    let err = syscall::execve(&executable, &argv, &envp);
    Err(format!(
        "exec: {}: {err}",
        CString::as_c_str(&executable).to_string_lossy()
    ))
}

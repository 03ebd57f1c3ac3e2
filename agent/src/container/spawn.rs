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
//! An exec has no intermediate and no fork: a thread of the agent enters the init's namespaces
//! and clones `P` sharing the agent's memory (`CLONE_VM | CLONE_VFORK`, see [`clone_inside`]);
//! `P` reports its own PID and goes on as above. The agent places it in the container's cgroup
//! from outside, as for init, before "go": `P` does nothing in the container before that.
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
    /// then takes one clone that shares the agent's memory, from a thread that entered them
    /// first (one `setns` through the pidfd), instead of a fork, a `setns` per namespace and a
    /// clone.
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
    // Each clock read is a system call in the guest: only at debug level.
    let began = log::log_enabled!(log::Level::Debug).then(std::time::Instant::now);
    let mut report = File::from(report_r);
    let mut sync = File::from(sync_w);
    match &plan.enter {
        // The exec thread holds the agent's copies of the child's ends until the child execed
        // or died: then EOF on `report`.
        Some(pidfd) => clone_inside(plan, fds, pidfd.as_fd())?,
        None => {
            match syscall::fork().map_err(io_err("fork"))? {
                Forked::Child => intermediate(plan, fds),
                Forked::Parent(_) => {}
            }
            drop(fds);
        }
    }
    let pid = match read_frame(&mut report)? {
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
    };
    let cloned = began.map(|t| t.elapsed());
    on_pid(pid);
    let kill = |pid: Pid| {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    };
    if let Err(e) = placed(pid) {
        kill(pid);
        return Err(ContainerError::Hook(e));
    }
    let placed_at = began.map(|t| t.elapsed());
    if let Err(e) = sync.write_all(b"g") {
        kill(pid);
        return Err(ContainerError::Io {
            what: "signal the child",
            source: e,
        });
    }
    match read_frame(&mut report) {
        Ok(Some((TAG_READY, steps))) => {
            if let (Some(began), Some(cloned), Some(placed_at)) = (began, cloned, placed_at) {
                log::debug!(
                    "spawn of pid {pid}: fork and clone {:.2} s, placing {:.2} s, set-up {:.2} s \
                     ({})",
                    cloned.as_secs_f64(),
                    placed_at.saturating_sub(cloned).as_secs_f64(),
                    began.elapsed().saturating_sub(placed_at).as_secs_f64(),
                    text(&steps)
                );
            }
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

/// Exec: clones the process from a thread of its own that first entered the namespaces of the
/// init behind `pidfd` (its own file system context, so that it may enter a mount namespace;
/// one `setns` for all of them). The child is the agent's own and already in the container's
/// PID namespace.
///
/// The clone shares the agent's memory and suspends the thread until the child execs or dies
/// (`CLONE_VM | CLONE_VFORK`, as posix_spawn does): no copy of the agent's page tables, and no
/// copy-on-write faults afterwards in the child or in the agent; in the guest here each of
/// those is emulated kernel work. The child reports its PID as the intermediate process does
/// for init; an error before the clone goes over `report` too. Returns once the thread runs;
/// it ends on its own once the child execed or died.
fn clone_inside(
    plan: &SpawnPlan,
    fds: ChildFds,
    pidfd: std::os::fd::BorrowedFd<'_>,
) -> Result<(), ContainerError> {
    let io = |what: &'static str| move |e: std::io::Error| ContainerError::Io { what, source: e };
    let pidfd = pidfd.try_clone_to_owned().map_err(io("dup the pidfd"))?;
    let plan = SpawnPlan {
        join: Vec::new(),
        enter: None,
        init: None,
        process: plan.process.clone(),
        seccomp: plan.seccomp.clone(),
    };
    std::thread::Builder::new()
        .name("exec".into())
        .spawn(move || {
            let report = fds.report.try_clone();
            if let Err(msg) = enter_and_clone(&plan, fds, pidfd) {
                if let Ok(report) = report {
                    write_frame(&report, TAG_ERROR, msg.as_bytes());
                }
            }
        })
        .map(drop)
        .map_err(io("spawn the exec thread"))
}

/// The stack of a child that shares the agent's memory: what `child` needs, with room to spare.
const CHILD_STACK: usize = 256 * 1024;

/// What a `CLONE_VM` child gets: it borrows all of it from the suspended thread.
struct VmChild<'a> {
    plan: &'a SpawnPlan,
    /// The child takes a bitwise copy: the same numbers in its own descriptor table (no
    /// `CLONE_FILES`); the thread closes its copies after the clone.
    fds: ChildFds,
    /// The descriptors the child keeps, sorted (the child allocates nothing to sort them).
    keep: Vec<RawFd>,
    image: &'a ExecImage<'a>,
    /// Where the kernel stores the child's PID (in the agent's PID namespace) for the parent.
    pid: std::sync::atomic::AtomicI32,
}

/// In the exec thread: enters the namespaces, resolves the executable (in the container's
/// root, as the child would) and clones the child; returns after the child execed or died.
fn enter_and_clone(plan: &SpawnPlan, fds: ChildFds, pidfd: OwnedFd) -> Result<(), String> {
    nix::sched::unshare(CloneFlags::CLONE_FS)
        .map_err(|e| format!("unshare the file system context: {e}"))?;
    nix::sched::setns(pidfd.as_fd(), EXEC_NAMESPACES)
        .map_err(|e| format!("enter the container's namespaces: {e}"))?;
    drop(pidfd);
    let image = ExecImage::new(&plan.process)?;
    let stack = syscall::ChildStack::new(CHILD_STACK).map_err(|e| format!("child stack: {e}"))?;
    let mut keep = keep_list(plan, &fds);
    keep.sort_unstable();
    let child = VmChild {
        plan,
        fds,
        keep,
        image: &image,
        pid: std::sync::atomic::AtomicI32::new(0),
    };
    // SAFETY: `vm_child_main` keeps the contract of `clone_vm_vfork`: it only borrows from
    // `child` (on this thread's stack, which stays put while the thread is suspended until the
    // child execs or exits) and from what `child` points to (`plan`, `image`, alive as long);
    // it takes the descriptors as plain numbers of its own table; what it allocates it frees
    // before its execve or exit; it sets ids and limits with raw system calls and ends with
    // execve or _exit.
    let cloned = unsafe {
        syscall::clone_vm_vfork(
            vm_child_main,
            &stack,
            std::ptr::from_ref(&child).cast_mut().cast(),
            &child.pid,
        )
    };
    cloned.map_err(|e| format!("clone: {e}"))?;
    // The child execed or died: this thread's copies of its ends go now (EOF on `report`).
    drop(child);
    Ok(())
}

/// The entry of a `CLONE_VM` child: reports its PID, closes what it inherited, then runs
/// [`run_child`].
extern "C" fn vm_child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the `VmChild` of `enter_and_clone`, alive while this child runs
    // (its thread is suspended until the child execs or exits).
    let child = unsafe { &*arg.cast::<VmChild<'_>>() };
    // SAFETY: `ChildFds` holds descriptors only (no heap memory); the copy owns the same
    // numbers in this child's own descriptor table, and the original stays for the thread's.
    let fds = unsafe { std::ptr::read(&child.fds) };
    let pid = child.pid.load(std::sync::atomic::Ordering::SeqCst);
    write_frame(&fds.report, TAG_PID, &pid.to_le_bytes());
    if let Err(e) = syscall::close_fds_except_sorted(&child.keep) {
        fail(&fds.report, format!("close inherited descriptors: {e}"));
    }
    run_child(child.plan, fds, Some(child.image))
}

/// The executable and its argument and environment arrays, built before a clone that shares
/// the agent's memory: the child then leaves nothing in the agent's heap at its execve.
struct ExecImage<'a> {
    path: CString,
    arrays: syscall::ExecArrays<'a>,
}

impl<'a> ExecImage<'a> {
    /// Resolves the executable (in the caller's root: the container's) and points into
    /// `process`'s arguments and environment.
    fn new(process: &'a ProcessPlan) -> Result<Self, String> {
        let path = process.resolve_executable()?;
        let (argv, envp) = process.argv_envp();
        Ok(ExecImage {
            path,
            arrays: syscall::ExecArrays::new(&argv, &envp),
        })
    }

    /// execve(2) of the image; returns only with why it failed.
    fn exec(&self) -> std::io::Error {
        self.arrays.execve(&self.path)
    }
}

/// The descriptors a child keeps: its own ends, and for init the namespace files it joins.
fn keep_list(plan: &SpawnPlan, fds: &ChildFds) -> Vec<RawFd> {
    let mut keep: Vec<RawFd> = vec![
        fds.sync.as_raw_fd(),
        fds.report.as_raw_fd(),
        fds.devnull.as_raw_fd(),
    ];
    keep.extend(fds.stdio.iter().flatten().map(|fd| fd.as_raw_fd()));
    keep.extend(fds.terminal.iter().map(|fd| fd.as_raw_fd()));
    keep.extend(plan.join.iter().map(|(f, _)| f.as_raw_fd()));
    keep
}

/// In a forked child: closes every descriptor it inherited but its own (those of other
/// containers' spawns, inherited from other threads, would keep their report pipes open).
fn close_inherited(plan: &SpawnPlan, fds: &ChildFds) {
    if let Err(e) = syscall::close_fds_except(&keep_list(plan, fds)) {
        fail(&fds.report, format!("close inherited descriptors: {e}"));
    }
}

/// The real child: its set-up, then the exec; a failure goes to the agent as text. `image`:
/// the executable resolved before the clone, for a child that shares the agent's memory.
fn run_child(plan: &SpawnPlan, fds: ChildFds, image: Option<&ExecImage<'_>>) -> ! {
    let report = fds.report.try_clone();
    match child(plan, fds, image) {
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
        Ok(Forked::Child) => run_child(plan, fds, None),
    }
}

/// Sends `msg` as the error and exits; the message is freed first (a child that shares the
/// agent's memory leaves nothing in its heap).
fn fail(report: &OwnedFd, msg: String) -> ! {
    write_frame(report, TAG_ERROR, msg.as_bytes());
    drop(msg);
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

/// The real child, from "go" to execve. With `image` (a child sharing the agent's memory), the
/// executable was resolved before the clone, and nothing the child allocates is left at the
/// execve.
fn child(
    plan: &SpawnPlan,
    fds: ChildFds,
    image: Option<&ExecImage<'_>>,
) -> StepResult<std::convert::Infallible> {
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
    steps.mark("limits");
    let executable = match image {
        Some(_) => None,
        None => Some(plan.process.resolve_executable()?),
    };
    let (early, late) = match (&plan.seccomp, plan.process.no_new_privileges()) {
        (Some(prog), false) => (Some(prog), None),
        (Some(prog), true) => (None, Some(prog)),
        (None, _) => (None, None),
    };
    steps.mark("executable");
    plan.process.apply_credentials(early)?;
    steps.mark("credentials");
    write_frame(&fds.report, TAG_READY, steps.text().as_bytes());
    drop(steps);
    wait_for(&fds.sync);
    if let Some(prog) = late {
        super::seccomp::apply(prog).map_err(|e| format!("apply seccomp: {e}"))?;
    }
    // The agent blocks SIGCHLD in every thread (its reaper reads a signalfd); a blocked mask
    // survives execve, and the container must start with none blocked, as under runc.
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .map_err(|e| format!("reset the signal mask: {e}"))?;
    let (path, err) = match (image, &executable) {
        (Some(image), _) => (&image.path, image.exec()),
        (None, Some(executable)) => {
            let (argv, envp) = plan.process.argv_envp();
            (executable, syscall::execve(executable, &argv, &envp))
        }
        (None, None) => return Err("exec: no executable".into()),
    };
    Err(format!(
        "exec: {}: {err}",
        CString::as_c_str(path).to_string_lossy()
    ))
}

//! Starting a container's init or an exec'd process: the clone, the child's setup, and the
//! pipes between them.
//!
//! Neither has a fork: a thread of the agent enters the namespaces the process joins (an exec:
//! all of its init's; an init: the pod's, named in the spec) and clones the process `P`
//! sharing the agent's memory (`CLONE_VM | CLONE_VFORK`, see [`clone_from_thread`]), into the
//! new namespaces an init asks for (PID, mount, UTS, IPC). `P` is the agent's own child (its
//! exit reaches the agent's reaper). It reports its own PID, waits for "go" (the agent has
//! placed it in its cgroups from outside: `P` does nothing in the container before that), sets
//! itself up, reports "ready", waits for "start" and execs.
//!
//! Two pipes, both close-on-exec: `report` (children → agent: framed messages, then EOF when
//! `P` execs) and `sync` (agent → `P`: one byte for "go", one for "start"). Errors in the
//! children before the exec travel as text over `report` and become the create error. For a
//! terminal, a third channel: a Unix socketpair over which `P`, once inside its root, sends the
//! master of the pty it opened there (see `tty`); it does so before "ready", so the agent
//! takes it right after "ready" without waiting.

use std::ffi::{CStr, CString};
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
use crate::sys as syscall;

/// Frame tags on the report pipe.
const TAG_PID: u8 = b'P';
const TAG_READY: u8 = b'R';
const TAG_ERROR: u8 = b'E';
/// The longest error message a child sends (one write stays below PIPE_BUF: atomic).
const MAX_MESSAGE: usize = 2048;

/// Exit code of a child that failed before its exec.
pub const SETUP_FAILED: i32 = 127;

/// The container-wide part that only init does.
#[derive(Debug, Clone)]
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
    /// Namespaces to join before the clone, one `setns` each (init: paths from the spec; an
    /// exec whose init has no pidfd: init's namespace files).
    pub join: Vec<(File, CloneFlags)>,
    /// Exec: a pidfd of the container's init, whose namespaces the process enters with one
    /// `setns` through it instead of one per namespace file.
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

/// Clones and sets up the child up to the point where it waits for "start". `placed` is called
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
    // The spawning thread holds the agent's copies of the child's ends until the child execed
    // or died: then EOF on `report`.
    clone_from_thread(plan, fds)?;
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
                    "spawn of pid {pid}: thread and clone {:.2} s, placing {:.2} s, set-up {:.2} s",
                    cloned.as_secs_f64(),
                    placed_at.saturating_sub(cloned).as_secs_f64(),
                    began.elapsed().saturating_sub(placed_at).as_secs_f64(),
                );
                // The shim cuts a console line at 512 characters; a pod's set-up has more steps.
                for part in step_lines(&text(&steps), STEP_LINE_MAX) {
                    log::debug!("spawn of pid {pid}, set-up: {part}");
                }
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

/// Longest run of set-up steps logged on one line (the line's prefix and the log's own leave
/// room under the shim's 512-character cut of a console line).
const STEP_LINE_MAX: usize = 360;

/// `steps` (`name 0.01 s, name 0.02 s, …`) in lines of at most `max` characters, split between
/// steps; a single step longer than `max` is a line of its own.
fn step_lines(steps: &str, max: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for step in steps.split(", ").filter(|s| !s.is_empty()) {
        match lines.last_mut() {
            Some(line) if line.len() + 2 + step.len() <= max => {
                line.push_str(", ");
                line.push_str(step);
            }
            _ => lines.push(step.to_owned()),
        }
    }
    lines
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

/// Clones the process from a thread of its own, which first enters the namespaces the process
/// joins: an exec's, all of its init's with one `setns` on init's pidfd (or one per namespace
/// file); an init's, the pod's ones its spec names. A thread that enters a mount namespace
/// unshares its file system context first, as `setns` requires. The thread's namespaces are its
/// own and end with it.
///
/// The clone shares the agent's memory and suspends the thread until the child execs or dies
/// (`CLONE_VM | CLONE_VFORK`, as posix_spawn does): no copy of the agent's page tables, and no
/// copy-on-write faults afterwards in the child or in the agent; in the guest here each of
/// those is emulated kernel work. An init's clone also makes its new namespaces, so the child
/// is PID 1 of its own PID namespace, in a copy of the agent's mount namespace. The child
/// reports its PID; an error before the clone goes over `report` too. Returns once the thread
/// runs; it ends on its own once the child execed or died (for an init: after "start").
fn clone_from_thread(plan: &SpawnPlan, fds: ChildFds) -> Result<(), ContainerError> {
    let io = |what: &'static str| move |e: std::io::Error| ContainerError::Io { what, source: e };
    let plan = SpawnPlan {
        join: plan
            .join
            .iter()
            .map(|(ns, flag)| Ok((ns.try_clone()?, *flag)))
            .collect::<std::io::Result<_>>()
            .map_err(io("dup a namespace file"))?,
        enter: plan
            .enter
            .as_ref()
            .map(OwnedFd::try_clone)
            .transpose()
            .map_err(io("dup the pidfd"))?,
        init: plan.init.clone(),
        process: plan.process.clone(),
        seccomp: plan.seccomp.clone(),
    };
    let name = if plan.init.is_some() { "init" } else { "exec" };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let report = fds.report.try_clone();
            if let Err(msg) = enter_and_clone(plan, fds) {
                if let Ok(report) = report {
                    write_frame(&report, TAG_ERROR, msg.as_bytes());
                }
            }
        })
        .map(drop)
        .map_err(io("spawn the spawning thread"))
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

/// In the spawning thread: enters the namespaces, resolves an exec's executable (in the
/// container's root, as the child would) and clones the child; returns after the child execed
/// or died.
fn enter_and_clone(mut plan: SpawnPlan, fds: ChildFds) -> Result<(), String> {
    let enters_mount = plan.enter.is_some()
        || plan
            .join
            .iter()
            .any(|(_, flag)| flag.contains(CloneFlags::CLONE_NEWNS));
    if enters_mount {
        nix::sched::unshare(CloneFlags::CLONE_FS)
            .map_err(|e| format!("unshare the file system context: {e}"))?;
    }
    if let Some(pidfd) = plan.enter.take() {
        nix::sched::setns(pidfd.as_fd(), EXEC_NAMESPACES)
            .map_err(|e| format!("enter the container's namespaces: {e}"))?;
    }
    for (ns, flag) in std::mem::take(&mut plan.join) {
        nix::sched::setns(ns.as_fd(), flag).map_err(|e| format!("join namespace {flag:?}: {e}"))?;
    }
    // An init finds its executable later, inside the root it is about to make.
    let image = ExecImage::new(&plan.process, plan.init.is_none())?;
    let stack = syscall::ChildStack::new(CHILD_STACK).map_err(|e| format!("child stack: {e}"))?;
    let mut keep = keep_list(&fds);
    keep.sort_unstable();
    let namespaces = plan
        .init
        .as_ref()
        .map_or(CloneFlags::empty(), |init| init.clone_flags);
    let child = VmChild {
        plan: &plan,
        fds,
        keep,
        image: &image,
        pid: std::sync::atomic::AtomicI32::new(0),
    };
    // The child allocates from an arena of its own (see `crate::alloc`): killed at any point,
    // it holds no lock of the agent's heap. Nothing allocates on this thread until it is dropped.
    let arena = crate::alloc::ChildArena::enter();
    // SAFETY: `vm_child_main` keeps the contract of `clone_vm_vfork`: it only borrows from
    // `child` (on this thread's stack, which stays put while the thread is suspended until the
    // child execs or exits) and from what `child` points to (`plan`, `image`, alive as long);
    // it takes the descriptors as plain numbers of its own table; what it allocates comes from
    // its arena (or, with every slot taken, is freed before its execve or exit); it sets ids
    // and limits with raw system calls and ends with execve or _exit.
    let cloned = unsafe {
        syscall::clone_vm_vfork(
            vm_child_main,
            &stack,
            std::ptr::from_ref(&child).cast_mut().cast(),
            &child.pid,
            namespaces.bits(),
        )
    };
    let used = arena.as_ref().map(crate::alloc::ChildArena::used);
    drop(arena);
    match used {
        Some(bytes) => log::debug!("the child's set-up allocated {bytes} bytes of its arena"),
        None => log::debug!("every child arena is taken: this child allocated from the heap"),
    }
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
    run_child(child.plan, fds, child.image)
}

/// The executable and its argument and environment arrays, built before a clone that shares
/// the agent's memory: the child then leaves nothing in the agent's heap at its execve.
struct ExecImage<'a> {
    /// An exec's, resolved before the clone; `None` for an init, which resolves it inside its
    /// root (see [`on_stack`]).
    path: Option<CString>,
    arrays: syscall::ExecArrays<'a>,
}

impl<'a> ExecImage<'a> {
    /// Points into `process`'s arguments and environment; with `resolve`, finds the executable
    /// (in the caller's root: the container's).
    fn new(process: &'a ProcessPlan, resolve: bool) -> Result<Self, String> {
        let path = resolve.then(|| process.resolve_executable()).transpose()?;
        let (argv, envp) = process.argv_envp();
        Ok(ExecImage {
            path,
            arrays: syscall::ExecArrays::new(&argv, &envp),
        })
    }
}

/// The longest executable path an init execs (PATH_MAX with its NUL).
const EXEC_PATH_MAX: usize = 4096;

/// Copies `path` into `buf` and frees it: a child that shares the agent's memory must leave
/// nothing in the heap at its execve.
fn on_stack(path: CString, buf: &mut [u8; EXEC_PATH_MAX]) -> StepResult<&CStr> {
    let bytes = path.as_bytes_with_nul();
    let Some(dest) = buf.get_mut(..bytes.len()) else {
        return Err(format!("exec: {}: path too long", path.to_string_lossy()));
    };
    dest.copy_from_slice(bytes);
    CStr::from_bytes_with_nul(dest).map_err(|_| "exec: bad path".to_string())
}

/// The descriptors a child keeps: its own ends.
fn keep_list(fds: &ChildFds) -> Vec<RawFd> {
    let mut keep: Vec<RawFd> = vec![
        fds.sync.as_raw_fd(),
        fds.report.as_raw_fd(),
        fds.devnull.as_raw_fd(),
    ];
    keep.extend(fds.stdio.iter().flatten().map(|fd| fd.as_raw_fd()));
    keep.extend(fds.terminal.iter().map(|fd| fd.as_raw_fd()));
    keep
}

/// The real child: its set-up, then the exec; a failure goes to the agent as text.
fn run_child(plan: &SpawnPlan, fds: ChildFds, image: &ExecImage<'_>) -> ! {
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

/// The real child, from "go" to execve. It shares the agent's memory: nothing it allocates is
/// left at the execve.
fn child(
    plan: &SpawnPlan,
    fds: ChildFds,
    image: &ExecImage<'_>,
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
    let mut resolved = [0u8; EXEC_PATH_MAX];
    let path = match &image.path {
        Some(path) => path.as_c_str(),
        None => on_stack(plan.process.resolve_executable()?, &mut resolved)?,
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
    let err = image.arrays.execve(path);
    Err(format!("exec: {}: {err}", path.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_up_steps_are_split_between_steps_into_short_lines() {
        assert!(step_lines("", 40).is_empty());
        let steps = "root 0.01 s, mount /proc 0.06 s, mount /etc/hostname 0.05 s, pivot 0.02 s";
        let lines = step_lines(steps, 40);
        assert_eq!(
            lines,
            [
                "root 0.01 s, mount /proc 0.06 s",
                "mount /etc/hostname 0.05 s, pivot 0.02 s"
            ]
        );
        assert!(lines.iter().all(|l| l.len() <= 40));
        assert_eq!(lines.join(", "), steps, "nothing lost or reordered");
        // A step longer than a line is a line of its own, not cut.
        let long = format!("mount /{} 0.01 s", "x".repeat(50));
        assert_eq!(
            step_lines(&format!("a 0 s, {long}, b 0 s"), 40),
            ["a 0 s", long.as_str(), "b 0 s"]
        );
    }
}

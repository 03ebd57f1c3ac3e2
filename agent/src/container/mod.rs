//! OCI containers inside the guest: a registry ([`Containers`]) that creates, starts, execs
//! into, signals, waits for and removes containers with the semantics of runc.
//!
//! How it works (details in `docs/agent.md`): [`spawn`] clones the container's init into new
//! namespaces, sets up its root file system and process, and leaves it waiting for "start";
//! exec joins the namespaces of the container's init and runs the process at once. Every
//! process is the agent's own child, and PID 1's reaper hands each exit to
//! [`Containers::on_exit`], which records `code` or `128 + signal` for all waiters.

pub mod cgroup;
mod pid1_signal;
mod process;
pub mod rootfs;
pub mod seccomp;
mod spawn;
mod state;
mod step;
mod tty;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use self::process::ProcessPlan;
pub use self::rootfs::RootMode;
use self::rootfs::RootfsPlan;
pub use self::spawn::SETUP_FAILED;
use self::spawn::{InitPart, Pending, SpawnPlan};
pub use self::state::{Op, State};
use self::tty::Pty;

/// The error of a cgroup placement hook.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Called with the PID of a new process after it was cloned and before it does anything in the
/// container (the lead puts it into the container's cgroups there).
pub type PlaceHook<'a> = &'a dyn Fn(Pid) -> Result<(), HookError>;

/// How long [`Containers::remove`] waits for init after SIGKILL by default.
pub const DEFAULT_REMOVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a container operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// No container with this ID.
    #[error("container {0:?} not found")]
    NotFound(String),
    /// The ID is taken.
    #[error("container {0:?} already exists")]
    AlreadyExists(String),
    /// No exec process with this ID in the container.
    #[error("process {exec_id:?} not found in container {id:?}")]
    ProcessNotFound {
        /// Container.
        id: String,
        /// Exec ID.
        exec_id: String,
    },
    /// The exec ID is taken.
    #[error("process {exec_id:?} already exists in container {id:?}")]
    ProcessExists {
        /// Container.
        id: String,
        /// Exec ID.
        exec_id: String,
    },
    /// The operation is not allowed in the container's state.
    #[error("cannot {op} container {id:?}: it is {state:?}")]
    InvalidState {
        /// Container.
        id: String,
        /// Its state.
        state: State,
        /// What was asked.
        op: &'static str,
    },
    /// The process already exited.
    #[error("process {0} has already exited")]
    ProcessExited(String),
    /// The spec is malformed or inconsistent.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The spec asks for something this agent cannot do yet.
    #[error("not supported yet: {0}")]
    NotSupported(String),
    /// The seccomp profile could not be compiled.
    #[error("seccomp")]
    Seccomp(#[source] seccomp::SeccompError),
    /// The child failed before its exec (its own message, e.g. "exec: /bin/nope: no such file
    /// or directory").
    #[error("{0}")]
    Setup(String),
    /// The cgroup placement hook failed.
    #[error("cannot place the process in its cgroups")]
    Hook(#[source] HookError),
    /// A system call in the agent failed.
    #[error("cannot {what}")]
    Io {
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The descriptors a process gets as stdin, stdout and stderr (in the guest: vsock streams).
/// Absent ones are `/dev/null`. With a terminal, stdin and stdout are copied to and from the
/// pty and stderr is unused (the terminal carries both).
#[derive(Debug, Default)]
pub struct Stdio {
    /// stdin.
    pub stdin: Option<OwnedFd>,
    /// stdout.
    pub stdout: Option<OwnedFd>,
    /// stderr.
    pub stderr: Option<OwnedFd>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or 128 + the signal that killed it.
    pub code: i32,
    /// When the reaper saw it.
    pub exited_at: SystemTime,
}

impl ExitStatus {
    /// From a wait status as waitpid(2) reports it.
    pub fn from_wait_status(status: libc::c_int) -> Self {
        let code = if libc::WIFSIGNALED(status) {
            128 + libc::WTERMSIG(status)
        } else {
            libc::WEXITSTATUS(status)
        };
        ExitStatus {
            code,
            exited_at: SystemTime::now(),
        }
    }
}

/// One process's exit, for any number of waiters.
type ExitCell = nutshell_protocol::exit_cell::ExitCell<ExitStatus>;

/// A running or exited process of a container.
#[derive(Debug)]
struct ProcessEntry {
    pid: Pid,
    /// Names the process even after the reaper took its PID (`None` if pidfd_open failed).
    pidfd: Option<OwnedFd>,
    exit: Arc<ExitCell>,
    pty: Option<Pty>,
    /// The agent's copy of a non-terminal stdin, for close_stdin.
    stdin: Option<OwnedFd>,
}

impl ProcessEntry {
    fn close_stdin(&mut self) {
        if let Some(pty) = self.pty.as_mut() {
            pty.close_stdin();
        }
        if let Some(stdin) = self.stdin.take() {
            // A socket (vsock in the guest) held by the process reads EOF after this; a pipe
            // cannot be closed from here, the writer closes it.
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&stdin),
                nix::sys::socket::Shutdown::Read,
            );
        }
    }
}

#[derive(Debug)]
struct Container {
    state: State,
    init: ProcessEntry,
    /// Init waiting for start.
    pending: Option<Pending>,
    execs: HashMap<String, ProcessEntry>,
    /// `/proc/<init>/ns/pid` as read at create: identifies the container's processes when it
    /// has a PID namespace of its own and no cgroup.
    pidns: Option<PathBuf>,
    /// Whether init is PID 1 of a PID namespace of its own (CONTAINER mode).
    own_pidns: bool,
    /// The container's cgroup: its processes, whatever PID namespace they share.
    cgroup: Option<cgroup::Cgroup>,
    /// The container's seccomp filter, for exec'd processes too.
    seccomp: Option<seccompiler::BpfProgram>,
}

impl Container {
    /// Checks `op` against the state and moves to the state after it.
    fn apply(&mut self, id: &str, op: Op) -> Result<State, ContainerError> {
        self.state = self
            .state
            .next(op)
            .ok_or_else(|| invalid_state(id, self.state, op.verb()))?;
        Ok(self.state)
    }

    /// Checks `op` against the state without changing it (the caller acts first).
    fn check(&self, id: &str, op: Op) -> Result<State, ContainerError> {
        self.state
            .next(op)
            .ok_or_else(|| invalid_state(id, self.state, op.verb()))
    }
}

/// Where a PID's exit goes.
#[derive(Debug)]
struct Route {
    container: String,
    exec_id: Option<String>,
    exit: Arc<ExitCell>,
}

#[derive(Debug, Default)]
struct Inner {
    containers: HashMap<String, Container>,
    routes: HashMap<i32, Route>,
}

/// The containers of this guest.
#[derive(Debug, Default)]
pub struct Containers {
    inner: Mutex<Inner>,
    root_mode: RootMode,
    /// The agent's cgroup2 hierarchy is mounted with `favordynmods` (see `init.rs`): a
    /// container's own cgroup2 mount keeps it (a mount in the root cgroup namespace sets the
    /// hierarchy's options anew).
    favordynmods: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Containers {
    /// An empty registry with [`RootMode::Auto`], decided once here.
    pub fn new() -> Self {
        Self::with_root_mode(RootMode::Auto)
    }

    /// An empty registry whose containers enter their root as `mode` says (the default,
    /// [`RootMode::Auto`], picks `pivot_root` unless the agent runs from an initramfs).
    pub fn with_root_mode(mode: RootMode) -> Self {
        Containers {
            inner: Mutex::default(),
            root_mode: mode.resolve(),
            favordynmods: rootfs::cgroup2_favors_dynmods(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Routes one reaped child (from PID 1's reaper) to its process; unknown PIDs (orphans,
    /// the pod's init) are ignored.
    pub fn on_exit(&self, pid: i32, wait_status: libc::c_int) {
        let mut inner = self.inner();
        let Some(route) = inner.routes.remove(&pid) else {
            log::trace!("reaped pid {pid}, not a container process");
            return;
        };
        let status = ExitStatus::from_wait_status(wait_status);
        log::debug!(
            "container {} process {} (pid {pid}) exited with {}",
            route.container,
            route.exec_id.as_deref().unwrap_or("init"),
            status.code
        );
        route.exit.set(status);
        if route.exec_id.is_none() {
            if let Some(c) = inner.containers.get_mut(&route.container) {
                if Arc::ptr_eq(&c.init.exit, &route.exit) {
                    // Exit is allowed in every state.
                    let _ = c.apply(&route.container, Op::Exit);
                    c.pending = None;
                }
            }
        }
    }

    /// Creates the container `id` from `spec` (root path already present), up to the point
    /// where init waits for [`Self::start`]. `place` runs with init's PID before it sets
    /// anything up. Returns init's PID.
    pub fn create(
        &self,
        id: &str,
        spec: &Spec,
        stdio: Stdio,
        terminal: bool,
        place: PlaceHook<'_>,
    ) -> Result<Pid, ContainerError> {
        validate_id(id)?;
        if self.inner().containers.contains_key(id) {
            return Err(ContainerError::AlreadyExists(id.to_string()));
        }
        let begun = log::log_enabled!(log::Level::Debug).then(std::time::Instant::now);
        let plan = init_plan(spec, self.root_mode, self.favordynmods)?;
        if let Some(begun) = begun {
            log::debug!(
                "container {id}: plan {:.2} s",
                begun.elapsed().as_secs_f64()
            );
        }
        let exit = Arc::new(ExitCell::default());
        let (entry, pending) = self.spawn_process(
            id,
            None,
            &plan,
            stdio,
            terminal,
            spec.process().as_ref().and_then(console_size),
            &exit,
            place,
        )?;
        let own_pidns = plan
            .init
            .as_ref()
            .is_some_and(|i| i.clone_flags.contains(CloneFlags::CLONE_NEWPID));
        let pidns = std::fs::read_link(format!("/proc/{}/ns/pid", entry.pid)).ok();
        let mut inner = self.inner();
        if inner.containers.contains_key(id) {
            let _ = nix::sys::signal::kill(entry.pid, Signal::SIGKILL);
            return Err(ContainerError::AlreadyExists(id.to_string()));
        }
        let pid = entry.pid;
        let state = if exit.get().is_some() {
            State::Stopped
        } else {
            State::Created
        };
        inner.containers.insert(
            id.to_string(),
            Container {
                state,
                init: entry,
                pending: Some(pending),
                execs: HashMap::new(),
                pidns: own_pidns.then_some(pidns).flatten(),
                own_pidns,
                cgroup: None,
                seccomp: plan.seccomp.clone(),
            },
        );
        log::debug!("container {id} created, init pid {pid}");
        Ok(pid)
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_process(
        &self,
        id: &str,
        exec_id: Option<&str>,
        plan: &SpawnPlan,
        stdio: Stdio,
        terminal: bool,
        console_size: Option<(u16, u16)>,
        exit: &Arc<ExitCell>,
        place: PlaceHook<'_>,
    ) -> Result<(ProcessEntry, Pending), ContainerError> {
        // With a terminal the child opens the pty in the container; its stdin and stdout are
        // the agent's copy threads' ends (stderr is unused: the terminal carries both).
        let (stdio, terminal_stdio) = if terminal {
            (Stdio::default(), Some((stdio.stdin, stdio.stdout)))
        } else {
            (stdio, None)
        };
        let stdin = match &stdio.stdin {
            Some(fd) => Some(fd.try_clone().map_err(|e| ContainerError::Io {
                what: "dup stdin",
                source: e,
            })?),
            None => None,
        };
        let mut routed: Option<Pid> = None;
        let mut pidfd: Option<OwnedFd> = None;
        let result = spawn::spawn(
            plan,
            stdio,
            terminal,
            &mut |pid| {
                self.inner().routes.insert(
                    pid.as_raw(),
                    Route {
                        container: id.to_string(),
                        exec_id: exec_id.map(str::to_string),
                        exit: exit.clone(),
                    },
                );
                routed = Some(pid);
                // The child waits for "go": it cannot have exited and been reaped unless
                // someone killed it, and then the open fails.
                pidfd = crate::sys::pidfd_open(pid).ok();
            },
            place,
        )
        .and_then(|(pending, master)| {
            let pty = match (master, terminal_stdio) {
                (Some(master), Some((stdin, stdout))) => {
                    match attach_terminal(master, stdin, stdout, console_size) {
                        Ok(pty) => Some(pty),
                        Err(e) => {
                            let _ = nix::sys::signal::kill(pending.pid, Signal::SIGKILL);
                            return Err(e);
                        }
                    }
                }
                _ => None,
            };
            Ok((pending, pty))
        });
        match result {
            Ok((pending, pty)) => Ok((
                ProcessEntry {
                    pid: pending.pid,
                    pidfd,
                    exit: exit.clone(),
                    pty,
                    stdin,
                },
                pending,
            )),
            Err(e) => {
                // The child was killed (or died); its exit has nobody to go to.
                if let Some(pid) = routed {
                    self.inner().routes.remove(&pid.as_raw());
                }
                Err(e)
            }
        }
    }

    /// Starts a created container: init execs its process.
    pub fn start(&self, id: &str) -> Result<(), ContainerError> {
        let pending = {
            let mut inner = self.inner();
            let c = get_mut(&mut inner, id)?;
            c.check(id, Op::Start)?;
            let pending = c
                .pending
                .take()
                .ok_or_else(|| invalid_state(id, c.state, Op::Start.verb()))?;
            c.apply(id, Op::Start)?;
            pending
        };
        pending.start()
    }

    /// Runs `process` in the running container `id` as `exec_id`; returns its PID once it
    /// execed.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &Process,
        stdio: Stdio,
        terminal: bool,
        place: PlaceHook<'_>,
    ) -> Result<Pid, ContainerError> {
        validate_id(exec_id)?;
        let (init_pid, init_pidfd, seccomp) = {
            let inner = self.inner();
            let c = get(&inner, id)?;
            c.check(id, Op::Exec)?;
            if c.execs.contains_key(exec_id) {
                return Err(ContainerError::ProcessExists {
                    id: id.to_string(),
                    exec_id: exec_id.to_string(),
                });
            }
            let pidfd = c.init.pidfd.as_ref().and_then(|f| f.try_clone().ok());
            (c.init.pid, pidfd, c.seccomp.clone())
        };
        // Through init's pidfd when there is one (see SpawnPlan::enter); else the namespace
        // files, opened first: from here on they stay valid even if init exits.
        let join = match init_pidfd {
            Some(_) => Vec::new(),
            None => ["cgroup", "ipc", "uts", "net", "pid", "mnt"]
                .iter()
                .map(|name| {
                    let path = format!("/proc/{init_pid}/ns/{name}");
                    File::open(&path)
                        .map(|f| (f, ns_flag(name)))
                        .map_err(|e| ContainerError::Io {
                            what: "open the container's namespaces",
                            source: e,
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let plan = SpawnPlan {
            join,
            enter: init_pidfd,
            init: None,
            seccomp,
            process: ProcessPlan::from_spec(process)?,
        };
        let exit = Arc::new(ExitCell::default());
        let (entry, pending) = self.spawn_process(
            id,
            Some(exec_id),
            &plan,
            stdio,
            terminal,
            console_size(process),
            &exit,
            place,
        )?;
        let pid = entry.pid;
        {
            let mut inner = self.inner();
            match inner.containers.get_mut(id) {
                Some(c) if !c.execs.contains_key(exec_id) => {
                    c.execs.insert(exec_id.to_string(), entry);
                }
                _ => {
                    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                    return Err(ContainerError::ProcessExists {
                        id: id.to_string(),
                        exec_id: exec_id.to_string(),
                    });
                }
            }
        }
        pending.start()?;
        Ok(pid)
    }

    /// Sends `signal` to init (`exec_id` `None`) or an exec'd process; with `all`, to every
    /// process of the container.
    pub fn signal(
        &self,
        id: &str,
        exec_id: Option<&str>,
        signal: i32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let signal = Signal::try_from(signal)
            .map_err(|_| ContainerError::InvalidSpec(format!("unknown signal {signal}")))?;
        let inner = self.inner();
        let c = get(&inner, id)?;
        let process = match exec_id {
            None => &c.init,
            Some(e) => c
                .execs
                .get(e)
                .ok_or_else(|| ContainerError::ProcessNotFound {
                    id: id.to_string(),
                    exec_id: e.to_string(),
                })?,
        };
        if all && exec_id.is_none() {
            c.check(id, Op::SignalAll)?;
            for pid in container_pids(c) {
                let _ = nix::sys::signal::kill(pid, signal);
            }
            return Ok(());
        }
        // Through the pidfd: between the reaper's waitpid and its on_exit the PID could be
        // reused; the pidfd still names our process (and answers ESRCH once it is gone).
        if process.exit.get().is_some() {
            return Err(ContainerError::ProcessExited(
                exec_id.unwrap_or("init").to_string(),
            ));
        }
        // PID 1 of its own namespace without a handler yet would lose it (see pid1_signal).
        if exec_id.is_none() && c.own_pidns && pid1_signal::must_wait(process.pid, signal) {
            if let Some(fd) = process.pidfd.as_ref().and_then(|f| f.try_clone().ok()) {
                log::debug!(
                    "container {id}: init (pid {}) has no handler for {signal} yet: deferred",
                    process.pid
                );
                pid1_signal::deliver_when_handled(fd, process.pid, signal);
                return Ok(());
            }
        }
        let sent = match &process.pidfd {
            Some(pidfd) => crate::sys::pidfd_send_signal(pidfd.as_fd(), signal as libc::c_int),
            None => nix::sys::signal::kill(process.pid, signal).map_err(Into::into),
        };
        match sent {
            // Exited, not yet routed by the reaper: as good as exited.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(ContainerError::ProcessExited(
                exec_id.unwrap_or("init").to_string(),
            )),
            Err(e) => Err(ContainerError::Io {
                what: "send the signal",
                source: e,
            }),
            Ok(()) => Ok(()),
        }
    }

    /// Waits until init or the exec'd process exited (at once if it has) and returns how.
    pub fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitStatus, ContainerError> {
        let cell = {
            let inner = self.inner();
            let c = get(&inner, id)?;
            match exec_id {
                None => c.init.exit.clone(),
                Some(e) => c
                    .execs
                    .get(e)
                    .ok_or_else(|| ContainerError::ProcessNotFound {
                        id: id.to_string(),
                        exec_id: e.to_string(),
                    })?
                    .exit
                    .clone(),
            }
        };
        Ok(cell.wait())
    }

    /// The container's state.
    pub fn state(&self, id: &str) -> Result<State, ContainerError> {
        Ok(get(&self.inner(), id)?.state)
    }

    /// The PIDs (in the agent's PID namespace) of every process of the container.
    pub fn pids(&self, id: &str) -> Result<Vec<Pid>, ContainerError> {
        let inner = self.inner();
        let c = get(&inner, id)?;
        if c.state == State::Stopped {
            return Ok(Vec::new());
        }
        Ok(container_pids(c))
    }

    /// Gives the container its cgroup, whose members are its processes from now on (for
    /// `pids`, `signal` to all and `remove`), whatever PID namespace they share.
    pub fn set_cgroup(&self, id: &str, cgroup: cgroup::Cgroup) -> Result<(), ContainerError> {
        get_mut(&mut self.inner(), id)?.cgroup = Some(cgroup);
        Ok(())
    }

    /// The container's cgroup, if it was given one.
    pub fn cgroup(&self, id: &str) -> Result<Option<cgroup::Cgroup>, ContainerError> {
        Ok(get(&self.inner(), id)?.cgroup.clone())
    }

    /// Whether any container has a PID namespace of its own (the CRI's CONTAINER mode).
    pub fn any_own_pidns(&self) -> bool {
        self.inner().containers.values().any(|c| c.own_pidns)
    }

    /// Records that the container was frozen (`true`) or thawed (`false`) by the caller.
    pub fn set_paused(&self, id: &str, paused: bool) -> Result<(), ContainerError> {
        let mut inner = self.inner();
        let op = if paused { Op::Pause } else { Op::Resume };
        get_mut(&mut inner, id)?.apply(id, op)?;
        Ok(())
    }

    /// Sets the window size of the terminal of init or an exec'd process.
    pub fn resize_pty(
        &self,
        id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(), ContainerError> {
        let mut inner = self.inner();
        let p = process_mut(&mut inner, id, exec_id)?;
        match &p.pty {
            Some(pty) => pty.resize(rows, cols),
            None => Err(ContainerError::InvalidSpec(
                "the process has no terminal".into(),
            )),
        }
    }

    /// Closes the agent's end of the process's stdin: the process reads EOF.
    pub fn close_stdin(&self, id: &str, exec_id: Option<&str>) -> Result<(), ContainerError> {
        let mut inner = self.inner();
        process_mut(&mut inner, id, exec_id)?.close_stdin();
        Ok(())
    }

    /// Forgets an exec'd process that has exited (its exit status with it).
    pub fn remove_exec(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let mut inner = self.inner();
        let c = get_mut(&mut inner, id)?;
        let p = c
            .execs
            .get(exec_id)
            .ok_or_else(|| ContainerError::ProcessNotFound {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            })?;
        if p.exit.get().is_none() {
            return Err(ContainerError::InvalidState {
                id: format!("{id}/{exec_id}"),
                state: State::Running,
                op: "remove running process of",
            });
        }
        c.execs.remove(exec_id);
        Ok(())
    }

    /// Removes the container: a stopped one at once; otherwise every process gets SIGKILL and
    /// init is waited for up to `timeout` (a paused container must be thawed first). Returns
    /// the container's cgroup, which the caller removes.
    pub fn remove(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<cgroup::Cgroup>, ContainerError> {
        let exit = {
            let mut inner = self.inner();
            let c = get_mut(&mut inner, id)?;
            match c.check(id, Op::Remove)? {
                State::Stopped => None,
                State::Created | State::Running | State::Paused => {
                    // A created init waits on its sync pipe: dropping it ends the child too.
                    c.pending = None;
                    for pid in container_pids(c) {
                        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                    }
                    let _ = nix::sys::signal::kill(c.init.pid, Signal::SIGKILL);
                    Some(c.init.exit.clone())
                }
            }
        };
        if let Some(exit) = exit {
            if exit.wait_timeout(timeout).is_none() {
                return Err(ContainerError::Io {
                    what: "stop init",
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("init did not exit within {timeout:?} of SIGKILL"),
                    ),
                });
            }
        }
        let removed = self.inner().containers.remove(id);
        log::debug!("container {id} removed");
        Ok(removed.and_then(|c| c.cgroup))
    }
}

/// The agent's side of a terminal whose `master` the child sent: sized before the process
/// starts, then copied to and from `stdin`/`stdout`.
fn attach_terminal(
    master: OwnedFd,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    console_size: Option<(u16, u16)>,
) -> Result<Pty, ContainerError> {
    let pty = Pty::attach(master, stdin, stdout)?;
    if let Some((rows, cols)) = console_size {
        pty.resize(rows, cols)?;
    }
    Ok(pty)
}

/// The spec's initial terminal size as (rows, columns), clamped to what a winsize holds.
fn console_size(process: &Process) -> Option<(u16, u16)> {
    process.console_size().map(|b| {
        let clamp = |v: u64| u16::try_from(v).unwrap_or(u16::MAX);
        (clamp(b.height()), clamp(b.width()))
    })
}

fn validate_id(id: &str) -> Result<(), ContainerError> {
    let ok = !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidSpec(format!("bad id {id:?}")))
    }
}

fn get<'a>(inner: &'a Inner, id: &str) -> Result<&'a Container, ContainerError> {
    inner
        .containers
        .get(id)
        .ok_or_else(|| ContainerError::NotFound(id.to_string()))
}

fn get_mut<'a>(inner: &'a mut Inner, id: &str) -> Result<&'a mut Container, ContainerError> {
    inner
        .containers
        .get_mut(id)
        .ok_or_else(|| ContainerError::NotFound(id.to_string()))
}

fn process_mut<'a>(
    inner: &'a mut Inner,
    id: &str,
    exec_id: Option<&str>,
) -> Result<&'a mut ProcessEntry, ContainerError> {
    let c = get_mut(inner, id)?;
    match exec_id {
        None => Ok(&mut c.init),
        Some(e) => c
            .execs
            .get_mut(e)
            .ok_or_else(|| ContainerError::ProcessNotFound {
                id: id.to_string(),
                exec_id: e.to_string(),
            }),
    }
}

fn invalid_state(id: &str, state: State, op: &'static str) -> ContainerError {
    ContainerError::InvalidState {
        id: id.to_string(),
        state,
        op,
    }
}

/// Every process of the container: its cgroup's members; without a cgroup, those in its own
/// PID namespace (a walk of /proc), or init and its exec'd processes in a shared one.
fn container_pids(c: &Container) -> Vec<Pid> {
    if let Some(procs) = c.cgroup.as_ref().and_then(|cg| cg.procs_recursive().ok()) {
        let mut pids: Vec<Pid> = procs
            .into_iter()
            .filter_map(|p| i32::try_from(p).ok())
            .map(Pid::from_raw)
            .collect();
        pids.sort();
        return pids;
    }
    let Some(pidns) = &c.pidns else {
        let mut pids = vec![c.init.pid];
        pids.extend(
            c.execs
                .values()
                .filter(|e| e.exit.get().is_none())
                .map(|e| e.pid),
        );
        return pids;
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![c.init.pid];
    };
    let mut pids: Vec<Pid> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|ns| &ns == pidns)
        })
        .map(Pid::from_raw)
        .collect();
    pids.sort();
    pids
}

fn ns_flag(name: &str) -> CloneFlags {
    match name {
        "cgroup" => CloneFlags::CLONE_NEWCGROUP,
        "ipc" => CloneFlags::CLONE_NEWIPC,
        "uts" => CloneFlags::CLONE_NEWUTS,
        "net" => CloneFlags::CLONE_NEWNET,
        "pid" => CloneFlags::CLONE_NEWPID,
        _ => CloneFlags::CLONE_NEWNS,
    }
}

fn seccomp_of(
    seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
) -> Result<Option<seccompiler::BpfProgram>, ContainerError> {
    seccomp
        .map(seccomp::compile)
        .transpose()
        .map_err(ContainerError::Seccomp)
}

/// Validates `spec` into the plan of its init.
fn init_plan(
    spec: &Spec,
    root_mode: RootMode,
    favordynmods: bool,
) -> Result<SpawnPlan, ContainerError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| ContainerError::InvalidSpec("no process".into()))?;
    let linux = spec.linux().as_ref();
    let mut clone_flags = CloneFlags::empty();
    let mut new_cgroupns = false;
    let mut join = Vec::new();
    let mut has_mount = false;
    let mut has_uts = false;
    for ns in linux
        .and_then(|l| l.namespaces().as_deref())
        .unwrap_or_default()
    {
        let flag = match ns.typ() {
            LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
            LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
            LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
            LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
            LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
            LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
            LinuxNamespaceType::User => {
                return Err(ContainerError::NotSupported("user namespaces".into()))
            }
            LinuxNamespaceType::Time => {
                return Err(ContainerError::NotSupported("time namespaces".into()))
            }
        };
        match ns.path() {
            Some(path) => {
                if flag == CloneFlags::CLONE_NEWNS {
                    return Err(ContainerError::NotSupported(
                        "joining an existing mount namespace".into(),
                    ));
                }
                let file = File::open(path).map_err(|e| {
                    ContainerError::InvalidSpec(format!("namespace path {}: {e}", path.display()))
                })?;
                join.push((file, flag));
            }
            // The network without a path is the sandbox's: the guest's own.
            None if flag == CloneFlags::CLONE_NEWNET => {}
            None if flag == CloneFlags::CLONE_NEWCGROUP => new_cgroupns = true,
            None => clone_flags |= flag,
        }
        has_mount |= flag == CloneFlags::CLONE_NEWNS;
        has_uts |= flag == CloneFlags::CLONE_NEWUTS;
    }
    // The root file system setup needs a mount namespace of its own.
    if !has_mount {
        clone_flags |= CloneFlags::CLONE_NEWNS;
    }
    // As runc: a UTS namespace entry, new or joined (the pod's), allows a hostname; without one
    // the container would rename the VM.
    if !has_uts && (spec.hostname().is_some() || spec.domainname().is_some()) {
        return Err(ContainerError::InvalidSpec(
            "a hostname needs a UTS namespace (of its own or the pod's)".into(),
        ));
    }
    let mut sysctls: Vec<(String, String)> = linux
        .and_then(|l| l.sysctl().clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    sysctls.sort();
    for (key, _) in &sysctls {
        if key.is_empty() || key.contains('/') || key.split('.').any(|p| p.is_empty() || p == "..")
        {
            return Err(ContainerError::InvalidSpec(format!("bad sysctl {key:?}")));
        }
    }
    if linux.is_some_and(|l| l.uid_mappings().is_some() || l.gid_mappings().is_some()) {
        return Err(ContainerError::NotSupported("uid/gid mappings".into()));
    }
    let plan = SpawnPlan {
        join,
        enter: None,
        init: Some(InitPart {
            clone_flags,
            new_cgroupns,
            rootfs: RootfsPlan::from_spec(spec, root_mode, favordynmods)?,
            hostname: spec.hostname().clone(),
            domainname: spec.domainname().clone(),
            sysctls,
        }),
        seccomp: seccomp_of(linux.and_then(|l| l.seccomp().as_ref()))?,
        process: ProcessPlan::from_spec(process)?,
    };
    Ok(plan)
}

//! Spawning one VMM process: in the pod's cgroup and network namespace, its exit watched
//! through the containerd-shim crate's exit monitor, its logs followed, its agent connected.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, Subject, Topic, MONITOR};
use nutshell_protocol::client::{AgentClient, ClientError, ConnectOptions};
use nutshell_protocol::types::ServingStatus;

use super::logs::{clean_line, spawn_console_tail};
use super::teardown::{kill_and_wait, kill_vmm};
use super::{ExitCell, ExitSlot, SandboxPaths, NET_FD};
use crate::cgroup::{self, Layout, PodCgroup};
use crate::config::Config;
use crate::error::{Result, ShimError};

/// Why a VMM launch failed.
pub(super) enum LaunchError {
    /// The VMM exited before its agent answered (a restore that may fall back to a cold boot).
    ExitedEarly(ShimError),
    /// Anything else.
    Other(ShimError),
}

impl LaunchError {
    pub(super) fn into_inner(self) -> ShimError {
        match self {
            LaunchError::ExitedEarly(e) | LaunchError::Other(e) => e,
        }
    }
}

/// What every VMM launch of one sandbox shares: where it runs and what it inherits.
pub(super) struct Launch<'a> {
    pub(super) config: &'a Config,
    pub(super) paths: &'a SandboxPaths,
    pub(super) id: &'a str,
    pub(super) cgroup: Option<&'a PodCgroup>,
    pub(super) netns_fd: Option<RawFd>,
    pub(super) tap_fd: Option<RawFd>,
}

impl Launch<'_> {
    /// Spawns the VMM with `args` (in the pod's cgroup and network namespace, the tap at
    /// [`NET_FD`]), starts its watcher (which calls what `on_exit` holds when it exits) and its
    /// log followers, and connects to its agent. On failure the VMM is gone.
    pub(super) fn run(
        &self,
        args: &[String],
        on_exit: &ExitSlot,
    ) -> std::result::Result<(u32, Arc<ExitCell>, AgentClient), LaunchError> {
        let (config, paths, id) = (self.config, self.paths, self.id);
        // Subscribe before spawning so that an immediate exit is not missed.
        let sub = monitor_subscribe(Topic::Pid).map_err(|e| {
            LaunchError::Other(ShimError::Internal(format!("subscribe to exits: {e}")))
        })?;
        // Opened before the fork: the child only writes to them (async-signal-safe).
        let procs = match self.cgroup.map(PodCgroup::procs_files).transpose() {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => {
                unsubscribe(sub.id);
                return Err(LaunchError::Other(e.into()));
            }
        };
        let fds: Vec<RawFd> = procs.iter().map(AsRawFd::as_raw_fd).collect();
        let (netns_fd, tap_fd) = (self.netns_fd, self.tap_fd);
        let mut command = Command::new(&config.vmm);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        crate::sys::prepare_child(
            &mut command,
            crate::sys::ChildSetup {
                cgroup_procs: fds,
                netns: netns_fd,
                pass: tap_fd.map(|fd| (fd, NET_FD)),
            },
        );
        let spawned = command.spawn();
        drop(procs);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                unsubscribe(sub.id);
                return Err(LaunchError::Other(ShimError::io(format!(
                    "spawn {}",
                    config.vmm.display()
                ))(e)));
            }
        };
        let pid = child.id();
        log::info!(
            "sandbox {id}: spawned {} (pid {pid}) {:.3} s after the shim started: {}",
            config.vmm.display(),
            crate::since_start().as_secs_f64(),
            args.join(" ")
        );
        let _ = std::fs::write(paths.pid_file(), format!("{pid}\n"));

        let exit = Arc::new(ExitCell::default());
        {
            let exit = Arc::clone(&exit);
            let on_exit = Arc::clone(on_exit);
            let id = id.to_owned();
            let pid = i32::try_from(pid).unwrap_or(i32::MAX);
            let watcher = std::thread::Builder::new()
                .name(format!("vmm-watch-{id}"))
                .spawn(move || {
                    let code = loop {
                        match sub.rx.recv() {
                            Ok(ev) => {
                                if let Subject::Pid(p) = ev.subject {
                                    if p == pid {
                                        break ev.exit_code;
                                    }
                                }
                            }
                            // The monitor went away: the shim is exiting.
                            Err(_) => break 255,
                        }
                    };
                    unsubscribe(sub.id);
                    if code == 128 + libc::SIGSYS {
                        log::error!(
                            "sandbox {id}: VMM (pid {pid}) killed by SIGSYS: a seccomp filter refused a system call (the host's audit log or dmesg names it)"
                        );
                    } else {
                        log::info!("sandbox {id}: VMM (pid {pid}) exited with status {code}");
                    }
                    let callback = {
                        let mut slot = on_exit.lock().unwrap_or_else(|e| e.into_inner());
                        exit.set(code);
                        slot.take()
                    };
                    if let Some(callback) = callback {
                        callback(code);
                    }
                });
            if let Err(e) = watcher {
                kill_vmm(pid);
                return Err(LaunchError::Other(ShimError::io("spawn the VMM watcher")(
                    e,
                )));
            }
        }
        if let Some(stderr) = child.stderr.take() {
            let id = id.to_owned();
            let _ = std::thread::Builder::new()
                .name(format!("vmm-log-{id}"))
                .spawn(move || {
                    for line in BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        log::info!("vmm[{id}]: {}", clean_line(&line));
                    }
                });
        }
        spawn_console_tail(id.to_owned(), paths.console(), Arc::clone(&exit));
        // The child is reaped by the crate's SIGCHLD handler; dropping `Child` does not wait.
        drop(child);
        match connect_agent(config, paths, &exit) {
            Ok(agent) => Ok((pid, exit, agent)),
            Err(e) => {
                let early = exit.get().is_some();
                kill_and_wait(pid, &exit);
                Err(if early {
                    LaunchError::ExitedEarly(e)
                } else {
                    LaunchError::Other(e)
                })
            }
        }
    }
}

/// The pod's cgroup for the VMM, made (where missing) in every hierarchy; the directories made
/// are listed in the sandbox directory for `delete` after a dead shim.
pub(super) fn pod_cgroup(cgroups_path: &str, paths: &SandboxPaths) -> Result<PodCgroup> {
    let rel = cgroup::parse_cgroups_path(cgroups_path)?;
    let layout = Layout::detect(Path::new(cgroup::DEFAULT_ROOT))?;
    let mut cg = PodCgroup::create(&layout, &rel)?;
    if let Err(e) = cgroup::save_created(&paths.dir.join(cgroup::CREATED_LIST), cg.created()) {
        cg.remove();
        return Err(ShimError::io("record the created cgroups")(e));
    }
    log::info!(
        "sandbox {}: the VMM runs in cgroup {} ({:?})",
        paths
            .dir
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        rel.display(),
        cg.dirs()
    );
    Ok(cg)
}

/// Ends a subscription to the crate's exit monitor.
pub(crate) fn unsubscribe(id: i64) {
    if let Ok(mut m) = MONITOR.lock() {
        let _ = m.unsubscribe(id);
    }
}

/// Connects to the agent while the guest boots; fails early if the VMM exits.
fn connect_agent(config: &Config, paths: &SandboxPaths, exit: &ExitCell) -> Result<AgentClient> {
    let timeout = config.agent_timeout();
    let deadline = Instant::now() + timeout;
    let opts = ConnectOptions {
        connect_timeout: Duration::from_secs(1),
        retry_interval: Duration::from_millis(20),
        rpc_timeout: Duration::from_secs(config.rpc_timeout_secs),
        ..Default::default()
    };
    let vm_err = |message: String| ShimError::Vm {
        id: paths
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        message,
    };
    loop {
        if let Some(code) = exit.get() {
            return Err(vm_err(format!(
                "the VMM exited with status {code} before the agent answered"
            )));
        }
        match AgentClient::connect(&paths.vsock(), &opts) {
            Ok(agent) => {
                return match agent.check() {
                    Ok(ServingStatus::Serving) => Ok(agent),
                    Ok(s) => Err(vm_err(format!("the agent is not serving ({s:?})"))),
                    Err(e) => Err(ShimError::agent("Health.Check")(e)),
                };
            }
            Err(ClientError::Timeout { .. }) if Instant::now() < deadline => {}
            Err(e) if Instant::now() < deadline => {
                log::debug!("agent connect: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(vm_err(format!(
                    "the agent did not answer within {} s: {}",
                    timeout.as_secs(),
                    crate::error::chain(&e)
                )))
            }
        }
    }
}

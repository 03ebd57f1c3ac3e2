//! The process part of a container's init or exec: user and groups, umask, environment,
//! working directory, arguments (with runc's `PATH` lookup), rlimits, capabilities,
//! `no_new_privileges`, `oom_score_adj`. Validated in the agent ([`ProcessPlan::from_spec`]),
//! applied in the child.

use std::collections::HashSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use caps::{CapSet, Capability};
use nix::sys::stat::Mode;
use oci_spec::runtime::{PosixRlimitType, Process};

use super::step::{is_executable, StepResult};
use super::ContainerError;
use crate::sys as syscall;

/// The default `PATH` for the lookup when the process's environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The five capability sets, each `None` when the spec leaves it out (then emptied, as runc).
#[derive(Debug, Clone, Default)]
struct CapPlan {
    bounding: HashSet<Capability>,
    effective: HashSet<Capability>,
    permitted: HashSet<Capability>,
    inheritable: HashSet<Capability>,
    ambient: HashSet<Capability>,
}

/// The validated process of a spec.
#[derive(Debug, Clone)]
pub struct ProcessPlan {
    args: Vec<CString>,
    env: Vec<CString>,
    path_var: String,
    cwd: PathBuf,
    uid: u32,
    gid: u32,
    additional_gids: Vec<u32>,
    umask: u32,
    rlimits: Vec<(libc::c_int, u64, u64)>,
    caps: Option<CapPlan>,
    no_new_privileges: bool,
    oom_score_adj: Option<i32>,
}

impl ProcessPlan {
    /// Validates `process`.
    pub fn from_spec(process: &Process) -> Result<Self, ContainerError> {
        let invalid = |m: String| ContainerError::InvalidSpec(m);
        let args: Vec<CString> = process
            .args()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|a| {
                CString::new(a.as_str())
                    .map_err(|_| invalid(format!("argument {a:?} has a NUL byte")))
            })
            .collect::<Result<_, _>>()?;
        if args.is_empty() {
            return Err(invalid("process has no args".into()));
        }
        let env_strings = process.env().as_deref().unwrap_or_default();
        let env: Vec<CString> = env_strings
            .iter()
            .map(|e| {
                CString::new(e.as_str()).map_err(|_| invalid(format!("env {e:?} has a NUL byte")))
            })
            .collect::<Result<_, _>>()?;
        let path_var = env_strings
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
            .to_string();
        let cwd = process.cwd().clone();
        if !cwd.is_absolute() {
            return Err(invalid(format!("cwd {} is not absolute", cwd.display())));
        }
        let user = process.user();
        let mut rlimits = Vec::new();
        for r in process.rlimits().as_deref().unwrap_or_default() {
            if r.soft() > r.hard() {
                return Err(invalid(format!("rlimit {}: soft above hard", r.typ())));
            }
            rlimits.push((rlimit_resource(r.typ()), r.soft(), r.hard()));
        }
        let caps = match process.capabilities() {
            None => None,
            Some(c) => {
                let set = |s: &Option<oci_spec::runtime::Capabilities>| -> Result<HashSet<Capability>, ContainerError> {
                    s.iter()
                        .flatten()
                        .map(|cap| {
                            Capability::from_str(&format!("CAP_{cap}"))
                                .map_err(|_| invalid(format!("unknown capability {cap}")))
                        })
                        .collect()
                };
                Some(CapPlan {
                    bounding: set(c.bounding())?,
                    effective: set(c.effective())?,
                    permitted: set(c.permitted())?,
                    inheritable: set(c.inheritable())?,
                    ambient: set(c.ambient())?,
                })
            }
        };
        if caps.is_some() {
            // Read here, in the agent, so that no child pays for it (see agent_bounding_set).
            agent_bounding_set();
        }
        if process.apparmor_profile().is_some() {
            log::debug!("apparmor profile ignored: no AppArmor in the guest");
        }
        if process.selinux_label().is_some() {
            log::debug!("selinux label ignored: no SELinux in the guest");
        }
        if process.io_priority().is_some() || process.scheduler().is_some() {
            return Err(ContainerError::NotSupported(
                "ioPriority and scheduler".into(),
            ));
        }
        Ok(ProcessPlan {
            args,
            env,
            path_var,
            cwd,
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
            umask: user.umask().unwrap_or(0o022),
            rlimits,
            caps,
            no_new_privileges: process.no_new_privileges().unwrap_or(false),
            oom_score_adj: process.oom_score_adj(),
        })
    }

    /// Whether seccomp must go on before the credentials change: without no_new_privs,
    /// installing a filter needs CAP_SYS_ADMIN, which the process may be about to lose.
    pub fn no_new_privileges(&self) -> bool {
        self.no_new_privileges
    }

    /// In the child: `oom_score_adj` and rlimits (while still privileged).
    pub fn apply_limits(&self) -> StepResult {
        if let Some(adj) = self.oom_score_adj {
            std::fs::write("/proc/self/oom_score_adj", adj.to_string())
                .map_err(|e| format!("set oom_score_adj {adj}: {e}"))?;
        }
        for (resource, soft, hard) in &self.rlimits {
            syscall::set_rlimit(*resource, *soft, *hard)
                .map_err(|e| format!("setrlimit {resource}: {e}"))?;
        }
        Ok(())
    }

    /// In the child, inside the container's root: the executable runc would run, resolved
    /// through `PATH` when `args[0]` has no slash.
    pub fn resolve_executable(&self) -> StepResult<CString> {
        let arg0 = self.args[0].to_string_lossy().into_owned();
        if arg0.contains('/') {
            let path = if Path::new(&arg0).is_absolute() {
                PathBuf::from(&arg0)
            } else {
                self.cwd.join(&arg0)
            };
            return match std::fs::metadata(&path) {
                Err(e) => Err(format!("exec: {arg0}: {}", io_reason(&e))),
                Ok(m) if m.is_dir() => Err(format!("exec: {arg0}: is a directory")),
                Ok(_) if !is_executable(&path) => Err(format!("exec: {arg0}: permission denied")),
                Ok(_) => Ok(self.args[0].clone()),
            };
        }
        for dir in self.path_var.split(':') {
            let dir = if dir.is_empty() { "." } else { dir };
            let candidate = Path::new(dir).join(&arg0);
            if is_executable(&candidate) {
                return CString::new(candidate.into_os_string().into_encoded_bytes())
                    .map_err(|_| format!("exec: {arg0}: bad path"));
            }
        }
        Err(format!(
            "exec: {arg0:?}: executable file not found in $PATH"
        ))
    }

    /// The user the process runs as.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// In the child: working directory, umask, groups and ids, capabilities, no_new_privs.
    /// `seccomp_early` is applied before the credentials change (see [`Self::no_new_privileges`]).
    pub fn apply_credentials(&self, seccomp_early: Option<&seccompiler::BpfProgram>) -> StepResult {
        let chdir_early = nix::unistd::chdir(&self.cwd);
        nix::sys::stat::umask(Mode::from_bits_truncate(self.umask));
        if let Some(prog) = seccomp_early {
            super::seccomp::apply(prog).map_err(|e| format!("apply seccomp: {e}"))?;
        }
        if let Some(caps) = &self.caps {
            // Dropping from the bounding set needs CAP_SETPCAP: before the ids change. Only
            // what the agent's own set (inherited) has: read once, not per capability here.
            for cap in agent_bounding_set() {
                if !caps.bounding.contains(cap) {
                    caps::drop(None, CapSet::Bounding, *cap)
                        .map_err(|e| format!("drop {cap} from the bounding set: {e}"))?;
                }
            }
        }
        syscall::prctl(libc::PR_SET_KEEPCAPS, 1).map_err(|e| format!("keep capabilities: {e}"))?;
        // Raw system calls, for this process alone (see `sys::set_groups`).
        syscall::set_groups(&self.additional_gids).map_err(|e| format!("setgroups: {e}"))?;
        syscall::set_gid(self.gid).map_err(|e| format!("setgid {}: {e}", self.gid))?;
        syscall::set_uid(self.uid).map_err(|e| format!("setuid {}: {e}", self.uid))?;
        syscall::prctl(libc::PR_SET_KEEPCAPS, 0)
            .map_err(|e| format!("reset keep capabilities: {e}"))?;
        if let Some(caps) = &self.caps {
            // Each capset must keep effective within permitted: inheritable and effective
            // while the old permitted set still allows them, then permitted.
            caps::set(None, CapSet::Inheritable, &caps.inheritable)
                .map_err(|e| format!("set inheritable capabilities: {e}"))?;
            caps::set(None, CapSet::Effective, &caps.effective)
                .map_err(|e| format!("set effective capabilities: {e}"))?;
            caps::set(None, CapSet::Permitted, &caps.permitted)
                .map_err(|e| format!("set permitted capabilities: {e}"))?;
            caps::clear(None, CapSet::Ambient)
                .map_err(|e| format!("clear ambient capabilities: {e}"))?;
            for cap in &caps.ambient {
                caps::raise(None, CapSet::Ambient, *cap)
                    .map_err(|e| format!("raise ambient {cap}: {e}"))?;
            }
        }
        if chdir_early.is_err() {
            nix::unistd::chdir(&self.cwd)
                .map_err(|e| format!("chdir {}: {e}", self.cwd.display()))?;
        }
        if self.no_new_privileges {
            syscall::prctl(libc::PR_SET_NO_NEW_PRIVS, 1)
                .map_err(|e| format!("set no_new_privs: {e}"))?;
        }
        Ok(())
    }

    /// The arguments and the environment, borrowed for execve.
    pub fn argv_envp(&self) -> (Vec<&std::ffi::CStr>, Vec<&std::ffi::CStr>) {
        (
            self.args.iter().map(CString::as_c_str).collect(),
            self.env.iter().map(CString::as_c_str).collect(),
        )
    }
}

/// The agent's bounding set, read once (the agent never changes it): every container process
/// starts with it, inherited, and drops what its spec leaves out. Reading it costs one prctl
/// per capability the library knows, which the guest here pays in emulated kernel time; a
/// child only drops.
fn agent_bounding_set() -> &'static [Capability] {
    static SET: std::sync::OnceLock<Vec<Capability>> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        let mut set: Vec<Capability> = caps::all()
            .into_iter()
            .filter(|cap| caps::has_cap(None, CapSet::Bounding, *cap).unwrap_or(false))
            .collect();
        set.sort_by_key(|cap| cap.index());
        set
    })
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

fn rlimit_resource(t: PosixRlimitType) -> libc::c_int {
    use PosixRlimitType as T;
    (match t {
        T::RlimitCpu => libc::RLIMIT_CPU,
        T::RlimitFsize => libc::RLIMIT_FSIZE,
        T::RlimitData => libc::RLIMIT_DATA,
        T::RlimitStack => libc::RLIMIT_STACK,
        T::RlimitCore => libc::RLIMIT_CORE,
        T::RlimitRss => libc::RLIMIT_RSS,
        T::RlimitNproc => libc::RLIMIT_NPROC,
        T::RlimitNofile => libc::RLIMIT_NOFILE,
        T::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        T::RlimitAs => libc::RLIMIT_AS,
        T::RlimitLocks => libc::RLIMIT_LOCKS,
        T::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        T::RlimitNice => libc::RLIMIT_NICE,
        T::RlimitRtprio => libc::RLIMIT_RTPRIO,
        T::RlimitRttime => libc::RLIMIT_RTTIME,
    }) as libc::c_int
}

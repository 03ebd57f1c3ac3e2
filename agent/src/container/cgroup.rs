//! A cgroup v2 manager for the containers of the guest.
//!
//! One [`Cgroup`] is one directory of the unified hierarchy (`/sys/fs/cgroup` in the guest;
//! tests pass another root). [`Cgroup::create`] makes it and the missing directories above it,
//! enabling the controllers the container needs in each parent's `cgroup.subtree_control`;
//! [`Cgroup::apply`] writes an OCI [`LinuxResources`]; the rest are the verbs of the agent API
//! (pids, pause/resume, kill, stats, remove). [`OomWatcher`] reports OOM kills.
//!
//! Every cgroup file is parsed by a small pure function ([`parse_flat_keyed`],
//! [`parse_nested_keyed`], [`parse_max`], …). The guest kernel is trusted, but the parsers are
//! strict: a malformed line is an error that names the file, never a silent zero.
//!
//! OCI fields cgroup v2 cannot honour are handled one of two ways, listed in `docs/agent.md`:
//! a limit that would not be enforced is an error ([`CgroupError::Unsupported`]); an obsolete
//! field or a hint without a v2 equivalent is ignored with a log line.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxResources};

/// The controllers a container cgroup gets, where the kernel has them.
pub const WANTED_CONTROLLERS: [&str; 5] = ["cpuset", "cpu", "io", "memory", "pids"];

/// How long [`Cgroup::freeze`] waits for `cgroup.events` to say `frozen 1`.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Cgroup::remove`] retries while the killed processes exit.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The relative cgroup path is not acceptable.
    #[error("invalid cgroup path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// A cgroup file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A value could not be written to a cgroup file.
    #[error("cannot write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be made.
    #[error("cannot create cgroup {path}")]
    Mkdir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be removed.
    #[error("cannot remove cgroup {path}")]
    Rmdir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A cgroup file has content that does not parse.
    #[error("malformed {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ParseError,
    },
    /// An OCI resource value is out of range or inconsistent.
    #[error("invalid resource {field}: {reason}")]
    Invalid {
        /// The OCI field (`memory.swap`, …).
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// An OCI resource that cgroup v2 in this guest cannot enforce.
    #[error("resource {field} is not supported: {reason}")]
    Unsupported {
        /// The OCI field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// The controller a resource needs is not enabled for this cgroup.
    #[error("resource {field} needs the {controller} controller, which {path} does not have")]
    NoController {
        /// The OCI field.
        field: &'static str,
        /// The controller.
        controller: &'static str,
        /// The cgroup.
        path: PathBuf,
    },
    /// `cgroup.freeze` was written but `cgroup.events` did not report frozen in time.
    #[error("cgroup {path} did not freeze within {timeout:?}")]
    FreezeTimeout {
        /// The cgroup.
        path: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
    /// The cgroup still had processes when [`Cgroup::remove`] gave up.
    #[error("cgroup {path} still has processes after {timeout:?}")]
    Busy {
        /// The cgroup.
        path: PathBuf,
        /// How long we retried.
        timeout: Duration,
    },
    /// The OOM watcher could not be set up or could not watch a cgroup.
    #[error("OOM watcher: {what}")]
    Watch {
        /// What failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What is wrong with the content of a cgroup file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A line does not have the expected shape.
    #[error("line {line}: expected {expected}, found {found:?}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// The shape expected.
        expected: &'static str,
        /// The line (cut to 80 bytes).
        found: String,
    },
    /// A number does not parse.
    #[error("line {line}: {value:?} is not an unsigned 64-bit number")]
    Number {
        /// 1-based line number.
        line: usize,
        /// The value (cut to 80 bytes).
        value: String,
    },
    /// A key appears twice.
    #[error("line {line}: duplicate key {key:?}")]
    Duplicate {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: String,
    },
}

fn cut(s: &str) -> String {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn parse_u64(value: &str, line: usize) -> Result<u64, ParseError> {
    // `u64::from_str` accepts a leading '+'; the kernel never writes one.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::Number {
            line,
            value: cut(value),
        });
    }
    value.parse().map_err(|_| ParseError::Number {
        line,
        value: cut(value),
    })
}

/// Parses a flat-keyed file (`cpu.stat`, `memory.stat`, `memory.events`, `cgroup.events`): one
/// `key value` pair per line, value an unsigned number, keys unique.
pub fn parse_flat_keyed(content: &str) -> Result<HashMap<String, u64>, ParseError> {
    let mut map = HashMap::new();
    for (i, raw) in content.lines().enumerate() {
        let line = i + 1;
        if raw.is_empty() {
            continue;
        }
        let mut fields = raw.split(' ');
        let (Some(key), Some(value), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(ParseError::Line {
                line,
                expected: "\"key value\"",
                found: cut(raw),
            });
        };
        if key.is_empty() {
            return Err(ParseError::Line {
                line,
                expected: "\"key value\"",
                found: cut(raw),
            });
        }
        let value = parse_u64(value, line)?;
        if map.insert(key.to_string(), value).is_some() {
            return Err(ParseError::Duplicate {
                line,
                key: cut(key),
            });
        }
    }
    Ok(map)
}

/// The lines of a nested-keyed file: device (`"8:0"`) and its `key=value` pairs.
pub type NestedKeyed = Vec<(String, HashMap<String, u64>)>;

/// Parses a nested-keyed file (`io.stat`): `MAJ:MIN key=value key=value …` per line. Returns
/// the devices and their pairs, in file order.
pub fn parse_nested_keyed(content: &str) -> Result<NestedKeyed, ParseError> {
    let mut devices = Vec::new();
    for (i, raw) in content.lines().enumerate() {
        let line = i + 1;
        if raw.is_empty() {
            continue;
        }
        let mut fields = raw.split(' ');
        let device = fields.next().unwrap_or_default();
        let valid_device = device
            .split_once(':')
            .is_some_and(|(maj, min)| parse_u64(maj, line).is_ok() && parse_u64(min, line).is_ok());
        if !valid_device {
            return Err(ParseError::Line {
                line,
                expected: "\"MAJ:MIN key=value …\"",
                found: cut(raw),
            });
        }
        let mut pairs = HashMap::new();
        for field in fields {
            let Some((key, value)) = field.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                return Err(ParseError::Line {
                    line,
                    expected: "\"key=value\"",
                    found: cut(field),
                });
            };
            if pairs
                .insert(key.to_string(), parse_u64(value, line)?)
                .is_some()
            {
                return Err(ParseError::Duplicate {
                    line,
                    key: cut(key),
                });
            }
        }
        devices.push((device.to_string(), pairs));
    }
    Ok(devices)
}

/// Parses a single-value file that may say `max` (`memory.max`, `pids.max`): `None` is `max`.
pub fn parse_max(content: &str) -> Result<Option<u64>, ParseError> {
    let value = single_line(content)?;
    if value == "max" {
        return Ok(None);
    }
    parse_u64(value, 1).map(Some)
}

/// Parses a single-number file (`memory.current`, `memory.peak`, `pids.current`).
pub fn parse_single_u64(content: &str) -> Result<u64, ParseError> {
    parse_u64(single_line(content)?, 1)
}

fn single_line(content: &str) -> Result<&str, ParseError> {
    let value = content.strip_suffix('\n').unwrap_or(content);
    if value.contains('\n') || value.is_empty() {
        return Err(ParseError::Line {
            line: 1,
            expected: "a single value",
            found: cut(content),
        });
    }
    Ok(value)
}

/// Parses `cgroup.procs`: one PID per line.
pub fn parse_procs(content: &str) -> Result<Vec<u32>, ParseError> {
    content
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            parse_u64(l, i + 1).and_then(|pid| {
                u32::try_from(pid).map_err(|_| ParseError::Number {
                    line: i + 1,
                    value: cut(l),
                })
            })
        })
        .collect()
}

/// Parses `cgroup.controllers` / `cgroup.subtree_control`: names separated by spaces.
pub fn parse_controllers(content: &str) -> Result<Vec<String>, ParseError> {
    let value = content.strip_suffix('\n').unwrap_or(content);
    if value.contains('\n') {
        return Err(ParseError::Line {
            line: 2,
            expected: "one line of controller names",
            found: cut(content),
        });
    }
    value
        .split(' ')
        .filter(|name| !name.is_empty())
        .map(|name| {
            if name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                Ok(name.to_string())
            } else {
                Err(ParseError::Line {
                    line: 1,
                    expected: "controller names",
                    found: cut(name),
                })
            }
        })
        .collect()
}

/// runc's conversion of cgroup v1 `cpu.shares` (2..=262144) to cgroup v2 `cpu.weight`
/// (1..=10000): linear, 2 → 1, 262144 → 10000, the default 1024 → 39.
pub fn cpu_shares_to_weight(shares: u64) -> Result<u64, CgroupError> {
    if !(2..=262_144).contains(&shares) {
        return Err(CgroupError::Invalid {
            field: "cpu.shares",
            reason: format!("{shares} is outside 2..=262144"),
        });
    }
    Ok(1 + ((shares - 2) * 9999) / 262_142)
}

/// The `cpu.max` value for an OCI quota and period (µs): `None` when neither is set. A quota
/// of -1 (or any negative) is `max`; a period alone keeps the quota unlimited.
pub fn cpu_max_value(
    quota: Option<i64>,
    period: Option<u64>,
) -> Result<Option<String>, CgroupError> {
    let quota = quota.filter(|&q| q != 0);
    let period = period.filter(|&p| p != 0);
    if quota.is_none() && period.is_none() {
        return Ok(None);
    }
    let mut value = match quota {
        Some(q) if q > 0 => {
            if q < 1000 {
                return Err(CgroupError::Invalid {
                    field: "cpu.quota",
                    reason: format!("{q} µs is below the kernel's minimum of 1000"),
                });
            }
            q.to_string()
        }
        _ => "max".to_string(),
    };
    if let Some(p) = period {
        if !(1000..=1_000_000).contains(&p) {
            return Err(CgroupError::Invalid {
                field: "cpu.period",
                reason: format!("{p} µs is outside 1000..=1000000"),
            });
        }
        value.push(' ');
        value.push_str(&p.to_string());
    }
    Ok(Some(value))
}

/// The `memory.swap.max` value for OCI `memory.swap` (memory + swap) and `memory.limit`, as
/// runc converts it: `None` leaves it unset, `Some(-1)` is `max`, otherwise swap alone.
pub fn swap_max_value(swap: Option<i64>, limit: Option<i64>) -> Result<Option<i64>, CgroupError> {
    let swap = swap.unwrap_or(0);
    let limit = limit.unwrap_or(0);
    // Memory unlimited and swap not given: unlimited swap too (what cgroup v1 meant).
    if limit == -1 && swap == 0 {
        return Ok(Some(-1));
    }
    match swap {
        0 => return Ok(None),
        -1 => return Ok(Some(-1)),
        s if s < 0 => {
            return Err(CgroupError::Invalid {
                field: "memory.swap",
                reason: format!("{s} is negative"),
            })
        }
        _ => {}
    }
    if limit <= 0 {
        return Err(CgroupError::Invalid {
            field: "memory.swap",
            reason: "a swap limit needs a memory limit".into(),
        });
    }
    if swap < limit {
        return Err(CgroupError::Invalid {
            field: "memory.swap",
            reason: format!("memory+swap {swap} is below the memory limit {limit}"),
        });
    }
    Ok(Some(swap - limit))
}

/// A byte limit as cgroup v2 writes it: -1 is `max`.
fn limit_value(field: &'static str, value: i64) -> Result<String, CgroupError> {
    match value {
        -1 => Ok("max".into()),
        v if v < 0 => Err(CgroupError::Invalid {
            field,
            reason: format!("{v} is negative"),
        }),
        v => Ok(v.to_string()),
    }
}

/// Checks a relative cgroup path (OCI `cgroupsPath`; a leading `/` means "from the root"):
/// normal components only, no `..`, not empty.
pub fn validate_rel_path(rel: &Path) -> Result<PathBuf, CgroupError> {
    let invalid = |reason| CgroupError::InvalidPath {
        path: rel.to_path_buf(),
        reason,
    };
    let mut clean = PathBuf::new();
    for component in rel.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(name) => clean.push(name),
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(invalid("only plain names are allowed (no '.' or '..')"))
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(invalid("the root cgroup cannot be a container's"));
    }
    Ok(clean)
}

/// CPU figures of `cpu.stat` (µs). Throttling counts are 0 without the cpu controller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Total CPU time.
    pub usage_usec: u64,
    /// User time.
    pub user_usec: u64,
    /// System time.
    pub system_usec: u64,
    /// Periods in which the cgroup was throttled.
    pub nr_throttled: u64,
    /// Time throttled.
    pub throttled_usec: u64,
}

/// Memory figures (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// `memory.current`.
    pub usage_bytes: u64,
    /// `memory.max`; `None` is unlimited.
    pub limit_bytes: Option<u64>,
    /// `memory.peak` (Linux 5.19+); `None` when the kernel has no such file.
    pub max_usage_bytes: Option<u64>,
    /// `oom_kill` of `memory.events`.
    pub oom_kills: u64,
    /// `anon` of `memory.stat`.
    pub anon_bytes: u64,
    /// `file` of `memory.stat`.
    pub file_bytes: u64,
}

/// Task counts of the pids controller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PidsStats {
    /// `pids.current`.
    pub current: u64,
    /// `pids.max`; `None` is unlimited.
    pub limit: Option<u64>,
}

/// Bytes read and written, summed over the devices of `io.stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Sum of `rbytes`.
    pub read_bytes: u64,
    /// Sum of `wbytes`.
    pub write_bytes: u64,
}

/// What [`Cgroup::stats`] found; a group is `None` when its controller is not enabled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Always there in cgroup v2 (`cpu.stat` is a core file).
    pub cpu: Option<CpuStats>,
    /// With the memory controller.
    pub memory: Option<MemoryStats>,
    /// With the pids controller.
    pub pids: Option<PidsStats>,
    /// With the io controller.
    pub io: Option<IoStats>,
}

/// [`CpuStats`] from the content of `cpu.stat`.
pub fn cpu_stats_from(cpu_stat: &HashMap<String, u64>) -> CpuStats {
    let get = |k: &str| cpu_stat.get(k).copied().unwrap_or(0);
    CpuStats {
        usage_usec: get("usage_usec"),
        user_usec: get("user_usec"),
        system_usec: get("system_usec"),
        nr_throttled: get("nr_throttled"),
        throttled_usec: get("throttled_usec"),
    }
}

/// [`IoStats`] from the content of `io.stat` (saturating sums).
pub fn io_stats_from(io_stat: &[(String, HashMap<String, u64>)]) -> IoStats {
    io_stat
        .iter()
        .fold(IoStats::default(), |acc, (_, pairs)| IoStats {
            read_bytes: acc
                .read_bytes
                .saturating_add(pairs.get("rbytes").copied().unwrap_or(0)),
            write_bytes: acc
                .write_bytes
                .saturating_add(pairs.get("wbytes").copied().unwrap_or(0)),
        })
}

/// One cgroup v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates the cgroup `rel` under `root` (and the missing directories between), enabling
    /// [`WANTED_CONTROLLERS`] that the kernel offers in each parent's `cgroup.subtree_control`.
    /// An existing cgroup is reused. A controller that cannot be enabled is logged, not fatal:
    /// [`Cgroup::apply`] then fails for a resource that needs it.
    pub fn create(root: &Path, rel: &Path) -> Result<Self, CgroupError> {
        let rel = validate_rel_path(rel)?;
        let mut dir = root.to_path_buf();
        for component in rel.components() {
            enable_controllers(&dir)?;
            dir.push(component);
            match std::fs::create_dir(&dir) {
                Ok(()) => log::debug!("created cgroup {}", dir.display()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(CgroupError::Mkdir { path: dir, source }),
            }
        }
        Ok(Cgroup { path: dir })
    }

    /// An existing cgroup `rel` under `root` (for a container created earlier).
    pub fn open(root: &Path, rel: &Path) -> Result<Self, CgroupError> {
        let path = root.join(validate_rel_path(rel)?);
        if !path.is_dir() {
            return Err(CgroupError::Read {
                path,
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        Ok(Cgroup { path })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The controllers enabled for this cgroup (its `cgroup.controllers`).
    pub fn controllers(&self) -> Result<Vec<String>, CgroupError> {
        let file = self.path.join("cgroup.controllers");
        parse_controllers(&read(&file)?).map_err(|source| CgroupError::Parse { path: file, source })
    }

    /// Writes the OCI resources. Fields are applied in order memory, cpu, cpuset, pids,
    /// hugepages, unified; the first failure stops and is returned (earlier writes stay).
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        let controllers = self.controllers()?;
        let has = |c: &str| controllers.iter().any(|x| x == c);
        if let Some(memory) = resources.memory() {
            self.apply_memory(memory, has("memory"))?;
        }
        if let Some(cpu) = resources.cpu() {
            self.apply_cpu(cpu, has("cpu"), has("cpuset"))?;
        }
        if let Some(pids) = resources.pids() {
            // 0 is "unset"; any negative is unlimited.
            if pids.limit() != 0 {
                let value = if pids.limit() > 0 {
                    pids.limit().to_string()
                } else {
                    "max".into()
                };
                self.need("pids", "pids.limit", has("pids"))?;
                self.write("pids.max", &value)?;
            }
        }
        if let Some(block_io) = resources.block_io() {
            let set = block_io.weight().is_some()
                || block_io.leaf_weight().is_some()
                || block_io
                    .weight_device()
                    .as_ref()
                    .is_some_and(|v| !v.is_empty())
                || block_io
                    .throttle_read_bps_device()
                    .as_ref()
                    .is_some_and(|v| !v.is_empty())
                || block_io
                    .throttle_write_bps_device()
                    .as_ref()
                    .is_some_and(|v| !v.is_empty())
                || block_io
                    .throttle_read_iops_device()
                    .as_ref()
                    .is_some_and(|v| !v.is_empty())
                || block_io
                    .throttle_write_iops_device()
                    .as_ref()
                    .is_some_and(|v| !v.is_empty());
            if set {
                return Err(CgroupError::Unsupported {
                    field: "blockIO",
                    reason: "I/O weights and throttling are not supported yet",
                });
            }
        }
        if let Some(limits) = resources.hugepage_limits() {
            for limit in limits {
                let file = format!("hugetlb.{}.max", limit.page_size());
                if self.path.join(&file).exists() {
                    self.write(&file, &limit.limit().to_string())?;
                } else if limit.limit() == 0 {
                    // kubelet lists every page size of the node, with 0 for those not asked
                    // for; no huge pages of that size in the guest is the same.
                    log::debug!(
                        "hugepage limit {} of 0 ignored: no such size here",
                        limit.page_size()
                    );
                } else {
                    return Err(CgroupError::Unsupported {
                        field: "hugepageLimits",
                        reason: "the guest has no hugetlb controller for this page size",
                    });
                }
            }
        }
        if resources.rdma().as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(CgroupError::Unsupported {
                field: "rdma",
                reason: "the guest has no RDMA devices",
            });
        }
        if resources.network().is_some() {
            log::debug!("network classID/priorities ignored: cgroup v1 only");
        }
        if resources.devices().as_ref().is_some_and(|d| !d.is_empty()) {
            // containerd always sends the default device rules. cgroup v2 enforces them with an
            // eBPF program; the guest's containers see only the device nodes the container
            // core creates, and the VM is the isolation boundary.
            log::debug!(
                "device cgroup rules not enforced in the guest (no eBPF device filter yet)"
            );
        }
        if let Some(unified) = resources.unified() {
            let mut keys: Vec<_> = unified.keys().collect();
            keys.sort();
            for key in keys {
                self.write_unified(key, &unified[key])?;
            }
        }
        Ok(())
    }

    fn apply_memory(&self, memory: &LinuxMemory, has_memory: bool) -> Result<(), CgroupError> {
        #[allow(deprecated)] // read only to say that it is ignored
        if memory.kernel().is_some() {
            log::warn!("memory.kernel ignored: kernel memory limits are obsolete since Linux 5.4");
        }
        if memory.kernel_tcp().is_some() {
            return Err(CgroupError::Unsupported {
                field: "memory.kernelTCP",
                reason: "cgroup v2 has no separate TCP memory limit",
            });
        }
        if memory.swappiness().is_some() {
            log::warn!("memory.swappiness ignored: cgroup v2 has no per-cgroup swappiness");
        }
        if memory.disable_oom_killer() == Some(true) {
            return Err(CgroupError::Unsupported {
                field: "memory.disableOOMKiller",
                reason: "cgroup v2 cannot disable the OOM killer",
            });
        }
        if memory.use_hierarchy().is_some() {
            log::debug!("memory.useHierarchy ignored: cgroup v2 is always hierarchical");
        }
        let limit = memory.limit().filter(|&l| l != 0);
        let swap = swap_max_value(memory.swap(), memory.limit())?;
        let reservation = memory.reservation().filter(|&r| r != 0);
        if limit.is_none() && swap.is_none() && reservation.is_none() {
            return Ok(());
        }
        self.need("memory", "memory", has_memory)?;
        if let Some(limit) = limit {
            let value = limit_value("memory.limit", limit)?;
            if memory.check_before_update() == Some(true) && limit > 0 {
                let current = self.read_u64("memory.current")?;
                if current > limit.unsigned_abs() {
                    return Err(CgroupError::Invalid {
                        field: "memory.limit",
                        reason: format!("{limit} is below the current usage {current}"),
                    });
                }
            }
            // cgroup v2 keeps memory.max and memory.swap.max independent: no order to keep.
            self.write("memory.max", &value)?;
        }
        if let Some(swap) = swap {
            let value = limit_value("memory.swap", swap)?;
            match self.write("memory.swap.max", &value) {
                Ok(()) => {}
                // A kernel without swap has no memory.swap.max; "no swap" or "any swap" is
                // then already true.
                Err(CgroupError::Write { source, .. })
                    if source.kind() == io::ErrorKind::NotFound && (swap == -1 || swap == 0) =>
                {
                    log::debug!("no memory.swap.max (no swap in this kernel); swap {value} holds");
                }
                Err(CgroupError::Write { source, .. })
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    return Err(CgroupError::Unsupported {
                        field: "memory.swap",
                        reason: "the guest kernel has no swap",
                    })
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(reservation) = reservation {
            self.write(
                "memory.low",
                &limit_value("memory.reservation", reservation)?,
            )?;
        }
        Ok(())
    }

    fn apply_cpu(
        &self,
        cpu: &LinuxCpu,
        has_cpu: bool,
        has_cpuset: bool,
    ) -> Result<(), CgroupError> {
        if cpu.realtime_runtime().is_some_and(|r| r != 0)
            || cpu.realtime_period().is_some_and(|p| p != 0)
        {
            return Err(CgroupError::Unsupported {
                field: "cpu.realtimeRuntime",
                reason: "cgroup v2 has no real-time CPU budget",
            });
        }
        if let Some(shares) = cpu.shares().filter(|&s| s != 0) {
            self.need("cpu", "cpu.shares", has_cpu)?;
            self.write("cpu.weight", &cpu_shares_to_weight(shares)?.to_string())?;
        }
        if let Some(value) = cpu_max_value(cpu.quota(), cpu.period())? {
            self.need("cpu", "cpu.quota", has_cpu)?;
            self.write_cpu_file("cpu.max", &value, "cpu.quota")?;
        }
        if let Some(burst) = cpu.burst() {
            self.need("cpu", "cpu.burst", has_cpu)?;
            self.write_cpu_file("cpu.max.burst", &burst.to_string(), "cpu.burst")?;
        }
        if let Some(idle) = cpu.idle() {
            self.need("cpu", "cpu.idle", has_cpu)?;
            self.write_cpu_file("cpu.idle", &idle.to_string(), "cpu.idle")?;
        }
        for (file, value, field) in [
            ("cpuset.cpus", cpu.cpus(), "cpu.cpus"),
            ("cpuset.mems", cpu.mems(), "cpu.mems"),
        ] {
            if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
                self.need("cpuset", field, has_cpuset)?;
                self.write(file, value)?;
            }
        }
        Ok(())
    }

    /// The cpu controller's bandwidth files exist only with `CONFIG_CFS_BANDWIDTH`.
    fn write_cpu_file(
        &self,
        file: &str,
        value: &str,
        field: &'static str,
    ) -> Result<(), CgroupError> {
        match self.write(file, value) {
            Err(CgroupError::Write { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Err(CgroupError::Unsupported {
                    field,
                    reason:
                        "the guest kernel's cpu controller lacks this file (CONFIG_CFS_BANDWIDTH)",
                })
            }
            other => other,
        }
    }

    /// OCI `unified`: `file → value`, written as given. The key must name an existing file of
    /// this cgroup directly (no `/`), and not one of the `cgroup.*` core files.
    fn write_unified(&self, key: &str, value: &str) -> Result<(), CgroupError> {
        let valid = !key.is_empty()
            && !key.starts_with("cgroup.")
            && key.contains('.')
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
        if !valid {
            return Err(CgroupError::Invalid {
                field: "unified",
                reason: format!("{:?} is not a controller file name", cut(key)),
            });
        }
        if !self.path.join(key).is_file() {
            return Err(CgroupError::Invalid {
                field: "unified",
                reason: format!("{key} does not exist in {}", self.path.display()),
            });
        }
        self.write(key, value)
    }

    fn need(
        &self,
        controller: &'static str,
        field: &'static str,
        present: bool,
    ) -> Result<(), CgroupError> {
        if present {
            Ok(())
        } else {
            Err(CgroupError::NoController {
                field,
                controller,
                path: self.path.clone(),
            })
        }
    }

    /// Moves a process into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// The PIDs in this cgroup (not its descendants).
    pub fn procs(&self) -> Result<Vec<u32>, CgroupError> {
        let file = self.path.join("cgroup.procs");
        parse_procs(&read(&file)?).map_err(|source| CgroupError::Parse { path: file, source })
    }

    /// The PIDs in this cgroup and every cgroup beneath it (a container may make its own).
    pub fn procs_recursive(&self) -> Result<Vec<u32>, CgroupError> {
        let mut pids = self.procs()?;
        let mut dirs = vec![self.path.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let sub = Cgroup { path: e.path() };
                    // A child cgroup removed meanwhile is simply gone.
                    pids.extend(sub.procs().unwrap_or_default());
                    dirs.push(sub.path);
                }
            }
        }
        Ok(pids)
    }

    /// `cgroup.events` as key → value (`populated`, `frozen`).
    pub fn events(&self) -> Result<HashMap<String, u64>, CgroupError> {
        self.read_flat("cgroup.events")
    }

    /// Freezes every process of the cgroup and its descendants; returns once `cgroup.events`
    /// says `frozen 1`, or fails after [`FREEZE_TIMEOUT`].
    pub fn freeze(&self) -> Result<(), CgroupError> {
        self.write("cgroup.freeze", "1")?;
        self.wait_frozen(true, FREEZE_TIMEOUT)
    }

    /// Thaws the cgroup; returns once `cgroup.events` says `frozen 0`.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        self.write("cgroup.freeze", "0")?;
        self.wait_frozen(false, FREEZE_TIMEOUT)
    }

    /// Waits until `frozen` of `cgroup.events` is `want`, with a growing sleep (1 ms → 50 ms):
    /// each read is a syscall, and syscalls are expensive in a guest under nested KVM.
    pub fn wait_frozen(&self, want: bool, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if self.events()?.get("frozen").copied().unwrap_or(0) == u64::from(want) {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(CgroupError::FreezeTimeout {
                    path: self.path.clone(),
                    timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Sends SIGKILL to every process of the cgroup and its descendants (`cgroup.kill`, Linux
    /// 5.14+). Returns at once; the processes exit asynchronously.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.write("cgroup.kill", "1")
    }

    /// CPU, memory, pids and I/O figures; a group whose controller is absent is `None`.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        let cpu = self.read_flat_opt("cpu.stat")?.map(|m| cpu_stats_from(&m));
        let memory = match self.read_opt("memory.current")? {
            None => None,
            Some(current) => {
                let usage_bytes =
                    parse_single_u64(&current).map_err(|source| CgroupError::Parse {
                        path: self.path.join("memory.current"),
                        source,
                    })?;
                let limit_bytes = self.read_max("memory.max")?;
                let max_usage_bytes = match self.read_opt("memory.peak")? {
                    None => None,
                    Some(peak) => {
                        Some(
                            parse_single_u64(&peak).map_err(|source| CgroupError::Parse {
                                path: self.path.join("memory.peak"),
                                source,
                            })?,
                        )
                    }
                };
                let events = self.read_flat("memory.events")?;
                let stat = self.read_flat("memory.stat")?;
                Some(MemoryStats {
                    usage_bytes,
                    limit_bytes,
                    max_usage_bytes,
                    oom_kills: events.get("oom_kill").copied().unwrap_or(0),
                    anon_bytes: stat.get("anon").copied().unwrap_or(0),
                    file_bytes: stat.get("file").copied().unwrap_or(0),
                })
            }
        };
        let pids = match self.read_opt("pids.current")? {
            None => None,
            Some(current) => Some(PidsStats {
                current: parse_single_u64(&current).map_err(|source| CgroupError::Parse {
                    path: self.path.join("pids.current"),
                    source,
                })?,
                limit: self.read_max("pids.max")?,
            }),
        };
        let io = match self.read_opt("io.stat")? {
            None => None,
            Some(content) => Some(io_stats_from(&parse_nested_keyed(&content).map_err(
                |source| CgroupError::Parse {
                    path: self.path.join("io.stat"),
                    source,
                },
            )?)),
        };
        Ok(CgroupStats {
            cpu,
            memory,
            pids,
            io,
        })
    }

    /// `oom_kill` of `memory.events`.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        Ok(self
            .read_flat("memory.events")?
            .get("oom_kill")
            .copied()
            .unwrap_or(0))
    }

    /// Removes the cgroup directory, retrying for [`REMOVE_TIMEOUT`] while it is busy (killed
    /// processes still exiting). Kill them first ([`Cgroup::kill_all`]). Already gone is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.remove_within(REMOVE_TIMEOUT)
    }

    /// [`Cgroup::remove`] with another retry budget.
    pub fn remove_within(&self, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => {
                    log::debug!("removed cgroup {}", self.path.display());
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if start.elapsed() >= timeout {
                        return Err(CgroupError::Busy {
                            path: self.path.clone(),
                            timeout,
                        });
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(CgroupError::Rmdir {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
    }

    fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.path.join(file);
        write(&path, value)
    }

    fn read_u64(&self, file: &str) -> Result<u64, CgroupError> {
        let path = self.path.join(file);
        parse_single_u64(&read(&path)?).map_err(|source| CgroupError::Parse { path, source })
    }

    fn read_max(&self, file: &str) -> Result<Option<u64>, CgroupError> {
        let path = self.path.join(file);
        parse_max(&read(&path)?).map_err(|source| CgroupError::Parse { path, source })
    }

    fn read_flat(&self, file: &str) -> Result<HashMap<String, u64>, CgroupError> {
        let path = self.path.join(file);
        parse_flat_keyed(&read(&path)?).map_err(|source| CgroupError::Parse { path, source })
    }

    fn read_flat_opt(&self, file: &str) -> Result<Option<HashMap<String, u64>>, CgroupError> {
        let path = self.path.join(file);
        match self.read_opt(file)? {
            None => Ok(None),
            Some(content) => parse_flat_keyed(&content)
                .map(Some)
                .map_err(|source| CgroupError::Parse { path, source }),
        }
    }

    /// Reads a file that exists only with some controller: `None` when it does not.
    fn read_opt(&self, file: &str) -> Result<Option<String>, CgroupError> {
        let path = self.path.join(file);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CgroupError::Read { path, source }),
        }
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// One write(2) of the whole value, without creating the file: cgroup files take a value per
/// write, and a missing file means a missing controller, not a file to make.
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    use std::io::Write as _;
    let result = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    result.map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: cut(value),
        source,
    })
}

/// Enables in `dir`'s `cgroup.subtree_control` the [`WANTED_CONTROLLERS`] that `dir` has and
/// that are not enabled yet: all at once, then one by one if the kernel refused the set (one
/// controller may be refused, e.g. cpuset when the parent's cpuset is empty).
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available_file = dir.join("cgroup.controllers");
    let available =
        parse_controllers(&read(&available_file)?).map_err(|source| CgroupError::Parse {
            path: available_file,
            source,
        })?;
    let enabled_file = dir.join("cgroup.subtree_control");
    let enabled =
        parse_controllers(&read(&enabled_file)?).map_err(|source| CgroupError::Parse {
            path: enabled_file.clone(),
            source,
        })?;
    let missing: Vec<&str> = WANTED_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| available.iter().any(|a| a == c) && !enabled.iter().any(|e| e == c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let all = missing
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    if write(&enabled_file, &all).is_ok() {
        return Ok(());
    }
    for c in missing {
        if let Err(e) = write(&enabled_file, &format!("+{c}")) {
            log::warn!("controller {c} not enabled in {}: {e}", dir.display());
        }
    }
    Ok(())
}

/// One cgroup the [`OomWatcher`] follows.
#[derive(Debug)]
struct Watched {
    container_id: String,
    memory_events: PathBuf,
    oom_kills: u64,
}

#[derive(Debug, Default)]
struct Watches {
    by_wd: HashMap<WatchDescriptor, Watched>,
}

/// Reports OOM kills: watches the `memory.events` of each registered cgroup with inotify (the
/// kernel signals a change of the file as a modification) and sends the container ID on the
/// channel each time `oom_kill` has grown. One thread, woken only by events.
#[derive(Debug)]
pub struct OomWatcher {
    inotify: Arc<Inotify>,
    watches: Arc<Mutex<Watches>>,
    stop: Option<std::os::fd::OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl OomWatcher {
    /// Starts the watcher thread; container IDs arrive on `events`.
    pub fn start(events: mpsc::Sender<String>) -> Result<Self, CgroupError> {
        let watch_err = |what| {
            move |e: nix::Error| CgroupError::Watch {
                what,
                source: io::Error::from(e),
            }
        };
        let inotify = Arc::new(
            Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
                .map_err(watch_err("inotify_init"))?,
        );
        let (stop_read, stop_write) = nix::unistd::pipe().map_err(watch_err("pipe"))?;
        let watches = Arc::new(Mutex::new(Watches::default()));
        let thread = {
            let inotify = Arc::clone(&inotify);
            let watches = Arc::clone(&watches);
            std::thread::Builder::new()
                .name("oom-watcher".into())
                .spawn(move || watch_loop(&inotify, &stop_read, &watches, &events))
                .map_err(|source| CgroupError::Watch {
                    what: "spawn thread",
                    source,
                })?
        };
        Ok(OomWatcher {
            inotify,
            watches,
            stop: Some(stop_write),
            thread: Some(thread),
        })
    }

    /// Follows `cgroup`'s `memory.events` for `container_id`. OOM kills before this call are
    /// not reported.
    pub fn watch(&self, container_id: &str, cgroup: &Cgroup) -> Result<(), CgroupError> {
        let memory_events = cgroup.path().join("memory.events");
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let wd = self
            .inotify
            .add_watch(&memory_events, AddWatchFlags::IN_MODIFY)
            .map_err(|e| CgroupError::Watch {
                what: "inotify_add_watch on memory.events",
                source: io::Error::from(e),
            })?;
        // Read after the watch is in place: an OOM kill in between is then seen as an event.
        let oom_kills = cgroup.oom_kills()?;
        watches.by_wd.insert(
            wd,
            Watched {
                container_id: container_id.to_string(),
                memory_events,
                oom_kills,
            },
        );
        Ok(())
    }

    /// Stops following `container_id` (a removed cgroup is dropped by itself).
    pub fn unwatch(&self, container_id: &str) {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let wds: Vec<WatchDescriptor> = watches
            .by_wd
            .iter()
            .filter(|(_, w)| w.container_id == container_id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in wds {
            watches.by_wd.remove(&wd);
            if let Err(e) = self.inotify.rm_watch(wd) {
                log::debug!("inotify_rm_watch for {container_id}: {e}");
            }
        }
    }
}

impl Drop for OomWatcher {
    fn drop(&mut self) {
        // Closing the write end wakes the thread's poll with POLLHUP.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch_loop(
    inotify: &Inotify,
    stop: &std::os::fd::OwnedFd,
    watches: &Mutex<Watches>,
    events: &mpsc::Sender<String>,
) {
    loop {
        let mut fds = [
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                log::error!("OOM watcher: poll: {e}; OOM events are no longer reported");
                return;
            }
        }
        if fds[1].any().unwrap_or(true) {
            return;
        }
        let batch = match inotify.read_events() {
            Ok(batch) => batch,
            Err(nix::Error::EAGAIN) => continue,
            Err(e) => {
                log::error!("OOM watcher: read: {e}; OOM events are no longer reported");
                return;
            }
        };
        let mut watches = watches.lock().unwrap_or_else(|p| p.into_inner());
        for event in batch {
            if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                // The cgroup was removed (or unwatched).
                watches.by_wd.remove(&event.wd);
                continue;
            }
            let Some(watched) = watches.by_wd.get_mut(&event.wd) else {
                continue;
            };
            let kills = std::fs::read_to_string(&watched.memory_events)
                .map_err(|e| e.to_string())
                .and_then(|c| parse_flat_keyed(&c).map_err(|e| e.to_string()))
                .map(|m| m.get("oom_kill").copied().unwrap_or(0));
            match kills {
                Ok(kills) if kills > watched.oom_kills => {
                    log::info!(
                        "container {}: OOM kill ({kills} so far)",
                        watched.container_id
                    );
                    watched.oom_kills = kills;
                    if events.send(watched.container_id.clone()).is_err() {
                        log::debug!("OOM watcher: receiver gone; stopping");
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => log::warn!("OOM watcher: {}: {e}", watched.memory_events.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_parses_and_rejects() {
        let m = parse_flat_keyed("usage_usec 100\nuser_usec 60\nsystem_usec 40\n").unwrap();
        assert_eq!(m["usage_usec"], 100);
        assert_eq!(m["system_usec"], 40);
        assert!(parse_flat_keyed("").unwrap().is_empty());
        assert!(matches!(
            parse_flat_keyed("a 1\nb\n"),
            Err(ParseError::Line { line: 2, .. })
        ));
        assert!(matches!(
            parse_flat_keyed("a 1 2\n"),
            Err(ParseError::Line { line: 1, .. })
        ));
        assert!(matches!(
            parse_flat_keyed("a -1\n"),
            Err(ParseError::Number { line: 1, .. })
        ));
        assert!(matches!(
            parse_flat_keyed("a +1\n"),
            Err(ParseError::Number { .. })
        ));
        assert!(matches!(
            parse_flat_keyed("a 99999999999999999999\n"),
            Err(ParseError::Number { .. })
        ));
        assert!(matches!(
            parse_flat_keyed("a 1\na 2\n"),
            Err(ParseError::Duplicate { line: 2, .. })
        ));
        assert!(matches!(
            parse_flat_keyed(" 1\n"),
            Err(ParseError::Line { .. })
        ));
    }

    #[test]
    fn nested_keyed_parses_io_stat() {
        let content = "8:0 rbytes=1024 wbytes=2048 rios=1 wios=2 dbytes=0 dios=0\n\
                       253:1 rbytes=10 wbytes=20 rios=1 wios=1 dbytes=0 dios=0\n";
        let parsed = parse_nested_keyed(content).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].0, "253:1");
        assert_eq!(
            io_stats_from(&parsed),
            IoStats {
                read_bytes: 1034,
                write_bytes: 2068
            }
        );
        assert!(parse_nested_keyed("sda rbytes=1\n").is_err());
        assert!(parse_nested_keyed("8:0 rbytes\n").is_err());
        assert!(parse_nested_keyed("8:0 rbytes=x\n").is_err());
        assert!(parse_nested_keyed("8:0 =1\n").is_err());
        assert!(parse_nested_keyed("8:x rbytes=1\n").is_err());
        assert!(parse_nested_keyed("8:0 rbytes=1 rbytes=2\n").is_err());
    }

    #[test]
    fn single_values() {
        assert_eq!(parse_max("max\n").unwrap(), None);
        assert_eq!(parse_max("4096\n").unwrap(), Some(4096));
        assert!(parse_max("").is_err());
        assert!(parse_max("1\n2\n").is_err());
        assert!(parse_max("maximum\n").is_err());
        assert_eq!(parse_single_u64("12\n").unwrap(), 12);
        assert!(parse_single_u64("max\n").is_err());
        assert!(parse_single_u64("-3\n").is_err());
    }

    #[test]
    fn procs_and_controllers() {
        assert_eq!(parse_procs("1\n22\n333\n").unwrap(), vec![1, 22, 333]);
        assert!(parse_procs("").unwrap().is_empty());
        assert!(parse_procs("1\nx\n").is_err());
        assert!(parse_procs("4294967296\n").is_err());
        assert_eq!(
            parse_controllers("cpuset cpu io memory pids\n").unwrap(),
            vec!["cpuset", "cpu", "io", "memory", "pids"]
        );
        assert!(parse_controllers("\n").unwrap().is_empty());
        assert!(parse_controllers("cpu\nmemory\n").is_err());
        assert!(parse_controllers("cpu +memory\n").is_err());
    }

    #[test]
    fn cpu_conversions() {
        assert_eq!(cpu_shares_to_weight(2).unwrap(), 1);
        assert_eq!(cpu_shares_to_weight(1024).unwrap(), 39);
        assert_eq!(cpu_shares_to_weight(262_144).unwrap(), 10_000);
        assert!(cpu_shares_to_weight(1).is_err());
        assert!(cpu_shares_to_weight(262_145).is_err());
        assert_eq!(cpu_max_value(None, None).unwrap(), None);
        assert_eq!(cpu_max_value(Some(0), Some(0)).unwrap(), None);
        assert_eq!(
            cpu_max_value(Some(50_000), Some(100_000))
                .unwrap()
                .as_deref(),
            Some("50000 100000")
        );
        assert_eq!(
            cpu_max_value(Some(50_000), None).unwrap().as_deref(),
            Some("50000")
        );
        assert_eq!(
            cpu_max_value(Some(-1), Some(100_000)).unwrap().as_deref(),
            Some("max 100000")
        );
        assert_eq!(
            cpu_max_value(None, Some(20_000)).unwrap().as_deref(),
            Some("max 20000")
        );
        assert!(cpu_max_value(Some(999), None).is_err());
        assert!(cpu_max_value(Some(5000), Some(999)).is_err());
        assert!(cpu_max_value(Some(5000), Some(1_000_001)).is_err());
    }

    #[test]
    fn swap_conversion_follows_runc() {
        assert_eq!(swap_max_value(None, None).unwrap(), None);
        assert_eq!(swap_max_value(None, Some(-1)).unwrap(), Some(-1));
        assert_eq!(swap_max_value(Some(-1), Some(100)).unwrap(), Some(-1));
        assert_eq!(swap_max_value(Some(300), Some(100)).unwrap(), Some(200));
        assert_eq!(swap_max_value(Some(100), Some(100)).unwrap(), Some(0));
        assert!(swap_max_value(Some(50), Some(100)).is_err());
        assert!(swap_max_value(Some(300), None).is_err());
        assert!(swap_max_value(Some(300), Some(-1)).is_err());
        assert!(swap_max_value(Some(-5), Some(100)).is_err());
    }

    #[test]
    fn rel_paths_are_strict() {
        assert_eq!(
            validate_rel_path(Path::new("pod/ctr")).unwrap(),
            Path::new("pod/ctr")
        );
        assert_eq!(
            validate_rel_path(Path::new("/pod/ctr")).unwrap(),
            Path::new("pod/ctr")
        );
        assert!(validate_rel_path(Path::new("pod/../../etc")).is_err());
        assert!(validate_rel_path(Path::new("./pod")).is_err());
        assert!(validate_rel_path(Path::new("/")).is_err());
        assert!(validate_rel_path(Path::new("")).is_err());
    }
}

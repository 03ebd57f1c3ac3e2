//! Usage figures of a cgroup: `cpu.stat`, memory, pids and `io.stat`.

use std::collections::HashMap;

use super::parse::{parse_nested_keyed, parse_single_u64};
use super::{Cgroup, CgroupError};

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

impl Cgroup {
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
}

//! OCI `LinuxResources` → cgroup v2 files: the runc conversions and [`Cgroup::apply`].

use std::io;

use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxResources};

use super::parse::cut;
use super::{Cgroup, CgroupError};

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

impl Cgroup {
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
}

#[cfg(test)]
mod tests {
    use super::*;
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
}

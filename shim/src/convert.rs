//! Conversions between containerd's types and ours: timestamps, runtime options, an exec's
//! process spec, resources, and the metrics containerd's Stats expects.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::api::StatsResponse;
use containerd_shim::protos::cgroups::metrics::{
    BlkIOEntry, BlkIOStat, CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat, Throttle,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{CodedInputStream, Message, MessageField};
use nutshell_protocol::types::{ContainerStats, Resources};
use nutshell_protocol::vmm_client::VmmStats;

use crate::error::{Result, ShimError};

pub fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    t.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    t
}

pub fn timestamp_from_nanos(nanos: u64) -> Timestamp {
    if nanos == 0 {
        return now();
    }
    let mut t = Timestamp::new();
    t.seconds = i64::try_from(nanos / 1_000_000_000).unwrap_or(i64::MAX);
    t.nanos = i32::try_from(nanos % 1_000_000_000).unwrap_or(0);
    t
}

/// An exec's OCI `process` JSON with `consoleSize` set to `rows` × `cols`.
pub fn with_console_size(process_json: &[u8], rows: u32, cols: u32) -> Result<Vec<u8>> {
    let mut process: serde_json::Value = serde_json::from_slice(process_json)
        .map_err(|e| ShimError::InvalidArgument(format!("exec process spec: {e}")))?;
    let obj = process
        .as_object_mut()
        .ok_or_else(|| ShimError::InvalidArgument("exec process spec: not an object".into()))?;
    obj.insert(
        "consoleSize".to_owned(),
        serde_json::json!({ "height": rows, "width": cols }),
    );
    serde_json::to_vec(&process)
        .map_err(|e| ShimError::Internal(format!("serialize the exec process spec: {e}")))
}

/// The config file named in containerd's runtime options (`runtimeoptions.v1.Options`,
/// `config_path` = field 2), if any.
pub fn config_path_from_options(options: &Any) -> Result<Option<PathBuf>> {
    if !options.type_url.ends_with("runtimeoptions.v1.Options") {
        return Ok(None);
    }
    let bad = |e: containerd_shim::protos::protobuf::Error| {
        ShimError::InvalidArgument(format!("runtime options: {e}"))
    };
    let mut input = CodedInputStream::from_bytes(&options.value);
    let mut path = None;
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(bad)? {
        if tag == (2 << 3) | 2 {
            path = Some(PathBuf::from(input.read_string().map_err(bad)?));
        } else {
            let wire =
                containerd_shim::protos::protobuf::rt::WireType::new(tag & 7).ok_or_else(|| {
                    ShimError::InvalidArgument("runtime options: bad wire type".into())
                })?;
            input.skip_field(wire).map_err(bad)?;
        }
    }
    Ok(path.filter(|p| !p.as_os_str().is_empty()))
}

/// An app or standalone container's metrics, from the guest's cgroup statistics.
pub fn container_stats_response(s: &ContainerStats) -> Result<StatsResponse> {
    let metrics = Metrics {
        pids: MessageField::some(PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: s.cpu_usage_usec.saturating_mul(1000),
                kernel: s.cpu_system_usec.saturating_mul(1000),
                user: s.cpu_user_usec.saturating_mul(1000),
                ..Default::default()
            }),
            throttling: MessageField::some(Throttle {
                throttled_periods: s.cpu_nr_throttled,
                throttled_time: s.cpu_throttled_usec.saturating_mul(1000),
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            cache: s.memory_file_bytes,
            rss: s.memory_anon_bytes,
            usage: MessageField::some(MemoryEntry {
                usage: s.memory_usage_bytes,
                limit: s.memory_limit_bytes,
                max: s.memory_max_usage_bytes,
                failcnt: s.memory_oom_kills,
                ..Default::default()
            }),
            ..Default::default()
        }),
        blkio: MessageField::some(BlkIOStat {
            io_service_bytes_recursive: vec![
                BlkIOEntry {
                    op: "Read".into(),
                    value: s.io_read_bytes,
                    ..Default::default()
                },
                BlkIOEntry {
                    op: "Write".into(),
                    value: s.io_write_bytes,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
        ..Default::default()
    };
    stats_response(&metrics)
}

/// Resources of an Update (the OCI `LinuxResources` JSON) as the agent takes them.
pub fn resources_from_oci(json: &[u8]) -> Result<Resources> {
    let r: oci_spec::runtime::LinuxResources = serde_json::from_slice(json)
        .map_err(|e| ShimError::InvalidArgument(format!("resources: {e}")))?;
    let cpu = r.cpu().as_ref();
    let mem = r.memory().as_ref();
    Ok(Resources {
        cpu_shares: cpu.and_then(|c| c.shares()),
        cpu_quota: cpu.and_then(|c| c.quota()),
        cpu_period: cpu.and_then(|c| c.period()),
        cpuset_cpus: cpu.and_then(|c| c.cpus().clone()),
        cpuset_mems: cpu.and_then(|c| c.mems().clone()),
        memory_limit_bytes: mem.and_then(|m| m.limit()),
        memory_swap_bytes: mem.and_then(|m| m.swap()),
        pids_limit: r.pids().as_ref().map(|p| p.limit()),
    })
}

/// The pod sandbox task's metrics: its VM's, from the VMM's control socket (the guest memory
/// as the limit, its resident part as the usage). The VM's CPU time is not reported there, so
/// the CPU entry is left out rather than given as zero.
pub fn pod_stats_response(s: &VmmStats) -> Result<StatsResponse> {
    let metrics = Metrics {
        memory: MessageField::some(MemoryStat {
            rss: s.rss_bytes,
            usage: MessageField::some(MemoryEntry {
                usage: s.rss_bytes,
                limit: s.memory_bytes,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    stats_response(&metrics)
}

/// `metrics` as containerd wants them: resolved by this type URL (its typeurl registry).
pub fn stats_response(metrics: &Metrics) -> Result<StatsResponse> {
    let any = Any {
        type_url: "io.containerd.cgroups.v1.Metrics".to_owned(),
        value: metrics
            .write_to_bytes()
            .map_err(|e| ShimError::Internal(format!("encode metrics: {e}")))?,
        ..Default::default()
    };
    Ok(StatsResponse {
        stats: MessageField::some(any),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use containerd_shim::protos::protobuf::CodedOutputStream;

    fn runtime_options(type_url: &str, fields: &[(u32, &str)]) -> Any {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            for (n, s) in fields {
                out.write_string(*n, s).unwrap();
            }
            out.flush().unwrap();
        }
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn config_path_comes_from_cri_runtime_options() {
        let url = "type.googleapis.com/runtimeoptions.v1.Options";
        let any = runtime_options(url, &[(1, "x"), (2, "/etc/nutshell/other.toml")]);
        assert_eq!(
            config_path_from_options(&any).unwrap(),
            Some(PathBuf::from("/etc/nutshell/other.toml"))
        );
        assert_eq!(
            config_path_from_options(&runtime_options(url, &[(1, "x")])).unwrap(),
            None
        );
        let runc = runtime_options("containerd.runc.v1.Options", &[(2, "/x")]);
        assert_eq!(config_path_from_options(&runc).unwrap(), None);
        let garbage = Any {
            type_url: url.into(),
            value: vec![0x12, 0xff],
            ..Default::default()
        };
        assert!(config_path_from_options(&garbage).is_err());
    }

    #[test]
    fn exec_console_size_goes_into_the_process_spec() {
        let spec =
            br#"{"terminal":true,"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/","consoleSize":{"height":1,"width":1}}"#;
        let out = with_console_size(spec, 33, 97).unwrap();
        let p: oci_spec::runtime::Process = serde_json::from_slice(&out).unwrap();
        let size = p.console_size().unwrap();
        assert_eq!((size.height(), size.width()), (33, 97));
        assert_eq!(p.args().as_ref().unwrap(), &["sh".to_owned()]);
        assert!(with_console_size(b"[1]", 1, 1).is_err());
        assert!(with_console_size(b"{", 1, 1).is_err());
    }
}

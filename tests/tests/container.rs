//! Slow lane: OCI containers in a real microVM, their root file systems shared from the host
//! over virtio-fs, driven through the agent API as the shim drives it. One VM, restored from
//! the agent-ready template, serves every check (a boot costs tens of seconds here).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nutshell_protocol::client::{AgentClient, ConnectOptions};
use nutshell_protocol::types::{SandboxSpec, StdioPorts};
use nutshell_protocol::GUEST_SHARED_DIR;
use nutshell_tests::guest::{self, container_spec};
use nutshell_tests::{busybox_rootfs, GuestBoot, VmmProcess};
use oci_spec::runtime::{
    LinuxBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, ProcessBuilder, Spec,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on waiting for the OOM kill of the memory-limited container (see its use).
const OOM_KILL_TIMEOUT: Duration = Duration::from_secs(600);

fn spec(id: &str, args: &[&str]) -> Spec {
    container_spec(id, args).unwrap()
}

fn connect_streams(uds: &Path, ports: &[u32]) -> Vec<JoinHandle<anyhow::Result<Vec<u8>>>> {
    guest::connect_streams(uds, ports, STREAM_TIMEOUT)
}

fn client(uds: &Path, rpc_timeout: Duration) -> AgentClient {
    AgentClient::connect(
        uds,
        &ConnectOptions {
            rpc_timeout,
            ..Default::default()
        },
    )
    .unwrap()
}

fn text(h: JoinHandle<anyhow::Result<Vec<u8>>>) -> String {
    String::from_utf8(h.join().unwrap().unwrap()).unwrap()
}

/// The agent of the VM just spawned, as the shim meets it: connected (waiting for the boot),
/// the guest refreshed, and sandbox `pod1` created on the shared directory.
fn pod_agent(uds: &Path, vm: &VmmProcess) -> AgentClient {
    let agent = match AgentClient::connect(
        uds,
        &ConnectOptions {
            connect_timeout: BOOT_TIMEOUT,
            retry_interval: Duration::from_millis(20),
            rpc_timeout: Duration::from_secs(120),
            ..Default::default()
        },
    ) {
        Ok(a) => a,
        Err(e) => panic!("{e:?}\nconsole:\n{}\nvmm:\n{}", vm.console(), vm.stderr()),
    };
    agent.refresh_guest_now().unwrap();
    agent
        .create_sandbox(&SandboxSpec {
            sandbox_id: "pod1".into(),
            hostname: "pod1".into(),
            shared_dir: GUEST_SHARED_DIR.into(),
            ..Default::default()
        })
        .unwrap();
    agent
}

#[test]
#[ignore = "slow lane: boots the real guest kernel (scripts/test.sh runs it)"]
fn containers_run_in_the_guest_from_a_shared_rootfs() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let shared: PathBuf = dir.path().join("shared");
    for id in ["c1", "c2", "c3", "c4"] {
        busybox_rootfs(&shared.join(id).join("rootfs"));
    }
    // Restored from the agent-ready template (the shim's default shape), as the shim does.
    let vm = GuestBoot::new("initramfs.cpio")
        .memory_mib(256)
        .vsock(&uds)
        .shared_dir(&shared)
        .from_template()
        .spawn()
        .unwrap();
    let agent = pod_agent(&uds, &vm);

    // c1: output on both streams, a file from the host, and an exit code.
    std::fs::write(shared.join("c1/rootfs/etc/greeting"), "from the host\n").unwrap();
    let streams = connect_streams(&uds, &[0x4000_0001, 0x4000_0002]);
    let c1 = spec(
        "c1",
        &["sh", "-c", "cat /etc/greeting; echo to-stderr >&2; exit 7"],
    );
    let t = Instant::now();
    agent
        .create_container(
            "c1",
            serde_json::to_vec(&c1).unwrap(),
            StdioPorts {
                stdin: 0,
                stdout: 0x4000_0001,
                stderr: 0x4000_0002,
            },
            false,
        )
        .unwrap();
    agent.start_container("c1").unwrap();
    let create_start = t.elapsed();
    let mut streams = streams.into_iter();
    assert_eq!(text(streams.next().unwrap()), "from the host\n");
    assert_eq!(text(streams.next().unwrap()), "to-stderr\n");
    let exit = agent.wait_process("c1", "").unwrap();
    assert_eq!(exit.exit_status, 7);
    agent.remove_container("c1", 0).unwrap();

    // c2: a long-running container; exec into it; kill it.
    let streams = connect_streams(&uds, &[0x4000_0003]);
    agent
        .create_container(
            "c2",
            serde_json::to_vec(&spec("c2", &["sleep", "1000"])).unwrap(),
            StdioPorts {
                stdin: 0,
                stdout: 0x4000_0003,
                stderr: 0,
            },
            false,
        )
        .unwrap();
    agent.start_container("c2").unwrap();
    let exec_out = connect_streams(&uds, &[0x4000_0004]);
    let process = ProcessBuilder::default()
        .args(vec![
            "sh".to_string(),
            "-c".into(),
            "hostname; echo pid1=$(cat /proc/1/comm); touch /tmp/written-by-exec; exit 3".into(),
        ])
        .env(vec!["PATH=/bin".to_string()])
        .cwd("/")
        .build()
        .unwrap();
    agent
        .exec_process(
            "c2",
            "e1",
            serde_json::to_vec(&process).unwrap(),
            StdioPorts {
                stdin: 0,
                stdout: 0x4000_0004,
                stderr: 0,
            },
            false,
        )
        .unwrap();
    let out = text(exec_out.into_iter().next().unwrap());
    assert_eq!(out, "pod1\npid1=sleep\n", "exec output");
    assert_eq!(agent.wait_process("c2", "e1").unwrap().exit_status, 3);
    // The shim's Delete of the exec: the agent forgets it (a second wait finds nothing), and
    // init is no exec to remove.
    agent.remove_process("c2", "e1").unwrap();
    let gone = agent.wait_process("c2", "e1").unwrap_err().to_string();
    assert!(gone.contains("e1"), "{gone}");
    assert!(agent.remove_process("c2", "e1").is_err());
    assert!(
        agent.remove_process("c2", "").is_err(),
        "init removed as an exec"
    );
    // The exec wrote into the container's rootfs: the host sees it through virtio-fs.
    assert!(shared.join("c2/rootfs/tmp/written-by-exec").exists());
    let pids = agent.list_pids("c2").unwrap();
    assert!(!pids.is_empty(), "c2 has processes");
    agent.signal_process("c2", "", 9, true).unwrap();
    assert_eq!(agent.wait_process("c2", "").unwrap().exit_status, 137);
    assert_eq!(text(streams.into_iter().next().unwrap()), "");
    agent.remove_container("c2", 0).unwrap();

    // c3: a 16 MiB memory limit; a process that grows past it is OOM-killed, the OOM event
    // and the stats say so.
    let (oom_tx, oom_rx) = mpsc::channel();
    let oom_uds = uds.clone();
    std::thread::spawn(move || {
        let c = client(&oom_uds, Duration::ZERO);
        let _ = oom_tx.send(c.get_oom_event());
    });
    let mut c3 = spec("c3", &["awk", "BEGIN { s = \"x\"; while (1) s = s s }"]);
    let mut linux = c3
        .linux()
        .clone()
        .unwrap_or_else(|| LinuxBuilder::default().build().unwrap());
    linux.set_resources(Some(
        LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(16i64 << 20)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap(),
    ));
    c3.set_linux(Some(linux));
    agent
        .create_container(
            "c3",
            serde_json::to_vec(&c3).unwrap(),
            StdioPorts::default(),
            false,
        )
        .unwrap();
    agent.start_container("c3").unwrap();
    let t = Instant::now();
    // Growing to the limit, reclaim and the OOM kill are all guest kernel work, emulated here:
    // 80-100 s on a loaded development machine (with every agent build), too close to the
    // 120 s bound of the other RPCs; this wait gets a bound of its own.
    let c3_waiter = client(&uds, OOM_KILL_TIMEOUT);
    assert_eq!(c3_waiter.wait_process("c3", "").unwrap().exit_status, 137);
    let oom_killed = t.elapsed();
    let event = oom_rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap()
        .unwrap();
    assert_eq!(event, "c3");
    let stats = agent.stats_container("c3").unwrap();
    assert_eq!(stats.memory_limit_bytes, 16 << 20, "{stats:?}");
    assert!(stats.memory_oom_kills >= 1, "{stats:?}");
    agent.remove_container("c3", 0).unwrap();

    // Stdio stream throughput: 4 MiB from a container's stdout to the host.
    let streams = connect_streams(&uds, &[0x4000_0005]);
    agent
        .create_container(
            "c4",
            serde_json::to_vec(&spec("c4", &["head", "-c", "4194304", "/dev/zero"])).unwrap(),
            StdioPorts {
                stdin: 0,
                stdout: 0x4000_0005,
                stderr: 0,
            },
            false,
        )
        .unwrap();
    let t = Instant::now();
    agent.start_container("c4").unwrap();
    let bytes = streams.into_iter().next().unwrap().join().unwrap().unwrap();
    let took = t.elapsed();
    assert_eq!(bytes.len(), 4 << 20);
    assert!(bytes.iter().all(|&b| b == 0));
    assert_eq!(agent.wait_process("c4", "").unwrap().exit_status, 0);
    agent.remove_container("c4", 0).unwrap();
    eprintln!(
        "stdio stream: 4 MiB in {:.2} s ({:.2} MiB/s)",
        took.as_secs_f64(),
        4.0 / took.as_secs_f64()
    );

    agent.destroy_sandbox("pod1").unwrap();
    eprintln!(
        "container create+start in the guest (RPCs, streams connected): {:.0} ms; c3 \
         OOM-killed {:.1} s after its start",
        create_start.as_secs_f64() * 1000.0,
        oom_killed.as_secs_f64()
    );
    agent.shutdown().unwrap();
    vm.wait(Duration::from_secs(120)).unwrap().assert_status(0);
}

/// Exec and create latency in the guest: a running container (its CreateContainer +
/// StartContainer timed: the first in the VM, cold caches), then `EXECS` execs of `echo` with
/// stdout and stderr streams (as CRI's ExecSync asks), each timed from ExecProcess to running
/// and to its exit; each one's output and exit status are checked (the exec ran what it was
/// given); then `LATER` containers of `true`, create + start timed, each checked to exit 0. Prints
/// the figures (and, with `NUTSHELL_TEST_AGENT_DEBUG=1`, the agent's per-step timings from the
/// console: a template of its own, with `nutshell.log=debug`). `NUTSHELL_TEST_INITRAMFS` names
/// another initramfs in `target/nutshell` (another agent build, for a before/after in one run).
#[test]
#[ignore = "slow lane: boots the real guest kernel (scripts/test.sh runs it)"]
fn exec_latency_in_the_guest() {
    const EXECS: usize = 5;
    /// Containers created and started after the first (warm caches), each running `true`.
    const LATER: usize = 3;
    let debug = std::env::var_os("NUTSHELL_TEST_AGENT_DEBUG").is_some_and(|v| v == "1");
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let shared: PathBuf = dir.path().join("shared");
    for i in 1..=1 + LATER {
        busybox_rootfs(&shared.join(format!("c{i}")).join("rootfs"));
    }
    let initramfs: &'static str = match std::env::var("NUTSHELL_TEST_INITRAMFS") {
        Ok(name) => Box::leak(name.into_boxed_str()),
        Err(_) => "initramfs.cpio",
    };
    let mut boot = GuestBoot::new(initramfs)
        .memory_mib(256)
        .vsock(&uds)
        .shared_dir(&shared)
        .from_template();
    if debug {
        boot = boot.cmdline("quiet nutshell.log=debug");
    }
    let vm = boot.spawn().unwrap();
    let agent = pod_agent(&uds, &vm);
    // No streams for init: a reader would give up after STREAM_TIMEOUT without data.
    let t = Instant::now();
    agent
        .create_container(
            "c1",
            serde_json::to_vec(&spec("c1", &["sleep", "1000"])).unwrap(),
            StdioPorts::default(),
            false,
        )
        .unwrap();
    let created = t.elapsed();
    agent.start_container("c1").unwrap();
    let started = t.elapsed();
    let mut execs = Vec::new();
    for i in 0..EXECS {
        let (out, err) = (0x4000_0100 + 2 * i as u32, 0x4000_0101 + 2 * i as u32);
        let exec_streams = connect_streams(&uds, &[out, err]);
        let exec_id = format!("e{i}");
        let process = ProcessBuilder::default()
            .args(vec!["echo".to_string(), exec_id.clone()])
            .env(vec!["PATH=/bin".to_string()])
            .cwd("/")
            .build()
            .unwrap();
        let t = Instant::now();
        agent
            .exec_process(
                "c1",
                &exec_id,
                serde_json::to_vec(&process).unwrap(),
                StdioPorts {
                    stdin: 0,
                    stdout: out,
                    stderr: err,
                },
                false,
            )
            .unwrap();
        let running = t.elapsed();
        assert_eq!(agent.wait_process("c1", &exec_id).unwrap().exit_status, 0);
        let exited = t.elapsed();
        let mut exec_streams = exec_streams.into_iter();
        assert_eq!(text(exec_streams.next().unwrap()), format!("{exec_id}\n"));
        assert_eq!(text(exec_streams.next().unwrap()), "");
        execs.push((running, exited));
    }
    let median = |pick: fn(&(Duration, Duration)) -> Duration| {
        let mut v: Vec<f64> = execs.iter().map(|e| pick(e).as_secs_f64()).collect();
        v.sort_by(f64::total_cmp);
        v[EXECS / 2]
    };
    eprintln!(
        "create {:.2} s, create+start {:.2} s; exec (to running, to exit): {:.2?}; median to \
         running {:.2} s, to exit {:.2} s",
        created.as_secs_f64(),
        started.as_secs_f64(),
        execs,
        median(|e| e.0),
        median(|e| e.1)
    );
    agent.signal_process("c1", "", 9, true).unwrap();
    agent.wait_process("c1", "").unwrap();
    agent.remove_container("c1", 0).unwrap();
    // Later containers: create + start of `true` with warm caches (the busybox binary, the
    // dentries of the shared directory), each checked to run.
    let mut later = Vec::new();
    for i in 2..=1 + LATER {
        let id = format!("c{i}");
        let t = Instant::now();
        agent
            .create_container(
                &id,
                serde_json::to_vec(&spec(&id, &["true"])).unwrap(),
                StdioPorts::default(),
                false,
            )
            .unwrap();
        let created = t.elapsed();
        agent.start_container(&id).unwrap();
        later.push((created, t.elapsed()));
        assert_eq!(agent.wait_process(&id, "").unwrap().exit_status, 0);
        agent.remove_container(&id, 0).unwrap();
    }
    let mut sorted: Vec<f64> = later.iter().map(|l| l.1.as_secs_f64()).collect();
    sorted.sort_by(f64::total_cmp);
    eprintln!(
        "later containers (create, create+start): {later:.2?}; median create+start {:.2} s",
        sorted[LATER / 2]
    );
    if debug {
        for line in vm.console().lines().filter(|l| {
            [
                "spawn of pid",
                "running after",
                "created (init pid",
                "started (",
                ": plan ",
            ]
            .iter()
            .any(|k| l.contains(k))
        }) {
            eprintln!("{line}");
        }
    }
    drop(agent);
    drop(vm);
}

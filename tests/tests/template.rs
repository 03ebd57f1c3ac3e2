//! Slow lane: the agent-ready template. The real guest kernel boots the agent once, the VMM
//! snapshots it when the agent answers; VMs restored from it concurrently each answer on their
//! own new vsock socket, take a fresh clock and entropy, run a container from their own shared
//! directory (virtio-fs attached at restore), share memory, and shut down cleanly.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nutshell_protocol::client::{AgentClient, ConnectOptions};
use nutshell_protocol::generated::vmm as vpb;
use nutshell_protocol::generated::vmm_ttrpc::VmmClient;
use nutshell_protocol::ttrpc;
use nutshell_protocol::types::ServingStatus;
use nutshell_protocol::types::{SandboxSpec, StdioPorts};
use nutshell_protocol::GUEST_SHARED_DIR;
use nutshell_template::{CpuProfile, Template, TemplateConfig};
use nutshell_tests::guest::{connect_streams, container_spec};
use nutshell_tests::{
    busybox_rootfs, guest_artifact, memory_use, vmm_binary, MemoryUse, VmmProcess,
};

/// Debug: the agent logs the wall clock it set at debug level, and the tests read it back.
const CMDLINE: &str = "quiet nutshell.log=debug";

/// The template of the test's VMs: kernel, agent initramfs, shape, and a virtio-fs device
/// (the template's device is never mounted; each restored VM exports its own directory).
fn template_config(cache: &Path) -> TemplateConfig {
    TemplateConfig {
        vmm: vmm_binary().unwrap(),
        kernel: guest_artifact("vmlinux").unwrap(),
        initrd: guest_artifact("initramfs.cpio").unwrap(),
        cmdline: CMDLINE.into(),
        vcpus: 1,
        memory_mib: 128,
        fs_tag: Some(nutshell_protocol::SHARED_FS_TAG.into()),
        cpu_profile: CpuProfile::Auto,
        cache_dir: cache.to_path_buf(),
        ready_timeout: Duration::from_secs(600),
        jail: false,
    }
}

/// Builds (or finds) the template in `cache` (nutshell-template's library: the VMM only boots,
/// snapshots over its control socket and restores); returns it and how long it took.
fn make_template(cache: &Path) -> (Template, Duration) {
    let t = Instant::now();
    let template = nutshell_template::ensure(&template_config(cache))
        .unwrap_or_else(|e| panic!("{}", nutshell_protocol::error_chain(&e)));
    let dir = &template.dir;
    assert!(dir.join("state").is_file() && dir.join("memory").is_file());
    (template, t.elapsed())
}

/// A VM restored from `template`, with its own vsock and control sockets and
/// shared directory.
struct Restored {
    vm: VmmProcess,
    uds: PathBuf,
    api: PathBuf,
    shared: PathBuf,
}

fn restore(template: &Template, sockets: &Path, i: usize) -> Restored {
    let uds = sockets.join(format!("vsock{i}.sock"));
    let api = sockets.join(format!("api{i}.sock"));
    let shared = sockets.join(format!("shared{i}"));
    std::fs::create_dir_all(&shared).unwrap();
    let mut args: Vec<String> = template.restore_args().into();
    args.extend([
        "--shared-dir".into(),
        shared.to_string_lossy().into_owned(),
        "--vsock-uds".into(),
        uds.to_string_lossy().into_owned(),
        "--api-sock".into(),
        api.to_string_lossy().into_owned(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Restored {
        vm: VmmProcess::spawn(&args).unwrap(),
        uds,
        api,
        shared,
    }
}

fn connect(r: &Restored) -> AgentClient {
    // Generous bounds: on a loaded kvm_pvm host one RPC can take seconds.
    let opts = ConnectOptions {
        connect_timeout: Duration::from_secs(120),
        retry_interval: Duration::from_millis(5),
        rpc_timeout: Duration::from_secs(120),
        ..Default::default()
    };
    match AgentClient::connect(&r.uds, &opts) {
        Ok(c) => c,
        Err(e) => panic!(
            "{e:?}\nconsole:\n{}\nstderr:\n{}",
            r.vm.console(),
            r.vm.stderr()
        ),
    }
}

fn api_client(path: &Path) -> VmmClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ttrpc::Client::connect(&format!("unix://{}", path.display())) {
            Ok(c) => return VmmClient::new(c),
            Err(e) if Instant::now() > deadline => panic!("control socket: {e:?}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(120_000_000_000)
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// The guest wall clock the agent logged after the refresh.
fn logged_clock(console: &str) -> Option<f64> {
    console
        .lines()
        .find_map(|l| l.split_once("guest refreshed: wall clock ").map(|(_, r)| r))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn wait_logged_clock(vm: &VmmProcess) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(c) = logged_clock(&vm.console()) {
            return c;
        }
        assert!(Instant::now() < deadline, "console:\n{}", vm.console());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sandbox `pod<i>` with container `c` in VM `i`: it prints a file that only VM `i`'s shared
/// directory has, the pod's hostname, 16 random bytes and the boot id, and exits with `10 + i`.
/// Returns the random bytes (hex) and the boot id.
fn run_one_container(r: &Restored, client: &AgentClient, i: usize) -> (String, String) {
    busybox_rootfs(&r.shared.join("c").join("rootfs"));
    std::fs::write(r.shared.join("c/rootfs/etc/who"), format!("vm {i}\n")).unwrap();
    client
        .create_sandbox(&SandboxSpec {
            sandbox_id: format!("pod{i}"),
            hostname: format!("pod{i}"),
            shared_dir: GUEST_SHARED_DIR.into(),
            ..Default::default()
        })
        .unwrap();
    let port = 0x4000_0001;
    let out = connect_streams(&r.uds, &[port], Duration::from_secs(300));
    // Fresh identity: after RefreshGuest (entropy, CRNG reseeded) each VM draws its own random
    // bytes and its own boot id, though all resumed from the same RNG state.
    let script = format!(
        "cat /etc/who; hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
         cat /proc/sys/kernel/random/boot_id; exit {}",
        10 + i
    );
    let spec = container_spec("c", &["sh", "-c", &script]).unwrap();
    client
        .create_container(
            "c",
            serde_json::to_vec(&spec).unwrap(),
            StdioPorts {
                stdin: 0,
                stdout: port,
                stderr: 0,
            },
            false,
        )
        .unwrap();
    client.start_container("c").unwrap();
    let text = String::from_utf8(out.into_iter().next().unwrap().join().unwrap().unwrap()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(lines[..2], [format!("vm {i}"), format!("pod{i}")], "{text}");
    assert_eq!(lines[2].len(), 32, "{text}");
    assert_eq!(
        client.wait_process("c", "").unwrap().exit_status,
        10 + i as u32
    );
    client.remove_container("c", 0).unwrap();
    client.destroy_sandbox(&format!("pod{i}")).unwrap();
    (lines[2].to_owned(), lines[3].to_owned())
}

#[test]
#[ignore = "slow lane: boots the real guest kernel (scripts/test.sh runs it)"]
fn a_template_whose_guest_dies_fails_with_its_last_words_and_leaves_no_directory() {
    let cache = tempfile::tempdir().unwrap();
    let mut config = template_config(cache.path());
    // No such init in the initramfs and no root device: the guest kernel panics while booting.
    config.cmdline = "quiet rdinit=/no-such-init".into();
    config.ready_timeout = Duration::from_secs(300);
    let err =
        nutshell_template::ensure(&config).expect_err("a guest that panics makes no template");
    let message = nutshell_protocol::error_chain(&err);
    assert!(
        message.contains("exited before its agent answered"),
        "{message}"
    );
    // The build directory (with the console file) is gone: the error carries the guest's words.
    assert!(message.contains("the guest console ends:"), "{message}");
    let said = message
        .split("the guest kernel said: ")
        .nth(1)
        .unwrap_or_default();
    assert!(said.contains("Kernel panic - not syncing"), "{message}");
    let left: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "a failed build left {left:?}");
}

#[test]
#[ignore = "slow lane: boots the real guest kernel (scripts/test.sh runs it)"]
fn template_restores_three_vms_concurrently() {
    let cache = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let (template, built_in) = make_template(cache.path());
    // Found again without a boot.
    assert!(template.built);
    let (again, found_in) = make_template(cache.path());
    assert_eq!(again.dir, template.dir);
    assert!(!again.built);
    assert!(found_in < built_in / 2, "{found_in:?} vs {built_in:?}");

    let vms: Vec<Restored> = (0..3)
        .map(|i| restore(&template, sockets.path(), i))
        .collect();
    let clients: Vec<AgentClient> = std::thread::scope(|s| {
        let handles: Vec<_> = vms.iter().map(|r| s.spawn(|| connect(r))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, client) in vms.iter().zip(&clients) {
        assert!(
            r.vm.stderr().contains("restored"),
            "not a restore:\n{}",
            r.vm.stderr()
        );
        assert_eq!(client.check().unwrap(), ServingStatus::Serving);
        let version = client.version().unwrap();
        assert_eq!(version.api_version, nutshell_protocol::AGENT_API_VERSION);
        assert!(version.kernel_release.starts_with("6.1"));
    }

    // A fresh clock: first a distinctive one, read back by the agent, then the host's.
    let odd = 2_000_000_000i64 * 1_000_000_000;
    clients[0].refresh_guest(odd, &[1; 32]).unwrap();
    let seen = wait_logged_clock(&vms[0].vm);
    assert!((seen - 2e9).abs() < 5.0, "guest clock {seen}");
    for (r, client) in vms.iter().zip(&clients).skip(1) {
        let host = now_nanos();
        client.refresh_guest_now().unwrap();
        let seen = wait_logged_clock(&r.vm);
        assert!(
            (seen - host as f64 / 1e9).abs() < 5.0,
            "guest clock {seen}, host {}",
            host as f64 / 1e9
        );
    }

    // Each VM runs a container independently, its rootfs from its own shared directory.
    let identities: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .zip(&clients)
            .enumerate()
            .map(|(i, (r, client))| s.spawn(move || run_one_container(r, client, i)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        assert_ne!(
            identities[a].0, identities[b].0,
            "VMs {a} and {b} drew the same random bytes"
        );
        assert_ne!(
            identities[a].1, identities[b].1,
            "VMs {a} and {b} have the same boot id"
        );
    }

    // Memory: guest RAM pages the VMs only read are the template's page cache, shared.
    let uses: Vec<MemoryUse> = vms
        .iter()
        .map(|r| memory_use(r.vm.pid().unwrap()).unwrap())
        .collect();
    let rss: u64 = uses.iter().map(|u| u.rss_kib).sum();
    let pss: u64 = uses.iter().map(|u| u.pss_kib).sum();
    eprintln!("template: 3 restored VMs: RSS {rss} KiB, PSS {pss} KiB in all ({uses:?})");
    assert!(
        pss * 4 < rss * 3,
        "PSS {pss} KiB is not well below RSS {rss} KiB"
    );

    // The control socket: stats, pause/resume, and a snapshot refused while a vsock
    // connection is open (the agent client's).
    let api = api_client(&vms[0].api);
    let stats = api.stats(ctx(), &vpb::StatsRequest::new()).unwrap();
    assert_eq!(stats.vcpus, 1);
    assert_eq!(stats.memory_bytes, 128 << 20);
    assert!(stats.rss_bytes > 0);
    api.pause(ctx(), &vpb::PauseRequest::new()).unwrap();
    let err = api.pause(ctx(), &vpb::PauseRequest::new()).unwrap_err();
    assert!(
        format!("{err:?}").contains("FAILED_PRECONDITION"),
        "{err:?}"
    );
    api.resume(ctx(), &vpb::ResumeRequest::new()).unwrap();
    let mut req = vpb::SnapshotRequest::new();
    req.directory = cache.path().join("again").to_string_lossy().into_owned();
    let err = api.snapshot(ctx(), &req).unwrap_err();
    assert!(format!("{err:?}").contains("open connection"), "{err:?}");
    assert!(!cache.path().join("again").join("state").exists());
    req.directory = "relative".into();
    let err = api.snapshot(ctx(), &req).unwrap_err();
    assert!(format!("{err:?}").contains("INVALID_ARGUMENT"), "{err:?}");
    assert_eq!(clients[0].check().unwrap(), ServingStatus::Serving);

    // Shutdown: two through the agent (the guest powers off), one through the control socket.
    clients[1].shutdown().unwrap();
    clients[2].shutdown().unwrap();
    api.shutdown(ctx(), &vpb::ShutdownRequest::new()).unwrap();
    drop(clients);
    for r in vms {
        let api_path = r.api.clone();
        let uds = r.uds.clone();
        let out = r.vm.wait(Duration::from_secs(60)).unwrap();
        out.assert_status(0);
        assert!(!api_path.exists(), "the control socket is removed at exit");
        assert!(!uds.exists(), "the vsock socket is removed at exit");
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn disk_use(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.len(), m.blocks() * 512)
}

/// Figures for the report: `NUTSHELL_MEASURE=1` to run (slow: several cold boots).
#[test]
#[ignore = "measurement: NUTSHELL_MEASURE=1 cargo test -p nutshell-tests --test template -- --ignored measure"]
fn measure_cold_boot_vs_restore() {
    let Some(runs) = nutshell_tests::measure_runs(3) else {
        return;
    };
    let sockets = tempfile::tempdir().unwrap();

    // Cold boot to agent-ready: VMM spawn until Health answers.
    let mut cold = Vec::new();
    for i in 0..runs {
        let uds = sockets.path().join(format!("cold{i}.sock"));
        let c = template_config(sockets.path());
        let p = |p: &Path| p.to_string_lossy().into_owned();
        let mut args = vec![
            "--kernel".into(),
            p(&c.kernel),
            "--initrd".into(),
            p(&c.initrd),
            "--cmdline".into(),
            c.cmdline.clone(),
            "--memory-mib".into(),
            c.memory_mib.to_string(),
            "--shared-dir".into(),
            p(sockets.path()),
        ];
        args.extend(["--vsock-uds".into(), uds.to_string_lossy().into_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = Instant::now();
        let vm = VmmProcess::spawn(&args).unwrap();
        let client = AgentClient::connect(
            &uds,
            &ConnectOptions {
                retry_interval: Duration::from_millis(5),
                ..Default::default()
            },
        )
        .unwrap();
        client.check().unwrap();
        cold.push(t.elapsed());
        client.shutdown().unwrap();
        vm.wait(Duration::from_secs(60)).unwrap().assert_status(0);
    }

    let cache = tempfile::tempdir().unwrap();
    let (template, built_in) = make_template(cache.path());
    let (state_len, state_alloc) = disk_use(&template.dir.join("state"));
    let (mem_len, mem_alloc) = disk_use(&template.dir.join("memory"));

    // Restore to agent-ready, one at a time.
    let mut warm = Vec::new();
    let mut host_ms = Vec::new();
    for i in 0..runs.max(5) {
        let t = Instant::now();
        let r = restore(&template, sockets.path(), 100 + i);
        let client = connect(&r);
        client.check().unwrap();
        warm.push(t.elapsed());
        let log = r.vm.stderr();
        if let Some(ms) = log
            .lines()
            .find_map(|l| l.split_once("restored ").map(|(_, r)| r))
            .and_then(|r| r.split(" in ").nth(1))
            .and_then(|r| r.trim_end_matches(" ms").trim().parse::<f64>().ok())
        {
            host_ms.push(ms);
        }
        client.shutdown().unwrap();
        r.vm.wait(Duration::from_secs(60)).unwrap().assert_status(0);
    }
    host_ms.sort_by(f64::total_cmp);

    // PSS per VM with N restored VMs alive at once.
    let mut pss_lines = Vec::new();
    for n in [1usize, 5, 10] {
        let vms: Vec<Restored> = (0..n)
            .map(|i| restore(&template, sockets.path(), 200 + 20 * n + i))
            .collect();
        let clients: Vec<AgentClient> = vms.iter().map(connect).collect();
        for c in &clients {
            c.check().unwrap();
        }
        let uses: Vec<MemoryUse> = vms
            .iter()
            .map(|r| memory_use(r.vm.pid().unwrap()).unwrap())
            .collect();
        let pss = uses.iter().map(|u| u.pss_kib).sum::<u64>() / n as u64;
        let rss = uses.iter().map(|u| u.rss_kib).sum::<u64>() / n as u64;
        pss_lines.push(format!("{n} VMs: PSS {pss} KiB/VM, RSS {rss} KiB/VM"));
        for c in &clients {
            c.shutdown().unwrap();
        }
        for r in vms {
            r.vm.wait(Duration::from_secs(120))
                .unwrap()
                .assert_status(0);
        }
    }

    eprintln!(
        "MEASURE cold boot to agent-ready: median {:.2} s of {cold:?}",
        median(cold.clone()).as_secs_f64()
    );
    eprintln!(
        "MEASURE template build (boot + snapshot): {:.2} s",
        built_in.as_secs_f64()
    );
    eprintln!(
        "MEASURE restore to agent-ready: median {:.1} ms of {warm:?}",
        median(warm.clone()).as_secs_f64() * 1e3
    );
    eprintln!("MEASURE restore host-side (VMM start to vCPUs running): {host_ms:?} ms");
    eprintln!(
        "MEASURE snapshot: state {state_len} B ({state_alloc} B allocated), memory {mem_len} B ({mem_alloc} B allocated)"
    );
    for l in pss_lines {
        eprintln!("MEASURE {l}");
    }
}

//! Slow lane: the shim binary driven the way containerd drives it, without containerd.
//!
//! `containerd-shim-nutshell-v2 -namespace N -id ID -address A start` in the bundle directory,
//! then the Task API on the socket it answers, from a ttrpc client here; containerd's event
//! service is a small ttrpc server here that records the topics it gets. The shim's config
//! points at a temporary run directory, so `/run/nutshell` is never touched.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim_protos::api::{
    ConnectRequest, CreateTaskRequest, DeleteRequest, Empty, ForwardRequest, Mount,
    ShutdownRequest, StartRequest, StateRequest, WaitRequest,
};
use containerd_shim_protos::shim_sync::{create_events, Events, TaskClient};
use containerd_shim_protos::ttrpc::{self, context, Code, TtrpcContext};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nutshell_tests::{
    busybox_rootfs, guest_artifact, shim_binary, target_dir, template_cache, vmm_binary,
};

/// containerd's event service: records each forwarded topic.
#[derive(Default)]
struct EventLog(Mutex<Vec<String>>);

impl Events for EventLog {
    fn forward(&self, _ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        self.0.lock().unwrap().push(req.envelope.topic.clone());
        Ok(Empty::new())
    }
}

/// Everything one test needs: a temporary tree, a fake containerd event service, a config.
struct Harness {
    dir: tempfile::TempDir,
    events: Arc<EventLog>,
    _server: ttrpc::Server,
    namespace: String,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("nutshell-shim-")
            .tempdir()
            .unwrap();
        let events = Arc::new(EventLog::default());
        let sock = dir.path().join("events.sock");
        let mut server = ttrpc::Server::new()
            .bind(&format!("unix://{}", sock.display()))
            .unwrap()
            .register_service(create_events(events.clone()));
        server.start().unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        let config = format!(
            "kernel = {:?}\ninitramfs = {:?}\nvmm = {:?}\nrun_dir = {:?}\n\
             log_level = \"debug\"\nboot_timeout_secs = 240\nrpc_timeout_secs = 120\ntemplate_dir = {:?}\n",
            target_dir().join("nutshell").join("vmlinux"),
            target_dir().join("nutshell").join("initramfs.cpio"),
            vmm_binary().unwrap_or_default(),
            dir.path().join("run"),
            template_cache(),
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        // Unique per test run: the shim socket is derived from (address, namespace, id).
        let namespace = format!("nutshell-test-{}", std::process::id());
        Harness {
            dir,
            events,
            _server: server,
            namespace,
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// A bundle with a spec carrying `annotations`; its `log` file collects the shim's log.
    fn bundle(&self, id: &str, annotations: &[(&str, &str)]) -> PathBuf {
        self.bundle_in_netns(id, annotations, None)
    }

    /// As `bundle`, with the spec's network namespace at `netns` (as the CRI gives after CNI
    /// ran) or a new, unnamed one.
    fn bundle_in_netns(
        &self,
        id: &str,
        annotations: &[(&str, &str)],
        netns: Option<&Path>,
    ) -> PathBuf {
        let bundle = self.dir.path().join("bundles").join(id);
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let annotations: HashMap<_, _> = annotations.iter().cloned().collect();
        let spec = format!(
            r#"{{"ociVersion":"1.0.2","process":{{"user":{{"uid":0,"gid":0}},"args":["/bin/true"],"cwd":"/"}},
               "root":{{"path":"rootfs"}},"hostname":"{id}","annotations":{},
               "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}},{{"type":"uts"}},{}]}}}}"#,
            annotations_json(&annotations),
            match netns {
                Some(path) => format!(r#"{{"type":"network","path":{path:?}}}"#),
                None => r#"{"type":"network"}"#.to_owned(),
            }
        );
        std::fs::write(bundle.join("config.json"), spec).unwrap();
        std::fs::write(bundle.join("log"), b"").unwrap();
        bundle
    }

    /// `shim start` as containerd runs it; returns the address it prints.
    fn start(&self, id: &str, bundle: &Path) -> String {
        let out = Command::new(shim_binary().unwrap())
            .args(["-namespace", &self.namespace, "-id", id])
            .args([
                "-address",
                &self.dir.path().join("containerd.sock").to_string_lossy(),
            ])
            .arg("start")
            .current_dir(bundle)
            .env("TTRPC_ADDRESS", self.dir.path().join("events.sock"))
            .env("NUTSHELL_CONFIG", self.dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let address = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert!(address.starts_with("unix://"), "{address:?}");
        address
    }

    fn topics(&self) -> Vec<String> {
        self.events.0.lock().unwrap().clone()
    }
}

fn annotations_json(a: &HashMap<&str, &str>) -> String {
    let fields: Vec<String> = a.iter().map(|(k, v)| format!("{k:?}:{v:?}")).collect();
    format!("{{{}}}", fields.join(","))
}

fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(300).as_nanos() as i64)
}

fn code(e: &ttrpc::Error) -> Option<Code> {
    match e {
        ttrpc::Error::RpcStatus(s) => Some(s.code()),
        _ => None,
    }
}

/// PIDs of nutshell-vmm processes whose command line mentions `needle`.
fn vmm_processes(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("nutshell-vmm") && cmd.contains(&needle)
        })
        .collect()
}

/// Mount points under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&prefix))
        .collect()
}

/// Waits until process `pid` is gone (or a zombie), at most `timeout`.
fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(s)
                if s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z') =>
            {
                return true
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    false
}

/// The shim's socket path from its address.
fn socket_path(address: &str) -> PathBuf {
    PathBuf::from(address.trim_start_matches("unix://"))
}

/// Stops a shim that a failed test left running.
struct ShimGuard(Option<u32>, String);

impl Drop for ShimGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            if !wait_gone(pid, Duration::from_millis(10)) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        let _ = std::fs::remove_file(socket_path(&self.1));
    }
}

/// A client of the shim at `address`, its PID, and a guard that ends it if the test fails.
fn connect(address: &str) -> (TaskClient, u32, ShimGuard) {
    let client = TaskClient::new(ttrpc::Client::connect(address).unwrap());
    let pid = client
        .connect(ctx(), &ConnectRequest::new())
        .unwrap()
        .shim_pid;
    (client, pid, ShimGuard(Some(pid), address.to_owned()))
}

#[test]
#[ignore = "slow lane: starts the shim binary (scripts/test.sh runs it)"]
fn pod_containers_get_the_shim_of_their_sandbox() {
    let h = Harness::new();
    let pod = h.bundle(
        "pod1",
        &[
            ("io.kubernetes.cri.container-type", "sandbox"),
            ("io.kubernetes.cri.sandbox-id", "pod1"),
        ],
    );
    let app = h.bundle(
        "web",
        &[
            ("io.kubernetes.cri.container-type", "container"),
            ("io.kubernetes.cri.sandbox-id", "pod1"),
        ],
    );
    let solo = h.bundle("solo", &[]);

    let a1 = h.start("pod1", &pod);
    let (client, shim_pid, _guard) = connect(&a1);
    // The app container's `start` finds the pod's shim running and answers its address.
    assert_eq!(h.start("web", &app), a1);
    let a3 = h.start("solo", &solo);
    let (solo_client, solo_pid, _solo_guard) = connect(&a3);
    assert_ne!(a3, a1, "a container without a pod gets a shim of its own");
    assert_ne!(solo_pid, shim_pid);

    // Unknown tasks are NOT_FOUND; a shim without tasks exits on Shutdown and removes its socket.
    let mut state = StateRequest::new();
    state.id = "nothing".into();
    let e = client.state(ctx(), &state).unwrap_err();
    assert_eq!(code(&e), Some(Code::NOT_FOUND), "{e:?}");
    for (c, pid, address) in [(client, shim_pid, a1), (solo_client, solo_pid, a3)] {
        let _ = c.shutdown(ctx(), &ShutdownRequest::new());
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "shim {pid} still runs"
        );
        assert!(!socket_path(&address).exists(), "{address} left behind");
    }
}

#[test]
#[ignore = "slow lane: starts the shim binary (scripts/test.sh runs it)"]
fn a_pod_whose_network_namespace_is_missing_is_refused_and_leaves_nothing() {
    let h = Harness::new();
    let missing = h.dir.path().join("netns").join("gone");
    let id = "pod-nonet";
    let bundle = h.bundle_in_netns(
        id,
        &[
            ("io.kubernetes.cri.container-type", "sandbox"),
            ("io.kubernetes.cri.sandbox-id", id),
        ],
        Some(&missing),
    );
    let address = h.start(id, &bundle);
    let (client, shim_pid, _guard) = connect(&address);

    let mut req = CreateTaskRequest::new();
    req.id = id.into();
    req.bundle = bundle.to_string_lossy().into_owned();
    let e = client.create(ctx(), &req).unwrap_err();
    assert_eq!(code(&e), Some(Code::FAILED_PRECONDITION), "{e:?}");
    let message = format!("{e:?}");
    assert!(
        message.contains(&*missing.to_string_lossy()),
        "the error names the namespace: {message}"
    );
    // Refused before any VM: no VMM, no sandbox directory, no mount.
    assert!(vmm_processes(&h.run_dir()).is_empty());
    assert!(!h.run_dir().join(id).exists(), "sandbox directory left");
    assert_eq!(mounts_under(h.dir.path()), Vec::<String>::new());
    let _ = client.shutdown(ctx(), &ShutdownRequest::new());
    assert!(
        wait_gone(shim_pid, Duration::from_secs(10)),
        "shim still runs"
    );
}

#[test]
#[ignore = "slow lane: boots the real guest kernel under the shim (scripts/test.sh runs it)"]
fn create_boots_a_vm_reaches_the_agent_and_delete_leaves_nothing() {
    for artifact in ["vmlinux", "initramfs.cpio"] {
        guest_artifact(artifact).unwrap();
    }
    vmm_binary().unwrap();
    let h = Harness::new();
    let id = "ctr1";
    let bundle = h.bundle(id, &[]);
    // A rootfs mount as containerd passes it (a bind of a directory, as the native snapshotter
    // gives); it must be mounted in the shared directory while the task lives.
    let rootfs_src = h.dir.path().join("snapshot");
    busybox_rootfs(&rootfs_src);
    std::fs::write(rootfs_src.join("marker"), b"rootfs").unwrap();

    let address = h.start(id, &bundle);
    let (client, shim_pid, _guard) = connect(&address);

    let sandbox_dir = h.run_dir().join(id);
    let watch = {
        // Sees the rootfs mounted and the VMM running while Create is in flight.
        let rootfs = sandbox_dir.join("shared").join(id).join("rootfs");
        let run_dir = h.run_dir();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            let (mut saw_mount, mut saw_vmm) = (false, false);
            while Instant::now() < deadline && !(saw_mount && saw_vmm) {
                saw_mount |= rootfs.join("marker").exists();
                saw_vmm |= !vmm_processes(&run_dir).is_empty();
                std::thread::sleep(Duration::from_millis(20));
            }
            (saw_mount, saw_vmm)
        })
    };

    let mut req = CreateTaskRequest::new();
    req.id = id.into();
    req.bundle = bundle.to_string_lossy().into_owned();
    req.rootfs = vec![Mount {
        type_: "bind".into(),
        source: rootfs_src.to_string_lossy().into_owned(),
        options: vec!["rbind".into(), "rw".into()],
        ..Default::default()
    }];
    let started = Instant::now();
    let created = client.create(ctx(), &req);
    let took = started.elapsed();
    let (saw_mount, saw_vmm) = watch.join().unwrap();
    let log = std::fs::read_to_string(bundle.join("log")).unwrap_or_default();
    assert!(saw_vmm, "no VMM was seen running\nshim log:\n{log}");
    assert!(
        saw_mount,
        "the rootfs was not mounted in the shared directory\nshim log:\n{log}"
    );
    // The shim logs through containerd's log: the VMM spawn, the agent's answer, the guest
    // console with the sandbox id.
    assert!(log.contains("sandbox ctr1: spawned"), "{log}");
    assert!(log.contains("sandbox ctr1: agent answered"), "{log}");
    assert!(
        log.contains("guest[ctr1]") || log.contains("vmm[ctr1]"),
        "{log}"
    );
    eprintln!("shim: Create -> reply {:.2} s", took.as_secs_f64());
    for line in log
        .lines()
        .filter(|l| l.contains("agent answered") || l.contains("spawned"))
    {
        eprintln!("shim log: {line}");
    }

    // The agent creates the container; Start runs it, Wait gets its exit, Delete tears the
    // pod down.
    let resp = created.unwrap_or_else(|e| panic!("{e:?}\n{log}"));
    assert!(resp.pid > 0);
    let mut start = StartRequest::new();
    start.id = id.into();
    client.start(ctx(), &start).unwrap();
    let mut wait = WaitRequest::new();
    wait.id = id.into();
    let waited = client.wait(ctx(), &wait).unwrap();
    assert_eq!(waited.exit_status, 0, "/bin/true exits 0");
    let mut del = DeleteRequest::new();
    del.id = id.into();
    let deleted = client.delete(ctx(), &del).unwrap();
    assert_eq!(deleted.exit_status, 0);
    // Events leave through the shim's publisher thread: give the last one a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.topics().iter().any(|t| t == "/tasks/delete") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let topics = h.topics();
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(
            topics.iter().any(|t| t == topic),
            "{topic} not in {topics:?}"
        );
    }

    // Nothing is left: no VMM, no mount, no sandbox directory.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !vmm_processes(&h.run_dir()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(vmm_processes(&h.run_dir()), Vec::<u32>::new());
    assert_eq!(mounts_under(&h.run_dir()), Vec::<String>::new());
    assert!(
        !sandbox_dir.exists(),
        "{} left behind",
        sandbox_dir.display()
    );

    let _ = client.shutdown(ctx(), &ShutdownRequest::new());
    assert!(wait_gone(shim_pid, Duration::from_secs(10)));
    let mut log = String::new();
    std::fs::File::open(bundle.join("log"))
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("Shutdown"), "{log}");
}

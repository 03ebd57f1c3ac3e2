#![allow(clippy::unwrap_used)]
//! The container runtime on the host, as root: each test runs busybox containers from a fresh
//! bundle. One reaper thread per test process routes every exit to the registry, as PID 1's
//! reaper does in the guest.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nutshell_agent::container::{ContainerError, Containers, RootMode, State, Stdio};
use oci_spec::runtime::{Process, Spec};
use serde_json::{json, Value};

/// The agent's allocator, so that every container process these tests start sets itself up in
/// a child arena as in the guest.
#[global_allocator]
static ALLOC: nutshell_agent::alloc::AgentAllocator = nutshell_agent::alloc::AgentAllocator;

/// The registries (pivot_root, and move-root as from an initramfs) and their reaper, once per
/// test process.
fn registries() -> &'static (Arc<Containers>, Arc<Containers>) {
    static REGISTRY: OnceLock<(Arc<Containers>, Arc<Containers>)> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let pivot = Arc::new(Containers::with_root_mode(RootMode::PivotRoot));
        let move_root = Arc::new(Containers::with_root_mode(RootMode::MoveRoot));
        let (a, b) = (pivot.clone(), move_root.clone());
        std::thread::spawn(move || loop {
            for r in nutshell_agent::sys::reap_exited() {
                // Each ignores the other's PIDs.
                a.on_exit(r.pid, r.status);
                b.on_exit(r.pid, r.status);
            }
            std::thread::sleep(Duration::from_millis(2));
        });
        (pivot, move_root)
    })
}

fn registry() -> &'static Arc<Containers> {
    &registries().0
}

fn no_hook(_: nix::unistd::Pid) -> Result<(), nutshell_agent::container::HookError> {
    Ok(())
}

const APPLETS: &[&str] = &[
    "sh", "true", "id", "cat", "sleep", "ip", "hostname", "stty", "ls", "echo", "touch", "grep",
    "readlink", "pwd", "tty",
];

/// A bundle: a rootfs of busybox, and the mount table of the test process to compare at the
/// end (nothing a container does may show up in it).
struct Bundle {
    dir: tempfile::TempDir,
    mountinfo: String,
}

impl Bundle {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
            fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        Bundle {
            dir,
            mountinfo: own_mounts(),
        }
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// runc's default spec (`runc spec`), with `args`.
    fn spec(&self, args: &[&str]) -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
                "cwd": "/",
                "capabilities": {
                    "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                    "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                    "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                    "ambient": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                    "inheritable": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": true
            },
            "root": {"path": self.rootfs(), "readonly": false},
            "hostname": "nutshell-ctr",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                 "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                 "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                 "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
            ],
            "linux": {
                "namespaces": [
                    {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                    {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
                ],
                "maskedPaths": [
                    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                    "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                    "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
                ],
                "readonlyPaths": [
                    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
                ]
            }
        })
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_eq!(
                own_mounts(),
                self.mountinfo,
                "the test process's mounts changed"
            );
        }
    }
}

/// The mount table of this process, without the mount IDs that other tests' tempdirs do not
/// change (they make no mounts here either way).
fn own_mounts() -> String {
    fs::read_to_string("/proc/self/mountinfo").unwrap()
}

fn to_spec(v: &Value) -> Spec {
    serde_json::from_value(v.clone()).unwrap()
}

/// A pipe: (read end as a File, write end for the container).
fn pipe() -> (fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    (fs::File::from(r), w)
}

/// A container ID unique in this process.
fn unique_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{prefix}-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Output of a finished container.
struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Creates, starts and waits for a container of `spec`; removes it.
fn run(spec: &Value) -> Output {
    run_in(registry(), spec)
}

fn run_in(reg: &Containers, spec: &Value) -> Output {
    let id = unique_id("run");
    let (mut out_r, out_w) = pipe();
    let (mut err_r, err_w) = pipe();
    let stdio = Stdio {
        stdin: None,
        stdout: Some(out_w),
        stderr: Some(err_w),
    };
    reg.create(&id, &to_spec(spec), stdio, false, &no_hook)
        .unwrap_or_else(|e| panic!("create: {}", chain(&e)));
    reg.start(&id).unwrap();
    let status = reg.wait(&id, None).unwrap();
    assert_eq!(reg.state(&id).unwrap(), State::Stopped);
    let mut stdout = String::new();
    out_r.read_to_string(&mut stdout).unwrap();
    let mut stderr = String::new();
    err_r.read_to_string(&mut stderr).unwrap();
    reg.remove(&id, Duration::from_secs(5)).unwrap();
    Output {
        code: status.code,
        stdout,
        stderr,
    }
}

use nutshell_protocol::error_chain as chain;

fn sh(bundle: &Bundle, script: &str) -> Value {
    bundle.spec(&["sh", "-c", script])
}

#[test]
fn move_root_as_from_an_initramfs() {
    let b = Bundle::new();
    let mut spec = sh(
        &b,
        "echo $$; hostname; cat /proc/kcore | busybox wc -c; touch /x || echo rofail; ls /bin/sh",
    );
    spec["root"]["readonly"] = json!(true);
    let out = run_in(&registries().1, &spec);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout, "1\nnutshell-ctr\n0\nrofail\n/bin/sh\n",
        "{}",
        out.stderr
    );
}

#[test]
fn sysctls_oom_score_adj_and_devices() {
    let b = Bundle::new();
    let mut spec = sh(
        &b,
        "cat /proc/sys/kernel/msgmax /proc/self/oom_score_adj; \
         test -c /dev/null && test -c /dev/urandom && test -c /dev/tty && echo devices; \
         readlink /dev/ptmx; readlink /dev/fd; readlink /dev/stdout; echo hi > /dev/null && echo null-ok",
    );
    spec["linux"]["sysctl"] = json!({"kernel.msgmax": "12345"});
    spec["process"]["oomScoreAdj"] = json!(500);
    let out = run(&spec);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout, "12345\n500\ndevices\npts/ptmx\n/proc/self/fd\n/proc/self/fd/1\nnull-ok\n",
        "{}",
        out.stderr
    );
}

#[test]
fn bind_mounts_with_flags() {
    let b = Bundle::new();
    let data = b.dir.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::write(data.join("hello"), "from the host\n").unwrap();
    let mut spec = sh(
        &b,
        "cat /data/hello; touch /data/new || echo rofail; touch /rw/new && echo rwok",
    );
    let rw = b.dir.path().join("rw");
    fs::create_dir(&rw).unwrap();
    let mounts = spec["mounts"].as_array_mut().unwrap();
    mounts.push(json!({"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "ro", "nosuid", "nodev"]}));
    mounts.push(json!({"destination": "/rw", "source": rw, "options": ["bind", "rprivate"]}));
    let out = run(&spec);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout, "from the host\nrofail\nrwok\n",
        "{}",
        out.stderr
    );
    assert!(!data.join("new").exists());
    assert!(rw.join("new").exists());
}

#[test]
fn exit_codes_zero_and_three() {
    let b = Bundle::new();
    assert_eq!(run(&b.spec(&["true"])).code, 0);
    assert_eq!(run(&sh(&b, "exit 3")).code, 3);
}

#[test]
fn env_cwd_and_args() {
    let b = Bundle::new();
    let mut spec = b.spec(&["sh", "-c", "echo \"$FOO|$(pwd)|$0|$1\"", "zero", "one"]);
    spec["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    spec["process"]["cwd"] = json!("/tmp");
    let out = run(&spec);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "bar baz|/tmp|zero|one\n");
}

#[test]
fn user_groups_and_umask() {
    let b = Bundle::new();
    let mut spec = sh(&b, "id; umask");
    spec["process"]["user"] =
        json!({"uid": 1000, "gid": 1001, "additionalGids": [10, 20], "umask": 23});
    let out = run(&spec);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next().unwrap(), "uid=1000 gid=1001 groups=10,20");
    assert_eq!(lines.next().unwrap(), "0027");
    // Init shares this process's memory until its execve, as an exec does.
    assert_every_thread_root();
}

#[test]
fn hostname_is_the_containers() {
    let b = Bundle::new();
    let host = nix::unistd::gethostname().unwrap();
    let out = run(&b.spec(&["hostname"]));
    assert_eq!(out.stdout, "nutshell-ctr\n");
    assert_eq!(nix::unistd::gethostname().unwrap(), host);
}

#[test]
fn capabilities_are_dropped_and_granted() {
    let b = Bundle::new();
    // The containers share this thread's network namespace: a fresh one, whose lo is down.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let script = "ip link set lo up && ip link show lo";
    let without = run(&sh(&b, script));
    assert_ne!(without.code, 0, "lo went up without CAP_NET_ADMIN");
    assert!(
        without.stderr.contains("not permitted"),
        "{}",
        without.stderr
    );

    let mut spec = sh(&b, &format!("{script} && grep Cap /proc/self/status"));
    for set in [
        "bounding",
        "effective",
        "permitted",
        "inheritable",
        "ambient",
    ] {
        spec["process"]["capabilities"][set] = json!(["CAP_NET_ADMIN"]);
    }
    let with = run(&spec);
    assert_eq!(with.code, 0, "{}", with.stderr);
    assert!(with.stdout.contains("UP"), "{}", with.stdout);
    // CAP_NET_ADMIN is bit 12: 0x1000 in all five sets.
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            with.stdout.contains(&format!("{set}:\t0000000000001000")),
            "{set}: {}",
            with.stdout
        );
    }
}

#[test]
fn readonly_rootfs_refuses_writes() {
    let b = Bundle::new();
    let mut spec = sh(&b, "touch /newfile");
    spec["root"]["readonly"] = json!(true);
    let out = run(&spec);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
    assert!(!b.rootfs().join("newfile").exists());
    // Mounts on top stay writable.
    let mut spec = sh(&b, "touch /dev/shm/x && echo ok");
    spec["root"]["readonly"] = json!(true);
    assert_eq!(run(&spec).stdout, "ok\n");
}

#[test]
fn masked_and_readonly_paths() {
    let b = Bundle::new();
    let out = run(&sh(
        &b,
        "wc=$(cat /proc/kcore | busybox wc -c); echo kcore=$wc; ls /proc/acpi | busybox wc -l; \
         echo x > /proc/sys/kernel/hostname || echo rofail",
    ));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines, ["kcore=0", "0", "rofail"], "{}", out.stderr);
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
}

#[test]
fn no_new_privileges() {
    let b = Bundle::new();
    let out = run(&sh(&b, "grep NoNewPrivs /proc/self/status"));
    assert_eq!(out.stdout, "NoNewPrivs:\t1\n");
    let mut spec = sh(&b, "grep NoNewPrivs /proc/self/status");
    spec["process"]["noNewPrivileges"] = json!(false);
    assert_eq!(run(&spec).stdout, "NoNewPrivs:\t0\n");
}

#[test]
fn rlimits() {
    let b = Bundle::new();
    let mut spec = sh(&b, "ulimit -n; ulimit -Hn");
    spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 654}]);
    let out = run(&spec);
    assert_eq!(out.stdout, "321\n654\n", "{}", out.stderr);
}

#[test]
fn pid_one_in_its_own_namespace() {
    let b = Bundle::new();
    // The glob is expanded by the shell itself: no other process exists.
    let out = run(&sh(&b, "echo $$; echo /proc/[0-9]*"));
    assert_eq!(out.stdout, "1\n/proc/1\n", "{}", out.stderr);
}

fn process(args: &[&str]) -> Process {
    serde_json::from_value(json!({
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/"
    }))
    .unwrap()
}

/// Creates and starts `spec` under a fresh ID.
fn start(spec: &Value) -> String {
    let id = unique_id("bg");
    registry()
        .create(&id, &to_spec(spec), Stdio::default(), false, &no_hook)
        .unwrap_or_else(|e| panic!("create: {}", chain(&e)));
    registry().start(&id).unwrap();
    id
}

#[test]
fn exec_joins_the_container() {
    let b = Bundle::new();
    let reg = registry();
    let id = start(&b.spec(&["sleep", "100"]));
    let init = reg.pids(&id).unwrap()[0];
    let (mut out_r, out_w) = pipe();
    let stdio = Stdio {
        stdout: Some(out_w),
        ..Stdio::default()
    };
    let p = process(&[
        "sh",
        "-c",
        "hostname; cat /proc/1/comm; readlink /proc/self/ns/pid; echo $$",
    ]);
    let pid = reg.exec(&id, "e1", &p, stdio, false, &no_hook).unwrap();
    assert_ne!(pid, init);
    assert_eq!(reg.wait(&id, Some("e1")).unwrap().code, 0);
    let mut out = String::new();
    out_r.read_to_string(&mut out).unwrap();
    let ns = fs::read_link(format!("/proc/{init}/ns/pid")).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..3], ["nutshell-ctr", "sleep", ns.to_str().unwrap()]);
    assert_ne!(lines[3], "1");
    // An exec'd process killed by SIGTERM: 143 (init ignores SIGTERM without a handler, as the
    // PID 1 of a namespace does).
    reg.exec(
        &id,
        "e2",
        &process(&["sleep", "100"]),
        Stdio::default(),
        false,
        &no_hook,
    )
    .unwrap();
    reg.signal(&id, Some("e2"), Signal::SIGTERM as i32, false)
        .unwrap();
    assert_eq!(reg.wait(&id, Some("e2")).unwrap().code, 143);
    assert!(matches!(
        reg.signal(&id, Some("e2"), 15, false),
        Err(ContainerError::ProcessExited(_))
    ));
    reg.remove_exec(&id, "e2").unwrap();
    assert!(matches!(
        reg.wait(&id, Some("e2")),
        Err(ContainerError::ProcessNotFound { .. })
    ));
    // The ID is free again; a running process cannot be removed.
    reg.exec(
        &id,
        "e2",
        &process(&["sleep", "100"]),
        Stdio::default(),
        false,
        &no_hook,
    )
    .unwrap();
    assert!(reg.remove_exec(&id, "e2").is_err());
    reg.signal(&id, None, Signal::SIGKILL as i32, false)
        .unwrap();
    assert_eq!(reg.wait(&id, None).unwrap().code, 137);
    assert!(matches!(
        reg.exec(
            &id,
            "e3",
            &process(&["true"]),
            Stdio::default(),
            false,
            &no_hook
        ),
        Err(ContainerError::InvalidState { .. })
    ));
    reg.remove(&id, Duration::from_secs(5)).unwrap();
}

/// An exec as another user changes that process's credentials only: the exec'd child shares
/// the agent's memory until its execve, and libc's set*id wrappers would have changed every
/// thread of the agent. A missing executable is a clear exec error.
/// Every thread of this process (the agent, in the guest) is still root: a container process
/// shares the agent's memory until its execve, and libc's set*id wrappers would change them all.
fn assert_every_thread_root() {
    for task in fs::read_dir("/proc/self/task").unwrap().flatten() {
        let status = fs::read_to_string(task.path().join("status")).unwrap();
        for key in ["Uid:", "Gid:"] {
            let line = status.lines().find(|l| l.starts_with(key)).unwrap();
            assert!(
                line.split_whitespace().skip(1).all(|v| v == "0"),
                "thread {:?}: {line}",
                task.file_name()
            );
        }
    }
}

#[test]
fn exec_as_a_user_leaves_the_agent_root() {
    let b = Bundle::new();
    let reg = registry();
    let id = start(&b.spec(&["sleep", "100"]));
    let (mut out_r, out_w) = pipe();
    let stdio = Stdio {
        stdout: Some(out_w),
        ..Stdio::default()
    };
    let mut p = process(&["id"]);
    p.set_user(
        serde_json::from_value(json!({"uid": 1000, "gid": 1001, "additionalGids": [10]})).unwrap(),
    );
    reg.exec(&id, "user", &p, stdio, false, &no_hook).unwrap();
    assert_eq!(reg.wait(&id, Some("user")).unwrap().code, 0);
    let mut out = String::new();
    out_r.read_to_string(&mut out).unwrap();
    assert_eq!(out, "uid=1000 gid=1001 groups=10\n");
    assert_every_thread_root();
    let err = reg
        .exec(
            &id,
            "nope",
            &process(&["nope"]),
            Stdio::default(),
            false,
            &no_hook,
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "exec: \"nope\": executable file not found in $PATH"
    );
    reg.remove(&id, Duration::from_secs(5)).unwrap();
}

#[test]
fn signal_all_reaches_every_process() {
    let b = Bundle::new();
    let reg = registry();
    let id = start(&sh(&b, "sleep 100 & sleep 100 & wait; exit 7"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while reg.pids(&id).unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "the sleeps did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SIGTERM: the sleeps die; init (no handler) ignores it, sees its children gone, exits 7.
    reg.signal(&id, None, Signal::SIGTERM as i32, true).unwrap();
    assert_eq!(reg.wait(&id, None).unwrap().code, 7);
    assert!(reg.pids(&id).unwrap().is_empty());
    assert!(matches!(
        reg.start(&id),
        Err(ContainerError::InvalidState {
            state: State::Stopped,
            ..
        })
    ));
    reg.remove(&id, Duration::from_secs(5)).unwrap();
    assert!(matches!(reg.state(&id), Err(ContainerError::NotFound(_))));
}

#[test]
fn several_waiters_get_the_same_exit() {
    let b = Bundle::new();
    let reg = registry();
    let id = start(&b.spec(&["sleep", "100"]));
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let id = id.clone();
            std::thread::spawn(move || registry().wait(&id, None).unwrap())
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    reg.signal(&id, None, Signal::SIGKILL as i32, false)
        .unwrap();
    let statuses: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == statuses[0] && s.code == 137));
    // And once more after the exit.
    assert_eq!(reg.wait(&id, None).unwrap(), statuses[0]);
    reg.remove(&id, Duration::from_secs(5)).unwrap();
}

#[test]
fn terminal_output_and_resize() {
    let b = Bundle::new();
    let reg = registry();
    let id = unique_id("tty");
    // The pty is the container's own: the first of its devpts, found by ttyname.
    let mut spec = sh(&b, "tty; stty size; test -t 0 && echo tty0");
    spec["process"]["terminal"] = json!(true);
    let (stdin_ours, stdin_theirs) = UnixStream::pair().unwrap();
    let (mut out_r, out_w) = pipe();
    let stdio = Stdio {
        stdin: Some(stdin_theirs.into()),
        stdout: Some(out_w),
        stderr: None,
    };
    reg.create(&id, &to_spec(&spec), stdio, true, &no_hook)
        .unwrap_or_else(|e| panic!("create: {}", chain(&e)));
    reg.resize_pty(&id, None, 33, 101).unwrap();
    reg.start(&id).unwrap();
    assert_eq!(reg.wait(&id, None).unwrap().code, 0);
    let mut out = String::new();
    out_r.read_to_string(&mut out).unwrap();
    assert_eq!(out, "/dev/pts/0\r\n33 101\r\ntty0\r\n");
    drop(stdin_ours);
    reg.remove(&id, Duration::from_secs(5)).unwrap();
}

#[test]
fn exec_with_a_terminal_of_the_spec_size() {
    let b = Bundle::new();
    let reg = registry();
    let id = start(&b.spec(&["sleep", "100"]));
    let mut p: Value = json!({
        "terminal": true,
        "consoleSize": {"height": 7, "width": 55},
        "user": {"uid": 0, "gid": 0},
        "args": ["sh", "-c", "tty; stty size"],
        "env": ["PATH=/bin"],
        "cwd": "/"
    });
    let (mut out_r, out_w) = pipe();
    let stdio = Stdio {
        stdout: Some(out_w),
        ..Stdio::default()
    };
    let process: Process = serde_json::from_value(p.take()).unwrap();
    reg.exec(&id, "tty", &process, stdio, true, &no_hook)
        .unwrap();
    assert_eq!(reg.wait(&id, Some("tty")).unwrap().code, 0);
    let mut out = String::new();
    out_r.read_to_string(&mut out).unwrap();
    assert_eq!(out, "/dev/pts/0\r\n7 55\r\n");
    reg.remove(&id, Duration::from_secs(5)).unwrap();
}

/// Creates, starts and waits for a container of `spec` with a terminal; its exit code and
/// what the terminal showed.
fn run_with_terminal(reg: &Containers, spec: &Value) -> (i32, String) {
    let id = unique_id("tty");
    let (mut out_r, out_w) = pipe();
    let stdio = Stdio {
        stdout: Some(out_w),
        ..Stdio::default()
    };
    reg.create(&id, &to_spec(spec), stdio, true, &no_hook)
        .unwrap_or_else(|e| panic!("create: {}", chain(&e)));
    reg.start(&id).unwrap();
    let code = reg.wait(&id, None).unwrap().code;
    let mut out = String::new();
    out_r.read_to_string(&mut out).unwrap();
    reg.remove(&id, Duration::from_secs(5)).unwrap();
    (code, out)
}

#[test]
fn terminal_belongs_to_the_user_in_move_root_mode() {
    // As runc does: the slave is given to the process's user, who can then open its terminal
    // by name (mode 0620, group tty: not otherwise). In the move-root mode, as from an
    // initramfs.
    let b = Bundle::new();
    let mut spec = sh(&b, "echo mine > $(tty) && tty");
    spec["process"]["terminal"] = json!(true);
    spec["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    let (code, out) = run_with_terminal(&registries().1, &spec);
    assert_eq!((code, out.as_str()), (0, "mine\r\n/dev/pts/0\r\n"));
}

#[test]
fn terminal_without_a_devpts_is_a_clear_create_error() {
    // Without /dev/pts the container's /dev/ptmx (a link to pts/ptmx) leads nowhere.
    let b = Bundle::new();
    let reg = registry();
    let mut spec = sh(&b, "tty");
    spec["process"]["terminal"] = json!(true);
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["destination"] != "/dev/pts");
    let id = unique_id("nopts");
    let (_out_r, out_w) = pipe();
    let stdio = Stdio {
        stdout: Some(out_w),
        ..Stdio::default()
    };
    let err = reg
        .create(&id, &to_spec(&spec), stdio, true, &no_hook)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "terminal: open /dev/ptmx in the container: ENOENT: No such file or directory"
    );
    assert!(matches!(reg.state(&id), Err(ContainerError::NotFound(_))));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_in(&b.rootfs()).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", processes_in(&b.rootfs()));
        std::thread::sleep(Duration::from_millis(10));
    }
    // A terminal still works next to it.
    spec["mounts"].as_array_mut().unwrap().push(
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                     "options": ["newinstance", "ptmxmode=0666", "mode=0620"]}),
    );
    let (code, out) = run_with_terminal(reg, &spec);
    assert_eq!((code, out.as_str()), (0, "/dev/pts/0\r\n"));
}

#[test]
fn terminal_stream_both_ways() {
    // As the agent's stdio streams give it: one socket carries the terminal both ways.
    let b = Bundle::new();
    let reg = registry();
    let id = unique_id("ttyin");
    let mut spec = sh(&b, "read line; echo got:$line");
    spec["process"]["terminal"] = json!(true);
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let stdio = Stdio {
        stdout: Some(theirs.into()),
        ..Stdio::default()
    };
    reg.create(&id, &to_spec(&spec), stdio, true, &no_hook)
        .unwrap();
    reg.start(&id).unwrap();
    ours.write_all(b"hello\n").unwrap();
    assert_eq!(reg.wait(&id, None).unwrap().code, 0);
    // EOF once the output ended: the agent keeps no copy of the stream.
    let mut out = String::new();
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    ours.read_to_string(&mut out).unwrap();
    // The terminal echoes the input, then the reply.
    assert_eq!(out, "hello\r\ngot:hello\r\n");
    reg.remove(&id, Duration::from_secs(5)).unwrap();
}

#[test]
fn close_stdin_gives_eof() {
    let b = Bundle::new();
    let reg = registry();
    let id = unique_id("stdin");
    let (mut stdin_ours, stdin_theirs) = UnixStream::pair().unwrap();
    let (mut out_r, out_w) = pipe();
    let stdio = Stdio {
        stdin: Some(stdin_theirs.into()),
        stdout: Some(out_w),
        stderr: None,
    };
    reg.create(&id, &to_spec(&b.spec(&["cat"])), stdio, false, &no_hook)
        .unwrap();
    reg.start(&id).unwrap();
    stdin_ours.write_all(b"abc").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    reg.close_stdin(&id, None).unwrap();
    // Our end stays open: cat ends because of close_stdin alone.
    assert_eq!(reg.wait(&id, None).unwrap().code, 0);
    let mut out = String::new();
    out_r.read_to_string(&mut out).unwrap();
    assert_eq!(out, "abc");
    reg.remove(&id, Duration::from_secs(5)).unwrap();
}

/// Processes whose root is inside `rootfs`.
fn processes_in(rootfs: &Path) -> Vec<String> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter(|e| fs::read_link(e.path().join("cwd")).is_ok_and(|r| r.starts_with(rootfs)))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn missing_executable_is_a_clear_create_error() {
    let b = Bundle::new();
    let reg = registry();
    for (args, want) in [
        (
            vec!["/bin/nope"],
            "exec: /bin/nope: no such file or directory",
        ),
        (
            vec!["nope"],
            "exec: \"nope\": executable file not found in $PATH",
        ),
    ] {
        let id = unique_id("nope");
        let err = reg
            .create(
                &id,
                &to_spec(&b.spec(&args)),
                Stdio::default(),
                false,
                &no_hook,
            )
            .unwrap_err();
        assert_eq!(err.to_string(), want);
        assert!(matches!(reg.state(&id), Err(ContainerError::NotFound(_))));
    }
    // The children are gone (their cwd was the rootfs) and nothing is mounted.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_in(&b.rootfs()).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", processes_in(&b.rootfs()));
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn failing_hook_kills_the_child() {
    let b = Bundle::new();
    let reg = registry();
    let id = unique_id("hook");
    let placed = std::sync::Mutex::new(None);
    let hook = |pid: nix::unistd::Pid| -> Result<(), nutshell_agent::container::HookError> {
        *placed.lock().unwrap() = Some(pid);
        Err("no cgroup for you".into())
    };
    let err = reg
        .create(
            &id,
            &to_spec(&b.spec(&["true"])),
            Stdio::default(),
            false,
            &hook,
        )
        .unwrap_err();
    assert!(matches!(err, ContainerError::Hook(_)), "{err}");
    let pid = placed.lock().unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "child {pid} still there");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn bad_specs_and_states_are_errors() {
    let b = Bundle::new();
    let reg = registry();
    let mut user_ns = b.spec(&["true"]);
    user_ns["linux"]["namespaces"] = json!([{"type": "user"}, {"type": "mount"}]);
    assert!(matches!(
        reg.create("u", &to_spec(&user_ns), Stdio::default(), false, &no_hook),
        Err(ContainerError::NotSupported(_))
    ));
    // A seccomp action the agent cannot do is refused at create.
    let mut notify = b.spec(&["true"]);
    notify["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_NOTIFY"});
    assert!(reg
        .create("s", &to_spec(&notify), Stdio::default(), false, &no_hook)
        .is_err());
    assert!(matches!(
        reg.start("none"),
        Err(ContainerError::NotFound(_))
    ));
    assert!(reg
        .create(
            "../x",
            &to_spec(&b.spec(&["true"])),
            Stdio::default(),
            false,
            &no_hook
        )
        .is_err());

    let id = start(&b.spec(&["sleep", "100"]));
    assert!(matches!(
        reg.create(
            &id,
            &to_spec(&b.spec(&["true"])),
            Stdio::default(),
            false,
            &no_hook
        ),
        Err(ContainerError::AlreadyExists(_))
    ));
    assert!(matches!(
        reg.start(&id),
        Err(ContainerError::InvalidState { .. })
    ));
    reg.set_paused(&id, true).unwrap();
    assert!(reg.set_paused(&id, true).is_err());
    reg.set_paused(&id, false).unwrap();
    // remove kills a running container.
    reg.remove(&id, Duration::from_secs(5)).unwrap();
    assert!(matches!(reg.state(&id), Err(ContainerError::NotFound(_))));
}

#[test]
fn create_start_latency() {
    let b = Bundle::new();
    let reg = registry();
    let spec = to_spec(&b.spec(&["true"]));
    let mut times = Vec::new();
    for _ in 0..20 {
        let id = unique_id("lat");
        let t = Instant::now();
        reg.create(&id, &spec, Stdio::default(), false, &no_hook)
            .unwrap();
        reg.start(&id).unwrap();
        times.push(t.elapsed());
        assert_eq!(reg.wait(&id, None).unwrap().code, 0);
        reg.remove(&id, Duration::from_secs(5)).unwrap();
    }
    times.sort();
    eprintln!(
        "create+start of busybox true: median {:?} (min {:?}, max {:?}, n=20)",
        times[10], times[0], times[19]
    );
}

#[test]
fn a_seccomp_profile_denies_a_syscall_in_the_container() {
    let b = Bundle::new();
    let reg = registry();
    let mut spec = b.spec(&["sh", "-c", "mkdir /tmp/denied || exit 42; exit 0"]);
    spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    reg.create("sc", &to_spec(&spec), Stdio::default(), false, &no_hook)
        .unwrap();
    reg.start("sc").unwrap();
    assert_eq!(
        reg.wait("sc", None).unwrap().code,
        42,
        "mkdir was not denied"
    );
    reg.remove("sc", Duration::from_secs(5)).unwrap();
}

/// Execs that a process of their own container kills while they set themselves up (between
/// the clone and the execve, when they run in the agent's memory): the agent goes on. Such a
/// child allocates from an arena of its own (`nutshell_agent::alloc`, this test binary's
/// allocator too), so no kill can leave the agent's heap locked; before, a kill that landed
/// inside an allocation left dlmalloc's lock held and the agent's next allocation waited
/// forever.
#[test]
fn execs_killed_during_their_set_up_leave_the_agent_working() {
    let b = Bundle::new();
    let reg = registry();
    // PID 1 kills every other process of the container, over and over.
    let id = start(&b.spec(&["sh", "-c", "while :; do kill -9 -1 2>/dev/null; done"]));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let storm = {
        let id = id.clone();
        std::thread::spawn(move || {
            let (mut set_up_failed, mut killed) = (0, 0);
            for i in 0..60 {
                let exec_id = format!("k{i}");
                let p = process(&["sleep", "5"]);
                match reg.exec(&id, &exec_id, &p, Stdio::default(), false, &no_hook) {
                    Ok(_) => {
                        if reg.wait(&id, Some(&exec_id)).unwrap().code == 137 {
                            killed += 1;
                        }
                        reg.remove_exec(&id, &exec_id).unwrap();
                    }
                    Err(_) => set_up_failed += 1,
                }
                // The heap after each: a kill inside an allocation would stop us here.
                let blocks: Vec<Vec<u8>> = (1..200).map(|n| vec![0u8; n * 16]).collect();
                drop(blocks);
            }
            let _ = done_tx.send((set_up_failed, killed));
        })
    };
    let (set_up_failed, killed) = done_rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the execs under the kill storm did not finish: the heap is locked");
    storm.join().unwrap();
    eprintln!("60 execs: {set_up_failed} killed during set-up, {killed} killed after it");
    assert!(
        set_up_failed > 0,
        "no exec was killed during its set-up, the case under test ({killed} after it)"
    );
    // The container stops as usual.
    reg.signal(&id, None, Signal::SIGKILL as i32, false)
        .unwrap();
    assert_eq!(reg.wait(&id, None).unwrap().code, 137);
    reg.remove(&id, Duration::from_secs(5)).unwrap();
}

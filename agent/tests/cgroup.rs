//! The cgroup v2 manager: its file writing against a temporary directory standing in for the
//! cgroup root (no root needed), and the real cgroup2 hierarchy where the host has one
//! (`/sys/fs/cgroup/unified` on the development machines, or `NUTSHELL_TEST_CGROUP2`): create,
//! add a process, freeze/thaw, kill, stats, remove. Every real cgroup and process is cleaned up
//! by a guard, also when an assertion fails.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nutshell_agent::container::cgroup::{Cgroup, CgroupError, OomWatcher};
use oci_spec::runtime::LinuxResources;

/// A directory that looks like a cgroup root to the manager: the files a real one would have.
fn fake_cgroup(dir: &Path, controllers: &str, files: &[&str]) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("cgroup.controllers"), format!("{controllers}\n")).unwrap();
    fs::write(dir.join("cgroup.subtree_control"), "\n").unwrap();
    for f in files {
        fs::write(dir.join(f), "").unwrap();
    }
}

fn resources(json: &str) -> LinuxResources {
    serde_json::from_str(json).unwrap()
}

fn read(path: PathBuf) -> String {
    fs::read_to_string(path).unwrap()
}

#[test]
fn create_enables_the_wanted_controllers_in_each_parent() {
    let root = tempfile::tempdir().unwrap();
    fake_cgroup(
        root.path(),
        "cpuset cpu io memory hugetlb pids rdma misc",
        &[],
    );
    fake_cgroup(&root.path().join("pod"), "cpu memory pids", &[]);
    let cg = Cgroup::create(root.path(), Path::new("/pod/ctr")).unwrap();
    assert_eq!(cg.path(), root.path().join("pod/ctr"));
    assert!(cg.path().is_dir());
    assert_eq!(
        read(root.path().join("cgroup.subtree_control")),
        "+cpuset +cpu +io +memory +pids"
    );
    assert_eq!(
        read(root.path().join("pod/cgroup.subtree_control")),
        "+cpu +memory +pids"
    );
    // Existing: reused, nothing written where the controllers are on (as the kernel shows).
    fs::write(
        root.path().join("cgroup.subtree_control"),
        "cpuset cpu io memory pids\n",
    )
    .unwrap();
    fs::write(
        root.path().join("pod/cgroup.subtree_control"),
        "cpu memory pids\n",
    )
    .unwrap();
    Cgroup::create(root.path(), Path::new("pod/ctr")).unwrap();
    assert_eq!(
        read(root.path().join("cgroup.subtree_control")),
        "cpuset cpu io memory pids\n"
    );
    assert_eq!(
        read(root.path().join("pod/cgroup.subtree_control")),
        "cpu memory pids\n"
    );
    // No escape from the root.
    assert!(matches!(
        Cgroup::create(root.path(), Path::new("pod/../../x")),
        Err(CgroupError::InvalidPath { .. })
    ));
}

#[test]
fn a_prepared_parent_makes_children_with_only_a_directory() {
    let root = tempfile::tempdir().unwrap();
    fake_cgroup(root.path(), "cpuset cpu io memory pids", &[]);
    // The kernel gives a new cgroup its controllers file: stand in for it before the parent is
    // made (create_dir finds the directory and reuses it).
    fake_cgroup(&root.path().join("nutshell"), "cpu memory pids", &[]);
    let parent = Cgroup::create_parent(root.path(), Path::new("nutshell")).unwrap();
    assert_eq!(
        read(root.path().join("cgroup.subtree_control")),
        "+cpuset +cpu +io +memory +pids"
    );
    assert_eq!(
        read(root.path().join("nutshell/cgroup.subtree_control")),
        "+cpu +memory +pids",
        "the parent's children get the controllers without enabling them themselves"
    );
    // Make any write to the controls visible: a child must not touch them.
    for dir in [root.path().to_path_buf(), root.path().join("nutshell")] {
        fs::write(dir.join("cgroup.subtree_control"), "untouched").unwrap();
    }
    let child = parent.child("ctr1").unwrap();
    assert_eq!(child.path(), root.path().join("nutshell/ctr1"));
    assert!(child.path().is_dir());
    // Again: reused.
    assert_eq!(parent.child("ctr1").unwrap().path(), child.path());
    for dir in [root.path().to_path_buf(), root.path().join("nutshell")] {
        assert_eq!(read(dir.join("cgroup.subtree_control")), "untouched");
    }
    for bad in ["", "..", ".", "a/b", "/abs", "../escape"] {
        assert!(
            matches!(parent.child(bad), Err(CgroupError::InvalidPath { .. })),
            "child {bad:?} was accepted"
        );
    }
    assert!(!root.path().join("escape").exists());
    // The parent gone: the child's mkdir says so (the pod then makes both again).
    fs::remove_dir_all(root.path().join("nutshell")).unwrap();
    match parent.child("ctr2") {
        Err(CgroupError::Mkdir { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
        }
        other => panic!("a child of a removed parent: {other:?}"),
    }
}

const LIMIT_FILES: [&str; 8] = [
    "memory.max",
    "memory.swap.max",
    "memory.low",
    "cpu.weight",
    "cpu.max",
    "cpuset.cpus",
    "cpuset.mems",
    "pids.max",
];

#[test]
fn apply_writes_memory_cpu_cpuset_and_pids() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ctr");
    fake_cgroup(&dir, "cpuset cpu memory pids", &LIMIT_FILES);
    fs::write(dir.join("memory.high"), "").unwrap();
    let cg = Cgroup::open(root.path(), Path::new("ctr")).unwrap();
    cg.apply(&resources(
        r#"{
            "devices": [{"allow": false, "access": "rwm"}],
            "memory": {"limit": 268435456, "swap": 536870912, "reservation": 134217728},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"},
            "pids": {"limit": 100},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
            "network": {"classID": 1},
            "unified": {"memory.high": "200000000"}
        }"#,
    ))
    .unwrap();
    let f = |name: &str| read(dir.join(name));
    assert_eq!(f("memory.max"), "268435456");
    assert_eq!(f("memory.swap.max"), "268435456");
    assert_eq!(f("memory.low"), "134217728");
    assert_eq!(f("cpu.weight"), "39");
    assert_eq!(f("cpu.max"), "50000 100000");
    assert_eq!(f("cpuset.cpus"), "0-1");
    assert_eq!(f("cpuset.mems"), "0");
    assert_eq!(f("pids.max"), "100");
    assert_eq!(f("memory.high"), "200000000");

    // Unlimited values are "max"; unset (0) fields are left alone.
    fs::write(dir.join("cpu.weight"), "untouched").unwrap();
    cg.apply(&resources(
        r#"{"memory": {"limit": -1}, "cpu": {"quota": -1, "shares": 0}, "pids": {"limit": -1}}"#,
    ))
    .unwrap();
    assert_eq!(f("memory.max"), "max");
    assert_eq!(f("memory.swap.max"), "max");
    assert_eq!(f("cpu.max"), "max");
    assert_eq!(f("pids.max"), "max");
    assert_eq!(f("cpu.weight"), "untouched");
}

#[test]
fn apply_refuses_what_it_cannot_enforce() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ctr");
    // A guest kernel without swap and without CONFIG_CFS_BANDWIDTH: no memory.swap.max, no
    // cpu.max.
    fake_cgroup(&dir, "cpu memory", &["memory.max", "cpu.weight"]);
    let cg = Cgroup::open(root.path(), Path::new("ctr")).unwrap();
    let err = |json: &str| cg.apply(&resources(json)).unwrap_err();

    // No pids controller here.
    let e = err(r#"{"pids": {"limit": 10}}"#);
    assert!(
        matches!(
            e,
            CgroupError::NoController {
                controller: "pids",
                ..
            }
        ),
        "{e}"
    );
    // A real swap limit without swap; "max" swap is fine.
    let e = err(r#"{"memory": {"limit": 1048576, "swap": 4194304}}"#);
    assert!(
        matches!(
            e,
            CgroupError::Unsupported {
                field: "memory.swap",
                ..
            }
        ),
        "{e}"
    );
    cg.apply(&resources(r#"{"memory": {"limit": 1048576, "swap": -1}}"#))
        .unwrap();
    assert_eq!(read(dir.join("memory.max")), "1048576");
    let e = err(r#"{"cpu": {"quota": 20000, "period": 100000}}"#);
    assert!(e.to_string().contains("not supported"), "{e}");
    assert!(matches!(
        err(r#"{"blockIO": {"weight": 100}}"#),
        CgroupError::Unsupported {
            field: "blockIO",
            ..
        }
    ));
    assert!(matches!(
        err(r#"{"memory": {"kernelTCP": 1000}}"#),
        CgroupError::Unsupported { .. }
    ));
    assert!(matches!(
        err(r#"{"memory": {"disableOOMKiller": true}}"#),
        CgroupError::Unsupported { .. }
    ));
    assert!(matches!(
        err(r#"{"cpu": {"realtimeRuntime": 1000}}"#),
        CgroupError::Unsupported { .. }
    ));
    assert!(matches!(
        err(r#"{"hugepageLimits": [{"pageSize": "2MB", "limit": 1048576}]}"#),
        CgroupError::Unsupported { .. }
    ));
    assert!(matches!(
        err(r#"{"cpu": {"shares": 1}}"#),
        CgroupError::Invalid {
            field: "cpu.shares",
            ..
        }
    ));
    assert!(matches!(
        err(r#"{"memory": {"limit": 100, "swap": 50}}"#),
        CgroupError::Invalid {
            field: "memory.swap",
            ..
        }
    ));
    for key in ["../memory.max", "cgroup.procs", "memory.nope", ""] {
        let e = err(&format!(r#"{{"unified": {{"{key}": "1"}}}}"#));
        assert!(
            matches!(
                e,
                CgroupError::Invalid {
                    field: "unified",
                    ..
                }
            ),
            "{key}: {e}"
        );
    }
    // Obsolete or v1-only hints are only logged.
    cg.apply(&resources(
        r#"{"memory": {"kernel": 1000, "swappiness": 10, "useHierarchy": true}}"#,
    ))
    .unwrap();
}

#[test]
fn stats_parse_the_controller_files() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ctr");
    fake_cgroup(&dir, "cpu memory pids io", &[]);
    let w = |name: &str, content: &str| fs::write(dir.join(name), content).unwrap();
    w(
        "cpu.stat",
        "usage_usec 5000\nuser_usec 3000\nsystem_usec 2000\nnr_periods 10\nnr_throttled 3\nthrottled_usec 700\nnr_bursts 0\nburst_usec 0\n",
    );
    w("memory.current", "1048576\n");
    w("memory.max", "max\n");
    w("memory.peak", "2097152\n");
    w(
        "memory.events",
        "low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\noom_group_kill 0\n",
    );
    w("memory.stat", "anon 4096\nfile 8192\nkernel 100\n");
    w("pids.current", "3\n");
    w("pids.max", "64\n");
    w(
        "io.stat",
        "254:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n",
    );
    let cg = Cgroup::open(root.path(), Path::new("ctr")).unwrap();
    let s = cg.stats().unwrap();
    let cpu = s.cpu.unwrap();
    assert_eq!(
        (cpu.usage_usec, cpu.user_usec, cpu.system_usec),
        (5000, 3000, 2000)
    );
    assert_eq!((cpu.nr_throttled, cpu.throttled_usec), (3, 700));
    let mem = s.memory.unwrap();
    assert_eq!(mem.usage_bytes, 1_048_576);
    assert_eq!(mem.limit_bytes, None);
    assert_eq!(mem.max_usage_bytes, Some(2_097_152));
    assert_eq!(mem.oom_kills, 1);
    assert_eq!((mem.anon_bytes, mem.file_bytes), (4096, 8192));
    let pids = s.pids.unwrap();
    assert_eq!((pids.current, pids.limit), (3, Some(64)));
    let io = s.io.unwrap();
    assert_eq!((io.read_bytes, io.write_bytes), (100, 200));

    // A malformed file is an error naming it.
    w("memory.events", "oom_kill one\n");
    let e = cg.stats().unwrap_err();
    assert!(e.to_string().contains("memory.events"), "{e}");

    // Without the controllers' files the groups are absent.
    for f in ["memory.current", "pids.current", "io.stat"] {
        fs::remove_file(dir.join(f)).unwrap();
    }
    let s = cg.stats().unwrap();
    assert!(s.cpu.is_some() && s.memory.is_none() && s.pids.is_none() && s.io.is_none());
}

#[test]
fn freeze_waits_for_cgroup_events() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ctr");
    fake_cgroup(&dir, "", &["cgroup.freeze"]);
    fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
    let cg = Cgroup::open(root.path(), Path::new("ctr")).unwrap();
    cg.freeze().unwrap();
    assert_eq!(read(dir.join("cgroup.freeze")), "1");
    let start = Instant::now();
    let e = cg
        .wait_frozen(false, Duration::from_millis(100))
        .unwrap_err();
    assert!(matches!(e, CgroupError::FreezeTimeout { .. }), "{e}");
    assert!(start.elapsed() >= Duration::from_millis(100));
    fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
    cg.thaw().unwrap();
    assert_eq!(read(dir.join("cgroup.freeze")), "0");
}

#[test]
fn oom_watcher_reports_each_increase_of_oom_kill() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ctr");
    fake_cgroup(&dir, "memory", &[]);
    let events = dir.join("memory.events");
    let write_events = |oom: u64, kills: u64| {
        fs::write(
            &events,
            format!("low 0\nhigh 0\nmax 0\noom {oom}\noom_kill {kills}\n"),
        )
        .unwrap()
    };
    write_events(0, 2);
    let cg = Cgroup::open(root.path(), Path::new("ctr")).unwrap();
    let (tx, rx) = mpsc::channel();
    let watcher = OomWatcher::start(tx).unwrap();
    watcher.watch("ctr-1", &cg).unwrap();
    // Kills before watch() are not reported; a change without a new kill is not either.
    write_events(1, 2);
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    write_events(2, 3);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "ctr-1");
    write_events(3, 4);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "ctr-1");
    watcher.unwatch("ctr-1");
    write_events(4, 5);
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    // A cgroup without memory.events cannot be watched.
    let bare = root.path().join("bare");
    fake_cgroup(&bare, "", &[]);
    let bare = Cgroup::open(root.path(), Path::new("bare")).unwrap();
    assert!(matches!(
        watcher.watch("bare", &bare),
        Err(CgroupError::Watch { .. })
    ));
    // Dropping the watcher stops its thread (the test would hang otherwise).
    drop(watcher);
}

// ---- the real cgroup2 hierarchy ----

/// The host's cgroup2 mount, if it has one we may write to.
fn real_root() -> Option<PathBuf> {
    let root = std::env::var_os("NUTSHELL_TEST_CGROUP2")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/unified"));
    let writable = root.join("cgroup.procs").exists() && nix::unistd::geteuid().is_root();
    if writable {
        Some(root)
    } else {
        eprintln!(
            "SKIPPED: no writable cgroup2 hierarchy at {} (set NUTSHELL_TEST_CGROUP2)",
            root.display()
        );
        None
    }
}

/// A real cgroup and the processes a test put in it: on drop the processes are killed and
/// reaped, and the cgroups (leaf first) removed.
struct RealCgroup {
    cgroups: Vec<Cgroup>,
    children: Vec<Child>,
}

impl Drop for RealCgroup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for cg in self.cgroups.iter().rev() {
            let _ = cg.kill_all();
            if let Err(e) = cg.remove() {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

fn unique_name(tag: &str) -> String {
    format!("nutshell-test-{tag}-{}", std::process::id())
}

/// A shell that writes a growing counter to `file` every 20 ms.
fn counter(file: &Path) -> Child {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "i=0; while :; do i=$((i+1)); echo $i > {}; sleep 0.02; done",
            file.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for_change(file: &Path, from: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if fs::read_to_string(file).unwrap_or_default() != from {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn real_cgroup_add_freeze_thaw_kill_remove() {
    let Some(root) = real_root() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("count");
    let parent = unique_name("life");
    let mut guard = RealCgroup {
        cgroups: Vec::new(),
        children: Vec::new(),
    };
    let cg = Cgroup::create(&root, Path::new(&format!("{parent}/ctr"))).unwrap();
    guard
        .cgroups
        .push(Cgroup::open(&root, Path::new(&parent)).unwrap());
    guard.cgroups.push(cg.clone());
    assert!(cg.procs().unwrap().is_empty());

    guard.children.push(counter(&file));
    let pid = guard.children[0].id();
    cg.add_process(pid).unwrap();
    assert!(cg.procs().unwrap().contains(&pid));
    assert!(
        wait_for_change(&file, "", Duration::from_secs(5)),
        "the counter never ran"
    );

    cg.freeze().unwrap();
    assert_eq!(cg.events().unwrap()["frozen"], 1);
    let frozen_at = read(file.clone());
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        read(file.clone()),
        frozen_at,
        "the counter went on while frozen"
    );

    cg.thaw().unwrap();
    assert_eq!(cg.events().unwrap()["frozen"], 0);
    assert!(
        wait_for_change(&file, &frozen_at, Duration::from_secs(5)),
        "the counter did not resume after thaw"
    );

    let stats = cg.stats().unwrap();
    assert!(stats.cpu.is_some(), "cpu.stat is a core file of cgroup v2");

    cg.kill_all().unwrap();
    let status = guard.children[0].wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    cg.remove().unwrap();
    assert!(!cg.path().exists());
    // Removing again is fine; the parent goes with the guard.
    cg.remove().unwrap();
}

#[test]
fn real_cgroup_remove_waits_for_killed_processes() {
    let Some(root) = real_root() else { return };
    let mut guard = RealCgroup {
        cgroups: Vec::new(),
        children: Vec::new(),
    };
    let cg = Cgroup::create(&root, Path::new(&unique_name("remove"))).unwrap();
    guard.cgroups.push(cg.clone());
    for _ in 0..3 {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        cg.add_process(child.id()).unwrap();
        guard.children.push(child);
    }
    assert_eq!(cg.procs().unwrap().len(), 3);
    // With processes in it, rmdir is refused: remove() gives up after its budget.
    let e = cg.remove_within(Duration::from_millis(50)).unwrap_err();
    assert!(matches!(e, CgroupError::Busy { .. }), "{e}");
    cg.kill_all().unwrap();
    // Reap them (we are their parent), then the cgroup empties and goes.
    for child in &mut guard.children {
        child.wait().unwrap();
    }
    cg.remove().unwrap();
    assert!(!cg.path().exists());
}

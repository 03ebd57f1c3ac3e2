//! Slow lane: Nutshell as a containerd runtime for real. A private containerd (its own socket,
//! root and state) runs a locally built busybox image with
//! `ctr run --runtime io.containerd.nutshell.v2`: the container runs in a microVM (its kernel
//! is the guest's, not the host's), its output and exit code reach `ctr`, `ctr task`
//! exec/ps/metrics/pause/resume/kill work on it, a terminal reaches its process, and nothing is
//! left on the host afterwards.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::pty::{openpty, Winsize};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use nutshell_test_support::containerd::{
    shim_pids, shim_socket, Containerd, ContainerdOptions, Ctr,
};
use nutshell_test_support::image;
use nutshell_tests::{
    cpu_time, guest_artifact, jailed_vmm, left_under_run_dir, proc_status_field, shim_binary,
    status_field, target_dir, template_cache, vmm_binary, vmms_under,
};

const IMAGE: &str = "docker.io/nutshell/e2e-busybox:1";

/// One test at a time: each sets PATH and NUTSHELL_CONFIG for the containerd it starts, and
/// two pods at once only slow each other down on this machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A private containerd whose nutshell shim uses a configuration and run_dir of its own, with
/// the busybox image imported.
struct NutshellContainerd {
    containerd: Containerd,
    run_dir: PathBuf,
    _dir: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

impl NutshellContainerd {
    fn start() -> Self {
        Self::start_with("")
    }

    /// With `extra` appended to the shim's configuration.
    fn start_with(extra: &str) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// With `extra` appended to the shim's configuration and `vars` in the environment of
    /// containerd (so of its shims and their VMMs).
    fn start_with_env(extra: &str, vars: &[(&str, &str)]) -> Self {
        let serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let kernel = guest_artifact("vmlinux").unwrap();
        let initramfs = guest_artifact("initramfs.cpio").unwrap();
        let vmm = vmm_binary().unwrap();
        let shim = shim_binary().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "kernel = {:?}\ninitramfs = {:?}\nvmm = {:?}\nrun_dir = {:?}\n\
                 boot_timeout_secs = 300\nrpc_timeout_secs = 120\ntemplate_dir = {:?}\n{extra}\n",
                kernel,
                initramfs,
                vmm,
                run_dir,
                template_cache()
            ),
        )
        .unwrap();
        // containerd finds `containerd-shim-nutshell-v2` on its PATH and the shim reads its
        // config from NUTSHELL_CONFIG; both are inherited from this process, which starts
        // containerd.
        let path = std::env::var("PATH").unwrap_or_default();
        let shim_dir = shim.parent().unwrap().display().to_string();
        if !path.split(':').any(|p| p == shim_dir) {
            std::env::set_var("PATH", format!("{shim_dir}:{path}"));
        }
        std::env::set_var("NUTSHELL_CONFIG", &config);

        let tarball = image::busybox_image(IMAGE)
            .unwrap()
            .tarball(&target_dir().join("nutshell").join("bench-images"))
            .unwrap();
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let containerd = Containerd::start(&ContainerdOptions::default());
        // containerd has its copy; the next test (which waits for the lock) starts without.
        for (k, _) in vars {
            std::env::remove_var(k);
        }
        let containerd = containerd.unwrap();
        containerd.ctr().import_image(&tarball).unwrap();
        NutshellContainerd {
            containerd,
            run_dir,
            _dir: dir,
            _serial: serial,
        }
    }

    /// The shims of this containerd's namespace.
    fn shims(&self) -> Vec<u32> {
        shim_pids(self.containerd.address(), self.containerd.namespace())
    }

    /// No shim of this containerd's namespace, no VMM, nothing under run_dir, no mount there.
    fn assert_nothing_left(&self) {
        assert!(
            eventually(Duration::from_secs(30), || self.shims().is_empty()),
            "shims left: {:?}",
            self.shims()
        );
        assert_eq!(vmms_under(&self.run_dir), Vec::<u32>::new());
        let left = left_under_run_dir(&self.run_dir);
        assert!(
            left.is_empty(),
            "left under {}: {left:?}",
            self.run_dir.display()
        );
        let run_dir = self.run_dir.to_string_lossy().into_owned();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&run_dir))
            .map(str::to_owned)
            .collect();
        assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    }
}

#[test]
#[ignore = "slow lane: needs root, containerd and the guest kernel (scripts/test.sh runs it)"]
fn ctr_runs_a_container_in_a_nutshell_microvm() {
    let env = NutshellContainerd::start();
    let containerd = &env.containerd;
    let ctr = containerd.ctr();

    let host_release = Command::new("uname").arg("-r").output().unwrap().stdout;
    let host_release = String::from_utf8(host_release).unwrap();
    let run = |id: &str, script: &str| {
        run_rm(&ctr, id)
            .args(["sh", "-c", script])
            .output()
            .unwrap()
    };

    let out = run(
        "e2e-hello",
        "echo hello from nutshell; uname -r; echo to-stderr >&2",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stdout}\n{stderr}\n{}",
        containerd.log_tail(4000)
    );
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("hello from nutshell"), "{stdout}");
    let guest_release = lines.next().unwrap_or_default();
    assert!(
        !guest_release.is_empty() && guest_release != host_release.trim(),
        "the container ran on the host kernel ({guest_release:?})"
    );
    assert!(stderr.contains("to-stderr"), "{stderr}");

    // The exit code reaches ctr.
    let out = run("e2e-exit", "exit 3");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        containerd.log_tail(8000)
    );

    // Two vCPUs (a limit of one CPU adds one to the default VM): the first run builds or finds
    // the template of that shape, the second is restored from it. An SMP guest here may run on
    // the TSC, which a restore does not offset (guest-kernel/README.md, "The clock"): timers
    // must still fire and the wall clock must be the host's after RefreshGuest.
    for id in ["e2e-smp1", "e2e-smp2"] {
        let out = ctr
            .command()
            .args(["run", "--rm", "--runtime", "io.containerd.nutshell.v2"])
            .args(["--cpu-quota", "100000", "--cpu-period", "100000", IMAGE, id])
            .args(["sh", "-c", "nproc; sleep 1; date +%s"])
            .output()
            .unwrap();
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{id}: {stdout}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            containerd.log_tail(8000)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.first(), Some(&"2"), "{id}: vCPUs: {stdout}");
        let guest_now: u64 = lines
            .get(1)
            .and_then(|l| l.parse().ok())
            .unwrap_or_default();
        assert!(
            guest_now.abs_diff(host_now) <= 60,
            "{id}: guest clock {guest_now}, host {host_now}"
        );
    }
    let log = containerd.log_tail(1 << 20);
    assert!(
        log.lines()
            .any(|l| l.contains("sandbox e2e-smp2: template ") && l.contains(" found in ")),
        "the second 2-vCPU pod was not restored from a template:\n{}",
        containerd.log_tail(8000)
    );

    // Nothing is left: no shim, no VMM, no sandbox directory, no mount.
    env.assert_nothing_left();
}

/// The strict node policy (`deploy/config-untrusted.toml`), reached through containerd's
/// runtime option `ConfigPath` (`ctr run --runtime-config-path`) while the shim's
/// NUTSHELL_CONFIG is the permissive default: a bind mount of the host's root, a privileged
/// container and an explicit device are refused at Create with the path or field and the
/// policy key, before any VM starts, and leave nothing behind; a plain container runs.
#[test]
#[ignore = "slow lane: needs root, containerd and the guest kernel (scripts/test.sh runs it)"]
fn the_strict_policy_refuses_host_paths_and_devices() {
    let env = NutshellContainerd::start();
    let ctr = env.containerd.ctr();
    let base = std::fs::read_to_string(env._dir.path().join("config.toml")).unwrap();
    let policy =
        std::fs::read_to_string(nutshell_tests::repo_root().join("deploy/config-untrusted.toml"))
            .unwrap();
    let strict = env._dir.path().join("config-untrusted.toml");
    std::fs::write(&strict, format!("{base}\n{policy}")).unwrap();
    let run = |id: &str, config: Option<&std::path::Path>, extra: &[&str], script: &str| {
        let mut cmd = ctr.command();
        cmd.args(["run", "--rm", "--runtime", "io.containerd.nutshell.v2"]);
        if let Some(config) = config {
            cmd.arg("--runtime-config-path").arg(config);
        }
        let out = cmd
            .args(extra)
            .args([IMAGE, id, "sh", "-c", script])
            .output()
            .unwrap();
        ctr.remove_container(id);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let refused = [
        (
            "e2e-policy-root",
            Some(strict.as_path()),
            &["--mount", "type=bind,src=/,dst=/host,options=rbind:ro"][..],
            &[
                "host path / (resolved: /) onto /host",
                "policy.allowed_host_paths",
            ][..],
        ),
        (
            "e2e-policy-privileged",
            Some(strict.as_path()),
            &["--privileged"][..],
            &["privileged container", "policy.refuse_privileged"][..],
        ),
        (
            "e2e-policy-device",
            Some(strict.as_path()),
            &["--device", "/dev/kvm"][..],
            &["linux.devices: /dev/kvm requested"][..],
        ),
        // Under every policy, the default one too.
        (
            "e2e-policy-device-default",
            None,
            &["--device", "/dev/kvm"][..],
            &["linux.devices: /dev/kvm requested"][..],
        ),
    ];
    for (id, config, extra, words) in refused {
        let t = Instant::now();
        let (ok, out) = run(id, config, extra, "echo ran");
        assert!(!ok, "{id} ran: {out}");
        for w in words {
            assert!(out.contains(w), "{id}: {w:?} not in {out}");
        }
        assert!(!out.contains("ran\n"), "{out}");
        eprintln!(
            "{id}: refused in {:.2} s: {}",
            t.elapsed().as_secs_f64(),
            out.trim()
        );
        env.assert_nothing_left();
    }
    // The strict policy accepts what `ctr run` makes of a plain container.
    let (ok, out) = run(
        "e2e-policy-plain",
        Some(strict.as_path()),
        &[],
        "echo plain-ran",
    );
    assert!(ok && out.contains("plain-ran"), "{out}");
    env.assert_nothing_left();
}

/// A shim that dies (OOM-killed, crashed) while its container runs: containerd notices, runs
/// `shim delete`, and that leaves nothing behind: the VMM is gone, the sandbox directory and
/// mounts are gone, the shim's socket in /run/containerd/s is gone, and the container can be
/// removed.
#[test]
#[ignore = "slow lane: needs root, containerd and the guest kernel (scripts/test.sh runs it)"]
fn a_killed_shim_leaves_nothing_behind() {
    shim_ends_under_a_running_container(Signal::SIGKILL);
}

/// SIGTERM to a shim (an operator's `kill`): it stops its VM and exits by itself, as
/// containerd's own shims exit on SIGTERM, and nothing is left.
#[test]
#[ignore = "slow lane: needs root, containerd and the guest kernel (scripts/test.sh runs it)"]
fn sigterm_ends_the_shim_and_its_vm() {
    shim_ends_under_a_running_container(Signal::SIGTERM);
}

fn signal_pid(pid: u32, signal: Signal) {
    nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid).unwrap()), signal).unwrap();
}

fn shim_ends_under_a_running_container(signal: Signal) {
    let env = NutshellContainerd::start();
    let containerd = &env.containerd;
    let ctr = containerd.ctr();
    let id = format!("e2e-shim-{}", signal.as_str().to_lowercase());
    ctr.output(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.nutshell.v2",
        IMAGE,
        &id,
        "sleep",
        "3600",
    ])
    .unwrap_or_else(|e| panic!("{e}\n{}", containerd.log_tail(4000)));
    assert!(
        eventually(Duration::from_secs(60), || task_status(&ctr, &id)
            .is_some_and(|(_, s)| s == "RUNNING")),
        "{:?}",
        task_status(&ctr, &id)
    );
    let shims = env.shims();
    assert_eq!(shims.len(), 1, "{shims:?}");
    let socket = shim_socket(shims[0]).expect("the shim's socket");
    assert!(!vmms_under(&env.run_dir).is_empty(), "no VMM runs");

    signal_pid(shims[0], signal);
    let nothing_runs = eventually(Duration::from_secs(60), || {
        vmms_under(&env.run_dir).is_empty()
            && left_under_run_dir(&env.run_dir).is_empty()
            && !socket.exists()
            && env.shims().is_empty()
    });
    assert!(
        nothing_runs,
        "after {signal}: shims {:?}, VMMs {:?}, left {:?}, socket {} exists: {}\n{}",
        env.shims(),
        vmms_under(&env.run_dir),
        left_under_run_dir(&env.run_dir),
        socket.display(),
        socket.exists(),
        containerd.log_tail(4000)
    );
    if signal == Signal::SIGTERM {
        let log = containerd.log_tail(200_000);
        assert!(log.contains("SIGTERM: stopping 1 VM(s)"), "{log}");
    }
    // containerd has given the task up: it is not running any more.
    assert!(
        task_status(&ctr, &id).is_none_or(|(_, s)| s != "RUNNING"),
        "{:?}",
        task_status(&ctr, &id)
    );
    ctr.remove_container(&id);
    assert!(ctr
        .output(&["containers", "ls", "-q"])
        .unwrap()
        .trim()
        .is_empty());
    env.assert_nothing_left();
}

/// SIGTERM while a container's VM is still booting (a cold boot, templates off): the VMM is
/// killed, the Create fails and cleans up, the shim exits, and nothing is left.
#[test]
#[ignore = "slow lane: needs root, containerd and the guest kernel (scripts/test.sh runs it)"]
fn sigterm_during_a_create_leaves_nothing_behind() {
    let env = NutshellContainerd::start_with("templates = false");
    let containerd = &env.containerd;
    let ctr = containerd.ctr();
    const ID: &str = "e2e-shim-sigterm-create";
    let run = ctr
        .command()
        .args([
            "run",
            "-d",
            "--runtime",
            "io.containerd.nutshell.v2",
            IMAGE,
            ID,
            "sleep",
            "3600",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The VMM runs: the guest kernel is booting (minutes here without a template).
    assert!(
        eventually(Duration::from_secs(60), || !vmms_under(&env.run_dir)
            .is_empty()),
        "no VMM started\n{}",
        containerd.log_tail(4000)
    );
    let shims = env.shims();
    assert_eq!(shims.len(), 1, "{shims:?}");
    let started = Instant::now();
    signal_pid(shims[0], Signal::SIGTERM);

    let out = wait_output(run, Duration::from_secs(90));
    assert!(
        !out.status.success(),
        "ctr run succeeded although its shim got SIGTERM while the VM booted"
    );
    assert!(
        eventually(Duration::from_secs(60), || env.shims().is_empty()),
        "the shim still runs {:.0} s after SIGTERM\n{}",
        started.elapsed().as_secs_f64(),
        containerd.log_tail(4000)
    );
    eprintln!(
        "SIGTERM during Create: shim gone {:.1} s after the signal; ctr: {}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    ctr.remove_container(ID);
    env.assert_nothing_left();
}

/// Three pods started at once on a node with one VM start slot: each runs and prints, the later
/// ones say how long they waited for the slot, and no slot stays held. The test holds the slot
/// itself until the three shims run, so that their starts overlap however the machine's load
/// spreads the three `ctr run`s (on a busy host the first VM could start before the third
/// `ctr run` reached its shim, and fewer pods waited).
#[test]
#[ignore = "slow lane: needs root, containerd and the guest kernel (scripts/test.sh runs it)"]
fn pods_starting_at_once_take_turns_for_a_start_slot() {
    let env = NutshellContainerd::start_with("max_starting_vms = 1");
    let ctr = env.containerd.ctr();
    let slots = env.run_dir.join("start-slots");
    std::fs::create_dir_all(&slots).unwrap();
    let held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(slots.join("slot-0"))
        .unwrap();
    held.lock().unwrap();
    let children: Vec<Child> = (0..3)
        .map(|i| {
            run_rm(&ctr, &format!("e2e-slot-{i}"))
                .args(["echo", &format!("slot-run-{i}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(120), || env.shims().len() == 3),
        "three shims: {:?}",
        env.shims()
    );
    // Their Creates follow their starts at once; then the slot is theirs to share.
    std::thread::sleep(Duration::from_secs(2));
    held.unlock().unwrap();
    drop(held);
    for (i, child) in children.into_iter().enumerate() {
        let out = wait_output(child, Duration::from_secs(300));
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            env.containerd.log_tail(8000)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("slot-run-{i}")
        );
    }
    let log = env.containerd.log_tail(1 << 20);
    let waited = log.matches("for start slot 0 of 1").count();
    assert!(
        waited >= 2,
        "two of the three pods waited for the one slot, {waited} said so:\n{}",
        env.containerd.log_tail(8000)
    );
    env.assert_nothing_left();
}

/// `ctr run --rm` of the busybox image as container `id` in a Nutshell microVM; add the command.
fn run_rm(ctr: &Ctr, id: &str) -> Command {
    let mut cmd = ctr.command();
    cmd.args([
        "run",
        "--rm",
        "--runtime",
        "io.containerd.nutshell.v2",
        IMAGE,
        id,
    ]);
    cmd
}

/// Waits for `child` up to `timeout` (killing it then); its output.
fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// Runs `cmd` with a pseudo-terminal of `rows` × `cols` as its stdin, stdout and stderr (what
/// `ctr -t` needs on its side); its exit code and everything it wrote to the terminal.
fn run_in_pty(mut cmd: Command, rows: u16, cols: u16, timeout: Duration) -> (Option<i32>, String) {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&size), None).unwrap();
    cmd.stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave));
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // our copies of the slave: the master reads EIO once the child's are closed
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO when the last slave descriptor closes.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status.code(), reader.join().unwrap())
}

/// `ctr task ps ID`: the PIDs listed.
fn task_pids(ctr: &Ctr, id: &str) -> Vec<u32> {
    ctr.output(&["task", "ps", id])
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// `ctr task ls`: (PID, STATUS) of task `id`.
fn task_status(ctr: &Ctr, id: &str) -> Option<(u32, String)> {
    ctr.output(&["task", "ls"]).unwrap().lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == id).then_some(())?;
        Some((f.next()?.parse().ok()?, f.next()?.to_owned()))
    })
}

/// Polls `f` every 200 ms until it holds, up to `timeout`.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The value of `name` in `ctr task metrics` output (the table's `METRIC VALUE` rows).
fn metric(out: &str, name: &str) -> Option<u64> {
    out.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == name).then_some(())?;
        f.next()?.parse().ok()
    })
}

#[test]
#[ignore = "slow lane: needs root, containerd and the guest kernel (scripts/test.sh runs it)"]
fn ctr_task_operations_on_a_nutshell_container() {
    let env = NutshellContainerd::start();
    let ctr = env.containerd.ctr();
    let log = || env.containerd.log_tail(6000);
    const ID: &str = "e2e-ops";
    const MEMORY_LIMIT: u64 = 96 << 20;

    // One long-running container serves every check.
    let started = Instant::now();
    let limit = MEMORY_LIMIT.to_string();
    ctr.output(&[
        "run",
        // Detached with stdio FIFOs: ctr opens them, Start returns, ctr exits and closes its
        // ends while the shim copies (ctr's exit once hung here: see shim/src/stdio.rs).
        "-d",
        "--runtime",
        "io.containerd.nutshell.v2",
        "--memory-limit",
        &limit,
        IMAGE,
        ID,
        "sleep",
        "3600",
    ])
    .unwrap_or_else(|e| panic!("{e}\n{}", log()));
    eprintln!("ctr run -d: {:.2} s", started.elapsed().as_secs_f64());
    let (task_pid, status) = task_status(&ctr, ID).unwrap();
    assert_eq!(
        status,
        "RUNNING",
        "{:?}\n{}",
        ctr.output(&["task", "ls"]),
        log()
    );
    // The task's PID (what containerd shows) is the container's VMM on the host.
    assert_eq!(vmms_under(&env.run_dir), vec![task_pid], "{}", log());

    // Exec: output and exit code reach ctr; two execs at once.
    let exec = |exec_id: &str, script: &str| {
        ctr.command()
            .args(["task", "exec", "--exec-id", exec_id, ID, "sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = exec("exec-a", "echo exec-a says hi; echo exec-a-err >&2; exit 5");
    let b = exec(
        "exec-b",
        "cat /proc/self/cgroup >/dev/null; echo exec-b says hi; exit 6",
    );
    let (a, b) = (
        wait_output(a, Duration::from_secs(300)),
        wait_output(b, Duration::from_secs(300)),
    );
    assert_eq!(a.status.code(), Some(5), "{a:?}\n{}", log());
    assert_eq!(String::from_utf8_lossy(&a.stdout), "exec-a says hi\n");
    assert!(String::from_utf8_lossy(&a.stderr).contains("exec-a-err"));
    assert_eq!(b.status.code(), Some(6), "{b:?}\n{}", log());
    assert_eq!(String::from_utf8_lossy(&b.stdout), "exec-b says hi\n");

    // ps: the container's processes by their guest PIDs (the guest's root PID namespace;
    // the agent is PID 1 there). Only `sleep` now; one more while an exec runs.
    let init_pids = task_pids(&ctr, ID);
    assert_eq!(init_pids.len(), 1, "{init_pids:?}");
    assert!(init_pids[0] > 1, "{init_pids:?}");

    // An idle pod is idle: with only `sleep` left, the guest stops its timer tick (a
    // high-resolution clocksource lets it), so its VMM uses next to no host CPU. A guest that
    // kept its 20 Hz tick took ~9% of a CPU here (each tick is emulated guest-kernel work).
    let idle_share = |window: Duration| {
        let before = cpu_time(task_pid).unwrap();
        std::thread::sleep(window);
        cpu_time(task_pid)
            .unwrap()
            .saturating_sub(before)
            .as_secs_f64()
            / window.as_secs_f64()
    };
    let mut shares = Vec::new();
    // The guest may still be finishing the execs' teardown: allow it a few windows to settle.
    let settled = eventually(Duration::from_secs(90), || {
        shares.push(idle_share(Duration::from_secs(5)));
        shares.last().is_some_and(|&s| s < 0.02)
    });
    eprintln!("idle pod: VMM CPU share per 5 s window {shares:.3?}");
    assert!(
        settled,
        "the idle pod's VMM kept using CPU: {shares:.3?} of a CPU per 5 s"
    );

    // Metrics from the container's cgroup in the guest: the memory limit given to ctr run
    // exists only there (the VMM on the host has no such limit).
    let metrics = ctr.output(&["task", "metrics", ID]).unwrap();
    eprintln!("{metrics}");
    assert_eq!(
        metric(&metrics, "memory.limit_in_bytes"),
        Some(MEMORY_LIMIT),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "memory.usage_in_bytes").unwrap_or(0) > 0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "pids.current"), Some(1), "{metrics}");

    // A tty for an exec: ctr sizes it from its own terminal before the exec starts.
    let mut cmd = ctr.command();
    cmd.args([
        "task",
        "exec",
        "-t",
        "--exec-id",
        "exec-tty",
        ID,
        "sh",
        "-c",
        "tty; stty size; [ -t 0 ] && echo stdin-is-a-tty",
    ]);
    let (code, out) = run_in_pty(cmd, 33, 97, Duration::from_secs(300));
    assert_eq!(code, Some(0), "{out}\n{}", log());
    // The pty comes from the container's own devpts (opened inside it), so `tty` (ttyname)
    // finds it under /dev/pts.
    eprintln!("exec -t: {out:?}");
    assert!(names_a_pts(&out), "{out}");
    assert!(out.contains("33 97"), "{out}");
    assert!(out.contains("stdin-is-a-tty"), "{out}");

    // Kill one exec with SIGTERM: it ends by the signal (143).
    let long = exec("exec-long", "sleep 1000");
    let started = |exec_id: &str| {
        let line = format!("{ID}/{exec_id}: ExecProcess in the guest took");
        eventually(Duration::from_secs(300), || {
            env.containerd.log_tail(usize::MAX).contains(&line)
        })
    };
    assert!(started("exec-long"), "{}", log());
    let pids = task_pids(&ctr, ID);
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(pids.contains(&init_pids[0]), "{pids:?}");
    let metrics = ctr.output(&["task", "metrics", ID]).unwrap();
    assert_eq!(metric(&metrics, "pids.current"), Some(2), "{metrics}");
    ctr.output(&["task", "kill", "--exec-id", "exec-long", ID])
        .unwrap();
    let long = wait_output(long, Duration::from_secs(120));
    assert_eq!(long.status.code(), Some(143), "{long:?}\n{}", log());

    // kill --all: SIGTERM to every process of the container. The two execs die of it; the
    // container's init (`sleep`, PID 1 of its PID namespace, no handler) ignores it, as under
    // runc.
    let x = exec("exec-x", "sleep 1000");
    let y = exec("exec-y", "sleep 1000");
    assert!(started("exec-x") && started("exec-y"), "{}", log());
    assert_eq!(task_pids(&ctr, ID).len(), 3);
    ctr.output(&["task", "kill", "--all", ID]).unwrap();
    for out in [x, y].map(|c| wait_output(c, Duration::from_secs(120))) {
        assert_eq!(out.status.code(), Some(143), "{out:?}\n{}", log());
    }
    assert_eq!(task_pids(&ctr, ID), init_pids);
    assert_eq!(task_status(&ctr, ID).unwrap().1, "RUNNING");

    // Pause and resume: the cgroup freezer in the guest.
    ctr.output(&["task", "pause", ID]).unwrap();
    assert_eq!(task_status(&ctr, ID).unwrap().1, "PAUSED");
    ctr.output(&["task", "resume", ID]).unwrap();
    assert_eq!(task_status(&ctr, ID).unwrap().1, "RUNNING");

    // SIGKILL ends the init: the task stops with 137.
    ctr.output(&["task", "kill", "--signal", "SIGKILL", ID])
        .unwrap();
    assert!(
        eventually(Duration::from_secs(60), || task_status(&ctr, ID)
            .is_some_and(|(_, s)| s == "STOPPED")),
        "{:?}",
        task_status(&ctr, ID)
    );
    let out = ctr.command().args(["task", "delete", ID]).output().unwrap();
    // ctr reports the deleted task's exit status as a warning.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exit code 137"), "{out:?}");
    ctr.output(&["container", "delete", ID]).unwrap();

    // `ctr run -t`: a container whose init has a terminal.
    let mut cmd = ctr.command();
    cmd.args([
        "run",
        "-t",
        "--rm",
        "--runtime",
        "io.containerd.nutshell.v2",
        IMAGE,
        "e2e-tty",
        "sh",
        "-c",
        "tty; stty size; [ -t 0 ] && echo stdin-is-a-tty; exit 4",
    ]);
    let (code, out) = run_in_pty(cmd, 41, 123, Duration::from_secs(300));
    assert_eq!(code, Some(4), "{out}\n{}", log());
    eprintln!("run -t: {out:?}");
    assert!(names_a_pts(&out), "{out}");
    assert!(out.contains("41 123"), "{out}");
    assert!(out.contains("stdin-is-a-tty"), "{out}");

    env.assert_nothing_left();
}

/// Whether a line of terminal output `out` is a pty's name, `/dev/pts/N`, as `tty` prints it.
fn names_a_pts(out: &str) -> bool {
    out.lines().any(|l| {
        l.trim_end_matches('\r')
            .strip_prefix("/dev/pts/")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Every number that follows `marker` on a line of `log` (the shim's timing lines).
fn logged_figures(log: &str, marker: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find(marker)? + marker.len()..];
            let num: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            num.parse().ok()
        })
        .collect()
}

/// Figures for the report: `ctr run --rm /bin/true` under nutshell vs runc (interleaved), the
/// host PSS of an idle pod (shim + VMM), and where a nutshell `ctr run` spends its time, from
/// the shim's log. `NUTSHELL_MEASURE=1` to run; `NUTSHELL_MEASURE_RUNS` runs each (5).
#[test]
#[ignore = "measurement: NUTSHELL_MEASURE=1 cargo test -p nutshell-tests --test containerd -- --ignored measure"]
fn measure_ctr_run_nutshell_vs_runc() {
    let Some(runs) = nutshell_tests::measure_runs(5) else {
        return;
    };
    let env = NutshellContainerd::start();
    let ctr = env.containerd.ctr();
    let run = |runtime: &str, id: &str| {
        let t = Instant::now();
        let out = ctr
            .command()
            .args(["run", "--rm", "--runtime", runtime, IMAGE, id, "/bin/true"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{out:?}\n{}",
            env.containerd.log_tail(3000)
        );
        t.elapsed().as_secs_f64()
    };
    // Warm-up: the template cache and the image's snapshots exist afterwards.
    run("io.containerd.nutshell.v2", "m-warm-nutshell");
    run("io.containerd.runc.v2", "m-warm-runc");
    let (mut nutshell, mut runc) = (Vec::new(), Vec::new());
    for i in 0..runs {
        nutshell.push(run("io.containerd.nutshell.v2", &format!("m-nutshell-{i}")));
        runc.push(run("io.containerd.runc.v2", &format!("m-runc-{i}")));
    }
    eprintln!("ctr run --rm /bin/true, {runs} each, interleaved:");
    eprintln!("  nutshell: {nutshell:.2?} s");
    eprintln!("  runc:     {runc:.2?} s");
    let (n, r) = (median(&mut nutshell), median(&mut runc));
    eprintln!(
        "  median nutshell {n:.2} s, runc {r:.2} s, ratio {:.1}",
        n / r
    );
    assert!(n > 0.0 && r > 0.0);

    // Where the nutshell runs spent their time (the shim's lines in containerd's log).
    let log = env.containerd.log_tail(usize::MAX);
    for (what, marker) in [
        ("shim start -> VMM spawn (s)", "s after the shim started"),
        ("VMM spawn -> vCPUs running (ms)", "restored"),
        ("VMM spawn -> agent answered (s)", "agent answered"),
        (
            "CreateContainer in the guest (s)",
            "CreateContainer in the guest took",
        ),
        (
            "StartContainer in the guest (s)",
            "StartContainer in the guest took",
        ),
    ] {
        let mut v = if marker == "restored" {
            // "restored DIR in X ms"
            log.lines()
                .filter(|l| l.contains("restored") && l.contains(" ms"))
                .filter_map(|l| {
                    let before = &l[..l.rfind(" ms")?];
                    before.rsplit(' ').next()?.parse().ok()
                })
                .collect()
        } else if marker.starts_with("s after") {
            log.lines()
                .filter(|l| l.contains(marker))
                .filter_map(|l| {
                    let before = &l[..l.find(marker)?];
                    before.trim_end().rsplit(' ').next()?.parse().ok()
                })
                .collect()
        } else {
            logged_figures(&log, marker)
        };
        if v.is_empty() {
            eprintln!("  {what}: not in the log");
            continue;
        }
        let all = format!("{v:.3?}");
        eprintln!("  {what}: median {:.3} of {all}", median(&mut v));
    }

    // Host memory of one idle pod: PSS of the shim and its VMM.
    ctr.output(&[
        "run",
        "-d",
        "--null-io",
        "--runtime",
        "io.containerd.nutshell.v2",
        IMAGE,
        "m-idle",
        "sleep",
        "3600",
    ])
    .unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let c = &env.containerd;
    let shims = env.shims();
    let tree = nutshell_test_support::containerd::process_tree(&shims);
    let mut total = 0;
    for pid in &tree {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let m = nutshell_tests::memory_use(*pid).unwrap();
        eprintln!(
            "  idle pod: {} (pid {pid}): PSS {:.1} MiB, RSS {:.1} MiB",
            comm.trim(),
            m.pss_kib as f64 / 1024.0,
            m.rss_kib as f64 / 1024.0
        );
        total += m.pss_kib;
    }
    eprintln!(
        "  idle pod host PSS (shim + VMM): {:.1} MiB",
        total as f64 / 1024.0
    );
    assert!(total > 0, "no shim found: {shims:?}");
    c.ctr().remove_container("m-idle");
    env.assert_nothing_left();
}

/// The capabilities a jailed VMM keeps (chown, dac_override, fowner, fsetid, setgid, setuid):
/// the mask /proc shows.
const JAIL_CAPS: &str = "00000000000000db";

/// A container's VMM runs jailed: the process the shim spawned is a supervisor whose child is
/// PID 1 of its own PID namespace, in a mount namespace of its own where the host's files are
/// not visible, with `no_new_privs`, the bounding set cut to the fs server's six capabilities,
/// a seccomp filter on every thread, and no capability at all in the threads that never act
/// for guest users; the container still runs, and nothing is left afterwards.
#[test]
#[ignore = "slow lane: needs root, containerd and the guest kernel (scripts/test.sh runs it)"]
fn the_vmm_runs_jailed_with_seccomp_on_every_thread() {
    let env = NutshellContainerd::start();
    let containerd = &env.containerd;
    let ctr = containerd.ctr();
    const ID: &str = "e2e-jail";
    ctr.output(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.nutshell.v2",
        IMAGE,
        ID,
        "sleep",
        "3600",
    ])
    .unwrap_or_else(|e| panic!("{e}\n{}", containerd.log_tail(4000)));
    assert!(
        eventually(Duration::from_secs(120), || task_status(&ctr, ID)
            .is_some_and(|(_, s)| s == "RUNNING")),
        "{:?}\n{}",
        task_status(&ctr, ID),
        containerd.log_tail(4000)
    );
    let vmms = vmms_under(&env.run_dir);
    assert_eq!(vmms.len(), 1, "{vmms:?}");
    let supervisor = vmms[0];
    let vmm = jailed_vmm(supervisor).expect("the supervisor has a jailed child");

    // Namespaces: PID 1 of a new PID namespace; mount, IPC and UTS namespaces of its own; the
    // network namespace is the one it was spawned in.
    let ns = |pid: u32, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
    for kind in ["pid", "mnt", "ipc", "uts"] {
        assert_ne!(ns(vmm, kind), ns(supervisor, kind), "{kind} namespace");
    }
    assert_eq!(ns(vmm, "net"), ns(supervisor, "net"));
    let nspid = proc_status_field(vmm, "NSpid").unwrap();
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "NSpid {nspid}");
    // Its root: none of the host's files (no /etc, no /usr), its own devices and /proc.
    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    assert!(!root.join("etc/shadow").exists());
    assert!(!root.join("etc").exists());
    assert!(!root.join("usr").exists());
    assert!(root.join("dev/kvm").exists());
    assert!(!root.join("dev/mem").exists());
    let top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        top.iter()
            .all(|n| ["dev", "proc", "tmp", "run"].contains(&n.as_str())
                || env.run_dir.starts_with(format!("/{n}"))
                || template_cache().starts_with(format!("/{n}"))
                || guest_artifact("vmlinux")
                    .unwrap()
                    .starts_with(format!("/{n}"))),
        "the jail's root holds {top:?}"
    );

    // Every thread: no_new_privs, a seccomp filter, the bounding set; CapEff only where the
    // fs server acts for guest users (the main thread, the fs thread, the control socket).
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{vmm}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(tasks.len() >= 3, "threads {tasks:?}");
    let mut names = Vec::new();
    for tid in &tasks {
        let status = std::fs::read_to_string(format!("/proc/{vmm}/task/{tid}/status")).unwrap();
        let field = |f: &str| status_field(&status, f).unwrap_or_default();
        let name = field("Name");
        assert_eq!(field("Seccomp"), "2", "thread {tid} ({name})");
        assert_eq!(field("NoNewPrivs"), "1", "thread {tid} ({name})");
        assert_eq!(field("CapBnd"), JAIL_CAPS, "thread {tid} ({name})");
        assert_eq!(field("CapInh"), "0000000000000000", "thread {tid} ({name})");
        assert_eq!(field("CapAmb"), "0000000000000000", "thread {tid} ({name})");
        let eff = field("CapEff");
        if name.starts_with("vcpu") || name == "vsock" || name == "virtio-net" {
            assert_eq!(eff, "0000000000000000", "thread {tid} ({name})");
        } else {
            assert!(
                eff == JAIL_CAPS || eff == "0000000000000000",
                "thread {tid} ({name}): CapEff {eff}"
            );
        }
        names.push(name);
    }
    assert!(names.iter().any(|n| n.starts_with("vcpu")), "{names:?}");
    assert!(names.iter().any(|n| n == "virtio-fs"), "{names:?}");
    // The main thread keeps the fs server's capabilities and nothing more.
    assert_eq!(proc_status_field(vmm, "CapEff").unwrap(), JAIL_CAPS);
    assert_eq!(proc_status_field(vmm, "CapPrm").unwrap(), JAIL_CAPS);
    let log = containerd.log_tail(400_000);
    assert!(log.contains("jail ready in"), "{log}");

    // The container works through it: exec reaches the guest, the rootfs is there.
    let out = ctr
        .output(&["task", "exec", "--exec-id", "e1", ID, "ls", "/bin"])
        .unwrap_or_else(|e| panic!("{e}\n{}", containerd.log_tail(4000)));
    assert!(out.lines().any(|l| l.trim() == "sh"), "{out}");
    ctr.output(&["task", "kill", "-s", "SIGKILL", ID]).unwrap();
    assert!(
        eventually(Duration::from_secs(60), || task_status(&ctr, ID)
            .is_none_or(|(_, s)| s == "STOPPED")),
        "{:?}",
        task_status(&ctr, ID)
    );
    ctr.output(&["task", "delete", ID]).unwrap();
    ctr.remove_container(ID);
    env.assert_nothing_left();
}

/// A thread of the VMM that makes a system call outside its filter kills the VMM (SIGSYS,
/// through the test hook `NUTSHELL_VMM_TEST_SIGSYS`): the shim says so, the container's
/// start fails, and nothing is left.
#[test]
#[ignore = "slow lane: needs root, containerd and the guest kernel (scripts/test.sh runs it)"]
fn a_forbidden_system_call_kills_the_vmm_and_the_shim_says_so() {
    let env = NutshellContainerd::start_with_env("", &[("NUTSHELL_VMM_TEST_SIGSYS", "vcpu")]);
    let containerd = &env.containerd;
    let ctr = containerd.ctr();
    let out = run_rm(&ctr, "e2e-sigsys").args(["true"]).output().unwrap();
    assert!(
        !out.status.success(),
        "the container ran although its VMM was killed"
    );
    let log = containerd.log_tail(400_000);
    assert!(
        log.contains("killed by SIGSYS: a seccomp filter refused a system call"),
        "{log}"
    );
    let _ = ctr.output(&["container", "rm", "e2e-sigsys"]);
    env.assert_nothing_left();
}

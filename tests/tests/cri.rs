//! Slow lane: Nutshell under containerd's CRI, driven as kubelet drives it (a Rust CRI client,
//! `runtime_handler = "nutshell"`), against a private containerd (own root, state and socket).
//!
//! The rig (`nutshell_tests::cri_rig`) builds the images locally and imports them.
//!
//! The pods are on the rig's CNI bridge network, as kubelet's pods are (a Nutshell pod on the
//! node's network is refused); what the network does is tested in `network.rs`.
//!
//! The pods get a `cgroup_parent`, so containerd puts `linux.cgroupsPath` =
//! `<parent>/<sandbox id>` into the sandbox's spec, and the shim runs the VMM in that cgroup
//! (created by the shim, removed on delete).
//!
//! One pod serves many checks: creating and starting a container costs ~7 s of emulated guest
//! kernel time on the development machines. The two tests take a lock so that they never run
//! at once (two VMs and two containerds would only slow each other down).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use nutshell_tests::cri::{container_config, namespace_modes, parse_cri_log, CriClient};
use nutshell_tests::cri_rig::{
    alive, cgroup_of, measure_handlers, rig, rig_with, CONTROLLERS, HANDLER, IMAGE, NAMESPACE,
    SERIAL, UNTRUSTED_HANDLER,
};
use nutshell_tests::memory_use;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
#[ignore = "slow lane: needs root, containerd, KVM and the guest kernel (scripts/test.sh runs it)"]
fn cri_pod_with_two_containers_runs_in_one_microvm() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let test_started = Instant::now();
    let mut rig = rig("pod");
    let pod_cfg = rig.pod("nutshell-e2e");

    let t = Instant::now();
    let pod = rig.cri.run_pod_sandbox(&pod_cfg, HANDLER).unwrap();
    let run_pod = t.elapsed();
    eprintln!("RunPodSandbox: {run_pod:?}");
    assert_eq!(rig.shims().len(), 1, "one shim for the pod");
    let vmm = rig.only_vmm();
    let shim = rig.shims()[0];

    // The VMM runs in the pod's cgroup: <cgroup_parent>/<sandbox id>, in every hierarchy.
    let want = format!("/{}/{pod}", rig.cgroup_parent);
    for c in CONTROLLERS {
        assert_eq!(
            cgroup_of(vmm, c).as_deref(),
            Some(&*want),
            "{c} cgroup of the VMM"
        );
        let procs = std::fs::read_to_string(
            Path::new("/sys/fs/cgroup")
                .join(c)
                .join(&want[1..])
                .join("cgroup.procs"),
        )
        .unwrap();
        assert!(
            procs.lines().any(|l| l.trim() == vmm.to_string()),
            "{c}: {procs}"
        );
    }
    let idle = memory_use(shim).unwrap().pss_kib + memory_use(vmm).unwrap().pss_kib;

    // Two containers in the pod: a long-running one that logs, and one that exits on demand.
    let web_cfg = container_config(
        "web",
        IMAGE,
        &[
            "sh",
            "-c",
            "echo hello-stdout; echo hello-stderr >&2; exec sleep 2147483647",
        ],
        "web.log",
    );
    let t = Instant::now();
    let web = rig.cri.create_container(&pod, &web_cfg, &pod_cfg).unwrap();
    rig.cri.start_container(&web).unwrap();
    let start_web = t.elapsed();
    eprintln!("web created and started: {start_web:?}");
    let job_cfg = container_config(
        "job",
        IMAGE,
        &[
            "sh",
            "-c",
            "while [ ! -e /tmp/stop ]; do sleep 1; done; echo job-done; exit 7",
        ],
        "job.log",
    );
    let t = Instant::now();
    let job = rig.cri.create_container(&pod, &job_cfg, &pod_cfg).unwrap();
    rig.cri.start_container(&job).unwrap();
    let start_job = t.elapsed();
    eprintln!("job created and started: {start_job:?}");

    // Both containers run in the pod's one VM: still one VMM (the same process) and one shim,
    // the same guest kernel (boot id), which is not the host's.
    assert_eq!(rig.only_vmm(), vmm, "the pod's VMM changed");
    assert_eq!(rig.shims(), vec![shim]);
    let boot_id = |cri: &mut CriClient, id: &str| {
        let r = cri
            .exec_sync(
                id,
                &["sh", "-c", "cat /proc/sys/kernel/random/boot_id; uname -r"],
                Duration::from_secs(120),
            )
            .unwrap();
        assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
        text(&r.stdout)
    };
    let t = Instant::now();
    let in_web = boot_id(&mut rig.cri, &web);
    let exec_time = t.elapsed();
    let in_job = boot_id(&mut rig.cri, &job);
    assert_eq!(in_web, in_job, "the containers see different kernels");
    let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert!(
        !in_web.contains(host_boot.trim()),
        "the pod runs on the host kernel"
    );
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        !in_web.lines().nth(1).unwrap_or_default().is_empty()
            && in_web.lines().nth(1) != Some(host_release.trim()),
        "{in_web}"
    );

    // ExecSync: stdout, stderr and the exit code, separately.
    let r = rig
        .cri
        .exec_sync(
            &web,
            &["sh", "-c", "echo exec-out; echo exec-err >&2; exit 3"],
            Duration::from_secs(120),
        )
        .unwrap();
    assert_eq!(
        (r.exit_code, text(&r.stdout), text(&r.stderr)),
        (3, "exec-out\n".to_owned(), "exec-err\n".to_owned())
    );

    // Container logs in the CRI format at the log path, streams tagged.
    let web_log = rig.log_dir.join("web.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    let lines = loop {
        let lines = parse_cri_log(&std::fs::read_to_string(&web_log).unwrap_or_default()).unwrap();
        if lines.len() >= 2 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        lines.contains(&("stderr".into(), "hello-stderr".into())),
        "{lines:?}"
    );
    // Written at once by the init process, before anything else: the first bytes of a stream
    // (they were lost before the stdio fixes in shim/src/stdio.rs).
    assert!(
        lines.contains(&("stdout".into(), "hello-stdout".into())),
        "{lines:?}"
    );

    // A container that exits: ContainerStatus has its exit code, its log its last words; the
    // pod and its other container keep running.
    let r = rig
        .cri
        .exec_sync(&job, &["touch", "/tmp/stop"], Duration::from_secs(120))
        .unwrap();
    assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
    assert_eq!(
        rig.cri.wait_exited(&job, Duration::from_secs(120)).unwrap(),
        7
    );
    let job_log =
        parse_cri_log(&std::fs::read_to_string(rig.log_dir.join("job.log")).unwrap()).unwrap();
    assert_eq!(job_log, vec![("stdout".into(), "job-done".into())]);
    assert_eq!(
        rig.cri.container_state(&web).unwrap().0,
        cri::ContainerState::ContainerRunning
    );

    // The pod sandbox's task is its VM: its metrics come from the VMM, and pausing it stops
    // the vCPUs, every container of the pod with them (an ExecSync cannot finish) until it
    // is resumed.
    let ctr = rig.containerd.ctr_in(NAMESPACE);
    let metrics = ctr.output(&["task", "metrics", &pod]).unwrap();
    assert!(metrics.contains("memory.usage_in_bytes"), "{metrics}");
    ctr.output(&["task", "pause", &pod]).unwrap();
    let tasks = ctr.output(&["task", "ls"]).unwrap();
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with(pod.as_str()) && l.contains("PAUSED")),
        "{tasks}"
    );
    let paused = rig
        .cri
        .exec_sync(&web, &["echo", "while-paused"], Duration::from_secs(5));
    assert!(
        paused.as_ref().is_err(),
        "an ExecSync finished in a paused pod: {:?}",
        paused.map(|r| r.exit_code)
    );
    ctr.output(&["task", "resume", &pod]).unwrap();
    let r = rig
        .cri
        .exec_sync(&web, &["echo", "resumed"], Duration::from_secs(120))
        .unwrap();
    assert_eq!((r.exit_code, text(&r.stdout)), (0, "resumed\n".to_owned()));

    let t = Instant::now();
    rig.cri.stop_pod_sandbox(&pod).unwrap();
    assert_eq!(
        rig.cri.container_state(&web).unwrap().0,
        cri::ContainerState::ContainerExited
    );
    rig.cri.remove_pod_sandbox(&pod).unwrap();
    let teardown = t.elapsed();
    assert!(!rig.cri.list_pod_sandboxes().unwrap().contains(&pod));
    rig.assert_nothing_left();

    eprintln!(
        "CRI figures: RunPodSandbox {:.2} s (template restore), Create+Start web {:.2} s, \
         job {:.2} s, first ExecSync {:.2} s, Stop+Remove {:.2} s; idle pod PSS (shim + VMM) \
         {:.1} MiB; test {:.1} s",
        run_pod.as_secs_f64(),
        start_web.as_secs_f64(),
        start_job.as_secs_f64(),
        exec_time.as_secs_f64(),
        teardown.as_secs_f64(),
        idle as f64 / 1024.0,
        test_started.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "slow lane: needs root, containerd, KVM and the guest kernel (scripts/test.sh runs it)"]
fn a_pod_survives_a_containerd_restart_and_can_be_stopped() {
    // containerd must be able to exit while the pod runs: the shim's stdio copies once held a
    // FIFO's lock in splice(2) while waiting for the guest, and containerd's close of that FIFO
    // then slept uninterruptibly (see shim/src/stdio.rs).
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let test_started = Instant::now();
    let mut rig = rig("restart");
    let pod_cfg = rig.pod("nutshell-restart");
    let pod = rig.cri.run_pod_sandbox(&pod_cfg, HANDLER).unwrap();
    let app_cfg = container_config("app", IMAGE, &["sleep", "2147483647"], "app.log");
    let app = rig.cri.create_container(&pod, &app_cfg, &pod_cfg).unwrap();
    rig.cri.start_container(&app).unwrap();
    let vmm = rig.only_vmm();
    let shims = rig.shims();
    assert_eq!(shims.len(), 1);
    let old_containerd = rig.containerd.pid().unwrap();

    // containerd goes away; the shim and the VM do not.
    let stopping = rig.containerd.stop_daemon();
    assert!(!alive(old_containerd), "containerd still runs");
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(vmm), "the VMM died with containerd");
    assert!(alive(shims[0]), "the shim died with containerd");

    // containerd comes back on the same root, state and socket and finds the pod.
    let t = Instant::now();
    rig.containerd.start_again().unwrap();
    rig.cri = CriClient::connect(rig.containerd.address()).unwrap();
    let restart = t.elapsed();
    assert_ne!(rig.containerd.pid(), Some(old_containerd));
    let pods = rig.cri.pod_sandbox_states().unwrap();
    assert!(
        pods.contains(&(pod.clone(), cri::PodSandboxState::SandboxReady)),
        "{pods:?}"
    );
    let containers = rig.cri.container_states().unwrap();
    assert!(
        containers.contains(&(
            app.clone(),
            pod.clone(),
            cri::ContainerState::ContainerRunning
        )),
        "{containers:?}"
    );
    // The recovered task is served for real: ExecSync reaches the guest.
    let r = rig
        .cri
        .exec_sync(&app, &["echo", "still-here"], Duration::from_secs(120))
        .unwrap();
    assert_eq!(
        (r.exit_code, text(&r.stdout)),
        (0, "still-here\n".to_owned())
    );
    assert_eq!(rig.only_vmm(), vmm);
    assert_eq!(rig.shims(), shims);

    rig.cri.stop_pod_sandbox(&pod).unwrap();
    rig.cri.remove_pod_sandbox(&pod).unwrap();
    assert!(rig.cri.pod_sandbox_states().unwrap().is_empty());
    rig.assert_nothing_left();
    eprintln!(
        "restart figures: containerd stopped in {:.2} s, back and answering in {:.2} s; test {:.1} s",
        stopping.as_secs_f64(),
        restart.as_secs_f64(),
        test_started.elapsed().as_secs_f64()
    );
}

/// A bind mount of `host` at `container` in a CRI container config.
fn with_mount(mut cfg: cri::ContainerConfig, host: &Path, container: &str) -> cri::ContainerConfig {
    cfg.mounts.push(cri::Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        ..Default::default()
    });
    cfg
}

#[test]
#[ignore = "slow lane: needs root, containerd, KVM and the guest kernel (scripts/test.sh runs it)"]
fn the_untrusted_handler_refuses_host_root_and_runs_a_normal_pod() {
    // The handler's containerd runtime options name the strict configuration (ConfigPath), as
    // deploy/containerd-nutshell.toml does; the shim's NUTSHELL_CONFIG is the permissive one.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let test_started = Instant::now();
    let mut rig = rig("policy");

    // hostNetwork: refused at RunPodSandbox, before a VM starts.
    let mut host_net = rig.pod("policy-hostnet");
    namespace_modes(&mut host_net).network = cri::NamespaceMode::Node as i32;
    let e = rig
        .cri
        .run_pod_sandbox(&host_net, UNTRUSTED_HANDLER)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hostNetwork") && e.contains("policy.refuse_node_namespaces"),
        "{e}"
    );
    eprintln!("hostNetwork pod: {e}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rig.shims().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        rig.shims(),
        Vec::<u32>::new(),
        "the refused pod's shim stays"
    );
    assert!(nutshell_tests::vmms_under(&rig.run_dir).is_empty());

    // A pod on its CNI network with the strict policy.
    let pod_cfg = rig.pod("policy");
    let uid = pod_cfg.metadata.as_ref().unwrap().uid.clone();
    let pod = rig
        .cri
        .run_pod_sandbox(&pod_cfg, UNTRUSTED_HANDLER)
        .unwrap();
    let shared = rig.run_dir.join(&pod).join("shared");
    let shared_entries = || -> Vec<String> {
        std::fs::read_dir(&shared)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    // Mount points beneath the shared directory. The directory itself is a mount point while
    // the VM runs: the jailed VMM binds it over itself (shared propagation, docs/security.md).
    let beneath = format!("{}/", shared.display());
    let mounts_under_shared = || -> Vec<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|point| point.starts_with(&beneath))
            })
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(shared_entries(), Vec::<String>::new());

    // The host's root, another pod's kubelet directory, and a way out by "..": each refused at
    // StartContainer (the CRI creates the task there) with the path and the policy key,
    // leaving nothing in the pod.
    let other_pod = rig.kubelet_dir.join("pods").join("uid-someone-else");
    std::fs::create_dir_all(&other_pod).unwrap();
    let own = rig
        .kubelet_dir
        .join("pods")
        .join(&uid)
        .join("volumes/kubernetes.io~empty-dir/data");
    std::fs::create_dir_all(&own).unwrap();
    let dot_dot = own.join("../../../../../../../../etc");
    for (n, (host, shown)) in [
        (Path::new("/"), "host path / ".to_owned()),
        (other_pod.as_path(), other_pod.display().to_string()),
        (dot_dot.as_path(), "resolved: /etc)".to_owned()),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("evil-{n}");
        let cfg = with_mount(
            container_config(&name, IMAGE, &["true"], &format!("{name}.log")),
            host,
            "/host",
        );
        let evil = rig.cri.create_container(&pod, &cfg, &pod_cfg).unwrap();
        let e = rig.cri.start_container(&evil).unwrap_err().to_string();
        assert!(
            e.contains(&shown) && e.contains("policy.allowed_host_paths"),
            "{}: {e}",
            host.display()
        );
        eprintln!("{name}: {e}");
        assert_eq!(shared_entries(), Vec::<String>::new(), "{}", host.display());
        assert_eq!(mounts_under_shared(), Vec::<String>::new());
    }

    // A kubelet-style volume of the pod's own: shared both ways. containerd's own files of
    // the pod (hosts, resolv.conf, hostname, /dev/shm) are allowed too, or nothing would run.
    std::fs::write(own.join("from-host"), "hello-volume\n").unwrap();
    let cfg = with_mount(
        container_config(
            "app",
            IMAGE,
            &[
                "sh",
                "-c",
                "cat /data/from-host && echo written > /data/from-guest && cat /etc/hostname",
            ],
            "app.log",
        ),
        &own,
        "/data",
    );
    let t = Instant::now();
    let app = rig.cri.create_container(&pod, &cfg, &pod_cfg).unwrap();
    rig.cri.start_container(&app).unwrap();
    assert_eq!(
        rig.cri.wait_exited(&app, Duration::from_secs(180)).unwrap(),
        0
    );
    let app_time = t.elapsed();
    let log =
        parse_cri_log(&std::fs::read_to_string(rig.log_dir.join("app.log")).unwrap()).unwrap();
    assert!(
        log.contains(&("stdout".into(), "hello-volume".into())),
        "{log:?}"
    );
    assert_eq!(
        std::fs::read_to_string(own.join("from-guest")).unwrap(),
        "written\n"
    );

    rig.cri.stop_pod_sandbox(&pod).unwrap();
    rig.cri.remove_pod_sandbox(&pod).unwrap();
    rig.assert_nothing_left();
    eprintln!(
        "policy figures: app with its volume created, run and exited in {:.1} s; test {:.1} s",
        app_time.as_secs_f64(),
        test_started.elapsed().as_secs_f64()
    );
}

/// ExecSync latency through the CRI, for the report (docs/conformance.md, "Exec latency"):
/// one pod per runtime handler, each with a running busybox container, then
/// `NUTSHELL_MEASURE_RUNS` (10) rounds of one ExecSync of `true` into each, the handlers'
/// order alternating from round to round, so that a comparison shares the machine's load.
/// `NUTSHELL_MEASURE_HANDLERS` lists the handlers (default `nutshell`); `name=runtime_type`
/// registers a further runtime, e.g. `before=io.containerd.nutshellbefore.v2` with a wrapper
/// `containerd-shim-nutshellbefore-v2` on `PATH` that runs an older build.
/// `NUTSHELL_MEASURE_LOG=<file>` keeps containerd's log (with the shims') there.
#[test]
#[ignore = "measurement: NUTSHELL_MEASURE=1 cargo test -p nutshell-tests --test cri -- --ignored measure"]
fn measure_exec_sync_latency() {
    let Some(runs) = nutshell_tests::measure_runs(10) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (names, extra) = measure_handlers();
    let mut rig = rig_with("exec", extra);
    let mut pods = Vec::new();
    for name in &names {
        let pod_cfg = rig.pod(&format!("exec-{name}"));
        let pod = rig.cri.run_pod_sandbox(&pod_cfg, name).unwrap();
        let cfg = container_config("app", IMAGE, &["sleep", "2147483647"], "app.log");
        let id = rig.cri.create_container(&pod, &cfg, &pod_cfg).unwrap();
        rig.cri.start_container(&id).unwrap();
        pods.push((pod, id));
    }
    let mut samples = vec![Vec::new(); names.len()];
    for round in 0..runs {
        let mut order: Vec<usize> = (0..names.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let t = Instant::now();
            let r = rig
                .cri
                .exec_sync(&pods[i].1, &["true"], Duration::from_secs(120))
                .unwrap();
            let took = t.elapsed().as_secs_f64();
            assert_eq!(r.exit_code, 0, "{}", text(&r.stderr));
            eprintln!("round {round}: {}: ExecSync of true {took:.3} s", names[i]);
            samples[i].push(took);
        }
    }
    for (name, mut s) in names.iter().zip(samples) {
        s.sort_by(f64::total_cmp);
        eprintln!(
            "ExecSync of true under {name}: median {:.3} s, min {:.3}, max {:.3} (n={}): {s:.3?}",
            s[s.len() / 2],
            s[0],
            s[s.len() - 1],
            s.len()
        );
    }
    // containerd's log has the shims' too: kept for a breakdown (`NUTSHELL_MEASURE_LOG`).
    if let Some(to) = std::env::var_os("NUTSHELL_MEASURE_LOG") {
        std::fs::copy(rig.containerd.dir().join("containerd.log"), to).unwrap();
    }
    for (pod, _) in &pods {
        rig.cri.stop_pod_sandbox(pod).unwrap();
        rig.cri.remove_pod_sandbox(pod).unwrap();
    }
    // Not `assert_nothing_left`: with two pods the shim of the first one made the pods'
    // cgroup parent and cannot remove it while the second runs (the rig's guard does).
}

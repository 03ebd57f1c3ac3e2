//! Slow lane: what the Kubernetes CRI validation suite checks of a runtime, through the CRI as
//! kubelet drives it (a Rust CRI client, `runtime_handler = "nutshell"`, a private containerd):
//! pod sysctls, the PID and IPC namespace modes (CONTAINER, POD, NODE; TARGET refused), setuid
//! binaries with and without `no_new_privs`, host mounts appearing under an `rslave` volume,
//! StopContainer right after StartContainer, and the guest kernel's network features (bridges,
//! tunnels, iptables) that privileged and CAP_NET_ADMIN pods use. See docs/conformance.md.
//!
//! One pod serves several checks: every container costs seconds of emulated guest kernel time
//! on the development machines. The pods are on the rig's CNI network, so their UTS namespace
//! is the pod's (POD mode: the pod's hostname in every container).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use nutshell_test_support::image;
use nutshell_tests::cri::{container_config, namespace_modes, parse_cri_log, CriClient};
use nutshell_tests::cri_rig::{rig, Rig, HANDLER, SERIAL};
use nutshell_tests::target_dir;

/// The test image: busybox plus `/bin/probe` (setuid root), a static C program: `ids` prints
/// `uid=U euid=E`, `shm KEY` creates a System V shared-memory segment, `shmget KEY` finds one
/// (exit status 2 if there is none), `rmshm KEY` removes it. (Debian's busybox has no `ipcs`.)
const PROBE_IMAGE: &str = "docker.io/nutshell/e2e-conformance:1";

const PROBE_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ipc.h>
#include <sys/shm.h>
int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "shm") == 0) {
        int id = shmget((key_t)strtol(argv[2], 0, 0), 4096, IPC_CREAT | 0666);
        if (id < 0) { perror("shmget"); return 1; }
        printf("shmid=%d\n", id);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "shmget") == 0) {
        int id = shmget((key_t)strtol(argv[2], 0, 0), 0, 0);
        if (id < 0) { perror("shmget"); return 2; }
        printf("shmid=%d\n", id);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "rmshm") == 0) {
        int id = shmget((key_t)strtol(argv[2], 0, 0), 0, 0);
        if (id < 0 || shmctl(id, IPC_RMID, 0) < 0) { perror("rmshm"); return 1; }
        return 0;
    }
    printf("uid=%d euid=%d\n", (int)getuid(), (int)geteuid());
    return 0;
}
"#;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Builds the probe (static, with the host's gcc) into `target/nutshell/conformance/`.
fn probe_binary() -> PathBuf {
    let dir = target_dir().join("nutshell").join("conformance");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("probe.c");
    let bin = dir.join("probe");
    std::fs::write(&src, PROBE_C).unwrap();
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("gcc (the setuid probe is built with the host's C compiler)");
    assert!(out.status.success(), "gcc: {}", text(&out.stderr));
    bin
}

/// The rig with the probe image imported too.
fn conformance_rig(tag: &str) -> (Rig, PathBuf) {
    let rig = rig(tag);
    let probe = probe_binary();
    let cache = target_dir().join("nutshell").join("bench-images");
    let tarball = image::busybox_image(PROBE_IMAGE)
        .unwrap()
        .file(&probe, "/bin/probe", 0o4755)
        .unwrap()
        .tarball(&cache)
        .unwrap();
    import(&rig, &tarball, PROBE_IMAGE);
    (rig, probe)
}

/// Imports an image archive into the rig's containerd and waits until the CRI lists it.
fn import(rig: &Rig, tarball: &Path, name: &str) {
    rig.containerd.ctr().import_image(tarball).unwrap();
    let mut cri = CriClient::connect(rig.containerd.address()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cri.image_present(name).unwrap() {
        assert!(Instant::now() < deadline, "the CRI does not see {name}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A pod with these PID and IPC modes (on the rig's CNI network, see the module doc).
fn pod_with(
    rig: &Rig,
    name: &str,
    pid: cri::NamespaceMode,
    ipc: cri::NamespaceMode,
) -> cri::PodSandboxConfig {
    let mut pod = rig.pod(name);
    let ns = namespace_modes(&mut pod);
    ns.pid = pid as i32;
    ns.ipc = ipc as i32;
    pod
}

/// A container of `pod` as kubelet makes it: the pod's namespace modes in its own security
/// context.
fn container_in(
    pod: &cri::PodSandboxConfig,
    name: &str,
    image: &str,
    command: &[&str],
) -> cri::ContainerConfig {
    let mut c = container_config(name, image, command, &format!("{name}.log"));
    let ns = pod
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone());
    c.linux.as_mut().unwrap().security_context = Some(cri::LinuxContainerSecurityContext {
        namespace_options: ns,
        ..Default::default()
    });
    c
}

/// The security context [`container_in`] gave `c`.
fn security(c: &mut cri::ContainerConfig) -> &mut cri::LinuxContainerSecurityContext {
    c.linux.as_mut().unwrap().security_context.as_mut().unwrap()
}

fn run(
    rig: &mut Rig,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    c: &cri::ContainerConfig,
) -> String {
    let id = rig.cri.create_container(pod, c, pod_cfg).unwrap();
    rig.cri.start_container(&id).unwrap();
    id
}

/// Creates and starts the container `name` of `pod` running `command` in the probe image.
fn start(
    rig: &mut Rig,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    name: &str,
    command: &[&str],
) -> String {
    run(
        rig,
        pod,
        pod_cfg,
        &container_in(pod_cfg, name, PROBE_IMAGE, command),
    )
}

fn exec(rig: &mut Rig, id: &str, cmd: &[&str]) -> String {
    let r = rig
        .cri
        .exec_sync(id, cmd, Duration::from_secs(180))
        .unwrap();
    assert_eq!(r.exit_code, 0, "{cmd:?}: {}", text(&r.stderr));
    text(&r.stdout)
}

/// The command lines of every process the container sees.
fn cmdlines(rig: &mut Rig, id: &str) -> String {
    exec(
        rig,
        id,
        &[
            "sh",
            "-c",
            "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done",
        ],
    )
}

/// The log lines of a container once it has exited.
fn log_of(rig: &mut Rig, id: &str, log: &str) -> Vec<(String, String)> {
    rig.cri.wait_exited(id, Duration::from_secs(180)).unwrap();
    parse_cri_log(&std::fs::read_to_string(rig.log_dir.join(log)).unwrap()).unwrap()
}

fn remove_pod(rig: &mut Rig, pod: &str) {
    rig.cri.stop_pod_sandbox(pod).unwrap();
    rig.cri.remove_pod_sandbox(pod).unwrap();
}

/// A mount point of the test's own, made shared (containerd accepts `rslave` volumes of
/// shared or slave mounts only), unmounted with everything under it on drop.
struct SharedDir(PathBuf);

impl SharedDir {
    fn new(path: &Path) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["--bind"])
            .arg(path)
            .arg(path)
            .status()
            .unwrap()
            .success()
            && Command::new("mount")
                .arg("--make-shared")
                .arg(path)
                .status()
                .unwrap()
                .success();
        assert!(ok, "cannot make {} a shared mount", path.display());
        SharedDir(path.to_path_buf())
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-R").arg(&self.0).status();
    }
}

/// Pod sysctls (safe, "unsafe" and not namespaced) read back in a container; POD PID mode
/// (`shareProcessNamespace`): the containers see each other's processes and the pod init as
/// PID 1; a host mount made after the start appears under an `rslave` volume.
#[test]
#[ignore = "slow lane: needs root, containerd, KVM and the guest kernel (scripts/test.sh runs it)"]
fn pod_sysctls_shared_pids_and_host_mounts_under_rslave_volumes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let (mut rig, _) = conformance_rig("sysctl");
    let mut pod_cfg = pod_with(
        &rig,
        "nutshell-sysctl",
        cri::NamespaceMode::Pod,
        cri::NamespaceMode::Pod,
    );
    pod_cfg.linux.as_mut().unwrap().sysctls = [
        ("kernel.shm_rmid_forced", "1"),
        ("fs.mqueue.msg_max", "100"),
        ("vm.overcommit_ratio", "61"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .into();
    pod_cfg.hostname = "nutshell-uts-pod".into();
    let pod = rig.cri.run_pod_sandbox(&pod_cfg, HANDLER).unwrap();

    // A volume of a shared host mount, propagated host → container.
    let vol = SharedDir::new(&rig.log_dir.with_file_name("volume"));
    std::fs::create_dir_all(vol.0.join("later")).unwrap();
    let mut first = container_in(
        &pod_cfg,
        "first",
        PROBE_IMAGE,
        &["sh", "-c", "exec sleep 2147483647"],
    );
    first.mounts = vec![cri::Mount {
        container_path: "/vol".into(),
        host_path: vol.0.display().to_string(),
        propagation: cri::MountPropagation::PropagationHostToContainer as i32,
        ..Default::default()
    }];
    let t = Instant::now();
    let first = run(&mut rig, &pod, &pod_cfg, &first);
    let create_start = t.elapsed();
    let second = start(&mut rig, &pod, &pod_cfg, "second", &["sleep", "1000000"]);

    let t = Instant::now();
    let values = exec(
        &mut rig,
        &first,
        &[
            "cat",
            "/proc/sys/kernel/shm_rmid_forced",
            "/proc/sys/fs/mqueue/msg_max",
            "/proc/sys/vm/overcommit_ratio",
        ],
    );
    let exec_time = t.elapsed();
    assert_eq!(values, "1\n100\n61\n", "sysctls in the first container");
    // The IPC ones are the pod's: the second container sees them too.
    let values = exec(
        &mut rig,
        &second,
        &[
            "cat",
            "/proc/sys/kernel/shm_rmid_forced",
            "/proc/sys/fs/mqueue/msg_max",
        ],
    );
    assert_eq!(values, "1\n100\n", "sysctls in the second container");
    // UTS in POD mode: both containers are in the pod's namespace, named as the pod.
    for c in [&first, &second] {
        assert_eq!(
            exec(&mut rig, c, &["hostname"]),
            "nutshell-uts-pod\n",
            "hostname"
        );
    }

    // POD PID mode: one namespace, the pod init its PID 1, both containers' processes in it.
    let seen = cmdlines(&mut rig, &second);
    assert!(seen.contains("sleep 2147483647"), "{seen}");
    assert!(seen.contains("sleep 1000000"), "{seen}");
    let comm = exec(&mut rig, &first, &["cat", "/proc/1/comm"]);
    assert_eq!(comm.trim(), "pod-init");

    // A host mount made now, under the volume's source, appears in the container.
    let later = vol.0.join("later");
    assert!(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "nutshell-later"])
        .arg(&later)
        .status()
        .unwrap()
        .success());
    std::fs::write(later.join("hello"), "from-the-host\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = rig
            .cri
            .exec_sync(
                &first,
                &["cat", "/vol/later/hello"],
                Duration::from_secs(120),
            )
            .unwrap();
        if r.exit_code == 0 {
            assert_eq!(text(&r.stdout), "from-the-host\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the host's mount never appeared: {}",
            text(&r.stderr)
        );
        std::thread::sleep(Duration::from_secs(2));
    }

    // Exec latency: the median of 5 ExecSyncs of `true`.
    let mut execs: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            exec(&mut rig, &second, &["true"]);
            t.elapsed()
        })
        .collect();
    execs.sort();
    let exec_median = execs[2];

    remove_pod(&mut rig, &pod);
    // Nothing of the container's went back to the host: the mount is still there.
    assert_eq!(
        std::fs::read_to_string(later.join("hello")).unwrap(),
        "from-the-host\n"
    );
    drop(vol);
    rig.assert_nothing_left();
    eprintln!(
        "conformance figures: Create+Start {:.2} s, first ExecSync {:.2} s, ExecSync of `true` \
         median of 5 {:.2} s (min {:.2}, max {:.2}); test {:.1} s",
        create_start.as_secs_f64(),
        exec_time.as_secs_f64(),
        exec_median.as_secs_f64(),
        execs[0].as_secs_f64(),
        execs[4].as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// A node System V segment the test made on the host, removed on drop.
struct HostSegment {
    probe: PathBuf,
    key: &'static str,
}

impl Drop for HostSegment {
    fn drop(&mut self) {
        let _ = Command::new(&self.probe).args(["rmshm", self.key]).status();
    }
}

/// hostPID and hostIPC mean the VM's root namespaces: the containers see each other's
/// processes and System V segments, and never the node's.
#[test]
#[ignore = "slow lane: needs root, containerd, KVM and the guest kernel (scripts/test.sh runs it)"]
fn host_pid_and_ipc_are_the_vms() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let (mut rig, probe) = conformance_rig("hostns");
    // A segment on the node that no pod may see.
    let node_key = "0x4e555401";
    let out = Command::new(&probe)
        .args(["shm", node_key])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _segment = HostSegment {
        probe: probe.clone(),
        key: node_key,
    };

    let pod_cfg = pod_with(
        &rig,
        "nutshell-hostns",
        cri::NamespaceMode::Node,
        cri::NamespaceMode::Node,
    );
    let pod = rig.cri.run_pod_sandbox(&pod_cfg, HANDLER).unwrap();
    let first = start(&mut rig, &pod, &pod_cfg, "first", &["sleep", "2147483647"]);
    let second = start(&mut rig, &pod, &pod_cfg, "second", &["sleep", "1000000"]);
    // hostPID: the second container sees the first's process, and the agent as PID 1.
    let seen = cmdlines(&mut rig, &second);
    assert!(seen.contains("sleep 2147483647"), "{seen}");
    let init = exec(&mut rig, &second, &["cat", "/proc/1/comm"]);
    assert_eq!(init.trim(), "init", "PID 1 of the VM is the agent (/init)");

    // hostIPC: a segment made in one container is seen in the other; the node's is not.
    let key = "0x4e555402";
    exec(&mut rig, &first, &["probe", "shm", key]);
    let found = exec(&mut rig, &second, &["probe", "shmget", key]);
    assert!(found.starts_with("shmid="), "{found}");
    let r = rig
        .cri
        .exec_sync(
            &second,
            &["probe", "shmget", node_key],
            Duration::from_secs(180),
        )
        .unwrap();
    assert_eq!(
        r.exit_code,
        2,
        "the node's segment reached the pod: {}",
        text(&r.stdout)
    );

    remove_pod(&mut rig, &pod);
    rig.assert_nothing_left();
    eprintln!(
        "host namespaces test {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// CONTAINER PID mode (the default in Kubernetes): the container's init is PID 1 as an exec
/// sees it; TARGET is refused clearly; setuid works with `no_new_privs` false and not with it
/// true; StopContainer right after StartContainer does not wait out the grace period.
#[test]
#[ignore = "slow lane: needs root, containerd, KVM and the guest kernel (scripts/test.sh runs it)"]
fn container_pid_mode_setuid_and_stop_right_after_start() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let (mut rig, _) = conformance_rig("own");
    let pod_cfg = pod_with(
        &rig,
        "nutshell-own",
        cri::NamespaceMode::Container,
        cri::NamespaceMode::Pod,
    );
    let pod = rig.cri.run_pod_sandbox(&pod_cfg, HANDLER).unwrap();

    let main = start(&mut rig, &pod, &pod_cfg, "main", &["sleep", "2147483647"]);
    let pid1 = exec(
        &mut rig,
        &main,
        &["sh", "-c", "tr '\\0' ' ' < /proc/1/cmdline"],
    );
    assert_eq!(pid1.trim(), "sleep 2147483647");

    // TARGET (kubectl debug --target=main): refused with a clear error, nothing left.
    let mut debug = container_in(&pod_cfg, "debug", PROBE_IMAGE, &["sleep", "1000"]);
    let ns = security(&mut debug).namespace_options.as_mut().unwrap();
    ns.pid = cri::NamespaceMode::Target as i32;
    ns.target_id = main.clone();
    // containerd's CreateContainer only records it; the shim meets it at StartContainer.
    let debug = rig.cri.create_container(&pod, &debug, &pod_cfg).unwrap();
    let err = rig.cri.start_container(&debug).unwrap_err().to_string();
    assert!(err.contains("TARGET"), "{err}");

    // setuid root, run as uid 1000: euid 0 unless no_new_privs.
    for (no_new_privs, want) in [(false, "uid=1000 euid=0"), (true, "uid=1000 euid=1000")] {
        let name = format!("suid-{no_new_privs}");
        let mut c = container_in(&pod_cfg, &name, PROBE_IMAGE, &["/bin/probe", "ids"]);
        let sc = security(&mut c);
        sc.run_as_user = Some(cri::Int64Value { value: 1000 });
        sc.no_new_privs = no_new_privs;
        let id = run(&mut rig, &pod, &pod_cfg, &c);
        let log = log_of(&mut rig, &id, &format!("{name}.log"));
        assert_eq!(
            log,
            vec![("stdout".to_owned(), want.to_owned())],
            "no_new_privs {no_new_privs}"
        );
    }

    // StopContainer with 60 s of grace right after StartContainer returned: the shell's trap
    // is not installed yet when SIGTERM comes.
    let stop = container_in(
        &pod_cfg,
        "stop",
        PROBE_IMAGE,
        &["sh", "-c", "trap 'exit 42' TERM; while :; do sleep 1; done"],
    );
    let id = run(&mut rig, &pod, &pod_cfg, &stop);
    let t = Instant::now();
    rig.cri
        .stop_container(&id, Duration::from_secs(60))
        .unwrap();
    let stopped = t.elapsed();
    let (state, code) = rig.cri.container_state(&id).unwrap();
    assert_eq!(state, cri::ContainerState::ContainerExited);
    assert_eq!(
        code, 42,
        "the trap ran (not SIGKILL after the grace period)"
    );
    assert!(
        stopped < Duration::from_secs(30),
        "StopContainer took {stopped:?}"
    );

    remove_pod(&mut rig, &pod);
    rig.assert_nothing_left();
    eprintln!(
        "stop right after start: {:.2} s; test {:.1} s",
        stopped.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// The image of the network-kernel check: busybox plus the host's iproute2 and iptables (the
/// legacy and nf_tables back ends with every xtables extension).
const NET_IMAGE: &str = "docker.io/nutshell/e2e-netkernel:1";

fn net_image_tarball() -> PathBuf {
    let ip = image::host_binary("ip (iproute2)", &["/usr/bin/ip", "/sbin/ip"]).unwrap();
    let legacy = image::host_binary("iptables", &["/usr/sbin/xtables-legacy-multi"]).unwrap();
    let nft = image::host_binary("iptables", &["/usr/sbin/xtables-nft-multi"]).unwrap();
    let mut spec = image::busybox_image(NET_IMAGE)
        .unwrap()
        .binary(&ip, "/usr/local/sbin/ip")
        .unwrap()
        .binary(&legacy, "/usr/sbin/xtables-legacy-multi")
        .unwrap()
        .binary(&nft, "/usr/sbin/xtables-nft-multi")
        .unwrap()
        .dir("/run", 0o755)
        .unwrap();
    for (link, target) in [
        ("iptables-legacy", "xtables-legacy-multi"),
        ("ip6tables-legacy", "xtables-legacy-multi"),
        ("iptables-nft", "xtables-nft-multi"),
        ("ip6tables-nft", "xtables-nft-multi"),
    ] {
        spec = spec.symlink(&format!("/usr/sbin/{link}"), target).unwrap();
    }
    let ext = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    let mut libs: Vec<PathBuf> = std::fs::read_dir(ext)
        .expect("the host's xtables extensions (package iptables)")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "so"))
        .collect();
    libs.sort();
    for lib in libs {
        let inside = lib.to_string_lossy().into_owned();
        spec = spec.binary(&lib, &inside).unwrap();
    }
    spec.tarball(&target_dir().join("nutshell").join("bench-images"))
        .unwrap()
}

/// Runs `script` with `sh -e` in the container and returns its output; a failing step fails
/// the test with the step's output.
fn sh(rig: &mut Rig, id: &str, script: &str) -> String {
    let r = rig
        .cri
        .exec_sync(id, &["sh", "-ec", script], Duration::from_secs(300))
        .unwrap();
    let out = format!("{}{}", text(&r.stdout), text(&r.stderr));
    assert_eq!(r.exit_code, 0, "{script}\n{out}");
    out
}

/// What privileged and CAP_NET_ADMIN pods build inside their VM's kernel (issue 17 item 4): a
/// bridge with a veth, tun, dummy, macvlan, ipvlan, VLAN and VXLAN links, IPv6 addresses,
/// policy routing, packet sockets, an overlay mount; iptables rules of the kinds service meshes
/// and kube-proxy write (REDIRECT, owner, conntrack, MASQUERADE, statistic, MARK), IPv4 and IPv6,
/// through both the legacy and the nf_tables back ends, in a container with only CAP_NET_ADMIN.
#[test]
#[ignore = "slow lane: needs root, containerd, KVM and the guest kernel (scripts/test.sh runs it)"]
fn guest_kernel_has_what_network_pods_use() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut rig = rig("netkernel");
    import(&rig, &net_image_tarball(), NET_IMAGE);

    // containerd admits a privileged container only in a privileged sandbox.
    let mut pod_cfg = rig.pod("nutshell-netkernel");
    pod_cfg
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .privileged = true;
    let pod = rig.cri.run_pod_sandbox(&pod_cfg, HANDLER).unwrap();

    let mut privileged = container_in(&pod_cfg, "links", NET_IMAGE, &["sleep", "2147483647"]);
    security(&mut privileged).privileged = true;
    let links = run(&mut rig, &pod, &pod_cfg, &privileged);
    let ip = "/usr/local/sbin/ip";
    sh(
        &mut rig,
        &links,
        &format!(
            "{ip} link add nsbr0 type bridge
             {ip} link add nsv0 type veth peer name nsv1
             {ip} link set nsv0 master nsbr0
             {ip} link set nsbr0 up
             {ip} link add nsd0 type dummy
             {ip} link set nsd0 up
             {ip} link add link nsd0 name nsmv0 type macvlan mode bridge
             {ip} link add nsd1 type dummy
             {ip} link add link nsd1 name nsiv0 type ipvlan mode l2
             {ip} link add link nsd0 name nsd0.10 type vlan id 10
             {ip} link add nsvx0 type vxlan id 42 dstport 4789 dev nsd0
             [ -e /dev/net/tun ] || {{ mkdir -p /dev/net; mknod /dev/net/tun c 10 200; }}
             {ip} tuntap add nstun0 mode tun
             {ip} -6 addr add fd00:4e53::1/64 dev nsd0
             {ip} rule add from 10.123.0.0/16 table 123
             {ip} -6 rule add from fd00:4e53::/64 table 123
             test -e /proc/net/packet
             test -e /proc/sys/net/bridge/bridge-nf-call-iptables
             mkdir -p /tmp/ov/l /tmp/ov/u /tmp/ov/w /tmp/ov/m
             echo lower > /tmp/ov/l/f
             mount -t tmpfs tmpfs /tmp/ov/u
             mkdir /tmp/ov/u/u /tmp/ov/u/w
             mount -t overlay overlay -o lowerdir=/tmp/ov/l,upperdir=/tmp/ov/u/u,workdir=/tmp/ov/u/w /tmp/ov/m
             echo upper >> /tmp/ov/m/f
             cat /tmp/ov/m/f"
        ),
    );
    let shown = sh(&mut rig, &links, &format!("{ip} -d link show"));
    for kind in [
        "bridge", "veth", "dummy", "macvlan", "ipvlan", "vlan", "vxlan", "tun",
    ] {
        assert!(shown.contains(kind), "no {kind} link in:\n{shown}");
    }
    let rules = sh(&mut rig, &links, &format!("{ip} rule; {ip} -6 rule"));
    assert_eq!(rules.matches("lookup 123").count(), 2, "{rules}");

    // CAP_NET_ADMIN (and the default set with CAP_NET_RAW), not privileged: the rules an Istio
    // init container, kube-proxy and CNI tools write, in the pod's network namespace.
    let mut admin = container_in(&pod_cfg, "rules", NET_IMAGE, &["sleep", "2147483647"]);
    security(&mut admin).capabilities = Some(cri::Capability {
        add_capabilities: vec!["CAP_NET_ADMIN".to_owned()],
        ..Default::default()
    });
    let rules_id = run(&mut rig, &pod, &pod_cfg, &admin);
    for backend in ["legacy", "nft"] {
        for (family, cmd) in [("4", "iptables"), ("6", "ip6tables")] {
            let t = format!("/usr/sbin/{cmd}-{backend}");
            let masq_src = if family == "4" {
                "10.123.0.0/16"
            } else {
                "fd00:4e53::/64"
            };
            sh(
                &mut rig,
                &rules_id,
                &format!(
                    "{t} -t nat -N NS_REDIRECT
                     {t} -t nat -A NS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
                     {t} -t nat -A OUTPUT -p tcp -m owner --uid-owner 1337 -j RETURN
                     {t} -t nat -A OUTPUT -p tcp -m multiport --dports 80,443 -m comment --comment nutshell -j NS_REDIRECT
                     {t} -t nat -A POSTROUTING -s {masq_src} -m addrtype ! --dst-type LOCAL -j MASQUERADE
                     {t} -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
                     {t} -A INPUT -p tcp --dport 9 -j REJECT
                     {t} -t mangle -A PREROUTING -m statistic --mode random --probability 0.5 -j MARK --set-mark 0x4e
                     {t} -t mangle -A PREROUTING -j CONNMARK --save-mark
                     {t} -t raw -A PREROUTING -p udp --dport 9 -j ACCEPT"
                ),
            );
            let listed = sh(
                &mut rig,
                &rules_id,
                &format!("{t} -S; {t} -t nat -S; {t} -t mangle -S"),
            );
            for want in [
                "--to-ports 15001",
                "--uid-owner 1337",
                "--dports 80,443",
                "-j MASQUERADE",
                "--probability 0.5",
                "--set-xmark 0x4e",
            ] {
                assert!(
                    listed.contains(want),
                    "{cmd}-{backend}: {want} not listed:\n{listed}"
                );
            }
        }
    }
    remove_pod(&mut rig, &pod);
    rig.assert_nothing_left();
    eprintln!(
        "network kernel features test {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

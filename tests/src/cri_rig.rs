//! The CRI end-to-end rig: a private containerd with the nutshell runtime handler, locally
//! built busybox and pause images imported, a CRI client, a cgroup parent, and a CNI bridge
//! network of its own (a Nutshell pod on the node's network is refused). Shared by the CRI
//! and the network end-to-end tests.
//!
//! No registry: the sandbox (pause) image and the app image are built locally from busybox
//! and imported into containerd's `k8s.io` namespace; the pause image's command is never run
//! (the nutshell shim's sandbox "process" is the VM), but containerd wants it to exist.
#![allow(clippy::unwrap_used)] // test support: a panic is the failure report
#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use nutshell_test_support::containerd::{
    shim_pids, CniNetwork, Containerd, ContainerdOptions, RuntimeSpec,
};
use nutshell_test_support::image;

use crate::{
    guest_artifact, left_under_run_dir, shim_binary, target_dir, template_cache, vmm_binary,
    vmms_under,
};
use nutshell_test_support::cri::{pod_config, CriClient};

pub const IMAGE: &str = "docker.io/nutshell/e2e-busybox:1";
pub const PAUSE: &str = "docker.io/nutshell/e2e-pause:1";
pub const HANDLER: &str = "nutshell";
/// The handler with the strict node policy (`deploy/config-untrusted.toml`).
pub const UNTRUSTED_HANDLER: &str = "nutshell-untrusted";
pub const NAMESPACE: &str = "k8s.io";
/// The cgroup hierarchies the VMM must be in (v1, this machine).
pub const CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];

pub static SERIAL: Mutex<()> = Mutex::new(());

/// Running, not gone and not a zombie.
pub fn alive(pid: u32) -> bool {
    nutshell_protocol::procfs::alive(pid)
}

/// `controller` → cgroup path of `pid` (v1 lines `N:controllers:path`).
pub fn cgroup_of(pid: u32, controller: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_owned())
    })
}

/// Removes what a failed test may leave of the pods' cgroup parent (empty cgroups only).
#[derive(Debug)]
pub struct CgroupGuard(String);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        for c in CONTROLLERS {
            let parent = Path::new("/sys/fs/cgroup").join(c).join(&self.0);
            if let Ok(entries) = std::fs::read_dir(&parent) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

/// A private containerd with the nutshell runtime handler, the images imported, and a CRI
/// client; everything is stopped and removed on drop (containerd first).
#[derive(Debug)]
pub struct Rig {
    /// The private containerd.
    pub containerd: Containerd,
    /// A CRI client connected to it.
    pub cri: CriClient,
    /// The shim's run directory.
    pub run_dir: PathBuf,
    /// The pods' log directory.
    pub log_dir: PathBuf,
    /// The pods' cgroup parent.
    pub cgroup_parent: String,
    /// The CNI network of the pods.
    pub cni: CniNetwork,
    /// What stands for kubelet's `/var/lib/kubelet` in the strict configuration of
    /// [`UNTRUSTED_HANDLER`] (a directory of the rig's own).
    pub kubelet_dir: PathBuf,
    _cgroups: CgroupGuard,
    _dir: tempfile::TempDir,
}

/// The strict configuration of [`UNTRUSTED_HANDLER`]: the shim's `base` configuration plus
/// `deploy/config-untrusted.toml` with containerd's default root and state directories
/// replaced by the private containerd's and kubelet's by `kubelet_dir`.
fn untrusted_config(base: &str, containerd: &Path, kubelet_dir: &Path) -> String {
    let deploy = crate::repo_root()
        .join("deploy")
        .join("config-untrusted.toml");
    let policy = std::fs::read_to_string(&deploy).unwrap();
    for default in [
        "/var/lib/containerd/",
        "/run/containerd/",
        "/var/lib/kubelet/",
    ] {
        assert!(
            policy.contains(default),
            "{} lost {default}",
            deploy.display()
        );
    }
    let policy = policy
        .replace(
            "/var/lib/containerd/",
            &format!("{}/root/", containerd.display()),
        )
        .replace(
            "/run/containerd/",
            &format!("{}/state/", containerd.display()),
        )
        .replace("/var/lib/kubelet/", &format!("{}/", kubelet_dir.display()));
    format!("{base}\n{policy}")
}

/// The runtime handlers a measurement compares, from `NUTSHELL_MEASURE_HANDLERS` (default
/// `nutshell`): their names, and the runtimes to register for those given as
/// `name=runtime_type` (e.g. `before=io.containerd.nutshellbefore.v2`, with a wrapper
/// `containerd-shim-nutshellbefore-v2` on `PATH` that runs an older build).
pub fn measure_handlers() -> (Vec<String>, Vec<RuntimeSpec>) {
    let handlers = std::env::var("NUTSHELL_MEASURE_HANDLERS").unwrap_or_else(|_| HANDLER.into());
    let mut names = Vec::new();
    let mut extra = Vec::new();
    for h in handlers.split(',').filter(|h| !h.is_empty()) {
        match h.split_once('=') {
            Some((name, runtime_type)) => {
                names.push(name.to_owned());
                extra.push(RuntimeSpec {
                    name: name.into(),
                    runtime_type: runtime_type.into(),
                    binary_name: None,
                    config_path: None,
                });
            }
            None => names.push(h.to_owned()),
        }
    }
    (names, extra)
}

/// A rig whose pods get their network from CNI (a bridge and subnet of the rig's own).
pub fn rig(tag: &str) -> Rig {
    rig_with(tag, Vec::new())
}

/// [`rig`] with `extra` runtime handlers registered beside Nutshell's two (e.g. an older
/// build of the shim as a second runtime, to compare the two in one run).
pub fn rig_with(tag: &str, extra: Vec<RuntimeSpec>) -> Rig {
    let cni = CniNetwork::for_this_process();
    let kernel = guest_artifact("vmlinux").unwrap();
    let initramfs = guest_artifact("initramfs.cpio").unwrap();
    let vmm = vmm_binary().unwrap();
    let shim = shim_binary().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let log_dir = dir.path().join("pods");
    std::fs::create_dir_all(&log_dir).unwrap();
    let config = dir.path().join("config.toml");
    let base_config = format!(
        "kernel = {:?}\ninitramfs = {:?}\nvmm = {:?}\nrun_dir = {:?}\n\
         boot_timeout_secs = 300\ntemplate_dir = {:?}\n",
        kernel,
        initramfs,
        vmm,
        run_dir,
        template_cache()
    );
    std::fs::write(&config, &base_config).unwrap();
    // The second handler's ConfigPath; written once containerd's directory is known.
    let untrusted = dir.path().join("config-untrusted.toml");
    let kubelet_dir = dir.path().join("kubelet");
    // containerd finds `containerd-shim-nutshell-v2` on its PATH and the shim reads its config
    // from NUTSHELL_CONFIG; both are inherited from this process, which starts containerd.
    let shim_dir = shim.parent().unwrap().display().to_string();
    let path = std::env::var("PATH").unwrap_or_default();
    if !path.split(':').any(|p| p == shim_dir) {
        std::env::set_var("PATH", format!("{shim_dir}:{path}"));
    }
    std::env::set_var("NUTSHELL_CONFIG", &config);

    let cache = target_dir().join("nutshell").join("bench-images");
    let app = image::busybox_image(IMAGE)
        .unwrap()
        .tarball(&cache)
        .unwrap();
    let pause = image::busybox_image(PAUSE)
        .unwrap()
        .cmd(&["/bin/sleep", "2147483647"])
        .tarball(&cache)
        .unwrap();
    let cgroup_parent = format!("nutshell-e2e-{tag}-{}", std::process::id());
    let guard = CgroupGuard(cgroup_parent.clone());
    let containerd = Containerd::start(&ContainerdOptions {
        namespace: NAMESPACE.into(),
        sandbox_image: Some(PAUSE.into()),
        cni: Some(cni.clone()),
        runtimes: [
            RuntimeSpec::nutshell(),
            RuntimeSpec {
                name: UNTRUSTED_HANDLER.into(),
                config_path: Some(untrusted.clone()),
                ..RuntimeSpec::nutshell()
            },
        ]
        .into_iter()
        .chain(extra)
        .collect(),
        ..ContainerdOptions::default()
    })
    .unwrap();
    std::fs::write(
        &untrusted,
        untrusted_config(&base_config, containerd.dir(), &kubelet_dir),
    )
    .unwrap();
    let ctr = containerd.ctr();
    ctr.import_image(&app).unwrap();
    ctr.import_image(&pause).unwrap();
    let mut cri = CriClient::connect(containerd.address()).unwrap();
    let version = cri.version().unwrap();
    assert_eq!(version.runtime_name, "containerd");
    // The CRI plugin learns about imported images from containerd's events.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(cri.image_present(IMAGE).unwrap() && cri.image_present(PAUSE).unwrap()) {
        assert!(Instant::now() < deadline, "the CRI does not see the images");
        std::thread::sleep(Duration::from_millis(200));
    }
    Rig {
        containerd,
        cri,
        run_dir,
        log_dir,
        cgroup_parent,
        cni,
        kubelet_dir,
        _cgroups: guard,
        _dir: dir,
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "containerd log (tail):\n{}",
                self.containerd.log_tail(30_000)
            );
        }
        // Pods a failed test left: their network namespaces (and the veths in them) outlive
        // containerd unless the CRI removes them, so the CRI removes them first.
        for pod in self.cri.list_pod_sandboxes().unwrap_or_default() {
            if let Err(e) = self
                .cri
                .stop_pod_sandbox(&pod)
                .and_then(|()| self.cri.remove_pod_sandbox(&pod))
            {
                eprintln!("remove pod {pod} left by the test: {e}");
            }
        }
    }
}

impl Rig {
    /// A pod with the rig's cgroup parent, on the rig's CNI network.
    pub fn pod(&self, name: &str) -> cri::PodSandboxConfig {
        let mut pod = pod_config(name, &format!("uid-{name}"), &self.log_dir);
        pod.linux.as_mut().unwrap().cgroup_parent = format!("/{}", self.cgroup_parent);
        pod
    }

    /// The shims serving the CRI's namespace.
    pub fn shims(&self) -> Vec<u32> {
        shim_pids(self.containerd.address(), NAMESPACE)
    }

    /// The one VMM of the pod (the only one under the rig's run directory).
    pub fn only_vmm(&self) -> u32 {
        let vmms = vmms_under(&self.run_dir);
        assert_eq!(vmms.len(), 1, "VMMs under {}", self.run_dir.display());
        vmms[0]
    }

    /// After RemovePodSandbox: no VMM, no shim, nothing under run_dir, no mount, no cgroup.
    pub fn assert_nothing_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(vmms_under(&self.run_dir).is_empty() && self.shims().is_empty())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(vmms_under(&self.run_dir), Vec::<u32>::new(), "VMM left");
        assert_eq!(self.shims(), Vec::<u32>::new(), "shim left");
        let left = left_under_run_dir(&self.run_dir);
        assert!(left.is_empty(), "left under run_dir: {left:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&*self.run_dir.to_string_lossy()),
            "mounts left under run_dir"
        );
        for c in CONTROLLERS {
            let dir = Path::new("/sys/fs/cgroup")
                .join(c)
                .join(&self.cgroup_parent);
            assert!(
                !dir.exists(),
                "cgroup {} left, with {:?}",
                dir.display(),
                std::fs::read_dir(&dir)
                    .map(|d| d
                        .flatten()
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.file_name())
                        .collect::<Vec<_>>())
                    .unwrap_or_default()
            );
        }
    }
}

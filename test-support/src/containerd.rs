//! A private containerd for tests and benchmarks, and a `ctr` wrapper bound to it.
//!
//! [`Containerd::start`] runs `containerd` with its own temporary root, state directory, socket
//! and config (CRI plugin enabled with `restrict_oom_score_adj = true`, because root lacks
//! `CAP_SYS_RESOURCE` on the development machines), waits until it answers, and stops it when
//! the value is dropped — also when a test panics: first every task it still runs is killed
//! and deleted (shims outlive containerd otherwise), then containerd gets SIGTERM by PID and,
//! if it does not exit in time, SIGKILL; mounts left under its directories are detached.
//!
//! ```no_run
//! use nutshell_test_support::containerd::{Containerd, ContainerdOptions};
//! let containerd = Containerd::start(&ContainerdOptions::default())?;
//! let ctr = containerd.ctr();
//! let out = ctr.output(&["version"])?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nutshell_protocol::procfs;

/// Errors of the containerd harness.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The run was interrupted ([`interrupt`]): `ctr` is not run any more.
    #[error("interrupted")]
    Interrupted,
    /// Creating the temporary directories or the config failed.
    #[error("cannot prepare containerd's directory {path}")]
    Prepare {
        /// The path that could not be written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `containerd` could not be spawned.
    #[error("cannot start {binary} (is containerd installed? scripts/setup.sh installs it)")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// containerd exited or did not answer in time.
    #[error("containerd did not become ready within {waited:?}: {log_tail}")]
    NotReady {
        /// How long we waited.
        waited: Duration,
        /// The end of containerd's log.
        log_tail: String,
    },
    /// `ctr` could not be run.
    #[error("cannot run ctr")]
    CtrSpawn(#[source] io::Error),
    /// `ctr` failed.
    #[error("ctr {args} failed ({status}): {stderr}")]
    CtrFailed {
        /// The arguments, space separated.
        args: String,
        /// Its exit status.
        status: String,
        /// The end of its standard error.
        stderr: String,
    },
}

/// A runtime that the private containerd registers (CRI `runtimes` table) and that `ctr run`
/// can select.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSpec {
    /// The runtime handler name (`runc`, `nutshell`, `runsc`).
    pub name: String,
    /// The shim's runtime type, e.g. `io.containerd.runc.v2`.
    pub runtime_type: String,
    /// An OCI runtime binary the runc shim should use instead of `runc` (for runsc).
    pub binary_name: Option<PathBuf>,
    /// The runtime option `ConfigPath` (a shim's configuration file, e.g. Nutshell's strict
    /// node policy for a second handler).
    pub config_path: Option<PathBuf>,
}

impl RuntimeSpec {
    /// runc through containerd's runc shim.
    pub fn runc() -> Self {
        RuntimeSpec {
            name: "runc".to_owned(),
            runtime_type: "io.containerd.runc.v2".to_owned(),
            binary_name: None,
            config_path: None,
        }
    }

    /// Nutshell's shim, `containerd-shim-nutshell-v2`.
    pub fn nutshell() -> Self {
        RuntimeSpec {
            name: "nutshell".to_owned(),
            runtime_type: "io.containerd.nutshell.v2".to_owned(),
            binary_name: None,
            config_path: None,
        }
    }

    /// gVisor: Debian's runsc has no containerd shim, so it runs as the runc shim's binary.
    /// `binary` is a wrapper that picks runsc's network (see [`runsc_wrapper`]).
    pub fn runsc(binary: PathBuf) -> Self {
        RuntimeSpec {
            name: "runsc".to_owned(),
            runtime_type: "io.containerd.runc.v2".to_owned(),
            binary_name: Some(binary),
            config_path: None,
        }
    }

    /// The shim binary containerd looks up on `PATH` for this runtime type
    /// (`io.containerd.nutshell.v2` → `containerd-shim-nutshell-v2`), if the type has that form.
    pub fn shim_binary_name(&self) -> Option<String> {
        let rest = self.runtime_type.strip_prefix("io.containerd.")?;
        let (name, version) = rest.rsplit_once('.')?;
        if name.is_empty() || version.is_empty() || name.contains('/') || version.contains('/') {
            return None;
        }
        Some(format!("containerd-shim-{name}-{version}"))
    }

    /// The extra `ctr run` arguments that select this runtime.
    pub fn ctr_run_args(&self) -> Vec<String> {
        let mut args = vec!["--runtime".to_owned(), self.runtime_type.clone()];
        if let Some(binary) = &self.binary_name {
            args.push("--runc-binary".to_owned());
            args.push(binary.to_string_lossy().into_owned());
        }
        args
    }
}

/// The script the runc shim runs as its OCI runtime for gVisor (Debian's runsc has no shim of
/// its own).
///
/// Network: a container whose spec names its network namespace by path (a CRI pod on the CNI
/// network: the pod's sandbox and its containers) runs with `--network=sandbox`, runsc's
/// default: `runsc start` of the pod's sandbox moves the addresses and routes of the pod's
/// `eth0` (CNI's veth) into gVisor's netstack, which then sends and receives on that veth
/// through a packet socket. Every other container (`ctr`'s, whose network namespace has no
/// path) runs with `--network=none`, loopback only: runsc never takes over an interface of the
/// host's. The wrapper reads the spec from `--bundle`, or from the directory of the runc
/// shim's `--log BUNDLE/log.json`; without either, `--network=none`.
///
/// The sandbox's `runsc start` runs in a private mount namespace of its own with an empty,
/// read-only tmpfs over `/proc/sys/net`. runsc 20221219 refuses to take over a network
/// namespace it takes for the host's, and it decides that by whether
/// `/proc/sys/net/core/rmem_default` exists (`isRootNS()` in runsc/sandbox/network.go: "only
/// exists in root network namespace"); Linux 6.18 has that sysctl in every network namespace,
/// so every pod failed ("cannot run with network enabled in root network namespace", while
/// runsc's debug log showed the sandbox started in the pod's namespace). The whole of
/// `/proc/sys/net` goes: `/proc/sys/net/core` is a directory per network namespace, and a
/// mount over the host's does not hide the one runsc sees after it has joined the pod's. That
/// mount namespace propagates nothing to the host and ends with `runsc start`, which starts no
/// process for a sandbox (the sandbox and its gofer were started by `create`, outside it).
/// runsc needs nothing else under `/proc/sys/net` there (it reads the interfaces through
/// netlink). A pod's other containers start without it: runsc sets up the network only when it
/// starts a sandbox. If the mount fails, `start` fails and says why in runsc's log.
///
/// `kill` with SIGKILL or SIGTERM of a container still created (its `start` failed), which
/// runsc refuses ("cannot signal container ... in state created"), deletes it instead (`runsc
/// delete --force`, as runc's kill ends a created container's init): otherwise a pod whose
/// sandbox failed to start could not be stopped, and its network namespace and veth stayed
/// behind.
///
/// `runsc start` gets `/dev/null` as its standard input, output and error. runsc hands a
/// sub-container (a CRI pod's containers after its sandbox) the stdio of `runsc start`, not of
/// `runsc create` as runc does, and the runc shim runs `start` with a pipe that it reads to its
/// end: the container held that pipe open, and `StartContainer` waited until the container
/// exited (seen: "CRI StartContainer: Cancelled: Timeout expired" after 300 s). So under runsc a
/// pod's containers get no stdio through the runc shim (gVisor's own shim,
/// `containerd-shim-runsc-v1`, which Debian does not package, passes it); runsc's errors still
/// reach the shim through its `--log` file. The sandbox and `ctr`'s containers (created as
/// sandboxes) keep the stdio they got at `create`.
///
/// A sub-container's `--pid-file` gets the PID of a waiter of the wrapper's instead of the one
/// runsc writes there (the sandbox's, which outlives the container: the shim never saw the
/// container exit, and `StopPodSandbox` waited for it until it timed out). The waiter, which
/// the shim reaps as its subreaper, polls `runsc state` until the container has started, then
/// `runsc wait`s for it and exits with its status (128 + the signal for a killed one).
///
/// A `kill` that fails because the sandbox is gone ("sandbox is not running") also says
/// "container not running", the words the runc shim takes for a process that has already
/// exited; otherwise containerd retried deleting the pod's sandbox for ever.
///
/// With `debug_dir`, runsc writes its debug logs there (`--debug --debug-log=DIR/`, one file per
/// command).
pub fn runsc_wrapper(runsc: &Path, debug_dir: Option<&Path>) -> String {
    let quote = |p: &Path| format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"));
    let debug = debug_dir
        .map(|d| format!(" --debug --debug-log={}/", quote(d)))
        .unwrap_or_default();
    format!(
        r#"#!/bin/sh
# runsc for containerd's runc shim, written by nutshell-bench: see runsc_wrapper().
bundle= log= start= create= kill= pidfile= root= id= prev= penult=
for arg in "$@"; do
    case "$prev" in
        --bundle|-bundle|-b) bundle=$arg ;;
        --log|-log) log=$arg ;;
        --pid-file|-pid-file) pidfile=$arg ;;
        --root|-root) root=$arg ;;
    esac
    case "$arg" in
        --bundle=*) bundle=${{arg#--bundle=}} ;;
        --log=*) log=${{arg#--log=}} ;;
        --pid-file=*) pidfile=${{arg#--pid-file=}} ;;
        --root=*) root=${{arg#--root=}} ;;
        start) start=1 ;;
        create) create=1 ;;
        kill) kill=1 ;;
    esac
    penult=$prev
    prev=$arg
    id=$arg
done
[ -n "$bundle" ] || [ -z "$log" ] || bundle=${{log%/*}}
net=none
if [ -n "$bundle" ] && grep -q '"type":"network","path":"' "$bundle/config.json" 2>/dev/null; then
    net=sandbox
fi
if [ -n "$start" ] && [ "$net" = sandbox ] &&
    ! grep -q '"io.kubernetes.cri.container-type":"container"' "$bundle/config.json"; then
    exec unshare --mount --propagation private sh -c '
        mount -t tmpfs -o ro,size=4k,mode=0555 nutshell-runsc-net /proc/sys/net || {{
            printf "%s\n" "{{\"level\":\"error\",\"msg\":\"runsc wrapper: cannot hide /proc/sys/net from runsc start\"}}" >>"$1"
            exit 1
        }}
        shift
        exec "$@"' runsc-start "${{log:-/dev/null}}" {runsc}{debug} --network=$net "$@" </dev/null >/dev/null 2>&1
fi
if [ -n "$start" ]; then
    exec {runsc}{debug} --network=$net "$@" </dev/null >/dev/null 2>&1
fi
if [ -n "$kill" ]; then
    out=$({runsc}{debug} --network=$net "$@" 2>&1) && exit 0
    status=$?
    printf '%s\n' "$out" >&2
    case "$out" in *"is not running"*) echo "container not running" >&2 ;; esac
    case "$out:$id" in
        *"in state created"*:9|*"in state created"*:15|*"in state created"*:*KILL|*"in state created"*:*TERM)
            {runsc}{debug} --network=$net --root "$root" delete --force "$penult" && exit 0 ;;
    esac
    exit $status
fi
if [ -n "$create" ] && [ -n "$pidfile" ] && [ -n "$root" ] &&
    grep -q '"io.kubernetes.cri.container-type":"container"' "$bundle/config.json" 2>/dev/null; then
    {runsc}{debug} --network=$net "$@" || exit $?
    (
        exec </dev/null >/dev/null 2>&1
        while :; do
            state=$({runsc} --root "$root" state "$id") || exit 255
            case "$state" in *'"status": "created"'*) sleep 0.1 ;; *) break ;; esac
        done
        ws=$({runsc} --root "$root" wait "$id" | sed -n 's/.*"exitStatus": *\([0-9]*\).*/\1/p')
        [ -n "$ws" ] || exit 255
        [ $((ws & 127)) -eq 0 ] || exit $((128 + (ws & 127)))
        exit $((ws >> 8))
    ) &
    printf '%s' "$!" >"$pidfile"
    exit 0
fi
exec {runsc}{debug} --network=$net "$@"
"#,
        runsc = quote(runsc),
    )
}

/// Where `name` is on `PATH`, if it is there.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The namespace containerd's CRI plugin keeps its images, pods and containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Makes the default namespaces of one process distinct.
static NEXT_NAMESPACE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How to start the private containerd.
#[derive(Debug, Clone)]
pub struct ContainerdOptions {
    /// The `containerd` binary.
    pub binary: PathBuf,
    /// The `ctr` binary.
    pub ctr_binary: PathBuf,
    /// The runtimes to register beyond runc, which is always there.
    pub runtimes: Vec<RuntimeSpec>,
    /// The `ctr` namespace; defaults to one unique to this process and options value, so that
    /// the cgroups of two harnesses never collide.
    pub namespace: String,
    /// How long to wait for containerd to answer.
    pub ready_timeout: Duration,
    /// Parent of the temporary directory (default: the system's temporary directory; the
    /// socket path must stay short).
    pub parent_dir: Option<PathBuf>,
    /// The CRI plugin's `sandbox_image` (the pause image). It must be in the `k8s.io`
    /// namespace before `RunPodSandbox`, or containerd tries to pull it; default: containerd's.
    pub sandbox_image: Option<String>,
    /// A CNI network for the CRI's pods; without one, pods must use the node's network.
    pub cni: Option<CniNetwork>,
}

/// A CNI bridge network of a private containerd's own: Debian's plugins, a bridge and an IPv4
/// subnet that no one else uses, the IPAM state in containerd's directory. The bridge (which
/// the bridge plugin creates on the host with the subnet's gateway address) is removed when
/// the containerd stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniNetwork {
    /// Where the plugins are (`bridge`, `host-local`, `loopback`, `portmap`).
    pub plugin_dir: PathBuf,
    /// The bridge's name (at most 15 bytes).
    pub bridge: String,
    /// The pods' IPv4 subnet, a /24: `10.231.N.0/24`.
    pub subnet_octet: u8,
}

impl CniNetwork {
    /// A network named after this process (`nsbr-<pid>`, `10.231.<pid % 250>.0/24`), on the
    /// plugins of Debian's `containernetworking-plugins`.
    pub fn for_this_process() -> Self {
        let pid = std::process::id();
        CniNetwork {
            plugin_dir: PathBuf::from("/usr/lib/cni"),
            bridge: format!("nsbr-{}", pid % 1_000_000),
            subnet_octet: (pid % 250) as u8,
        }
    }

    /// The pods' subnet.
    pub fn subnet(&self) -> String {
        format!("10.231.{}.0/24", self.subnet_octet)
    }

    /// The bridge's (gateway's) address.
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, 231, self.subnet_octet, 1)
    }

    /// The network's conflist (CNI 0.4.0: bridge with host-local IPAM, then portmap).
    pub fn conflist(&self, ipam_dir: &Path) -> String {
        serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "nutshell-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.subnet(), "gateway": self.gateway().to_string()}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": ipam_dir,
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
        .to_string()
    }

    /// Removes the bridge (nothing to do if it is gone).
    fn remove(&self) {
        let out = Command::new("ip")
            .args(["link", "del", "dev", &self.bridge])
            .stderr(Stdio::piped())
            .output();
        if let Ok(out) = out {
            let err = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() && !err.contains("Cannot find device") {
                log::warn!(
                    "cannot remove the CNI bridge {}: {}",
                    self.bridge,
                    err.trim()
                );
            }
        }
    }
}

impl Default for ContainerdOptions {
    /// runc and nutshell registered (add [`RuntimeSpec::runsc`] for gVisor), a namespace of
    /// its own, 30 s to become ready, under the system's temporary directory.
    fn default() -> Self {
        ContainerdOptions {
            binary: PathBuf::from("containerd"),
            ctr_binary: PathBuf::from("ctr"),
            runtimes: vec![RuntimeSpec::nutshell()],
            namespace: format!(
                "nutshell-{}-{}",
                std::process::id(),
                NEXT_NAMESPACE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            ready_timeout: Duration::from_secs(30),
            parent_dir: None,
            sandbox_image: None,
            cni: None,
        }
    }
}

/// A running private containerd; stopped (with every task it runs) on drop.
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    binary: PathBuf,
    config: PathBuf,
    ready_timeout: Duration,
    dir: Option<tempfile::TempDir>,
    address: PathBuf,
    namespace: String,
    ctr_binary: PathBuf,
    log: PathBuf,
    runtimes: Vec<RuntimeSpec>,
    cni: Option<CniNetwork>,
}

/// The containerd config: private paths, CRI plugin with `restrict_oom_score_adj`, runtimes,
/// and the sandbox (pause) image if one is given.
pub fn config_toml(
    dir: &Path,
    runtimes: &[RuntimeSpec],
    sandbox_image: Option<&str>,
    cni: Option<&CniNetwork>,
) -> String {
    use toml::{Table, Value};

    fn table<const N: usize>(entries: [(&str, Value); N]) -> Value {
        Value::Table(
            entries
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    }
    let path = |rel: &str| Value::from(dir.join(rel).to_string_lossy().into_owned());
    let cni_bin = cni.map_or_else(
        || path("cni/bin"),
        |c| Value::from(c.plugin_dir.to_string_lossy().into_owned()),
    );

    let mut all = vec![RuntimeSpec::runc()];
    all.extend(runtimes.iter().filter(|r| r.name != "runc").cloned());
    let mut runtime_tables = Table::new();
    for rt in &all {
        let mut entry = Table::new();
        entry.insert("runtime_type".into(), rt.runtime_type.clone().into());
        let mut options = Table::new();
        if let Some(binary) = &rt.binary_name {
            options.insert(
                "BinaryName".into(),
                binary.to_string_lossy().into_owned().into(),
            );
        }
        if let Some(config) = &rt.config_path {
            options.insert(
                "ConfigPath".into(),
                config.to_string_lossy().into_owned().into(),
            );
        }
        if !options.is_empty() {
            entry.insert("options".into(), Value::Table(options));
        }
        runtime_tables.insert(rt.name.clone(), Value::Table(entry));
    }

    let mut cri = Table::new();
    cri.insert("restrict_oom_score_adj".into(), true.into());
    cri.insert("disable_tcp_service".into(), true.into());
    cri.insert("stream_server_address".into(), "127.0.0.1".into());
    cri.insert("stream_server_port".into(), "0".into());
    cri.insert("enable_selinux".into(), false.into());
    if let Some(image) = sandbox_image {
        cri.insert("sandbox_image".into(), image.into());
    }
    cri.insert(
        "cni".into(),
        table([("bin_dir", cni_bin), ("conf_dir", path("cni/conf"))]),
    );
    cri.insert(
        "containerd".into(),
        table([
            ("default_runtime_name", "runc".into()),
            ("snapshotter", "overlayfs".into()),
            ("runtimes", Value::Table(runtime_tables)),
        ]),
    );

    let config = table([
        ("version", 2.into()),
        ("root", path("root")),
        ("state", path("state")),
        ("disabled_plugins", Value::Array(Vec::new())),
        ("grpc", table([("address", path("containerd.sock"))])),
        ("ttrpc", table([("address", path("containerd.sock.ttrpc"))])),
        (
            "debug",
            table([("address", "".into()), ("level", "info".into())]),
        ),
        ("metrics", table([("address", "".into())])),
        (
            "plugins",
            table([("io.containerd.grpc.v1.cri", Value::Table(cri))]),
        ),
    ]);
    // A table of strings, numbers and booleans always serializes.
    toml::to_string(&config).unwrap_or_default()
}

impl Containerd {
    /// Starts containerd and waits until `ctr version` answers.
    pub fn start(opts: &ContainerdOptions) -> Result<Self, ContainerdError> {
        let parent = opts.parent_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("nutshell-ctrd-")
            .tempdir_in(&parent)
            .map_err(|source| ContainerdError::Prepare {
                path: parent.clone(),
                source,
            })?;
        let prepare = |path: PathBuf, r: io::Result<()>| {
            r.map_err(|source| ContainerdError::Prepare { path, source })
        };
        for sub in ["root", "state", "cni/bin", "cni/conf"] {
            let p = dir.path().join(sub);
            prepare(p.clone(), fs::create_dir_all(&p))?;
        }
        let config = dir.path().join("config.toml");
        prepare(
            config.clone(),
            fs::write(
                &config,
                config_toml(
                    dir.path(),
                    &opts.runtimes,
                    opts.sandbox_image.as_deref(),
                    opts.cni.as_ref(),
                ),
            ),
        )?;
        if let Some(cni) = &opts.cni {
            let conf = dir.path().join("cni/conf/10-nutshell-test.conflist");
            let ipam = dir.path().join("cni/ipam");
            prepare(conf.clone(), fs::write(&conf, cni.conflist(&ipam)))?;
        }
        let log = dir.path().join("containerd.log");
        let child = spawn_daemon(&opts.binary, &config, &log)?;
        log::info!(
            "containerd started (pid {}) in {}",
            child.id(),
            dir.path().display()
        );
        let mut containerd = Containerd {
            child: Some(child),
            binary: opts.binary.clone(),
            config,
            ready_timeout: opts.ready_timeout,
            address: dir.path().join("containerd.sock"),
            dir: Some(dir),
            namespace: opts.namespace.clone(),
            ctr_binary: opts.ctr_binary.clone(),
            log,
            runtimes: opts.runtimes.clone(),
            cni: opts.cni.clone(),
        };
        containerd.wait_ready(opts.ready_timeout)?;
        Ok(containerd)
    }

    /// Stops the containerd process alone, as an operator's `systemctl restart containerd`
    /// does: SIGTERM, SIGKILL after 10 s. Shims and their tasks keep running (they are not
    /// containerd's children once started). Returns how long containerd took to exit.
    pub fn stop_daemon(&mut self) -> Duration {
        let started = Instant::now();
        if let Some(child) = self.child.take() {
            terminate(child);
        }
        started.elapsed()
    }

    /// Starts containerd again on the same root, state, socket and config (after
    /// [`Containerd::stop_daemon`]; a running one is stopped first) and waits until it
    /// answers; it reconnects to the shims that are still running.
    pub fn start_again(&mut self) -> Result<(), ContainerdError> {
        self.stop_daemon();
        let log = self.log.clone();
        let child = spawn_daemon(&self.binary, &self.config, &log)?;
        log::info!("containerd restarted (pid {})", child.id());
        self.child = Some(child);
        self.wait_ready(self.ready_timeout)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), ContainerdError> {
        let started = Instant::now();
        loop {
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(_))) | None => true,
                Some(Ok(None)) => false,
                Some(Err(_)) => true,
            };
            if !exited && self.address.exists() && self.ctr().output(&["version"]).is_ok() {
                log::info!("containerd ready after {:?}", started.elapsed());
                return Ok(());
            }
            if exited || started.elapsed() > timeout {
                return Err(ContainerdError::NotReady {
                    waited: started.elapsed(),
                    log_tail: self.log_tail(2000),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// The namespace the `ctr` wrapper uses.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The private directory (root, state, socket, config, log).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(tempfile::TempDir::path)
            .unwrap_or_else(|| Path::new("/nonexistent"))
    }

    /// containerd's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The CNI network of the CRI's pods, if it has one.
    pub fn cni(&self) -> Option<&CniNetwork> {
        self.cni.as_ref()
    }

    /// The runtimes registered beyond runc.
    pub fn runtimes(&self) -> &[RuntimeSpec] {
        &self.runtimes
    }

    /// The last `max` bytes of containerd's log.
    pub fn log_tail(&self, max: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        tail(&text, max).to_owned()
    }

    /// A `ctr` bound to this containerd's socket and namespace.
    pub fn ctr(&self) -> Ctr {
        self.ctr_in(&self.namespace)
    }

    /// A `ctr` bound to this containerd's socket and another namespace, e.g.
    /// [`CRI_NAMESPACE`] to import images for the CRI.
    pub fn ctr_in(&self, namespace: &str) -> Ctr {
        Ctr {
            binary: self.ctr_binary.clone(),
            address: self.address.clone(),
            namespace: namespace.to_owned(),
        }
    }

    /// The namespaces this harness cleans up: its own and the CRI's.
    fn owned_namespaces(&self) -> Vec<&str> {
        let mut namespaces = vec![self.namespace.as_str()];
        if self.namespace != CRI_NAMESPACE {
            namespaces.push(CRI_NAMESPACE);
        }
        namespaces
    }

    /// Kills and deletes every task and container in the namespace, and in the CRI's, where
    /// pods started through the CRI run (best effort).
    pub fn remove_all_containers(&self) {
        for namespace in self.owned_namespaces() {
            self.remove_all_containers_in(namespace);
        }
    }

    fn remove_all_containers_in(&self, namespace: &str) {
        let ctr = self.ctr_in(namespace);
        if let Ok(out) = ctr.output(&["tasks", "ls", "-q"]) {
            for id in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
                ctr.remove_container(id);
            }
        }
        if let Ok(out) = ctr.output(&["containers", "ls", "-q"]) {
            for id in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
                ctr.remove_container(id);
            }
        }
    }

    /// Stops containerd: tasks removed, SIGTERM, then SIGKILL after 10 s; shims still there
    /// (also of a containerd stopped by [`Containerd::stop_daemon`]) killed; mounts detached
    /// and the directory removed. Called by `Drop`.
    pub fn stop(&mut self) {
        if std::thread::panicking() {
            self.keep_diagnostics();
        }
        if let Some(child) = self.child.take() {
            self.stop_running(child);
        }
        // Shims of a stopped containerd (or that outlived it) are killed with their children.
        let shims: Vec<u32> = self
            .owned_namespaces()
            .into_iter()
            .flat_map(|ns| shim_pids(&self.address, ns))
            .collect();
        // A killed shim leaves its socket in /run/containerd/s, and containerd is not there
        // to run `shim delete` for it.
        let sockets: Vec<PathBuf> = shims.iter().filter_map(|&pid| shim_socket(pid)).collect();
        let tree = process_tree(&shims);
        for &pid in &tree {
            log::warn!("killing shim process {pid} left by containerd");
            signal(pid, Signal::SIGKILL);
        }
        // A process killed inside a system call (a shim mounting a rootfs) finishes it before
        // it dies: detaching before it is gone could miss its last mount.
        wait_gone(&tree, Duration::from_secs(10));
        for socket in sockets {
            if let Err(e) = fs::remove_file(&socket) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("cannot remove shim socket {}: {e}", socket.display());
                }
            }
        }
        if let Some(cni) = self.cni.take() {
            cni.remove();
        }
        if let Some(dir) = self.dir.take() {
            detach_mounts_under(dir.path());
            let path = dir.path().to_owned();
            if let Err(e) = dir.close() {
                log::warn!("cannot remove {}: {e}", path.display());
            }
        }
        remove_namespace_cgroups(Path::new(CGROUP_ROOT), &self.namespace);
    }

    /// What a failed run leaves for whoever reads its output (called by [`Containerd::stop`]
    /// when a test panics, and by a benchmark when a case fails): every process of containerd's
    /// tree and of its shims with each thread's state, kernel wait channel and current system
    /// call (where a hung call waits), on stderr; and, with `$NUTSHELL_KEEP_LOGS` set to a
    /// directory, that report and containerd's log (the shims log into it) copied there.
    pub fn keep_diagnostics(&self) {
        let mut roots: Vec<u32> = self.child.iter().map(Child::id).collect();
        for ns in self.owned_namespaces() {
            roots.extend(shim_pids(&self.address, ns));
        }
        let report = process_report(&process_tree(&roots));
        eprintln!("processes of the failed run's containerd and shims:\n{report}");
        let Some(keep) = std::env::var_os(KEEP_LOGS_ENV) else {
            return;
        };
        let name = self
            .dir
            .as_ref()
            .and_then(|d| d.path().file_name().map(|n| n.to_owned()))
            .unwrap_or_else(|| "containerd".into());
        let dest = PathBuf::from(keep).join(name);
        let kept = fs::create_dir_all(&dest)
            .and_then(|()| fs::copy(&self.log, dest.join("containerd.log")).map(drop))
            .and_then(|()| fs::write(dest.join("processes.txt"), &report));
        match kept {
            Ok(()) => eprintln!(
                "containerd's log and the process report kept in {}",
                dest.display()
            ),
            Err(e) => eprintln!("cannot keep the logs in {}: {e}", dest.display()),
        }
    }

    fn stop_running(&mut self, mut child: Child) {
        if matches!(child.try_wait(), Ok(None)) && !interrupted() {
            self.remove_all_containers();
            // A shim exits shortly after its last task is deleted; one that stays is killed
            // (by `stop`, after containerd is gone).
            let deadline = Instant::now() + Duration::from_secs(5);
            while self
                .owned_namespaces()
                .into_iter()
                .any(|ns| !shim_pids(&self.address, ns).is_empty())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        terminate(child);
    }
}

/// Where the cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Removes the cgroup `/<namespace>` that runc (and the Nutshell shim) create as the parent of
/// `ctr run`'s `/<namespace>/<id>` in every hierarchy under `root` (cgroup v1: one per
/// controller, and `unified`; v2: `root` itself) and leave behind, with the empty `<id>` ones a
/// killed shim left in it. Only empty ones go (rmdir refuses others); a missing one is fine.
pub fn remove_namespace_cgroups(root: &Path, namespace: &str) {
    if namespace.is_empty() || namespace.contains('/') || namespace.starts_with('.') {
        return;
    }
    let mut dirs = vec![root.join(namespace)];
    if let Ok(entries) = fs::read_dir(root) {
        dirs.extend(entries.flatten().map(|e| e.path().join(namespace)));
    }
    for dir in dirs {
        if let Ok(children) = fs::read_dir(&dir) {
            for child in children.flatten().filter(|c| c.path().is_dir()) {
                let _ = fs::remove_dir(child.path());
            }
        }
        match fs::remove_dir(&dir) {
            Ok(()) => log::debug!("removed cgroup {}", dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {}
            Err(e) => log::warn!("cannot remove cgroup {}: {e}", dir.display()),
        }
    }
}

/// The containerd daemons this process runs (PID, socket), for [`interrupt`].
static DAEMONS: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());
/// Set by [`interrupt`].
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn daemons() -> std::sync::MutexGuard<'static, Vec<(u32, PathBuf)>> {
    DAEMONS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Abandons the run (the benchmark's answer to SIGINT or SIGTERM): every containerd this process
/// runs gets SIGTERM and every `ctr` talking to one SIGKILL, so that whatever waits on them fails
/// at once, [`Ctr`] runs nothing more, and the owners' normal teardown (`Drop`) runs: shims and
/// their VMs killed, mounts detached, directories and cgroups removed. Safe to call from any
/// thread.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let daemons = daemons().clone();
    for (pid, _) in &daemons {
        signal(*pid, Signal::SIGTERM);
    }
    // A `ctr` that dials a containerd which is gone retries for ever.
    for pid in all_pids() {
        let Some(args) = cmdline(pid) else { continue };
        let ours = daemons
            .iter()
            .any(|(_, address)| has_flag(&args, "--address", &address.to_string_lossy()));
        if program_name(&args) == "ctr" && ours {
            signal(pid, Signal::SIGKILL);
        }
    }
}

/// The arguments of process `pid`, from `/proc/<pid>/cmdline`.
fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The file name of the program in `args` (its first element).
fn program_name(args: &[String]) -> &str {
    args.first()
        .and_then(|a| a.rsplit('/').next())
        .unwrap_or("")
}

/// The socket a shim process serves on: containerd starts it with `-socket unix://PATH`.
/// Only an absolute path to a socket file counts.
pub fn shim_socket(pid: u32) -> Option<PathBuf> {
    let args = cmdline(pid)?;
    let address = args.windows(2).find(|w| w[0] == "-socket")?[1].as_str();
    let path = Path::new(address.strip_prefix("unix://")?);
    let is_socket = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    (path.is_absolute() && is_socket).then(|| path.to_owned())
}

/// Whether `args` has `flag` followed by `value`.
fn has_flag(args: &[String], flag: &str, value: &str) -> bool {
    args.windows(2).any(|w| w[0] == flag && w[1] == value)
}

fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Whether [`interrupt`] was called.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The gRPC socket of the containerd whose config is `config` (both in its directory).
fn config_address(config: &Path) -> PathBuf {
    config.with_file_name("containerd.sock")
}

/// Starts `containerd --config CONFIG`, its output appended to `log`.
fn spawn_daemon(binary: &Path, config: &Path, log: &Path) -> Result<Child, ContainerdError> {
    let prepare = |source| ContainerdError::Prepare {
        path: log.to_owned(),
        source,
    };
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(prepare)?;
    let log_err = log_file.try_clone().map_err(prepare)?;
    let child = Command::new(binary)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .spawn()
        .map_err(|source| ContainerdError::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
    daemons().push((child.id(), config_address(config)));
    Ok(child)
}

/// SIGTERM to `child`, SIGKILL if it has not exited 10 s later; reaped.
fn terminate(mut child: Child) {
    daemons().retain(|(pid, _)| *pid != child.id());
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if matches!(child.try_wait(), Ok(None)) {
        log::warn!("containerd did not exit on SIGTERM; killing it");
        let _ = child.kill();
    }
    let _ = child.wait();
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until every process in `pids` has exited (gone or a zombie), at most `timeout`.
fn wait_gone(pids: &[u32], timeout: Duration) {
    let alive = |pid: &u32| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| procfs::parse_state(&stat))
            .is_some_and(|state| state != 'Z' && state != 'X')
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(alive).collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            log::warn!("processes {left:?} still alive {timeout:?} after SIGKILL");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Detaches every mount at or below `dir` (deepest first), so that removing it cannot reach
/// into a container's rootfs. Reads the mount table again after each pass (a mount can be
/// stacked on another, or appear under one being detached) until nothing is left under `dir`,
/// at most five passes.
pub fn detach_mounts_under(dir: &Path) {
    for _ in 0..5 {
        let Ok(mut mounts) = nutshell_protocol::mountinfo::mount_points() else {
            return;
        };
        mounts.retain(|p| p.starts_with(dir));
        if mounts.is_empty() {
            return;
        }
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            match nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) => log::debug!("detached {}", m.display()),
                Err(e) => log::warn!("cannot detach {}: {e}", m.display()),
            }
        }
    }
    log::warn!("mounts are still left under {}", dir.display());
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The shim processes of `namespace` on the containerd at `address` (by their command line:
/// containerd starts every shim with `-namespace NS … -address SOCKET`).
pub fn shim_pids(address: &Path, namespace: &str) -> Vec<u32> {
    let address = address.to_string_lossy();
    all_pids()
        .into_iter()
        .filter(|&pid| {
            cmdline(pid).is_some_and(|args| {
                program_name(&args).starts_with("containerd-shim")
                    && has_flag(&args, "-namespace", namespace)
                    && has_flag(&args, "-address", &address)
            })
        })
        .collect()
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The variable naming a directory where a failed run's containerd log and process report
/// are kept ([`Containerd::keep_diagnostics`]).
pub const KEEP_LOGS_ENV: &str = "NUTSHELL_KEEP_LOGS";

/// One line per process (pid, command line) and per thread (tid, name, state, wait channel,
/// the system call it is in: `/proc/PID/task/TID/{stat,wchan,syscall}`).
pub fn process_report(pids: &[u32]) -> String {
    let mut out = String::new();
    for &pid in pids {
        let args = cmdline(pid).unwrap_or_default().join(" ");
        let line = format!("{pid} {}", args.chars().take(300).collect::<String>());
        out.push_str(line.trim_end());
        out.push('\n');
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let t = task.path();
            let read = |f: &str| fs::read_to_string(t.join(f)).unwrap_or_default();
            let stat = read("stat");
            // `tid (comm) S ...`: the name may hold spaces and parentheses.
            let (name, state) = match (stat.find('('), stat.rfind(')')) {
                (Some(a), Some(b)) if a < b => (
                    &stat[a + 1..b],
                    stat[b + 1..].split_whitespace().next().unwrap_or("?"),
                ),
                _ => ("?", "?"),
            };
            out.push_str(&format!(
                "  {} {name} {state} wchan={} syscall={}\n",
                task.file_name().to_string_lossy(),
                read("wchan").trim(),
                read("syscall").split_whitespace().next().unwrap_or("?"),
            ));
        }
    }
    out
}

/// `roots` and all their descendants.
pub fn process_tree(roots: &[u32]) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, procfs::parse_ppid(&stat)?))
        })
        .collect();
    let mut tree: Vec<u32> = roots.to_vec();
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        for (pid, ppid) in &parents {
            if *ppid == parent && !tree.contains(pid) {
                tree.push(*pid);
            }
        }
        i += 1;
    }
    tree
}

/// `ctr` bound to one containerd socket and namespace.
#[derive(Debug, Clone)]
pub struct Ctr {
    binary: PathBuf,
    address: PathBuf,
    namespace: String,
}

impl Ctr {
    /// A `ctr` command with `--address` and `--namespace` set; add the subcommand's arguments.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ctr ARGS` to completion; its standard output on success.
    pub fn output(&self, args: &[&str]) -> Result<String, ContainerdError> {
        if interrupted() {
            return Err(ContainerdError::Interrupted);
        }
        let out = self
            .command()
            .args(args)
            .output()
            .map_err(ContainerdError::CtrSpawn)?;
        check(args, &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports an OCI image tarball (`ctr images import`), unpacked for the default snapshotter.
    pub fn import_image(&self, tarball: &Path) -> Result<String, ContainerdError> {
        let path = tarball.to_string_lossy();
        self.output(&["images", "import", &path])
    }

    /// Kills (SIGKILL) and deletes the task and the container `id`, ignoring what is not there.
    pub fn remove_container(&self, id: &str) {
        if interrupted() {
            return;
        }
        let quiet = |args: &[&str]| {
            let _ = self
                .command()
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&["tasks", "kill", "--signal", "SIGKILL", id]);
        // The task needs a moment to be reaped before it can be deleted.
        for _ in 0..50 {
            let ok = self
                .command()
                .args(["tasks", "delete", "--force", id])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .map(|o| {
                    o.status.success() || String::from_utf8_lossy(&o.stderr).contains("not found")
                })
                .unwrap_or(true);
            if ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        quiet(&["containers", "delete", id]);
        quiet(&["snapshots", "rm", id]);
    }
}

fn check(args: &[&str], out: &Output) -> Result<(), ContainerdError> {
    if out.status.success() {
        return Ok(());
    }
    Err(ContainerdError::CtrFailed {
        args: args.join(" "),
        status: out.status.to_string(),
        stderr: tail(String::from_utf8_lossy(&out.stderr).trim(), 2000).to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_tree_includes_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let tree = process_tree(&[me]);
        assert_eq!(tree[0], me);
        assert!(tree.contains(&child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn the_process_report_says_where_each_thread_waits() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // Until the child sleeps: its exec done and its clock_nanosleep(2) (230) entered. The
        // report reads the command line before the threads: one that caught the exec between
        // the two has an empty command line (the new program's arguments not set up yet) and
        // the sleeping thread, so it waits for both.
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        let report = loop {
            let report = process_report(&[pid]);
            let exec_done = report.starts_with(&format!("{pid} sleep 30\n"));
            if (exec_done && report.contains("syscall=230")) || Instant::now() > deadline {
                break report;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        child.kill().unwrap();
        child.wait().unwrap();
        let mut lines = report.lines();
        assert_eq!(
            lines.next(),
            Some(format!("{pid} sleep 30").as_str()),
            "{report}"
        );
        let thread = lines.next().unwrap_or_default();
        assert!(
            thread.starts_with(&format!("  {pid} sleep S wchan="))
                && thread.ends_with("syscall=230"),
            "{report}"
        );
        assert_eq!(process_report(&[u32::MAX]), format!("{}\n", u32::MAX));
    }

    #[test]
    fn namespace_cgroups_are_removed_when_empty_only() {
        let root = tempfile::tempdir().unwrap();
        for h in ["memory", "pids"] {
            fs::create_dir_all(root.path().join(h).join("ns1")).unwrap();
        }
        // An empty `<id>` cgroup (a killed shim's VMM had it) goes with its namespace.
        fs::create_dir_all(root.path().join("pids/ns1/killed-shim")).unwrap();
        // A cgroup with processes cannot be removed; a file in a plain directory stands in.
        fs::create_dir_all(root.path().join("cpu/ns1/still-running")).unwrap();
        fs::write(root.path().join("cpu/ns1/still-running/procs"), b"1").unwrap();
        fs::create_dir_all(root.path().join("memory/other")).unwrap();
        fs::write(root.path().join("cgroup.procs"), b"").unwrap();
        remove_namespace_cgroups(root.path(), "ns1");
        assert!(!root.path().join("memory/ns1").exists());
        assert!(!root.path().join("pids/ns1").exists());
        assert!(
            root.path().join("cpu/ns1/still-running").exists(),
            "not empty: kept"
        );
        assert!(
            root.path().join("memory/other").exists(),
            "another namespace: kept"
        );
        remove_namespace_cgroups(root.path(), "../memory");
        assert!(root.path().join("memory").exists(), "a bad name is ignored");
    }

    #[test]
    fn shim_binary_names_follow_containerd() {
        assert_eq!(
            RuntimeSpec::nutshell().shim_binary_name().as_deref(),
            Some("containerd-shim-nutshell-v2")
        );
        assert_eq!(
            RuntimeSpec::runc().shim_binary_name().as_deref(),
            Some("containerd-shim-runc-v2")
        );
        let odd = RuntimeSpec {
            name: "x".into(),
            runtime_type: "/usr/bin/x".into(),
            binary_name: None,
            config_path: None,
        };
        assert_eq!(odd.shim_binary_name(), None);
    }

    #[test]
    fn config_registers_runtimes_and_restricts_oom_score_adj() {
        let cfg = config_toml(
            Path::new("/tmp/x"),
            &[
                RuntimeSpec::nutshell(),
                RuntimeSpec::runsc(PathBuf::from("/tmp/x/runsc")),
            ],
            None,
            None,
        );
        let parsed: toml::Value = toml::from_str(&cfg).unwrap();
        let cri = &parsed["plugins"]["io.containerd.grpc.v1.cri"];
        let runtimes = &cri["containerd"]["runtimes"];
        assert_eq!(cri["restrict_oom_score_adj"].as_bool(), Some(true));
        assert_eq!(
            parsed["grpc"]["address"].as_str(),
            Some("/tmp/x/containerd.sock")
        );
        assert_eq!(
            runtimes["runc"]["runtime_type"].as_str(),
            Some("io.containerd.runc.v2")
        );
        assert_eq!(
            runtimes["nutshell"]["runtime_type"].as_str(),
            Some("io.containerd.nutshell.v2")
        );
        assert_eq!(
            runtimes["runsc"]["options"]["BinaryName"].as_str(),
            Some("/tmp/x/runsc")
        );
        let untrusted = RuntimeSpec {
            name: "nutshell-untrusted".into(),
            config_path: Some(PathBuf::from("/etc/nutshell/config-untrusted.toml")),
            ..RuntimeSpec::nutshell()
        };
        let cfg = config_toml(Path::new("/tmp/x"), &[untrusted], None, None);
        let parsed: toml::Value = toml::from_str(&cfg).unwrap();
        assert_eq!(
            parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
                ["nutshell-untrusted"]["options"]["ConfigPath"]
                .as_str(),
            Some("/etc/nutshell/config-untrusted.toml")
        );
        // runc is registered once even when asked for twice.
        let cfg = config_toml(Path::new("/d"), &[RuntimeSpec::runc()], None, None);
        assert_eq!(cfg.matches("runtimes.runc]").count(), 1, "{cfg}");
        assert!(!cfg.contains("sandbox_image"));
    }

    #[test]
    fn config_sets_the_sandbox_image_in_the_cri_plugin() {
        let cfg = config_toml(
            Path::new("/d"),
            &[RuntimeSpec::nutshell()],
            Some("docker.io/nutshell/pause:\"1"),
            None,
        );
        let parsed: toml::Value = toml::from_str(&cfg).unwrap();
        assert_eq!(
            parsed["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"].as_str(),
            Some("docker.io/nutshell/pause:\"1")
        );
    }

    #[test]
    fn a_cni_network_has_its_own_plugins_bridge_subnet_and_ipam_state() {
        let cni = CniNetwork {
            plugin_dir: PathBuf::from("/usr/lib/cni"),
            bridge: "nsbr-42".into(),
            subnet_octet: 42,
        };
        let cfg = config_toml(
            Path::new("/d"),
            &[RuntimeSpec::nutshell()],
            None,
            Some(&cni),
        );
        let parsed: toml::Value = toml::from_str(&cfg).unwrap();
        let section = &parsed["plugins"]["io.containerd.grpc.v1.cri"]["cni"];
        assert_eq!(section["bin_dir"].as_str(), Some("/usr/lib/cni"));
        assert_eq!(section["conf_dir"].as_str(), Some("/d/cni/conf"));
        let list: serde_json::Value =
            serde_json::from_str(&cni.conflist(Path::new("/d/cni/ipam"))).unwrap();
        let bridge = &list["plugins"][0];
        assert_eq!(bridge["bridge"], "nsbr-42");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.231.42.0/24");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["gateway"], "10.231.42.1");
        assert_eq!(bridge["ipam"]["dataDir"], "/d/cni/ipam");
        assert_eq!(list["plugins"][1]["type"], "portmap");
        assert!(CniNetwork::for_this_process().bridge.len() <= 15);
    }

    /// The wrapper for real, with a stand-in for runsc that prints its arguments (and, as root,
    /// whether it sees `/proc/sys/net/core/rmem_default`).
    #[test]
    fn the_runsc_wrapper_gives_cni_pods_runscs_network_and_other_containers_none() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake runsc");
        let seen = dir.path().join("seen");
        fs::write(
            &fake,
            format!(
                "#!/bin/sh\n\
                 case \"$*\" in *' kill '*) echo 'cannot signal container \"id\" in state \
                 created' >&2; exit 128 ;; esac\n\
                 echo \"$@\"\n\
                 if [ -e /proc/sys/net/core/rmem_default ]; then s=visible; else s=hidden; fi\n\
                 echo \"$s $*\" >'{}'\n",
                seen.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        let wrapper = dir.path().join("wrapper");
        fs::write(&wrapper, runsc_wrapper(&fake, None)).unwrap();
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
        let bundle = dir.path().join("bundle");
        let wrap = |spec: &str, args: &[&str]| {
            fs::create_dir_all(&bundle).unwrap();
            fs::write(bundle.join("config.json"), spec).unwrap();
            let out = Command::new(&wrapper)
                .args(
                    args.iter()
                        .map(|a| a.replace("BUNDLE", &bundle.to_string_lossy())),
                )
                .output()
                .unwrap();
            let stdout = String::from_utf8(out.stdout).unwrap().trim().to_owned();
            (out.status, stdout)
        };
        let run = |spec: &str, args: &[&str]| {
            let (status, out) = wrap(spec, args);
            assert!(status.success(), "{args:?}: {status:?} {out}");
            out
        };
        // containerd writes the spec as compact JSON.
        let cni = r#"{"annotations":{"io.kubernetes.cri.container-type":"sandbox"},"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1234"}]}}"#;
        let cni_app = r#"{"annotations":{"io.kubernetes.cri.container-type":"container"},"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/proc/42/ns/net"}]}}"#;
        let ctr = r#"{"linux":{"namespaces":[{"type":"pid"},{"type":"network"}]}}"#;
        let host = r#"{"linux":{"namespaces":[{"type":"pid"}]}}"#;
        let create = ["--root", "/r", "create", "--bundle", "BUNDLE", "id"];
        assert_eq!(
            run(cni, &create),
            format!(
                "--network=sandbox --root /r create --bundle {}/bundle id",
                dir.path().display()
            )
        );
        for spec in [ctr, host] {
            assert!(
                run(spec, &create).starts_with("--network=none --root"),
                "{spec}"
            );
        }
        // Other commands: the bundle from the runc shim's --log.
        let log = ["--root", "/r", "--log", "BUNDLE/log.json", "state", "id"];
        assert!(run(cni, &log).starts_with("--network=sandbox --root"));
        assert!(run(cni_app, &log).starts_with("--network=sandbox --root"));
        assert!(run(ctr, &log).starts_with("--network=none --root"));
        assert_eq!(run(cni, &["state", "id"]), "--network=none state id");
        // `start` runs with /dev/null for stdio: the stand-in's echo goes there, what it saw to
        // `seen`.
        let seen_by_start = |spec: &str| {
            let _ = fs::remove_file(&seen);
            let start = ["--root", "/r", "--log", "BUNDLE/log.json", "start", "id"];
            assert_eq!(run(spec, &start), "");
            fs::read_to_string(&seen).unwrap().trim().to_owned()
        };
        let args = format!(
            "--network=sandbox --root /r --log {}/bundle/log.json start id",
            dir.path().display()
        );
        assert_eq!(seen_by_start(cni_app), format!("visible {args}"));
        assert!(seen_by_start(ctr).starts_with("visible --network=none --root /r"));
        if nix::unistd::geteuid().is_root() {
            // The sandbox's start: /proc/sys/net hidden from runsc, and from it only.
            assert_eq!(seen_by_start(cni), format!("hidden {args}"));
            assert!(Path::new("/proc/sys/net/core/rmem_default").exists());
        } else {
            eprintln!("not root: the sandbox's start in a mount namespace of its own not run");
        }
        // A created container that runsc will not kill is deleted instead, for SIGKILL/SIGTERM.
        let kill = |spec: &str, signal: &str| {
            wrap(
                spec,
                &[
                    "--root",
                    "/r",
                    "--log",
                    "BUNDLE/log.json",
                    "kill",
                    "id",
                    signal,
                ],
            )
        };
        for signal in ["9", "15", "KILL", "SIGTERM"] {
            let (status, out) = kill(cni, signal);
            assert!(status.success(), "{signal}: {status:?}");
            assert_eq!(out, "--network=sandbox --root /r delete --force id");
        }
        let (status, out) = kill(ctr, "10");
        assert_eq!(status.code(), Some(128), "{out}");
        assert_eq!(out, "");
        assert!(runsc_wrapper(&fake, None).contains("\"$@\" </dev/null >/dev/null 2>&1\n"));
        let debug = runsc_wrapper(Path::new("/usr/bin/runsc"), Some(Path::new("/tmp/d")));
        assert!(
            debug.contains("exec '/usr/bin/runsc' --debug --debug-log='/tmp/d'/ --network=$net"),
            "{debug}"
        );
    }

    #[test]
    fn toml_keys_and_strings_are_escaped() {
        let odd = RuntimeSpec {
            name: "a.b".into(),
            runtime_type: "a\"b\\".into(),
            binary_name: None,
            config_path: None,
        };
        let cfg = config_toml(Path::new("/d"), &[odd], None, None);
        let parsed: toml::Value = toml::from_str(&cfg).unwrap();
        let runtimes = &parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
        assert_eq!(
            runtimes["a.b"]["runtime_type"].as_str(),
            Some("a\"b\\"),
            "{cfg}"
        );
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("ab", 10), "ab");
    }
}

//! Shared helpers of Nutshell's integration tests: where the guest artifacts are, and a
//! `nutshell-vmm` process that is always cleaned up.
//!
//! The slow-lane tests need the guest kernel and the test initramfs, which `scripts/setup.sh`
//! builds into `target/nutshell/`. They are `#[ignore]`d so that a plain `cargo test` stays
//! fast; `scripts/test.sh` runs them with `--include-ignored`.

/// The CRI client (in nutshell-test-support, shared with the benchmark, whose runner times the
/// CRI start-up path with it).
pub use nutshell_test_support::cri;
pub mod cri_rig;
pub mod guest;
pub mod soak;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nutshell_template::{Guest, VmmArgs};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// A guest artifact under `target/nutshell/`, or an error that says how to build it.
pub fn guest_artifact(name: &str) -> Result<PathBuf> {
    let path = target_dir().join("nutshell").join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: run scripts/setup.sh first (it builds the guest kernel and initramfs)",
            path.display()
        );
    }
    Ok(path)
}

/// The `nutshell-vmm` binary: `$NUTSHELL_VMM`, else the newest of the release and debug builds.
pub fn vmm_binary() -> Result<PathBuf> {
    built_binary("NUTSHELL_VMM", "nutshell-vmm")
}

/// The shim binary: `$NUTSHELL_SHIM`, else the newest of the release and debug builds.
pub fn shim_binary() -> Result<PathBuf> {
    built_binary("NUTSHELL_SHIM", "containerd-shim-nutshell-v2")
}

/// `$env`, else the newest of `target/{release,debug}/name`.
fn built_binary(env: &str, name: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let newest = ["release", "debug"]
        .iter()
        .map(|profile| target_dir().join(profile).join(name))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max();
    match newest {
        Some((_, p)) => Ok(p),
        None => bail!("{name} is not built: run scripts/setup.sh or cargo build -p {name}"),
    }
}

fn is_vmm(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == "nutshell-vmm")
        .unwrap_or(false)
}

/// The parent PID of `pid`, from `/proc/<pid>/status`.
pub fn parent_of(pid: u32) -> Option<u32> {
    proc_status_field(pid, "PPid")?.parse().ok()
}

/// One field of `/proc/<pid>/status` (e.g. `CapEff`, `NoNewPrivs`, `Seccomp`), trimmed.
pub fn proc_status_field(pid: u32, field: &str) -> Option<String> {
    status_field(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        field,
    )
}

/// One field of a `/proc/.../status` text.
pub fn status_field(status: &str, field: &str) -> Option<String> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == field).then(|| v.trim().to_owned())
    })
}

/// PIDs of the `nutshell-vmm` processes whose command line names `run_dir` (a sandbox's VMM
/// has its sockets there), for tests that check nothing is left running. A jailed VMM counts
/// once: the process the shim spawned (its supervisor), not the jailed child
/// ([`jailed_vmm`] finds that).
pub fn vmms_under(run_dir: &Path) -> Vec<u32> {
    let needle = run_dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .filter(|pid| is_vmm(*pid))
        .filter(|pid| !parent_of(*pid).is_some_and(is_vmm))
        .collect()
}

/// The jailed VMM of the supervisor `pid` (a `nutshell-vmm --jail`): its `nutshell-vmm` child.
pub fn jailed_vmm(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|p| is_vmm(*p))
}

/// CPU time (user + system, all threads) process `pid` has used, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .with_context(|| format!("malformed /proc/{pid}/stat: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| -> Result<u64> {
        let field = fields
            .get(i)
            .with_context(|| format!("short /proc/{pid}/stat: {stat}"))?;
        Ok(field.parse()?)
    };
    let per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
        .unwrap_or(100);
    Ok(Duration::from_millis(
        (ticks(11)? + ticks(12)?) * 1000 / per_sec,
    ))
}

/// The shim's node-wide VM start slots under `run_dir` (`start_gate` in the shim).
pub const START_SLOTS_DIR: &str = "start-slots";

/// What a shim run left under `run_dir`, for tests that check nothing is: every entry but the
/// start-slot files, which are the node's lasting state, and any slot that is still held (a
/// leaked slot would stall later VM starts).
pub fn left_under_run_dir(run_dir: &Path) -> Vec<String> {
    let mut left = Vec::new();
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return left;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if entry.file_name() != START_SLOTS_DIR {
            left.push(path.display().to_string());
            continue;
        }
        for slot in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            // The shim's slots are std file locks (flock(2)); closing `f` releases ours.
            let held = match std::fs::File::open(slot.path()) {
                Ok(f) => f.try_lock().is_err(),
                Err(_) => true,
            };
            if held {
                left.push(format!("{} (held)", slot.path().display()));
            }
        }
    }
    left
}

/// A boot of the real guest kernel under `nutshell-vmm`, built up option by option:
///
/// ```text
/// let vm = GuestBoot::new("initramfs.cpio").vcpus(2).cmdline("quiet").vsock(&uds).spawn()?;
/// ```
#[derive(Debug, Clone)]
pub struct GuestBoot {
    initramfs: &'static str,
    vcpus: u8,
    memory_mib: u64,
    cmdline: String,
    vsock_uds: Option<PathBuf>,
    shared_dir: Option<PathBuf>,
    template: bool,
}

/// For a measurement test: `None` (and a line saying how to run it) unless `NUTSHELL_MEASURE`
/// is set; else its number of runs, `NUTSHELL_MEASURE_RUNS` or `default`.
pub fn measure_runs(default: usize) -> Option<usize> {
    if std::env::var_os("NUTSHELL_MEASURE").is_none() {
        eprintln!("set NUTSHELL_MEASURE=1 to measure");
        return None;
    }
    Some(
        std::env::var("NUTSHELL_MEASURE_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// The agent-ready templates the slow lane shares: `target/nutshell/templates` (nutshell-template
/// keys them by kernel, initramfs, shape and the VMM's build, so a rebuild never restores a
/// stale one).
pub fn template_cache() -> PathBuf {
    target_dir().join("nutshell").join("templates")
}

impl GuestBoot {
    /// The guest kernel with `target/nutshell/<initramfs>`, 1 vCPU, 128 MiB, `quiet`.
    pub fn new(initramfs: &'static str) -> Self {
        GuestBoot {
            initramfs,
            vcpus: 1,
            memory_mib: 128,
            cmdline: "quiet".to_owned(),
            vsock_uds: None,
            shared_dir: None,
            template: false,
        }
    }

    /// Restore the VM from the agent-ready template in [`template_cache`] (built by the first
    /// caller: one boot) instead of booting it. The console then starts after the restore, so
    /// wait for the agent, not for its boot messages.
    pub fn from_template(mut self) -> Self {
        self.template = true;
        self
    }

    /// Number of vCPUs.
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = n;
        self
    }

    /// Guest memory.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// The user's kernel command line.
    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.to_owned();
        self
    }

    /// A vsock device with its hybrid socket at `uds`.
    pub fn vsock(mut self, uds: &Path) -> Self {
        self.vsock_uds = Some(uds.to_owned());
        self
    }

    /// A virtio-fs device exporting `dir` with the default tag (`nutshell`).
    pub fn shared_dir(mut self, dir: &Path) -> Self {
        self.shared_dir = Some(dir.to_owned());
        self
    }

    /// The `nutshell-vmm` arguments (the console is added by [`VmmProcess::spawn`]).
    pub fn args(&self) -> Result<Vec<String>> {
        let mut args = if self.template {
            VmmArgs::new().restore(&self.template()?)
        } else {
            let (kernel, initrd) = (guest_artifact("vmlinux")?, guest_artifact(self.initramfs)?);
            VmmArgs::new().cold_boot(&Guest {
                kernel: &kernel,
                initrd: &initrd,
                cmdline: &self.cmdline,
                vcpus: u32::from(self.vcpus),
                memory_mib: self.memory_mib,
            })
        };
        if let Some(uds) = &self.vsock_uds {
            args = args.vsock(uds);
        }
        if let Some(dir) = &self.shared_dir {
            // No --fs-tag: the VMM's default tag (on a restore, the template's).
            args = args.shared_dir(dir, None);
        }
        Ok(args.into_vec())
    }

    /// The agent-ready template of this boot in [`template_cache`], found or built (once).
    fn template(&self) -> Result<nutshell_template::Template> {
        let config = nutshell_template::TemplateConfig {
            vmm: vmm_binary()?,
            kernel: guest_artifact("vmlinux")?,
            initrd: guest_artifact(self.initramfs)?,
            cmdline: self.cmdline.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            fs_tag: self
                .shared_dir
                .as_ref()
                .map(|_| nutshell_protocol::SHARED_FS_TAG.to_owned()),
            cpu_profile: nutshell_template::CpuProfile::Auto,
            cache_dir: template_cache(),
            ready_timeout: Duration::from_secs(600),
            jail: false,
        };
        nutshell_template::ensure(&config)
            .map_err(|e| anyhow::anyhow!(nutshell_protocol::error_chain(&e)))
    }

    /// Starts the VMM.
    pub fn spawn(&self) -> Result<VmmProcess> {
        let args = self.args()?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        VmmProcess::spawn(&args)
    }
}

/// A running `nutshell-vmm` with its console in a temporary file. Killed and reaped on drop,
/// so that a failing test leaves no VM behind.
#[derive(Debug)]
pub struct VmmProcess {
    child: Option<Child>,
    console: PathBuf,
    stderr: PathBuf,
    started: Instant,
    _dir: tempfile::TempDir,
}

/// How a VMM process ended.
#[derive(Debug)]
pub struct VmmOutcome {
    /// Exit status.
    pub status: ExitStatus,
    /// Guest console.
    pub console: String,
    /// The VMM's log.
    pub stderr: String,
}

impl VmmOutcome {
    /// Panics with the console and the VMM's log unless the VMM exited with `code`.
    #[track_caller]
    pub fn assert_status(&self, code: i32) {
        assert_eq!(
            self.status.code(),
            Some(code),
            "console:\n{}\nstderr:\n{}",
            self.console,
            self.stderr
        );
    }
}

impl VmmProcess {
    /// Starts `nutshell-vmm` with `args` (the console goes to a file this struct owns).
    pub fn spawn(args: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir().context("temporary directory")?;
        let console = dir.path().join("console");
        let stderr = dir.path().join("stderr");
        let vmm = vmm_binary()?;
        let started = Instant::now();
        let child = Command::new(&vmm)
            .args(args)
            .arg("--console")
            .arg(&console)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).context("stderr file")?)
            .spawn()
            .with_context(|| format!("cannot start {}", vmm.display()))?;
        Ok(VmmProcess {
            child: Some(child),
            console,
            stderr,
            started,
            _dir: dir,
        })
    }

    /// The PID of the VMM.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The guest console so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the console contains `needle`; returns the time since spawn.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(needle) {
                return Ok(self.started.elapsed());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "VMM exited ({status}) before {needle:?} appeared\nconsole:\n{}\nstderr:\n{}",
                        self.console(),
                        self.read_stderr()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{needle:?} did not appear within {timeout:?}\nconsole:\n{}\nstderr:\n{}",
                    self.console(),
                    self.read_stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `signal` to the VMM.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().context("VMM already reaped")?;
        let pid = Pid::from_raw(i32::try_from(pid).context("PID out of range")?);
        kill(pid, signal).context("kill")?;
        Ok(())
    }

    /// Waits for the VMM to exit, at most `timeout` (then kills it and fails).
    pub fn wait(mut self, timeout: Duration) -> Result<VmmOutcome> {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.take().context("VMM already reaped")?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(VmmOutcome {
                    status,
                    console: self.console(),
                    stderr: self.read_stderr(),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "VMM still running after {timeout:?}; killed\nconsole:\n{}\nstderr:\n{}",
                    self.console(),
                    self.read_stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn read_stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The VMM's log so far.
    pub fn stderr(&self) -> String {
        self.read_stderr()
    }
}

/// Resident and proportional memory of a process, in KiB, from `/proc/PID/smaps_rollup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUse {
    /// `Rss`.
    pub rss_kib: u64,
    /// `Pss`: shared pages divided among their users.
    pub pss_kib: u64,
}

/// Reads `/proc/PID/smaps_rollup`.
pub fn memory_use(pid: u32) -> Result<MemoryUse> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("smaps_rollup of {pid}"))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in smaps_rollup of {pid}"))
    };
    Ok(MemoryUse {
        rss_kib: field("Rss:")?,
        pss_kib: field("Pss:")?,
    })
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of `key=` in a `NUTSHELL_TEST_INIT` report line.
pub fn report_field<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let line = console
        .lines()
        .find(|l| l.starts_with("NUTSHELL_TEST_INIT uptime="))?;
    if key == "cmdline" {
        return line.split_once(" cmdline=").map(|(_, v)| v);
    }
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// A busybox root file system at `dir`: the static binary and a link per applet.
pub fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("busybox rootfs");
    for d in ["proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(d)).expect("busybox rootfs");
    }
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox rootfs");
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox rootfs");
    for applet in String::from_utf8(list.stdout)
        .expect("busybox rootfs")
        .lines()
    {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("busybox rootfs");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_fields_parse() {
        let c =
            "[boot]\nNUTSHELL_TEST_INIT uptime=1.50 epoch=99 cpus=2 mem_kib=120000 cmdline=a b=c\n";
        assert_eq!(report_field(c, "cpus"), Some("2"));
        assert_eq!(report_field(c, "uptime"), Some("1.50"));
        assert_eq!(report_field(c, "epoch"), Some("99"));
        assert_eq!(report_field(c, "cmdline"), Some("a b=c"));
        assert_eq!(report_field(c, "missing"), None);
        assert_eq!(report_field("nothing", "cpus"), None);
    }

    /// A start slot someone holds is reported; a free one and the slot directory are not.
    #[test]
    fn a_held_start_slot_is_left_and_a_free_one_is_not() {
        let run_dir = tempfile::tempdir().unwrap();
        let slots = run_dir.path().join(START_SLOTS_DIR);
        std::fs::create_dir(&slots).unwrap();
        let held = std::fs::File::create(slots.join("0")).unwrap();
        std::fs::File::create(slots.join("1")).unwrap();
        held.lock().unwrap();
        assert_eq!(
            left_under_run_dir(run_dir.path()),
            vec![format!("{} (held)", slots.join("0").display())]
        );
        drop(held);
        assert!(left_under_run_dir(run_dir.path()).is_empty());
        std::fs::write(run_dir.path().join("stray"), "").unwrap();
        assert_eq!(
            left_under_run_dir(run_dir.path()),
            vec![run_dir.path().join("stray").display().to_string()]
        );
    }

    /// The test's own CPU time grows by about what it burns.
    #[test]
    fn cpu_time_counts_what_the_process_burns() {
        let me = std::process::id();
        let before = cpu_time(me).unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let burnt = cpu_time(me).unwrap() - before;
        // A loaded host may deschedule the loop, so only a tenth of its 300 ms is required.
        assert!(burnt >= Duration::from_millis(30), "{burnt:?}");
    }
}

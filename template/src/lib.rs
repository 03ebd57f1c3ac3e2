//! Agent-ready templates: the policy side of "boot once, restore for every pod".
//!
//! `nutshell-vmm` is mechanism only: it boots, snapshots (over its control socket) and
//! restores. This crate decides when a template is built and which one a VM gets:
//!
//! - the cache key ([`template_key`]): a SHA-256 over the kernel and initramfs bytes, the
//!   command line, vCPUs, memory, the virtio-fs tag, the VMM build (its executable's size,
//!   mtime and inode) and what the VMM says a restore on this host depends on
//!   (`nutshell-vmm --print-machine-id`: its version, snapshot format, resolved CPU profile and
//!   guest CPUID hash);
//! - the build lock: an exclusive [`std::fs::File::lock`] on `<cache>/<key>.lock`, so that
//!   concurrent pod starts build a template once;
//! - "the agent is ready": the template VM is cold-booted with `--api-sock`, the agent must
//!   answer `Health.Check` with SERVING, then the VMM is asked (`Snapshot`) to write the
//!   snapshot, marked with the key, and to shut down (`Shutdown`).
//!
//! A template is built in a temporary directory beside its final one and renamed into place
//! (atomic on one filesystem): a crash leaves at most a stale temporary directory, never a
//! half-written template. The VMM checks the key stored in the snapshot at restore
//! (`--restore DIR --template-key KEY`), so a template under the wrong name is refused.

mod args;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nutshell_protocol::client::{AgentClient, ClientError, ConnectOptions};
use nutshell_protocol::types::ServingStatus;
use nutshell_protocol::vmm_client::{VmmClient, VmmClientError};
use sha2::{Digest, Sha256};

pub use args::{Guest, VmmArgs};

/// Where templates are kept unless configured otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/nutshell/templates";

/// The file a complete template holds (the VMM's snapshot state).
const STATE_FILE: &str = "state";

/// How long a snapshot may be deferred because a vsock connection is still closing.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(30);

/// Errors of finding or building a template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file of the cache or an input could not be read or written.
    #[error("{}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `nutshell-vmm` could not be run, or refused.
    #[error("{}: {message}", .vmm.display())]
    Vmm {
        /// The VMM binary.
        vmm: PathBuf,
        /// What went wrong (with the VMM's last log lines, if any).
        message: String,
    },
    /// The agent did not become ready.
    #[error("the agent of the template VM did not answer")]
    Agent(#[source] ClientError),
    /// The agent answered but reports it is not serving.
    #[error("the agent of the template VM is not serving ({0:?})")]
    NotServing(ServingStatus),
    /// The VMM's control socket refused or failed.
    #[error("the template VM's control socket")]
    Control(#[source] VmmClientError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The guest CPU profile asked of the VMM (`--cpu-profile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuProfile {
    /// Compat on `kvm_pvm` hosts, host elsewhere.
    #[default]
    Auto,
    /// Everything KVM supports.
    Host,
    /// What a software-emulated ring 0 can run.
    Compat,
}

impl CpuProfile {
    /// The `--cpu-profile` value.
    pub fn as_arg(self) -> &'static str {
        match self {
            CpuProfile::Auto => "auto",
            CpuProfile::Host => "host",
            CpuProfile::Compat => "compat",
        }
    }
}

/// What a template is made of, and how to build it.
#[derive(Debug, Clone)]
pub struct TemplateConfig {
    /// The `nutshell-vmm` binary.
    pub vmm: PathBuf,
    /// Guest kernel (PVH vmlinux).
    pub kernel: PathBuf,
    /// The agent initramfs.
    pub initrd: PathBuf,
    /// The user's kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory.
    pub memory_mib: u64,
    /// The tag of a virtio-fs device, if VMs restored from it get one. The template's device
    /// exports an empty directory and is never mounted; a restore attaches it to the VM's
    /// shared directory.
    pub fs_tag: Option<String>,
    /// CPU profile.
    pub cpu_profile: CpuProfile,
    /// The cache directory.
    pub cache_dir: PathBuf,
    /// How long the template VM may take to reach an answering agent.
    pub ready_timeout: Duration,
    /// Run the template VM jailed (`--jail`), as pods' VMs are.
    pub jail: bool,
}

/// A template in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Its snapshot directory (`--restore`).
    pub dir: PathBuf,
    /// Its key (`--template-key`).
    pub key: String,
    /// Whether this call built it (false: it was in the cache).
    pub built: bool,
}

impl Template {
    /// The `nutshell-vmm` arguments that restore a VM from this template.
    pub fn restore_args(&self) -> [String; 4] {
        [
            "--restore".to_owned(),
            self.dir.to_string_lossy().into_owned(),
            "--template-key".to_owned(),
            self.key.clone(),
        ]
    }
}

fn hash_file(hasher: &mut Sha256, path: &Path) -> Result<(), TemplateError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut inner = Sha256::new();
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        inner.update(&buf[..n]);
    }
    hasher.update(inner.finalize());
    Ok(())
}

/// The VMM build: size, modification time and inode of its executable. A rebuilt VMM of the
/// same version may lay out devices differently, so its templates are its own.
fn vmm_build_id(vmm: &Path) -> Result<String, TemplateError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(vmm).map_err(io_err(vmm))?;
    Ok(format!(
        "{}:{}.{}:{}",
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ino()
    ))
}

/// What a restore on this host depends on beyond the snapshot's files, as the VMM reports it
/// (`--print-machine-id`): VMM version, snapshot format, resolved CPU profile, guest CPUID.
pub fn machine_id(config: &TemplateConfig) -> Result<String, TemplateError> {
    let vmm_err = |message: String| TemplateError::Vmm {
        vmm: config.vmm.clone(),
        message,
    };
    let child = Command::new(&config.vmm)
        .args([
            "--print-machine-id",
            "--vcpus",
            &config.vcpus.to_string(),
            "--cpu-profile",
            config.cpu_profile.as_arg(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = child.map_err(|e| vmm_err(format!("cannot run it: {e}")))?;
    // The answer is one short line and errors are a few: reading one pipe after the other
    // cannot fill the other's buffer.
    let (mut stdout, mut stderr) = (String::new(), String::new());
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    // A process reaper of the caller (the containerd shim's) may reap the child first: the
    // status is lost then (ECHILD), the output is not, and an empty answer is refused below.
    let status = match child.wait() {
        Ok(s) => Some(s),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => None,
        Err(e) => return Err(vmm_err(format!("wait: {e}"))),
    };
    let text = stdout.trim().to_owned();
    if status.is_some_and(|s| !s.success()) || text.is_empty() || text.contains('\n') {
        return Err(vmm_err(format!(
            "--print-machine-id failed ({}): {}",
            status.map_or_else(|| "status lost".to_owned(), |s| s.to_string()),
            stderr.trim()
        )));
    }
    Ok(text)
}

/// The cache key of a template: hex SHA-256 of everything that decides what the snapshot holds
/// and where it can be restored; `machine` is [`machine_id`]'s answer.
pub fn template_key(config: &TemplateConfig, machine: &str) -> Result<String, TemplateError> {
    let mut h = Sha256::new();
    h.update(b"nutshell-template\0");
    h.update(machine.as_bytes());
    h.update([0]);
    h.update(vmm_build_id(&config.vmm)?.as_bytes());
    h.update([0]);
    hash_file(&mut h, &config.kernel)?;
    hash_file(&mut h, &config.initrd)?;
    h.update((config.cmdline.len() as u64).to_le_bytes());
    h.update(config.cmdline.as_bytes());
    h.update([config.vcpus]);
    h.update(config.memory_mib.to_le_bytes());
    match &config.fs_tag {
        Some(tag) => {
            h.update([1]);
            h.update((tag.len() as u64).to_le_bytes());
            h.update(tag.as_bytes());
        }
        None => h.update([0]),
    }
    // Every template has a NIC (without a tap): VMs with a network and VMs without one share
    // templates, and a restore attaches the VM's tap.
    h.update(b"nic\0");
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// An exclusive lock on a file, released when dropped (closing the descriptor).
#[derive(Debug)]
struct LockFile(#[allow(dead_code)] std::fs::File);

impl LockFile {
    fn acquire(path: &Path) -> Result<LockFile, TemplateError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        file.lock().map_err(io_err(path))?;
        Ok(LockFile(file))
    }
}

fn is_complete(dir: &Path) -> bool {
    dir.join(STATE_FILE).is_file()
}

/// Finds the template for `config` in the cache, or builds it (boot, wait for the agent,
/// snapshot, stop) under the cache's lock.
pub fn ensure(config: &TemplateConfig) -> Result<Template, TemplateError> {
    let key = template_key(config, &machine_id(config)?)?;
    let dir = config.cache_dir.join(&key);
    let found = |dir: PathBuf, key: String| Template {
        dir,
        key,
        built: false,
    };
    if is_complete(&dir) {
        return Ok(found(dir, key));
    }
    std::fs::create_dir_all(&config.cache_dir).map_err(io_err(&config.cache_dir))?;
    let _lock = LockFile::acquire(&config.cache_dir.join(format!("{key}.lock")))?;
    if is_complete(&dir) {
        // Another process built it while we waited for the lock.
        return Ok(found(dir, key));
    }
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{key}.tmp"))
        .tempdir_in(&config.cache_dir)
        .map_err(io_err(&config.cache_dir))?;
    let started = Instant::now();
    build(config, &key, tmp.path())?;
    // A leftover (incomplete) directory of that name is replaced.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    let tmp = tmp.keep();
    std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
    if let Ok(d) = std::fs::File::open(&config.cache_dir) {
        let _ = d.sync_all();
    }
    log::info!(
        "template {key} built in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(Template {
        dir,
        key,
        built: true,
    })
}

/// The template VM's process: killed (if still running) when dropped.
struct TemplateVmm {
    child: Child,
    log: PathBuf,
    /// The guest's console: its last lines say why a guest died (a panic, an oops).
    console: PathBuf,
    vmm: PathBuf,
}

impl TemplateVmm {
    /// Whether the VMM has exited. A process reaper of the caller (the containerd shim's) may
    /// have reaped it: `ECHILD` counts as exited.
    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the VMM to exit.
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// A control-socket error, or, when the VMM has exited meanwhile (a broken connection is
    /// how its death looks from here), the exit with the VMM's and the guest's last lines.
    fn control_error(&mut self, e: VmmClientError) -> TemplateError {
        if self.wait_exit(Duration::from_secs(1)) {
            return self.error(&format!("the template VM exited during its snapshot ({e})"));
        }
        TemplateError::Control(e)
    }

    /// An error with the VMM's last log lines and the guest console's (the build directory
    /// that holds the console is removed with the failed build).
    fn error(&self, what: &str) -> TemplateError {
        let log = last(&file_tail(&self.log), 5).join(" | ");
        let mut message = format!("{what}; its log ends: {log}");
        let console = file_tail(&self.console);
        // A guest kernel's panic line comes before its call trace: quoted on its own.
        if let Some(fatal) = console
            .iter()
            .rev()
            .find(|l| GUEST_FATAL.iter().any(|m| l.contains(m)))
        {
            message.push_str(&format!("; the guest kernel said: {}", fatal.trim_start()));
        }
        let console = last(&console, CONSOLE_TAIL_LINES);
        if !console.is_empty() {
            message.push_str(&format!(
                "; the guest console ends: {}",
                console.join(" | ")
            ));
        }
        TemplateError::Vmm {
            vmm: self.vmm.clone(),
            message,
        }
    }
}

impl Drop for TemplateVmm {
    fn drop(&mut self) {
        if !self.exited() {
            // A jailed VMM dies with its supervisor, the process killed here.
            let _ = self.child.kill();
            let _ = self.wait_exit(Duration::from_secs(10));
        }
    }
}

/// Guest console lines a failed build's error quotes.
const CONSOLE_TAIL_LINES: usize = 5;

/// How a guest kernel's fatal message starts (a panic, an oops, a BUG).
const GUEST_FATAL: &[&str] = &["Kernel panic - not syncing", "BUG: ", "Oops: "];

/// The last `n` of `lines`.
fn last(lines: &[String], n: usize) -> &[String] {
    &lines[lines.len().saturating_sub(n)..]
}

/// The non-empty lines of the last 8 KiB of the file at `path`, made safe to log: the guest
/// wrote the console, so each line is cut and its control characters masked.
fn file_tail(path: &Path) -> Vec<String> {
    const WINDOW: u64 = 8 << 10;
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(WINDOW))).is_ok() {
            let _ = f.take(WINDOW).read_to_end(&mut bytes);
        }
    }
    String::from_utf8_lossy(&bytes)
        .lines()
        .map(|l| nutshell_protocol::types::clean_line(l, 300))
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// Detaches whatever is mounted on its path when dropped (nothing mounted: nothing to do).
struct DetachOnDrop(PathBuf);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        while nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH).is_ok() {
            log::warn!("detached {} left by the template VM", self.0.display());
        }
    }
}

/// Cold-boots the template VM into `out`'s console, waits until the agent answers
/// `Health.Check` with SERVING, and has the VMM snapshot it into `out` (marked with `key`) and
/// shut down.
pub fn build(config: &TemplateConfig, key: &str, out: &Path) -> Result<(), TemplateError> {
    // The sockets live in a short temporary path (sun_path is 108 bytes).
    let sock_dir = tempfile::Builder::new()
        .prefix("nutshell-template")
        .tempdir()
        .map_err(io_err(&std::env::temp_dir()))?;
    let uds = sock_dir.path().join("vsock.sock");
    let api = sock_dir.path().join("vmm.sock");
    let guest = Guest {
        kernel: &config.kernel,
        initrd: &config.initrd,
        cmdline: &config.cmdline,
        vcpus: u32::from(config.vcpus),
        memory_mib: config.memory_mib,
    };
    let console = out.join("boot-console");
    let mut args = VmmArgs::new()
        .cold_boot(&guest)
        .opt("--cpu-profile", config.cpu_profile.as_arg())
        .vsock(&uds)
        .api_sock(&api)
        .console(&console)
        .flag("--nic-without-tap");
    // A jailed VMM binds the shared directory over itself and its supervisor undoes that when
    // it exits; a supervisor killed (a build abandoned, a VMM that hung) cannot. Dropped after
    // the VMM (declared before it) and before the directory is removed.
    let _shared_bind = DetachOnDrop(sock_dir.path().join("shared"));
    if let Some(tag) = &config.fs_tag {
        // The template's virtio-fs device exports an empty directory the guest never mounts.
        let empty = sock_dir.path().join("shared");
        std::fs::create_dir(&empty).map_err(io_err(&empty))?;
        args = args.shared_dir(&empty, Some(tag));
    }
    if config.jail {
        args = args.jail();
    }
    let log = out.join("vmm.log");
    let log_file = std::fs::File::create(&log).map_err(io_err(&log))?;
    let child = Command::new(&config.vmm)
        .args(args.into_vec())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(|e| TemplateError::Vmm {
            vmm: config.vmm.clone(),
            message: format!("cannot run it: {e}"),
        })?;
    let mut vmm = TemplateVmm {
        child,
        log,
        console,
        vmm: config.vmm.clone(),
    };
    wait_for_agent(config, &mut vmm, &uds)?;
    let control = VmmClient::connect(&api, Duration::from_secs(30), Duration::from_secs(120))
        .map_err(|e| vmm.control_error(e))?;
    // The guest closes the agent connection asynchronously (SHUTDOWN, then RST): while it is
    // open the VMM refuses the snapshot (FAILED_PRECONDITION) and we try again.
    let deadline = Instant::now() + SNAPSHOT_RETRY;
    loop {
        match control.snapshot(out, Some(key)) {
            Ok(()) => break,
            Err(e) if e.is_precondition() && Instant::now() < deadline => {
                log::debug!("template snapshot deferred: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(vmm.control_error(e)),
        }
        if vmm.exited() {
            return Err(vmm.error("the template VM stopped before its snapshot"));
        }
    }
    if let Err(e) = control.shutdown() {
        log::warn!("template VM shutdown: {e}");
    }
    if !vmm.wait_exit(Duration::from_secs(10)) {
        log::warn!("the template VM did not stop in 10 s after Shutdown; killing it");
    }
    Ok(())
}

/// Waits until the template VM's agent answers SERVING; fails early if the VMM exits.
fn wait_for_agent(
    config: &TemplateConfig,
    vmm: &mut TemplateVmm,
    uds: &Path,
) -> Result<(), TemplateError> {
    let deadline = Instant::now() + config.ready_timeout;
    let opts = ConnectOptions {
        connect_timeout: Duration::from_secs(1),
        retry_interval: Duration::from_millis(20),
        rpc_timeout: config.ready_timeout,
        ..Default::default()
    };
    loop {
        if vmm.exited() {
            return Err(vmm.error("the template VM exited before its agent answered"));
        }
        match AgentClient::connect(uds, &opts) {
            Ok(agent) => {
                // The client drops here: its connection closes before the snapshot.
                return match agent.check().map_err(TemplateError::Agent)? {
                    ServingStatus::Serving => Ok(()),
                    other => Err(TemplateError::NotServing(other)),
                };
            }
            Err(e) if Instant::now() >= deadline => return Err(TemplateError::Agent(e)),
            Err(e) => {
                log::debug!("template agent connect: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config(dir: &Path) -> TemplateConfig {
        let kernel = dir.join("vmlinux");
        let initrd = dir.join("initrd");
        let vmm = dir.join("vmm");
        std::fs::write(&kernel, b"kernel bytes").unwrap();
        std::fs::write(&initrd, b"initrd bytes").unwrap();
        std::fs::write(&vmm, b"vmm bytes").unwrap();
        TemplateConfig {
            vmm,
            kernel,
            initrd,
            cmdline: "quiet".into(),
            vcpus: 1,
            memory_mib: 128,
            fs_tag: None,
            cpu_profile: CpuProfile::Auto,
            cache_dir: dir.join("cache"),
            ready_timeout: Duration::from_secs(1),
            jail: false,
        }
    }

    #[test]
    fn a_failed_build_quotes_the_last_lines_masked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console");
        let mut text = "old line\n".repeat(2000);
        text.push_str("[    9.1] Kernel panic - not syncing: \x1b[2Jboom\r\n\n\n");
        text.push_str(&format!("{}\n", "x".repeat(1000)));
        std::fs::write(&path, text).unwrap();
        let lines = file_tail(&path);
        assert!(lines.len() < 2000, "only the file's last 8 KiB are read");
        let tail = last(&lines, 3);
        assert_eq!(tail.len(), 3, "{tail:?}");
        assert_eq!(tail[0], "old line");
        assert_eq!(tail[1], "[    9.1] Kernel panic - not syncing: ?[2Jboom");
        assert_eq!(tail[2], "x".repeat(300), "a long line is cut");
        assert!(file_tail(&dir.path().join("missing")).is_empty());
        assert!(last(&[], 3).is_empty());
    }

    #[test]
    fn lock_is_exclusive_between_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        let held = LockFile::acquire(&path).unwrap();
        let other = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(
            matches!(other.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
            "a second exclusive lock must not be granted"
        );
        drop(held);
        other.try_lock().unwrap();
    }

    #[test]
    fn key_follows_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let key = template_key(&config, "m1").unwrap();
        assert_eq!(key.len(), 64);
        assert_eq!(template_key(&config, "m1").unwrap(), key, "deterministic");
        let mut keys = vec![key, template_key(&config, "m2").unwrap()];
        std::fs::write(&config.initrd, b"initrd bytes!").unwrap();
        keys.push(template_key(&config, "m1").unwrap());
        std::fs::write(&config.kernel, b"other kernel").unwrap();
        keys.push(template_key(&config, "m1").unwrap());
        // A rebuilt VMM (another size here; mtime and inode count too).
        std::fs::write(&config.vmm, b"vmm bytes, rebuilt").unwrap();
        keys.push(template_key(&config, "m1").unwrap());
        for changed in [
            TemplateConfig {
                vcpus: 2,
                ..config.clone()
            },
            TemplateConfig {
                memory_mib: 256,
                ..config.clone()
            },
            TemplateConfig {
                cmdline: "quiet x".into(),
                ..config.clone()
            },
            TemplateConfig {
                fs_tag: Some("nutshell".into()),
                ..config.clone()
            },
            TemplateConfig {
                fs_tag: Some("other".into()),
                ..config.clone()
            },
        ] {
            keys.push(template_key(&changed, "m1").unwrap());
        }
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
        assert!(template_key(
            &TemplateConfig {
                kernel: dir.path().join("missing"),
                ..config
            },
            "m1"
        )
        .is_err());
    }

    #[test]
    fn a_vmm_that_cannot_answer_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        config.vmm = PathBuf::from("/bin/false");
        assert!(matches!(
            machine_id(&config),
            Err(TemplateError::Vmm { .. })
        ));
        config.vmm = dir.path().join("no-such-vmm");
        assert!(matches!(ensure(&config), Err(TemplateError::Vmm { .. })));
    }

    #[test]
    fn a_found_template_is_not_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        // A stand-in VMM that only answers --print-machine-id.
        let vmm = dir.path().join("fake-vmm");
        std::fs::write(&vmm, "#!/bin/sh\necho fake-machine\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
        config.vmm = vmm;
        let key = template_key(&config, "fake-machine").unwrap();
        let dir_of = config.cache_dir.join(&key);
        std::fs::create_dir_all(&dir_of).unwrap();
        std::fs::write(dir_of.join(STATE_FILE), b"x").unwrap();
        let t = ensure(&config).unwrap();
        assert_eq!(
            t,
            Template {
                dir: dir_of,
                key,
                built: false
            }
        );
        assert_eq!(t.restore_args()[0], "--restore");
    }
}

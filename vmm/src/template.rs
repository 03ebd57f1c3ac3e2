//! Agent-ready templates: a VM booted once into the agent, snapshotted when the agent answers,
//! and restored for every pod.
//!
//! Templates live in a cache directory (default [`DEFAULT_CACHE_DIR`]), one directory per
//! [`template_key`]: a SHA-256 over the kernel and initramfs bytes, the command line, vCPUs,
//! memory, the virtio-fs tag, the VMM version and build (its executable's size, mtime and
//! inode), the snapshot format version, the CPU profile and this host's CPUID hash.
//! The key is also stored in the snapshot header and checked at restore, so that a template
//! from another kernel, initramfs, VMM or CPU is refused even if it sits under the wrong name.
//!
//! Creation is safe when several processes start at once: each takes an exclusive `flock` on
//! `<key>.lock`, checks again whether the template appeared meanwhile, and otherwise builds it
//! in a temporary directory beside it and renames that into place (atomic on one filesystem).
//! A crash leaves at most a stale temporary directory, never a half-written template.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::devices::virtio::fs::FsConfig;
use crate::devices::virtio::manager::DeviceConfig;
use crate::devices::virtio::net::{NetConfig, DEFAULT_MAC};
use crate::devices::virtio::vsock::{VsockConfig, DEFAULT_GUEST_CID};
use crate::vm::{guest_cpuid_hash, CpuProfileChoice, MachineConfig, VmError};
use crate::{Console, LinuxConfig};

/// Where templates are kept unless configured otherwise.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/nutshell/templates";

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
    /// Booting, pausing or snapshotting the template VM failed.
    #[error("template VM")]
    Vm(#[from] VmError),
    /// The agent did not become ready.
    #[error("the agent of the template VM did not answer")]
    Agent(#[source] nutshell_protocol::client::ClientError),
    /// The agent answered but reports it is not serving.
    #[error("the agent of the template VM is not serving")]
    NotServing,
    /// A vsock connection stayed open after the agent answered.
    #[error("a vsock connection stayed open {0:?} after the agent answered")]
    Busy(Duration),
    /// The template VM stopped while it was being built.
    #[error("the template VM stopped: {0}")]
    Stopped(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a template is made of.
#[derive(Debug, Clone)]
pub struct TemplateConfig {
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
    /// The tag of a virtio-fs device, if pods get one. The template's device exports an empty
    /// directory and is never mounted; a restore attaches it to the pod's shared directory.
    pub fs_tag: Option<String>,
    /// CPU profile.
    pub cpu_profile: CpuProfileChoice,
    /// The cache directory.
    pub cache_dir: PathBuf,
    /// How long the template VM may take to reach an answering agent.
    pub ready_timeout: Duration,
}

/// A template in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Its snapshot directory.
    pub dir: PathBuf,
    /// Its key.
    pub key: String,
    /// Whether this call built it (false: it was in the cache).
    pub built: bool,
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

/// This VMM build: size, modification time and inode of its executable. A rebuilt VMM of the
/// same version may lay out devices differently, so its templates are its own.
fn vmm_build_id() -> String {
    use std::os::unix::fs::MetadataExt;
    // Through /proc's link, which works also where the executable's path is not visible
    // (in the jail).
    std::fs::metadata("/proc/self/exe")
        .or_else(|_| std::env::current_exe().and_then(std::fs::metadata))
        .map(|m| format!("{}:{}.{}:{}", m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
        .unwrap_or_default()
}

/// The cache key of a template: hex SHA-256 of everything that decides what the snapshot holds.
pub fn template_key(config: &TemplateConfig) -> Result<String, TemplateError> {
    let profile = config.cpu_profile.resolve();
    let cpuid = guest_cpuid_hash(profile, config.vcpus)?;
    let mut h = Sha256::new();
    h.update(b"nutshell-template\0");
    h.update(crate::snapshot::VMM_VERSION.as_bytes());
    h.update([0]);
    h.update(crate::snapshot::FORMAT_VERSION.to_le_bytes());
    h.update(vmm_build_id().as_bytes());
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
    // Every template has a NIC (without a tap): pods with a network and pods without one
    // share templates, and a restore attaches the pod's tap.
    h.update(b"nic\0");
    h.update(profile.to_string().as_bytes());
    h.update([0]);
    h.update(cpuid.to_le_bytes());
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// An exclusive `flock` on a file, released when dropped.
struct LockFile(std::fs::File);

impl LockFile {
    fn acquire(path: &Path) -> Result<LockFile, TemplateError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        loop {
            // SAFETY: flock(2) on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(LockFile(file));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_err(path)(e));
            }
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // SAFETY: flock(2) on the descriptor this struct owns.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn is_complete(dir: &Path) -> bool {
    dir.join(crate::snapshot::STATE_FILE).is_file()
}

/// Finds the template for `config` in the cache, or builds it (boot, wait for the agent,
/// snapshot, stop) under the cache's lock.
pub fn ensure(config: &TemplateConfig) -> Result<Template, TemplateError> {
    let key = template_key(config)?;
    let dir = config.cache_dir.join(&key);
    if is_complete(&dir) {
        return Ok(Template {
            dir,
            key,
            built: false,
        });
    }
    std::fs::create_dir_all(&config.cache_dir).map_err(io_err(&config.cache_dir))?;
    let _lock = LockFile::acquire(&config.cache_dir.join(format!("{key}.lock")))?;
    if is_complete(&dir) {
        // Another process built it while we waited for the lock.
        return Ok(Template {
            dir,
            key,
            built: false,
        });
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

/// Boots the agent, waits until it answers Health with no vsock connection left open, and
/// snapshots the VM into `out`.
pub fn build(config: &TemplateConfig, key: &str, out: &Path) -> Result<(), TemplateError> {
    use nutshell_protocol::client::{AgentClient, ConnectOptions};
    use nutshell_protocol::types::ServingStatus;

    // The boot's vsock socket lives in a short temporary path (sun_path is 108 bytes).
    let sock_dir = tempfile::Builder::new()
        .prefix("nutshell-template")
        .tempdir()
        .map_err(io_err(&std::env::temp_dir()))?;
    let uds = sock_dir.path().join("vsock.sock");
    // The template's virtio-fs device exports an empty directory the guest never mounts.
    let mut devices = vec![
        DeviceConfig::Vsock(VsockConfig {
            guest_cid: DEFAULT_GUEST_CID,
            uds_path: uds.clone(),
        }),
        DeviceConfig::Net(NetConfig {
            mac: DEFAULT_MAC,
            tap: None,
        }),
    ];
    if let Some(tag) = &config.fs_tag {
        let empty = sock_dir.path().join("shared");
        std::fs::create_dir(&empty).map_err(io_err(&empty))?;
        devices.push(DeviceConfig::Fs(FsConfig {
            shared_dir: empty,
            tag: tag.clone(),
        }));
    }
    let mut vm = crate::boot_linux(LinuxConfig {
        kernel: config.kernel.clone(),
        initrd: Some(config.initrd.clone()),
        cmdline: config.cmdline.clone(),
        machine: MachineConfig {
            memory_mib: config.memory_mib,
            vcpus: config.vcpus,
            console: Console::File(out.join("boot-console")),
            cpu_profile: config.cpu_profile,
            started_at: Some(Instant::now()),
            devices,
        },
    })?;
    vm.set_template_key(key);
    let opts = ConnectOptions {
        connect_timeout: config.ready_timeout,
        retry_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let status = {
        let client = AgentClient::connect(&uds, &opts).map_err(TemplateError::Agent)?;
        client.check().map_err(TemplateError::Agent)?
        // The client drops here: its connection closes.
    };
    if status != ServingStatus::Serving {
        return Err(TemplateError::NotServing);
    }
    // The guest closes its end of the connection asynchronously (SHUTDOWN, then RST).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if vm.exit_handle().is_requested() {
            return Err(TemplateError::Stopped(
                vm.exit_handle()
                    .reason()
                    .map_or_else(|| "unknown".into(), |r| r.to_string()),
            ));
        }
        if vm.vsock_connections() == Some(0) {
            vm.pause()?;
            // A connection may have opened between the check and the pause: the device
            // refuses the snapshot then, and we try again.
            match vm.snapshot(out) {
                Ok(()) => break,
                Err(VmError::DeviceState(e)) if Instant::now() < deadline => {
                    log::debug!("template snapshot deferred: {e}");
                    vm.resume()?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if Instant::now() >= deadline {
            return Err(TemplateError::Busy(Duration::from_secs(30)));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Dropping the VM stops it.
    drop(vm);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn lock_is_exclusive_between_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        let held = LockFile::acquire(&path).unwrap();
        let other = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // SAFETY: flock(2) on a descriptor the test owns.
        let r = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, -1, "a second exclusive lock must not be granted");
        drop(held);
        // SAFETY: as above.
        let r = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, 0);
    }

    #[test]
    fn key_follows_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        let initrd = dir.path().join("initrd");
        std::fs::write(&kernel, b"kernel bytes").unwrap();
        std::fs::write(&initrd, b"initrd bytes").unwrap();
        let config = TemplateConfig {
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            cmdline: "quiet".into(),
            vcpus: 1,
            memory_mib: 128,
            fs_tag: None,
            cpu_profile: CpuProfileChoice::Auto,
            cache_dir: dir.path().join("cache"),
            ready_timeout: Duration::from_secs(1),
        };
        let key = template_key(&config).unwrap();
        assert_eq!(key.len(), 64);
        assert_eq!(template_key(&config).unwrap(), key, "deterministic");
        let mut keys = vec![key];
        std::fs::write(&initrd, b"initrd bytes!").unwrap();
        keys.push(template_key(&config).unwrap());
        std::fs::write(&kernel, b"other kernel").unwrap();
        keys.push(template_key(&config).unwrap());
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
            keys.push(template_key(&changed).unwrap());
        }
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
        assert!(template_key(&TemplateConfig {
            kernel: dir.path().join("missing"),
            ..config
        })
        .is_err());
    }
}

//! virtio-fs (device id 26) served inline: FUSE requests from the guest are answered by
//! fuse-backend-rs's `Server` over its passthrough filesystem, behind [`guard::GuardedFs`],
//! exporting one host directory (the sandbox's shared directory).
//!
//! Two queues: hiprio (FORGET, INTERRUPT) and one request queue. Every descriptor chain is one
//! FUSE request; the reply goes into the chain's writable descriptors. A chain that does not
//! map into guest RAM or does not hold a FUSE header is returned unused (length 0) and logged;
//! it never stops the device.
//!
//! Passthrough options, chosen for a container rootfs shared with the host:
//! - `xattr: false`: no extended attributes pass to the host (a guest must not set
//!   `trusted.*`/`security.*` attributes on host files, e.g. the host overlayfs's own);
//! - `do_import: true`: the passthrough stands alone (no VFS layer) and prepares its root at INIT;
//! - `writeback: false`: the host (the shim) also writes into the shared directory, so the guest
//!   must not cache writes;
//! - `no_open: false`: every open is a host `open`, with its permission checks;
//! - `cache_policy: Auto` (close-to-open), entry/attribute timeouts 1 s: the shim mounts new
//!   container root filesystems under the directory while the guest runs; the guard adds
//!   `KEEP_CACHE` to read-only opens (see [`guard::keep_cache`]), so that starting a program
//!   does not drop the page cache of its binary and libraries;
//! - `inode_file_handles: false`: inodes are `O_PATH` descriptors (no `CAP_DAC_READ_SEARCH`
//!   needed); their number is bounded by the guard;
//! - no DAX window (no shared-memory region is offered).

pub mod guard;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config as PassthroughConfig, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use self::guard::GuardedFs;
use super::state::{DeviceKind, DeviceState, DeviceStateError};
use super::{ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING};
use crate::memory::GuestMemoryMmap;

/// Virtio device id of virtio-fs.
pub const FS_DEVICE_ID: u32 = 26;
/// The tag unless configured otherwise: the one the agent mounts.
pub const DEFAULT_TAG: &str = nutshell_protocol::SHARED_FS_TAG;
/// Longest tag the config space holds.
pub const TAG_MAX: usize = 36;

const QUEUE_SIZE: u16 = 256;
const HIPRIO_QUEUE: usize = 0;
const REQUEST_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Number of request queues in the config space (the hiprio queue not counted).
const NUM_REQUEST_QUEUES: u32 = 1;
/// Requests served before the interrupt is raised and other queues get a turn.
const BATCH: usize = 64;
/// Entry and attribute timeouts the guest may cache for.
const CACHE_TIMEOUT: Duration = Duration::from_secs(1);
/// File descriptors the VMM wants: the inodes and handles the guard allows, plus its own.
pub const WANTED_NOFILE: u64 = (guard::MAX_INODES + guard::MAX_HANDLES + 1024) as u64;

/// Errors of setting up the device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The shared directory does not exist or cannot be read.
    #[error("shared directory {}", .path.display())]
    SharedDir {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The shared directory is not a directory.
    #[error("shared directory {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The tag is empty, too long or has a NUL.
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes without NUL")]
    Tag(String),
    /// The passthrough filesystem could not be created.
    #[error("cannot export {}", .path.display())]
    Passthrough {
        /// The shared directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create the virtio-fs event descriptors")]
    Events(#[source] io::Error),
}

/// Configuration of the virtio-fs device.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// The host directory exported to the guest.
    pub shared_dir: PathBuf,
    /// The tag the guest mounts (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
}

impl FsConfig {
    /// Checks the configuration: the tag's form and that the directory exists and is one.
    /// Returns the canonical path of the directory.
    pub fn validate(&self) -> Result<PathBuf, FsError> {
        if self.tag.is_empty() || self.tag.len() > TAG_MAX || self.tag.contains('\0') {
            return Err(FsError::Tag(self.tag.clone()));
        }
        let dir = std::fs::canonicalize(&self.shared_dir).map_err(|source| FsError::SharedDir {
            path: self.shared_dir.clone(),
            source,
        })?;
        let meta = std::fs::metadata(&dir).map_err(|source| FsError::SharedDir {
            path: self.shared_dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(FsError::NotADirectory(self.shared_dir.clone()));
        }
        Ok(dir)
    }
}

/// Raises the soft limit of open files towards what the device may need (never above the
/// hard limit); the passthrough keeps one descriptor per inode the guest holds.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};

    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let want = WANTED_NOFILE.min(hard);
    if soft < want {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
            log::warn!("virtio-fs: cannot raise the open-file limit: {e}");
        }
    }
}

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Interrupt,
}

/// The virtio-fs device.
pub struct Fs {
    tag: String,
    shared_dir: PathBuf,
    queue_evts: Vec<EventFd>,
    server: Arc<Server<Arc<GuardedFs>>>,
    fs: Arc<GuardedFs>,
    active: Option<Active>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("tag", &self.tag)
            .field("shared_dir", &self.shared_dir)
            .field("fs", &self.fs)
            .field("active", &self.active.is_some())
            .finish()
    }
}

/// The passthrough configuration for `root` (see the module documentation for why).
fn passthrough_config(root: &Path) -> PassthroughConfig {
    PassthroughConfig {
        root_dir: root.to_string_lossy().into_owned(),
        xattr: false,
        do_import: true,
        writeback: false,
        no_open: false,
        no_opendir: false,
        killpriv_v2: false,
        inode_file_handles: false,
        cache_policy: CachePolicy::Auto,
        entry_timeout: CACHE_TIMEOUT,
        attr_timeout: CACHE_TIMEOUT,
        dax_file_size: None,
        seal_size: false,
        ..PassthroughConfig::default()
    }
}

impl Fs {
    /// Creates the device exporting `config.shared_dir`.
    pub fn new(config: &FsConfig) -> Result<Fs, FsError> {
        Self::with_fs(config, GuardedFs::new)
    }

    /// Creates the device with the guard built by `guard` (tests use small limits).
    pub fn with_fs(
        config: &FsConfig,
        guard: impl FnOnce(PassthroughFs) -> GuardedFs,
    ) -> Result<Fs, FsError> {
        let root = config.validate()?;
        let passthrough_err = |source| FsError::Passthrough {
            path: root.clone(),
            source,
        };
        raise_nofile_limit();
        let inner = PassthroughFs::new(passthrough_config(&root)).map_err(passthrough_err)?;
        let fs = Arc::new(guard(inner));
        let queue_evts = (0..QUEUE_SIZES.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(FsError::Events)?;
        Ok(Fs {
            tag: config.tag.clone(),
            shared_dir: root,
            queue_evts,
            server: Arc::new(Server::new(fs.clone())),
            fs,
            active: None,
        })
    }

    /// The exported directory (canonical).
    pub fn shared_dir(&self) -> &Path {
        &self.shared_dir
    }

    /// The guarded filesystem, for its counters.
    pub fn filesystem(&self) -> &GuardedFs {
        &self.fs
    }

    /// Serves every request queued on both queues. Returns the number of requests served.
    pub fn process_queues(&mut self) -> usize {
        let mut served = 0;
        loop {
            let n = self.process_queue(HIPRIO_QUEUE) + self.process_queue(REQUEST_QUEUE);
            if n == 0 {
                return served;
            }
            served += n;
        }
    }

    /// Serves up to [`BATCH`] requests of one queue and raises the interrupt if any was used.
    fn process_queue(&mut self, index: usize) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let mem = active.mem.clone();
        let Some(queue) = active.queues.get_mut(index) else {
            return 0;
        };
        let mut served = 0;
        while served < BATCH {
            let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let len = serve(&self.server, &mem, chain);
            if let Err(e) = queue.add_used(&mem, head, len) {
                crate::ratelimited!(log::Level::Warn, "virtio-fs: cannot return a buffer: {e}");
            }
            served += 1;
        }
        if served > 0 {
            active.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
        served
    }
}

type Chain<'a> = virtio_queue::DescriptorChain<&'a GuestMemoryMmap>;

/// Serves one request; returns the number of bytes written into the chain (0 on any error).
fn serve(server: &Server<Arc<GuardedFs>>, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            crate::ratelimited!(log::Level::Warn, "virtio-fs: bad request buffers: {e}");
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => Writer::from(w),
        Err(e) => {
            crate::ratelimited!(log::Level::Warn, "virtio-fs: bad reply buffers: {e}");
            return 0;
        }
    };
    match server.handle_message(reader, writer, None, None) {
        Ok(n) => u32::try_from(n).unwrap_or(0),
        Err(e) => {
            crate::ratelimited!(log::Level::Warn, "virtio-fs: request failed: {e}");
            0
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        FS_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut config = [0u8; TAG_MAX + 4];
        let tag = self.tag.as_bytes();
        let n = tag.len().min(TAG_MAX);
        config[..n].copy_from_slice(&tag[..n]);
        config[TAG_MAX..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        crate::ratelimited!(
            log::Level::Debug,
            "virtio-fs: write to read-only config ignored"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        // A new driver starts with INIT; what the old one held is released.
        fuse_backend_rs::api::filesystem::FileSystem::destroy(&*self.fs);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn process(&mut self) {
        self.process_queues();
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    /// Only an unmounted device is saved: its queues and tag. The inodes and handles of a
    /// mounted filesystem are host descriptors a snapshot cannot carry.
    fn save_state(&self) -> Result<DeviceState, DeviceStateError> {
        if self.fs.is_mounted() {
            return Err(DeviceStateError::Busy(format!(
                "virtio-fs {:?} is mounted in the guest (snapshot before the sandbox mounts it)",
                self.tag
            )));
        }
        let queues = self.active.as_ref().map_or(&[][..], |a| &a.queues[..]);
        Ok(DeviceState::new(
            queues,
            DeviceKind::Fs {
                tag: self.tag.clone(),
            },
        ))
    }

    fn restore_state(&mut self, kind: &DeviceKind) -> Result<(), DeviceStateError> {
        match kind {
            DeviceKind::Fs { tag } if *tag == self.tag => Ok(()),
            DeviceKind::Fs { tag } => Err(DeviceStateError::Invalid(format!(
                "virtio-fs tag {tag:?} saved, {:?} here",
                self.tag
            ))),
            other => Err(DeviceStateError::Invalid(format!(
                "{other:?} is not a virtio-fs state"
            ))),
        }
    }
}

#[cfg(test)]
mod tests;

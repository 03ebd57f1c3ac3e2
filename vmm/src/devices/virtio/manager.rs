//! The virtio devices of a VM.
//!
//! [`DeviceConfig`] is the registry: one variant per device kind, and the few facts a VM needs
//! of each kind (its fixed virtio-mmio slot, how to create it, how a restore rebuilds it from
//! its saved identity and a new host [`Backend`]). [`DeviceManager`] holds the devices of one
//! VM, each on its transport, and attaches, starts, saves and restores them alike: adding a
//! device is its module plus one variant here (and one in
//! [`DeviceKind`](super::state::DeviceKind) for what its snapshot keeps).

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::fs::{Fs, FsConfig, FsError};
use super::mmio::{reg, MmioTransport};
use super::net::tap::Tap;
use super::net::{Net, NetConfig, NetError};
use super::state::{DeviceKind, DeviceStateError, MmioSnapshot};
use super::vsock::{Vsock, VsockConfig, VsockError};
use super::{event_loop, Interrupt, VirtioDevice};
use crate::arch::x86_64::layout::{virtio_slot, VIRTIO_MMIO_SIZE};
use crate::devices::bus::BusError;
use crate::devices::MmioBus;
use crate::memory::GuestMemoryMmap;

/// Errors of attaching, starting or restoring devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The devices asked for do not fit together, or do not fit the snapshot.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The vsock device.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The virtio-fs device.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The virtio-net device.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A KVM ioctl for a device failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The transport's register window overlaps another device.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A device thread could not start.
    #[error("cannot start the {what} thread")]
    Thread {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Saved device state does not fit the device.
    #[error("virtio device state")]
    State(#[from] DeviceStateError),
}

/// A virtio device to attach, with everything it needs on the host.
#[derive(Debug)]
pub enum DeviceConfig {
    /// virtio-vsock, hybrid: guest connections to the host end on a Unix socket.
    Vsock(VsockConfig),
    /// virtio-fs exporting one host directory.
    Fs(FsConfig),
    /// virtio-net on a tap (or on nothing yet).
    Net(NetConfig),
}

/// What a restored device runs on: the host side, which a snapshot cannot carry. The guest-
/// visible identity (a CID, a tag) comes from the snapshot.
#[derive(Debug)]
pub enum Backend {
    /// The new Unix socket of the vsock device.
    Vsock(PathBuf),
    /// The directory the virtio-fs device exports.
    Fs(PathBuf),
    /// The tap the virtio-net device runs on. A saved NIC given none runs on nothing (frames
    /// dropped), as in its template.
    Net(Tap),
}

impl DeviceConfig {
    /// The device kind's name, for logs and thread names.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceConfig::Vsock(_) => "vsock",
            DeviceConfig::Fs(_) => "virtio-fs",
            DeviceConfig::Net(_) => "virtio-net",
        }
    }

    /// The kind's virtio-mmio slot. Fixed per kind, so that a device's address never depends
    /// on which others exist (a snapshot's guest found each where a restore puts it).
    fn slot_index(&self) -> u32 {
        match self {
            DeviceConfig::Vsock(_) => 0,
            DeviceConfig::Fs(_) => 1,
            DeviceConfig::Net(_) => 2,
        }
    }

    /// The register window and GSI of the device.
    pub fn slot(&self) -> (u64, u32) {
        virtio_slot(self.slot_index())
    }

    /// Checks what can be checked before anything is created.
    pub fn validate(&self) -> Result<(), DeviceError> {
        match self {
            DeviceConfig::Vsock(_) | DeviceConfig::Net(_) => Ok(()),
            DeviceConfig::Fs(c) => c.validate().map(drop).map_err(Into::into),
        }
    }

    fn create(self) -> Result<Arc<Mutex<dyn VirtioDevice>>, DeviceError> {
        Ok(match self {
            DeviceConfig::Vsock(c) => Arc::new(Mutex::new(Vsock::new(&c)?)),
            DeviceConfig::Fs(c) => Arc::new(Mutex::new(Fs::new(&c)?)),
            DeviceConfig::Net(c) => Arc::new(Mutex::new(Net::new(c)?)),
        })
    }

    /// The device a restore creates for a saved `kind` that no backend was given for, if the
    /// kind can run without one.
    fn restored_alone(kind: &DeviceKind) -> Option<DeviceConfig> {
        match kind {
            DeviceKind::Net { mac } => Some(DeviceConfig::Net(NetConfig {
                mac: *mac,
                tap: None,
            })),
            DeviceKind::Vsock { .. } | DeviceKind::Fs { .. } => None,
        }
    }

    /// The device a restore creates for the saved `kind` on `backend`, or the backend back if
    /// it is of another kind.
    fn restored(kind: &DeviceKind, backend: Backend) -> Result<DeviceConfig, Backend> {
        match (kind, backend) {
            (DeviceKind::Vsock { guest_cid }, Backend::Vsock(uds_path)) => {
                Ok(DeviceConfig::Vsock(VsockConfig {
                    guest_cid: *guest_cid,
                    uds_path,
                }))
            }
            (DeviceKind::Fs { tag }, Backend::Fs(shared_dir)) => Ok(DeviceConfig::Fs(FsConfig {
                shared_dir,
                tag: tag.clone(),
            })),
            (DeviceKind::Net { mac }, Backend::Net(tap)) => Ok(DeviceConfig::Net(NetConfig {
                mac: *mac,
                tap: Some(tap),
            })),
            (_, backend) => Err(backend),
        }
    }
}

impl Backend {
    /// What a restore needs for a saved device of `kind` that was given no backend.
    fn missing(kind: &DeviceKind) -> String {
        match kind {
            DeviceKind::Vsock { .. } => {
                "the snapshot has a vsock device: a new host socket (--vsock-uds) is needed".into()
            }
            DeviceKind::Fs { tag } => format!(
                "the snapshot has a virtio-fs device (tag {tag:?}): a shared directory (--shared-dir) is needed"
            ),
            DeviceKind::Net { .. } => "the snapshot's virtio-net device needs no tap".into(),
        }
    }

    /// Why a backend with no saved device to run is refused.
    fn unused(&self) -> String {
        match self {
            Backend::Vsock(_) => {
                "the snapshot has no vsock device; --vsock-uds cannot be used with it".into()
            }
            Backend::Fs(_) => {
                "the snapshot has no virtio-fs device; --shared-dir cannot be used with it".into()
            }
            Backend::Net(_) => {
                "the snapshot has no virtio-net device; --net-fd cannot be used with it".into()
            }
        }
    }
}

/// The devices a restore re-creates: each saved device on the backend of its kind. Every saved
/// device needs one, and every backend needs a saved device.
pub fn restored_configs(
    saved: &[MmioSnapshot],
    backends: Vec<Backend>,
) -> Result<Vec<DeviceConfig>, DeviceError> {
    let mut backends: Vec<Option<Backend>> = backends.into_iter().map(Some).collect();
    let mut configs = Vec::with_capacity(saved.len());
    'saved: for device in saved {
        let kind = &device.device.kind;
        for slot in backends.iter_mut() {
            let Some(backend) = slot.take() else {
                continue;
            };
            match DeviceConfig::restored(kind, backend) {
                Ok(config) => {
                    configs.push(config);
                    continue 'saved;
                }
                Err(backend) => *slot = Some(backend),
            }
        }
        match DeviceConfig::restored_alone(kind) {
            Some(config) => configs.push(config),
            None => return Err(DeviceError::Config(Backend::missing(kind))),
        }
    }
    if let Some(unused) = backends.into_iter().flatten().next() {
        return Err(DeviceError::Config(unused.unused()));
    }
    Ok(configs)
}

/// Adds the guest kernel's `virtio_mmio.device=` argument of every device.
pub fn add_to_cmdline(configs: &[DeviceConfig], cmdline: &mut Cmdline) -> Result<(), String> {
    for config in configs {
        let (base, gsi) = config.slot();
        cmdline
            .add_virtio_mmio_device(VIRTIO_MMIO_SIZE, GuestAddress(base), gsi, None)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// One attached device.
struct Attached {
    name: &'static str,
    device: Arc<Mutex<dyn VirtioDevice>>,
    transport: Arc<Mutex<MmioTransport>>,
}

/// The virtio devices of one VM, in slot order.
#[derive(Default)]
pub struct DeviceManager {
    devices: Vec<Attached>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|d| d.name))
            .finish()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The devices of a paused VM with their threads held off, and their saved state.
pub struct Quiesced<'a> {
    _held: Vec<MutexGuard<'a, dyn VirtioDevice>>,
    /// Each transport with its device, in slot order.
    pub saved: Vec<MmioSnapshot>,
}

impl std::fmt::Debug for Quiesced<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quiesced")
            .field("devices", &self.saved.len())
            .finish()
    }
}

impl DeviceManager {
    /// Creates every device in `configs` and attaches it on its transport in `mmio`: an irqfd
    /// for its GSI, an ioeventfd per queue.
    pub fn attach(
        fd: &VmFd,
        mem: &GuestMemoryMmap,
        mmio: &mut MmioBus,
        mut configs: Vec<DeviceConfig>,
    ) -> Result<DeviceManager, DeviceError> {
        configs.sort_by_key(DeviceConfig::slot_index);
        if let Some(pair) = configs
            .windows(2)
            .find(|p| p[0].slot_index() == p[1].slot_index())
        {
            return Err(DeviceError::Config(format!(
                "at most one {} device is supported",
                pair[0].name()
            )));
        }
        let mut devices = Vec::with_capacity(configs.len());
        for config in configs {
            let (base, gsi) = config.slot();
            let name = config.name();
            let device = config.create()?;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
            fd.register_irqfd(&irqfd, gsi)
                .map_err(|source| DeviceError::Kvm {
                    what: "register a virtio irqfd",
                    source,
                })?;
            let notify = IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY);
            for (index, evt) in lock(&device).queue_events().iter().enumerate() {
                fd.register_ioevent(evt, &notify, index as u32)
                    .map_err(|source| DeviceError::Kvm {
                        what: "register a virtio queue ioeventfd",
                        source,
                    })?;
            }
            let transport = Arc::new(Mutex::new(MmioTransport::new(
                device.clone(),
                mem.clone(),
                Interrupt::new(irqfd),
            )));
            mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone())?;
            devices.push(Attached {
                name,
                device,
                transport,
            });
        }
        Ok(DeviceManager { devices })
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether the VM has no virtio device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Starts one thread per device, each ending once `stop_fd` is readable. After a restore,
    /// each device first hears that it was restored.
    pub fn start(
        &self,
        stop_fd: RawFd,
        restored: bool,
    ) -> Result<Vec<JoinHandle<()>>, DeviceError> {
        let mut threads = Vec::with_capacity(self.devices.len());
        for d in &self.devices {
            if restored {
                lock(&d.device).restored();
            }
            let thread =
                event_loop::spawn(d.name, d.device.clone(), stop_fd).map_err(|source| {
                    DeviceError::Thread {
                        what: d.name,
                        source,
                    }
                })?;
            threads.push(thread);
        }
        Ok(threads)
    }

    /// Holds every device thread off and saves each transport with its device. Every device
    /// is asked before anything is written, so a refusal (a busy or unsupported device)
    /// leaves nothing on disk; the threads stay held off until the [`Quiesced`] drops, so
    /// none writes guest memory after its state was saved.
    pub fn quiesce(&self) -> Result<Quiesced<'_>, DeviceError> {
        let held: Vec<_> = self.devices.iter().map(|d| lock(&*d.device)).collect();
        let mut saved = Vec::with_capacity(held.len());
        for (d, device) in self.devices.iter().zip(&held) {
            let state = device.save_state()?;
            saved.push(lock(&d.transport).save_with(state));
        }
        Ok(Quiesced { _held: held, saved })
    }

    /// Restores each transport and its device from `saved` (in slot order, as
    /// [`DeviceManager::quiesce`] saved them).
    pub fn restore(&self, saved: &[MmioSnapshot]) -> Result<(), DeviceError> {
        if saved.len() != self.devices.len() {
            return Err(DeviceError::Config(format!(
                "{} virtio devices saved, {} built",
                saved.len(),
                self.devices.len()
            )));
        }
        for (d, state) in self.devices.iter().zip(saved) {
            lock(&d.transport).restore(state)?;
        }
        Ok(())
    }

    /// Runs `f` on the device of type `D`, if the VM has one.
    pub fn with<D: VirtioDevice, R>(&self, f: impl FnOnce(&D) -> R) -> Option<R> {
        let mut f = Some(f);
        self.devices.iter().find_map(|d| {
            let guard = lock(&*d.device);
            let device = guard.as_any().downcast_ref::<D>()?;
            f.take().map(|f| f(device))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::devices::virtio::state::DeviceState;

    fn saved(kind: DeviceKind) -> MmioSnapshot {
        MmioSnapshot {
            device_type: 0,
            status: 0,
            acked_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues: Vec::new(),
            bad_size: Vec::new(),
            interrupt_status: 0,
            config_generation: 0,
            activated: false,
            device: DeviceState {
                queues: Vec::new(),
                kind,
            },
        }
    }

    #[test]
    fn slots_are_fixed_per_kind() {
        let vsock = DeviceConfig::Vsock(VsockConfig {
            guest_cid: 3,
            uds_path: "/x".into(),
        });
        let fs = DeviceConfig::Fs(FsConfig {
            shared_dir: "/x".into(),
            tag: "t".into(),
        });
        assert_eq!(vsock.slot(), (0xd000_0000, 5));
        assert_eq!(fs.slot(), (0xd000_1000, 6));
    }

    #[test]
    fn a_restore_pairs_each_saved_device_with_the_backend_of_its_kind() {
        let devices = [
            saved(DeviceKind::Vsock { guest_cid: 7 }),
            saved(DeviceKind::Fs { tag: "pod".into() }),
        ];
        // Given in the other order: pairing is by kind.
        let configs = restored_configs(
            &devices,
            vec![
                Backend::Fs("/shared".into()),
                Backend::Vsock("/v.sock".into()),
            ],
        )
        .unwrap();
        assert!(matches!(
            &configs[0],
            DeviceConfig::Vsock(VsockConfig { guest_cid: 7, uds_path }) if uds_path.to_str() == Some("/v.sock")
        ));
        assert!(matches!(
            &configs[1],
            DeviceConfig::Fs(FsConfig { tag, shared_dir }) if tag == "pod" && shared_dir.to_str() == Some("/shared")
        ));
    }

    #[test]
    fn a_saved_nic_runs_on_the_given_tap_or_on_nothing() {
        let mac = [2, 0, 0, 0, 0, 9];
        let devices = [
            saved(DeviceKind::Vsock { guest_cid: 3 }),
            saved(DeviceKind::Net { mac }),
        ];
        let configs = restored_configs(&devices, vec![Backend::Vsock("/v".into())]).unwrap();
        assert!(matches!(
            &configs[1],
            DeviceConfig::Net(NetConfig { mac: m, tap: None }) if *m == mac
        ));
        assert_eq!(configs[1].slot(), (0xd000_2000, 7));
        // A tap for a snapshot without a NIC is refused.
        let tap = std::thread::spawn(|| {
            // SAFETY: unshare(2) of this thread's network namespace; no memory is passed.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(r, 0);
            Tap::create("nstest1").unwrap()
        })
        .join()
        .unwrap();
        let err = restored_configs(
            &devices[..1],
            vec![Backend::Vsock("/v".into()), Backend::Net(tap)],
        )
        .unwrap_err();
        assert!(err.to_string().contains("--net-fd cannot be used"), "{err}");
    }

    #[test]
    fn a_restore_refuses_missing_and_unused_backends() {
        let devices = [saved(DeviceKind::Vsock { guest_cid: 3 })];
        let err = restored_configs(&devices, Vec::new()).unwrap_err();
        assert!(err.to_string().contains("--vsock-uds) is needed"), "{err}");
        let err = restored_configs(
            &devices,
            vec![Backend::Vsock("/v".into()), Backend::Fs("/d".into())],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("--shared-dir cannot be used"),
            "{err}"
        );
        let err = restored_configs(
            &devices,
            vec![Backend::Vsock("/v".into()), Backend::Vsock("/w".into())],
        )
        .unwrap_err();
        assert!(err.to_string().contains("no vsock device"), "{err}");
    }
}

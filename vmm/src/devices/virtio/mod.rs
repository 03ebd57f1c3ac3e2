//! Virtio devices behind the virtio-mmio transport.

pub mod event_loop;
pub mod fs;
pub mod manager;
pub mod mmio;
pub mod net;
pub mod state;
pub mod vsock;

use std::any::Any;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use self::state::{DeviceKind, DeviceState, DeviceStateError};
use crate::memory::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: a modern (virtio 1.x) device; the only kind the transport accepts.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: the device used buffers in a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1 << 0;
/// Interrupt status bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 1 << 1;

/// Errors of activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver gave a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// What the device has.
        expected: usize,
        /// What it got.
        got: usize,
    },
    /// The device could not start.
    #[error("device failed to start: {0}")]
    Device(String),
}

/// A host descriptor a device's thread waits on besides the queue notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostEvent {
    /// The descriptor; it stays open as long as the device.
    pub fd: RawFd,
    /// Edge-triggered: the device reads it until `EAGAIN` whenever it is woken (a device that
    /// sometimes leaves data unread, such as a NIC without guest buffers, needs this to avoid
    /// spinning); level-triggered otherwise.
    pub edge: bool,
}

/// A device the transport serves: identity, features, config space, queues; and what its
/// thread (the one [`event_loop`] shape every device shares) waits on and does when woken.
pub trait VirtioDevice: Send + Any {
    /// Virtio device id (19 for vsock, 26 for virtio-fs).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the number of queues is its length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (ignored by read-only configs).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK with valid queues: start serving them.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop serving queues, drop per-driver state.
    fn reset(&mut self);
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// Host descriptors the device's thread also waits on (sockets, a tap).
    fn host_events(&self) -> Vec<HostEvent> {
        Vec::new()
    }
    /// The driver notified queue `index` (its eventfd is already read). Processing happens in
    /// [`VirtioDevice::process`]; this only records what the notification means.
    fn queue_notified(&mut self, index: usize) {
        let _ = index;
    }
    /// Serves whatever is pending: guest buffers and host descriptors. Called by the device's
    /// thread after every wakeup.
    fn process(&mut self);
    /// The VM was restored from a snapshot and is about to run again.
    fn restored(&mut self) {}
    /// The device as `Any`, so that the VM can hand out a typed view of it.
    fn as_any(&self) -> &dyn Any;
    /// Saves the device's state for a snapshot (the VM is paused). Devices without snapshot
    /// support keep this default, which refuses.
    fn save_state(&self) -> Result<DeviceState, DeviceStateError> {
        Err(DeviceStateError::Unsupported {
            device_type: self.device_type(),
        })
    }
    /// Sets the device-specific state of a restored device (after the transport re-activated
    /// it with the saved queues, if it was active).
    fn restore_state(&mut self, kind: &DeviceKind) -> Result<(), DeviceStateError> {
        let _ = kind;
        Err(DeviceStateError::Unsupported {
            device_type: self.device_type(),
        })
    }
}

/// The device's interrupt: status bits the driver reads and acks, and the irqfd that raises
/// the GSI.
#[derive(Debug, Clone)]
pub struct Interrupt {
    inner: Arc<InterruptInner>,
}

#[derive(Debug)]
struct InterruptInner {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            inner: Arc::new(InterruptInner {
                status: AtomicU32::new(0),
                irqfd,
            }),
        }
    }

    /// The irqfd, for registering with KVM.
    pub fn irqfd(&self) -> &EventFd {
        &self.inner.irqfd
    }

    /// Sets `bit` in the interrupt status and raises the interrupt.
    pub fn trigger(&self, bit: u32) {
        self.inner.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.inner.irqfd.write(1) {
            crate::ratelimited!(log::Level::Warn, "cannot raise a virtio interrupt: {e}");
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.inner.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.inner.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status register (restore).
    pub fn set_status(&self, bits: u32) {
        self.inner.status.store(bits, Ordering::SeqCst);
    }

    /// Clears every status bit (device reset).
    pub fn clear(&self) {
        self.inner.status.store(0, Ordering::SeqCst);
    }
}

/// Copies the bytes of a device's config space `config` at `offset` into `data`; bytes past
/// its end read as 0 (the guest chooses the offset and the length).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

//! Saved state of virtio devices: the virtio-mmio transport's registers and queues, and each
//! device's own part.
//!
//! A device that can be snapshotted returns a [`DeviceState`] from
//! [`VirtioDevice::save_state`](super::VirtioDevice::save_state); one that cannot keeps the
//! trait's default, which refuses the snapshot with [`DeviceStateError::Unsupported`]. Adding a
//! device means adding a variant to [`DeviceKind`] (which changes the format version).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

/// Errors of saving or restoring a device's state.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// The device has no snapshot support.
    #[error("snapshot of virtio device type {device_type} is not supported yet")]
    Unsupported {
        /// Virtio device id.
        device_type: u32,
    },
    /// The device is busy in a way a snapshot cannot capture.
    #[error("{0}")]
    Busy(String),
    /// The saved state does not fit this device.
    #[error("saved device state is invalid: {0}")]
    Invalid(String),
}

/// A virtqueue: the driver's setup and where the device stands in the rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Queue ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring index the device reads.
    pub next_avail: u16,
    /// Next used-ring index the device writes.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx: bool,
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    /// A queue with this state; sizes that are not powers of two (or above the maximum) are
    /// refused.
    pub fn to_queue(&self) -> Result<Queue, DeviceStateError> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| DeviceStateError::Invalid(format!("queue: {e}")))
    }
}

/// What a device saves: its live queues (empty unless activated) and its own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The queues the device serves, with its ring positions; empty if not activated.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state.
    pub kind: DeviceKind,
}

impl DeviceState {
    /// The state of a device serving `queues` (empty if not activated).
    pub fn new(queues: &[Queue], kind: DeviceKind) -> Self {
        DeviceState {
            queues: queues.iter().map(QueueSnapshot::from).collect(),
            kind,
        }
    }
}

/// The device-specific part of a [`DeviceState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// virtio-vsock: only its CID; connections are never saved (a snapshot with open
    /// connections is refused).
    Vsock {
        /// The guest's context id.
        guest_cid: u64,
    },
    /// virtio-fs: only its tag. A snapshot is taken before the guest mounts it (a mounted
    /// filesystem's inodes and handles are host descriptors, which cannot be saved); the
    /// restored device exports whatever directory the new VMM is given.
    Fs {
        /// The tag the guest mounts.
        tag: String,
    },
    /// virtio-net: its MAC (the config space's). The tap is the host's: a restore attaches
    /// the new VM's, or none.
    Net {
        /// The MAC address in the config space.
        mac: [u8; 6],
    },
}

/// The virtio-mmio transport's registers and its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSnapshot {
    /// Virtio device id.
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// The queue registers as the driver set them.
    pub queues: Vec<QueueSnapshot>,
    /// Queues whose size the driver set to an invalid value.
    pub bad_size: Vec<bool>,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Whether the device was serving its queues.
    pub activated: bool,
    /// The device.
    pub device: DeviceState,
}

//! virtio-net (device id 1) on a tap: the pod's NIC.
//!
//! Two queues (receive 0, transmit 1), no control queue. Every frame crosses with the 12-byte
//! `virtio_net_hdr_v1`, which the tap reads and writes as is (`IFF_VNET_HDR`): checksum and TSO
//! offloads pass through both ways as the driver acks them, so a TCP stream moves in 64 KiB
//! frames rather than 1,500-byte ones. Receive buffers are mergeable (`VIRTIO_NET_F_MRG_RXBUF`):
//! the guest posts page-sized buffers and a large frame spans several, its header saying how
//! many. The device offers no MTU (`VIRTIO_NET_F_MTU`): the guest's maximum stays 65,535, and
//! the agent sets the pod's MTU, as it sets the pod's MAC.
//!
//! A device may have no tap (a template VM, a pod without a network): frames the guest sends
//! are dropped, none arrive; a restore attaches the pod's tap.
//!
//! Everything in a descriptor is the guest's: a transmit chain with a device-writable
//! descriptor, shorter than the header, longer than [`MAX_FRAME`], or outside guest RAM is
//! returned unused (length 0), logged at a bounded rate, and the device goes on. One receive
//! frame may wait for buffers (a guest that stops giving them stalls only its own traffic:
//! the tap's queue fills and the host kernel drops); nothing grows with what the guest does.

pub mod tap;

use std::io;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use self::tap::{Tap, VNET_HDR_LEN};
use super::state::{DeviceKind, DeviceState, DeviceStateError};
use super::{
    ActivateError, HostEvent, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};
use crate::memory::GuestMemoryMmap;

/// Virtio device id of a network card.
pub const NET_DEVICE_ID: u32 = 1;

/// Feature bits (virtio 1.2, 5.1.3).
pub mod features {
    #![allow(missing_docs)]
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

/// The features this device offers.
const OFFERED: u64 = VIRTIO_F_VERSION_1
    | features::CSUM
    | features::GUEST_CSUM
    | features::MAC
    | features::GUEST_TSO4
    | features::GUEST_TSO6
    | features::GUEST_ECN
    | features::HOST_TSO4
    | features::HOST_TSO6
    | features::HOST_ECN
    | features::MRG_RXBUF
    | features::STATUS;

/// Largest frame, header included: a 64 KiB IP packet in an Ethernet frame with a VLAN tag.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_535 + 14 + 4;

const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Transmit chains served before receive gets its turn.
const TX_BATCH: usize = 128;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_AT: usize = 10;
/// `VIRTIO_NET_S_LINK_UP`.
const LINK_UP: u16 = 1;

/// Errors of setting up the device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap.
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    /// An eventfd could not be created.
    #[error("cannot create the virtio-net event descriptors")]
    Events(#[source] io::Error),
}

/// Configuration of the virtio-net device.
#[derive(Debug)]
pub struct NetConfig {
    /// The MAC address in the config space (what the guest driver starts with).
    pub mac: [u8; 6],
    /// The tap; none: frames are dropped until a restore attaches one.
    pub tap: Option<Tap>,
}

/// The MAC of a NIC nobody named: locally administered, unicast ("NS" and 1).
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x4e, 0x53, 0x00, 0x00, 0x01];

/// Frames and bytes each way, and what was dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames the guest sent that reached the tap.
    pub tx_frames: u64,
    /// Their bytes (headers not counted).
    pub tx_bytes: u64,
    /// Frames the guest sent that were dropped (malformed, no tap, tap full).
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes (headers not counted).
    pub rx_bytes: u64,
    /// Frames from the tap that could not be delivered (too large for the guest's buffers).
    pub rx_dropped: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Interrupt,
    mergeable: bool,
}

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    tap: Option<Tap>,
    queue_evts: Vec<EventFd>,
    active: Option<Active>,
    /// One frame read from the tap, waiting for receive buffers (its length in `pending_len`).
    frame: Vec<u8>,
    pending_len: Option<usize>,
    tx_buf: Vec<u8>,
    counters: NetCounters,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .field("tap", &self.tap.as_ref().map(Tap::name))
            .field("active", &self.active.is_some())
            .field("counters", &self.counters)
            .finish()
    }
}

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// The guest-memory pieces of a chain, in order: (address, length).
fn segments(
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    writable: bool,
) -> Option<Vec<(GuestAddress, usize)>> {
    let mut out = Vec::new();
    let mut total = 0usize;
    for desc in chain {
        if desc.is_write_only() != writable {
            return None;
        }
        let len = desc.len() as usize;
        total = total.checked_add(len)?;
        if total > MAX_FRAME + 4096 {
            return None;
        }
        // The whole range must be guest RAM.
        if len > 0 {
            let last = desc.addr().checked_add(len as u64 - 1)?;
            if !mem.address_in_range(desc.addr()) || !mem.address_in_range(last) {
                return None;
            }
        }
        out.push((desc.addr(), len));
    }
    Some(out)
}

impl Net {
    /// Creates the device.
    pub fn new(config: NetConfig) -> Result<Net, NetError> {
        let queue_evts = (0..QUEUE_SIZES.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(NetError::Events)?;
        Ok(Net {
            mac: config.mac,
            tap: config.tap,
            queue_evts,
            active: None,
            frame: vec![0; MAX_FRAME],
            pending_len: None,
            tx_buf: vec![0; MAX_FRAME],
            counters: NetCounters::default(),
        })
    }

    /// What crossed so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Whether the device has a tap.
    pub fn has_tap(&self) -> bool {
        self.tap.is_some()
    }

    /// The offloads the tap may hand the guest, from the acked features.
    fn tap_offloads(acked: u64) -> libc::c_uint {
        let mut flags = 0;
        if acked & features::GUEST_CSUM != 0 {
            flags |= libc::TUN_F_CSUM;
            if acked & features::GUEST_TSO4 != 0 {
                flags |= libc::TUN_F_TSO4;
            }
            if acked & features::GUEST_TSO6 != 0 {
                flags |= libc::TUN_F_TSO6;
            }
            if acked & features::GUEST_ECN != 0
                && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0
            {
                flags |= libc::TUN_F_TSO_ECN;
            }
        }
        flags
    }

    /// Sends every frame the guest queued to the tap (at most [`TX_BATCH`]). Returns whether
    /// it used buffers.
    pub fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = active.mem.clone();
        let queue = &mut active.queues[TXQ];
        let mut used = 0;
        while used < TX_BATCH {
            let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let mut len = 0usize;
            let ok = match segments(&mem, chain, false) {
                Some(segs) => segs.iter().all(|&(addr, n)| {
                    let fits = len + n <= MAX_FRAME
                        && mem.read_slice(&mut self.tx_buf[len..len + n], addr).is_ok();
                    len += n;
                    fits
                }),
                None => false,
            };
            if !ok || len < VNET_HDR_LEN {
                crate::ratelimited!(
                    log::Level::Warn,
                    "virtio-net: malformed transmit chain ({len} bytes) dropped"
                );
                self.counters.tx_dropped += 1;
            } else if let Some(tap) = &self.tap {
                match tap.write(&self.tx_buf[..len]) {
                    Ok(_) => {
                        self.counters.tx_frames += 1;
                        self.counters.tx_bytes += (len - VNET_HDR_LEN) as u64;
                    }
                    Err(e) => {
                        // A full tap drops, as a NIC would.
                        crate::ratelimited!(log::Level::Debug, "virtio-net: tap write: {e}");
                        self.counters.tx_dropped += 1;
                    }
                }
            } else {
                self.counters.tx_dropped += 1;
            }
            if let Err(e) = queue.add_used(&mem, head, 0) {
                crate::ratelimited!(log::Level::Warn, "virtio-net: cannot return a buffer: {e}");
            }
            used += 1;
        }
        if used > 0 {
            active.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
        used > 0
    }

    /// Delivers frames from the tap until it has none (`EAGAIN`) or the guest has no buffers
    /// (the frame then waits). Returns the number of frames delivered.
    pub fn process_rx(&mut self) -> usize {
        let mut delivered = 0;
        loop {
            let len = match self.pending_len {
                Some(len) => len,
                None => {
                    let Some(tap) = &self.tap else { break };
                    if self.active.is_none() {
                        break;
                    }
                    match tap.read(&mut self.frame) {
                        Ok(n) if n > VNET_HDR_LEN => n,
                        Ok(_) => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            crate::ratelimited!(log::Level::Warn, "virtio-net: tap read: {e}");
                            break;
                        }
                    }
                }
            };
            match self.deliver(len) {
                Delivery::Done => {
                    self.pending_len = None;
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += (len - VNET_HDR_LEN) as u64;
                    delivered += 1;
                }
                Delivery::Dropped => {
                    self.pending_len = None;
                    self.counters.rx_dropped += 1;
                }
                Delivery::NoBuffers => {
                    self.pending_len = Some(len);
                    break;
                }
            }
        }
        if delivered > 0 {
            if let Some(active) = &self.active {
                active.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
            }
        }
        delivered
    }

    /// Puts `self.frame[..len]` into receive buffers: one, or with mergeable buffers as many
    /// as it needs.
    fn deliver(&mut self, len: usize) -> Delivery {
        let Some(active) = self.active.as_mut() else {
            return Delivery::NoBuffers;
        };
        let mem = active.mem.clone();
        let mergeable = active.mergeable;
        let queue = &mut active.queues[RXQ];
        let frame = &self.frame[..len];
        // (head, bytes written) of each buffer used, and where num_buffers goes.
        let mut used: Vec<(u16, u32)> = Vec::new();
        let mut header_at: Option<GuestAddress> = None;
        let mut written = 0usize;
        while written < len {
            let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                // Not enough buffers: give back what was taken, wait for more.
                for _ in 0..used.len() {
                    queue.go_to_previous_position();
                }
                return Delivery::NoBuffers;
            };
            let head = chain.head_index();
            let Some(segs) = segments(&mem, chain, true) else {
                crate::ratelimited!(log::Level::Warn, "virtio-net: malformed receive buffer");
                // Returned unused; the frame goes on into the next buffer.
                used.push((head, 0));
                continue;
            };
            let mut n = 0usize;
            for (addr, cap) in segs {
                let take = cap.min(len - written);
                if take == 0 {
                    break;
                }
                // The header must sit whole in the frame's first segment.
                if written == 0 && take >= VNET_HDR_LEN {
                    header_at = Some(addr);
                }
                if mem
                    .write_slice(&frame[written..written + take], addr)
                    .is_err()
                {
                    break;
                }
                written += take;
                n += take;
            }
            used.push((head, n as u32));
            if !mergeable && written < len {
                // One buffer must hold the frame: too large for this guest's buffers.
                for (head, _) in &used {
                    let _ = queue.add_used(&mem, *head, 0);
                }
                crate::ratelimited!(
                    log::Level::Debug,
                    "virtio-net: a {len}-byte frame does not fit a receive buffer"
                );
                return Delivery::Dropped;
            }
            if used.len() >= usize::from(QUEUE_SIZE) {
                break;
            }
        }
        let buffers = used.iter().filter(|(_, n)| *n > 0).count() as u16;
        match header_at {
            Some(at) if written == len => {
                let _ = mem.write_obj(buffers.to_le(), at.unchecked_add(NUM_BUFFERS_AT as u64));
            }
            _ => {
                for (head, _) in &used {
                    let _ = queue.add_used(&mem, *head, 0);
                }
                return Delivery::Dropped;
            }
        }
        for (head, n) in used {
            if let Err(e) = queue.add_used(&mem, head, n) {
                crate::ratelimited!(log::Level::Warn, "virtio-net: cannot return a buffer: {e}");
            }
        }
        Delivery::Done
    }
}

enum Delivery {
    Done,
    Dropped,
    NoBuffers,
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        NET_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        OFFERED
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs; }
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        crate::ratelimited!(
            log::Level::Debug,
            "virtio-net: write to the config space ignored"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        if let Some(tap) = &self.tap {
            tap.set_offload(Self::tap_offloads(acked_features))
                .map_err(|e| ActivateError::Device(e.to_string()))?;
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
            mergeable: acked_features & features::MRG_RXBUF != 0,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.pending_len = None;
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The tap, edge-triggered: receive reads it until `EAGAIN` or until the guest has no
    /// buffers, and goes on when the guest gives some (a receive-queue notification).
    fn host_events(&self) -> Vec<HostEvent> {
        use std::os::fd::AsRawFd;
        self.tap
            .iter()
            .map(|t| HostEvent {
                fd: t.as_raw_fd(),
                edge: true,
            })
            .collect()
    }

    fn process(&mut self) {
        self.process_tx();
        self.process_rx();
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    /// The queues and the MAC. A frame waiting for buffers is not saved (a NIC may drop).
    fn save_state(&self) -> Result<DeviceState, DeviceStateError> {
        let queues = self.active.as_ref().map_or(&[][..], |a| &a.queues[..]);
        Ok(DeviceState::new(queues, DeviceKind::Net { mac: self.mac }))
    }

    fn restore_state(&mut self, kind: &DeviceKind) -> Result<(), DeviceStateError> {
        match kind {
            DeviceKind::Net { mac } if *mac == self.mac => Ok(()),
            DeviceKind::Net { mac } => Err(DeviceStateError::Invalid(format!(
                "virtio-net MAC {mac:02x?} saved, {:02x?} here",
                self.mac
            ))),
            other => Err(DeviceStateError::Invalid(format!(
                "{other:?} is not a virtio-net state"
            ))),
        }
    }
}

#[cfg(test)]
mod tests;

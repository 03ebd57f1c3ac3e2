//! The virtio-mmio transport, version 2 (virtio 1.x "modern" devices only).
//!
//! The register state machine follows the virtio 1.2 spec, section 4.2.2. Whatever the driver
//! writes is checked: features outside the offer or without `VIRTIO_F_VERSION_1` leave
//! FEATURES_OK unset; queue sizes must be powers of two up to the maximum; queue addresses must
//! lie in guest RAM (checked with `Queue::is_valid` when a queue is made ready and again at
//! DRIVER_OK). A bad setup sets DEVICE_NEEDS_RESET; nothing the driver writes panics.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};

use super::state::{DeviceState, DeviceStateError, MmioSnapshot, QueueSnapshot};
use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;
use crate::memory::GuestMemoryMmap;

/// Size of one device's register window; devices sit this far apart.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
/// Our vendor id ("NUTS" would do as well; anything but 0xffff).
const VENDOR_ID: u32 = 0x5354_554e;

/// Register offsets.
pub mod reg {
    #![allow(missing_docs)]
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    #![allow(missing_docs)]
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// One device behind the virtio-mmio register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    device_type: u32,
    avail_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    acked_beyond_64: bool,
    queue_sel: u32,
    queues: Vec<Queue>,
    /// A queue whose size the driver set to an invalid value cannot be made ready.
    bad_size: Vec<bool>,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish()
    }
}

fn lock<'a>(
    device: &'a Mutex<dyn VirtioDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_low(value: &mut u64, low: u32) {
    *value = (*value & !0xffff_ffff) | u64::from(low);
}

fn set_high(value: &mut u64, high: u32) {
    *value = (*value & 0xffff_ffff) | (u64::from(high) << 32);
}

impl MmioTransport {
    /// A transport for `device`, raising `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
    ) -> Self {
        let (device_type, avail_features, queues) = {
            let d = lock(&device);
            let queues: Vec<Queue> = d
                .queue_max_sizes()
                .iter()
                // `Queue::new` only fails for sizes that are not powers of two; devices use
                // valid constants, and an invalid one just leaves the queue out.
                .filter_map(|max| Queue::new(*max).ok())
                .collect();
            (d.device_type(), d.avail_features(), queues)
        };
        let bad_size = vec![false; queues.len()];
        MmioTransport {
            device,
            mem,
            interrupt,
            device_type,
            avail_features,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            acked_beyond_64: false,
            queue_sel: 0,
            queues,
            bad_size,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is serving its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may be written between FEATURES_OK and DRIVER_OK only.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                crate::ratelimited!(
                    log::Level::Debug,
                    "virtio-mmio: read of write-only or unknown register {offset:#x}"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                if self.status & (status::DRIVER | status::FEATURES_OK) != status::DRIVER {
                    self.refuse("driver features written outside feature negotiation");
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.acked_features, value),
                    1 => set_high(&mut self.acked_features, value),
                    // Pages beyond 64 bits: nothing is offered there, so nothing may be acked.
                    _ => self.acked_beyond_64 |= value != 0,
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.with_queue_setup(|t, idx| {
                let size = u16::try_from(value).unwrap_or(0);
                let ok = t.queues[idx].try_set_size(size).is_ok();
                t.bad_size[idx] = !ok;
                if !ok {
                    crate::ratelimited!(
                        log::Level::Warn,
                        "virtio-mmio: invalid queue size {value}"
                    );
                }
            }),
            reg::QUEUE_READY => self.with_queue_setup(|t, idx| t.set_queue_ready(idx, value == 1)),
            reg::QUEUE_DESC_LOW => self
                .with_queue_setup(|t, idx| t.queues[idx].set_desc_table_address(Some(value), None)),
            reg::QUEUE_DESC_HIGH => self
                .with_queue_setup(|t, idx| t.queues[idx].set_desc_table_address(None, Some(value))),
            reg::QUEUE_AVAIL_LOW => self
                .with_queue_setup(|t, idx| t.queues[idx].set_avail_ring_address(Some(value), None)),
            reg::QUEUE_AVAIL_HIGH => self
                .with_queue_setup(|t, idx| t.queues[idx].set_avail_ring_address(None, Some(value))),
            reg::QUEUE_USED_LOW => self
                .with_queue_setup(|t, idx| t.queues[idx].set_used_ring_address(Some(value), None)),
            reg::QUEUE_USED_HIGH => self
                .with_queue_setup(|t, idx| t.queues[idx].set_used_ring_address(None, Some(value))),
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            _ => crate::ratelimited!(
                log::Level::Debug,
                "virtio-mmio: write to read-only or unknown register {offset:#x}"
            ),
        }
    }

    /// Runs `f` on the selected queue if queue setup is allowed now and the queue exists.
    fn with_queue_setup(&mut self, f: impl FnOnce(&mut Self, usize)) {
        let idx = self.queue_sel as usize;
        if !self.queue_setup_allowed() || idx >= self.queues.len() {
            self.refuse("queue register written outside queue setup or for a missing queue");
            return;
        }
        if self.queues[idx].ready() {
            // The spec forbids changing a live queue; only un-readying is allowed.
            if let Some(q) = self.selected_queue() {
                q.set_ready(false);
            }
        }
        f(self, idx);
    }

    fn set_queue_ready(&mut self, idx: usize, ready: bool) {
        let q = &mut self.queues[idx];
        q.set_ready(ready);
        if ready && (self.bad_size[idx] || !q.is_valid(&self.mem)) {
            q.set_ready(false);
            crate::ratelimited!(
                log::Level::Warn,
                "virtio-mmio: queue {idx} refused: size or addresses outside guest memory"
            );
            self.status |= status::DEVICE_NEEDS_RESET;
        }
    }

    fn refuse(&self, what: &str) {
        crate::ratelimited!(log::Level::Warn, "virtio-mmio: {what}; ignored");
    }

    fn notify(&mut self, queue: u32) {
        if !self.activated {
            return;
        }
        let device = lock(&self.device);
        if let Some(evt) = device.queue_events().get(queue as usize) {
            if let Err(e) = evt.write(1) {
                crate::ratelimited!(log::Level::Warn, "virtio-mmio: cannot signal queue: {e}");
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, one step at a time, in the spec's order.
        let new = value & !self.status;
        if value & self.status != self.status {
            self.refuse("status bits cleared without a reset");
            return;
        }
        match new {
            status::ACKNOWLEDGE if self.status == 0 => self.status = value,
            status::DRIVER if self.status == status::ACKNOWLEDGE => self.status = value,
            status::FEATURES_OK if self.status == status::ACKNOWLEDGE | status::DRIVER => {
                let unknown = self.acked_features & !self.avail_features;
                if unknown != 0
                    || self.acked_beyond_64
                    || self.acked_features & VIRTIO_F_VERSION_1 == 0
                {
                    // FEATURES_OK stays unset: the driver reads it back and gives up.
                    crate::ratelimited!(
                        log::Level::Warn,
                        "virtio-mmio: driver features {:#x} refused (offered {:#x}, VERSION_1 required)",
                        self.acked_features,
                        self.avail_features
                    );
                } else {
                    self.status = value;
                }
            }
            status::DRIVER_OK
                if self.status == status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK =>
            {
                self.status = value;
                self.activate();
            }
            status::FAILED => self.status |= status::FAILED,
            _ => self.refuse("invalid device status transition"),
        }
    }

    fn activate(&mut self) {
        let all_valid = self
            .queues
            .iter()
            .zip(&self.bad_size)
            .all(|(q, bad)| !bad && q.ready() && q.is_valid(&self.mem));
        if !all_valid {
            crate::ratelimited!(
                log::Level::Warn,
                "virtio-mmio: DRIVER_OK with a queue not ready or outside guest memory"
            );
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        // The device gets its own copies of the queues; the transport keeps the registers.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let result = match queues {
            Ok(queues) => lock(&self.device).activate(
                self.mem.clone(),
                self.acked_features,
                queues,
                self.interrupt.clone(),
            ),
            Err(e) => Err(super::ActivateError::Device(format!("invalid queue: {e}"))),
        };
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                crate::ratelimited!(log::Level::Warn, "virtio-mmio: activation failed: {e}");
                self.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        self.activated = false;
        self.status = 0;
        self.acked_features = 0;
        self.acked_beyond_64 = false;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.bad_size.fill(false);
        self.interrupt.clear();
    }
}

impl MmioTransport {
    /// The device behind the transport.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// Saves the registers and the queues, with the device's state `device` (saved by the
    /// caller under the device's lock, which it may keep held; the VM must be paused).
    pub fn save_with(&self, device: DeviceState) -> MmioSnapshot {
        MmioSnapshot {
            device_type: self.device_type,
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(QueueSnapshot::from).collect(),
            bad_size: self.bad_size.clone(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            activated: self.activated,
            device,
        }
    }

    /// Sets a freshly created transport (and its device) to a saved state. Everything is
    /// checked against this transport's device first; an activated device is activated again
    /// with the saved queues (ring positions included), then given its own state.
    pub fn restore(&mut self, s: &MmioSnapshot) -> Result<(), DeviceStateError> {
        let invalid = |what: String| Err(DeviceStateError::Invalid(what));
        if s.device_type != self.device_type {
            return invalid(format!(
                "device type {} saved, {} here",
                s.device_type, self.device_type
            ));
        }
        if s.queues.len() != self.queues.len() || s.bad_size.len() != self.queues.len() {
            return invalid(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        if s.acked_features & !self.avail_features != 0 {
            return invalid(format!(
                "acknowledged features {:#x} beyond the offer {:#x}",
                s.acked_features, self.avail_features
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (saved, own) in s.queues.iter().zip(&self.queues) {
            if saved.max_size != own.max_size() {
                return invalid(format!(
                    "queue maximum {} saved, {} here",
                    saved.max_size,
                    own.max_size()
                ));
            }
            let q = saved.to_queue()?;
            if q.ready() && !q.is_valid(&self.mem) {
                return invalid("a ready queue lies outside guest memory".into());
            }
            queues.push(q);
        }
        let live: Vec<Queue> = if s.activated {
            if s.device.queues.len() != self.queues.len() {
                return invalid("an active device without all its queues".into());
            }
            let mut live = Vec::with_capacity(s.device.queues.len());
            for saved in &s.device.queues {
                let q = saved.to_queue()?;
                if !q.ready() || !q.is_valid(&self.mem) {
                    return invalid("an active queue not ready or outside guest memory".into());
                }
                live.push(q);
            }
            live
        } else {
            Vec::new()
        };

        self.status = s.status;
        self.acked_features = s.acked_features;
        self.acked_beyond_64 = false;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.queues = queues;
        self.bad_size = s.bad_size.clone();
        self.config_generation = s.config_generation;
        self.interrupt.set_status(s.interrupt_status);
        let mut device = lock(&self.device);
        if s.activated {
            device
                .activate(
                    self.mem.clone(),
                    self.acked_features,
                    live,
                    self.interrupt.clone(),
                )
                .map_err(|e| DeviceStateError::Invalid(format!("activation: {e}")))?;
        }
        self.activated = s.activated;
        device.restore_state(&s.device.kind)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) => *word = self.read_register(offset).to_le_bytes(),
            Err(_) => {
                data.fill(0);
                crate::ratelimited!(
                    log::Level::Debug,
                    "virtio-mmio: {}-byte register read at {offset:#x}",
                    data.len()
                );
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) => self.write_register(offset, u32::from_le_bytes(word)),
            Err(_) => crate::ratelimited!(
                log::Level::Debug,
                "virtio-mmio: {}-byte register write at {offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::ActivateError;

    #[derive(Default)]
    struct Fake {
        activations: usize,
        resets: usize,
        evts: Vec<EventFd>,
        live: Vec<QueueSnapshot>,
        snapshots: bool,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            _: u64,
            queues: Vec<Queue>,
            _: Interrupt,
        ) -> Result<(), ActivateError> {
            assert_eq!(queues.len(), 2);
            self.activations += 1;
            self.live = queues.iter().map(QueueSnapshot::from).collect();
            Ok(())
        }
        fn save_state(&self) -> Result<DeviceState, DeviceStateError> {
            if !self.snapshots {
                return Err(DeviceStateError::Unsupported { device_type: 42 });
            }
            Ok(DeviceState {
                queues: self.live.clone(),
                kind: crate::devices::virtio::state::DeviceKind::Vsock { guest_cid: 7 },
            })
        }
        fn restore_state(
            &mut self,
            _: &crate::devices::virtio::state::DeviceKind,
        ) -> Result<(), DeviceStateError> {
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn process(&mut self) {}
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Fake>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let fake = Arc::new(Mutex::new(Fake {
            evts: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            ..Fake::default()
        }));
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (MmioTransport::new(fake.clone(), mem, irq), fake)
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, high: u32) {
        w(t, reg::STATUS, status::ACKNOWLEDGE);
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, high);
        w(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, desc: u64) {
        w(t, reg::QUEUE_SEL, index);
        w(t, reg::QUEUE_NUM, 16);
        w(t, reg::QUEUE_DESC_LOW, desc as u32);
        w(t, reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        let base = 0x1000 * u64::from(index + 1);
        w(t, reg::QUEUE_AVAIL_LOW, (base + 0x100) as u32);
        w(t, reg::QUEUE_USED_LOW, (base + 0x200) as u32);
        w(t, reg::QUEUE_READY, 1);
    }

    const OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

    #[test]
    fn identity_registers() {
        let (mut t, _) = setup();
        assert_eq!(r(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
        w(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "no third queue");
        let mut b = [0u8; 2];
        t.read(reg::CONFIG + 5, &mut b);
        assert_eq!(b, [5, 5]);
        // Odd-sized register accesses are ignored.
        let mut b = [0xaau8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let (mut t, _) = setup();
        negotiate(&mut t, 0);
        assert_eq!(t.status() & status::FEATURES_OK, 0);
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, 1 | 2);
        assert_eq!(t.status() & status::FEATURES_OK, 0, "unoffered bit 33");
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, 1);
        assert_eq!(t.status(), OK);
    }

    #[test]
    fn queue_outside_memory_is_refused_and_needs_reset() {
        let (mut t, fake) = setup();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x7fff_ffff_f000);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        setup_queue(&mut t, 1, 0x3000);
        w(&mut t, reg::STATUS, OK | status::DRIVER_OK);
        assert!(!t.is_activated());
        assert_eq!(fake.lock().unwrap().activations, 0);

        // Reset, then a correct setup activates the device.
        w(&mut t, reg::STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(fake.lock().unwrap().resets, 1);
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x5000);
        setup_queue(&mut t, 1, 0x6000);
        w(&mut t, reg::STATUS, OK | status::DRIVER_OK);
        assert!(t.is_activated());
        assert_eq!(fake.lock().unwrap().activations, 1);
        // Queue registers are read-only once live.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 8);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    }

    #[test]
    fn invalid_queue_size_and_out_of_order_status_are_refused() {
        let (mut t, _) = setup();
        // DRIVER_OK before anything else.
        w(&mut t, reg::STATUS, status::DRIVER_OK);
        assert_eq!(t.status(), 0);
        negotiate(&mut t, 1);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 17);
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
        // A missing queue: ignored, no panic.
        w(&mut t, reg::QUEUE_SEL, 99);
        w(&mut t, reg::QUEUE_NUM, 16);
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::STATUS, OK | status::DRIVER_OK);
        assert!(!t.is_activated());
    }

    #[test]
    fn notify_and_interrupt_ack() {
        let (mut t, fake) = setup();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x5000);
        setup_queue(&mut t, 1, 0x6000);
        w(&mut t, reg::STATUS, OK | status::DRIVER_OK);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(fake.lock().unwrap().evts[0].read().unwrap(), 1);
        w(&mut t, reg::QUEUE_NOTIFY, 5);
        t.interrupt
            .trigger(crate::devices::virtio::VIRTIO_MMIO_INT_VRING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    fn save(t: &MmioTransport) -> Result<MmioSnapshot, DeviceStateError> {
        let state = t.device.lock().unwrap().save_state()?;
        Ok(t.save_with(state))
    }

    #[test]
    fn device_without_snapshot_support_is_refused() {
        let (t, _) = setup();
        let err = save(&t).unwrap_err();
        assert_eq!(
            err.to_string(),
            "snapshot of virtio device type 42 is not supported yet"
        );
    }

    #[test]
    fn transport_state_round_trips_into_a_new_transport() {
        let (mut t, fake) = setup();
        fake.lock().unwrap().snapshots = true;
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x5000);
        setup_queue(&mut t, 1, 0x6000);
        w(&mut t, reg::STATUS, OK | status::DRIVER_OK);
        w(&mut t, reg::QUEUE_SEL, 1);
        t.interrupt
            .trigger(crate::devices::virtio::VIRTIO_MMIO_INT_VRING);
        // The device advanced its own queue copy.
        fake.lock().unwrap().live[0].next_avail = 9;
        fake.lock().unwrap().live[0].next_used = 8;
        let saved = save(&t).unwrap();
        assert!(saved.activated);
        assert_eq!(saved.queue_sel, 1);
        assert_eq!(saved.interrupt_status, 1);
        let bytes = bincode::serialize(&saved).unwrap();
        let saved: MmioSnapshot = bincode::deserialize(&bytes).unwrap();

        let (mut t2, fake2) = setup();
        fake2.lock().unwrap().snapshots = true;
        t2.restore(&saved).unwrap();
        assert!(t2.is_activated());
        assert_eq!(t2.status(), OK | status::DRIVER_OK);
        assert_eq!(
            r(&mut t2, reg::QUEUE_READY),
            1,
            "queue 1 selected and ready"
        );
        assert_eq!(r(&mut t2, reg::INTERRUPT_STATUS), 1);
        assert_eq!(fake2.lock().unwrap().activations, 1);
        assert_eq!(fake2.lock().unwrap().live[0].next_avail, 9);
        assert_eq!(fake2.lock().unwrap().live[0].next_used, 8);
        assert_eq!(save(&t2).unwrap(), saved);
    }

    #[test]
    fn invalid_saved_transport_state_is_refused() {
        let (mut t, fake) = setup();
        fake.lock().unwrap().snapshots = true;
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x5000);
        setup_queue(&mut t, 1, 0x6000);
        w(&mut t, reg::STATUS, OK | status::DRIVER_OK);
        let good = save(&t).unwrap();
        let mut cases = Vec::new();
        let mut s = good.clone();
        s.device_type = 19;
        cases.push(s);
        let mut s = good.clone();
        s.queues.pop();
        cases.push(s);
        let mut s = good.clone();
        s.acked_features |= 1 << 40;
        cases.push(s);
        let mut s = good.clone();
        s.device.queues[0].desc_table = 0x7fff_ffff_f000;
        cases.push(s);
        let mut s = good.clone();
        s.device.queues[1].size = 17;
        cases.push(s);
        let mut s = good.clone();
        s.device.queues.clear();
        cases.push(s);
        for bad in cases {
            let (mut t2, fake2) = setup();
            assert!(t2.restore(&bad).is_err(), "{bad:?}");
            assert_eq!(fake2.lock().unwrap().activations, 0);
            assert!(!t2.is_activated());
        }
    }

    mod generated {
        //! Generated register accesses: any offset, width and value, in any order; the
        //! transport never panics, and activates its device at most once per reset.

        use proptest::prelude::*;

        use super::*;

        fn access() -> impl Strategy<Value = (bool, u64, usize, u32)> {
            (
                any::<bool>(),
                prop_oneof![
                    (0u64..0x40).prop_map(|r| r * 4),
                    Just(reg::STATUS),
                    Just(reg::QUEUE_SEL),
                    Just(reg::QUEUE_NUM),
                    Just(reg::QUEUE_READY),
                    Just(reg::QUEUE_NOTIFY),
                    0x100u64..0x200,
                    any::<u64>(),
                ],
                prop_oneof![Just(4usize), Just(1), Just(2), Just(8), 0usize..16],
                prop_oneof![
                    Just(
                        status::ACKNOWLEDGE
                            | status::DRIVER
                            | status::FEATURES_OK
                            | status::DRIVER_OK
                    ),
                    0u32..32,
                    any::<u32>(),
                ],
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn any_register_access_sequence_is_safe(
                accesses in proptest::collection::vec(access(), 1..64)
            ) {
                let (mut t, fake) = setup();
                for (write, offset, width, value) in accesses {
                    let mut data = vec![0u8; width];
                    let bytes = value.to_le_bytes();
                    for (i, b) in data.iter_mut().enumerate() {
                        *b = bytes[i % 4];
                    }
                    if write {
                        t.write(offset, &data);
                    } else {
                        t.read(offset, &mut data);
                    }
                    let f = fake.lock().unwrap();
                    prop_assert!(f.activations <= f.resets + 1);
                }
            }
        }
    }
}

//! A bus: address ranges, each served by one device. The port I/O space and the MMIO space
//! are each one `Bus`; ports are widened to `u64`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's first address (or port).
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim the same addresses.
    #[error("range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// An empty or wrapping range.
    #[error("invalid range {base:#x}+{len:#x}")]
    Invalid {
        /// First address.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// A device shared between the vCPU threads.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Address ranges and their devices. Built before the vCPUs start, read-only afterwards.
#[derive(Default)]
pub struct Bus {
    // Keyed by first address; value: (length, device).
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

/// The port I/O space (ports 0..=0xffff).
pub type PioBus = Bus;
/// The MMIO space.
pub type MmioBus = Bus;

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<String> = self
            .devices
            .iter()
            .map(|(base, (len, _))| format!("{base:#x}+{len:#x}"))
            .collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// Adds `device` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let Some(end) = base.checked_add(len).filter(|_| len > 0) else {
            return Err(BusError::Invalid { base, len });
        };
        let overlaps_next = self
            .devices
            .range(base..)
            .next()
            .is_some_and(|(b, _)| *b < end);
        let overlaps_prev = self
            .devices
            .range(..base)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps_next || overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Serves a guest read; addresses without a device read as all ones, like an open bus.
    /// Returns whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Serves a guest write; writes without a device are dropped.
    /// Returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_offset_and_rejects_overlaps() {
        let mut bus = Bus::default();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert!(bus.insert(0x3ff, 1, dev.clone()).is_err());
        assert!(bus.insert(0x3f0, 9, dev.clone()).is_err());
        bus.insert(0x3f0, 8, dev.clone()).unwrap();
        assert!(bus.insert(0x100, 0, dev.clone()).is_err());
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev.clone()),
            Err(BusError::Invalid { .. })
        ));

        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff]);
        assert!(bus.write(0x3f9, &[7]));
        assert!(!bus.write(0xffff, &[7]));
        assert_eq!(dev.lock().unwrap().writes, vec![(1, vec![7])]);
    }

    #[test]
    fn high_addresses_route_and_ranges_past_the_top_are_refused() {
        let mut bus = Bus::default();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0xd000_0000, 0x1000, dev.clone()).unwrap();
        bus.insert(u64::MAX - 0x1f, 0x10, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert(u64::MAX - 0xf, 0x10, dev.clone()),
            Err(BusError::Invalid { .. })
        ));
        let mut b = [0u8; 4];
        assert!(bus.read(0xd000_0ffc, &mut b));
        assert_eq!(b, [0xfc; 4]);
        assert!(!bus.read(0xd000_1000, &mut b));
        assert!(bus.read(u64::MAX - 0x10, &mut b));
        assert!(!bus.read(u64::MAX, &mut b));
    }
}

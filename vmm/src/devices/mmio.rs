//! The MMIO bus: guest-physical ranges, each served by one device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on the MMIO bus. `offset` is relative to the device's base address.
pub trait MmioDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of building the bus.
#[derive(Debug, thiserror::Error)]
pub enum MmioBusError {
    /// Two devices claim the same addresses.
    #[error("MMIO range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// First address.
        base: u64,
        /// Length in bytes.
        len: u64,
    },
    /// An empty or wrapping range.
    #[error("invalid MMIO range {base:#x}+{len:#x}")]
    Invalid {
        /// First address.
        base: u64,
        /// Length in bytes.
        len: u64,
    },
}

type SharedDevice = Arc<Mutex<dyn MmioDevice>>;

/// MMIO ranges and their devices. Built before the vCPUs start, read-only afterwards.
#[derive(Default)]
pub struct MmioBus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<String> = self
            .devices
            .iter()
            .map(|(base, (len, _))| format!("{base:#x}+{len:#x}"))
            .collect();
        f.debug_struct("MmioBus").field("ranges", &ranges).finish()
    }
}

impl MmioBus {
    /// Adds `device` at `base..base+len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), MmioBusError> {
        let Some(end) = base.checked_add(len).filter(|_| len > 0) else {
            return Err(MmioBusError::Invalid { base, len });
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
            return Err(MmioBusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Serves a guest read; addresses without a device read as all ones.
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

    struct Echo(u64);

    impl MmioDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill((offset + self.0) as u8);
        }
        fn write(&mut self, offset: u64, _: &[u8]) {
            self.0 = offset;
        }
    }

    #[test]
    fn routes_by_offset_and_rejects_overlaps() {
        let mut bus = MmioBus::default();
        let dev = Arc::new(Mutex::new(Echo(0)));
        bus.insert(0xd000_0000, 0x1000, dev.clone()).unwrap();
        assert!(bus.insert(0xd000_0fff, 1, dev.clone()).is_err());
        assert!(bus.insert(0xcfff_f000, 0x1001, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        assert!(bus.insert(0x1000, 0, dev.clone()).is_err());
        bus.insert(0xd000_1000, 0x1000, dev.clone()).unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0xd000_0004, &mut b));
        assert_eq!(b, [4; 4]);
        assert!(!bus.read(0xd000_2000, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(bus.write(0xd000_1008, &[1]));
        assert!(!bus.write(0xc000_0000, &[1]));
        assert_eq!(dev.lock().unwrap().0, 8);
    }
}

//! The port I/O bus: ranges of ports, each served by one device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on the port I/O bus. `offset` is relative to the device's first port.
pub trait PioDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// Errors of building the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim the same port.
    #[error("port range {base:#x}+{len} overlaps another device")]
    Overlap {
        /// First port.
        base: u16,
        /// Number of ports.
        len: u16,
    },
    /// An empty range.
    #[error("empty port range at {0:#x}")]
    Empty(u16),
}

type SharedDevice = Arc<Mutex<dyn PioDevice>>;

/// Port ranges and their devices. Built before the vCPUs start, read-only afterwards.
#[derive(Default)]
pub struct PioBus {
    // Keyed by first port; value: (number of ports, device).
    devices: BTreeMap<u16, (u16, SharedDevice)>,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<String> = self
            .devices
            .iter()
            .map(|(base, (len, _))| format!("{base:#x}+{len}"))
            .collect();
        f.debug_struct("PioBus").field("ranges", &ranges).finish()
    }
}

impl PioBus {
    /// Adds `device` at ports `base..base+len`.
    pub fn insert(&mut self, base: u16, len: u16, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = u32::from(base) + u32::from(len);
        let overlaps_next = self
            .devices
            .range(base..)
            .next()
            .is_some_and(|(b, _)| u32::from(*b) < end);
        let overlaps_prev = self
            .devices
            .range(..base)
            .next_back()
            .is_some_and(|(b, (l, _))| u32::from(*b) + u32::from(*l) > u32::from(base));
        if overlaps_next || overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(u16, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=port).next_back()?;
        (u32::from(port) < u32::from(*base) + u32::from(*len)).then_some((port - base, dev))
    }

    /// Serves a guest read; ports without a device read as all ones, like an open bus.
    /// Returns whether a device answered.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
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

    /// Serves a guest write; writes to ports without a device are dropped.
    /// Returns whether a device took it.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
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
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_offset_and_rejects_overlaps() {
        let mut bus = PioBus::default();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert!(bus.insert(0x3ff, 1, dev.clone()).is_err());
        assert!(bus.insert(0x3f0, 9, dev.clone()).is_err());
        bus.insert(0x3f0, 8, dev.clone()).unwrap();
        assert!(bus.insert(0x100, 0, dev.clone()).is_err());

        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff]);
        assert!(bus.write(0x3f9, &[7]));
        assert!(!bus.write(0xffff, &[7]));
        assert_eq!(dev.lock().unwrap().writes, vec![(1, vec![7])]);
    }
}

//! Emulated devices and the buses (port I/O, MMIO) they sit on.

pub mod bus;
pub mod exit_port;
pub mod legacy;
pub mod rtc;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, MmioBus, PioBus};

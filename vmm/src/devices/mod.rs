//! Emulated devices and the port I/O bus they sit on.

pub mod bus;
pub mod exit_port;
pub mod legacy;
pub mod rtc;
pub mod serial;

pub use bus::{PioBus, PioDevice};

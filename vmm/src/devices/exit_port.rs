//! The exit port: how a Nutshell guest kernel reports power-off and panic.
//!
//! Without ACPI a Linux `poweroff` only halts the CPUs, which a VMM with an in-kernel irqchip
//! cannot see. Our guest kernel carries a small patch: with `nutshell_exit_port=0x501` on its
//! command line it writes 0 to that port on power-off and 1 from its panic notifier.

use std::sync::Arc;

use super::BusDevice;
use crate::exit::{ExitHandle, VmExit};

/// The port (QEMU's isa-debug-exit uses the same one).
pub const EXIT_PORT: u16 = 0x501;
/// Value written on power-off.
pub const EXIT_POWER_OFF: u8 = 0;
/// Value written on panic.
pub const EXIT_PANIC: u8 = 1;

/// The exit port on the port bus.
#[derive(Debug)]
pub struct ExitPort(pub Arc<ExitHandle>);

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data.first() {
            Some(&EXIT_POWER_OFF) => self.0.request(VmExit::PowerOff),
            Some(&EXIT_PANIC) => self.0.request(VmExit::GuestPanic),
            other => {
                crate::ratelimited!(log::Level::Warn, "exit port: unknown value {other:?}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_map_to_exits() {
        let exit = ExitHandle::new().unwrap();
        let mut port = ExitPort(exit.clone());
        port.write(0, &[7]);
        assert!(!exit.is_requested());
        port.write(0, &[EXIT_PANIC]);
        assert_eq!(exit.reason(), Some(VmExit::GuestPanic));
    }
}

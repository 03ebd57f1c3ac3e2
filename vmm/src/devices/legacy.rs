//! The i8042 keyboard controller, kept for one job: its CPU-reset command is how a Linux guest
//! reboots (`reboot=k`), and a microVM stops when its guest reboots.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::exit::{ExitHandle, VmExit};

/// First port of the i8042 (data port); the command port is at offset 4.
pub const I8042_BASE: u16 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_LEN: u16 = 5;

/// Turns the i8042 reset into a VM stop.
#[derive(Debug)]
pub struct ResetTrigger(pub Arc<ExitHandle>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmExit::Reset);
        Ok(())
    }
}

/// The i8042 on the port bus.
#[derive(Debug)]
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// An i8042 that stops the VM on reset.
    pub fn new(exit: Arc<ExitHandle>) -> Self {
        I8042(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.0.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // The trigger cannot fail.
            let _ = self.0.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_the_vm() {
        let exit = ExitHandle::new().unwrap();
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[0xfe]);
        assert!(!exit.is_requested(), "0xfe on the data port is not a reset");
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }
}

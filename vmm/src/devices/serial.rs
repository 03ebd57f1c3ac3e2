//! The 8250 UART at COM1 (vm-superio), wired to the guest through an irqfd, and the sink that
//! takes the guest console to stdout or a file.

use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Ports of one UART.
pub const COM1_LEN: u16 = 8;

/// Raises the serial interrupt through an eventfd registered as an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Buffers console bytes and writes whole lines: vm-superio flushes after every byte, and one
/// host `write` per guest byte is wasteful. What is still buffered is written on drop.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    /// Bytes the guest may still write; `None`: no limit.
    budget: Option<u64>,
    /// Whether output was dropped (logged once).
    truncated: bool,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

const CONSOLE_BUFFER: usize = 4096;

impl ConsoleSink {
    /// A sink writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        ConsoleSink {
            out,
            buf: Vec::with_capacity(CONSOLE_BUFFER),
            budget: None,
            truncated: false,
        }
    }

    /// Keeps at most `bytes` of guest output; the rest is dropped (a guest must not be able to
    /// fill the host's disk through its console).
    pub fn with_limit(mut self, bytes: u64) -> Self {
        self.budget = Some(bytes);
        self
    }

    /// Writes the first `len` buffered bytes out.
    fn write_out(&mut self, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let res = self
            .out
            .write_all(&self.buf[..len])
            .and_then(|_| self.out.flush());
        self.buf.drain(..len);
        res
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let keep = match self.budget.as_mut() {
            None => data.len(),
            Some(budget) => {
                let keep = usize::try_from(*budget).map_or(data.len(), |b| b.min(data.len()));
                *budget -= keep as u64;
                if keep < data.len() && !self.truncated {
                    self.truncated = true;
                    log::warn!("guest console reached its size limit; further output is dropped");
                }
                keep
            }
        };
        self.buf.extend_from_slice(&data[..keep]);
        Ok(data.len())
    }

    /// Writes out every complete line, or everything once the buffer is full.
    fn flush(&mut self) -> io::Result<()> {
        let len = if self.buf.len() >= CONSOLE_BUFFER {
            self.buf.len()
        } else {
            self.buf
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1)
        };
        self.write_out(len)
    }
}

impl Drop for ConsoleSink {
    fn drop(&mut self) {
        if let Err(e) = self.write_out(self.buf.len()) {
            log::warn!("guest console output lost: {e}");
        }
    }
}

/// COM1 on the port bus.
#[derive(Debug)]
pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `sink`.
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), sink),
        }
    }

    /// A UART with registers from a snapshot; `None` when the state is invalid (an overfull
    /// receive FIFO).
    pub fn from_state(
        state: &vm_superio::SerialState,
        irq: EventFd,
        sink: ConsoleSink,
    ) -> Option<Self> {
        Serial::from_state(state, IrqTrigger(irq), vm_superio::serial::NoEvents, sink)
            .ok()
            .map(|uart| SerialDevice { uart })
    }

    /// The registers, for a snapshot.
    pub fn state(&self) -> vm_superio::SerialState {
        self.uart.state()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(offset, *byte) {
                crate::ratelimited!(log::Level::Warn, "serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, d: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sink_writes_whole_lines_and_the_rest_on_drop() {
        let out = Shared::default();
        let mut sink = ConsoleSink::new(Box::new(out.clone()));
        sink.write_all(b"hel").unwrap();
        sink.flush().unwrap();
        assert!(out.0.lock().unwrap().is_empty());
        sink.write_all(b"lo\nwor").unwrap();
        sink.flush().unwrap();
        assert_eq!(&*out.0.lock().unwrap(), b"hello\n");
        drop(sink);
        assert_eq!(&*out.0.lock().unwrap(), b"hello\nwor");
    }

    #[test]
    fn sink_drops_output_past_its_limit() {
        let out = Shared::default();
        let mut sink = ConsoleSink::new(Box::new(out.clone())).with_limit(5);
        for b in b"abc\ndefgh\n" {
            sink.write_all(&[*b]).unwrap();
            sink.flush().unwrap();
        }
        drop(sink);
        assert_eq!(&*out.0.lock().unwrap(), b"abc\nd");
    }

    #[test]
    fn uart_transmits_to_sink_and_raises_irq() {
        let out = Shared::default();
        let irq = EventFd::new(0).unwrap();
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            ConsoleSink::new(Box::new(out.clone())),
        );
        dev.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"ok\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"ok\n");
        assert!(irq.read().unwrap() >= 1);
        // A 2-byte access is not a UART access.
        let mut two = [0u8; 2];
        dev.read(5, &mut two);
        assert_eq!(two, [0xff, 0xff]);
    }
}

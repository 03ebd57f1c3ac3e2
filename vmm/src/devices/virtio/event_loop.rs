//! The thread of a virtio device: one shape for every device. It waits on the device's queue
//! notifications, its host descriptors and the VM's stop request, and runs the device's
//! processing under its lock.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::VirtioDevice;

/// Named event tokens: the stop request, host descriptor `i` at `HOST_BASE + i`, queue `i` at
/// `QUEUE_BASE + i`.
const EXIT: u64 = 0;
const HOST_BASE: u64 = 1;
const QUEUE_BASE: u64 = 1 << 16;

/// What a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Exit,
    Host,
    Queue(usize),
}

impl Token {
    fn decode(data: u64) -> Token {
        match data {
            EXIT => Token::Exit,
            d if d >= QUEUE_BASE => Token::Queue((d - QUEUE_BASE) as usize),
            _ => Token::Host,
        }
    }
}

/// Starts the thread `name` for `device`. It returns once `stop_fd` becomes readable (it is
/// never read here, so a level-triggered stop request stays visible to every waiter).
pub fn spawn(
    name: &str,
    device: Arc<Mutex<dyn VirtioDevice>>,
    stop_fd: RawFd,
) -> io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        stop_fd,
        EpollEvent::new(EventSet::IN, EXIT),
    )?;
    {
        let d = device.lock().unwrap_or_else(|e| e.into_inner());
        for (i, host) in d.host_events().iter().enumerate() {
            let mut events = EventSet::IN;
            if host.edge {
                events |= EventSet::EDGE_TRIGGERED;
            }
            epoll.ctl(
                ControlOperation::Add,
                host.fd,
                EpollEvent::new(events, HOST_BASE + i as u64),
            )?;
        }
        for (i, evt) in d.queue_events().iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, QUEUE_BASE + i as u64),
            )?;
        }
    }
    let label = name.to_string();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || run(&label, &device, &epoll))
}

fn run(name: &str, device: &Mutex<dyn VirtioDevice>, epoll: &Epoll) {
    use crate::seccomp::{install_or_exit, ThreadKind};
    let kind = ThreadKind::of_device(name);
    if kind != Some(ThreadKind::Fs) {
        // Only the fs server acts for guest users.
        crate::jail::drop_thread_capabilities();
    }
    match kind {
        Some(kind) => install_or_exit(kind),
        // A device without a filter of its own never runs unfiltered when filters are on.
        None if crate::seccomp::mode() != crate::seccomp::Mode::Off => {
            log::error!("{name}: no seccomp filter for this device");
            std::process::exit(1);
        }
        None => {}
    }
    let mut events = [EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("{name}: event loop failed: {e}");
                return;
            }
        };
        let mut d = device.lock().unwrap_or_else(|e| e.into_inner());
        for ev in &events[..n] {
            match Token::decode(ev.data()) {
                Token::Exit => return,
                Token::Host => {}
                Token::Queue(index) => {
                    if let Some(evt) = d.queue_events().get(index) {
                        // Reading resets the counter; EAGAIN means a spurious wakeup.
                        let _ = evt.read();
                        d.queue_notified(index);
                    }
                }
            }
        }
        d.process();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_decode_to_what_they_name() {
        assert_eq!(Token::decode(EXIT), Token::Exit);
        assert_eq!(Token::decode(HOST_BASE), Token::Host);
        assert_eq!(Token::decode(HOST_BASE + 3), Token::Host);
        assert_eq!(Token::decode(QUEUE_BASE), Token::Queue(0));
        assert_eq!(Token::decode(QUEUE_BASE + 2), Token::Queue(2));
    }
}

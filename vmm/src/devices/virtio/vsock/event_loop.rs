//! The vsock device's thread: waits on the queue notifications, the host sockets and the VM's
//! stop request, and runs the device's processing under its lock.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::Vsock;
use crate::devices::virtio::VirtioDevice;

/// Named event tokens.
const EXIT: u64 = 0;
const HOST: u64 = 1;
/// Queue `i` notifications use token `QUEUE_BASE + i`.
const QUEUE_BASE: u64 = 16;

/// Starts the thread. It returns once `stop_fd` becomes readable (it is never read here, so a
/// level-triggered stop request stays visible to every waiter).
pub fn spawn(device: Arc<Mutex<Vsock>>, stop_fd: RawFd) -> io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    let queue_fds: Vec<RawFd> = {
        let d = device.lock().unwrap_or_else(|e| e.into_inner());
        epoll.ctl(
            ControlOperation::Add,
            d.host_epoll_fd(),
            EpollEvent::new(EventSet::IN, HOST),
        )?;
        d.queue_events().iter().map(AsRawFd::as_raw_fd).collect()
    };
    epoll.ctl(
        ControlOperation::Add,
        stop_fd,
        EpollEvent::new(EventSet::IN, EXIT),
    )?;
    for (i, fd) in queue_fds.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            *fd,
            EpollEvent::new(EventSet::IN, QUEUE_BASE + i as u64),
        )?;
    }
    std::thread::Builder::new()
        .name("vsock".into())
        .spawn(move || run(&device, &epoll))
}

fn run(device: &Mutex<Vsock>, epoll: &Epoll) {
    let mut events = [EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("vsock: event loop failed: {e}");
                return;
            }
        };
        let mut d = device.lock().unwrap_or_else(|e| e.into_inner());
        for ev in &events[..n] {
            match ev.data() {
                EXIT => return,
                HOST => {}
                token => {
                    let queue = token.checked_sub(QUEUE_BASE).unwrap_or(u64::MAX);
                    if let Some(evt) = usize::try_from(queue)
                        .ok()
                        .and_then(|q| d.queue_events().get(q))
                    {
                        // Reading resets the counter; EAGAIN means a spurious wakeup.
                        let _ = evt.read();
                    }
                    if queue == super::EVQ as u64 {
                        d.event_queue_notified();
                    }
                }
            }
        }
        // Whatever woke us, the order is: guest packets, host sockets, then fill RX.
        d.process_tx();
        d.process_host_events();
        d.process_rx();
    }
}

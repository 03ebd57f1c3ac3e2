//! The virtio-fs device's thread: waits on the queue notifications and the VM's stop request,
//! and serves the queues under the device's lock.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::Fs;
use crate::devices::virtio::VirtioDevice;

/// Named event tokens.
const EXIT: u64 = 0;
/// Queue `i` notifications use token `QUEUE_BASE + i`.
const QUEUE_BASE: u64 = 16;

/// Starts the thread. It returns once `stop_fd` becomes readable (it is never read here, so a
/// level-triggered stop request stays visible to every waiter).
pub fn spawn(device: Arc<Mutex<Fs>>, stop_fd: RawFd) -> io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    let queue_fds: Vec<RawFd> = {
        let d = device.lock().unwrap_or_else(|e| e.into_inner());
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
        .name("virtio-fs".into())
        .spawn(move || run(&device, &epoll))
}

fn run(device: &Mutex<Fs>, epoll: &Epoll) {
    let mut events = [EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio-fs: event loop failed: {e}");
                return;
            }
        };
        let mut d = device.lock().unwrap_or_else(|e| e.into_inner());
        for ev in &events[..n] {
            match ev.data() {
                EXIT => return,
                token => {
                    let queue = token.checked_sub(QUEUE_BASE).unwrap_or(u64::MAX);
                    if let Some(evt) = usize::try_from(queue)
                        .ok()
                        .and_then(|q| d.queue_events().get(q))
                    {
                        // Reading resets the counter; EAGAIN means a spurious wakeup.
                        let _ = evt.read();
                    }
                }
            }
        }
        d.process_queues();
    }
}

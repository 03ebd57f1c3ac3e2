//! virtio-vsock with hybrid vsock on the host: the guest's vsock streams become Unix socket
//! streams on the host.
//!
//! - Host-initiated: a client connects to the Unix socket `PATH`, writes `CONNECT <port>\n` and,
//!   once the guest accepted, reads `OK <hostport>\n`; the rest is the byte stream to the
//!   guest's vsock `port`.
//! - Guest-initiated: a guest connection to host CID 2, port `P` becomes a connection to the
//!   Unix socket `PATH_P`.
//!
//! Flow control is virtio-vsock's credit scheme: the guest never sends more than the
//! [`CONN_BUF_SIZE`] we advertise beyond what we have written to the host socket (a guest that
//! does is reset), and we never send it more than its own `buf_alloc` allows. RX buffers are
//! filled round-robin over the connections with something to send. Every limit is a constant:
//! [`MAX_CONNECTIONS`], [`CONN_BUF_SIZE`] per connection, [`MAX_PENDING_HOST`] host clients
//! that have not yet sent their `CONNECT` line.

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use self::packet::{op, ChainError, Header, Segments, HDR_SIZE, MAX_PKT_PAYLOAD, TYPE_STREAM};
use super::state::{DeviceKind, DeviceState, DeviceStateError};
use super::{
    ActivateError, HostEvent, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};
use crate::memory::GuestMemoryMmap;

/// Virtio device id of vsock.
pub const VSOCK_DEVICE_ID: u32 = 19;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// The guest's context id unless configured otherwise.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// Receive buffer we advertise per connection; also the cap of what we hold for it.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Most concurrent connections.
pub const MAX_CONNECTIONS: usize = 128;
/// Most host clients accepted but not yet through their `CONNECT` line.
pub const MAX_PENDING_HOST: usize = 32;
/// Most queued RSTs for unknown connections; beyond this they are dropped.
const MAX_CONTROL_QUEUE: usize = 256;
/// Longest `CONNECT <port>\n` line.
const CONNECT_LINE_MAX: usize = 32;
/// A CREDIT_UPDATE is sent once the host has consumed this much since the last report.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;
/// Host-side ports of host-initiated connections are allocated from here up.
const FIRST_HOST_PORT: u32 = 1 << 30;

const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the guest drops its connections (listeners stay).
const EVENT_TRANSPORT_RESET: u32 = 0;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// TX packets copied out of guest memory before they are handled.
const TX_BATCH: usize = 16;

const LISTENER_TOKEN: u64 = 0;

/// Errors of setting up the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The socket path is in use by a live listener.
    #[error("{} is in use by another process", .0.display())]
    InUse(PathBuf),
    /// Binding the Unix socket failed.
    #[error("cannot listen on {}", .path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An eventfd or the epoll instance could not be created.
    #[error("cannot create the vsock event descriptors")]
    Events(#[source] io::Error),
    /// Something other than a socket is at the path.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// The guest CID is reserved.
    #[error("guest CID {0} is reserved (use 3 or more)")]
    Cid(u64),
}

/// Configuration of the vsock device.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's context id.
    pub guest_cid: u64,
    /// Unix socket the host connects to; guest connections go to `<path>_<port>`.
    pub uds_path: PathBuf,
}

/// The listening Unix socket; its file is removed when dropped.
#[derive(Debug)]
struct Listener {
    sock: UnixListener,
    path: PathBuf,
}

impl Listener {
    fn bind(path: &Path) -> Result<Listener, VsockError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            // Only a socket is ever removed: a mistyped path must not delete a file.
            if !meta.file_type().is_socket() {
                return Err(VsockError::NotASocket(path.to_owned()));
            }
            // A stale socket from a dead VMM is replaced; a live one is not.
            if UnixStream::connect(path).is_ok() {
                return Err(VsockError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|source| VsockError::Bind {
                path: path.to_owned(),
                source,
            })?;
        }
        let bind_err = |source| VsockError::Bind {
            path: path.to_owned(),
            source,
        };
        let sock = UnixListener::bind(path).map_err(bind_err)?;
        sock.set_nonblocking(true).map_err(bind_err)?;
        Ok(Listener {
            sock,
            path: path.to_owned(),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated, REQUEST not yet answered.
    Connecting,
    Established,
    /// The guest shut down both directions; RST once our buffered bytes are written.
    Closing,
}

/// (host-side port, guest port).
type ConnKey = (u32, u32);

#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    token: u64,
    state: ConnState,
    /// Guest → host bytes not yet written to the host socket.
    pending: VecDeque<u8>,
    /// Bytes received from the guest.
    rx_cnt: u32,
    /// Bytes written to the host socket.
    fwd_cnt: u32,
    /// `fwd_cnt` last reported to the guest.
    last_fwd_sent: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The host socket may have bytes (edge-triggered epoll).
    readable: bool,
    host_eof: bool,
    need_request: bool,
    need_response: bool,
    need_shutdown: bool,
    need_credit_update: bool,
    need_rst: bool,
    in_ready: bool,
}

impl Connection {
    fn new(stream: UnixStream, token: u64, state: ConnState) -> Self {
        Connection {
            stream,
            token,
            state,
            pending: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            readable: true,
            host_eof: false,
            need_request: false,
            need_response: false,
            need_shutdown: false,
            need_credit_update: false,
            need_rst: false,
            in_ready: false,
        }
    }

    /// What the guest still lets us send.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_rx(&self) -> bool {
        self.need_rst
            || self.need_request
            || self.need_response
            || self.need_shutdown
            || self.need_credit_update
            || (self.state == ConnState::Established
                && self.readable
                && !self.host_eof
                && self.peer_credit() > 0)
    }

    /// Writes buffered guest bytes to the host socket, as far as it takes them.
    fn flush(&mut self) {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            match self.stream.write(front) {
                Ok(0) => {
                    self.need_rst = true;
                    return;
                }
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.need_rst = true;
                    return;
                }
            }
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.need_credit_update = true;
        }
        if self.pending.is_empty() && self.state == ConnState::Closing {
            self.need_rst = true;
        }
    }
}

/// A host client that has not yet sent its `CONNECT <port>` line.
#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Interrupt,
}

/// The virtio-vsock device and its host side.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    /// [`MAX_CONNECTIONS`] (tests use fewer).
    max_connections: usize,
    uds_path: PathBuf,
    queue_evts: Vec<EventFd>,
    epoll: Epoll,
    listener: Listener,
    pending_host: HashMap<u64, PendingHost>,
    conns: HashMap<ConnKey, Connection>,
    tokens: HashMap<u64, ConnKey>,
    ready: VecDeque<ConnKey>,
    control: VecDeque<Header>,
    next_token: u64,
    next_host_port: u32,
    active: Option<Active>,
    payload: Vec<u8>,
    /// A transport reset was sent and the guest has not handled it yet: host connections wait,
    /// or the guest's reset would cut them too.
    reset_pending: bool,
}

impl Vsock {
    /// Creates the device and starts listening on the Unix socket.
    pub fn new(config: &VsockConfig) -> Result<Vsock, VsockError> {
        if config.guest_cid <= HOST_CID || config.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(config.guest_cid));
        }
        let listener = Listener::bind(&config.uds_path)?;
        let epoll = Epoll::new().map_err(VsockError::Events)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.sock.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockError::Events)?;
        let queue_evts = (0..QUEUE_SIZES.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VsockError::Events)?;
        Ok(Vsock {
            guest_cid: config.guest_cid,
            max_connections: MAX_CONNECTIONS,
            uds_path: config.uds_path.clone(),
            queue_evts,
            epoll,
            listener,
            pending_host: HashMap::new(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            ready: VecDeque::new(),
            control: VecDeque::new(),
            next_token: LISTENER_TOKEN + 1,
            next_host_port: FIRST_HOST_PORT,
            active: None,
            payload: Vec::with_capacity(MAX_PKT_PAYLOAD),
            reset_pending: false,
        })
    }

    /// Lowers the connection cap (tests, which cannot offer a guest's worth of buffers).
    #[cfg(test)]
    pub(crate) fn set_max_connections(&mut self, max: usize) {
        self.max_connections = max.min(MAX_CONNECTIONS);
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Puts a transport-reset event in the guest's event queue, as after a restore: the guest
    /// drops every connection it believes open (listening sockets survive) and reads the CID
    /// again. Returns whether a buffer was available.
    pub fn send_transport_reset(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = active.mem.clone();
        let queue = &mut active.queues[EVQ];
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            log::warn!("vsock: no event buffer for the transport reset");
            return false;
        };
        let head = chain.head_index();
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let len = match Segments::collect(chain, &mem, true) {
            Ok(segs) if segs.len() >= event.len() && segs.write_at(&mem, 0, &event).is_ok() => {
                event.len() as u32
            }
            _ => {
                crate::ratelimited!(log::Level::Warn, "vsock: bad event buffer");
                0
            }
        };
        if queue.add_used(&mem, head, len).is_err() {
            crate::ratelimited!(log::Level::Warn, "vsock: cannot return an event buffer");
        }
        self.signal();
        self.reset_pending = len != 0;
        len != 0
    }

    /// The guest notified the event queue: it handled the event and gave the buffer back
    /// (Linux refills the event queue, then kicks, after resetting its sockets).
    pub fn event_queue_notified(&mut self) {
        if self.reset_pending {
            log::debug!("vsock: the guest handled the transport reset");
            self.reset_pending = false;
        }
    }

    /// Whether a transport reset is waiting for the guest.
    pub fn reset_pending(&self) -> bool {
        self.reset_pending
    }

    fn header(&self, key: ConnKey, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: 0,
        }
    }

    /// Queues an RST to the guest for a packet that has no connection.
    fn reply_rst(&mut self, to: &Header) {
        if to.op == op::RST || self.control.len() >= MAX_CONTROL_QUEUE {
            return;
        }
        let rst = self.header((to.dst_port, to.src_port), op::RST);
        self.control.push_back(rst);
    }

    fn mark_ready(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.in_ready && c.wants_rx() {
                c.in_ready = true;
                self.ready.push_back(key);
            }
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            // Closing the stream removes it from the epoll set.
        }
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn register(&self, fd: i32, events: EventSet, token: u64, op: ControlOperation) -> bool {
        self.epoll
            .ctl(op, fd, EpollEvent::new(events, token))
            .is_ok()
    }

    fn conn_events() -> EventSet {
        EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
    }

    /// Processes the TX queue: every packet the guest sent. Returns whether it used buffers.
    pub fn process_tx(&mut self) -> bool {
        let mut used_any = false;
        // Packets are copied out in small batches, which bounds what is held at once.
        let mut batch = Vec::with_capacity(TX_BATCH);
        while let Some(active) = self.active.as_mut() {
            let mem = active.mem.clone();
            let queue = &mut active.queues[TXQ];
            while batch.len() < TX_BATCH {
                let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                    break;
                };
                let head = chain.head_index();
                let mut payload = Vec::new();
                let result = Segments::collect(chain, &mem, false)
                    .and_then(|segs| segs.read_packet(&mem, &mut payload));
                if queue.add_used(&mem, head, 0).is_err() {
                    crate::ratelimited!(log::Level::Warn, "vsock: cannot return a TX buffer");
                }
                used_any = true;
                batch.push(result.map(|hdr| (hdr, payload)));
            }
            if batch.is_empty() {
                break;
            }
            for packet in batch.drain(..) {
                match packet {
                    Ok((hdr, payload)) => self.handle_guest_packet(&hdr, &payload),
                    Err(e) => crate::ratelimited!(log::Level::Warn, "vsock: bad TX packet: {e}"),
                }
            }
        }
        if used_any {
            self.signal();
        }
        used_any
    }

    fn signal(&self) {
        if let Some(a) = &self.active {
            a.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
    }

    fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            crate::ratelimited!(
                log::Level::Warn,
                "vsock: packet from CID {} to CID {} dropped",
                hdr.src_cid,
                hdr.dst_cid
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.reply_rst(hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op == op::REQUEST {
                self.guest_connect(hdr, key);
            } else {
                self.reply_rst(hdr);
            }
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        match (hdr.op, conn.state) {
            (op::RESPONSE, ConnState::Connecting) => {
                conn.state = ConnState::Established;
                let line = format!("OK {}\n", key.0);
                if conn.stream.write_all(line.as_bytes()).is_err() {
                    conn.need_rst = true;
                }
            }
            (op::RW, ConnState::Established) => {
                let buffered = conn.rx_cnt.wrapping_sub(conn.fwd_cnt);
                if u64::from(buffered) + payload.len() as u64 > u64::from(CONN_BUF_SIZE) {
                    crate::ratelimited!(
                        log::Level::Warn,
                        "vsock: guest overran its credit on port {}; reset",
                        key.1
                    );
                    conn.need_rst = true;
                } else {
                    conn.rx_cnt = conn.rx_cnt.wrapping_add(payload.len() as u32);
                    conn.pending.extend(payload);
                    conn.flush();
                }
            }
            (op::SHUTDOWN, _) => {
                let both = packet::SHUTDOWN_RCV | packet::SHUTDOWN_SEND;
                if hdr.flags & both == both {
                    conn.state = ConnState::Closing;
                    conn.flush();
                } else if hdr.flags & packet::SHUTDOWN_SEND != 0 {
                    conn.flush();
                    if conn.pending.is_empty() {
                        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                    }
                }
            }
            (op::RST, _) => {
                self.remove(key);
                return;
            }
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, _) => conn.need_credit_update = true,
            _ => conn.need_rst = true,
        }
        self.mark_ready(key);
    }

    fn guest_connect(&mut self, hdr: &Header, key: ConnKey) {
        if self.conns.len() >= self.max_connections {
            crate::ratelimited!(log::Level::Warn, "vsock: too many connections; refused");
            self.reply_rst(hdr);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(_) => {
                crate::ratelimited!(
                    log::Level::Debug,
                    "vsock: guest connection to host port {} refused: no listener",
                    hdr.dst_port
                );
                self.reply_rst(hdr);
                return;
            }
        };
        let token = self.alloc_token();
        if !self.register(
            stream.as_raw_fd(),
            Self::conn_events(),
            token,
            ControlOperation::Add,
        ) {
            self.reply_rst(hdr);
            return;
        }
        let mut conn = Connection::new(stream, token, ConnState::Established);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        conn.need_response = true;
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        self.mark_ready(key);
    }

    /// Serves the host sockets: new clients, `CONNECT` lines, readable and writable streams.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::ratelimited!(log::Level::Error, "vsock: epoll failed: {e}");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                let token = ev.data();
                let set = ev.event_set();
                if token == LISTENER_TOKEN {
                    self.accept_host();
                } else if self.pending_host.contains_key(&token) {
                    self.read_connect_line(token);
                } else if let Some(&key) = self.tokens.get(&token) {
                    if let Some(c) = self.conns.get_mut(&key) {
                        if set.intersects(
                            EventSet::IN
                                | EventSet::READ_HANG_UP
                                | EventSet::HANG_UP
                                | EventSet::ERROR,
                        ) {
                            c.readable = true;
                        }
                        if set.contains(EventSet::OUT) {
                            c.flush();
                        }
                    }
                    self.mark_ready(key);
                }
            }
        }
    }

    fn accept_host(&mut self) {
        loop {
            let stream = match self.listener.sock.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.pending_host.len() >= MAX_PENDING_HOST || stream.set_nonblocking(true).is_err()
            {
                log::warn!("vsock: host client refused: too many pending clients");
                continue;
            }
            let token = self.alloc_token();
            if self.register(
                stream.as_raw_fd(),
                EventSet::IN | EventSet::READ_HANG_UP,
                token,
                ControlOperation::Add,
            ) {
                self.pending_host.insert(
                    token,
                    PendingHost {
                        stream,
                        line: Vec::new(),
                    },
                );
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte, so that nothing after it is consumed.
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending_host.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&p.line),
                Ok(1) if p.line.len() < CONNECT_LINE_MAX => p.line.push(byte[0]),
                Ok(_) => break None,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(p) = self.pending_host.remove(&token) else {
            return;
        };
        let Some(port) = port else {
            crate::ratelimited!(
                log::Level::Warn,
                "vsock: host client sent no valid CONNECT line; closed"
            );
            return;
        };
        if self.active.is_none() || self.reset_pending || self.conns.len() >= self.max_connections {
            if self.reset_pending {
                // The client retries, as while the guest boots.
                log::debug!(
                    "vsock: host connection to port {port} refused: the guest has not handled the transport reset yet"
                );
            } else if self.active.is_none() {
                // Expected while the guest boots: clients retry until its driver is up.
                log::debug!(
                    "vsock: host connection to port {port} refused: guest driver not ready"
                );
            } else {
                crate::ratelimited!(
                    log::Level::Warn,
                    "vsock: host connection to port {port} refused: {} connections open",
                    self.max_connections
                );
            }
            return;
        }
        let Some(local_port) = self.alloc_host_port() else {
            return;
        };
        if !self.register(
            p.stream.as_raw_fd(),
            Self::conn_events(),
            token,
            ControlOperation::Modify,
        ) {
            return;
        }
        let key = (local_port, port);
        let mut conn = Connection::new(p.stream, token, ConnState::Connecting);
        conn.need_request = true;
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        self.mark_ready(key);
    }

    fn alloc_host_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|k| k.0 == port) {
                return Some(port);
            }
        }
        None
    }

    /// Fills RX buffers: queued RSTs first, then one packet per ready connection in turn.
    /// Returns whether it used buffers.
    pub fn process_rx(&mut self) -> bool {
        let mut used_any = false;
        loop {
            if self.control.is_empty() && self.ready.is_empty() {
                break;
            }
            let Some(active) = self.active.as_mut() else {
                break;
            };
            let mem = active.mem.clone();
            let queue = &mut active.queues[RXQ];
            let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let segs = match Segments::collect(chain, &mem, true) {
                Ok(s) if s.len() >= HDR_SIZE => s,
                Ok(s) => {
                    self.drop_rx_buffer(head, ChainError::TooShort(s.len()));
                    used_any = true;
                    continue;
                }
                Err(e) => {
                    self.drop_rx_buffer(head, e);
                    used_any = true;
                    continue;
                }
            };
            let written = self.fill_one(&mem, &segs);
            let Some(active) = self.active.as_mut() else {
                break;
            };
            match written {
                Some(len) => {
                    if active.queues[RXQ].add_used(&mem, head, len).is_err() {
                        crate::ratelimited!(log::Level::Warn, "vsock: cannot return an RX buffer");
                    }
                    used_any = true;
                }
                // Nothing to send after all: give the buffer back to the queue.
                None => {
                    active.queues[RXQ].go_to_previous_position();
                    break;
                }
            }
        }
        if used_any {
            self.signal();
        }
        used_any
    }

    fn drop_rx_buffer(&mut self, head: u16, why: ChainError) {
        crate::ratelimited!(log::Level::Warn, "vsock: bad RX buffer: {why}");
        if let Some(a) = self.active.as_mut() {
            let _ = a.queues[RXQ].add_used(&a.mem, head, 0);
        }
    }

    /// Writes the next packet into `segs`; returns its length, or None if nothing was ready.
    fn fill_one(&mut self, mem: &GuestMemoryMmap, segs: &Segments) -> Option<u32> {
        if let Some(hdr) = self.control.pop_front() {
            return write_packet(mem, segs, &hdr, &[]);
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_ready = false;
            let room = (segs.len() - HDR_SIZE).min(MAX_PKT_PAYLOAD);
            let mut hdr = Header {
                buf_alloc: CONN_BUF_SIZE,
                fwd_cnt: conn.fwd_cnt,
                ..Header {
                    src_cid: HOST_CID,
                    dst_cid: self.guest_cid,
                    src_port: key.0,
                    dst_port: key.1,
                    type_: TYPE_STREAM,
                    ..Header::default()
                }
            };
            let mut len = 0;
            if conn.need_rst {
                hdr.op = op::RST;
                self.remove(key);
                return write_packet(mem, segs, &hdr, &[]);
            } else if conn.need_request {
                conn.need_request = false;
                hdr.op = op::REQUEST;
            } else if conn.need_response {
                conn.need_response = false;
                hdr.op = op::RESPONSE;
            } else if conn.state == ConnState::Established
                && conn.readable
                && !conn.host_eof
                && conn.peer_credit() > 0
                && room > 0
            {
                let want = room.min(conn.peer_credit() as usize);
                self.payload.resize(want, 0);
                match conn.stream.read(&mut self.payload[..want]) {
                    Ok(0) => {
                        conn.host_eof = true;
                        conn.need_shutdown = true;
                    }
                    Ok(n) => {
                        hdr.op = op::RW;
                        len = n;
                        conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => conn.need_rst = true,
                }
            }
            if hdr.op == 0 && conn.need_shutdown {
                conn.need_shutdown = false;
                hdr.op = op::SHUTDOWN;
                hdr.flags = packet::SHUTDOWN_SEND;
            }
            if hdr.op == 0 && conn.need_credit_update {
                hdr.op = op::CREDIT_UPDATE;
            }
            if hdr.op == 0 {
                // Nothing after all (the socket had no bytes); try the next connection.
                self.mark_ready(key);
                continue;
            }
            // Any packet reports our credit.
            conn.need_credit_update = false;
            conn.last_fwd_sent = conn.fwd_cnt;
            hdr.len = len as u32;
            let payload = std::mem::take(&mut self.payload);
            let result = write_packet(mem, segs, &hdr, &payload[..len]);
            self.payload = payload;
            self.mark_ready(key);
            return result;
        }
        None
    }
}

fn write_packet(
    mem: &GuestMemoryMmap,
    segs: &Segments,
    hdr: &Header,
    payload: &[u8],
) -> Option<u32> {
    let ok = segs.write_at(mem, 0, &hdr.to_bytes()).is_ok()
        && segs.write_at(mem, HDR_SIZE, payload).is_ok();
    if !ok {
        crate::ratelimited!(log::Level::Warn, "vsock: cannot write an RX packet");
    }
    Some((HDR_SIZE + payload.len()) as u32)
}

/// Connects to a Unix socket without blocking: a host listener whose backlog is full refuses
/// (EAGAIN) instead of stalling the event loop, which a guest could otherwise arrange.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

    let addr = UnixAddr::new(path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

/// Parses `CONNECT <port>` (the newline already stripped).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    line.strip_prefix("CONNECT ")?.trim().parse().ok()
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        super::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        crate::ratelimited!(
            log::Level::Debug,
            "vsock: write to read-only config ignored"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queues.len(),
            });
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.reset_pending = false;
        self.conns.clear();
        self.tokens.clear();
        self.pending_host.clear();
        self.ready.clear();
        self.control.clear();
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The epoll instance of the host sockets (level-triggered).
    fn host_events(&self) -> Vec<HostEvent> {
        vec![HostEvent {
            fd: self.epoll.as_raw_fd(),
            edge: false,
        }]
    }

    fn queue_notified(&mut self, index: usize) {
        if index == EVQ {
            self.event_queue_notified();
        }
    }

    /// Whatever woke the thread, the order is: guest packets, host sockets, then fill RX.
    fn process(&mut self) {
        self.process_tx();
        self.process_host_events();
        self.process_rx();
    }

    /// The host sockets of the snapshotted VM are gone: the guest drops the connections it
    /// believes open (there were none at the snapshot, but this also makes it read the CID
    /// again).
    fn restored(&mut self) {
        self.send_transport_reset();
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    /// Connections are not saved: a snapshot with one open is refused. Host clients that have
    /// not sent their `CONNECT` line yet are not part of the guest's state and are dropped.
    fn save_state(&self) -> Result<DeviceState, DeviceStateError> {
        if !self.conns.is_empty() {
            return Err(DeviceStateError::Busy(format!(
                "vsock has {} open connection(s); close them before a snapshot",
                self.conns.len()
            )));
        }
        let queues = self.active.as_ref().map_or(&[][..], |a| &a.queues[..]);
        Ok(DeviceState::new(
            queues,
            DeviceKind::Vsock {
                guest_cid: self.guest_cid,
            },
        ))
    }

    fn restore_state(&mut self, kind: &DeviceKind) -> Result<(), DeviceStateError> {
        match kind {
            DeviceKind::Vsock { guest_cid } if *guest_cid == self.guest_cid => Ok(()),
            DeviceKind::Vsock { guest_cid } => Err(DeviceStateError::Invalid(format!(
                "vsock CID {guest_cid} saved, {} here",
                self.guest_cid
            ))),
            other => Err(DeviceStateError::Invalid(format!(
                "{other:?} is not a vsock state"
            ))),
        }
    }
}

#[cfg(test)]
mod tests;

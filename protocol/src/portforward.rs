//! The port-forward contract between the shim and the agent.
//!
//! The shim forwards a TCP connection into the guest over one vsock stream to
//! [`crate::PORT_FORWARD_VSOCK_PORT`]. It first sends a fixed request naming the guest TCP port
//! ([`REQUEST_LEN`] bytes: the magic `NSPF`, then the port as a big-endian `u16`); the agent
//! connects to `127.0.0.1:<port>` in the guest and answers one [`Status`] byte. After
//! [`Status::Connected`] the stream carries the connection's bytes both ways; after any other
//! status the agent closes it.
//!
//! Both sides read exactly the bytes of the contract and nothing more: the request is fixed
//! in size (no length for the other side to choose), the status is one byte, and whatever
//! follows belongs to the forwarded connection.
//!
//! Both sides also share the copy ([`splice`]) and the bound on connections open at once
//! ([`Slots`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Forwarded connections open at once, per pod on the host and per guest.
pub const MAX_CONNECTIONS: usize = 64;

/// Copy buffer per direction.
const COPY_BUF: usize = 32 << 10;

/// Length of the request the shim sends.
pub const REQUEST_LEN: usize = 6;

/// The request's first bytes.
pub const REQUEST_MAGIC: [u8; 4] = *b"NSPF";

/// A request that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The first bytes are not [`REQUEST_MAGIC`].
    #[error("not a port-forward request (magic {0:02x?})")]
    Magic([u8; 4]),
    /// Port 0 names no listener.
    #[error("port 0 requested")]
    PortZero,
}

/// The request for guest TCP `port`.
pub fn encode_request(port: u16) -> [u8; REQUEST_LEN] {
    let p = port.to_be_bytes();
    let m = REQUEST_MAGIC;
    [m[0], m[1], m[2], m[3], p[0], p[1]]
}

/// The guest TCP port a request names.
pub fn parse_request(req: &[u8; REQUEST_LEN]) -> Result<u16, RequestError> {
    let magic = [req[0], req[1], req[2], req[3]];
    if magic != REQUEST_MAGIC {
        return Err(RequestError::Magic(magic));
    }
    match u16::from_be_bytes([req[4], req[5]]) {
        0 => Err(RequestError::PortZero),
        port => Ok(port),
    }
}

/// The agent's answer to a request: one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Connected: the stream now carries the connection.
    Connected = 0,
    /// Nothing listens on the port in the guest (ECONNREFUSED).
    Refused = 1,
    /// The connection failed otherwise (a timeout, no memory, ...).
    Failed = 2,
    /// The request was malformed.
    BadRequest = 3,
}

impl Status {
    /// The status a byte from the guest stands for; `None` for any other byte.
    pub fn from_byte(b: u8) -> Option<Status> {
        match b {
            0 => Some(Status::Connected),
            1 => Some(Status::Refused),
            2 => Some(Status::Failed),
            3 => Some(Status::BadRequest),
            _ => None,
        }
    }
}

/// A stream socket whose directions can be ended one at a time.
pub trait HalfClose: Read + Write + Send + Sized + 'static {
    /// A second handle on the same socket.
    fn try_clone(&self) -> io::Result<Self>;
    /// shutdown(2).
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

impl HalfClose for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
}

impl HalfClose for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

/// Copies both ways between `a` and `b` until both directions ended, `a` to `b` on a thread
/// of its own. The end of a direction (EOF) is passed on as a half-close (shutdown of the
/// other socket's write side), so an exchange that ends one way first (HTTP/1.0) finishes;
/// an error in either direction ends both.
pub fn splice<A: HalfClose, B: HalfClose>(a: A, b: B) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let forth = std::thread::Builder::new()
        .name("forward-copy".into())
        .spawn(move || one_way(a2, b2));
    one_way(b, a);
    if let Ok(t) = forth {
        let _ = t.join();
    }
}

/// One direction: plain read/write until EOF, then half-close; on an error, shut both down.
fn one_way<F: HalfClose, T: HalfClose>(mut from: F, mut to: T) {
    let mut buf = vec![0u8; COPY_BUF];
    let ok = loop {
        match from.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break false,
        }
    };
    if !(ok && to.shutdown(Shutdown::Write).is_ok()) {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }
}

/// The connections open at once, bounded by [`MAX_CONNECTIONS`].
#[derive(Debug, Clone, Default)]
pub struct Slots(Arc<AtomicUsize>);

/// One open connection's place in its [`Slots`]; given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slots {
    /// A place for one more connection, unless [`MAX_CONNECTIONS`] are open.
    pub fn take(&self) -> Option<Slot> {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(&self.0)))
    }

    /// How many are open.
    pub fn open(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_given_back() {
        let slots = Slots::default();
        let taken: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| slots.take().unwrap_or_else(|| panic!("a free slot")))
            .collect();
        assert!(slots.take().is_none());
        drop(taken);
        assert_eq!(slots.open(), 0);
        assert!(slots.take().is_some());
    }

    /// A TCP connection spliced to a Unix socket pair: bytes both ways, and each side's EOF
    /// arrives at the other while the other direction still carries data.
    #[test]
    fn splice_copies_both_ways_and_passes_half_closes_on() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let mut client = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
        let (server, _) = listener.accept().unwrap_or_else(|e| panic!("{e}"));
        let (inner, mut far) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let t = std::thread::spawn(move || splice(server, inner));
        client
            .write_all(b"request")
            .unwrap_or_else(|e| panic!("{e}"));
        client
            .shutdown(Shutdown::Write)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = Vec::new();
        far.read_to_end(&mut got).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, b"request", "the client's EOF reached the far end");
        far.write_all(b"answer after EOF")
            .unwrap_or_else(|e| panic!("{e}"));
        drop(far);
        let mut back = Vec::new();
        client
            .read_to_end(&mut back)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, b"answer after EOF");
        t.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    }

    #[test]
    fn a_request_round_trips_and_nothing_else_parses() {
        for port in [1, 80, 8081, u16::MAX] {
            assert_eq!(parse_request(&encode_request(port)), Ok(port));
        }
        assert_eq!(&encode_request(0x1f91), b"NSPF\x1f\x91");
        assert_eq!(parse_request(b"GET / "), Err(RequestError::Magic(*b"GET ")));
        assert_eq!(parse_request(b"NSPF\0\0"), Err(RequestError::PortZero));
        assert_eq!(
            parse_request(b"nspf\x1f\x91"),
            Err(RequestError::Magic(*b"nspf"))
        );
    }

    #[test]
    fn only_known_status_bytes_are_statuses() {
        for s in [
            Status::Connected,
            Status::Refused,
            Status::Failed,
            Status::BadRequest,
        ] {
            assert_eq!(Status::from_byte(s as u8), Some(s));
        }
        for b in 4..=u8::MAX {
            assert_eq!(Status::from_byte(b), None);
        }
    }
}

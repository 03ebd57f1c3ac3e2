//! Port-forward in the guest: TCP connections the host forwards (`kubectl port-forward`).
//!
//! The agent listens on [`PORT_FORWARD_VSOCK_PORT`]. Each stream starts with the shim's fixed
//! request naming a TCP port ([`nutshell_protocol::portforward`]); the agent connects to
//! `127.0.0.1:<port>` in the guest (the pod's containers share the VM's network namespace, so
//! their listeners are there, loopback-only ones included), answers one status byte, and then
//! copies both ways. A stream that sends no full request within [`REQUEST_TIMEOUT`] is closed;
//! at most [`MAX_CONNECTIONS`] are forwarded at once.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nutshell_protocol::portforward::{
    parse_request, splice, RequestError, Slots, Status, MAX_CONNECTIONS, REQUEST_LEN,
};
use nutshell_protocol::PORT_FORWARD_VSOCK_PORT;

use crate::sys;

/// How long the host has to send the request once connected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on the connect in the guest (to loopback it is immediate or refused).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pending connections the listener holds.
const BACKLOG: i32 = 16;

/// Why one forwarded stream ended before its copy.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The request could not be read (closed early, too slow, an I/O error).
    #[error("read the request")]
    Read(#[source] io::Error),
    /// The request is malformed.
    #[error("malformed request")]
    Request(#[source] RequestError),
    /// The connect to the guest port failed.
    #[error("connect to 127.0.0.1:{port}")]
    Connect {
        /// The port.
        port: u16,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The status could not be sent.
    #[error("send the status")]
    Reply(#[source] io::Error),
}

/// Reads the request on `stream` (exactly [`REQUEST_LEN`] bytes, within [`REQUEST_TIMEOUT`]),
/// connects to its port on the guest's loopback, and answers the status. On success the
/// stream carries the connection from here on.
pub fn open(stream: &mut UnixStream) -> Result<TcpStream, ForwardError> {
    let mut req = [0u8; REQUEST_LEN];
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| stream.read_exact(&mut req))
        .and_then(|()| stream.set_read_timeout(None))
        .map_err(ForwardError::Read)?;
    let port = match parse_request(&req) {
        Ok(p) => p,
        Err(e) => {
            let _ = stream.write_all(&[Status::BadRequest as u8]);
            return Err(ForwardError::Request(e));
        }
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(tcp) => {
            stream
                .write_all(&[Status::Connected as u8])
                .map_err(ForwardError::Reply)?;
            Ok(tcp)
        }
        Err(source) => {
            let status = if source.kind() == io::ErrorKind::ConnectionRefused {
                Status::Refused
            } else {
                Status::Failed
            };
            let _ = stream.write_all(&[status as u8]);
            Err(ForwardError::Connect { port, source })
        }
    }
}

/// Handles one stream from the host: [`open`], then the copy until both directions ended.
pub fn handle(mut stream: UnixStream) {
    match open(&mut stream) {
        Ok(tcp) => splice(stream, tcp),
        // A refused port is the user's business (a forward to a port nothing listens on).
        Err(e @ ForwardError::Connect { .. }) => {
            log::debug!("port-forward: {}", nutshell_protocol::error_chain(&e))
        }
        Err(e) => log::warn!("port-forward: {}", nutshell_protocol::error_chain(&e)),
    }
}

/// Accepts streams on the listening socket `listener` forever, each handled on a thread of
/// its own; beyond [`MAX_CONNECTIONS`] at once a stream is closed at once. Returns only if
/// the listener fails.
pub fn accept_loop(listener: &OwnedFd) -> io::Error {
    let slots = Slots::default();
    let mut refused = 0u64;
    loop {
        match sys::poll_readable(listener.as_fd(), Duration::from_secs(3600)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => return e,
        }
        let conn = match sys::accept_blocking(listener.as_fd()) {
            Ok(c) => c,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(e) => return e,
        };
        let Some(slot) = slots.take() else {
            refused += 1;
            // Once per power of two: the host decides how often this happens.
            if refused.is_power_of_two() {
                log::warn!(
                    "port-forward: {MAX_CONNECTIONS} streams open; {refused} refused so far"
                );
            }
            continue;
        };
        // A vsock (or, in tests, Unix) stream socket: UnixStream only reads, writes, shuts
        // down and sets timeouts on it, which every stream socket takes alike.
        let stream = UnixStream::from(conn);
        let spawned = std::thread::Builder::new()
            .name("forward".into())
            .spawn(move || {
                let _slot = slot;
                handle(stream);
            });
        if let Err(e) = spawned {
            log::warn!("port-forward: start a thread: {e}");
        }
    }
}

/// Listens on [`PORT_FORWARD_VSOCK_PORT`] and serves it on a thread of its own.
pub fn serve_vsock() -> io::Result<()> {
    let listener = sys::vsock_listen_backlog(PORT_FORWARD_VSOCK_PORT, BACKLOG)?;
    std::thread::Builder::new()
        .name("port-forward".into())
        .spawn(move || {
            let e = accept_loop(&listener);
            log::error!("port-forward listener failed: {e}; port-forward is off");
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpListener};
    use std::time::Instant;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap_or_else(|e| panic!("{e}"))
    }

    /// A port on which nothing listens (bound, then closed).
    fn free_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        l.local_addr().unwrap_or_else(|e| panic!("{e}")).port()
    }

    /// The status byte, and that nothing follows it (EOF, or a reset: the agent closed the
    /// stream with the rest of a bad request unread).
    fn status_of(host: &mut UnixStream) -> Vec<u8> {
        let mut got = [0u8; 1];
        host.read_exact(&mut got).unwrap_or_else(|e| panic!("{e}"));
        let mut rest = Vec::new();
        let after = host.read_to_end(&mut rest);
        assert!(
            matches!(&after, Ok(0))
                || matches!(&after, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "closed after the status: {after:?} {rest:?}"
        );
        got.to_vec()
    }

    #[test]
    fn a_malformed_request_is_answered_bad_request_and_closed() {
        let (mut host, agent) = pair();
        host.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .unwrap_or_else(|e| panic!("{e}"));
        handle(agent);
        assert_eq!(status_of(&mut host), [Status::BadRequest as u8]);

        let (mut host, agent) = pair();
        host.write_all(b"NSPF\0\0")
            .unwrap_or_else(|e| panic!("{e}"));
        handle(agent);
        assert_eq!(status_of(&mut host), [Status::BadRequest as u8], "port 0");
    }

    #[test]
    fn a_short_request_is_closed_without_an_answer() {
        let (mut host, mut agent) = pair();
        host.write_all(b"NSP").unwrap_or_else(|e| panic!("{e}"));
        host.shutdown(Shutdown::Write)
            .unwrap_or_else(|e| panic!("{e}"));
        let e = open(&mut agent).err();
        assert!(matches!(e, Some(ForwardError::Read(_))), "{e:?}");
    }

    #[test]
    fn a_silent_host_is_timed_out() {
        let (_host, mut agent) = pair();
        let t = Instant::now();
        let e = open(&mut agent).err();
        assert!(matches!(e, Some(ForwardError::Read(_))), "{e:?}");
        assert!(t.elapsed() >= REQUEST_TIMEOUT);
    }

    #[test]
    fn a_port_nothing_listens_on_is_refused() {
        let (mut host, agent) = pair();
        let port = free_port();
        host.write_all(&nutshell_protocol::portforward::encode_request(port))
            .unwrap_or_else(|e| panic!("{e}"));
        handle(agent);
        assert_eq!(status_of(&mut host), [Status::Refused as u8]);
    }

    /// Through the accept loop on a Unix listener standing in for vsock: the request, the
    /// status, then an HTTP/1.0-style exchange with a loopback server (answer after EOF).
    #[test]
    fn a_forwarded_stream_reaches_the_loopback_listener() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let port = server.local_addr().unwrap_or_else(|e| panic!("{e}")).port();
        std::thread::spawn(move || {
            let (mut c, _) = server.accept().unwrap_or_else(|e| panic!("{e}"));
            let mut req = Vec::new();
            c.read_to_end(&mut req).unwrap_or_else(|e| panic!("{e}"));
            c.write_all(format!("got {}", String::from_utf8_lossy(&req)).as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
        });
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("pf.sock");
        let listener =
            std::os::unix::net::UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("{e}"));
        let fd = OwnedFd::from(listener);
        std::thread::spawn(move || accept_loop(&fd));

        let mut host = UnixStream::connect(&path).unwrap_or_else(|e| panic!("{e}"));
        host.write_all(&nutshell_protocol::portforward::encode_request(port))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut status = [0u8; 1];
        host.read_exact(&mut status)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status[0], Status::Connected as u8);
        host.write_all(b"GET /").unwrap_or_else(|e| panic!("{e}"));
        host.shutdown(Shutdown::Write)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut answer = String::new();
        host.read_to_string(&mut answer)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer, "got GET /");
    }
}

//! Stdio streams of container processes: one vsock stream per stdio pipe, connected by the host.
//!
//! The host (shim) picks the guest ports and sends them with `CreateContainer`/`ExecProcess`;
//! it starts connecting (through the VMM's hybrid vsock socket, retrying until the agent
//! listens) before it sends the RPC. The handler listens on each port, accepts exactly one
//! connection per port within a deadline, and closes the listeners. The accepted sockets
//! become the process's stdin/stdout/stderr as they are: the container reads and writes the
//! socket itself, with no copy in the agent. With a terminal, one stream (the `stdout` port)
//! carries the pty both ways; the agent copies between it and the pty master.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nutshell_protocol::{AGENT_VSOCK_PORT, PORT_FORWARD_VSOCK_PORT};

use crate::sys;

/// How long the agent waits for the host to connect every stream of a process.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors while setting up a process's stdio streams.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The requested ports are not a valid combination.
    #[error("invalid stdio ports: {0}")]
    InvalidPorts(String),
    /// Listening on a port failed (e.g. already in use).
    #[error("cannot listen on vsock port {port} for {stream}")]
    Listen {
        /// Which stream.
        stream: &'static str,
        /// The port.
        port: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The host did not connect in time.
    #[error("the host did not connect {stream} (vsock port {port}) within {timeout:?}")]
    Timeout {
        /// Which stream.
        stream: &'static str,
        /// The port.
        port: u32,
        /// The deadline.
        timeout: Duration,
    },
    /// poll(2) or accept(2) failed.
    #[error("accepting {stream} on vsock port {port}")]
    Accept {
        /// Which stream.
        stream: &'static str,
        /// The port.
        port: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The guest ports of a process's streams; 0 = not connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioPorts {
    /// Standard input (without a terminal).
    pub stdin: u32,
    /// Standard output; with a terminal, the pty stream (both ways).
    pub stdout: u32,
    /// Standard error (without a terminal).
    pub stderr: u32,
}

impl From<&nutshell_protocol::generated::agent::StdioPorts> for StdioPorts {
    fn from(p: &nutshell_protocol::generated::agent::StdioPorts) -> Self {
        StdioPorts {
            stdin: p.stdin,
            stdout: p.stdout,
            stderr: p.stderr,
        }
    }
}

/// The connected streams of one process.
#[derive(Debug, Default)]
pub struct Streams {
    /// Standard input, if the host connected one.
    pub stdin: Option<OwnedFd>,
    /// Standard output, or the pty stream with a terminal.
    pub stdout: Option<OwnedFd>,
    /// Standard error.
    pub stderr: Option<OwnedFd>,
}

impl StdioPorts {
    /// The streams to accept, in order, as (name, port); checks the combination: distinct
    /// non-zero ports, never the agent's own port or `VMADDR_PORT_ANY`, and with a terminal
    /// only the `stdout` (pty) stream.
    pub fn wanted(&self, terminal: bool) -> Result<Vec<(&'static str, u32)>, StdioError> {
        let all = [
            ("stdin", self.stdin),
            ("stdout", self.stdout),
            ("stderr", self.stderr),
        ];
        let wanted: Vec<_> = all.into_iter().filter(|(_, p)| *p != 0).collect();
        if terminal && (self.stdin != 0 || self.stderr != 0) {
            return Err(StdioError::InvalidPorts(
                "with a terminal only the stdout port (the pty stream) is used".into(),
            ));
        }
        for (i, (name, port)) in wanted.iter().enumerate() {
            if *port == AGENT_VSOCK_PORT || *port == PORT_FORWARD_VSOCK_PORT || *port == u32::MAX {
                return Err(StdioError::InvalidPorts(format!(
                    "{name} uses reserved port {port}"
                )));
            }
            if let Some((other, _)) = wanted[..i].iter().find(|(_, p)| p == port) {
                return Err(StdioError::InvalidPorts(format!(
                    "{other} and {name} share port {port}"
                )));
            }
        }
        Ok(wanted)
    }
}

/// Makes listening sockets: vsock in the guest, something else in tests.
pub trait Listen {
    /// A non-blocking listening socket for `port`.
    fn listen(&self, port: u32) -> io::Result<OwnedFd>;
}

/// Listens on the guest's vsock ports (`VMADDR_CID_ANY`).
#[derive(Debug, Clone, Copy, Default)]
pub struct VsockListen;

impl Listen for VsockListen {
    fn listen(&self, port: u32) -> io::Result<OwnedFd> {
        sys::vsock_listen(port)
    }
}

/// Listens on every wanted port, then accepts one connection on each within `timeout`.
/// Listeners are closed before returning, also on an error; a stream accepted before an error
/// is closed too (the host sees its connection end).
pub fn accept_streams(
    listener: &dyn Listen,
    ports: &StdioPorts,
    terminal: bool,
    timeout: Duration,
) -> Result<Streams, StdioError> {
    let wanted = ports.wanted(terminal)?;
    let mut listening = Vec::with_capacity(wanted.len());
    for (stream, port) in &wanted {
        let fd = listener
            .listen(*port)
            .map_err(|source| StdioError::Listen {
                stream,
                port: *port,
                source,
            })?;
        listening.push((*stream, *port, fd));
    }
    let deadline = Instant::now() + timeout;
    let mut streams = Streams::default();
    for (stream, port, fd) in &listening {
        let accepted = accept_one(fd.as_fd(), deadline).map_err(|e| match e {
            None => StdioError::Timeout {
                stream,
                port: *port,
                timeout,
            },
            Some(source) => StdioError::Accept {
                stream,
                port: *port,
                source,
            },
        })?;
        let slot = match *stream {
            "stdin" => &mut streams.stdin,
            "stdout" => &mut streams.stdout,
            _ => &mut streams.stderr,
        };
        *slot = Some(accepted);
    }
    Ok(streams)
}

/// Accepts one connection before `deadline`: `Err(None)` on timeout.
fn accept_one(fd: BorrowedFd<'_>, deadline: Instant) -> Result<OwnedFd, Option<io::Error>> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(None);
        }
        if !sys::poll_readable(fd, left).map_err(Some)? {
            continue;
        }
        match sys::accept_blocking(fd) {
            Ok(conn) => return Ok(conn),
            // Another poll wake-up without a connection (e.g. the peer gave up): keep waiting.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Some(e)),
        }
    }
}

/// The raw descriptor of an optional stream, for logging.
pub fn raw(fd: &Option<OwnedFd>) -> i32 {
    fd.as_ref().map_or(-1, |f| f.as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(stdin: u32, stdout: u32, stderr: u32) -> StdioPorts {
        StdioPorts {
            stdin,
            stdout,
            stderr,
        }
    }

    #[test]
    fn wanted_skips_unconnected_streams() {
        let w = ports(0, 5000, 5001).wanted(false).unwrap();
        assert_eq!(w, vec![("stdout", 5000), ("stderr", 5001)]);
        assert!(ports(0, 0, 0).wanted(false).unwrap().is_empty());
    }

    #[test]
    fn wanted_refuses_shared_and_reserved_ports() {
        let e = ports(5000, 5000, 0).wanted(false).unwrap_err().to_string();
        assert!(e.contains("stdin and stdout share port 5000"), "{e}");
        let e = ports(0, AGENT_VSOCK_PORT, 0).wanted(false).unwrap_err();
        assert!(e.to_string().contains("reserved port 1024"), "{e}");
        assert!(ports(0, u32::MAX, 0).wanted(false).is_err());
        assert!(ports(PORT_FORWARD_VSOCK_PORT, 0, 0).wanted(false).is_err());
    }

    /// Unix sockets named by port in a directory stand in for vsock ports on the host.
    struct UnixListen(std::path::PathBuf);

    impl Listen for UnixListen {
        fn listen(&self, port: u32) -> io::Result<OwnedFd> {
            let l = std::os::unix::net::UnixListener::bind(self.0.join(port.to_string()))?;
            l.set_nonblocking(true)?;
            Ok(l.into())
        }
    }

    #[test]
    fn accepts_one_connection_per_stream() {
        use std::io::{Read as _, Write as _};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let host = std::thread::spawn(move || {
            // The host connects before and while the agent listens: retry until it answers.
            let mut conns = Vec::new();
            for port in [6001, 6002, 6003] {
                let p = path.join(port.to_string());
                let mut c = loop {
                    match std::os::unix::net::UnixStream::connect(&p) {
                        Ok(c) => break c,
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                };
                c.write_all(format!("hello {port}").as_bytes()).unwrap();
                conns.push(c);
            }
            conns
        });
        let streams = accept_streams(
            &UnixListen(dir.path().to_path_buf()),
            &ports(6001, 6002, 6003),
            false,
            Duration::from_secs(10),
        )
        .unwrap();
        let _conns = host.join().unwrap();
        for (fd, port) in [
            (streams.stdin, 6001),
            (streams.stdout, 6002),
            (streams.stderr, 6003),
        ] {
            let mut f = std::fs::File::from(fd.unwrap());
            let mut buf = vec![0; 10];
            f.read_exact(&mut buf).unwrap();
            assert_eq!(buf, format!("hello {port}").as_bytes());
        }
    }

    #[test]
    fn a_stream_the_host_never_connects_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let e = accept_streams(
            &UnixListen(dir.path().to_path_buf()),
            &ports(0, 6100, 0),
            false,
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                StdioError::Timeout {
                    stream: "stdout",
                    port: 6100,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_port_in_use_is_a_listen_error() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListen(dir.path().to_path_buf());
        let _busy = l.listen(6200).unwrap();
        let e =
            accept_streams(&l, &ports(0, 6200, 0), false, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, StdioError::Listen { port: 6200, .. }), "{e}");
    }

    #[test]
    fn terminal_uses_only_the_pty_stream() {
        assert_eq!(
            ports(0, 7000, 0).wanted(true).unwrap(),
            vec![("stdout", 7000)]
        );
        assert!(ports(7001, 7000, 0).wanted(true).is_err());
        assert!(ports(0, 7000, 7002).wanted(true).is_err());
    }
}

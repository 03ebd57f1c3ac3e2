//! Host-side client of the agent API, over the VMM's hybrid vsock socket.
//!
//! Connecting: open the VMM's Unix socket, write `CONNECT <port>\n`, read `OK <hostport>\n`
//! (the VMM sends it once the guest accepted; it closes the connection if the guest refused),
//! then speak ttrpc on the stream. While the guest boots the agent does not listen yet, so
//! [`AgentClient::connect`] retries until a bounded deadline.
//!
//! The guest is untrusted: the handshake line is read byte by byte up to a small bound (so no
//! byte of the ttrpc stream is consumed and no guest-chosen amount is buffered), parsed
//! strictly, and every reply is validated by the conversions in [`crate::types`].

use std::io::{self, Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::generated::agent as pb;
use crate::generated::agent_ttrpc;
use crate::types::{
    validate_pids, validate_printable, AgentVersion, ContainerStats, ProcessExit, Resources,
    SandboxSpec, ServingStatus, StdioPorts, TypesError, MAX_ID_LEN,
};

/// Longest handshake reply accepted: `OK ` + a u32 in decimal + `\n` is at most 14 bytes.
pub const MAX_HANDSHAKE_LINE: usize = 32;

/// Longest error message from the guest kept in an error (the rest is cut).
const MAX_STATUS_MESSAGE: usize = 256;

/// A failed hybrid vsock handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading or writing the socket failed (a read timeout included).
    #[error("hybrid vsock handshake I/O")]
    Io(#[source] io::Error),
    /// The VMM closed the connection before a full line: the guest refused (nothing listens
    /// on the port yet).
    #[error("connection closed before the handshake reply (the guest refused the port)")]
    Closed,
    /// The reply line is longer than [`MAX_HANDSHAKE_LINE`].
    #[error("handshake reply longer than {MAX_HANDSHAKE_LINE} bytes")]
    TooLong,
    /// The reply is not `OK <u32>\n`.
    #[error("malformed handshake reply {0:?}")]
    Malformed(String),
}

impl HandshakeError {
    /// Whether trying again may succeed (the guest may not listen yet).
    fn is_transient(&self) -> bool {
        match self {
            HandshakeError::Closed => true,
            HandshakeError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
            ),
            HandshakeError::TooLong | HandshakeError::Malformed(_) => false,
        }
    }
}

/// Errors of the agent client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The VMM's hybrid vsock socket cannot be connected.
    #[error("cannot connect to {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The handshake failed.
    #[error("hybrid vsock handshake for port {port} failed")]
    Handshake {
        /// The guest port.
        port: u32,
        /// The cause.
        #[source]
        source: HandshakeError,
    },
    /// The agent did not answer within the connect timeout; the last attempt's error is the
    /// source.
    #[error("the agent did not accept a connection within {timeout:?}")]
    Timeout {
        /// The bound that passed.
        timeout: Duration,
        /// Why the last attempt failed.
        #[source]
        last: Box<ClientError>,
    },
    /// The ttrpc transport failed (connection closed, timeout, undecodable reply).
    #[error("ttrpc transport")]
    Transport(#[source] ttrpc::Error),
    /// The agent answered with an error status.
    #[error("agent returned {code:?}: {message}")]
    Status {
        /// The ttrpc status code.
        code: ttrpc::Code,
        /// The message, sanitized and cut to a bounded length.
        message: String,
    },
    /// The agent's reply is invalid.
    #[error("invalid reply from the agent")]
    InvalidReply(#[source] TypesError),
    /// The host's random bytes could not be read.
    #[error("cannot read host entropy")]
    Entropy(#[source] io::Error),
}

impl From<ttrpc::Error> for ClientError {
    fn from(e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => ClientError::Status {
                code: s.code(),
                message: sanitize(s.message()),
            },
            e => ClientError::Transport(e),
        }
    }
}

/// Printable ASCII only, at most [`MAX_STATUS_MESSAGE`] characters: a guest message is safe to log.
fn sanitize(s: &str) -> String {
    s.chars()
        .take(MAX_STATUS_MESSAGE)
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect()
}

/// Parses the VMM's handshake reply: exactly `OK <decimal u32>\n`, nothing else.
pub fn parse_ok_line(line: &[u8]) -> Result<u32, HandshakeError> {
    let malformed = || HandshakeError::Malformed(sanitize(&String::from_utf8_lossy(line)));
    let digits = line
        .strip_prefix(b"OK ")
        .and_then(|rest| rest.strip_suffix(b"\n"))
        .ok_or_else(malformed)?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(malformed());
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<u32>().ok())
        .ok_or_else(malformed)
}

/// Reads one line (with its `\n`) byte by byte, at most [`MAX_HANDSHAKE_LINE`] bytes, so that
/// nothing after the line is consumed.
pub fn read_handshake_line(reader: &mut impl Read) -> Result<Vec<u8>, HandshakeError> {
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        match reader.read(&mut byte) {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(_) => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    return Ok(line);
                }
                if line.len() >= MAX_HANDSHAKE_LINE {
                    return Err(HandshakeError::TooLong);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HandshakeError::Io(e)),
        }
    }
}

/// Does the hybrid vsock handshake on a connected stream; returns the host-side port.
pub fn handshake(
    stream: &mut UnixStream,
    port: u32,
    timeout: Duration,
) -> Result<u32, HandshakeError> {
    let timeout = timeout.max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(HandshakeError::Io)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(HandshakeError::Io)?;
    let line = read_handshake_line(stream)?;
    let host_port = parse_ok_line(&line)?;
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(HandshakeError::Io)?;
    Ok(host_port)
}

/// Connects to guest vsock `port` through the hybrid vsock socket `uds`: one attempt.
pub fn connect_hybrid(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ClientError> {
    let mut stream = UnixStream::connect(uds).map_err(|source| ClientError::Connect {
        path: uds.to_path_buf(),
        source,
    })?;
    handshake(&mut stream, port, timeout)
        .map_err(|source| ClientError::Handshake { port, source })?;
    Ok(stream)
}

/// Opens a raw stream to guest vsock `port` through the hybrid vsock socket `uds`, retrying
/// every `retry_interval` while the guest does not listen on the port yet, at most `timeout` in
/// all. Used for stdio streams: the agent listens on their ports only while it handles the RPC
/// that creates the process, so the host starts connecting before or while it sends that RPC.
pub fn connect_hybrid_retry(
    uds: &Path,
    port: u32,
    timeout: Duration,
    retry_interval: Duration,
) -> Result<UnixStream, ClientError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match connect_hybrid(uds, port, left) {
            Ok(stream) => return Ok(stream),
            Err(e) => e,
        };
        if !is_transient(&err) {
            return Err(err);
        }
        if Instant::now() + retry_interval >= deadline {
            return Err(ClientError::Timeout {
                timeout,
                last: Box::new(err),
            });
        }
        std::thread::sleep(retry_interval);
    }
}

/// Whether a failed connection attempt is worth repeating while the guest boots.
fn is_transient(e: &ClientError) -> bool {
    match e {
        // The VMM has not created its socket yet, or not listening yet.
        ClientError::Connect { source, .. } => matches!(
            source.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        ),
        ClientError::Handshake { source, .. } => source.is_transient(),
        _ => false,
    }
}

/// How [`AgentClient::connect`] behaves.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Guest vsock port of the agent.
    pub port: u32,
    /// Bound on the whole connect, retries included (the guest boots meanwhile).
    pub connect_timeout: Duration,
    /// Pause between attempts.
    pub retry_interval: Duration,
    /// Bound on each RPC.
    pub rpc_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            port: crate::AGENT_VSOCK_PORT,
            connect_timeout: Duration::from_secs(120),
            retry_interval: Duration::from_millis(100),
            rpc_timeout: Duration::from_secs(30),
        }
    }
}

/// A ttrpc client of the agent, connected through hybrid vsock.
#[derive(Clone)]
pub struct AgentClient {
    health: agent_ttrpc::HealthClient,
    agent: agent_ttrpc::AgentClient,
    rpc_timeout: Duration,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("rpc_timeout", &self.rpc_timeout)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Connects to the agent behind the hybrid vsock socket `uds`, retrying while the guest
    /// boots, at most `opts.connect_timeout` in all.
    pub fn connect(uds: &Path, opts: &ConnectOptions) -> Result<Self, ClientError> {
        let deadline = Instant::now() + opts.connect_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match connect_hybrid(uds, opts.port, left) {
                Ok(stream) => return Self::from_stream(stream, opts.rpc_timeout),
                Err(e) => e,
            };
            if !is_transient(&err) {
                return Err(err);
            }
            if Instant::now() + opts.retry_interval >= deadline {
                return Err(ClientError::Timeout {
                    timeout: opts.connect_timeout,
                    last: Box::new(err),
                });
            }
            std::thread::sleep(opts.retry_interval);
        }
    }

    /// A client over an already connected stream (after the handshake, or a plain Unix socket
    /// to an agent served on the host in tests).
    pub fn from_stream(stream: UnixStream, rpc_timeout: Duration) -> Result<Self, ClientError> {
        // ttrpc::Client takes ownership of the descriptor and closes it on drop.
        let client = ttrpc::Client::new(stream.into_raw_fd()).map_err(ClientError::Transport)?;
        Ok(AgentClient {
            health: agent_ttrpc::HealthClient::new(client.clone()),
            agent: agent_ttrpc::AgentClient::new(client),
            rpc_timeout,
        })
    }

    fn ctx(&self) -> ttrpc::context::Context {
        if self.rpc_timeout.is_zero() {
            // No deadline: for the calls that block until something happens (WaitProcess,
            // GetOOMEvent), on a connection without one (concurrent calls may share it).
            return ttrpc::context::Context::default();
        }
        let nanos = i64::try_from(self.rpc_timeout.as_nanos()).unwrap_or(i64::MAX);
        ttrpc::context::with_timeout(nanos)
    }

    /// `Health.Check`.
    pub fn check(&self) -> Result<ServingStatus, ClientError> {
        let r = self.health.check(self.ctx(), &pb::CheckRequest::new())?;
        ServingStatus::try_from(&r).map_err(ClientError::InvalidReply)
    }

    /// `Health.Version`.
    pub fn version(&self) -> Result<AgentVersion, ClientError> {
        let r = self
            .health
            .version(self.ctx(), &pb::VersionRequest::new())?;
        AgentVersion::try_from(&r).map_err(ClientError::InvalidReply)
    }

    /// `Agent.CreateSandbox`.
    pub fn create_sandbox(&self, req: &SandboxSpec) -> Result<(), ClientError> {
        let r = pb::CreateSandboxRequest {
            sandbox_id: req.sandbox_id.clone(),
            hostname: req.hostname.clone(),
            dns_servers: req.dns_servers.clone(),
            dns_search: req.dns_search.clone(),
            shared_dir: req.shared_dir.clone(),
            annotations: req.annotations.clone(),
            sysctls: req
                .sysctls
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            namespaces: Some(pb::PodNamespaces::from(req.namespaces)).into(),
            ..Default::default()
        };
        self.agent.create_sandbox(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.DestroySandbox`.
    pub fn destroy_sandbox(&self, sandbox_id: &str) -> Result<(), ClientError> {
        let r = pb::DestroySandboxRequest {
            sandbox_id: sandbox_id.to_owned(),
            ..Default::default()
        };
        self.agent.destroy_sandbox(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.CreateContainer`: `oci_spec_json` is the spec already rewritten for the guest.
    pub fn create_container(
        &self,
        container_id: &str,
        oci_spec_json: Vec<u8>,
        stdio: StdioPorts,
        terminal: bool,
    ) -> Result<(), ClientError> {
        let r = pb::CreateContainerRequest {
            container_id: container_id.to_owned(),
            oci_spec_json,
            stdio: protobuf::MessageField::some(stdio.into()),
            terminal,
            ..Default::default()
        };
        self.agent.create_container(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.StartContainer`.
    pub fn start_container(&self, container_id: &str) -> Result<(), ClientError> {
        let r = pb::StartContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.agent.start_container(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.RemoveContainer`; `timeout_secs` 0 is the agent's default.
    pub fn remove_container(
        &self,
        container_id: &str,
        timeout_secs: u32,
    ) -> Result<(), ClientError> {
        let r = pb::RemoveContainerRequest {
            container_id: container_id.to_owned(),
            timeout_secs,
            ..Default::default()
        };
        self.agent.remove_container(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.ExecProcess`: `process_json` is the OCI `process` object.
    pub fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdio: StdioPorts,
        terminal: bool,
    ) -> Result<(), ClientError> {
        let r = pb::ExecProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            process_json,
            stdio: protobuf::MessageField::some(stdio.into()),
            terminal,
            ..Default::default()
        };
        self.agent.exec_process(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.SignalProcess`; an empty `exec_id` is the init process, `all` every process of
    /// the container.
    pub fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ClientError> {
        let r = pb::SignalProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        self.agent.signal_process(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.WaitProcess`: blocks until the process exits. Call it on a client made with no
    /// RPC timeout ([`ConnectOptions::rpc_timeout`] zero); concurrent calls may share one (the
    /// agent serves each on a thread of the connection's pool).
    pub fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<ProcessExit, ClientError> {
        let r = pb::WaitProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        let r = self.agent.wait_process(self.ctx(), &r)?;
        ProcessExit::try_from(&r).map_err(ClientError::InvalidReply)
    }

    /// `Agent.ListPids`: guest PIDs of the container's processes.
    pub fn list_pids(&self, container_id: &str) -> Result<Vec<u32>, ClientError> {
        let r = pb::ListPidsRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let r = self.agent.list_pids(self.ctx(), &r)?;
        validate_pids(&r.pids).map_err(ClientError::InvalidReply)?;
        Ok(r.pids)
    }

    /// `Agent.StatsContainer`.
    pub fn stats_container(&self, container_id: &str) -> Result<ContainerStats, ClientError> {
        let r = pb::StatsContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let r = self.agent.stats_container(self.ctx(), &r)?;
        Ok(ContainerStats::from(&r))
    }

    /// `Agent.UpdateContainer`.
    pub fn update_container(
        &self,
        container_id: &str,
        resources: &Resources,
    ) -> Result<(), ClientError> {
        let r = pb::UpdateContainerRequest {
            container_id: container_id.to_owned(),
            resources: protobuf::MessageField::some(resources.into()),
            ..Default::default()
        };
        self.agent.update_container(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.PauseContainer`.
    pub fn pause_container(&self, container_id: &str) -> Result<(), ClientError> {
        let r = pb::PauseContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.agent.pause_container(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.ResumeContainer`.
    pub fn resume_container(&self, container_id: &str) -> Result<(), ClientError> {
        let r = pb::ResumeContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.agent.resume_container(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.ResizeTty`.
    pub fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), ClientError> {
        let r = pb::ResizeTtyRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            rows,
            columns,
            ..Default::default()
        };
        self.agent.resize_tty(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.CloseStdin`.
    pub fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), ClientError> {
        let r = pb::CloseStdinRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        self.agent.close_stdin(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.RemoveProcess`: forgets an exec'd process that has exited.
    pub fn remove_process(&self, container_id: &str, exec_id: &str) -> Result<(), ClientError> {
        let r = pb::RemoveProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        self.agent.remove_process(self.ctx(), &r)?;
        Ok(())
    }

    /// `Agent.GetOOMEvent`: blocks until a container of the sandbox hits OOM; returns its id.
    /// Call it on a client made with no RPC timeout (it may share one with WaitProcess).
    pub fn get_oom_event(&self) -> Result<String, ClientError> {
        let r = self
            .agent
            .get_oom_event(self.ctx(), &pb::GetOOMEventRequest::new())?;
        validate_printable("container_id", &r.container_id, MAX_ID_LEN)
            .map_err(ClientError::InvalidReply)?;
        Ok(r.container_id)
    }

    /// `Agent.Shutdown`: the agent replies, then powers the guest off.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.agent
            .shutdown(self.ctx(), &pb::ShutdownRequest::new())?;
        Ok(())
    }

    /// `Agent.RefreshGuest`: sets the guest wall clock to `unix_nanos` (0 leaves it) and adds
    /// `entropy` to the guest RNG. Called right after a restore.
    pub fn refresh_guest(&self, unix_nanos: i64, entropy: &[u8]) -> Result<(), ClientError> {
        let mut req = pb::RefreshGuestRequest::new();
        req.unix_nanos = unix_nanos;
        req.entropy = entropy.to_vec();
        self.agent.refresh_guest(self.ctx(), &req)?;
        Ok(())
    }

    /// `Agent.RefreshGuest` with the host's wall clock now and 64 bytes from the host's
    /// `getrandom`.
    pub fn refresh_guest_now(&self) -> Result<(), ClientError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let mut entropy = [0u8; 64];
        let mut f = std::fs::File::open("/dev/urandom").map_err(ClientError::Entropy)?;
        f.read_exact(&mut entropy).map_err(ClientError::Entropy)?;
        self.refresh_guest(nanos, &entropy)
    }

    /// `Agent.UpdateInterface`: gives the guest's NIC the pod's identity (MAC, MTU,
    /// addresses), brings it up and then adds `routes` (as [`AgentClient::update_routes`]);
    /// returns the interface as the guest accepted it.
    pub fn update_interface(
        &self,
        interface: &pb::Interface,
        routes: &[pb::Route],
    ) -> Result<pb::Interface, ClientError> {
        let mut req = pb::UpdateInterfaceRequest::new();
        req.interface = protobuf::MessageField::some(interface.clone());
        if !routes.is_empty() {
            req.routes = protobuf::MessageField::some(pb::Routes {
                routes: routes.to_vec(),
                ..Default::default()
            });
        }
        Ok(self.agent.update_interface(self.ctx(), &req)?)
    }

    /// `Agent.UpdateRoutes`: adds the pod's routes in the guest, in their order; returns them
    /// as added.
    pub fn update_routes(&self, routes: &[pb::Route]) -> Result<Vec<pb::Route>, ClientError> {
        let mut req = pb::UpdateRoutesRequest::new();
        req.routes = protobuf::MessageField::some(pb::Routes {
            routes: routes.to_vec(),
            ..Default::default()
        });
        Ok(self.agent.update_routes(self.ctx(), &req)?.routes)
    }

    /// The raw generated client of the `Agent` service, for methods without a typed wrapper yet.
    pub fn raw_agent(&self) -> &agent_ttrpc::AgentClient {
        &self.agent
    }

    /// A ttrpc context with this client's RPC timeout, for [`AgentClient::raw_agent`] calls.
    pub fn context(&self) -> ttrpc::context::Context {
        self.ctx()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    #[test]
    fn ok_line_parses_strictly() {
        assert_eq!(parse_ok_line(b"OK 1073741824\n").unwrap(), 1 << 30);
        assert_eq!(parse_ok_line(b"OK 0\n").unwrap(), 0);
        assert_eq!(parse_ok_line(b"OK 4294967295\n").unwrap(), u32::MAX);
        for bad in [
            &b"OK 4294967296\n"[..],
            b"OK 00000000001\n",
            b"OK \n",
            b"OK 12",
            b"OK 12\r\n",
            b"OK +12\n",
            b"OK -1\n",
            b"ok 12\n",
            b"OK  12\n",
            b"OK 12 \n",
            b"ERR 12\n",
            b"\n",
            b"\xff\xfe\n",
        ] {
            assert!(
                matches!(parse_ok_line(bad), Err(HandshakeError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn handshake_line_is_bounded_and_consumes_nothing_after() {
        let mut r: &[u8] = b"OK 7\nttrpc bytes";
        assert_eq!(read_handshake_line(&mut r).unwrap(), b"OK 7\n");
        assert_eq!(r, b"ttrpc bytes");

        let long = vec![b'9'; 1000];
        assert!(matches!(
            read_handshake_line(&mut &long[..]),
            Err(HandshakeError::TooLong)
        ));
        assert!(matches!(
            read_handshake_line(&mut &b"OK 12"[..]),
            Err(HandshakeError::Closed)
        ));
        assert!(matches!(
            read_handshake_line(&mut &b""[..]),
            Err(HandshakeError::Closed)
        ));
    }

    #[test]
    fn sanitize_cuts_and_masks() {
        assert_eq!(sanitize("a\x1b[2Jb\u{e9}"), "a?[2Jb?");
        assert_eq!(sanitize(&"x".repeat(1000)).len(), MAX_STATUS_MESSAGE);
    }

    /// A fake VMM: answers each connection's CONNECT line with `reply` (None: closes it).
    fn fake_vmm(listener: UnixListener, replies: Vec<Option<&'static str>>) {
        std::thread::spawn(move || {
            for reply in replies {
                let (s, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                assert_eq!(line, "CONNECT 1024\n");
                if let Some(r) = reply {
                    (&s).write_all(r.as_bytes()).unwrap();
                    // Keep the stream open a while, as the VMM would.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
    }

    #[test]
    fn connect_retries_while_refused_then_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        fake_vmm(
            UnixListener::bind(&uds).unwrap(),
            vec![None, None, Some("OK 1073741824\n")],
        );
        let opts = ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            retry_interval: Duration::from_millis(10),
            ..Default::default()
        };
        AgentClient::connect(&uds, &opts).unwrap();
    }

    #[test]
    fn connect_gives_up_on_a_malformed_reply() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        fake_vmm(UnixListener::bind(&uds).unwrap(), vec![Some("OK 1x\n")]);
        let err = AgentClient::connect(&uds, &ConnectOptions::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Handshake {
                    source: HandshakeError::Malformed(_),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn connect_times_out_when_no_vmm_appears() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ConnectOptions {
            connect_timeout: Duration::from_millis(300),
            retry_interval: Duration::from_millis(50),
            ..Default::default()
        };
        let t = Instant::now();
        let err = AgentClient::connect(&dir.path().join("none"), &opts).unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn connect_handshake_read_is_bounded_by_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        // Accepts and never answers.
        let _keep = std::thread::spawn(move || {
            let (_s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_secs(3));
        });
        let opts = ConnectOptions {
            connect_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let t = Instant::now();
        let err = AgentClient::connect(&uds, &opts).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Timeout { .. } | ClientError::Handshake { .. }
            ),
            "{err:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
}

//! `kubectl port-forward` into the pod's VM.
//!
//! containerd's CRI serves PortForward by dialing `localhost:<port>` inside the pod's network
//! namespace on the host; a Nutshell pod's processes listen inside its VM, so nothing would
//! answer there. In that namespace the shim listens on an ephemeral port of 127.0.0.1 and
//! redirects every TCP connection to 127.0.0.1 to it (an iptables `nat OUTPUT REDIRECT` rule).
//! Each connection's original port (`SO_ORIGINAL_DST`) is forwarded over the VMM's hybrid vsock
//! socket to the agent ([`nutshell_protocol::portforward`]), which connects to 127.0.0.1:<port>
//! in the guest; then bytes are copied both ways, each direction half-closed at its end.
//!
//! The rule is installed with the `iptables` command (no maintained Rust crate speaks
//! nftables or iptables), run in the namespace: a child inherits the namespace of the thread
//! that spawns it. Everything here that touches the namespace runs on a thread inside it.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};

use crate::vm::unsubscribe;
use nutshell_protocol::client::connect_hybrid;
use nutshell_protocol::portforward::{encode_request, splice, Slots, Status, MAX_CONNECTIONS};
use nutshell_protocol::ratelimit::Window;
use nutshell_protocol::PORT_FORWARD_VSOCK_PORT;

/// Bound on the vsock handshake and on the agent's status byte (its connect in the guest).
const GUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on one `iptables` run.
const IPTABLES_TIMEOUT: Duration = Duration::from_secs(30);

/// Failures logged per minute per pod at most (containerd dials on anyone's request).
const LOGS_PER_MINUTE: u32 = 10;

/// Where `iptables` is looked for when it is not on the shim's PATH.
const IPTABLES_FALLBACKS: [&str; 2] = ["/usr/sbin/iptables", "/sbin/iptables"];

/// What can go wrong setting up or running a port-forward.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The listener on 127.0.0.1 could not be made.
    #[error("listen on 127.0.0.1 in the pod's network namespace")]
    Listen(#[source] io::Error),
    /// `iptables` could not be run, or failed.
    #[error("iptables {args}: {message}")]
    Iptables {
        /// Its arguments.
        args: String,
        /// What went wrong (its stderr, or the cause).
        message: String,
    },
    /// The accept thread could not be started.
    #[error("start the port-forward thread")]
    Thread(#[source] io::Error),
    /// The connection's original destination could not be read.
    #[error("original destination of a forwarded connection")]
    OriginalDst(#[source] io::Error),
    /// The connection was not for 127.0.0.1.
    #[error("a redirected connection for {0}, not 127.0.0.1")]
    NotLoopback(SocketAddr),
    /// The VM's vsock could not be reached.
    #[error("connect to the guest")]
    Guest(#[source] nutshell_protocol::client::ClientError),
    /// The agent stream failed during the request.
    #[error("port-forward request to the guest")]
    Request(#[source] io::Error),
    /// The agent answered something other than [`Status::Connected`].
    #[error("guest port {port}: {status}")]
    Refused {
        /// The guest port.
        port: u16,
        /// What the agent said.
        status: String,
    },
}

/// The forwarder of one pod: the listener, its rule and its accept thread.
#[derive(Debug)]
pub struct PortForward {
    port: u16,
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    netns_ino: Option<(u64, u64)>,
    iptables: PathBuf,
}

/// The calling thread's network namespace (device, inode).
fn current_netns() -> Option<(u64, u64)> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl PortForward {
    /// Starts forwarding in the calling thread's network namespace (the pod's: call it on a
    /// thread that entered it) to the VM behind hybrid vsock socket `vsock`. The socket need
    /// not exist yet: a connection before the VM runs is reset.
    pub fn start(vsock: PathBuf) -> Result<PortForward, ForwardError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(ForwardError::Listen)?;
        let port = listener.local_addr().map_err(ForwardError::Listen)?.port();
        let iptables = iptables_binary();
        run_iptables(&iptables, &rule_args("-A", port))?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (listener, stop) = (Arc::clone(&listener), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("port-forward".into())
                .spawn(move || accept_loop(&listener, &stop, &vsock))
        };
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = run_iptables(&iptables, &rule_args("-D", port));
                return Err(ForwardError::Thread(e));
            }
        };
        log::info!("port-forward: 127.0.0.1 redirected to 127.0.0.1:{port} in the pod's network");
        Ok(PortForward {
            port,
            listener,
            stop,
            thread: Some(thread),
            netns_ino: current_netns(),
            iptables,
        })
    }

    /// The listener's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops accepting, closes the listener and removes the rule. Call it on a thread in the
    /// namespace it was started in; anywhere else the rule is left (for the namespace's
    /// owner to remove with it) rather than removed from the wrong namespace.
    /// Connections already forwarded end with the VM (or their peers).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // On a listening socket it wakes the blocked accept(2) with an error.
        let _ = crate::sys::shutdown(&self.listener);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if self.netns_ino.is_some() && current_netns() == self.netns_ino {
            if let Err(e) = run_iptables(&self.iptables, &rule_args("-D", self.port)) {
                log::warn!("port-forward: {}", crate::error::chain(&e));
            }
        } else {
            log::warn!("port-forward: stopped outside the pod's network namespace; its rule stays");
        }
    }
}

/// `iptables` on the PATH, else in the usual sbin directories.
fn iptables_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("iptables"))
            .find(|p| p.is_file())
    });
    on_path
        .or_else(|| {
            IPTABLES_FALLBACKS
                .iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from("iptables"))
}

/// The redirect rule, added (`-A`) or deleted (`-D`).
fn rule_args(op: &str, port: u16) -> Vec<String> {
    [
        "-w",
        "5",
        "-t",
        "nat",
        op,
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "127.0.0.1/32",
        "-j",
        "REDIRECT",
        "--to-ports",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([port.to_string()])
    .collect()
}

/// The listener port of a port-forward rule as `iptables -S` prints it
/// (`-A OUTPUT -d 127.0.0.1/32 -p tcp -j REDIRECT --to-ports N`); `None` for any other rule.
fn left_rule_port(line: &str) -> Option<u16> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let has = |pair: [&str; 2]| words.windows(2).any(|w| w == pair);
    let ours = words.starts_with(&["-A", "OUTPUT"])
        && has(["-d", "127.0.0.1/32"])
        && has(["-p", "tcp"])
        && has(["-j", "REDIRECT"]);
    match words.as_slice() {
        [.., "--to-ports", port] if ours => port.parse().ok(),
        _ => None,
    }
}

/// Removes the port-forward rules in the calling thread's network namespace (a pod's, where
/// only its shim adds them): what a shim killed before its [`PortForward::stop`] left. For
/// `shim delete`, where the crate's SIGCHLD handler reaps children too (see
/// [`iptables_output`]). Returns how many went.
pub fn remove_left_rules() -> Result<usize, ForwardError> {
    let iptables = iptables_binary();
    let list: Vec<String> = ["-w", "5", "-t", "nat", "-S", "OUTPUT"]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
    let out = iptables_output(&iptables, &list)?;
    let ports: Vec<u16> = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(left_rule_port)
        .collect();
    for &port in &ports {
        run_iptables(&iptables, &rule_args("-D", port))?;
    }
    Ok(ports.len())
}

/// Runs `iptables args` and waits for it.
fn run_iptables(bin: &Path, args: &[String]) -> Result<(), ForwardError> {
    iptables_output(bin, args).map(drop)
}

/// Runs `iptables args`, waits for it and returns what it printed on stdout. The crate's
/// SIGCHLD handler (also running in `shim delete`) may reap it first; its exit status then
/// comes from the crate's exit monitor (`Command::output` would fail with ECHILD and lose it).
fn iptables_output(bin: &Path, args: &[String]) -> Result<Vec<u8>, ForwardError> {
    let failed = |message: String| ForwardError::Iptables {
        args: args.join(" "),
        message,
    };
    let sub = monitor_subscribe(Topic::Pid).map_err(|e| failed(format!("subscribe: {e}")))?;
    let spawned = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            unsubscribe(sub.id);
            return Err(failed(format!("run {}: {e}", bin.display())));
        }
    };
    // Small outputs (a rule listing, an error line): stdout first, then stderr.
    let mut stdout = Vec::new();
    if let Some(out) = child.stdout.take() {
        let _ = out.take(1 << 20).read_to_end(&mut stdout);
    }
    let mut stderr = Vec::new();
    if let Some(err) = child.stderr.take() {
        let _ = err.take(4096).read_to_end(&mut stderr);
    }
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let code = match child.wait() {
        Ok(status) => status.code().unwrap_or(128),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
            let deadline = Instant::now() + IPTABLES_TIMEOUT;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match sub.rx.recv_timeout(left) {
                    Ok(ev) if matches!(ev.subject, Subject::Pid(p) if p == pid) => {
                        break ev.exit_code
                    }
                    Ok(_) => {}
                    Err(_) => {
                        unsubscribe(sub.id);
                        return Err(failed("its exit was not seen".into()));
                    }
                }
            }
        }
        Err(e) => {
            unsubscribe(sub.id);
            return Err(failed(format!("wait: {e}")));
        }
    };
    unsubscribe(sub.id);
    if code == 0 {
        Ok(stdout)
    } else {
        let text = String::from_utf8_lossy(&stderr);
        Err(failed(format!("exit status {code}: {}", text.trim())))
    }
}

/// At most [`LOGS_PER_MINUTE`] warnings a minute; the rest are counted and reported once.
#[derive(Debug)]
struct LogLimit(Mutex<Window>);

impl LogLimit {
    fn new() -> Self {
        LogLimit(Mutex::new(Window::new(
            LOGS_PER_MINUTE,
            Duration::from_secs(60),
        )))
    }

    fn warn(&self, msg: impl FnOnce() -> String) {
        let verdict = self.0.lock().unwrap_or_else(|e| e.into_inner()).check();
        if verdict.dropped_before > 0 {
            log::warn!(
                "port-forward: {} failures not logged (rate limit)",
                verdict.dropped_before
            );
        }
        if verdict.admit {
            log::warn!("port-forward: {}", msg());
        }
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, vsock: &Path) {
    let slots = Slots::default();
    let logs = Arc::new(LogLimit::new());
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let conn = match accepted {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                logs.warn(|| format!("accept: {e}"));
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Some(slot) = slots.take() else {
            logs.warn(|| format!("{MAX_CONNECTIONS} connections open already; one refused"));
            reset(conn);
            continue;
        };
        let (vsock, conn_logs) = (vsock.to_owned(), Arc::clone(&logs));
        let spawned = std::thread::Builder::new()
            .name("port-forward-conn".into())
            .spawn(move || {
                let _slot = slot;
                if let Err((conn, e)) = forward(conn, &vsock) {
                    conn_logs.warn(|| crate::error::chain(&e));
                    reset(conn);
                }
            });
        if let Err(e) = spawned {
            logs.warn(|| format!("start a connection thread: {e}"));
        }
    }
}

/// Closes `conn` with a reset, so that containerd sees the connection refused, not ended.
fn reset(conn: TcpStream) {
    let _ = crate::sys::linger_zero(&conn);
}

/// The destination a redirected connection was made for.
fn original_dst(conn: &TcpStream) -> io::Result<SocketAddr> {
    crate::sys::original_dst(conn).map(SocketAddr::V4)
}

/// Forwards one accepted connection into the guest until both directions ended. On an error
/// before the copy the connection is handed back (to be reset).
fn forward(conn: TcpStream, vsock: &Path) -> Result<(), (TcpStream, ForwardError)> {
    let guest = match open_guest(&conn, vsock) {
        Ok(g) => g,
        Err(e) => return Err((conn, e)),
    };
    splice(conn, guest);
    Ok(())
}

/// The agent stream for `conn`'s original port, connected in the guest.
fn open_guest(conn: &TcpStream, vsock: &Path) -> Result<UnixStream, ForwardError> {
    let dst = original_dst(conn).map_err(ForwardError::OriginalDst)?;
    if dst.ip() != Ipv4Addr::LOCALHOST {
        return Err(ForwardError::NotLoopback(dst));
    }
    let port = dst.port();
    let mut guest = connect_hybrid(vsock, PORT_FORWARD_VSOCK_PORT, GUEST_TIMEOUT)
        .map_err(ForwardError::Guest)?;
    let mut status = [0u8; 1];
    guest
        .set_read_timeout(Some(GUEST_TIMEOUT))
        .and_then(|()| guest.write_all(&encode_request(port)))
        .and_then(|()| guest.read_exact(&mut status))
        .and_then(|()| guest.set_read_timeout(None))
        .map_err(ForwardError::Request)?;
    match Status::from_byte(status[0]) {
        Some(Status::Connected) => Ok(guest),
        Some(s) => Err(ForwardError::Refused {
            port,
            status: format!("{s:?}"),
        }),
        None => Err(ForwardError::Refused {
            port,
            status: format!("unknown status byte {:#04x}", status[0]),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Shutdown;
    use std::os::unix::net::UnixListener;

    /// A stand-in for the VMM and the agent behind it: on each connection to `uds`, the
    /// hybrid vsock handshake for the port-forward port, then the request; answers `status`
    /// and, when it is `Connected`, echoes upper-cased what arrives until EOF, then writes
    /// `bye` and closes. Sends each requested port on `ports`.
    fn fake_guest(uds: &Path, status: Status, ports: std::sync::mpsc::Sender<u16>) {
        let listener = UnixListener::bind(uds).unwrap_or_else(|e| panic!("{e}"));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap_or_else(|e| panic!("{e}"));
                let ports = ports.clone();
                std::thread::spawn(move || {
                    let line = nutshell_protocol::client::read_handshake_line(&mut conn)
                        .unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(
                        line,
                        format!("CONNECT {PORT_FORWARD_VSOCK_PORT}\n").as_bytes()
                    );
                    conn.write_all(b"OK 7\n").unwrap_or_else(|e| panic!("{e}"));
                    let mut req = [0u8; nutshell_protocol::portforward::REQUEST_LEN];
                    conn.read_exact(&mut req).unwrap_or_else(|e| panic!("{e}"));
                    let port = nutshell_protocol::portforward::parse_request(&req)
                        .unwrap_or_else(|e| panic!("{e}"));
                    let _ = ports.send(port);
                    conn.write_all(&[status as u8])
                        .unwrap_or_else(|e| panic!("{e}"));
                    if status != Status::Connected {
                        return;
                    }
                    let mut got = Vec::new();
                    conn.read_to_end(&mut got).unwrap_or_else(|e| panic!("{e}"));
                    got.make_ascii_uppercase();
                    got.extend_from_slice(b"bye");
                    conn.write_all(&got).unwrap_or_else(|e| panic!("{e}"));
                });
            }
        });
    }

    fn ip(args: &[&str]) {
        let st = Command::new("ip")
            .args(args)
            .status()
            .unwrap_or_else(|e| panic!("ip: {e}"));
        assert!(st.success(), "ip {args:?}");
    }

    #[test]
    fn only_port_forward_rules_are_taken_for_left_ones() {
        let ours = "-A OUTPUT -d 127.0.0.1/32 -p tcp -j REDIRECT --to-ports 41234";
        assert_eq!(left_rule_port(ours), Some(41234));
        for other in [
            "-P OUTPUT ACCEPT",
            "-A OUTPUT -d 127.0.0.1/32 -p udp -j REDIRECT --to-ports 53",
            "-A OUTPUT -d 10.0.0.1/32 -p tcp -j REDIRECT --to-ports 80",
            "-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
            "-A PREROUTING -d 127.0.0.1/32 -p tcp -j REDIRECT --to-ports 8",
            "-A OUTPUT -d 127.0.0.1/32 -p tcp -j REDIRECT --to-ports x",
        ] {
            assert_eq!(left_rule_port(other), None, "{other}");
        }
    }

    /// Whether the redirect rule for `port` is in this namespace's nat OUTPUT chain.
    fn rule_present(port: u16) -> bool {
        let out = Command::new(iptables_binary())
            .args(["-w", "5", "-t", "nat", "-S", "OUTPUT"])
            .output()
            .unwrap_or_else(|e| panic!("iptables: {e}"));
        String::from_utf8_lossy(&out.stdout).contains(&format!("--to-ports {port}"))
    }

    /// For real, in a network namespace of the test's own (root, iptables): a connection to
    /// any port of 127.0.0.1 reaches the fake guest with its original port, bytes go both
    /// ways with half-closes (the guest answers after the client's EOF); a refused guest port
    /// resets the connection; after stop nothing listens and the rule is gone.
    #[test]
    fn connections_to_loopback_reach_the_guest_port_they_were_made_for() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let ok_uds = dir.path().join("ok.sock");
        let refusing_uds = dir.path().join("refusing.sock");
        let (tx, rx) = std::sync::mpsc::channel();
        fake_guest(&ok_uds, Status::Connected, tx.clone());
        fake_guest(&refusing_uds, Status::Refused, tx);
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("unshare (root): {e}"));
            ip(&["link", "set", "lo", "up"]);

            let fwd = PortForward::start(ok_uds).unwrap_or_else(|e| panic!("{e}"));
            assert!(rule_present(fwd.port()));
            for port in [8081u16, 22] {
                let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                    .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
                c.set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap_or_else(|e| panic!("{e}"));
                c.write_all(b"hello ").unwrap_or_else(|e| panic!("{e}"));
                c.write_all(b"guest").unwrap_or_else(|e| panic!("{e}"));
                c.shutdown(Shutdown::Write)
                    .unwrap_or_else(|e| panic!("{e}"));
                let mut got = String::new();
                c.read_to_string(&mut got).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(got, "HELLO GUESTbye");
                assert_eq!(rx.recv_timeout(Duration::from_secs(5)).ok(), Some(port));
            }
            let port = fwd.port();
            fwd.stop();
            assert!(!rule_present(port), "rule removed by stop");
            let e = TcpStream::connect((Ipv4Addr::LOCALHOST, 8081));
            assert!(e.is_err(), "nothing listens after stop");

            let fwd = PortForward::start(refusing_uds).unwrap_or_else(|e| panic!("{e}"));
            let mut c =
                TcpStream::connect((Ipv4Addr::LOCALHOST, 9)).unwrap_or_else(|e| panic!("{e}"));
            c.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap_or_else(|e| panic!("{e}"));
            let mut buf = [0u8; 16];
            let r = c.read(&mut buf);
            assert!(
                matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
                "a refused guest port resets the connection: {r:?}"
            );
            assert_eq!(rx.recv_timeout(Duration::from_secs(5)).ok(), Some(9));
            fwd.stop();
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    }

    #[test]
    fn the_rule_redirects_tcp_to_loopback_only() {
        assert_eq!(
            rule_args("-A", 4242).join(" "),
            "-w 5 -t nat -A OUTPUT -p tcp -d 127.0.0.1/32 -j REDIRECT --to-ports 4242"
        );
    }
}

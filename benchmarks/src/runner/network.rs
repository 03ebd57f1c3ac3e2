//! The network workload: TCP between the host and a pod on a CNI network of the benchmark's
//! own, under each runtime.
//!
//! Each round starts one pod per runtime through containerd's CRI (the pod's network from
//! Debian's CNI `bridge` and `host-local` plugins on the run's bridge; for Nutshell the shim
//! moves it into the VM, for runsc `runsc start` moves its addresses into gVisor's netstack:
//! see `containerd::runsc_wrapper`). Its container runs Debian's `iperf3 --server` and the probe's echo
//! server. From the host, in the run's own process:
//!
//! - TCP throughput, host → pod (`iperf3 --client`) and pod → host (`--reverse`), as the
//!   receiving side counted it;
//! - TCP request/response: one connection, `TCP_NODELAY`, a 1-byte request and its 1-byte echo
//!   at a time, each round trip timed; p50 and p99 of the round.
//!
//! Every address the traffic goes to is the pod's, on the run's own bridge and subnet; the pod
//! is removed after its round (the CRI removes its network namespace and veth, the bridge goes
//! with the run's containerd).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{error_chain, wait_child, CriPods, Runner, Workload};
use crate::parse;
use crate::stats::percentile;
use nutshell_test_support::containerd::RuntimeSpec;
use nutshell_test_support::image::{self, ImageError, ImageSpec};

/// The network workload's image: busybox, iperf3 with the libraries `ldd` lists, the probe.
pub const NET_IMAGE: &str = "docker.io/nutshell/bench-net:latest";
/// iperf3's port in the pod.
pub const IPERF3_PORT: u16 = 5201;
/// The probe's echo server's port in the pod.
pub const ECHO_PORT: u16 = 7007;
/// Size of a request and of its answer.
const MESSAGE_BYTES: usize = 1;
/// Round trips before the timed ones (the first packets resolve the pod's MAC).
const WARMUP_ROUND_TRIPS: u32 = 10;
/// How long a pod may take from running to answering on its echo port, and its iperf3 server
/// to accept after that: loading the dynamically linked iperf3 costs tens of seconds of page
/// faults in a guest whose kernel is emulated.
const READY_TIMEOUT: Duration = Duration::from_secs(240);

/// The network image. iperf3 is dynamically linked (libiperf, libcrypto, libsctp): it goes in
/// with the libraries `ldd` resolves on the host, as sysbench and fio do; Debian has no static
/// build, and the probe is static already.
pub fn net_image(probe: &std::path::Path) -> Result<ImageSpec, ImageError> {
    let iperf3 = image::host_binary("iperf3", &["/usr/bin/iperf3"])?;
    image::with_busybox(ImageSpec::new(NET_IMAGE))?
        .binary(&iperf3, "/usr/bin/iperf3")?
        .binary(probe, "/usr/bin/nutshell-bench-probe")
}

/// The pod's command: the echo server in the background, iperf3's server in front (PID 1's
/// child of the shell, which it replaces).
fn server_command() -> Vec<String> {
    vec![
        "sh".to_owned(),
        "-c".to_owned(),
        format!(
            "nutshell-bench-probe echo-server {ECHO_PORT} & exec iperf3 --server --port \
             {IPERF3_PORT}"
        ),
    ]
}

/// The metrics of the workload, by index into the runner's metrics.
struct NetMetrics {
    to_pod: usize,
    from_pod: usize,
    p50: usize,
    p99: usize,
}

impl Runner {
    /// The network workload (see the module's documentation).
    pub(super) fn network(&mut self) {
        let m = NetMetrics {
            to_pod: self.metric(
                Workload::Network,
                "TCP throughput host → pod (iperf3)",
                "Gbit/s",
                true,
            ),
            from_pod: self.metric(
                Workload::Network,
                "TCP throughput pod → host (iperf3 --reverse)",
                "Gbit/s",
                true,
            ),
            p50: self.metric(
                Workload::Network,
                "TCP round trip, 1 byte, p50",
                "µs",
                false,
            ),
            p99: self.metric(
                Workload::Network,
                "TCP round trip, 1 byte, p99",
                "µs",
                false,
            ),
        };
        let mut pods = match self.network_pods() {
            Ok(pods) => pods,
            Err(e) => {
                for spec in self.available() {
                    for i in [m.to_pod, m.from_pod, m.p50, m.p99] {
                        self.record(i, &spec.name, Err(format!("network set-up failed: {e}")));
                    }
                }
                return;
            }
        };
        let reps = self.config.plan.reps;
        self.interleaved(reps, |r, spec| r.network_round(&mut pods, spec, &m));
    }

    /// The CRI's images (the network image among them) and a client.
    fn network_pods(&self) -> Result<CriPods, String> {
        if self.containerd.cni().is_none() {
            return Err("the run's containerd has no CNI network".to_owned());
        }
        let mut pods = CriPods::new(&self.containerd, &self.config.cache_dir)?;
        let tarball = net_image(&self.config.probe)
            .and_then(|i| i.tarball(&self.config.cache_dir))
            .map_err(|e| error_chain(&e))?;
        pods.add_image(&self.containerd, &tarball, NET_IMAGE)?;
        Ok(pods)
    }

    /// One pod under `spec`: its server up, then round trips, then iperf3 both ways; the pod
    /// removed afterwards, whatever failed.
    fn network_round(&mut self, pods: &mut CriPods, spec: &RuntimeSpec, m: &NetMetrics) {
        let name = self.id("net", &spec.name);
        let plan = self.config.plan.clone();
        let pod = match pods.start_on_pod_network(&name, &spec.name, NET_IMAGE, &server_command()) {
            Ok(pod) => pod,
            Err(e) => {
                for i in [m.to_pod, m.from_pod, m.p50, m.p99] {
                    self.record(i, &spec.name, Err(e.clone()));
                }
                return;
            }
        };
        let started = Instant::now();
        let echo = SocketAddr::from((pod.ip, ECHO_PORT));
        let rtts = wait_listening(echo, started + READY_TIMEOUT).and_then(|()| {
            log::info!(
                "pod {name} ({}) answers on {echo} after {:.1} s",
                spec.name,
                started.elapsed().as_secs_f64()
            );
            round_trips(
                echo,
                plan.round_trips,
                Duration::from_secs(plan.round_trip_s),
            )
            .map_err(|e| format!("round trips to {echo}: {e}"))
        });
        let (p50, p99) = match &rtts {
            Ok(v) => {
                log::info!("{} round trips to {echo} under {}", v.len(), spec.name);
                (
                    percentile(v, 50.0).ok_or_else(|| "no round trip".to_owned()),
                    percentile(v, 99.0).ok_or_else(|| "no round trip".to_owned()),
                )
            }
            Err(e) => (Err(e.clone()), Err(e.clone())),
        };
        self.record(m.p50, &spec.name, p50);
        self.record(m.p99, &spec.name, p99);
        for (metric, reverse) in [(m.to_pod, false), (m.from_pod, true)] {
            // From now: the first direction's test is over, the server may still be busy.
            let deadline = Instant::now() + Duration::from_secs(120);
            let v = iperf3_client(pod.ip, plan.iperf3_s, reverse, deadline).map(|t| {
                log::info!(
                    "iperf3 {} under {}: {:.3} Gbit/s received, {:.3} sent",
                    if reverse {
                        "pod → host"
                    } else {
                        "host → pod"
                    },
                    spec.name,
                    t.received_bits_per_s / 1e9,
                    t.sent_bits_per_s / 1e9
                );
                t.received_bits_per_s / 1e9
            });
            self.record(metric, &spec.name, v);
        }
        if let Err(e) = pods.remove(&pod.id) {
            log::warn!("network pod {name} could not be removed: {e}");
        }
    }
}

/// A pod of the network workload: its sandbox id and its IP on the run's CNI network.
pub(super) struct NetPod {
    /// The pod sandbox id.
    pub id: String,
    /// The pod's IPv4 address (CNI's `host-local`, in the run's subnet).
    pub ip: Ipv4Addr,
}

/// Connects to `addr` until it accepts or `deadline` passes (the pod's server is not up yet:
/// refused, or no answer while the guest's network is configured).
fn wait_listening(addr: SocketAddr, deadline: Instant) -> Result<(), String> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "{addr} did not accept within {READY_TIMEOUT:?}: {e}"
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Request/response round trips on one connection to an echo server at `addr`: a few untimed,
/// then up to `count` timed ones (at most `limit` of them in time). Each round trip in µs.
pub fn round_trips(addr: SocketAddr, count: u64, limit: Duration) -> std::io::Result<Vec<f64>> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let request = [0x5au8; MESSAGE_BYTES];
    let mut answer = [0u8; MESSAGE_BYTES];
    let mut once = |conn: &mut TcpStream| -> std::io::Result<Duration> {
        let t = Instant::now();
        conn.write_all(&request)?;
        conn.read_exact(&mut answer)?;
        let took = t.elapsed();
        if answer != request {
            return Err(std::io::Error::other("the echo differs from the request"));
        }
        Ok(took)
    };
    for _ in 0..WARMUP_ROUND_TRIPS {
        once(&mut conn)?;
    }
    let started = Instant::now();
    let mut rtts = Vec::new();
    while (rtts.len() as u64) < count && started.elapsed() < limit {
        rtts.push(once(&mut conn)?.as_secs_f64() * 1e6);
    }
    Ok(rtts)
}

/// `iperf3 --client IP --time SECS --json [--reverse]` on the host, retried while the pod's
/// iperf3 server does not accept yet (until `deadline`); the test's totals.
fn iperf3_client(
    ip: Ipv4Addr,
    secs: u32,
    reverse: bool,
    deadline: Instant,
) -> Result<parse::Iperf3Tcp, String> {
    loop {
        let mut cmd = Command::new("iperf3");
        cmd.args(["--client", &ip.to_string()])
            .args(["--port", &IPERF3_PORT.to_string()])
            .args(["--time", &secs.to_string()])
            .args(["--connect-timeout", "5000", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if reverse {
            cmd.arg("--reverse");
        }
        let child = cmd.spawn().map_err(|e| format!("iperf3: {e}"))?;
        // The test, then the exchange of results with a server in a slow guest.
        let (status, stdout, stderr) =
            wait_child(child, Duration::from_secs(u64::from(secs) + 120));
        if status.is_none() {
            return Err(format!(
                "iperf3 did not finish within {} s",
                u64::from(secs) + 120
            ));
        }
        match parse::iperf3_tcp(&stdout) {
            Ok(t) => return Ok(t),
            Err(parse::ParseError::Iperf3Failed(e))
                if not_ready_yet(&e) && Instant::now() < deadline =>
            {
                log::debug!("iperf3 server on {ip} not up yet: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => {
                let err = stderr.trim();
                return Err(if err.is_empty() {
                    e.to_string()
                } else {
                    format!("{e} ({err})")
                });
            }
        }
    }
}

/// iperf3's errors while a server is not listening yet, or still finishing the test before: a
/// server in a slow guest answers "busy" for a moment after the first direction, and resets a
/// connection that reached the listening socket it replaces after each test.
fn not_ready_yet(error: &str) -> bool {
    [
        "Connection refused",
        "No route to host",
        "timed out",
        "the server is busy",
        "Connection reset by peer",
    ]
    .iter()
    .any(|s| error.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_against_a_local_echo_server() {
        // Loopback only: an echo thread of the test's own.
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut b = [0u8; 64];
            while let Ok(n) = conn.read(&mut b) {
                if n == 0 || conn.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        });
        let rtts = round_trips(addr, 200, Duration::from_secs(10)).unwrap();
        assert_eq!(rtts.len(), 200);
        assert!(rtts.iter().all(|&us| us > 0.0 && us < 1e6), "{rtts:?}");
    }

    #[test]
    fn round_trips_stop_at_the_time_limit() {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut b = [0u8; 1];
            while let Ok(1) = conn.read(&mut b) {
                std::thread::sleep(Duration::from_millis(20));
                if conn.write_all(&b).is_err() {
                    break;
                }
            }
        });
        let started = Instant::now();
        let rtts = round_trips(addr, 1_000_000, Duration::from_millis(300)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!rtts.is_empty() && rtts.len() < 100, "{}", rtts.len());
        assert!(rtts.iter().all(|&us| us >= 20_000.0), "{rtts:?}");
    }

    #[test]
    fn a_closed_port_is_an_error_not_a_figure() {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(round_trips(addr, 10, Duration::from_secs(1)).is_err());
        let deadline = Instant::now() + Duration::from_millis(300);
        let e = wait_listening(addr, deadline).unwrap_err();
        assert!(e.contains("did not accept"), "{e}");
    }

    #[test]
    fn the_pod_serves_iperf3_and_the_echo_probe() {
        let cmd = server_command();
        assert_eq!(cmd[..2], ["sh", "-c"]);
        assert!(cmd[2].contains("echo-server 7007 &"), "{cmd:?}");
        assert!(
            cmd[2].contains("exec iperf3 --server --port 5201"),
            "{cmd:?}"
        );
        assert!(not_ready_yet(
            "unable to connect to server: Connection refused"
        ));
        assert!(not_ready_yet(
            "the server is busy running a test. try again later"
        ));
        assert!(!not_ready_yet(
            "unable to send control message: Bad file descriptor"
        ));
    }
}

//! The agent's RPC handlers on the host: the service served on a Unix socket, called with the
//! host-side client of `nutshell-protocol` (directly, and through a fake hybrid vsock socket).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nutshell_agent::container::Containers;
use nutshell_agent::pod::Pod;
use nutshell_agent::sandbox::GuestOs;
use nutshell_agent::service::AgentService;
use nutshell_agent::stdio::VsockListen;
use nutshell_protocol::client::{AgentClient, ClientError, ConnectOptions};
use nutshell_protocol::generated::agent as pb;
use nutshell_protocol::types::ServingStatus;

const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// An agent service on a Unix socket; `shutdowns` receives one message per shutdown action.
struct TestAgent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    server: Option<ttrpc::Server>,
    shutdowns: mpsc::Receiver<()>,
    service: Arc<AgentService>,
}

impl TestAgent {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let (tx, shutdowns) = mpsc::channel();
        let tx = Mutex::new(tx);
        let service = AgentService::new(
            "6.1.0-test".into(),
            Arc::new(move || {
                let _ = tx.lock().unwrap().send(());
            }),
        );
        let server = service
            .serve(&format!("unix://{}", socket.display()))
            .unwrap();
        TestAgent {
            _dir: dir,
            socket,
            server: Some(server),
            service,
            shutdowns,
        }
    }

    fn client(&self) -> AgentClient {
        AgentClient::from_stream(UnixStream::connect(&self.socket).unwrap(), RPC_TIMEOUT).unwrap()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

#[test]
fn health_answers_serving() {
    let agent = TestAgent::start();
    assert_eq!(agent.client().check().unwrap(), ServingStatus::Serving);
}

#[test]
fn version_reports_agent_and_kernel() {
    let agent = TestAgent::start();
    let v = agent.client().version().unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.api_version, nutshell_protocol::AGENT_API_VERSION);
    assert_eq!(v.kernel_release, "6.1.0-test");
}

fn iface(name: &str, mac: &str, mtu: u32, addrs: &[(&str, u32)]) -> pb::Interface {
    pb::Interface {
        name: name.to_owned(),
        mac: mac.to_owned(),
        mtu,
        addresses: addrs
            .iter()
            .map(|(a, p)| pb::IpAddress {
                address: (*a).to_owned(),
                prefix_len: *p,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn route(destination: &str, gateway: &str, device: &str, scope: u32) -> pb::Route {
    pb::Route {
        destination: destination.to_owned(),
        gateway: gateway.to_owned(),
        device: device.to_owned(),
        scope,
        ..Default::default()
    }
}

fn status_code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ttrpc::Code {
    match r {
        Err(ClientError::Status { code, .. }) => code,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn network_requests_that_do_not_parse_are_refused() {
    let agent = TestAgent::start();
    let client = agent.client();
    assert_eq!(
        status_code(client.update_interface(&iface("", "", 0, &[]), &[])),
        ttrpc::Code::INVALID_ARGUMENT
    );
    assert_eq!(
        status_code(client.update_interface(&iface("eth0", "ff:ff:ff:ff:ff:ff", 0, &[]), &[])),
        ttrpc::Code::INVALID_ARGUMENT
    );
    assert_eq!(
        status_code(client.update_routes(&[route("10.0.0.0/8", "", "", 0)])),
        ttrpc::Code::INVALID_ARGUMENT,
        "a route with neither gateway nor device"
    );
    assert_eq!(
        status_code(client.update_interface(&iface("nsnothere0", "", 0, &[]), &[])),
        ttrpc::Code::NOT_FOUND
    );
    assert_eq!(
        status_code(
            client.update_interface(&iface("lo", "", 0, &[]), &[route("10.0.0.0/8", "", "", 0)])
        ),
        ttrpc::Code::INVALID_ARGUMENT,
        "a bad route with an interface: refused before the interface changes"
    );
    // The connection stays usable after errors.
    assert_eq!(client.check().unwrap(), ServingStatus::Serving);
}

/// In a network namespace of its own (the thread's, inherited by the server's threads), with
/// a tap called `eth0` standing in for the guest's virtio-net NIC: the agent gives it the
/// pod's MAC, MTU, addresses and routes, as the kernel then reports them.
#[test]
fn the_interface_and_routes_are_set_as_asked() {
    use nutshell_protocol::netlink::{self, Netlink};
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare the network namespace (root)");
        let _tap = netlink::create_tap("eth0").unwrap();
        // At boot the agent brings the NICs up dark: up, no address, no IPv6 link-local.
        let link_local = || {
            std::fs::read_to_string("/proc/thread-self/net/if_inet6")
                .unwrap()
                .lines()
                .filter(|l| l.ends_with(" eth0") && l.starts_with("fe80"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let gen_mode = || {
            std::fs::read_to_string("/proc/sys/net/ipv6/conf/eth0/addr_gen_mode")
                .unwrap()
                .trim()
                .to_owned()
        };
        let dark = nutshell_agent::network::bring_up_dark().unwrap();
        assert_eq!(dark, ["eth0"]);
        {
            let mut nl = Netlink::open().unwrap();
            let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
            assert!(eth0.up);
            assert!(nl.link_by_name("lo").unwrap().unwrap().up);
            assert!(nl.addresses(eth0.index).unwrap().is_empty());
        }
        assert_eq!(gen_mode(), "1");
        assert_eq!(
            link_local(),
            Vec::<String>::new(),
            "no link-local address while dark"
        );
        let agent = TestAgent::start();
        let client = agent.client();
        // The interface with its routes, in one request.
        let got = client
            .update_interface(
                &iface(
                    "eth0",
                    "02:42:0a:f1:00:07",
                    1400,
                    &[("10.241.0.7", 24), ("fd00:241::7", 64)],
                ),
                &[
                    route("10.242.0.0/16", "", "eth0", 253),
                    route("", "10.241.0.1", "eth0", 0),
                ],
            )
            .unwrap();
        assert_eq!(got.mac, "02:42:0a:f1:00:07");
        assert_eq!(got.mtu, 1400);
        let addrs: Vec<_> = got
            .addresses
            .iter()
            .map(|a| format!("{}/{}", a.address, a.prefix_len))
            .collect();
        assert_eq!(addrs, ["10.241.0.7/24", "fd00:241::7/64"]);
        // What the kernel has, read here: the answer is what it acknowledged.
        let mut nl = Netlink::open().unwrap();
        let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
        assert_eq!(
            eth0.mac.map(|m| netlink::format_mac(&m)).as_deref(),
            Some("02:42:0a:f1:00:07")
        );
        assert_eq!(eth0.mtu, 1400);
        let have: Vec<_> = nl
            .addresses(eth0.index)
            .unwrap()
            .iter()
            .map(|a| format!("{}/{}", a.ip, a.prefix_len))
            .collect();
        assert_eq!(have, ["10.241.0.7/24", "fd00:241::7/64"]);
        // Link-local generation is back on, from the pod's MAC (EUI-64 of 02:42:0a:f1:00:07).
        assert_eq!(gen_mode(), "0");
        let ll = link_local();
        assert!(
            ll.iter()
                .any(|l| l.starts_with("fe8000000000000000420afffef10007 ")),
            "{ll:?}"
        );
        // Twice is harmless (a retried Create); a MAC and MTU not asked for are answered as
        // the kernel reports them.
        let again = client
            .update_interface(&iface("eth0", "", 0, &[("10.241.0.7", 24)]), &[])
            .unwrap();
        assert_eq!((again.mac.as_str(), again.mtu), ("02:42:0a:f1:00:07", 1400));

        // And routes alone.
        client
            .update_routes(&[route("10.243.0.0/16", "10.241.0.1", "eth0", 0)])
            .unwrap();
        let eth0 = nl.link_by_name("eth0").unwrap().unwrap();
        assert!(eth0.up, "the agent brings the interface up");
        let routes = nl.routes(eth0.index).unwrap();
        let default = routes
            .iter()
            .find(|r| r.destination.is_none() && r.gateway.is_some())
            .unwrap_or_else(|| panic!("no default route in {routes:?}"));
        assert_eq!(default.gateway.unwrap().to_string(), "10.241.0.1");
        assert!(
            routes.iter().any(|r| r
                .destination
                .is_some_and(|d| d.ip.to_string() == "10.242.0.0" && d.prefix_len == 16)
                && r.scope == 253),
            "{routes:?}"
        );
        assert!(
            routes.iter().any(|r| r
                .destination
                .is_some_and(|d| d.ip.to_string() == "10.243.0.0" && d.prefix_len == 16)
                && r.gateway.is_some_and(|g| g.to_string() == "10.241.0.1")),
            "{routes:?}"
        );
        assert!(
            routes.iter().any(|r| r.kernel),
            "the subnet route came with the address: {routes:?}"
        );
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

fn assert_code<T: std::fmt::Debug>(result: ttrpc::Result<T>, want: ttrpc::Code, what: &str) {
    match ClientError::from(result.unwrap_err()) {
        ClientError::Status { code, message } => assert_eq!(code, want, "{what}: {message}"),
        e => panic!("{what}: unexpected {e:?}"),
    }
}

#[test]
fn container_methods_without_a_pod_fail_their_precondition() {
    let agent = TestAgent::start();
    let client = agent.client();
    let raw = client.raw_agent();
    let ctx = || client.context();
    let want = ttrpc::Code::FAILED_PRECONDITION;
    assert_code(
        raw.create_container(ctx(), &pb::CreateContainerRequest::new()),
        want,
        "CreateContainer",
    );
    assert_code(
        raw.create_sandbox(ctx(), &pb::CreateSandboxRequest::new()),
        want,
        "CreateSandbox",
    );
    assert_code(
        raw.wait_process(ctx(), &pb::WaitProcessRequest::new()),
        want,
        "WaitProcess",
    );
    assert_code(
        raw.get_oom_event(ctx(), &pb::GetOOMEventRequest::new()),
        want,
        "GetOOMEvent",
    );
}

#[test]
fn container_methods_validate_their_requests() {
    let agent = TestAgent::start();
    let cgroups = tempfile::tempdir().unwrap();
    agent.service.set_pod(Arc::new(Pod::new(
        Arc::new(Containers::new()),
        Box::new(VsockListen),
        Box::new(GuestOs),
        cgroups.path().to_path_buf(),
    )));
    let client = agent.client();
    let raw = client.raw_agent();
    let ctx = || client.context();
    let mut bad_json = pb::CreateContainerRequest::new();
    bad_json.container_id = "c1".into();
    bad_json.oci_spec_json = b"{not json".to_vec();
    assert_code(
        raw.create_container(ctx(), &bad_json),
        ttrpc::Code::INVALID_ARGUMENT,
        "CreateContainer with malformed JSON",
    );
    let mut bad_sandbox = pb::CreateSandboxRequest::new();
    bad_sandbox.sandbox_id = "pod".into();
    bad_sandbox.shared_dir = "/proc".into();
    assert_code(
        raw.create_sandbox(ctx(), &bad_sandbox),
        ttrpc::Code::INVALID_ARGUMENT,
        "CreateSandbox over /proc",
    );
    let mut start = pb::StartContainerRequest::new();
    start.container_id = "nope".into();
    assert_code(
        raw.start_container(ctx(), &start),
        ttrpc::Code::NOT_FOUND,
        "StartContainer of an unknown container",
    );
}

#[test]
fn shutdown_replies_then_acts_once() {
    let agent = TestAgent::start();
    let client = agent.client();
    client.shutdown().unwrap();
    agent
        .shutdowns
        .recv_timeout(Duration::from_secs(5))
        .expect("the shutdown action ran");
    assert_eq!(client.check().unwrap(), ServingStatus::NotServing);
    // A second request answers but does not act again.
    client.shutdown().unwrap();
    assert!(agent
        .shutdowns
        .recv_timeout(Duration::from_millis(500))
        .is_err());
}

/// A fake VMM hybrid vsock socket at `uds`: each connection's `CONNECT 1024` is answered with
/// `OK` and proxied to the agent's Unix socket.
fn fake_hybrid_vsock(uds: &Path, agent: PathBuf) {
    let listener = UnixListener::bind(uds).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut host = conn.unwrap();
            let mut line = String::new();
            BufReader::new(&host).read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            let guest = UnixStream::connect(&agent).unwrap();
            host.write_all(b"OK 1073741824\n").unwrap();
            let (mut h2, mut g2) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut h2, &mut g2));
            let (mut g, mut h) = (guest, host);
            std::thread::spawn(move || std::io::copy(&mut g, &mut h));
        }
    });
}

#[test]
fn client_connects_through_hybrid_vsock() {
    let agent = TestAgent::start();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    fake_hybrid_vsock(&uds, agent.socket.clone());
    let opts = ConnectOptions {
        connect_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let client = AgentClient::connect(&uds, &opts).unwrap();
    assert_eq!(client.check().unwrap(), ServingStatus::Serving);
    assert_eq!(
        client.version().unwrap().agent_version,
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn refresh_guest_is_validated_and_needs_an_action() {
    use nutshell_agent::refresh::{Refresh, RefreshAction, RefreshError};

    struct Recorder(Mutex<Vec<Refresh>>);
    impl RefreshAction for Recorder {
        fn refresh(&self, r: &Refresh) -> Result<(), RefreshError> {
            self.0.lock().unwrap().push(r.clone());
            Ok(())
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let service = AgentService::new("6.1.0-test".into(), Arc::new(|| {}));
    let server = service
        .serve(&format!("unix://{}", socket.display()))
        .unwrap();
    let client =
        AgentClient::from_stream(UnixStream::connect(&socket).unwrap(), RPC_TIMEOUT).unwrap();
    let code = |r: Result<(), ClientError>| match r {
        Err(ClientError::Status { code, .. }) => code,
        other => panic!("{other:?}"),
    };
    // No action installed (outside a guest): refused, nothing touched.
    assert_eq!(
        code(client.refresh_guest(1, &[1, 2, 3])),
        ttrpc::Code::FAILED_PRECONDITION
    );

    let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
    service.set_refresh_action(recorder.clone());
    assert_eq!(
        code(client.refresh_guest(-5, &[])),
        ttrpc::Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(client.refresh_guest(1, &[0; 513])),
        ttrpc::Code::INVALID_ARGUMENT
    );
    assert!(recorder.0.lock().unwrap().is_empty());
    client
        .refresh_guest(1_700_000_000_123_456_789, &[7; 64])
        .unwrap();
    client.refresh_guest(0, &[]).unwrap();
    let seen = recorder.0.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            Refresh {
                unix_nanos: Some(1_700_000_000_123_456_789),
                entropy: vec![7; 64]
            },
            Refresh {
                unix_nanos: None,
                entropy: vec![]
            }
        ]
    );
    server.shutdown();
}

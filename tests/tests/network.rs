//! Slow lane: pod networks. Pods scheduled through containerd's CRI get their network from
//! real CNI plugins (Debian's bridge and host-local, on a bridge and subnet of the rig's own);
//! the shim moves it into the pod's microVM (a tap beside the CNI veth, tc redirects between
//! them, the guest given the veth's MAC, addresses and routes).
//!
//! `kubectl port-forward` goes through containerd's streaming server (the WebSocket protocol
//! of kubelet's streaming server), containerd's dial of `localhost` in the pod's namespace,
//! the shim's redirect there and the agent, to a listener on the guest's loopback.
//!
//! Every address traffic goes to belongs to the rig: the pods' addresses (in network
//! namespaces containerd made for this test) and the bridge's gateway address (on the bridge
//! the CNI plugin made for it). The bridge goes with the rig's containerd.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::ErrorKind;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};

use nutshell_tests::cri::{api as cri, container_config, namespace_modes};
use nutshell_tests::cri_rig::{measure_handlers, rig, rig_with, Rig, HANDLER, IMAGE, SERIAL};

/// How long a guest exec may take on an emulated-KVM host.
const EXEC_TIMEOUT: Duration = Duration::from_secs(180);
const HTTP_PORT: u16 = 8080;

/// A pod with one container running `script` under `handler`; returns (pod, container, IP).
fn pod_running(
    rig: &mut Rig,
    name: &str,
    handler: &str,
    script: &str,
) -> (String, String, Ipv4Addr) {
    let pod_cfg = rig.pod(name);
    pod_running_with(rig, pod_cfg, handler, script)
}

/// [`pod_running`] with a pod config of the caller's.
fn pod_running_with(
    rig: &mut Rig,
    mut pod_cfg: cri::PodSandboxConfig,
    handler: &str,
    script: &str,
) -> (String, String, Ipv4Addr) {
    let name = pod_cfg.metadata.as_ref().unwrap().name.clone();
    let name = name.as_str();
    if handler != HANDLER {
        // Not under the rig's cgroup parent, which the shim made and removes with its last
        // pod (a pod of runc's there would keep it busy). Kubelet gives every pod a parent
        // of its own.
        pod_cfg.linux.as_mut().unwrap().cgroup_parent = String::new();
    }
    let t = Instant::now();
    let pod = rig.cri.run_pod_sandbox(&pod_cfg, handler).unwrap();
    let net = rig.cri.pod_network(&pod).unwrap();
    let ip: Ipv4Addr = net
        .ip
        .parse()
        .unwrap_or_else(|e| panic!("pod {name} IP {:?}: {e}", net.ip));
    let cfg = container_config(name, IMAGE, &["sh", "-c", script], &format!("{name}.log"));
    let ctr = rig.cri.create_container(&pod, &cfg, &pod_cfg).unwrap();
    rig.cri.start_container(&ctr).unwrap();
    eprintln!("{name} ({handler}): {ip}, running after {:?}", t.elapsed());
    (pod, ctr, ip)
}

/// A busybox httpd on `HTTP_PORT` serving `body`.
fn httpd(body: &str) -> String {
    format!(
        "mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p {HTTP_PORT} -h /www"
    )
}

/// `GET /` from the host; retried until `deadline` while the server is not up yet.
fn http_get(addr: SocketAddr, deadline: Instant) -> String {
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(text) if !text.is_empty() => return text,
            other if Instant::now() >= deadline => panic!("GET http://{addr}/: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// `wget` from inside container `ctr`. Bounded by the exec's timeout: Debian 12's static
/// busybox crashes (SIGSEGV) on `wget -T`.
fn wget_in(rig: &mut Rig, ctr: &str, url: &str) -> String {
    let r = rig
        .cri
        .exec_sync(ctr, &["wget", "-q", "-O", "-", url], EXEC_TIMEOUT)
        .unwrap();
    assert_eq!(
        r.exit_code,
        0,
        "wget {url} in {ctr}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).into_owned()
}

/// One HTTP answer per connection on `listener` until the test ends: the pods' gateway.
fn serve_gateway(listener: TcpListener) {
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 13\r\n\r\nhello-gateway");
        }
    });
}

/// The MAC of `dev` inside the network namespace at `netns` (the CNI veth of a pod). Asked of
/// `ip` there: `/sys/class/net` would show the host's devices (sysfs belongs to the network
/// namespace it was mounted in).
fn mac_in_netns(netns: &std::path::Path, dev: &str) -> String {
    let text = in_netns(netns, &["ip", "-br", "link", "show", "dev", dev]);
    // `eth0@if12  UP  12:9a:fd:4e:09:b0 <BROADCAST,...>`
    text.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC in {text:?}"))
        .to_owned()
}

/// The IPv6 link-local address the kernel makes from `mac` (EUI-64), as `/proc/net/if_inet6`
/// writes it: `fe80000000000000` and the interface identifier, 32 hex digits.
fn link_local_of(mac: &str) -> String {
    let b: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    let id = [b[0] ^ 0x02, b[1], b[2], 0xff, 0xfe, b[3], b[4], b[5]];
    let hex: String = id.iter().map(|x| format!("{x:02x}")).collect();
    format!("fe80000000000000{hex}")
}

#[test]
fn link_local_addresses_are_made_from_the_mac() {
    assert_eq!(
        link_local_of("02:42:0a:f1:00:07"),
        "fe8000000000000000420afffef10007"
    );
}

#[test]
#[ignore = "slow lane: needs root, containerd, CNI plugins, KVM and the guest kernel (scripts/test.sh runs it)"]
fn pods_serve_on_their_ip_and_reach_each_other_and_their_gateway() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = rig("net");
    let cni = rig.cni.clone();

    // Two Nutshell pods, both restored from the one template: distinct, working networks.
    let (pod_a, ctr_a, ip_a) = pod_running(&mut rig, "net-a", HANDLER, &httpd("hello-from-a"));
    let (pod_b, ctr_b, ip_b) = pod_running(&mut rig, "net-b", HANDLER, &httpd("hello-from-b"));
    let (pod_c, ctr_c, ip_c) = pod_running(&mut rig, "net-c", "runc", &httpd("hello-from-c"));
    assert_ne!(ip_a, ip_b);
    for ip in [ip_a, ip_b, ip_c] {
        assert_eq!(
            ip.octets()[..3],
            cni.gateway().octets()[..3],
            "{ip} in the rig's subnet"
        );
    }

    // Both VMs came from the one template (the VMM says so on its stderr, which the shim
    // logs), and each answers on its own pod IP.
    let log = rig.containerd.log_tail(2_000_000);
    for pod in [&pod_a, &pod_b] {
        let tag = format!("vmm[{pod}]:");
        assert!(
            log.lines()
                .any(|l| l.contains(&tag) && l.contains(" restored ")),
            "{pod} was not restored from the template"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    let page = http_get(SocketAddr::from((ip_a, HTTP_PORT)), deadline);
    assert!(page.contains("hello-from-a"), "{page}");
    let page = http_get(SocketAddr::from((ip_b, HTTP_PORT)), deadline);
    assert!(page.contains("hello-from-b"), "{page}");

    // Each guest's NIC has its own CNI veth's MAC: two distinct MACs.
    let mut macs = Vec::new();
    for (pod, ctr) in [(&pod_a, &ctr_a), (&pod_b, &ctr_b)] {
        let netns = rig.cri.pod_network(pod).unwrap().netns.unwrap();
        let veth_mac = mac_in_netns(&netns, "eth0");
        let guest = rig
            .cri
            .exec_sync(ctr, &["cat", "/sys/class/net/eth0/address"], EXEC_TIMEOUT)
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&guest.stdout).trim(), veth_mac);
        // The template's NIC was up without a link-local address; the pod's is made from the
        // pod's MAC (so two VMs of one template do not share one on the bridge).
        let inet6 = rig
            .cri
            .exec_sync(ctr, &["cat", "/proc/net/if_inet6"], EXEC_TIMEOUT)
            .unwrap();
        let inet6 = String::from_utf8_lossy(&inet6.stdout).into_owned();
        let want = link_local_of(&veth_mac);
        assert!(
            inet6
                .lines()
                .any(|l| l.starts_with(&want) && l.ends_with(" eth0")),
            "no link-local {want} from {veth_mac} on eth0 in {inet6}"
        );
        macs.push(veth_mac);
    }
    assert_ne!(macs[0], macs[1], "the two restored VMs share a MAC");
    let netns = rig.cri.pod_network(&pod_a).unwrap().netns.unwrap();

    // The pod's VMM runs inside the pod's network namespace (a compromised VMM has the pod's
    // network, not the node's).
    let vmm = nutshell_tests::vmms_under(&rig.run_dir.join(&pod_a));
    assert_eq!(vmm.len(), 1, "one VMM of {pod_a}: {vmm:?}");
    let ns_of = |p: &std::path::Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).unwrap();
    assert_eq!(
        ns_of(std::path::Path::new(&format!("/proc/{}/ns/net", vmm[0]))),
        ns_of(&netns),
        "the VMM of {pod_a} is in the pod's network namespace {}",
        netns.display()
    );

    // Pod to pod: Nutshell to Nutshell, Nutshell to runc, runc to Nutshell.
    let url = |ip: Ipv4Addr| format!("http://{ip}:{HTTP_PORT}/");
    assert!(wget_in(&mut rig, &ctr_b, &url(ip_a)).contains("hello-from-a"));
    assert!(wget_in(&mut rig, &ctr_b, &url(ip_c)).contains("hello-from-c"));
    assert!(wget_in(&mut rig, &ctr_c, &url(ip_a)).contains("hello-from-a"));

    // The pod reaches its gateway (a listener of this test on the bridge's address).
    let gateway = TcpListener::bind((cni.gateway(), 0)).unwrap();
    let gw_port = gateway.local_addr().unwrap().port();
    serve_gateway(gateway);
    let answer = wget_in(
        &mut rig,
        &ctr_b,
        &format!("http://{}:{gw_port}/", cni.gateway()),
    );
    assert_eq!(answer, "hello-gateway");

    // Newest first: the first pod's shim made the rig's cgroup parent (kubelet would have) and
    // removes it with its own, once no other pod's cgroup is in it.
    for pod in [&pod_c, &pod_b, &pod_a] {
        rig.cri.stop_pod_sandbox(pod).unwrap();
        rig.cri.remove_pod_sandbox(pod).unwrap();
    }
    assert!(
        !netns.exists(),
        "containerd removed the pod's network namespace"
    );
    rig.assert_nothing_left();
}

/// The WebSocket subprotocol of kubelet's streaming server for port-forward: binary messages,
/// the first byte the channel (data `2i`, error `2i + 1` for the i-th port).
const PORT_FORWARD_PROTOCOL: &str = "v4.channel.k8s.io";

/// What one port-forward exchange through containerd's streaming server brought back.
#[derive(Debug, Default)]
struct Forwarded {
    /// The bytes of the data channel (after the port number).
    data: Vec<u8>,
    /// The text of the error channel (after the port number).
    error: String,
}

/// One port-forward of `port` of `pod` through the CRI: `PortForward` gives a URL on
/// containerd's streaming server; there, over WebSocket, each channel first carries the port
/// (2 bytes, little-endian); then `request` is sent on the data channel, and everything that
/// comes back is read until the server closes.
fn port_forward_once(rig: &mut Rig, pod: &str, port: u16, request: &[u8]) -> Forwarded {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::{stream::MaybeTlsStream, Message};

    let url = rig.cri.port_forward(pod, &[i32::from(port)]).unwrap();
    let ws_url = format!(
        "{}?ports={port}",
        url.strip_prefix("http://")
            .map(|rest| format!("ws://{rest}"))
            .unwrap_or_else(|| panic!("not a plain-HTTP streaming URL: {url}"))
    );
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        PORT_FORWARD_PROTOCOL.parse().unwrap(),
    );
    let (mut ws, resp) = tungstenite::connect(req).unwrap();
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some(PORT_FORWARD_PROTOCOL.to_owned())
    );
    if let MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    }
    let mut out = Forwarded::default();
    let mut port_seen = [false; 2];
    let mut sent = false;
    loop {
        let msg = match ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(tungstenite::Error::Protocol(_)) => break, // closed without a close frame
            Err(tungstenite::Error::Io(e)) if e.kind() != ErrorKind::WouldBlock => {
                if e.kind() == ErrorKind::ConnectionReset || e.kind() == ErrorKind::UnexpectedEof {
                    break;
                }
                panic!("port-forward read: {e}");
            }
            Err(e) => panic!("port-forward read: {e}"),
        };
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Close(_) => break,
            _ => continue,
        };
        let Some((&channel, payload)) = bytes.split_first() else {
            continue;
        };
        let ch = usize::from(channel);
        assert!(ch < 2, "channel {channel} for one port");
        let payload = if port_seen[ch] {
            payload
        } else {
            // The first message of each channel is the port.
            assert_eq!(
                payload[..2],
                port.to_le_bytes(),
                "channel {channel} names the port"
            );
            port_seen[ch] = true;
            &payload[2..]
        };
        if ch == 0 {
            out.data.extend_from_slice(payload);
        } else {
            out.error.push_str(&String::from_utf8_lossy(payload));
        }
        if port_seen == [true, true] && !sent {
            let mut frame = vec![0u8];
            frame.extend_from_slice(request);
            ws.send(Message::Binary(frame.into())).unwrap();
            sent = true;
        }
    }
    assert!(
        sent,
        "the streaming server never named the port on both channels: {out:?}"
    );
    out
}

#[test]
#[ignore = "slow lane: needs root, containerd, CNI plugins, iptables, KVM and the guest kernel (scripts/test.sh runs it)"]
fn port_forward_reaches_a_loopback_only_listener_in_the_guest() {
    const PORT: u16 = 8081;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = rig("pf");
    let script = format!(
        "mkdir -p /www && echo hello-through-port-forward > /www/index.html && \
         exec httpd -f -p 127.0.0.1:{PORT} -h /www"
    );
    let (pod, _ctr, ip) = pod_running(&mut rig, "pf-a", HANDLER, &script);

    // Through containerd's streaming server, retried while httpd is not up yet (a refused
    // guest port comes back on the error channel).
    let t = Instant::now();
    let deadline = t + Duration::from_secs(240);
    let mut attempts = 0;
    let page = loop {
        attempts += 1;
        let got = port_forward_once(&mut rig, &pod, PORT, b"GET / HTTP/1.0\r\n\r\n");
        let text = String::from_utf8_lossy(&got.data).into_owned();
        if text.contains("hello-through-port-forward") {
            assert!(got.error.is_empty(), "error channel: {}", got.error);
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no page through port-forward: {got:?}"
        );
        eprintln!(
            "port-forward attempt {attempts} at {:?}: no page yet ({got:?})",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    eprintln!(
        "page through port-forward after {:?} ({attempts} attempts)",
        t.elapsed()
    );
    assert!(page.starts_with("HTTP/1."), "{page}");

    // Twice more: each PortForward call is a connection of its own.
    let t = Instant::now();
    let again = port_forward_once(&mut rig, &pod, PORT, b"GET / HTTP/1.0\r\n\r\n");
    assert!(String::from_utf8_lossy(&again.data).contains("hello-through-port-forward"));
    eprintln!("second port-forward GET took {:?}", t.elapsed());

    // httpd listens on the guest's loopback only: the pod's IP refuses the port.
    let direct = TcpStream::connect_timeout(&SocketAddr::from((ip, PORT)), Duration::from_secs(10));
    assert!(
        matches!(&direct, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
        "{ip}:{PORT} from the host: {direct:?}"
    );

    // A port nothing listens on in the guest: containerd reports the failure on the error
    // channel and no data comes.
    let refused = port_forward_once(&mut rig, &pod, PORT + 1, b"GET / HTTP/1.0\r\n\r\n");
    assert!(refused.data.is_empty(), "{refused:?}");
    assert!(
        refused.error.contains(&format!("port {}", PORT + 1)),
        "error channel: {:?}",
        refused.error
    );

    let netns = rig.cri.pod_network(&pod).unwrap().netns.unwrap();
    rig.cri.stop_pod_sandbox(&pod).unwrap();
    rig.cri.remove_pod_sandbox(&pod).unwrap();
    assert!(
        !netns.exists(),
        "containerd removed the pod's network namespace"
    );
    rig.assert_nothing_left();
}

/// `cmd args` run inside the network namespace at `netns`; its standard output.
fn in_netns(netns: &std::path::Path, cmd: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} in {}: {}",
        netns.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What of a Nutshell pod's network is in its namespace: (tap, ingress qdisc on the veth,
/// port-forward rule).
fn pod_network_parts(netns: &std::path::Path) -> (bool, bool, bool) {
    let links = in_netns(netns, &["ip", "-br", "link", "show"]);
    let qdiscs = in_netns(netns, &["tc", "qdisc", "show", "dev", "eth0"]);
    let nat = in_netns(netns, &["iptables", "-w", "5", "-t", "nat", "-S", "OUTPUT"]);
    (
        links.lines().any(|l| l.starts_with("nstap0")),
        qdiscs.contains("ingress"),
        nat.lines()
            .any(|l| l.contains("127.0.0.1/32") && l.contains("REDIRECT")),
    )
}

/// The host's nat rules that name TCP port `port` as their destination port.
fn host_nat_rules_for(port: u16) -> Vec<String> {
    let out = Command::new("iptables")
        .args(["-w", "5", "-t", "nat", "-S"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("--dport {port}")))
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "slow lane: needs root, containerd and CNI plugins (scripts/test.sh runs it)"]
fn a_pod_on_the_nodes_network_is_refused_with_the_reason_and_leaves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = rig("hostnet");

    // hostNetwork: true through the CRI.
    let mut pod_cfg = rig.pod("hostnet-a");
    pod_cfg.hostname.clear(); // the node's UTS namespace too
    namespace_modes(&mut pod_cfg).network = cri::NamespaceMode::Node as i32;
    let t = Instant::now();
    let err = rig.cri.run_pod_sandbox(&pod_cfg, HANDLER).unwrap_err();
    let text = err.to_string();
    eprintln!("hostNetwork pod refused in {:?}: {text}", t.elapsed());
    assert!(text.contains("hostNetwork"), "{text}");
    assert!(
        text.contains("cannot share the node's"),
        "the reason is named: {text}"
    );
    assert!(
        rig.cri.list_pod_sandboxes().unwrap().is_empty(),
        "no pod is left"
    );
    rig.assert_nothing_left();

    // `ctr run --net-host`: the same refusal, and `ctr` gets it.
    let out = rig
        .containerd
        .ctr()
        .command()
        .args([
            "run",
            "--rm",
            "--net-host",
            "--runtime",
            "io.containerd.nutshell.v2",
            IMAGE,
            "hostnet-ctr",
            "true",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ctr run --net-host ran");
    assert!(stderr.contains("hostNetwork"), "{stderr}");
    let left = rig
        .containerd
        .ctr()
        .output(&["containers", "ls", "-q"])
        .unwrap();
    assert!(!left.contains("hostnet-ctr"), "container left: {left}");
    rig.assert_nothing_left();
}

#[test]
#[ignore = "slow lane: needs root, containerd, CNI plugins, iptables, KVM and the guest kernel (scripts/test.sh runs it)"]
fn a_host_port_reaches_the_pod_in_its_vm_and_its_rules_go_with_the_pod() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = rig("hostport");
    let cni = rig.cni.clone();
    // A port of this test's own (pid-derived, like the rig's bridge and subnet).
    let host_port = 31_000 + (std::process::id() % 2_000) as u16;
    assert!(
        host_nat_rules_for(host_port).is_empty(),
        "port {host_port} is mapped already"
    );
    let mut pod_cfg = rig.pod("hp-a");
    pod_cfg.port_mappings.push(cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: i32::from(HTTP_PORT),
        host_port: i32::from(host_port),
        host_ip: String::new(),
    });
    let (pod, _ctr, ip) = pod_running_with(&mut rig, pod_cfg, HANDLER, &httpd("hello-host-port"));

    // CNI's portmap plugin put the DNAT to the pod's IP on the host.
    let rules = host_nat_rules_for(host_port);
    assert!(
        rules
            .iter()
            .any(|r| r.contains("DNAT") && r.contains(&format!("{ip}:{HTTP_PORT}"))),
        "no DNAT of port {host_port} to {ip}:{HTTP_PORT}: {rules:?}"
    );

    // The host's port on the bridge's address reaches httpd in the VM.
    let deadline = Instant::now() + Duration::from_secs(240);
    let page = http_get(SocketAddr::from((cni.gateway(), host_port)), deadline);
    assert!(page.contains("hello-host-port"), "{page}");

    rig.cri.stop_pod_sandbox(&pod).unwrap();
    rig.cri.remove_pod_sandbox(&pod).unwrap();
    let rules = host_nat_rules_for(host_port);
    assert!(
        rules.is_empty(),
        "nat rules left for {host_port}: {rules:?}"
    );
    rig.assert_nothing_left();
}

#[test]
#[ignore = "slow lane: needs root, containerd, CNI plugins, iptables, KVM and the guest kernel (scripts/test.sh runs it)"]
fn a_pod_whose_shim_and_vmm_were_killed_leaves_nothing_once_removed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = rig("kill");
    let (pod, _ctr, _ip) = pod_running(&mut rig, "kill-a", HANDLER, "exec sleep 3600");
    let netns = rig.cri.pod_network(&pod).unwrap().netns.unwrap();
    let sandbox_dir = rig.run_dir.join(&pod);
    assert!(sandbox_dir.is_dir(), "{}", sandbox_dir.display());
    assert_eq!(
        pod_network_parts(&netns),
        (true, true, true),
        "tap, redirect, port-forward rule while the pod runs"
    );

    // SIGKILL, no clean-up of their own: the pod's shim and its VMM (this test's containerd
    // started both).
    let shims = rig.shims();
    assert_eq!(shims.len(), 1, "one shim: {shims:?}");
    let vmm = rig.only_vmm();
    for pid in [shims[0], vmm] {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }

    // containerd sees its shim die and runs `shim delete`: the sandbox directory goes, and
    // in the pod's namespace (which stays until the CRI removes the pod) the tap, the
    // redirect and the port-forward rule.
    let t = Instant::now();
    let deadline = t + Duration::from_secs(120);
    loop {
        let parts = pod_network_parts(&netns);
        if parts == (false, false, false) && !sandbox_dir.exists() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after SIGKILL: (tap, redirect, rule) = {parts:?}, sandbox dir there: {}",
            sandbox_dir.exists()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The redirect filters were on the ingress qdisc, and went with it.
    eprintln!("cleaned up after the kill in {:?}", t.elapsed());

    rig.cri.stop_pod_sandbox(&pod).unwrap();
    rig.cri.remove_pod_sandbox(&pod).unwrap();
    assert!(
        !netns.exists(),
        "containerd removed the pod's network namespace"
    );
    rig.assert_nothing_left();
}

/// What the pod network costs a pod start, for the report (docs/shim.md, "The pod's network"):
/// `NUTSHELL_MEASURE_RUNS` (6) rounds of one Nutshell pod per handler on the rig's CNI bridge,
/// one after another (the handlers' order alternating from round to round), each timed from
/// RunPodSandbox to its container running; the shim's "guest network configured" for each comes
/// from containerd's log (the shims' lines). `NUTSHELL_MEASURE_HANDLERS` as in
/// [`measure_handlers`] (an older build beside this one); `NUTSHELL_MEASURE_LOG=<file>` keeps
/// containerd's log.
#[test]
#[ignore = "measurement: NUTSHELL_MEASURE=1 cargo test -p nutshell-tests --test network -- --ignored measure"]
fn measure_pod_network_start() {
    let Some(runs) = nutshell_tests::measure_runs(6) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (names, extra) = measure_handlers();
    let mut rig = rig_with("netcost", extra);
    // The first pod of each handler may build its template: not counted.
    let mut starts = vec![Vec::new(); names.len()];
    let mut pods = vec![Vec::new(); names.len()];
    for round in 0..=runs {
        let mut order: Vec<usize> = (0..names.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let name = format!("cost-{}-{round}", names[i]);
            let mut pod_cfg = rig.pod(&name);
            if names[i] != HANDLER {
                // Not under the rig's cgroup parent, which Nutshell's shim made and removes.
                pod_cfg.linux.as_mut().unwrap().cgroup_parent = String::new();
            }
            let t = Instant::now();
            let pod = rig.cri.run_pod_sandbox(&pod_cfg, &names[i]).unwrap();
            let sandbox = t.elapsed();
            let cfg = container_config(&name, IMAGE, &["sleep", "3600"], &format!("{name}.log"));
            let ctr = rig.cri.create_container(&pod, &cfg, &pod_cfg).unwrap();
            rig.cri.start_container(&ctr).unwrap();
            let running = t.elapsed();
            eprintln!(
                "{name}: RunPodSandbox {:.2} s, running after {:.2} s",
                sandbox.as_secs_f64(),
                running.as_secs_f64()
            );
            if round > 0 {
                starts[i].push(running.as_secs_f64());
                pods[i].push(pod.clone());
            }
            rig.cri.stop_pod_sandbox(&pod).unwrap();
            rig.cri.remove_pod_sandbox(&pod).unwrap();
        }
    }
    // containerd's log has the shims' too: kept for a breakdown (`NUTSHELL_MEASURE_LOG`).
    if let Some(to) = std::env::var_os("NUTSHELL_MEASURE_LOG") {
        std::fs::copy(rig.containerd.dir().join("containerd.log"), to).unwrap();
    }
    let log = rig.containerd.log_tail(20_000_000);
    for ((name, mut s), pods) in names.iter().zip(starts).zip(pods) {
        s.sort_by(f64::total_cmp);
        let mut configured: Vec<f64> = pods
            .iter()
            .filter_map(|pod| {
                let tag = format!("sandbox {pod}: guest network configured in ");
                let line = log.lines().find(|l| l.contains(&tag))?;
                line.split(&tag).nth(1)?.split(" ms").next()?.parse().ok()
            })
            .collect();
        configured.sort_by(f64::total_cmp);
        eprintln!(
            "{name}: pod start to running median {:.2} s (n={}): {s:.2?}; guest network \
             configured median {:.1} ms: {configured:.1?}",
            s[s.len() / 2],
            s.len(),
            configured
                .get(configured.len() / 2)
                .copied()
                .unwrap_or(f64::NAN),
        );
    }
    rig.assert_nothing_left();
}

//! Slow lane: pod networks. Pods scheduled through containerd's CRI get their network from
//! real CNI plugins (Debian's bridge and host-local, on a bridge and subnet of the rig's own);
//! the shim moves it into the pod's microVM (a tap beside the CNI veth, tc redirects between
//! them, the guest given the veth's MAC, addresses and routes).
//!
//! Every address traffic goes to belongs to the rig: the pods' addresses (in network
//! namespaces containerd made for this test) and the bridge's gateway address (on the bridge
//! the CNI plugin made for it). The bridge goes with the rig's containerd.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use nutshell_tests::cri::container_config;
use nutshell_tests::cri_rig::{rig_with_cni, Rig, HANDLER, IMAGE, SERIAL};

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
    let mut pod_cfg = rig.pod(name);
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
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-br", "link", "show", "dev", dev])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `eth0@if12  UP  12:9a:fd:4e:09:b0 <BROADCAST,...>`
    text.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no MAC in {text:?}"))
        .to_owned()
}

#[test]
#[ignore = "slow lane: needs root, containerd, CNI plugins, KVM and the guest kernel (scripts/test.sh runs it)"]
fn pods_serve_on_their_ip_and_reach_each_other_and_their_gateway() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = rig_with_cni("net");
    let cni = rig.cni.clone().unwrap();

    // Two Nutshell pods, both restored from the one template: distinct, working networks.
    let (pod_a, ctr_a, ip_a) = pod_running(&mut rig, "net-a", HANDLER, &httpd("hello-from-a"));
    let (pod_b, ctr_b, ip_b) = pod_running(&mut rig, "net-b", HANDLER, "exec sleep 3600");
    let (pod_c, ctr_c, ip_c) = pod_running(&mut rig, "net-c", "runc", &httpd("hello-from-c"));
    assert_ne!(ip_a, ip_b);
    for ip in [ip_a, ip_b, ip_c] {
        assert_eq!(
            ip.octets()[..3],
            cni.gateway().octets()[..3],
            "{ip} in the rig's subnet"
        );
    }

    // The host reaches a Nutshell pod's IP.
    let deadline = Instant::now() + Duration::from_secs(240);
    let page = http_get(SocketAddr::from((ip_a, HTTP_PORT)), deadline);
    assert!(page.contains("hello-from-a"), "{page}");

    // The guest's NIC has the CNI veth's MAC.
    let netns = rig.cri.pod_network(&pod_a).unwrap().netns.unwrap();
    let veth_mac = mac_in_netns(&netns, "eth0");
    let guest = rig
        .cri
        .exec_sync(
            &ctr_a,
            &["cat", "/sys/class/net/eth0/address"],
            EXEC_TIMEOUT,
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&guest.stdout).trim(), veth_mac);

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

use super::*;
use nutshell_protocol::netlink::Address;

fn spec_with_namespaces(namespaces: &str) -> oci_spec::runtime::Spec {
    serde_json::from_str(&format!(
        r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":[{namespaces}]}}}}"#
    ))
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_node_network_is_refused_and_an_empty_namespace_is_loopback_only() {
    // The CRI after CNI: the pod's namespace, by path.
    let cni =
        spec_with_namespaces(r#"{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1"}"#);
    let path = PathBuf::from("/var/run/netns/cni-1");
    assert_eq!(network_mode(&cni), NetworkMode::Pod(path.clone()));
    assert_eq!(netns_path(&cni), Some(path));
    assert!(refuse_node_network(&cni).is_ok());
    // `ctr run`: runc's empty namespace, loopback only.
    let empty = spec_with_namespaces(r#"{"type":"pid"},{"type":"network"}"#);
    assert_eq!(network_mode(&empty), NetworkMode::Empty);
    assert_eq!(netns_path(&empty), None);
    assert!(refuse_node_network(&empty).is_ok());
    // hostNetwork / `ctr run --net-host`: no network namespace at all, nor a linux section.
    let node = spec_with_namespaces(r#"{"type":"pid"},{"type":"mount"}"#);
    let bare: oci_spec::runtime::Spec =
        serde_json::from_str(r#"{"ociVersion":"1.0.2"}"#).unwrap_or_else(|e| panic!("{e}"));
    for spec in [node, bare] {
        assert_eq!(network_mode(&spec), NetworkMode::Node);
        let err = refuse_node_network(&spec).map(|()| "accepted").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("hostNetwork"), "{text}");
        assert!(text.contains("cannot share the node's"), "{text}");
    }
}

fn link(index: u32, name: &str, loopback: bool) -> Link {
    Link {
        index,
        name: name.to_owned(),
        mac: Some([2, 0, 0, 0, 0, index as u8]),
        mtu: 1500,
        up: true,
        loopback,
    }
}

#[test]
fn the_pod_interface_is_eth0_or_the_only_one() {
    let lo = link(1, "lo", true);
    let got = pod_link(vec![
        lo.clone(),
        link(2, "net1", false),
        link(3, "eth0", false),
    ]);
    assert_eq!(
        got.unwrap_or_else(|e| panic!("{e}")).map(|l| l.index),
        Some(3)
    );
    let got = pod_link(vec![lo.clone(), link(2, "cni0", false)]);
    assert_eq!(
        got.unwrap_or_else(|e| panic!("{e}")).map(|l| l.index),
        Some(2)
    );
    let got = pod_link(vec![lo.clone()]);
    assert!(got.unwrap_or_else(|e| panic!("{e}")).is_none());
    let got = pod_link(vec![lo, link(2, "a", false), link(3, "b", false)]);
    assert!(matches!(got, Err(NetError::Unsupported(m)) if m.contains("a, b")));
}

#[test]
fn guest_routes_skip_kernel_and_link_local_ones_and_put_gateways_last() {
    let v4 = |s: &str, p| {
        Some(Address {
            ip: s.parse().unwrap_or_else(|e| panic!("{e}")),
            prefix_len: p,
        })
    };
    let r = |destination, gateway: Option<&str>, kernel| Route {
        destination,
        gateway: gateway.map(|g| g.parse().unwrap_or_else(|e| panic!("{e}"))),
        oif: Some(2),
        source: None,
        scope: if gateway.is_some() { 0 } else { 253 },
        kernel,
    };
    let routes = [
        r(None, Some("10.1.0.1"), false),
        r(v4("10.1.0.0", 24), None, true),
        r(v4("fe80::", 64), None, false),
        r(v4("10.9.0.0", 16), None, false),
    ];
    let got = guest_routes(&routes);
    let shown: Vec<_> = got
        .iter()
        .map(|r| (r.destination.as_str(), r.gateway.as_str(), r.scope))
        .collect();
    assert_eq!(shown, [("10.9.0.0/16", "", 253), ("", "10.1.0.1", 0)]);
    assert!(got.iter().all(|r| r.device == POD_IFACE));
}
/// Whether `want` comes out of tap `fd` (after its 10-byte virtio-net header) within
/// 2 s; other frames (the kernel's own IPv6 chatter) are skipped.
fn receives(fd: &OwnedFd, want: &[u8]) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut buf = vec![0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        if !crate::sys::wait_readable(std::os::fd::AsFd::as_fd(fd), Some(left)).unwrap_or(false) {
            return false;
        }
        let n = nix::unistd::read(fd, &mut buf).unwrap_or(0);
        if n > 10 && &buf[10..n] == want {
            return true;
        }
    }
}

/// Writes `frame` behind an empty 10-byte virtio-net header into tap `fd`: the kernel
/// receives it on that interface.
fn write_frame(fd: &OwnedFd, frame: &[u8]) {
    let mut buf = vec![0u8; 10];
    buf.extend_from_slice(frame);
    let n = nix::unistd::write(fd, &buf).unwrap_or_else(|e| panic!("write: {e}"));
    assert_eq!(n, buf.len());
}

/// A broadcast frame of an ether type of nobody's, marked with `tag`.
fn frame(tag: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x88, 0xb5]);
    f.extend(std::iter::repeat_n(tag, 46));
    f
}

/// For real, in a network namespace of the test's own: a tap called `eth0` stands in for
/// CNI's veth (it has the pod's address and a default route). Attach reads them, and
/// frames cross between the two interfaces both ways until detach.
#[test]
fn attach_wires_a_tap_to_the_pod_interface_until_detach() {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("unshare (root): {e}"));
        let veth = netlink::create_tap(POD_IFACE).unwrap_or_else(|e| panic!("{e}"));
        let mut nl = Netlink::open().unwrap_or_else(|e| panic!("{e}"));
        let eth0 = nl
            .link_by_name(POD_IFACE)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no eth0"));
        nl.set_link(
            eth0.index,
            LinkChange {
                mac: Some([0x02, 0x42, 10, 7, 0, 5]),
                mtu: Some(1450),
                up: Some(true),
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let addr = Address {
            ip: "10.7.0.5".parse().unwrap_or_else(|e| panic!("{e}")),
            prefix_len: 24,
        };
        nl.add_address(eth0.index, addr)
            .unwrap_or_else(|e| panic!("{e}"));
        nl.add_route(&Route {
            destination: None,
            gateway: Some("10.7.0.1".parse().unwrap_or_else(|e| panic!("{e}"))),
            oif: Some(eth0.index),
            source: None,
            scope: 0,
            kernel: false,
        })
        .unwrap_or_else(|e| panic!("{e}"));

        // CNI's loopback plugin brings `lo` up (127.0.0.1 exists only then): the
        // port-forward listens there.
        let lo = nl
            .link_by_name("lo")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no lo"));
        nl.set_link(
            lo.index,
            LinkChange {
                up: Some(true),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));

        let path = Path::new("/proc/thread-self/ns/net");
        let mut net = PodNetwork::attach(path, Path::new("/nonexistent/vsock.sock"))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no pod network found"));
        assert_eq!(net.mac(), "02:42:0a:07:00:05");
        assert_eq!(net.interface.mtu, 1450);
        assert_eq!(net.interface.addresses.len(), 1);
        assert_eq!(net.interface.addresses[0].address, "10.7.0.5");
        assert_eq!(net.interface.addresses[0].prefix_len, 24);
        let gw: Vec<_> = net.routes.iter().map(|r| r.gateway.as_str()).collect();
        assert_eq!(gw, ["10.7.0.1"], "{:?}", net.routes);
        let tap = net.take_tap().unwrap_or_else(|| panic!("no tap"));
        assert!(net.take_tap().is_none(), "the tap is handed out once");
        let t = nl
            .link_by_name(TAP_NAME)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no {TAP_NAME}"));
        assert!(t.up);
        assert_eq!(t.mtu, 1450);
        assert!(
            net.forward_port().is_some(),
            "the port-forward started with the attach"
        );

        // The pod's network to the VM, and back.
        write_frame(&veth, &frame(1));
        assert!(receives(&tap, &frame(1)), "veth ingress -> tap");
        write_frame(&tap, &frame(2));
        assert!(receives(&veth, &frame(2)), "tap ingress -> veth");

        net.detach();
        write_frame(&veth, &frame(3));
        assert!(!receives(&tap, &frame(3)), "no redirect after detach");
        assert!(
            net.forward_port().is_none(),
            "the port-forward stopped with the detach"
        );
        net.detach();
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

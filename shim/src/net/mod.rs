//! The pod's network, moved into its VM.
//!
//! containerd's CRI runs CNI in a network namespace made for the pod and names it in the
//! sandbox's spec (`linux.namespaces`, type `network`, with a path). CNI left an interface
//! there (`eth0`, one end of a veth pair) with the pod's MAC, addresses and routes. The shim,
//! in that namespace, creates a tap beside it and joins the two with tc: everything arriving
//! on the veth is redirected out of the tap (to the VM) and everything the VM sends on the tap
//! out of the veth (to the pod's network). The VMM gets the tap's descriptor for its
//! virtio-net device; the agent gives the guest's NIC the veth's MAC, MTU, addresses and
//! routes. Seen from the host, the pod is where CNI put it, with the MAC and IP CNI gave it.
//!
//! The tap goes when its last descriptor closes (the VMM's); the namespace goes when the CRI
//! removes the pod. Detaching removes the veth's ingress qdisc (with its redirect) at once.
//!
//! In the same namespace the pod's port-forward ([`crate::portforward`]) takes connections
//! to 127.0.0.1 into the VM; it starts with the attach and stops with the detach.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nutshell_protocol::generated::agent as pb;
use nutshell_protocol::netlink::{self, Link, LinkChange, Netlink, NetlinkError, Route};

use crate::portforward::PortForward;

/// The tap's name in the pod's network namespace.
pub const TAP_NAME: &str = "nstap0";

/// The interface CRI asks CNI for, and the guest's NIC.
pub const POD_IFACE: &str = "eth0";

/// What can go wrong moving the pod's network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The namespace could not be opened or entered.
    #[error("network namespace {path}: {source}")]
    Netns {
        /// Its path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The tap could not be made.
    #[error("create tap {TAP_NAME}: {0}")]
    Tap(#[source] std::io::Error),
    /// The spec asks for the node's network (no network namespace).
    #[error(
        "the node's network (hostNetwork) is not supported: a pod's microVM has a network \
         stack of its own and cannot share the node's; give the pod a network namespace \
         (hostNetwork: false, or ctr run without --net-host)"
    )]
    NodeNetwork,
    /// The port-forward's rules could not be listed or removed.
    #[error(transparent)]
    PortForward(#[from] crate::portforward::ForwardError),
    /// A network this runtime does not take (yet).
    #[error("not supported: {0}")]
    Unsupported(String),
}

/// The pod's network, attached: the tap wired to the CNI interface, and what the guest needs.
#[derive(Debug)]
pub struct PodNetwork {
    netns: File,
    netns_path: PathBuf,
    veth: Link,
    tap: Option<OwnedFd>,
    forward: Mutex<Option<PortForward>>,
    /// The guest NIC's MAC, MTU and addresses (the CNI interface's).
    pub interface: pb::Interface,
    /// The routes through it (not those the kernel makes for an address's subnet).
    pub routes: Vec<pb::Route>,
}

/// Which network a sandbox's spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// A network namespace with a path (what the CRI gives after CNI ran): its interface goes
    /// into the VM.
    Pod(PathBuf),
    /// A network namespace of its own without a path (runc makes an empty one, `ctr run`):
    /// the VM gets loopback only, as runc's container would.
    Empty,
    /// No network namespace at all: the node's network (`hostNetwork: true`,
    /// `ctr run --net-host`).
    Node,
}

/// The network that `spec` asks for.
pub fn network_mode(spec: &oci_spec::runtime::Spec) -> NetworkMode {
    let netns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| {
            ns.iter()
                .find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        });
    match netns {
        None => NetworkMode::Node,
        Some(ns) => ns
            .path()
            .clone()
            .map_or(NetworkMode::Empty, NetworkMode::Pod),
    }
}

/// The network namespace with a path in a spec's namespaces: the pod's CNI network.
pub fn netns_path(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    match network_mode(spec) {
        NetworkMode::Pod(path) => Some(path),
        NetworkMode::Empty | NetworkMode::Node => None,
    }
}

/// Refuses a sandbox on the node's network: a VM has a kernel and a network stack of its
/// own and cannot share the node's, and giving it none instead would be a pod that silently
/// has no network.
pub fn refuse_node_network(spec: &oci_spec::runtime::Spec) -> Result<(), NetError> {
    match network_mode(spec) {
        NetworkMode::Node => Err(NetError::NodeNetwork),
        NetworkMode::Pod(_) | NetworkMode::Empty => Ok(()),
    }
}

/// Runs `f` on a thread of its own inside network namespace `ns` (setns changes only the
/// calling thread, and that thread ends with `f`).
fn in_netns<T: Send>(
    ns: &File,
    path: &Path,
    f: impl FnOnce() -> Result<T, NetError> + Send,
) -> Result<T, NetError> {
    std::thread::scope(|s| {
        s.spawn(move || {
            // Changes only this thread's namespace; this thread ends when `f` returns.
            if let Err(source) = crate::sys::setns_net(ns) {
                return Err(NetError::Netns {
                    path: path.to_owned(),
                    source,
                });
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(NetError::Unsupported("the network thread panicked".into())))
    })
}

/// The CNI interface: `eth0`, or the only interface but the loopback. `None`: there is none
/// (a namespace CNI configured nothing in).
fn pod_link(links: Vec<Link>) -> Result<Option<Link>, NetError> {
    let mut candidates: Vec<Link> = links
        .into_iter()
        .filter(|l| !l.loopback && l.name != TAP_NAME)
        .collect();
    if let Some(i) = candidates.iter().position(|l| l.name == POD_IFACE) {
        return Ok(Some(candidates.swap_remove(i)));
    }
    match candidates.len() {
        0 => Ok(None),
        1 => Ok(candidates.pop()),
        _ => Err(NetError::Unsupported(format!(
            "a pod network with {} interfaces and none called {POD_IFACE} ({})",
            candidates.len(),
            candidates
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The routes the guest needs, those without a gateway first (they reach the gateways).
fn guest_routes(routes: &[Route]) -> Vec<pb::Route> {
    let mut out: Vec<&Route> = routes
        .iter()
        .filter(|r| !r.kernel)
        .filter(|r| match r.destination.map(|d| d.ip) {
            // fe80::/64 and multicast come with any IPv6 interface.
            Some(IpAddr::V6(v6)) => !(v6.segments()[0] & 0xffc0 == 0xfe80 || v6.is_multicast()),
            _ => true,
        })
        .collect();
    out.sort_by_key(|r| r.gateway.is_some());
    out.into_iter()
        .map(|r| pb::Route {
            destination: r
                .destination
                .map(|d| format!("{}/{}", d.ip, d.prefix_len))
                .unwrap_or_default(),
            gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
            device: POD_IFACE.to_owned(),
            source: r.source.map(|s| s.to_string()).unwrap_or_default(),
            scope: u32::from(r.scope),
            ..Default::default()
        })
        .collect()
}

impl PodNetwork {
    /// Reads the CNI interface in the namespace at `path` and wires a tap to it, and starts
    /// the pod's port-forward there into the VM behind hybrid vsock socket `vsock` (a
    /// port-forward that cannot start is logged: the pod runs without it). `None`: the
    /// namespace has no interface but the loopback, so the guest has none either.
    pub fn attach(path: &Path, vsock: &Path) -> Result<Option<PodNetwork>, NetError> {
        let started = std::time::Instant::now();
        let netns = File::open(path).map_err(|source| NetError::Netns {
            path: path.to_owned(),
            source,
        })?;
        let found = in_netns(&netns, path, || {
            let mut nl = Netlink::open()?;
            let Some(veth) = pod_link(nl.links()?)? else {
                return Ok(None);
            };
            let mac = veth.mac.ok_or_else(|| {
                NetError::Unsupported(format!("interface {} has no MAC address", veth.name))
            })?;
            let addresses = nl.addresses(veth.index)?;
            let routes = nl.routes(veth.index)?;
            let tap = netlink::create_tap(TAP_NAME).map_err(NetError::Tap)?;
            let wired = wire(&mut nl, &veth);
            if let Err(e) = wired {
                // The tap goes with its descriptor; the veth's qdisc must go by hand.
                let _ = nl.del_ingress_qdisc(veth.index);
                return Err(e);
            }
            let interface = pb::Interface {
                name: POD_IFACE.to_owned(),
                mac: netlink::format_mac(&mac),
                mtu: veth.mtu,
                addresses: addresses.iter().copied().map(pb::IpAddress::from).collect(),
                ..Default::default()
            };
            let forward = PortForward::start(vsock.to_owned())
                .map_err(|e| {
                    log::warn!(
                        "{}: no port-forward: {}",
                        path.display(),
                        crate::error::chain(&e)
                    );
                })
                .ok();
            Ok(Some((veth, tap, interface, guest_routes(&routes), forward)))
        })?;
        log::info!(
            "{}: network attached in {:.1} ms (tap, redirects, port-forward)",
            path.display(),
            started.elapsed().as_secs_f64() * 1000.0
        );
        Ok(
            found.map(|(veth, tap, interface, routes, forward)| PodNetwork {
                netns,
                netns_path: path.to_owned(),
                veth,
                tap: Some(tap),
                forward: Mutex::new(forward),
                interface,
                routes,
            }),
        )
    }

    /// The tap's descriptor, for the VMM (once).
    pub fn take_tap(&mut self) -> Option<OwnedFd> {
        self.tap.take()
    }

    /// The pod's network namespace (open while this lives): the VMM runs in it, so that a
    /// VMM taken over by its guest sees the pod's network and not the node's.
    pub fn netns_fd(&self) -> RawFd {
        self.netns.as_raw_fd()
    }

    /// The CNI interface's MAC, as the VMM takes it.
    pub fn mac(&self) -> &str {
        &self.interface.mac
    }

    /// The port-forward's listener port, while connections to 127.0.0.1 in the namespace
    /// are forwarded into the VM.
    pub fn forward_port(&self) -> Option<u16> {
        self.forward
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(PortForward::port)
    }

    /// Stops the port-forward and removes the redirect from the CNI interface. The tap goes
    /// with the VMM's descriptor. Once is enough; again does no harm.
    pub fn detach(&self) {
        let index = self.veth.index;
        let forward = self
            .forward
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let r = in_netns(&self.netns, &self.netns_path, || {
            if let Some(f) = forward {
                f.stop();
            }
            Netlink::open()?.del_ingress_qdisc(index)?;
            Ok(())
        });
        if let Err(e) = r {
            log::warn!(
                "{}: remove the redirect of {}: {}",
                self.netns_path.display(),
                self.veth.name,
                crate::error::chain(&e)
            );
        }
    }
}

/// Removes what the pod network of a shim that died (SIGKILL) left in the namespace at
/// `path`: the redirect on the CNI interface and the port-forward's rule. The tap went with
/// the last descriptor (the VMM's); the namespace and the veth stay, the CRI's to remove. For
/// `shim delete`; a namespace that is gone already leaves nothing to do.
pub fn clean_up_after_dead_shim(path: &Path) -> Result<(), NetError> {
    let netns = match File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        r => r.map_err(|source| NetError::Netns {
            path: path.to_owned(),
            source,
        })?,
    };
    in_netns(&netns, path, || {
        let mut nl = Netlink::open()?;
        if let Some(veth) = pod_link(nl.links()?)? {
            nl.del_ingress_qdisc(veth.index)?;
        }
        let rules = crate::portforward::remove_left_rules()?;
        log::info!(
            "{}: redirect and {rules} port-forward rules of a dead shim removed",
            path.display()
        );
        Ok(())
    })
}

/// The tap up with the veth's MTU, and a redirect each way.
fn wire(nl: &mut Netlink, veth: &Link) -> Result<(), NetError> {
    let tap = nl
        .link_by_name(TAP_NAME)?
        .ok_or_else(|| NetError::Unsupported(format!("the new tap {TAP_NAME} is not listed")))?;
    nl.set_link(
        tap.index,
        LinkChange {
            mtu: Some(veth.mtu),
            up: Some(true),
            ..Default::default()
        },
    )?;
    // A qdisc left by an earlier attempt at this pod goes first.
    nl.del_ingress_qdisc(veth.index)?;
    nl.add_ingress_qdisc(veth.index)?;
    nl.redirect_ingress(veth.index, tap.index)?;
    nl.add_ingress_qdisc(tap.index)?;
    nl.redirect_ingress(tap.index, veth.index)?;
    Ok(())
}

#[cfg(test)]
mod tests;

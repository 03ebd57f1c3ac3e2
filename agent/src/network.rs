//! The guest's NIC: `UpdateInterface` and `UpdateRoutes`. The shim reads the pod's CNI
//! interface on the host (MAC, MTU, addresses, routes) and the agent gives them to the guest's
//! virtio-net device, so that the pod has, inside the VM, the network CNI made for it.
//!
//! Every field is checked before anything changes: a request that does not parse changes
//! nothing. Requests go to the network namespace of the calling thread (the guest's own; in
//! tests, a namespace of the test's).

use std::fmt;
use std::net::IpAddr;
use std::time::Instant;

use nutshell_protocol::generated::agent as pb;
use nutshell_protocol::netlink::{self, Address, LinkChange, Netlink, NetlinkError, Route};

/// Smallest MTU IPv4 allows; the largest an Ethernet-like link takes.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

/// How many addresses or routes one request may carry.
const MAX_ENTRIES: usize = 64;

/// A failed network request.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The request does not parse or names nothing sensible.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No such interface in the guest.
    #[error("no interface {0:?} in the guest")]
    NoInterface(String),
    /// The kernel refused.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

impl NetworkError {
    /// The ttrpc status code of this error.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            NetworkError::Invalid(_) => ttrpc::Code::INVALID_ARGUMENT,
            NetworkError::NoInterface(_) => ttrpc::Code::NOT_FOUND,
            NetworkError::Netlink(_) => ttrpc::Code::INTERNAL,
        }
    }
}

type Result<T> = std::result::Result<T, NetworkError>;

/// The time each step of a request took, for its debug line: where a slow guest spends it.
/// Nothing is timed below debug level (a clock read can be a system call in the guest).
struct Steps {
    last: Option<Instant>,
    done: Vec<(&'static str, f64)>,
}

impl Steps {
    fn start() -> Self {
        Steps {
            last: log::log_enabled!(log::Level::Debug).then(Instant::now),
            done: Vec::new(),
        }
    }

    /// Ends step `what` (begun at the previous mark).
    fn mark(&mut self, what: &'static str) {
        if let Some(last) = self.last {
            let now = Instant::now();
            self.done
                .push((what, now.duration_since(last).as_secs_f64() * 1000.0));
            self.last = Some(now);
        }
    }
}

impl fmt::Display for Steps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (what, ms)) in self.done.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{what} {ms:.1}")?;
        }
        f.write_str(" ms")
    }
}

fn invalid(s: String) -> NetworkError {
    NetworkError::Invalid(s)
}

fn parse_ip(what: &str, s: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| invalid(format!("{what} {s:?} is not an IP address")))
}

fn check_prefix(what: &str, ip: IpAddr, prefix_len: u32) -> Result<u8> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    u8::try_from(prefix_len)
        .ok()
        .filter(|p| u32::from(*p) <= max)
        .ok_or_else(|| {
            invalid(format!(
                "{what} {ip}/{prefix_len}: prefix longer than {max}"
            ))
        })
}

/// `10.0.0.0/24`, or `10.0.0.1` for a host route.
fn parse_cidr(what: &str, s: &str) -> Result<Address> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => {
            let p: u32 = p
                .parse()
                .map_err(|_| invalid(format!("{what} {s:?}: bad prefix length")))?;
            (parse_ip(what, ip)?, Some(p))
        }
        None => (parse_ip(what, s)?, None),
    };
    let prefix = prefix.unwrap_or(if ip.is_ipv4() { 32 } else { 128 });
    Ok(Address {
        ip,
        prefix_len: check_prefix(what, ip, prefix)?,
    })
}

/// What an `Interface` asks for, checked.
#[derive(Debug)]
struct InterfaceRequest {
    name: String,
    mac: Option<[u8; 6]>,
    mtu: Option<u32>,
    addresses: Vec<Address>,
}

fn check_interface(iface: &pb::Interface) -> Result<InterfaceRequest> {
    if iface.name.is_empty() || iface.name.len() > 15 || iface.name.contains(['/', '\0']) {
        return Err(invalid(format!("interface name {:?}", iface.name)));
    }
    let mac = match iface.mac.as_str() {
        "" => None,
        s => {
            let mac = netlink::parse_mac(s).ok_or_else(|| invalid(format!("MAC {s:?}")))?;
            // Bit 0 of the first octet: a group address cannot be a NIC's.
            if mac[0] & 1 != 0 || mac == [0; 6] {
                return Err(invalid(format!("MAC {s} is not a unicast address")));
            }
            Some(mac)
        }
    };
    let mtu = match iface.mtu {
        0 => None,
        m if MTU_RANGE.contains(&m) => Some(m),
        m => return Err(invalid(format!("MTU {m} outside {MTU_RANGE:?}"))),
    };
    if iface.addresses.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "{} addresses (at most {MAX_ENTRIES})",
            iface.addresses.len()
        )));
    }
    let addresses = iface
        .addresses
        .iter()
        .map(|a| {
            let ip = parse_ip("address", &a.address)?;
            Ok(Address {
                ip,
                prefix_len: check_prefix("address", ip, a.prefix_len)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(InterfaceRequest {
        name: iface.name.clone(),
        mac,
        mtu,
        addresses,
    })
}

/// The sysctl of interface `name` that turns the kernel's IPv6 link-local address on (`0`: from
/// the MAC) or off (`1`). Writing a new value makes the kernel (re)generate the address.
fn addr_gen_mode(name: &str) -> std::path::PathBuf {
    std::path::Path::new("/proc/sys/net/ipv6/conf")
        .join(name)
        .join("addr_gen_mode")
}

/// IPv6 link-local generation of interface `name` on or off; a kernel without IPv6 has nothing
/// to turn.
fn set_link_local(name: &str, on: bool) -> Result<()> {
    let path = addr_gen_mode(name);
    match std::fs::write(&path, if on { "0" } else { "1" }) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(|source| {
            NetworkError::Netlink(NetlinkError {
                op: format!("write {}", path.display()),
                source,
            })
        }),
    }
}

/// At boot, before any pod: the loopback and every NIC up, the NICs "dark" (no address, no
/// IPv6 link-local address, so nothing to send and nothing a template's VMs would share).
/// Bringing a virtio NIC up (its receive buffers, queues, the kernel's per-interface set-up) is
/// then done once, in the template, instead of at every pod start; a pod's
/// [`update_interface`] changes the MAC and turns link-local generation back on, from the
/// pod's MAC. Answers the NICs brought up.
pub fn bring_up_dark() -> Result<Vec<String>> {
    let mut nl = Netlink::open()?;
    let mut up = Vec::new();
    for link in nl.links()? {
        if !link.loopback {
            set_link_local(&link.name, false)?;
        }
        if !link.up {
            nl.set_link(
                link.index,
                LinkChange {
                    up: Some(true),
                    ..Default::default()
                },
            )?;
        }
        if !link.loopback {
            up.push(link.name);
        }
    }
    Ok(up)
}

/// The index of interface `name`: one `SIOCGIFINDEX`. (A netlink `RTM_GETLINK` builds the
/// whole interface description, ~100 ms of emulated guest kernel work here.)
fn link_index(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|e| match e {
        nix::errno::Errno::ENODEV => NetworkError::NoInterface(name.to_owned()),
        e => NetworkError::Netlink(NetlinkError {
            op: format!("look up interface {name:?}"),
            source: e.into(),
        }),
    })
}

/// Gives interface `iface.name` its MAC, MTU and addresses, brings it up, then adds `routes`
/// (as [`update_routes`]); answers with what the kernel accepted: the MAC, MTU and addresses
/// asked for (a MAC or MTU not asked for as the kernel reports it). Nothing is read back that
/// the kernel acknowledged: each netlink read of an interface costs as much as the change in
/// the guest, and every system call counts there (one request at pod start, one socket).
pub fn update_interface(iface: &pb::Interface, routes: &[pb::Route]) -> Result<pb::Interface> {
    let req = check_interface(iface)?;
    let mut steps = Steps::start();
    let index = link_index(&req.name)?;
    let routes = check_routes(routes, |name| {
        if name == req.name {
            Ok(index)
        } else {
            link_index(name)
        }
    })?;
    let mut nl = Netlink::open()?;
    steps.mark("lookup");
    nl.set_link(
        index,
        LinkChange {
            mac: req.mac,
            mtu: req.mtu,
            up: Some(true),
        },
    )?;
    steps.mark("link");
    // After the MAC: the link-local address is made from it.
    set_link_local(&req.name, true)?;
    steps.mark("link-local");
    for addr in &req.addresses {
        nl.add_address(index, *addr)?;
    }
    steps.mark("addresses");
    for r in &routes {
        nl.add_route(r)?;
    }
    steps.mark("routes");
    let (mac, mtu) = match (req.mac, req.mtu) {
        (Some(mac), Some(mtu)) => (Some(mac), mtu),
        _ => {
            let link = nl
                .link_by_name(&req.name)?
                .ok_or_else(|| NetworkError::NoInterface(req.name.clone()))?;
            steps.mark("read back");
            (req.mac.or(link.mac), req.mtu.unwrap_or(link.mtu))
        }
    };
    let mac = mac.as_ref().map(netlink::format_mac).unwrap_or_default();
    log::debug!(
        "interface {} ({mac}): MTU {mtu}, addresses {:?}, {} routes; {steps}",
        req.name,
        req.addresses
            .iter()
            .map(|a| format!("{}/{}", a.ip, a.prefix_len))
            .collect::<Vec<_>>(),
        routes.len()
    );
    Ok(pb::Interface {
        name: req.name,
        mac,
        mtu,
        addresses: req.addresses.into_iter().map(pb::IpAddress::from).collect(),
        ..Default::default()
    })
}

fn check_route(r: &pb::Route, index_of: &mut impl FnMut(&str) -> Result<u32>) -> Result<Route> {
    let destination = match r.destination.as_str() {
        "" | "default" => None,
        s => Some(parse_cidr("destination", s)?),
    };
    let gateway = match r.gateway.as_str() {
        "" => None,
        s => Some(parse_ip("gateway", s)?),
    };
    let source = match r.source.as_str() {
        "" => None,
        s => Some(parse_ip("source", s)?),
    };
    let family = |ip: &IpAddr| ip.is_ipv4();
    let fam = destination.map(|d| d.ip).or(gateway).or(source);
    for other in [gateway, source].into_iter().flatten() {
        if fam.is_some_and(|f| family(&f) != family(&other)) {
            return Err(invalid(format!("route {r:?} mixes IPv4 and IPv6")));
        }
    }
    let scope =
        u8::try_from(r.scope).map_err(|_| invalid(format!("route scope {} (0..=255)", r.scope)))?;
    let oif = match r.device.as_str() {
        "" => None,
        name => Some(index_of(name)?),
    };
    if oif.is_none() && gateway.is_none() {
        return Err(invalid(format!(
            "route {r:?} has neither gateway nor device"
        )));
    }
    Ok(Route {
        destination,
        gateway,
        oif,
        source,
        scope,
        kernel: false,
    })
}

/// Every route of a request checked, before anything changes; `index_of` names devices.
fn check_routes(
    routes: &[pb::Route],
    mut index_of: impl FnMut(&str) -> Result<u32>,
) -> Result<Vec<Route>> {
    if routes.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "{} routes (at most {MAX_ENTRIES})",
            routes.len()
        )));
    }
    routes
        .iter()
        .map(|r| check_route(r, &mut index_of))
        .collect()
}

/// Adds the routes, in their order (a route through a gateway after the route that reaches
/// the gateway); answers with them.
pub fn update_routes(routes: &pb::Routes) -> Result<pb::Routes> {
    let mut steps = Steps::start();
    let checked = check_routes(&routes.routes, link_index)?;
    steps.mark("check");
    let mut nl = Netlink::open()?;
    for r in &checked {
        nl.add_route(r)?;
    }
    steps.mark("add");
    log::debug!("{} routes added; {steps}", checked.len());
    Ok(routes.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_good_interface_request_parses() {
        let r = check_interface(&iface(
            "eth0",
            "02:42:0a:00:00:05",
            1450,
            &[("10.0.0.5", 24), ("fd00::5", 64)],
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.mac, Some([2, 0x42, 10, 0, 0, 5]));
        assert_eq!(r.mtu, Some(1450));
        assert_eq!(r.addresses.len(), 2);
        assert_eq!(r.addresses[1].prefix_len, 64);
    }

    #[test]
    fn bad_interface_requests_are_refused_before_anything_changes() {
        for (bad, what) in [
            (iface("", "", 0, &[]), "empty name"),
            (iface("a-name-longer-than-15", "", 0, &[]), "long name"),
            (iface("eth0", "01:00:5e:00:00:01", 0, &[]), "multicast MAC"),
            (iface("eth0", "00:00:00:00:00:00", 0, &[]), "zero MAC"),
            (iface("eth0", "02:42", 0, &[]), "short MAC"),
            (iface("eth0", "", 67, &[]), "MTU too small"),
            (iface("eth0", "", 70000, &[]), "MTU too large"),
            (iface("eth0", "", 0, &[("10.0.0.5", 33)]), "v4 prefix"),
            (iface("eth0", "", 0, &[("fd00::5", 129)]), "v6 prefix"),
            (iface("eth0", "", 0, &[("10.0.0.300", 24)]), "bad address"),
        ] {
            match check_interface(&bad) {
                Err(e @ NetworkError::Invalid(_)) => {
                    assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{what}")
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        let many: Vec<(&str, u32)> = vec![("10.0.0.1", 32); MAX_ENTRIES + 1];
        assert!(matches!(
            check_interface(&iface("eth0", "", 0, &many)),
            Err(NetworkError::Invalid(_))
        ));
    }

    #[test]
    fn cidrs_parse_with_or_without_a_prefix() {
        let a = parse_cidr("d", "10.1.0.0/16").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (a.ip.to_string(), a.prefix_len),
            ("10.1.0.0".to_owned(), 16)
        );
        let h = parse_cidr("d", "fd00::1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.prefix_len, 128);
        for bad in ["10.1.0.0/", "10.1.0.0/x", "10.1.0.0/33", "nope/8"] {
            assert!(parse_cidr("d", bad).is_err(), "{bad}");
        }
    }
}

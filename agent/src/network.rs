//! The guest's NIC: `UpdateInterface` and `UpdateRoutes`. The shim reads the pod's CNI
//! interface on the host (MAC, MTU, addresses, routes) and the agent gives them to the guest's
//! virtio-net device, so that the pod has, inside the VM, the network CNI made for it.
//!
//! Every field is checked before anything changes: a request that does not parse changes
//! nothing. Requests go to the network namespace of the calling thread (the guest's own; in
//! tests, a namespace of the test's).

use std::net::IpAddr;

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

/// Gives interface `iface.name` its MAC, MTU and addresses, and brings it up; answers with
/// the interface as the kernel then reports it.
pub fn update_interface(iface: &pb::Interface) -> Result<pb::Interface> {
    let req = check_interface(iface)?;
    let mut nl = Netlink::open()?;
    let link = nl
        .link_by_name(&req.name)?
        .ok_or_else(|| NetworkError::NoInterface(req.name.clone()))?;
    nl.set_link(
        link.index,
        LinkChange {
            mac: req.mac,
            mtu: req.mtu,
            up: Some(true),
        },
    )?;
    for addr in &req.addresses {
        nl.add_address(link.index, *addr)?;
    }
    log::info!(
        "interface {} ({}): MTU {:?}, addresses {:?}",
        req.name,
        req.mac
            .as_ref()
            .map(netlink::format_mac)
            .unwrap_or_default(),
        req.mtu,
        req.addresses
            .iter()
            .map(|a| format!("{}/{}", a.ip, a.prefix_len))
            .collect::<Vec<_>>()
    );
    interface_now(&mut nl, &req.name)
}

fn interface_now(nl: &mut Netlink, name: &str) -> Result<pb::Interface> {
    let link = nl
        .link_by_name(name)?
        .ok_or_else(|| NetworkError::NoInterface(name.to_owned()))?;
    let addresses = nl
        .addresses(link.index)?
        .into_iter()
        .map(|a| pb::IpAddress {
            address: a.ip.to_string(),
            prefix_len: u32::from(a.prefix_len),
            ..Default::default()
        })
        .collect();
    Ok(pb::Interface {
        name: link.name,
        mac: link
            .mac
            .as_ref()
            .map(netlink::format_mac)
            .unwrap_or_default(),
        mtu: link.mtu,
        addresses,
        ..Default::default()
    })
}

fn check_route(r: &pb::Route, nl: &mut Netlink) -> Result<Route> {
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
        name => Some(
            nl.link_by_name(name)?
                .ok_or_else(|| NetworkError::NoInterface(name.to_owned()))?
                .index,
        ),
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

/// Adds the routes, in their order (a route through a gateway after the route that reaches
/// the gateway); answers with them.
pub fn update_routes(routes: &pb::Routes) -> Result<pb::Routes> {
    if routes.routes.len() > MAX_ENTRIES {
        return Err(invalid(format!(
            "{} routes (at most {MAX_ENTRIES})",
            routes.routes.len()
        )));
    }
    let mut nl = Netlink::open()?;
    let checked = routes
        .routes
        .iter()
        .map(|r| check_route(r, &mut nl))
        .collect::<Result<Vec<_>>>()?;
    for r in &checked {
        nl.add_route(r)?;
    }
    log::info!("{} routes added", checked.len());
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

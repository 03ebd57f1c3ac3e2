//! Route netlink, synchronously: the few requests Nutshell makes of a network stack. The shim
//! reads the pod's CNI interface and wires a tap to it with tc redirects (in the pod's network
//! namespace, on the host); the agent gives the guest's NIC that interface's MAC, MTU,
//! addresses and routes.
//!
//! Messages are built and parsed by `netlink-packet-route`; a [`Netlink`] is one socket in the
//! network namespace of the thread that opened it.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkExtentMask, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// A failed netlink request: what was asked, and the kernel's (or the socket's) answer.
#[derive(Debug, thiserror::Error)]
#[error("netlink {op}: {source}")]
pub struct NetlinkError {
    /// The request, e.g. `add route 0.0.0.0/0 via 10.0.0.1`.
    pub op: String,
    /// The errno or the decoding error.
    #[source]
    pub source: io::Error,
}

impl NetlinkError {
    /// The kernel's errno, if it answered with one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

type Result<T> = std::result::Result<T, NetlinkError>;

/// A network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// `ifindex`.
    pub index: u32,
    /// `eth0`.
    pub name: String,
    /// The hardware address, for an Ethernet-like link.
    pub mac: Option<[u8; 6]>,
    /// MTU in bytes.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// The loopback device.
    pub loopback: bool,
}

/// An address of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    /// The address.
    pub ip: IpAddr,
    /// The prefix length of its subnet.
    pub prefix_len: u8,
}

impl From<Address> for crate::generated::agent::IpAddress {
    fn from(a: Address) -> Self {
        crate::generated::agent::IpAddress {
            address: a.ip.to_string(),
            prefix_len: u32::from(a.prefix_len),
            ..Default::default()
        }
    }
}

/// A route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination and prefix length; `None` for a default route.
    pub destination: Option<Address>,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Output interface.
    pub oif: Option<u32>,
    /// Preferred source address.
    pub source: Option<IpAddr>,
    /// `RT_SCOPE_*` (0 universe, 253 link, 254 host).
    pub scope: u8,
    /// Made by the kernel for an address's subnet (`proto kernel`): comes back with the address.
    pub kernel: bool,
}

/// What [`Netlink::set_link`] changes; `None` leaves it as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkChange {
    /// New hardware address.
    pub mac: Option<[u8; 6]>,
    /// New MTU.
    pub mtu: Option<u32>,
    /// Up or down.
    pub up: Option<bool>,
}

/// `ETH_P_ALL` in network byte order, as `tcm_info` wants it.
const ETH_P_ALL_BE: u32 = (libc::ETH_P_ALL as u16).to_be() as u32;

/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

/// Receive buffer: a dump datagram is at most 32 KiB on current kernels. Reserved, not
/// zeroed: only the pages an answer fills are touched (page faults are guest kernel work).
const RECV_BUF: usize = 64 * 1024;

/// A route netlink socket in the network namespace of the thread that opened it.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let op = |source| NetlinkError {
            op: "open a route socket".to_owned(),
            source,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(op)?;
        socket.bind_auto().map_err(op)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(op)?;
        // Strict checking lets a dump filter in the kernel (the addresses of one interface):
        // the kernel builds only what was asked for, which on an emulated guest kernel is most
        // of the cost. Kernels before 4.20 lack it; answers are filtered here as well.
        let _ = socket.set_netlink_get_strict_chk(true);
        Ok(Netlink {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Every interface.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let msgs = self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()), || {
            "list links".to_owned()
        })?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(&l)),
                _ => None,
            })
            .collect())
    }

    /// The interface called `name`, if there is one: one link asked for by name, without
    /// its statistics (a dump of every link is ~10× the kernel work in a guest).
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        msg.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        let got = self.exchange(RouteNetlinkMessage::GetLink(msg), 0, || {
            format!("look up link {name:?}")
        });
        match got {
            Ok(msgs) => Ok(msgs.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(&l)),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The global addresses (scope universe) of interface `index`, IPv4 first.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<Address>> {
        // With strict checking the kernel dumps only this interface's addresses.
        let mut req = AddressMessage::default();
        req.header.index = index;
        let msgs = self.dump(RouteNetlinkMessage::GetAddress(req), || {
            format!("list the addresses of link {index}")
        })?;
        let mut out: Vec<Address> = msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a)
                    if a.header.index == index && a.header.scope == AddressScope::Universe =>
                {
                    a.attributes
                        .iter()
                        .find_map(|attr| match attr {
                            AddressAttribute::Address(ip) => Some(*ip),
                            _ => None,
                        })
                        .map(|ip| Address {
                            ip,
                            prefix_len: a.header.prefix_len,
                        })
                }
                _ => None,
            })
            .collect();
        out.sort_by_key(|a| a.ip.is_ipv6());
        Ok(out)
    }

    /// The unicast routes of the main table through interface `index`, both families.
    pub fn routes(&mut self, index: u32) -> Result<Vec<Route>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RouteMessage::default();
            req.header.address_family = family;
            let msgs = self.dump(RouteNetlinkMessage::GetRoute(req), || {
                format!("list the routes of link {index}")
            })?;
            out.extend(msgs.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r)
                    if r.header.table == RouteHeader::RT_TABLE_MAIN
                        && r.header.kind == RouteType::Unicast =>
                {
                    let route = route_from(&r);
                    (route.oif == Some(index)).then_some(route)
                }
                _ => None,
            }));
        }
        Ok(out)
    }

    /// Changes the MAC, MTU or state of interface `index`.
    pub fn set_link(&mut self, index: u32, change: LinkChange) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        if let Some(mac) = change.mac {
            msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        if let Some(mtu) = change.mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(up) = change.up {
            msg.header.change_mask = LinkFlags::Up;
            if up {
                msg.header.flags = LinkFlags::Up;
            }
        }
        self.request(RouteNetlinkMessage::SetLink(msg), 0, || {
            format!("set link {index} ({change:?})")
        })
    }

    /// Adds `addr` to interface `index`; an address it already has is left as it is.
    pub fn add_address(&mut self, index: u32, addr: Address) -> Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = family_of(addr.ip);
        msg.header.prefix_len = addr.prefix_len;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.ip));
        msg.attributes.push(AddressAttribute::Address(addr.ip));
        match self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            || {
                format!(
                    "add address {}/{} to link {index}",
                    addr.ip, addr.prefix_len
                )
            },
        ) {
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Adds `route` to the main table, replacing one to the same destination.
    pub fn add_route(&mut self, route: &Route) -> Result<()> {
        let mut msg = RouteMessage::default();
        let family = route
            .destination
            .map(|d| d.ip)
            .or(route.gateway)
            .map(family_of)
            .unwrap_or(AddressFamily::Inet);
        msg.header.address_family = family;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::from(route.scope);
        msg.header.kind = RouteType::Unicast;
        if let Some(d) = route.destination {
            msg.header.destination_prefix_length = d.prefix_len;
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(d.ip)));
        }
        if let Some(gw) = route.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if let Some(src) = route.source {
            msg.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::from(src)));
        }
        if let Some(oif) = route.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
            || format!("add route {}", describe_route(route)),
        )
    }

    /// Adds the ingress qdisc (`ffff:`) to interface `index`.
    pub fn add_ingress_qdisc(&mut self, index: u32) -> Result<()> {
        let msg = ingress_qdisc(index);
        self.request(
            RouteNetlinkMessage::NewQueueDiscipline(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            || format!("add the ingress qdisc of link {index}"),
        )
    }

    /// Removes the ingress qdisc of interface `index` and its filters; none there is no error.
    pub fn del_ingress_qdisc(&mut self, index: u32) -> Result<()> {
        match self.request(
            RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)),
            0,
            || format!("remove the ingress qdisc of link {index}"),
        ) {
            Err(e) if matches!(e.errno(), Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)) => {
                Ok(())
            }
            other => other,
        }
    }

    /// Sends every frame that arrives on interface `from` out of interface `to`, untouched
    /// (a u32 filter matching everything on `from`'s ingress qdisc, with a mirred egress
    /// redirect). `from` needs its ingress qdisc.
    pub fn redirect_ingress(&mut self, from: u32, to: u32) -> Result<()> {
        let mut mirror = TcMirror::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.attributes = vec![
            TcActionAttribute::Kind("mirred".to_owned()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirror,
            ))]),
        ];
        let mut selector = TcU32Selector::default();
        selector.flags = TcU32SelectorFlags::Terminal;
        selector.nkeys = 1;
        selector.keys = vec![TcU32Key::default()];
        let mut msg = TcMessage::with_index(index_i32(from));
        msg.header.parent = INGRESS_HANDLE;
        msg.header.info = (1 << 16) | ETH_P_ALL_BE;
        msg.attributes = vec![
            TcAttribute::Kind("u32".to_owned()),
            TcAttribute::Options(vec![
                TcOption::U32(TcFilterU32Option::Selector(selector)),
                TcOption::U32(TcFilterU32Option::Action(vec![action])),
            ]),
        ];
        self.request(
            RouteNetlinkMessage::NewTrafficFilter(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            || format!("redirect the ingress of link {from} to link {to}"),
        )
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = self.seq;
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        Ok(self.seq)
    }

    /// Reads answers to request `seq` until `done` says so; each message goes to `each`.
    fn receive(
        &mut self,
        seq: u32,
        mut each: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> io::Result<bool>,
    ) -> io::Result<()> {
        loop {
            self.buf.clear();
            // Into the spare capacity; a longer datagram is cut (`n` then exceeds the length).
            let n = self.socket.recv(&mut self.buf, 0)?.min(self.buf.len());
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a netlink message of length 0",
                    ));
                }
                off += len;
                if msg.header.sequence_number != seq {
                    continue;
                }
                if each(msg)? {
                    return Ok(());
                }
            }
        }
    }

    /// A request with an acknowledgement.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: impl FnOnce() -> String,
    ) -> Result<()> {
        self.exchange(msg, flags, op).map(drop)
    }

    /// A request with an acknowledgement: the messages answered before it.
    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: impl FnOnce() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let mut out = Vec::new();
        let r = self.send(msg, NLM_F_ACK | flags).and_then(|seq| {
            self.receive(seq, |m| match m.payload {
                NetlinkPayload::Error(e) => match e.code {
                    None => Ok(true),
                    Some(_) => Err(e.to_io()),
                },
                NetlinkPayload::InnerMessage(inner) => {
                    out.push(inner);
                    Ok(false)
                }
                _ => Ok(false),
            })
        });
        r.map(|()| out)
            .map_err(|source| NetlinkError { op: op(), source })
    }

    /// A dump: every message up to the final `NLMSG_DONE`.
    fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
        op: impl FnOnce() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let mut out = Vec::new();
        let r = self.send(msg, NLM_F_DUMP).and_then(|seq| {
            self.receive(seq, |m| match m.payload {
                NetlinkPayload::Done(_) => Ok(true),
                NetlinkPayload::Error(e) => match e.code {
                    None => Ok(true),
                    Some(_) => Err(e.to_io()),
                },
                NetlinkPayload::InnerMessage(inner) => {
                    out.push(inner);
                    Ok(false)
                }
                _ => Ok(false),
            })
        });
        r.map(|()| out)
            .map_err(|source| NetlinkError { op: op(), source })
    }
}

fn ingress_qdisc(index: u32) -> TcMessage {
    let mut msg = TcMessage::with_index(index_i32(index));
    msg.header.handle = INGRESS_HANDLE;
    msg.header.parent = TcHandle::INGRESS;
    msg.attributes = vec![TcAttribute::Kind("ingress".to_owned())];
    msg
}

/// tc headers carry the interface index as an `int`; kernel indexes fit.
fn index_i32(index: u32) -> i32 {
    i32::try_from(index).unwrap_or(i32::MAX)
}

fn family_of(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn link_from(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: l.header.flags.contains(LinkFlags::Up),
        loopback: l.header.flags.contains(LinkFlags::Loopback),
    };
    for attr in &l.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name.clone_from(n),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            _ => {}
        }
    }
    link
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn route_from(r: &RouteMessage) -> Route {
    let mut route = Route {
        destination: None,
        gateway: None,
        oif: None,
        source: None,
        scope: u8::from(r.header.scope),
        kernel: r.header.protocol == RouteProtocol::Kernel,
    };
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Destination(d) => {
                route.destination = route_addr(d).map(|ip| Address {
                    ip,
                    prefix_len: r.header.destination_prefix_length,
                });
            }
            RouteAttribute::Gateway(g) => route.gateway = route_addr(g),
            RouteAttribute::PrefSource(s) => route.source = route_addr(s),
            RouteAttribute::Oif(i) => route.oif = Some(*i),
            _ => {}
        }
    }
    route
}

fn describe_route(r: &Route) -> String {
    let mut s = match r.destination {
        Some(d) => format!("{}/{}", d.ip, d.prefix_len),
        None => "default".to_owned(),
    };
    if let Some(gw) = r.gateway {
        s.push_str(&format!(" via {gw}"));
    }
    if let Some(oif) = r.oif {
        s.push_str(&format!(" dev {oif}"));
    }
    s
}

/// `struct ifreq` as the tun ioctls use it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates a tap called `name` in the calling thread's network namespace: `IFF_TAP |
/// IFF_NO_PI | IFF_VNET_HDR`, not persistent (it goes when its last descriptor closes), the
/// descriptor close-on-exec and blocking. A VMM takes it as its NIC's backend.
pub fn create_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap name {name:?}"),
        ));
    }
    // std opens close-on-exec and blocking.
    let fd = OwnedFd::from(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?,
    );
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the one unsafe block of this crate. TUNSETIFF reads (and updates) one `struct
    // ifreq`, which `req` is (`#[repr(C)]`, the kernel's layout) and which outlives the call;
    // `fd` is an open tun descriptor.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// `02:4e:53:00:00:01`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `02:4e:53:00:00:01`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip_and_bad_ones_are_refused() {
        let mac = [0x02, 0x4e, 0x53, 0, 0, 0xff];
        assert_eq!(format_mac(&mac), "02:4e:53:00:00:ff");
        assert_eq!(parse_mac("02:4e:53:00:00:ff"), Some(mac));
        for bad in [
            "",
            "02:4e:53:00:00",
            "02:4e:53:00:00:ff:00",
            "2:4e:53:00:00:ff",
            "zz:4e:53:00:00:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_loopback_is_listed_with_its_address() {
        // Every network namespace has `lo`; reading it needs no privilege.
        let mut nl = Netlink::open().unwrap_or_else(|e| panic!("{e}"));
        let links = nl.links().unwrap_or_else(|e| panic!("{e}"));
        let lo = links
            .iter()
            .find(|l| l.loopback)
            .unwrap_or_else(|| panic!("no loopback in {links:?}"));
        assert_eq!(lo.name, "lo");
        assert!(lo.mtu > 0);
    }

    #[test]
    fn one_link_is_found_by_name_and_only_its_addresses_are_listed() {
        let mut nl = Netlink::open().unwrap_or_else(|e| panic!("{e}"));
        let links = nl.links().unwrap_or_else(|e| panic!("{e}"));
        for want in &links {
            let got = nl
                .link_by_name(&want.name)
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("{} not found by name", want.name));
            assert_eq!(&got, want);
            // Global addresses of this link only: each is one the full dump shows for it.
            for a in nl.addresses(got.index).unwrap_or_else(|e| panic!("{e}")) {
                assert_ne!(a.ip, IpAddr::from([127, 0, 0, 1]), "host scope, not global");
            }
        }
        assert_eq!(
            nl.link_by_name("nsnothere0")
                .unwrap_or_else(|e| panic!("{e}")),
            None
        );
    }
}

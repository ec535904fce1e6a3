//! A small synchronous rtnetlink socket: one request, its replies, checked sequence numbers,
//! dumps retried when the kernel reports them interrupted. Typed helpers for the few link,
//! address and route operations pontoon needs. A socket acts on the namespace it was created in.

use std::io;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_MULTIPART,
    NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    AfSpecBridge, BridgeFlag, BridgeVlanInfo, BridgeVlanInfoFlags, InfoBridge, InfoBridgePort,
    InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, InfoVlan, LinkAttribute,
    LinkExtentMask, LinkFlags, LinkInfo, LinkMessage, State,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::error::{Error, Result};

pub struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// What pontoon reads of a link.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<String>,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    pub oper_up: bool,
    pub master: Option<u32>,
    /// For a veth: the peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// For a bridge port: whether it is isolated (`portIsolation`).
    pub port_isolated: bool,
}

impl Link {
    fn from_msg(m: &LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            kind: None,
            mac: Vec::new(),
            mtu: 0,
            up: m.header.flags.contains(LinkFlags::Up),
            oper_up: false,
            master: None,
            peer_index: None,
            port_isolated: false,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::Address(mac) => l.mac = mac.clone(),
                LinkAttribute::Mtu(mtu) => l.mtu = *mtu,
                LinkAttribute::OperState(s) => l.oper_up = *s == State::Up,
                LinkAttribute::Controller(i) => l.master = Some(*i),
                LinkAttribute::Link(i) => l.peer_index = Some(*i),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => l.kind = Some(k.to_string()),
                            LinkInfo::PortData(InfoPortData::BridgePort(opts)) => {
                                l.port_isolated = opts
                                    .iter()
                                    .any(|o| matches!(o, InfoBridgePort::Isolated(true)));
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }
}

/// An address on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub index: u32,
    pub net: IpNetwork,
    pub tentative: bool,
    pub dad_failed: bool,
}

/// A route as pontoon sets and reads it (main table unless `table` says otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Who owns the route (`RTPROT_*`); `None` = boot, as `ip route add` does.
    pub protocol: Option<u8>,
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
    pub priority: Option<u32>,
    pub table: Option<u32>,
    pub scope: Option<u8>,
    pub mtu: Option<u32>,
    pub advmss: Option<u32>,
    /// The gateway is on the link `oif` whatever the link's addresses say (an overlay hop).
    pub onlink: bool,
}

/// What [`Netlink::route_batch`] does with one route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteOp {
    /// Create it; fails if a route to the destination with that metric exists.
    Add,
    /// Create it or replace the route with the same destination, table and metric.
    Replace,
    Delete,
}

/// Options for a new veth pair.
pub struct VethSpec<'a> {
    pub host_name: &'a str,
    pub peer_name: &'a str,
    /// The namespace the peer is created in (fd of its nsfs file).
    pub peer_netns: std::os::fd::BorrowedFd<'a>,
    pub mtu: u32,
    pub peer_mac: Option<[u8; 6]>,
    /// Bridge the host end is enslaved to at creation.
    pub master: u32,
}

fn family(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn new() -> Result<Netlink> {
        let mut sock = Socket::new(NETLINK_ROUTE)
            .map_err(|e| Error::netlink("cannot open a netlink socket", e))?;
        sock.bind_auto()
            .map_err(|e| Error::netlink("cannot bind the netlink socket", e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| Error::netlink("cannot connect the netlink socket", e))?;
        let _ = sock.set_netlink_get_strict_chk(true);
        let _ = sock.set_ext_ack(true);
        Ok(Netlink {
            sock,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends one request and collects its replies (all parts of a dump, or the ACK).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.request_inner(msg, flags, false)
    }

    /// Sends one request and collects its replies. A dump the kernel reports as interrupted
    /// by a concurrent change is retried; with `lenient`, the last (possibly inconsistent)
    /// dump is returned when every retry was interrupted.
    pub(super) fn request_inner(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        lenient: bool,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut last = Vec::new();
        for attempt in 0..10u64 {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(attempt));
            }
            self.seq = self.seq.wrapping_add(1);
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | flags;
            header.sequence_number = self.seq;
            let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg.clone()));
            nl.finalize();
            let mut out = vec![0u8; nl.buffer_len()];
            nl.serialize(&mut out);
            self.sock.send(&out, 0)?;
            let mut replies = Vec::new();
            let mut interrupted = false;
            'recv: loop {
                let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
                let mut off = 0;
                while off < n {
                    let reply =
                        NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..n])
                            .map_err(|e| {
                                io::Error::new(io::ErrorKind::InvalidData, e.to_string())
                            })?;
                    let len = reply.header.length as usize;
                    if len == 0 {
                        break;
                    }
                    off += (len + 3) & !3;
                    if reply.header.sequence_number != self.seq {
                        continue; // a stale reply from an earlier request
                    }
                    if reply.header.flags & NLM_F_DUMP_INTR != 0 {
                        interrupted = true;
                    }
                    let multipart = reply.header.flags & NLM_F_MULTIPART != 0;
                    match reply.payload {
                        NetlinkPayload::Error(e) => match e.code {
                            None => break 'recv,
                            Some(_) => return Err(e.to_io()),
                        },
                        NetlinkPayload::Done(_) => break 'recv,
                        NetlinkPayload::InnerMessage(m) => {
                            replies.push(m);
                            if !multipart && !dump && flags & NLM_F_ACK == 0 {
                                break 'recv;
                            }
                        }
                        _ => {}
                    }
                }
            }
            if !interrupted {
                return Ok(replies);
            }
            last = replies;
        }
        if lenient {
            return Ok(last);
        }
        Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "netlink dump kept being interrupted",
        ))
    }

    pub(super) fn ack(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.request(msg, flags | NLM_F_ACK).map(|_| ())
    }

    // ---- links ----

    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(m, name)
    }

    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.get_link(m, &format!("#{index}"))
    }

    fn get_link(&mut self, m: LinkMessage, what: &str) -> Result<Option<Link>> {
        match self.request(RouteNetlinkMessage::GetLink(m), 0) {
            Ok(r) => Ok(r.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_msg(l)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(Error::netlink(format!("cannot read link {what}"), e)),
        }
    }

    /// Every link in the namespace.
    /// Under heavy churn the list may be a slightly inconsistent snapshot (callers only use
    /// it to find leftovers, where that is harmless).
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let replies = self
            .request_inner(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                NLM_F_DUMP,
                true,
            )
            .map_err(|e| Error::netlink("cannot list links", e))?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_msg(l)),
                _ => None,
            })
            .collect())
    }

    /// Creates a bridge; `Ok(false)` if a link of that name already exists.
    pub fn create_bridge(&mut self, name: &str, mtu: u32, mac: [u8; 6]) -> Result<bool> {
        let mut m = LinkMessage::default();
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::Mtu(mtu));
        m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        m.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Bridge,
            )]));
        match self.ack(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(Error::netlink(format!("cannot create bridge {name}"), e)),
        }
    }

    /// Creates a veth pair whose peer is born inside `peer_netns` (no move between namespaces)
    /// and whose host end is enslaved to `master` and up.
    pub fn create_veth(&mut self, v: &VethSpec) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(v.peer_name.to_string()));
        peer.attributes.push(LinkAttribute::Mtu(v.mtu));
        peer.attributes
            .push(LinkAttribute::NetNsFd(v.peer_netns.as_raw_fd()));
        if let Some(mac) = v.peer_mac {
            peer.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        let mut m = LinkMessage::default();
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes
            .push(LinkAttribute::IfName(v.host_name.to_string()));
        m.attributes.push(LinkAttribute::Mtu(v.mtu));
        m.attributes.push(LinkAttribute::Controller(v.master));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.ack(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Deletes a link by name; `Ok(false)` if there is none.
    pub fn del_link_by_name(&mut self, name: &str) -> Result<bool> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.ack(RouteNetlinkMessage::DelLink(m), 0) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(Error::netlink(format!("cannot delete link {name}"), e)),
        }
    }

    /// Deletes a link by index; `Ok(false)` if there is none. A re-made link of the same name has
    /// another index, so this never deletes a successor.
    pub fn del_link_by_index(&mut self, index: u32) -> Result<bool> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.ack(RouteNetlinkMessage::DelLink(m), 0) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(Error::netlink(format!("cannot delete link #{index}"), e)),
        }
    }

    /// Takes a bridge port out of service in one request: down and off its bridge (~1 ms, where
    /// deleting a veth costs ~20 ms). `Ok(false)` if the link is gone.
    pub fn take_out_of_service(&mut self, index: u32) -> Result<bool> {
        match self.set_link(
            index,
            Some(false),
            vec![LinkAttribute::Controller(0)],
            "detach the port",
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets flags and attributes of a link by index.
    pub(super) fn set_link(
        &mut self,
        index: u32,
        up: Option<bool>,
        attrs: Vec<LinkAttribute>,
        what: &str,
    ) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if let Some(up) = up {
            m.header.change_mask = LinkFlags::Up;
            if up {
                m.header.flags = LinkFlags::Up;
            }
        }
        m.attributes = attrs;
        self.ack(RouteNetlinkMessage::SetLink(m), 0)
            .map_err(|e| Error::netlink(format!("cannot {what} (link #{index})"), e))
    }

    pub fn set_up(&mut self, index: u32) -> Result<()> {
        self.set_link(index, Some(true), vec![], "set the link up")
    }

    pub fn set_down(&mut self, index: u32) -> Result<()> {
        self.set_link(index, Some(false), vec![], "set the link down")
    }

    pub fn set_mac(&mut self, index: u32, mac: &[u8]) -> Result<()> {
        self.set_link(
            index,
            None,
            vec![LinkAttribute::Address(mac.to_vec())],
            "set the MAC address",
        )
    }

    pub fn set_promisc(&mut self, index: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Promisc;
        m.header.change_mask = LinkFlags::Promisc;
        self.ack(RouteNetlinkMessage::SetLink(m), 0)
            .map_err(|e| Error::netlink("cannot set promiscuous mode", e))
    }

    /// Options of a bridge port: hairpin mode and isolation. Port (slave) options are applied by
    /// RTM_NEWLINK on the existing link; RTM_SETLINK ignores IFLA_INFO_SLAVE_DATA.
    pub fn set_port_options(&mut self, index: u32, hairpin: bool, isolated: bool) -> Result<()> {
        let mut opts = vec![InfoBridgePort::HairpinMode(hairpin)];
        if isolated {
            opts.push(InfoBridgePort::Isolated(true));
        }
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(opts)),
        ]));
        self.ack(RouteNetlinkMessage::NewLink(m), 0).map_err(|e| {
            Error::netlink(
                format!("cannot set the bridge port options (link #{index})"),
                e,
            )
        })
    }

    /// Turns VLAN filtering on for a bridge.
    pub fn set_vlan_filtering(&mut self, bridge: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = bridge;
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::VlanFiltering(true)])),
        ]));
        self.ack(RouteNetlinkMessage::NewLink(m), 0).map_err(|e| {
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                Error::UnsupportedField {
                    key: "vlan".into(),
                    msg:
                        "this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING): \
                          `vlan` and `vlanTrunk` cannot be used on this node"
                            .into(),
                }
            } else {
                Error::netlink("cannot turn on VLAN filtering", e)
            }
        })
    }

    /// Adds (or, with `add` false, removes) VLANs of a bridge port (`port_self` false) or of
    /// the bridge device itself: `(vid, pvid and untagged)`.
    pub fn bridge_vlans(
        &mut self,
        index: u32,
        port_self: bool,
        add: bool,
        vlans: &[(u16, bool)],
    ) -> Result<()> {
        if vlans.is_empty() {
            return Ok(());
        }
        let mut spec = Vec::new();
        if port_self {
            spec.push(AfSpecBridge::Flags(BridgeFlag::LowerDev));
        }
        for (vid, pvid) in vlans {
            let flags = if *pvid {
                BridgeVlanInfoFlags::Pvid | BridgeVlanInfoFlags::Untagged
            } else {
                BridgeVlanInfoFlags::empty()
            };
            spec.push(AfSpecBridge::VlanInfo(BridgeVlanInfo { flags, vid: *vid }));
        }
        let mut m = LinkMessage::default();
        m.header.interface_family = AddressFamily::Bridge;
        m.header.index = index;
        m.attributes.push(LinkAttribute::AfSpecBridge(spec));
        let msg = if add {
            RouteNetlinkMessage::SetLink(m)
        } else {
            RouteNetlinkMessage::DelLink(m)
        };
        self.ack(msg, 0)
            .map_err(|e| Error::netlink(format!("cannot change the VLANs of link #{index}"), e))
    }

    /// The VLANs of a bridge port: `(vid, pvid)`.
    pub fn port_vlans(&mut self, index: u32) -> Result<Vec<(u16, bool)>> {
        let mut m = LinkMessage::default();
        m.header.interface_family = AddressFamily::Bridge;
        m.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::Brvlan]));
        let replies = self
            .request_inner(RouteNetlinkMessage::GetLink(m), NLM_F_DUMP, true)
            .map_err(|e| Error::netlink("cannot list bridge VLANs", e))?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewLink(l) = r else {
                continue;
            };
            if l.header.index != index {
                continue;
            }
            for a in &l.attributes {
                if let LinkAttribute::AfSpecBridge(spec) = a {
                    for s in spec {
                        if let AfSpecBridge::VlanInfo(v) = s {
                            out.push((v.vid, v.flags.contains(BridgeVlanInfoFlags::Pvid)));
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Creates the VLAN device `name` (id `vid`) on link `parent`, up; `Ok(false)` if it exists.
    pub fn create_vlan(&mut self, name: &str, parent: u32, vid: u16) -> Result<bool> {
        let mut m = LinkMessage::default();
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::Link(parent));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vlan),
            LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(vid)])),
        ]));
        match self.ack(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(Error::netlink(
                format!("cannot create VLAN device {name}"),
                e,
            )),
        }
    }

    /// A request the typed messages do not cover (traffic control): `kind` with `body` (its
    /// header and attributes). Returns the payloads of the answers (a dump's messages).
    pub fn raw(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut buf = Vec::with_capacity(16 + body.len());
        buf.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(body);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(self.buf[off..off + 4].try_into().unwrap()) as usize;
                if len < 16 || off + len > n {
                    break;
                }
                let ty = u16::from_ne_bytes([self.buf[off + 4], self.buf[off + 5]]);
                let rseq = u32::from_ne_bytes(self.buf[off + 8..off + 12].try_into().unwrap());
                let payload = self.buf[off + 16..off + len].to_vec();
                off += (len + 3) & !3;
                if rseq != seq {
                    continue;
                }
                match ty {
                    2 => {
                        // NLMSG_ERROR
                        let errno = -i32::from_ne_bytes(payload[..4].try_into().unwrap());
                        return if errno == 0 {
                            Ok(out)
                        } else {
                            Err(io::Error::from_raw_os_error(errno))
                        };
                    }
                    3 => return Ok(out), // NLMSG_DONE
                    _ => out.push(payload),
                }
            }
        }
    }

    // ---- addresses ----

    pub fn addrs(&mut self, index: u32, fam: Option<AddressFamily>) -> Result<Vec<Addr>> {
        self.addrs_of(Some(index), fam)
    }

    /// Every address of the namespace.
    pub fn all_addrs(&mut self) -> Result<Vec<Addr>> {
        self.addrs_of(None, None)
    }

    fn addrs_of(&mut self, only: Option<u32>, fam: Option<AddressFamily>) -> Result<Vec<Addr>> {
        let mut m = AddressMessage::default();
        m.header.family = fam.unwrap_or(AddressFamily::Unspec);
        m.header.index = only.unwrap_or(0);
        let replies = self
            .request(RouteNetlinkMessage::GetAddress(m), NLM_F_DUMP)
            .map_err(|e| Error::netlink("cannot list addresses", e))?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewAddress(a) = r else {
                continue;
            };
            let index = a.header.index;
            if only.is_some_and(|i| i != index) {
                continue;
            }
            let mut ip = None;
            let mut flags = AddressFlags::from_bits_retain(a.header.flags.bits() as u32);
            for attr in &a.attributes {
                match attr {
                    // IFA_LOCAL is the interface's own address on point-to-point links.
                    AddressAttribute::Local(l) => ip = Some(*l),
                    AddressAttribute::Address(x) if ip.is_none() => ip = Some(*x),
                    AddressAttribute::Flags(f) => flags = *f,
                    _ => {}
                }
            }
            if let Some(ip) = ip
                && let Ok(net) = IpNetwork::new(ip, a.header.prefix_len)
            {
                out.push(Addr {
                    index,
                    net,
                    tentative: flags.contains(AddressFlags::Tentative),
                    dad_failed: flags.contains(AddressFlags::Dadfailed),
                });
            }
        }
        Ok(out)
    }

    /// Adds an address; IPv6 addresses skip duplicate address detection unless `dad`.
    pub fn add_addr(&mut self, index: u32, net: IpNetwork, dad: bool) -> Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = family(&net.ip());
        m.header.prefix_len = net.prefix();
        m.header.index = index;
        m.header.scope = AddressScope::Universe;
        m.attributes.push(AddressAttribute::Local(net.ip()));
        m.attributes.push(AddressAttribute::Address(net.ip()));
        if let IpNetwork::V4(v4) = net {
            m.attributes
                .push(AddressAttribute::Broadcast(v4.broadcast()));
        } else if !dad {
            m.header.flags = AddressHeaderFlags::Nodad;
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match self.ack(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(()) => Ok(()),
            Err(e) => Err(Error::netlink(format!("cannot add address {net}"), e)),
        }
    }

    pub fn del_addr(&mut self, index: u32, net: IpNetwork) -> Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = family(&net.ip());
        m.header.prefix_len = net.prefix();
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(net.ip()));
        m.attributes.push(AddressAttribute::Address(net.ip()));
        self.ack(RouteNetlinkMessage::DelAddress(m), 0)
            .map_err(|e| Error::netlink(format!("cannot delete address {net}"), e))
    }

    // ---- routes ----

    fn route_msg(r: &RouteSpec) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = family(&r.dst.ip());
        m.header.destination_prefix_length = r.dst.prefix();
        m.header.protocol = r
            .protocol
            .map(RouteProtocol::from)
            .unwrap_or(RouteProtocol::Boot);
        m.header.kind = RouteType::Unicast;
        let table = r.table.unwrap_or(RouteHeader::RT_TABLE_MAIN as u32);
        if table < 256 {
            m.header.table = table as u8;
        } else {
            m.header.table = RouteHeader::RT_TABLE_UNSPEC;
            m.attributes.push(RouteAttribute::Table(table));
        }
        m.header.scope = match r.scope {
            Some(s) => RouteScope::from(s),
            None if r.gw.is_none() => RouteScope::Link,
            None => RouteScope::Universe,
        };
        if r.dst.prefix() > 0 {
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(
                    r.dst.network(),
                )));
        }
        if let Some(gw) = r.gw {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if let Some(oif) = r.oif {
            m.attributes.push(RouteAttribute::Oif(oif));
        }
        if r.onlink {
            m.header.flags |= netlink_packet_route::route::RouteFlags::Onlink;
        }
        if let Some(p) = r.priority {
            m.attributes.push(RouteAttribute::Priority(p));
        }
        let mut metrics = Vec::new();
        if let Some(mtu) = r.mtu {
            metrics.push(netlink_packet_route::route::RouteMetric::Mtu(mtu));
        }
        if let Some(advmss) = r.advmss {
            metrics.push(netlink_packet_route::route::RouteMetric::Advmss(advmss));
        }
        if !metrics.is_empty() {
            m.attributes.push(RouteAttribute::Metrics(metrics));
        }
        m
    }

    /// Adds a route; an identical one already present is fine.
    pub fn add_route(&mut self, r: &RouteSpec) -> Result<()> {
        match self.ack(
            RouteNetlinkMessage::NewRoute(Self::route_msg(r)),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(Error::netlink(
                format!(
                    "cannot add route {}{}",
                    r.dst,
                    r.gw.map(|g| format!(" via {g}")).unwrap_or_default()
                ),
                e,
            )),
        }
    }

    /// Adds or replaces the route to `r.dst` (same table and metric).
    pub fn replace_route(&mut self, r: &RouteSpec) -> Result<()> {
        self.ack(
            RouteNetlinkMessage::NewRoute(Self::route_msg(r)),
            NLM_F_CREATE | netlink_packet_core::NLM_F_REPLACE,
        )
        .map_err(|e| {
            Error::netlink(
                format!(
                    "cannot set route {}{}",
                    r.dst,
                    r.gw.map(|g| format!(" via {g}")).unwrap_or_default()
                ),
                e,
            )
        })
    }

    pub fn del_route(&mut self, r: &RouteSpec) -> Result<()> {
        match self.ack(RouteNetlinkMessage::DelRoute(Self::route_msg(r)), 0) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(Error::netlink(format!("cannot delete route {}", r.dst), e)),
        }
    }

    /// Applies many route changes with few system calls: the requests go out in chunks (one
    /// `send` each) and every one is acknowledged on its own. Returns one result per change,
    /// in order.
    pub fn route_batch(&mut self, ops: &[(RouteOp, RouteSpec)]) -> Vec<io::Result<()>> {
        const CHUNK: usize = 256;
        let mut out: Vec<io::Result<()>> = Vec::with_capacity(ops.len());
        for chunk in ops.chunks(CHUNK) {
            let first = self.seq.wrapping_add(1);
            let mut buf = Vec::new();
            for (op, r) in chunk {
                self.seq = self.seq.wrapping_add(1);
                let (msg, flags) = match op {
                    RouteOp::Add => (
                        RouteNetlinkMessage::NewRoute(Self::route_msg(r)),
                        NLM_F_CREATE | NLM_F_EXCL,
                    ),
                    RouteOp::Replace => (
                        RouteNetlinkMessage::NewRoute(Self::route_msg(r)),
                        NLM_F_CREATE | netlink_packet_core::NLM_F_REPLACE,
                    ),
                    RouteOp::Delete => (RouteNetlinkMessage::DelRoute(Self::route_msg(r)), 0),
                };
                let mut header = NetlinkHeader::default();
                header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
                header.sequence_number = self.seq;
                let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
                nl.finalize();
                let start = buf.len();
                buf.resize(start + nl.buffer_len(), 0);
                nl.serialize(&mut buf[start..]);
            }
            let mut results: Vec<Option<io::Result<()>>> = (0..chunk.len()).map(|_| None).collect();
            if let Err(e) = self.sock.send(&buf, 0) {
                for r in &mut results {
                    *r = Some(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
            let mut pending = results.iter().filter(|r| r.is_none()).count();
            while pending > 0 {
                let n = match self.sock.recv(&mut &mut self.buf[..], 0) {
                    Ok(n) => n,
                    Err(e) => {
                        for r in results.iter_mut().filter(|r| r.is_none()) {
                            *r = Some(Err(io::Error::new(e.kind(), e.to_string())));
                        }
                        break;
                    }
                };
                let mut off = 0;
                while off < n {
                    let Ok(reply) =
                        NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..n])
                    else {
                        break;
                    };
                    let len = reply.header.length as usize;
                    if len == 0 {
                        break;
                    }
                    off += (len + 3) & !3;
                    let i = reply.header.sequence_number.wrapping_sub(first) as usize;
                    if i >= results.len() || results[i].is_some() {
                        continue;
                    }
                    if let NetlinkPayload::Error(e) = reply.payload {
                        results[i] = Some(match e.code {
                            None => Ok(()),
                            Some(_) => Err(e.to_io()),
                        });
                        pending -= 1;
                    }
                }
            }
            out.extend(results.into_iter().map(|r| r.unwrap_or(Ok(()))));
        }
        out
    }

    /// Routes of one family in every table.
    pub fn routes(&mut self, v4: bool) -> Result<Vec<RouteSpec>> {
        let mut m = RouteMessage::default();
        m.header.address_family = if v4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let replies = self
            .request(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)
            .map_err(|e| Error::netlink("cannot list routes", e))?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewRoute(m) = r else {
                continue;
            };
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            let mut priority = None;
            let mut table = Some(m.header.table as u32);
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = ip_of(d),
                    RouteAttribute::Gateway(g) => gw = ip_of(g),
                    RouteAttribute::Oif(o) => oif = Some(*o),
                    RouteAttribute::Priority(p) => priority = Some(*p),
                    RouteAttribute::Table(t) => table = Some(*t),
                    _ => {}
                }
            }
            let any = if v4 {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            };
            let Ok(dst) = IpNetwork::new(dst.unwrap_or(any), m.header.destination_prefix_length)
            else {
                continue;
            };
            out.push(RouteSpec {
                protocol: Some(u8::from(m.header.protocol)),
                dst,
                gw,
                oif,
                priority,
                table,
                scope: Some(u8::from(m.header.scope)),
                mtu: None,
                advmss: None,
                onlink: m
                    .header
                    .flags
                    .contains(netlink_packet_route::route::RouteFlags::Onlink),
            });
        }
        Ok(out)
    }
}

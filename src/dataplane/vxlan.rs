//! What an overlay needs of the kernel: a VXLAN device (learning off, no miss notifications,
//! one static forwarding entry per remote VTEP), its permanent neighbour entries, and the
//! transmit checksum offload switch (an ethtool ioctl) for kernels whose offload corrupts
//! encapsulated packets.

use std::io;
use std::net::IpAddr;

use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE};

use super::netlink::Netlink;
use crate::error::{Error, Result};

/// A VXLAN device as pontoon makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// UDP destination port (8472 as the Linux default and flannel, 4789 the IANA port).
    pub port: u16,
    /// This node's underlay address (the source of encapsulated packets).
    pub local: IpAddr,
    /// The underlay link (the one holding `local`).
    pub link: u32,
    pub mtu: u32,
    pub mac: [u8; 6],
}

/// The parameters of an existing VXLAN device that decide whether it can be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanParams {
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<IpAddr>,
    pub link: Option<u32>,
    pub learning: bool,
}

impl VxlanSpec {
    /// Whether a device with `have` is this one (else it is re-made).
    pub fn matches(&self, have: &VxlanParams) -> bool {
        have.vni == Some(self.vni)
            && have.port == Some(self.port)
            && have.local == Some(self.local)
            && have.link == Some(self.link)
            && !have.learning
    }
}

fn neigh_addr(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v) => NeighbourAddress::Inet(v),
        IpAddr::V6(v) => NeighbourAddress::Inet6(v),
    }
}

fn family_of(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn ip_of(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v) => Some(IpAddr::V4(*v)),
        NeighbourAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        // An FDB entry's (family AF_BRIDGE) remote address: told apart by its length.
        NeighbourAddress::Other(b) => match b.len() {
            4 => Some(IpAddr::from(<[u8; 4]>::try_from(b.as_slice()).ok()?)),
            16 => Some(IpAddr::from(<[u8; 16]>::try_from(b.as_slice()).ok()?)),
            _ => None,
        },
        _ => None,
    }
}

/// One entry of a device's neighbour table or forwarding database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The neighbour's address (its VTEP address), or the remote underlay address of an FDB
    /// entry.
    pub ip: IpAddr,
    pub mac: Vec<u8>,
    pub permanent: bool,
}

impl Netlink {
    /// Creates the VXLAN device, up.
    pub fn create_vxlan(&mut self, s: &VxlanSpec) -> Result<()> {
        let mut data = vec![
            InfoVxlan::Id(s.vni),
            InfoVxlan::Link(s.link),
            InfoVxlan::Port(s.port),
            InfoVxlan::Learning(false),
            InfoVxlan::L2Miss(false),
            InfoVxlan::L3Miss(false),
        ];
        data.push(match s.local {
            IpAddr::V4(v) => InfoVxlan::Local(v),
            IpAddr::V6(v) => InfoVxlan::Local6(v),
        });
        let mut m = netlink_packet_route::link::LinkMessage::default();
        m.header.flags = netlink_packet_route::link::LinkFlags::Up;
        m.header.change_mask = netlink_packet_route::link::LinkFlags::Up;
        m.attributes.push(LinkAttribute::IfName(s.name.clone()));
        m.attributes.push(LinkAttribute::Mtu(s.mtu));
        m.attributes.push(LinkAttribute::Address(s.mac.to_vec()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(data)),
        ]));
        self.ack(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    Error::netlink(
                        format!(
                            "cannot create {}: this kernel has no VXLAN (CONFIG_VXLAN); use \
                             --routing direct",
                            s.name
                        ),
                        e,
                    )
                } else {
                    Error::netlink(format!("cannot create VXLAN device {}", s.name), e)
                }
            })
    }

    /// The VXLAN parameters of link `name`, `None` if it is not there (or not VXLAN).
    pub fn vxlan_params(&mut self, index: u32) -> Result<Option<VxlanParams>> {
        let mut m = netlink_packet_route::link::LinkMessage::default();
        m.header.index = index;
        let replies = match self.request_inner(RouteNetlinkMessage::GetLink(m), 0, false) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(Error::netlink("cannot read the VXLAN device", e)),
        };
        for r in replies {
            let RouteNetlinkMessage::NewLink(l) = r else {
                continue;
            };
            for a in &l.attributes {
                let LinkAttribute::LinkInfo(infos) = a else {
                    continue;
                };
                for i in infos {
                    let LinkInfo::Data(InfoData::Vxlan(opts)) = i else {
                        continue;
                    };
                    let mut p = VxlanParams {
                        vni: None,
                        port: None,
                        local: None,
                        link: None,
                        learning: false,
                    };
                    for o in opts {
                        match o {
                            InfoVxlan::Id(v) => p.vni = Some(*v),
                            InfoVxlan::Port(v) => p.port = Some(*v),
                            InfoVxlan::Local(v) => p.local = Some(IpAddr::V4(*v)),
                            InfoVxlan::Local6(v) => p.local = Some(IpAddr::V6(*v)),
                            InfoVxlan::Link(v) => p.link = Some(*v),
                            InfoVxlan::Learning(v) => p.learning = *v,
                            _ => {}
                        }
                    }
                    return Ok(Some(p));
                }
            }
        }
        Ok(None)
    }

    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<()> {
        self.set_link(index, None, vec![LinkAttribute::Mtu(mtu)], "set the MTU")
    }

    fn neigh_msg(family: AddressFamily, index: u32) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = family;
        m.header.ifindex = index;
        m
    }

    /// The neighbour entries (`bridge` false) or forwarding entries (`bridge` true) of link
    /// `index`.
    pub fn neighbours(&mut self, index: u32, bridge: bool) -> Result<Vec<Entry>> {
        let family = if bridge {
            AddressFamily::Bridge
        } else {
            AddressFamily::Unspec
        };
        // A dump request's header carries only the family (the kernel's strict checking
        // refuses an ifindex there); the entries are filtered by link here.
        let m = Self::neigh_msg(family, 0);
        let replies = self
            .request_inner(RouteNetlinkMessage::GetNeighbour(m), NLM_F_DUMP, true)
            .map_err(|e| Error::netlink("cannot list neighbour entries", e))?;
        let mut out = Vec::new();
        for r in replies {
            let RouteNetlinkMessage::NewNeighbour(n) = r else {
                continue;
            };
            if n.header.ifindex != index {
                continue;
            }
            let mut ip = None;
            let mut mac = Vec::new();
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(d) => ip = ip_of(d),
                    NeighbourAttribute::LinkLayerAddress(l) => mac = l.clone(),
                    _ => {}
                }
            }
            if let Some(ip) = ip {
                out.push(Entry {
                    ip,
                    mac,
                    // NUD_PERMANENT, also with NUD_NOARP (as FDB entries are).
                    permanent: u16::from(n.header.state) & 0x80 != 0,
                });
            }
        }
        Ok(out)
    }

    /// Adds or replaces a permanent neighbour entry (`ip` → `mac`) on link `index`.
    pub fn set_neighbour(&mut self, index: u32, ip: IpAddr, mac: &[u8]) -> io::Result<()> {
        let mut m = Self::neigh_msg(family_of(ip), index);
        m.header.state = NeighbourState::Permanent;
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(ip)));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.ack(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    pub fn del_neighbour(&mut self, index: u32, ip: IpAddr) -> io::Result<()> {
        let mut m = Self::neigh_msg(family_of(ip), index);
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(ip)));
        self.ack(RouteNetlinkMessage::DelNeighbour(m), 0)
    }

    /// Adds or replaces the static forwarding entry `mac` → remote `dst` of VXLAN link `index`.
    pub fn set_fdb(&mut self, index: u32, mac: &[u8], dst: IpAddr) -> io::Result<()> {
        let mut m = Self::neigh_msg(AddressFamily::Bridge, index);
        m.header.state = NeighbourState::Permanent;
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(dst)));
        self.ack(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    pub fn del_fdb(&mut self, index: u32, mac: &[u8], dst: IpAddr) -> io::Result<()> {
        let mut m = Self::neigh_msg(AddressFamily::Bridge, index);
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(neigh_addr(dst)));
        self.ack(RouteNetlinkMessage::DelNeighbour(m), 0)
    }
}

/// Turns the transmit checksum offload of link `name` on or off (`ethtool -K <name> tx ...`),
/// in the calling thread's network namespace. The one `unsafe` of the crate: the legacy
/// ethtool ioctl (two u32s through an ifreq) is far smaller than the ethtool generic-netlink
/// family for one flag.
#[allow(unsafe_code)]
pub fn set_tx_checksum(name: &str, on: bool) -> Result<()> {
    use std::os::fd::AsRawFd;
    const ETHTOOL_GTXCSUM: u32 = 0x16;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .map_err(|e| Error::io("cannot open a socket for ethtool", e))?;
    let run = |cmd: u32, data: u32| -> io::Result<u32> {
        let mut v = EthtoolValue { cmd, data };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: &mut v,
            _pad: [0; 16],
        };
        for (d, s) in req
            .name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        // SAFETY: `req` is a valid, NUL-terminated ifreq whose data points at a live
        // ethtool_value for the duration of the call; the kernel writes only `v`.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(v.data)
        }
    };
    run(ETHTOOL_GTXCSUM, 0)
        .and_then(|cur| {
            if (cur != 0) == on {
                Ok(0)
            } else {
                run(ETHTOOL_STXCSUM, u32::from(on))
            }
        })
        .map(|_| ())
        .map_err(|e| {
            Error::io(
                format!(
                    "cannot turn the transmit checksum offload of {name} {}",
                    if on { "on" } else { "off" }
                ),
                e,
            )
        })
}

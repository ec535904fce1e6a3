//! How this node reaches other nodes' pods, chosen per peer: a direct route via the peer's
//! InternalIP when they share a link, else the VXLAN overlay.
//!
//! The overlay is one VXLAN device per underlay family (`pontoon.vxlan` over IPv4,
//! `pontoon.vxlan6` over IPv6: learning off, no miss handlers, a MAC derived from the node
//! name and published on the Node as `pontoon.dev/vtep-mac` / `pontoon.dev/vtep6-mac`). For
//! each peer reached through it: a static forwarding entry (its VTEP MAC → its InternalIP), a
//! permanent neighbour entry (its VTEP address → its VTEP MAC) and an onlink route for each of
//! its pod CIDRs via its VTEP address. A peer's VTEP address is the network address of the pod
//! CIDR (10.244.3.0 for 10.244.3.0/24, as flannel does), so nothing but the MAC is published.
//! Everything on the devices is pontoon's, so every pass makes the device's entries equal to
//! what the peers need: a departed node's entries go, also when it left while the agent was
//! down; a changed address or MAC is replaced in place. Item by item, as routes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use sha2::{Digest, Sha256};

use super::Problem;
use super::nodes::NodeInfo;
use super::routes::{Hop, Want};
use crate::dataplane::vxlan::{self, VxlanSpec};
use crate::dataplane::{Link, Netlink};
use crate::error::{Error, Result};

/// How peers are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// A direct route to a peer on a connected subnet of this node, VXLAN to every other.
    #[default]
    Auto,
    /// Direct routes only (every node one hop away); no overlay device.
    Direct,
    /// VXLAN to every peer.
    Vxlan,
}

impl std::str::FromStr for Routing {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Routing, String> {
        match s {
            "auto" => Ok(Routing::Auto),
            "direct" => Ok(Routing::Direct),
            "vxlan" => Ok(Routing::Vxlan),
            _ => Err(format!("routing must be auto, direct or vxlan, not {s:?}")),
        }
    }
}

/// The overlay's settings: cluster-wide (every node must use the same port and VNI).
#[derive(Debug, Clone)]
pub struct Overlay {
    pub routing: Routing,
    pub port: u16,
    pub vni: u32,
    /// Leave the devices' transmit checksum offload as the kernel sets it (`false` turns it
    /// off: kernels before 5.7 corrupt the checksums of some encapsulated packets).
    pub checksum_offload: bool,
}

impl Default for Overlay {
    fn default() -> Overlay {
        Overlay {
            routing: Routing::Auto,
            port: 8472,
            vni: 1,
            checksum_offload: true,
        }
    }
}

pub fn device_name(v4: bool) -> &'static str {
    if v4 {
        "pontoon.vxlan"
    } else {
        "pontoon.vxlan6"
    }
}

fn is_device(name: &str) -> bool {
    name == device_name(true) || name == device_name(false)
}

pub fn mac_annotation(v4: bool) -> &'static str {
    if v4 {
        "pontoon.dev/vtep-mac"
    } else {
        "pontoon.dev/vtep6-mac"
    }
}

/// Bytes VXLAN adds: outer IP (20 or 40) + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub fn overhead(v4: bool) -> u32 {
    if v4 { 50 } else { 70 }
}

/// The VTEP MAC of `node` over the underlay family: stable (derived from the name) so a
/// re-made device keeps it and peers that have not seen the annotation yet still agree.
pub fn vtep_mac(node: &str, v4: bool) -> [u8; 6] {
    let d = Sha256::digest(format!("pontoon-vtep/{}/{node}", if v4 { 4 } else { 6 }).as_bytes());
    [0x02 | (d[0] & 0xfc), d[1], d[2], d[3], d[4], d[5]]
}

/// A peer's VTEP MAC: its annotation, else the derived one.
fn peer_mac(n: &NodeInfo, v4: bool) -> [u8; 6] {
    n.annotations
        .get(mac_annotation(v4))
        .and_then(|m| crate::cni::config::parse_mac(m))
        .unwrap_or_else(|| vtep_mac(&n.name, v4))
}

/// This node's underlay: for each family of its InternalIPs, the address and the link holding
/// it; and the subnets directly connected to it.
struct Underlay {
    links: BTreeMap<bool, (IpAddr, Link)>,
    connected: Vec<IpNetwork>,
}

fn underlay(nl: &mut Netlink, me: Option<&NodeInfo>) -> Result<(Underlay, Vec<Problem>)> {
    let addrs = nl.all_addrs()?;
    let links: BTreeMap<u32, Link> = nl.links()?.into_iter().map(|l| (l.index, l)).collect();
    let mut out = Underlay {
        links: BTreeMap::new(),
        connected: vec![],
    };
    for a in &addrs {
        let Some(l) = links.get(&a.index) else {
            continue;
        };
        let host = if a.net.is_ipv4() { 32 } else { 128 };
        if !is_device(&l.name) && a.net.prefix() < host {
            out.connected
                .push(IpNetwork::new(a.net.network(), a.net.prefix()).unwrap());
        }
    }
    let mut problems = vec![];
    for ip in me.map(|m| m.internal_ips.as_slice()).unwrap_or(&[]) {
        if out.links.contains_key(&ip.is_ipv4()) {
            continue;
        }
        match addrs.iter().find(|a| a.net.ip() == *ip) {
            Some(a) => {
                if let Some(l) = links.get(&a.index) {
                    out.links.insert(ip.is_ipv4(), (*ip, l.clone()));
                }
            }
            None => problems.push(Problem::new(
                "overlay underlay",
                "overlay",
                format!(
                    "this node's InternalIP {ip} is on none of its interfaces: no VXLAN over \
                     that family"
                ),
            )),
        }
    }
    Ok((out, problems))
}

/// The MTU pods get on this node: the underlay's minus the encapsulation when the overlay may
/// carry them, `None` (the plugin's default) with direct routing only.
pub fn pod_mtu(nl: &mut Netlink, ov: &Overlay, me: Option<&NodeInfo>) -> Result<Option<u32>> {
    if ov.routing == Routing::Direct {
        return Ok(None);
    }
    let (u, _) = underlay(nl, me)?;
    // IPv4 underlay when there is one (what every peer with an IPv4 address uses).
    Ok(u.links
        .get(&true)
        .map(|(_, l)| l.mtu - overhead(true))
        .or_else(|| u.links.get(&false).map(|(_, l)| l.mtu - overhead(false))))
}

/// What one pass of the overlay did.
#[derive(Debug, Default)]
pub struct Synced {
    /// The routes to other nodes' pods, direct and overlay, for [`super::routes::sync`].
    pub want: Want,
    /// The annotations this node's Node must carry (`None`: must not).
    pub annotations: BTreeMap<String, Option<String>>,
    /// Peers reached over VXLAN.
    pub vxlan_peers: usize,
    pub changed: Vec<String>,
    pub problems: Vec<Problem>,
}

/// What one device must hold.
#[derive(Default)]
struct DeviceWant {
    neighbours: BTreeMap<IpAddr, [u8; 6]>,
    fdb: BTreeMap<[u8; 6], IpAddr>,
}

/// Makes the devices and their entries what the peers need, and returns the routes to every
/// peer's pods.
pub fn sync(
    nl: &mut Netlink,
    ov: &Overlay,
    me: &str,
    my_cidrs: &[IpNetwork],
    nodes: &[NodeInfo],
) -> Result<Synced> {
    let mine = nodes.iter().find(|n| n.name == me);
    let (u, mut problems) = underlay(nl, mine)?;
    let mut out = Synced::default();
    out.problems.append(&mut problems);

    // The devices: one per family of this node's InternalIPs, unless routing is direct.
    let mut devices: BTreeMap<bool, u32> = BTreeMap::new();
    for v4 in [true, false] {
        let name = device_name(v4);
        let wanted = match (ov.routing, u.links.get(&v4)) {
            (Routing::Direct, _) | (_, None) => None,
            (_, Some(x)) => Some(x),
        };
        let Some((local, link)) = wanted else {
            match nl.del_link_by_name(name) {
                Ok(true) => out.changed.push(format!("removed {name}")),
                Ok(false) => {}
                Err(e) => out.problems.push(Problem::new(name, "overlay", e)),
            }
            out.annotations.insert(mac_annotation(v4).to_string(), None);
            continue;
        };
        let spec = VxlanSpec {
            name: name.to_string(),
            vni: ov.vni,
            port: ov.port,
            local: *local,
            link: link.index,
            mtu: link.mtu.saturating_sub(overhead(v4)),
            mac: vtep_mac(me, v4),
        };
        match ensure_device(nl, ov, &spec, my_cidrs, &mut out.changed) {
            Ok(index) => {
                devices.insert(v4, index);
                out.annotations.insert(
                    mac_annotation(v4).to_string(),
                    Some(crate::cni::config::format_mac(&spec.mac)),
                );
            }
            Err(e) => out.problems.push(Problem::new(name, "overlay", e)),
        }
    }

    let mut p = plan(ov, me, nodes, &u.connected, &devices);
    out.want = std::mem::take(&mut p.want);
    out.vxlan_peers = p.vxlan_peers;
    out.problems.append(&mut p.problems);
    let mut want_dev = p.devices;
    for (v4, dev) in &devices {
        let w = want_dev.remove(dev).unwrap_or_default();
        sync_entries(nl, device_name(*v4), *dev, &w, &mut out);
    }
    Ok(out)
}

/// The hops to every peer's pod CIDRs and what each overlay device must hold, from the nodes,
/// this node's connected subnets and its devices (underlay family → ifindex).
#[derive(Default)]
struct Plan {
    want: Want,
    devices: BTreeMap<u32, DeviceWant>,
    vxlan_peers: usize,
    problems: Vec<Problem>,
}

fn plan(
    ov: &Overlay,
    me: &str,
    nodes: &[NodeInfo],
    connected: &[IpNetwork],
    devices: &BTreeMap<bool, u32>,
) -> Plan {
    let mut out = Plan::default();
    for peer in nodes.iter().filter(|n| n.name != me) {
        let mut overlay_used = false;
        for cidr in &peer.pod_cidrs {
            let dst = IpNetwork::new(cidr.network(), cidr.prefix()).unwrap();
            let same_family = peer
                .internal_ips
                .iter()
                .find(|ip| ip.is_ipv4() == cidr.is_ipv4());
            let direct = match ov.routing {
                Routing::Direct => same_family,
                Routing::Vxlan => None,
                Routing::Auto => {
                    same_family.filter(|ip| connected.iter().any(|n| n.contains(**ip)))
                }
            };
            if let Some(gw) = direct {
                out.want.insert(
                    dst,
                    Hop {
                        gw: *gw,
                        dev: None,
                        node: peer.name.clone(),
                    },
                );
                continue;
            }
            if ov.routing == Routing::Direct {
                continue; // no InternalIP of that family: as before, no route
            }
            // The underlay: IPv4 when both have it, else IPv6.
            let Some((v4, remote, dev)) = [true, false].into_iter().find_map(|v4| {
                let dev = devices.get(&v4)?;
                let remote = peer.internal_ips.iter().find(|ip| ip.is_ipv4() == v4)?;
                Some((v4, *remote, *dev))
            }) else {
                out.problems.push(Problem::new(
                    &format!("route {dst}"),
                    "overlay",
                    format!(
                        "node {}: no InternalIP of a family this node's overlay has, so its pods \
                         ({dst}) cannot be reached",
                        peer.name
                    ),
                ));
                continue;
            };
            let mac = peer_mac(peer, v4);
            let vtep = dst.network();
            let d = out.devices.entry(dev).or_default();
            d.neighbours.insert(vtep, mac);
            d.fdb.insert(mac, remote);
            out.want.insert(
                dst,
                Hop {
                    gw: vtep,
                    dev: Some(dev),
                    node: peer.name.clone(),
                },
            );
            overlay_used = true;
        }
        out.vxlan_peers += usize::from(overlay_used);
    }
    out
}

/// Makes the device exist as `spec` says (re-made when its VNI, port, local address or link
/// differ), up, with this node's VTEP addresses. Returns its index.
fn ensure_device(
    nl: &mut Netlink,
    ov: &Overlay,
    spec: &VxlanSpec,
    my_cidrs: &[IpNetwork],
    changed: &mut Vec<String>,
) -> Result<u32> {
    let mut link = nl.link_by_name(&spec.name)?;
    if let Some(l) = &link {
        let keep = l.kind.as_deref() == Some("vxlan")
            && nl.vxlan_params(l.index)?.is_some_and(|p| spec.matches(&p));
        if !keep {
            nl.del_link_by_index(l.index)?;
            changed.push(format!("re-making {} (its parameters changed)", spec.name));
            link = None;
        }
    }
    let link = match link {
        Some(l) => l,
        None => {
            nl.create_vxlan(spec)?;
            changed.push(format!(
                "created {} (VNI {}, port {}, local {})",
                spec.name, spec.vni, spec.port, spec.local
            ));
            nl.link_by_name(&spec.name)?.ok_or_else(|| {
                Error::Internal(format!("{} missing right after creation", spec.name))
            })?
        }
    };
    // Read and set only when it differs: an operator's change of the flag applies to a
    // running device too.
    vxlan::set_tx_checksum(&spec.name, ov.checksum_offload)?;
    if link.mtu != spec.mtu {
        nl.set_mtu(link.index, spec.mtu)?;
    }
    if link.mac != spec.mac {
        nl.set_mac(link.index, &spec.mac)?;
    }
    if !link.up {
        nl.set_up(link.index)?;
    }
    // This node's VTEP addresses (the network address of each of its pod CIDRs): the source
    // of the node's own traffic to other nodes' pods.
    let want: BTreeSet<IpNetwork> = my_cidrs
        .iter()
        .map(|c| IpNetwork::new(c.network(), if c.is_ipv4() { 32 } else { 128 }).unwrap())
        .collect();
    let have = nl.addrs(link.index, None)?;
    for a in &have {
        let link_local =
            matches!(a.net.ip(), IpAddr::V6(v) if (v.segments()[0] & 0xffc0) == 0xfe80);
        if !link_local && !want.contains(&a.net) {
            nl.del_addr(link.index, a.net)?;
        }
    }
    for w in &want {
        if !have.iter().any(|a| a.net == *w) {
            nl.add_addr(link.index, *w, false)?;
        }
    }
    Ok(link.index)
}

/// Makes the permanent neighbour and forwarding entries of device `index` equal `w`.
fn sync_entries(nl: &mut Netlink, name: &str, index: u32, w: &DeviceWant, out: &mut Synced) {
    let mut failed: Vec<Problem> = vec![];
    let mut problem = |item: String, e: std::io::Error| {
        failed.push(Problem::new(&item, "overlay", format!("{name}: {e}")));
    };
    match nl.neighbours(index, false) {
        Err(e) => problem(
            format!("{name} entries"),
            std::io::Error::other(e.to_string()),
        ),
        Ok(have) => {
            for h in have.iter().filter(|h| h.permanent) {
                if !w.neighbours.contains_key(&h.ip)
                    && let Err(e) = nl.del_neighbour(index, h.ip)
                {
                    problem(format!("neighbour {} removal", h.ip), e);
                }
            }
            for (ip, mac) in &w.neighbours {
                let current = have
                    .iter()
                    .any(|h| h.permanent && h.ip == *ip && h.mac == mac);
                if !current {
                    match nl.set_neighbour(index, *ip, mac) {
                        Ok(()) => out.changed.push(format!(
                            "neighbour {ip} is {} on {name}",
                            crate::cni::config::format_mac(mac)
                        )),
                        Err(e) => problem(format!("neighbour {ip}"), e),
                    }
                }
            }
        }
    }
    match nl.neighbours(index, true) {
        Err(e) => problem(
            format!("{name} entries"),
            std::io::Error::other(e.to_string()),
        ),
        Ok(have) => {
            for h in &have {
                let wanted = <[u8; 6]>::try_from(h.mac.as_slice())
                    .ok()
                    .and_then(|m| w.fdb.get(&m))
                    == Some(&h.ip);
                if !wanted && let Err(e) = nl.del_fdb(index, &h.mac, h.ip) {
                    problem(
                        format!(
                            "forwarding entry {} removal",
                            crate::cni::config::format_mac(&h.mac)
                        ),
                        e,
                    );
                }
            }
            for (mac, dst) in &w.fdb {
                if !have.iter().any(|h| h.mac == mac && h.ip == *dst) {
                    match nl.set_fdb(index, mac, *dst) {
                        Ok(()) => out.changed.push(format!(
                            "forwarding entry {} -> {dst} on {name}",
                            crate::cni::config::format_mac(mac)
                        )),
                        Err(e) => problem(
                            format!("forwarding entry {}", crate::cni::config::format_mac(mac)),
                            e,
                        ),
                    }
                }
            }
        }
    }
    out.problems.append(&mut failed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_macs_are_stable_local_unicast_and_per_family() {
        let a = vtep_mac("node-a", true);
        assert_eq!(a, vtep_mac("node-a", true));
        assert_ne!(a, vtep_mac("node-a", false));
        assert_ne!(a, vtep_mac("node-b", true));
        assert_eq!(a[0] & 0x03, 0x02, "locally administered, unicast");
    }

    #[test]
    fn a_published_mac_wins_over_the_derived_one() {
        let mut n = NodeInfo {
            name: "x".into(),
            internal_ips: vec![],
            pod_cidrs: vec![],
            annotations: Default::default(),
        };
        assert_eq!(peer_mac(&n, true), vtep_mac("x", true));
        n.annotations
            .insert(mac_annotation(true).into(), "02:00:00:00:00:07".into());
        assert_eq!(peer_mac(&n, true), [2, 0, 0, 0, 0, 7]);
    }

    fn node(name: &str, ips: &[&str], cidrs: &[&str]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            internal_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            annotations: Default::default(),
        }
    }

    fn cluster() -> Vec<NodeInfo> {
        vec![
            node(
                "a",
                &["192.0.2.1", "2001:db8::1"],
                &["10.244.0.0/24", "fd00:0:0:0::/64"],
            ),
            node(
                "b",
                &["192.0.2.2", "2001:db8::2"],
                &["10.244.1.0/24", "fd00:0:0:1::/64"],
            ),
            node(
                "c",
                &["198.51.100.3"],
                &["10.244.2.0/24", "fd00:0:0:2::/64"],
            ),
        ]
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn with(routing: Routing) -> Overlay {
        Overlay {
            routing,
            ..Overlay::default()
        }
    }

    #[test]
    fn direct_routes_per_family_via_internal_ips() {
        let devices = BTreeMap::new();
        let p = plan(&with(Routing::Direct), "a", &cluster(), &[], &devices);
        assert_eq!(p.want.len(), 3, "{:?}", p.want);
        let b4 = &p.want[&net("10.244.1.0/24")];
        assert_eq!((b4.gw.to_string(), b4.dev), ("192.0.2.2".into(), None));
        assert_eq!(
            p.want[&net("fd00:0:0:1::/64")].gw.to_string(),
            "2001:db8::2"
        );
        assert_eq!(p.want[&net("10.244.2.0/24")].gw.to_string(), "198.51.100.3");
        // Node c has no IPv6 address: no v6 route to it, and nothing over an overlay.
        assert!(!p.want.contains_key(&net("fd00:0:0:2::/64")));
        assert!(p.devices.is_empty());
        assert_eq!(p.vxlan_peers, 0);
    }

    #[test]
    fn auto_goes_direct_on_a_shared_subnet_and_vxlan_elsewhere() {
        let devices = BTreeMap::from([(true, 7), (false, 8)]);
        let connected = [net("192.0.2.0/24"), net("2001:db8::/64")];
        let p = plan(&with(Routing::Auto), "a", &cluster(), &connected, &devices);
        let b4 = &p.want[&net("10.244.1.0/24")];
        assert_eq!((b4.gw.to_string(), b4.dev), ("192.0.2.2".into(), None));
        assert_eq!(p.want[&net("fd00:0:0:1::/64")].dev, None);
        // c is off-link: both its pod CIDRs over the IPv4 VXLAN device (c has only IPv4),
        // each via c's VTEP address (its CIDR's network address).
        let c4 = &p.want[&net("10.244.2.0/24")];
        assert_eq!((c4.gw.to_string(), c4.dev), ("10.244.2.0".into(), Some(7)));
        let c6 = &p.want[&net("fd00:0:0:2::/64")];
        assert_eq!(
            (c6.gw.to_string(), c6.dev),
            ("fd00:0:0:2::".into(), Some(7))
        );
        let d = &p.devices[&7];
        let mac = vtep_mac("c", true);
        assert_eq!(
            d.fdb.get(&mac).map(|i| i.to_string()),
            Some("198.51.100.3".into())
        );
        assert_eq!(d.neighbours.len(), 2);
        assert!(d.neighbours.values().all(|m| *m == mac));
        assert!(!p.devices.contains_key(&8));
        assert_eq!(p.vxlan_peers, 1);
        assert!(p.problems.is_empty());
    }

    #[test]
    fn vxlan_everywhere_and_a_peer_without_a_usable_family_is_a_problem() {
        // Only an IPv6 overlay device here: c (IPv4 only) cannot be reached.
        let devices = BTreeMap::from([(false, 8)]);
        let p = plan(&with(Routing::Vxlan), "a", &cluster(), &[], &devices);
        let b4 = &p.want[&net("10.244.1.0/24")];
        assert_eq!((b4.gw.to_string(), b4.dev), ("10.244.1.0".into(), Some(8)));
        assert_eq!(
            p.devices[&8].fdb[&vtep_mac("b", false)].to_string(),
            "2001:db8::2"
        );
        assert!(!p.want.contains_key(&net("10.244.2.0/24")));
        assert_eq!(p.problems.len(), 2, "{:?}", p.problems);
        assert_eq!(p.vxlan_peers, 1);
    }
}

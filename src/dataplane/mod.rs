//! The pod network on the node: the bridge, one veth pair per attachment, the pod interface's
//! addresses and routes, and the sysctls they need. Knows nothing of CNI JSON.

pub mod netlink;
pub mod sysctl;
pub mod tc;
pub mod vxlan;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use sha2::{Digest, Sha256};

pub use netlink::{Link, Netlink, RouteOp, RouteSpec};

use crate::error::{Error, Result};
use crate::netns::NetNs;

/// The MTU used when neither the config nor the node's default route gives one.
pub const FALLBACK_MTU: u32 = 1500;

/// The deterministic host-side veth name of an attachment: `pon` + 12 hex digits of
/// SHA-256(container id, ifname). DEL and GC find it with no state, and its absence proves an
/// attachment is gone.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h = Sha256::new();
    h.update(container_id.as_bytes());
    h.update([0]);
    h.update(ifname.as_bytes());
    let d = h.finalize();
    let hex: String = d.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("pon{hex}")
}

/// A stable, locally administered MAC for a bridge, derived from its name, so the bridge does not
/// adopt (and flap between) its ports' MACs.
pub fn bridge_mac(name: &str) -> [u8; 6] {
    let d = Sha256::digest(name.as_bytes());
    [0x02 | (d[0] & 0xfc), d[1], d[2], d[3], d[4], d[5]]
}

pub struct BridgeSpec<'a> {
    pub name: &'a str,
    /// MTU for a bridge created now; `None` = the node's default-route interface MTU.
    pub mtu: Option<u32>,
    pub promisc: bool,
    /// Gateway addresses (with prefix) to hold when the network is a gateway.
    pub gateways: Vec<IpNetwork>,
    pub force_address: bool,
    /// VLAN filtering on (`vlan` or `vlanTrunk` is used).
    pub vlan_filtering: bool,
    /// With a gateway: the VLAN the gateway serves (on a `<bridge>.<vid>` VLAN device of the
    /// bridge, as the reference does), 0 for the bridge itself.
    pub gateway_vlan: u16,
}

/// The bridge and the link that holds the gateway (the bridge, or its VLAN device).
pub struct Bridge {
    pub link: Link,
    pub gateway: Option<Link>,
}

/// Ensures the bridge exists, is a bridge, is up, filters VLANs when asked, and holds the
/// gateway addresses (on its VLAN device with `gateway_vlan`).
pub fn ensure_bridge(nl: &mut Netlink, spec: &BridgeSpec) -> Result<Bridge> {
    let mut link = nl.link_by_name(spec.name)?;
    let mut created = false;
    if link.is_none() {
        let mtu = match spec.mtu {
            Some(m) => m,
            None => default_route_mtu(nl)?.unwrap_or(FALLBACK_MTU),
        };
        // EEXIST means a concurrent ADD made it first: fine, it is re-read below.
        if nl.create_bridge(spec.name, mtu, bridge_mac(spec.name))? {
            created = true;
            log::info!("created bridge {} (mtu {mtu})", spec.name);
            sysctl::set_if_exists(&format!("net/ipv6/conf/{}/accept_ra", spec.name), "0");
            // Its link-local address is usable at once rather than after a second of DAD:
            // until then the node sends no neighbour solicitation on the bridge for IPv6
            // packets it forwards to pods (from other nodes, from outside), so those are lost.
            // Its gateway addresses are added without DAD for the same reason.
            sysctl::set_if_exists(&format!("net/ipv6/conf/{}/accept_dad", spec.name), "0");
        }
        link = nl.link_by_name(spec.name)?;
    }
    let link = link.ok_or_else(|| {
        Error::netlink(
            format!("bridge {} vanished while being set up", spec.name),
            std::io::Error::from_raw_os_error(libc::ENODEV),
        )
    })?;
    if link.kind.as_deref() != Some("bridge") {
        return Err(Error::config(format!(
            "a link named {:?} exists but is a {} not a bridge; set `bridge` to another name or \
             remove that link",
            spec.name,
            link.kind.as_deref().unwrap_or("device of unknown kind")
        )));
    }
    if !link.up {
        nl.set_up(link.index)?;
    }
    if spec.promisc {
        nl.set_promisc(link.index)?;
    }
    if spec.vlan_filtering
        && let Err(e) = nl.set_vlan_filtering(link.index)
    {
        // A bridge this ADD made and cannot use is not left behind.
        if created {
            let _ = nl.del_link_by_index(link.index);
        }
        return Err(e);
    }
    if spec.gateways.is_empty() {
        return Ok(Bridge {
            link,
            gateway: None,
        });
    }
    let gw = if spec.gateway_vlan != 0 {
        let name = format!("{}.{}", spec.name, spec.gateway_vlan);
        if nl.create_vlan(&name, link.index, spec.gateway_vlan)? {
            // The bridge itself carries the VLAN to its VLAN device.
            nl.bridge_vlans(link.index, true, true, &[(spec.gateway_vlan, false)])?;
            sysctl::set_if_exists(&format!("net/ipv6/conf/{name}/accept_ra"), "0");
        }
        nl.link_by_name(&name)?.ok_or_else(|| {
            Error::Internal(format!("VLAN device {name} missing right after creation"))
        })?
    } else {
        link.clone()
    };
    ensure_gateway_addrs(nl, &gw, spec)?;
    Ok(Bridge {
        link,
        gateway: Some(gw),
    })
}

fn ensure_gateway_addrs(nl: &mut Netlink, br: &Link, spec: &BridgeSpec) -> Result<()> {
    let existing = nl.addrs(br.index, None)?;
    let mut added = false;
    for gw in &spec.gateways {
        if existing.iter().any(|a| a.net.ip() == gw.ip()) {
            continue;
        }
        // As the reference: one IPv4 address per bridge; IPv6 only conflicts when overlapping.
        for a in existing.iter().filter(|a| a.net.is_ipv4() == gw.is_ipv4()) {
            let conflict = gw.is_ipv4() || a.net.contains(gw.ip()) || gw.contains(a.net.ip());
            if !conflict || a.net.ip().is_ipv6() && is_link_local(a.net.ip()) {
                continue;
            }
            if spec.force_address {
                nl.del_addr(br.index, a.net)?;
            } else {
                return Err(Error::config(format!(
                    "bridge {} already has address {} (not {gw}); set `forceAddress: true` to \
                     replace it, or use another bridge",
                    br.name, a.net
                )));
            }
        }
        match nl.add_addr(br.index, *gw, false) {
            Ok(()) => added = true,
            // A concurrent ADD added it.
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    if added {
        // Pin the MAC (the kernel otherwise follows the lowest port MAC) on bridges created by
        // something else, as the reference does on this path.
        nl.set_mac(br.index, &br.mac)?;
    }
    Ok(())
}

fn is_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// MTU of the interface carrying the node's IPv4 (else IPv6) default route.
pub fn default_route_mtu(nl: &mut Netlink) -> Result<Option<u32>> {
    for v4 in [true, false] {
        let routes = nl.routes(v4)?;
        if let Some(oif) = routes
            .iter()
            .filter(|r| r.dst.prefix() == 0 && r.table == Some(254))
            .find_map(|r| r.oif)
            && let Some(l) = nl.link_by_index(oif)?
        {
            return Ok(Some(l.mtu));
        }
    }
    Ok(None)
}

/// What the pod end gets.
pub struct PodSpec<'a> {
    pub ifname: &'a str,
    pub mac: Option<[u8; 6]>,
    pub addrs: Vec<IpNetwork>,
    pub routes: Vec<RouteSpec>,
    /// IPv6 duplicate address detection (off by default: it delays pod start by seconds).
    pub dad: bool,
    pub mtu: u32,
    /// `false` leaves the pod interface down (`disableContainerInterface`).
    pub up: bool,
    /// Shaping of what the pod sends (a TBF on its end's egress).
    pub egress: Option<tc::Shape>,
}

/// How the host end sits on the bridge.
#[derive(Debug, Default, Clone)]
pub struct PortSpec {
    pub hairpin: bool,
    /// `portIsolation`: isolated ports cannot talk to each other, only to the rest.
    pub isolated: bool,
    /// The port's VLAN (PVID, untagged), 0 for none.
    pub vlan: u16,
    /// VLANs the port carries tagged (`vlanTrunk`).
    pub trunk: Vec<u16>,
    /// Keep VLAN 1 on the port when `vlan` or `trunk` are set.
    pub preserve_default_vlan: bool,
    /// Shaping of what goes to the pod (a TBF on the host end's egress).
    pub ingress: Option<tc::Shape>,
}

/// The two ends of an attachment after setup.
pub struct Attached {
    pub host: Link,
    pub pod: Link,
}

/// Creates the veth pair (pod end born inside `netns` under its final name, host end on the
/// bridge and up), configures the pod end, waits until the bridge port forwards and announces
/// the addresses. On error the pair is deleted again.
pub fn attach(
    host_nl: &mut Netlink,
    bridge: &Link,
    netns: &NetNs,
    host_name: &str,
    port: &PortSpec,
    spec: &PodSpec,
) -> Result<Attached> {
    create_veth(host_nl, bridge, netns, host_name, spec)?;
    let r = configure(host_nl, netns, host_name, port, spec);
    if r.is_err() {
        let _ = host_nl.del_link_by_name(host_name);
    }
    r
}

fn create_veth(
    host_nl: &mut Netlink,
    bridge: &Link,
    netns: &NetNs,
    host_name: &str,
    spec: &PodSpec,
) -> Result<()> {
    let v = netlink::VethSpec {
        host_name,
        peer_name: spec.ifname,
        peer_netns: netns.fd(),
        mtu: spec.mtu,
        peer_mac: spec.mac,
        master: bridge.index,
    };
    match host_nl.create_veth(&v) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            // Our host end from an earlier ADD of this attachment (replace it: its pod end goes
            // with it), or CNI_IFNAME is taken inside the pod: by the pod end of a retired pair
            // (a released attachment whose netns the runtime kept: delete it), or by something
            // else (the retry fails). With nothing of ours found, the retry is still made: the
            // reaper may have deleted a retired pair between the refusal and the look.
            if host_nl.del_link_by_name(host_name)? {
                log::info!("replaced the existing veth {host_name} of this attachment");
            } else {
                remove_retired_pod_end(host_nl, netns, spec.ifname)?;
            }
            host_nl
                .create_veth(&v)
                .map_err(|e| veth_error(e, spec.ifname, netns))
        }
        Err(e) => Err(veth_error(e, spec.ifname, netns)),
    }
}

/// Deletes `ifname` in the pod if it is the pod end of a retired pontoon veth pair (host end
/// named `pon…`, down and on no bridge): what a DEL leaves until the netns goes or the reaper
/// runs. `Ok(false)` when it is anything else.
fn remove_retired_pod_end(host_nl: &mut Netlink, netns: &NetNs, ifname: &str) -> Result<bool> {
    let mut pod_nl = netns.run(Netlink::new)?;
    let Some(pod) = pod_nl.link_by_name(ifname)? else {
        return Ok(false);
    };
    let Some(peer) = pod
        .peer_index
        .filter(|_| pod.kind.as_deref() == Some("veth"))
    else {
        return Ok(false);
    };
    match host_nl.link_by_index(peer)? {
        Some(h) if h.name.starts_with("pon") && !h.up && h.master.is_none() => {
            log::info!(
                "deleting the retired pair {}/{ifname} left in the pod",
                h.name
            );
            host_nl.del_link_by_index(h.index)
        }
        _ => Ok(false),
    }
}

fn veth_error(e: std::io::Error, ifname: &str, netns: &NetNs) -> Error {
    if e.raw_os_error() == Some(libc::EEXIST) {
        Error::netlink(
            format!(
                "an interface named {ifname} already exists in {}; choose another CNI_IFNAME",
                netns.path().display()
            ),
            e,
        )
    } else {
        Error::netlink("cannot create the veth pair", e)
    }
}

/// The host end's bridge-port settings: options, VLANs, shaping toward the pod.
fn configure_port(host_nl: &mut Netlink, host: &Link, port: &PortSpec) -> Result<()> {
    if port.hairpin || port.isolated {
        host_nl.set_port_options(host.index, port.hairpin, port.isolated)?;
    }
    if port.vlan != 0 || !port.trunk.is_empty() {
        if !port.preserve_default_vlan {
            host_nl.bridge_vlans(host.index, false, false, &[(1, false)])?;
        }
        if port.vlan != 0 {
            host_nl.bridge_vlans(host.index, false, true, &[(port.vlan, true)])?;
        }
        let trunk: Vec<(u16, bool)> = port.trunk.iter().map(|v| (*v, false)).collect();
        host_nl.bridge_vlans(host.index, false, true, &trunk)?;
    }
    if let Some(s) = &port.ingress {
        shape(host_nl, host.index, s)?;
    }
    Ok(())
}

/// Installs a root TBF on the link.
fn shape(nl: &mut Netlink, index: u32, s: &tc::Shape) -> Result<()> {
    let (kind, body) = tc::tbf(index, s);
    nl.raw(kind, 0x400 | 0x200, &body) // NLM_F_CREATE | NLM_F_EXCL
        .map(|_| ())
        .map_err(|e| Error::netlink(format!("cannot shape link #{index} (tbf)"), e))
}

/// The rate of a link's root TBF, if it has one.
pub fn shaped_rate(nl: &mut Netlink, index: u32) -> Result<Option<u64>> {
    let (kind, body) = tc::qdisc_dump();
    let msgs = nl
        .raw(kind, 0x300, &body) // NLM_F_DUMP
        .map_err(|e| Error::netlink("cannot list qdiscs", e))?;
    Ok(msgs.iter().find_map(|m| tc::root_tbf_rate(m, index)))
}

fn configure(
    host_nl: &mut Netlink,
    netns: &NetNs,
    host_name: &str,
    port: &PortSpec,
    spec: &PodSpec,
) -> Result<Attached> {
    let host = host_nl
        .link_by_name(host_name)?
        .ok_or_else(|| Error::Internal(format!("veth {host_name} missing right after creation")))?;
    configure_port(host_nl, &host, port)?;
    sysctl::set_if_exists(&format!("net/ipv6/conf/{host_name}/accept_ra"), "0");
    let has_v4 = spec.addrs.iter().any(|a| a.is_ipv4());
    let has_v6 = spec.addrs.iter().any(|a| a.is_ipv6());
    let ifname = spec.ifname.to_string();
    // Everything that must be opened or written inside the pod namespace, in one visit.
    let mut pod_nl = netns.run(|| {
        // Announce addresses on a MAC (re)set: see `announce` below.
        if has_v4 {
            sysctl::set_if_exists(&format!("net/ipv4/conf/{ifname}/arp_notify"), "1");
        }
        if has_v6 {
            sysctl::set_if_exists("net/ipv6/conf/lo/disable_ipv6", "0");
            sysctl::set_if_exists(&format!("net/ipv6/conf/{ifname}/disable_ipv6"), "0");
            sysctl::set_if_exists(&format!("net/ipv6/conf/{ifname}/ndisc_notify"), "1");
        }
        Netlink::new()
    })?;
    let pod = pod_nl.link_by_name(spec.ifname)?.ok_or_else(|| {
        Error::Internal(format!(
            "{} missing in the pod right after creation",
            spec.ifname
        ))
    })?;
    if let Some(lo) = pod_nl.link_by_name("lo")?
        && !lo.up
    {
        pod_nl.set_up(lo.index)?;
    }
    for a in &spec.addrs {
        match pod_nl.add_addr(pod.index, *a, spec.dad) {
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            r => r?,
        }
    }
    if let Some(s) = &spec.egress {
        shape(&mut pod_nl, pod.index, s)?;
    }
    if !spec.up {
        // Left down: no carrier, so the bridge port never forwards; nothing to wait for.
        let host = host_nl.link_by_index(host.index)?.unwrap_or(host);
        return Ok(Attached { host, pod });
    }
    pod_nl.set_up(pod.index)?;
    for r in &spec.routes {
        let mut r = r.clone();
        r.oif = Some(pod.index);
        pod_nl.add_route(&r)?;
    }
    // The final state of the host end (the kernel may change its MAC while enslaving it).
    let host = wait_port_forwarding(host_nl, &host)?;
    if spec.dad && has_v6 {
        wait_dad(&mut pod_nl, pod.index)?;
    }
    if !spec.addrs.is_empty() {
        announce(&mut pod_nl, &pod);
    }
    Ok(Attached { host, pod })
}

/// Makes the pod's neighbours (the node, other pods) learn its MAC at once, so a recycled
/// address is reachable without waiting for stale ARP/ND entries to expire (the reference's
/// link-up `arp_notify` fires before the bridge port forwards and is lost: see
/// containernetworking/plugins#858). Re-setting the MAC to its own value raises
/// NETDEV_CHANGEADDR, on which the kernel sends a gratuitous ARP (`arp_notify`) and an
/// unsolicited neighbour advertisement (`ndisc_notify`) from the pod interface. Raw packet
/// sockets would do the same but cost a `synchronize_net()` (13-30 ms here) when closed.
fn announce(pod_nl: &mut Netlink, pod: &Link) {
    if let Err(e) = pod_nl.set_mac(pod.index, &pod.mac) {
        log::warn!("could not announce the addresses of {}: {e}", pod.name);
    }
}

/// Waits (bounded) until the host end is operationally up, i.e. the bridge port forwards, so the
/// first packet after ADD gets through.
fn wait_port_forwarding(nl: &mut Netlink, host: &Link) -> Result<Link> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut pause = Duration::from_micros(200);
    loop {
        if let Some(l) = nl.link_by_index(host.index)?
            && l.oper_up
        {
            return Ok(l);
        }
        if Instant::now() >= deadline {
            return Err(Error::netlink(
                format!("bridge port {} did not come up within 3 s", host.name),
                std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn wait_dad(nl: &mut Netlink, index: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let addrs = nl.addrs(index, None)?;
        if let Some(a) = addrs.iter().find(|a| a.dad_failed) {
            return Err(Error::AddressUnavailable(format!(
                "duplicate address detection failed for {}: another host uses it",
                a.net
            )));
        }
        if !addrs
            .iter()
            .any(|a| a.tentative && a.net.is_ipv6() && !is_link_local(a.net.ip()))
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::TryAgainLater(
                "IPv6 duplicate address detection did not finish within 5 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deletes the attachment's veth pair by its host name (the pod end goes with it). `Ok(false)`
/// when it is already gone.
pub fn detach(nl: &mut Netlink, host_name: &str) -> Result<bool> {
    nl.del_link_by_name(host_name)
}

/// Deletes `ifname` inside `netns` if it is a veth: the fallback for attachments whose host end
/// pontoon did not name (made by another plugin).
pub fn detach_in_pod(netns: &NetNs, ifname: &str) -> Result<bool> {
    let mut nl = netns.run(Netlink::new)?;
    match nl.link_by_name(ifname)? {
        Some(l) if l.kind.as_deref() == Some("veth") => nl.del_link_by_name(ifname),
        _ => Ok(false),
    }
}

/// Turns on IPv4 / IPv6 forwarding in the node namespace if it is off.
pub fn enable_forwarding(v4: bool, v6: bool) -> Result<()> {
    if v4 {
        sysctl::ensure("net/ipv4/ip_forward", "1")?;
    }
    if v6 {
        sysctl::ensure("net/ipv6/conf/all/forwarding", "1")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_deterministic_and_short() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(host_veth_name("ab", "ceth0"), host_veth_name("abc", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("pon"));
    }

    #[test]
    fn bridge_mac_is_unicast_local() {
        let m = bridge_mac("cni0");
        assert_eq!(m[0] & 1, 0);
        assert_eq!(m[0] & 2, 2);
        assert_eq!(m, bridge_mac("cni0"));
    }
}

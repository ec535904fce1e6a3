//! hostPort: the `portMappings` capability, natively, in pontoon's nftables table.
//!
//! Per network, created once (and re-created if missing, checked with one netlink request):
//! four maps keyed by what a packet arrives on, `hp4a`/`hp6a` (any local address:
//! `proto . port`) and `hp4i`/`hp6i` (one host address: `addr . proto . port`), all mapping to
//! `pod address . pod port`; a chain DNATing through them, jumped to for locally destined
//! traffic from prerouting (outside, other pods) and output (the node itself, `127.0.0.1`); and a
//! postrouting chain masquerading DNATed traffic from localhost or from the pod subnets (so a pod
//! reaching its own or a neighbour's hostPort gets the replies). Adding or removing one pod's
//! mappings is one small batch of map elements. Each attachment's mappings are part of its
//! record ([`crate::attachment`]), so DEL (even without netns or prevResult), GC, stale
//! reclaim and CHECK know them, and conflicts are found before anything is installed.

pub mod conntrack;

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ipam::Owner;
use crate::masquerade::nftables::TABLE;
use crate::nft::expr::{self, Expr, Verdict};
use crate::nft::{BaseChain, Batch, Chain, Conn, Hook, NFPROTO_INET, Rule, SetSpec};

/// One `runtimeConfig.portMappings` entry. containerd (go-cni) sends Go's field names
/// (`HostPort`, ...), CRI-O and the spec camelCase; the Go plugins accept both because Go's
/// JSON decoding ignores case, so pontoon accepts both too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    #[serde(alias = "HostPort", alias = "hostport")]
    pub host_port: u16,
    #[serde(alias = "ContainerPort", alias = "containerport")]
    pub container_port: u16,
    #[serde(default = "tcp", alias = "Protocol")]
    pub protocol: String,
    #[serde(
        default,
        rename = "hostIP",
        alias = "HostIP",
        alias = "hostIp",
        alias = "hostip"
    )]
    pub host_ip: String,
}

fn tcp() -> String {
    "tcp".into()
}

/// One map element: what arrives where, and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Element {
    /// `None` = any local address.
    pub host_ip: Option<IpAddr>,
    pub protocol: String,
    pub host_port: u16,
    pub pod_ip: IpAddr,
    pub pod_port: u16,
}

impl Element {
    fn v4(&self) -> bool {
        self.pod_ip.is_ipv4()
    }

    fn map(&self, h: &str) -> String {
        let fam = if self.v4() { "4" } else { "6" };
        let kind = if self.host_ip.is_some() { "i" } else { "a" };
        format!("hp{fam}{kind}_{h}")
    }

    /// Two elements claim the same traffic: same family, protocol and port, and the same host
    /// address or either bound to all.
    fn conflicts(&self, o: &Element) -> bool {
        self.v4() == o.v4()
            && self.protocol == o.protocol
            && self.host_port == o.host_port
            && (self.host_ip.is_none() || o.host_ip.is_none() || self.host_ip == o.host_ip)
    }
}

/// Expands the runtime's mappings over the pod's addresses (one element per matching family).
pub fn elements(mappings: &[PortMapping], pod_ips: &[IpAddr]) -> Result<Vec<Element>> {
    let mut out = Vec::new();
    for m in mappings {
        let proto = m.protocol.to_ascii_lowercase();
        if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
            return Err(Error::config(format!(
                "portMappings: protocol {:?} is not tcp, udp or sctp",
                m.protocol
            )));
        }
        if m.host_port == 0 || m.container_port == 0 {
            return Err(Error::config(format!(
                "portMappings: hostPort and containerPort must be 1-65535 ({m:?})"
            )));
        }
        let host_ip: Option<IpAddr> = match m.host_ip.as_str() {
            "" => None,
            s => {
                let ip: IpAddr = s.parse().map_err(|_| {
                    Error::config(format!("portMappings: hostIP {s:?} is not an IP address"))
                })?;
                (!ip.is_unspecified()).then_some(ip)
            }
        };
        let families: Vec<&IpAddr> = pod_ips
            .iter()
            .filter(|p| host_ip.is_none_or(|h| h.is_ipv4() == p.is_ipv4()))
            .collect();
        if families.is_empty() {
            return Err(Error::config(format!(
                "portMappings: hostIP {} has no pod address of its family",
                m.host_ip
            )));
        }
        for p in families {
            out.push(Element {
                host_ip,
                protocol: proto.clone(),
                host_port: m.host_port,
                pod_ip: *p,
                pod_port: m.container_port,
            });
        }
    }
    Ok(out)
}

fn net_hash(network: &str) -> String {
    crate::masquerade::RuleSet::new(network, &[], &[]).network_hash()
}

/// The first conflict between `mine` and the mappings of other attachments, as an error naming
/// the holder.
pub fn find_conflict<'a>(
    mine: &[Element],
    others: impl IntoIterator<Item = (&'a Owner, &'a [Element])>,
) -> Result<()> {
    for (who, theirs) in others {
        if let Some((a, b)) = mine
            .iter()
            .find_map(|e| theirs.iter().find(|t| e.conflicts(t)).map(|t| (e, t)))
        {
            return Err(Error::AddressUnavailable(format!(
                "hostPort {}/{} on {} is already mapped to {} by {who}",
                a.host_port,
                a.protocol,
                a.host_ip
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "all addresses".into()),
                b.pod_ip
            )));
        }
    }
    Ok(())
}

/// A network's hostPort objects in the kernel: four maps keyed by what a packet arrives on
/// (`hp4a`/`hp6a`: any local address, `proto . port`; `hp4i`/`hp6i`: one host address,
/// `addr . proto . port`), all to `pod address . pod port`; chain `hp_<h>` DNATs through them
/// and is jumped to for locally destined traffic from prerouting (outside, other pods) and
/// output (the node itself, `127.0.0.1`); `hp_post_<h>` masquerades DNATed traffic from
/// localhost and from the pod subnets (so replies come back through the node); and, with IPv4,
/// the martian guard `hp_guard_<h>`: `route_localnet` lets the node's `127.0.0.1` be DNATed out
/// through the bridge, so packets from the bridge to 127.0.0.0/8 that no mapping DNATed are
/// dropped (the CVE-2020-8558 class; kube-proxy's own guard may or may not be there). Which
/// mappings exist is the attachment records' business; callers hold the pool lock while they
/// change elements.
pub struct HostPorts<'a> {
    pub network: &'a str,
    pub bridge: &'a str,
    /// The pod subnets of the network.
    pub subnets: Vec<IpNetwork>,
}

/// The maps: name prefix, key type and length, data type and length.
fn map_specs(h: &str) -> Vec<SetSpec> {
    use crate::nft::types::*;
    let m = |n: &str, key: &[u32], key_len: u32, data: &[u32], data_len: u32| SetSpec {
        name: format!("{n}_{h}"),
        flags: crate::nft::NFT_SET_MAP,
        key_type: concat(key),
        key_len,
        data: Some((concat(data), data_len)),
        fields: vec![],
    };
    vec![
        m(
            "hp4a",
            &[INET_PROTOCOL, INET_SERVICE],
            8,
            &[IPADDR, INET_SERVICE],
            8,
        ),
        m(
            "hp4i",
            &[IPADDR, INET_PROTOCOL, INET_SERVICE],
            12,
            &[IPADDR, INET_SERVICE],
            8,
        ),
        m(
            "hp6a",
            &[INET_PROTOCOL, INET_SERVICE],
            8,
            &[IP6ADDR, INET_SERVICE],
            20,
        ),
        m(
            "hp6i",
            &[IP6ADDR, INET_PROTOCOL, INET_SERVICE],
            24,
            &[IP6ADDR, INET_SERVICE],
            20,
        ),
    ]
}

/// `dnat ip[6] to [ip daddr .] meta l4proto . th dport map @MAP`.
fn dnat_rule(v4: bool, by_addr: bool, map: String) -> Rule {
    let mut e = expr::nfproto(v4);
    let mut next = expr::REG_1;
    if by_addr {
        e.push(expr::daddr(v4, next));
        next = expr::reg_after(next, if v4 { 4 } else { 16 });
    }
    e.extend(expr::l4proto_dport(next));
    e.push(Expr::Lookup {
        set: map,
        sreg: expr::REG_1,
        dreg: Some(expr::REG_1),
        invert: false,
    });
    e.push(Expr::Dnat {
        v4,
        addr: expr::REG_1,
        proto: Some(expr::reg_after(expr::REG_1, if v4 { 4 } else { 16 })),
    });
    Rule::new(e)
}

impl HostPorts<'_> {
    fn hash(&self) -> String {
        net_hash(self.network)
    }

    /// The network's maps and chains.
    pub fn objects(&self) -> (Vec<SetSpec>, Vec<Chain>) {
        let h = self.hash();
        let hp = format!("hp_{h}");
        let nat = |hook, priority| {
            Some(BaseChain {
                kind: "nat",
                hook,
                priority,
            })
        };
        let jump = || {
            let mut e = expr::daddr_is_local();
            e.push(Expr::Verdict(Verdict::Jump(hp.clone())));
            vec![Rule::new(e)]
        };
        let mut post = vec![{
            let mut e = expr::ct_status(expr::IPS_DST_NAT, true);
            e.extend(expr::addr_in(true, "127.0.0.0/8".parse().unwrap()));
            e.push(Expr::Masquerade);
            Rule::new(e)
        }];
        for n in &self.subnets {
            let mut e = expr::ct_status(expr::IPS_DST_NAT, true);
            e.extend(expr::ifname(true, self.bridge));
            e.extend(expr::addr_in(true, *n));
            e.push(Expr::Masquerade);
            post.push(Rule::new(e));
        }
        let mut chains = vec![
            Chain {
                name: hp.clone(),
                base: None,
                rules: vec![
                    dnat_rule(true, true, format!("hp4i_{h}")),
                    dnat_rule(true, false, format!("hp4a_{h}")),
                    dnat_rule(false, true, format!("hp6i_{h}")),
                    dnat_rule(false, false, format!("hp6a_{h}")),
                ],
            },
            Chain {
                name: format!("hp_pre_{h}"),
                base: nat(Hook::Prerouting, -100),
                rules: jump(),
            },
            Chain {
                name: format!("hp_out_{h}"),
                base: nat(Hook::Output, -100),
                rules: jump(),
            },
            Chain {
                name: format!("hp_post_{h}"),
                base: nat(Hook::Postrouting, 100),
                rules: post,
            },
        ];
        if self.subnets.iter().any(IpNetwork::is_ipv4) {
            let mut e = expr::ifname(false, self.bridge);
            e.extend(expr::addr_in(false, "127.0.0.0/8".parse().unwrap()));
            e.extend(expr::ct_status(expr::IPS_DST_NAT, false));
            e.push(Expr::Verdict(Verdict::Drop));
            chains.push(Chain {
                name: format!("hp_guard_{h}"),
                base: Some(BaseChain {
                    kind: "filter",
                    hook: Hook::Input,
                    priority: 0,
                }),
                rules: vec![Rule::new(e).with_comment("pontoon: martian guard for route_localnet")],
            });
        }
        (map_specs(&h), chains)
    }

    /// The sysctl the node's own `127.0.0.1` needs to be DNATed out through the bridge (the
    /// guard above comes with it). A read when it is set; nothing while the bridge does not
    /// exist yet (the first ADD makes it and comes here).
    pub fn ensure_route_localnet(&self) -> Result<()> {
        if !self.subnets.iter().any(IpNetwork::is_ipv4) {
            return Ok(());
        }
        match crate::dataplane::sysctl::ensure(
            &format!("net/ipv4/conf/{}/route_localnet", self.bridge),
            "1",
        ) {
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }

    /// Adds the installation of the base objects and of `els` (the maps' whole content) to a
    /// batch.
    pub fn install(&self, batch: &mut Batch, els: &[Element]) {
        let (sets, chains) = self.objects();
        batch.install(NFPROTO_INET, TABLE, &sets, &chains);
        for s in &sets {
            batch.flush_set(NFPROTO_INET, TABLE, &s.name);
        }
        add_elements(batch, self.network, els);
    }

    /// CHECK: every element in `els` is installed with its data.
    pub fn check(&self, conn: &mut Conn, els: &[Element]) -> Result<()> {
        for (map, group) in by_map(self.network, els) {
            let have = conn
                .elements(NFPROTO_INET, TABLE, &map)?
                .unwrap_or_default();
            for e in group {
                if !have.contains(&(key(e), Some(value(e)))) {
                    return Err(Error::CheckFailed(format!(
                        "hostPort {}/{} -> {}:{} is not installed",
                        e.host_port, e.protocol, e.pod_ip, e.pod_port
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether the maps hold exactly `els` (the agent's full check).
    pub fn elements_match(&self, conn: &mut Conn, els: &[Element]) -> Result<bool> {
        let (sets, _) = self.objects();
        let want = by_map(self.network, els);
        for s in sets {
            let mut have = conn
                .elements(NFPROTO_INET, TABLE, &s.name)?
                .unwrap_or_default();
            let mut w: Vec<(Vec<u8>, Option<Vec<u8>>)> = want
                .iter()
                .filter(|(m, _)| *m == s.name)
                .flat_map(|(_, g)| g.iter().map(|e| (key(e), Some(value(e)))))
                .collect();
            have.sort();
            w.sort();
            if have != w {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The elements grouped by the map of `network` they go in.
fn by_map<'e>(network: &str, els: &'e [Element]) -> Vec<(String, Vec<&'e Element>)> {
    let h = net_hash(network);
    let mut out: Vec<(String, Vec<&Element>)> = Vec::new();
    for e in els {
        let m = e.map(&h);
        match out.iter_mut().find(|(n, _)| *n == m) {
            Some((_, g)) => g.push(e),
            None => out.push((m, vec![e])),
        }
    }
    out
}

/// Adds `els` of `network` to a batch.
pub fn add_elements(batch: &mut Batch, network: &str, els: &[Element]) {
    for (map, group) in by_map(network, els) {
        let kv: Vec<(Vec<u8>, Option<Vec<u8>>)> =
            group.iter().map(|e| (key(e), Some(value(e)))).collect();
        batch.add_elements(NFPROTO_INET, TABLE, &map, &kv);
    }
}

/// Deletes `els` of `network`, those already gone (a flushed ruleset) included: each element
/// is its own transaction, so one missing element does not keep the others.
pub fn remove(conn: &mut Conn, network: &str, els: &[Element]) -> Result<()> {
    for (map, group) in by_map(network, els) {
        for e in group {
            let mut b = Batch::new();
            b.del_elements(NFPROTO_INET, TABLE, &map, &[key(e)]);
            conn.commit_missing_ok(&b)?;
        }
    }
    Ok(())
}

fn proto_num(p: &str) -> u8 {
    match p {
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        _ => 0,
    }
}

fn push_addr(v: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => v.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => v.extend_from_slice(&a.octets()),
    }
}

/// A port as a concatenation field: 2 bytes in network order, padded to its 4-byte register.
fn push_port(v: &mut Vec<u8>, port: u16) {
    v.extend_from_slice(&port.to_be_bytes());
    v.extend_from_slice(&[0, 0]);
}

/// The element's key: `[addr .] proto . port`, each field padded to a 4-byte register
/// (`inet_proto` 1 byte, `inet_service` 2, `ipv4_addr` 4, `ipv6_addr` 16).
pub fn key(e: &Element) -> Vec<u8> {
    let mut k = Vec::new();
    if let Some(ip) = e.host_ip {
        push_addr(&mut k, ip);
    }
    k.extend_from_slice(&[proto_num(&e.protocol), 0, 0, 0]);
    push_port(&mut k, e.host_port);
    k
}

/// The element's value: `pod addr . pod port`.
pub fn value(e: &Element) -> Vec<u8> {
    let mut v = Vec::new();
    push_addr(&mut v, e.pod_ip);
    push_port(&mut v, e.pod_port);
    v
}

/// Deletes the UDP conntrack entries of the mapped ports, so a UDP flow does not stick to a
/// pod that is gone (best effort: a failure is logged).
pub fn flush_udp(els: &[Element]) {
    let udp: Vec<&Element> = els.iter().filter(|e| e.protocol == "udp").collect();
    let ports: Vec<u16> = udp.iter().map(|e| e.host_port).collect();
    let v4 = udp.iter().any(|e| e.v4());
    let v6 = udp.iter().any(|e| !e.v4());
    match conntrack::flush_udp_ports(&ports, v4, v6) {
        Ok(0) => {}
        Ok(n) => log::info!("flushed {n} stale UDP conntrack entries for hostPorts {ports:?}"),
        Err(e) => log::warn!("could not flush UDP conntrack entries: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(hp: u16, proto: &str, host_ip: &str) -> PortMapping {
        PortMapping {
            host_port: hp,
            container_port: 80,
            protocol: proto.into(),
            host_ip: host_ip.into(),
        }
    }

    #[test]
    fn go_cni_field_names_are_accepted() {
        let containerd: PortMapping = serde_json::from_str(
            r#"{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":""}"#,
        )
        .unwrap();
        let spec: PortMapping = serde_json::from_str(
            r#"{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":""}"#,
        )
        .unwrap();
        assert_eq!(containerd, spec);
    }

    #[test]
    fn expansion_and_conflicts() {
        let ips: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let any = elements(&[pm(8080, "TCP", "")], &ips).unwrap();
        assert_eq!(any.len(), 2, "both families");
        let v4only = elements(&[pm(8080, "tcp", "192.0.2.1")], &ips).unwrap();
        assert_eq!(v4only.len(), 1);
        assert!(any[0].conflicts(&v4only[0]), "all-addresses vs one address");
        let lo = elements(&[pm(8080, "tcp", "127.0.0.1")], &ips).unwrap();
        assert!(!lo[0].conflicts(&v4only[0]), "different host addresses");
        let udp = elements(&[pm(8080, "udp", "192.0.2.1")], &ips).unwrap();
        assert!(!udp[0].conflicts(&v4only[0]), "different protocols");
        assert!(elements(&[pm(1, "icmp", "")], &ips).is_err());
        assert!(elements(&[pm(0, "tcp", "")], &ips).is_err());
        assert!(elements(&[pm(1, "tcp", "fd00::1")], &ips[..1]).is_err());
    }

    #[test]
    fn element_encodings() {
        let e = Element {
            host_ip: None,
            protocol: "tcp".into(),
            host_port: 8080,
            pod_ip: "10.0.0.5".parse().unwrap(),
            pod_port: 80,
        };
        assert_eq!(key(&e), [6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(value(&e), [10, 0, 0, 5, 0, 80, 0, 0]);
        let e6 = Element {
            host_ip: Some("2001:db8::1".parse().unwrap()),
            protocol: "udp".into(),
            host_port: 53,
            pod_ip: "fd00::5".parse().unwrap(),
            pod_port: 53,
        };
        assert_eq!(key(&e6).len(), 24);
        assert_eq!(key(&e6)[16], 17);
        assert_eq!(value(&e6).len(), 20);
        // The maps' declared lengths match the encodings.
        let specs = map_specs("h");
        assert_eq!(specs[0].key_len as usize, key(&e).len());
        assert_eq!(specs[0].data.unwrap().1 as usize, value(&e).len());
        assert_eq!(specs[3].key_len as usize, key(&e6).len());
        assert_eq!(specs[3].data.unwrap().1 as usize, value(&e6).len());
    }
}

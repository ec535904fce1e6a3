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
pub mod nftnl;

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ipam::Owner;
use crate::masquerade::nftables::{TABLE, get_chain};
use crate::masquerade::run_tool;

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

    fn key(&self) -> String {
        match self.host_ip {
            Some(ip) => format!("{ip} . {} . {}", self.protocol, self.host_port),
            None => format!("{} . {}", self.protocol, self.host_port),
        }
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

/// The fixed per-network objects; `subnets` are the pod subnets of the network.
fn base_script(h: &str, bridge: &str, subnets: &[IpNetwork], comment: &str) -> String {
    let t = TABLE;
    let mut s = format!("add table inet {t}\n");
    for (m, ty) in [
        (
            "hp4a",
            "inet_proto . inet_service : ipv4_addr . inet_service",
        ),
        (
            "hp4i",
            "ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service",
        ),
        (
            "hp6a",
            "inet_proto . inet_service : ipv6_addr . inet_service",
        ),
        (
            "hp6i",
            "ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service",
        ),
    ] {
        s.push_str(&format!("add map inet {t} {m}_{h} {{ type {ty}; }}\n"));
    }
    let chains = [
        (format!("hp_{h}"), String::new()),
        (
            format!("hp_pre_{h}"),
            "type nat hook prerouting priority dstnat; policy accept; ".into(),
        ),
        // -100 is dstnat; nft names that priority for prerouting only.
        (
            format!("hp_out_{h}"),
            "type nat hook output priority -100; policy accept; ".into(),
        ),
        (
            format!("hp_post_{h}"),
            "type nat hook postrouting priority srcnat; policy accept; ".into(),
        ),
    ];
    // Replace the chains whether or not they exist: flush every one first (dropping the jumps
    // into hp_), then delete them, then create them again.
    for (c, _) in &chains {
        s.push_str(&format!("add chain inet {t} {c}\n"));
    }
    for (c, _) in &chains {
        s.push_str(&format!("flush chain inet {t} {c}\n"));
    }
    for (c, _) in chains.iter().rev() {
        s.push_str(&format!("delete chain inet {t} {c}\n"));
    }
    // The jump chain must exist before the base chains that reference it.
    for (c, hook) in &chains {
        s.push_str(&format!(
            "add chain inet {t} {c} {{ {hook}comment \"{comment}\"; }}\n"
        ));
    }
    let hp = format!("hp_{h}");
    s.push_str(&format!(
        "add rule inet {t} {hp} meta nfproto ipv4 dnat ip to ip daddr . meta l4proto . th dport map @hp4i_{h}\n\
         add rule inet {t} {hp} meta nfproto ipv4 dnat ip to meta l4proto . th dport map @hp4a_{h}\n\
         add rule inet {t} {hp} meta nfproto ipv6 dnat ip6 to ip6 daddr . meta l4proto . th dport map @hp6i_{h}\n\
         add rule inet {t} {hp} meta nfproto ipv6 dnat ip6 to meta l4proto . th dport map @hp6a_{h}\n\
         add rule inet {t} hp_pre_{h} fib daddr type local jump {hp}\n\
         add rule inet {t} hp_out_{h} fib daddr type local jump {hp}\n\
         add rule inet {t} hp_post_{h} ct status dnat ip saddr 127.0.0.0/8 masquerade\n"
    ));
    for n in subnets {
        let (fam, _) = if n.is_ipv4() { ("ip", 4) } else { ("ip6", 6) };
        s.push_str(&format!(
            "add rule inet {t} hp_post_{h} ct status dnat oifname \"{bridge}\" {fam} saddr {n} masquerade\n"
        ));
    }
    s
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

/// A network's hostPort objects in the kernel. Which mappings exist is the attachment
/// records' business; callers hold the pool lock while they change elements.
pub struct HostPorts<'a> {
    pub network: &'a str,
    pub bridge: &'a str,
    /// The pod subnets of the network.
    pub subnets: Vec<IpNetwork>,
}

impl HostPorts<'_> {
    fn hash(&self) -> String {
        net_hash(self.network)
    }

    fn comment(&self) -> String {
        let mut sig = format!("{}|{}", self.network, self.bridge);
        for n in &self.subnets {
            sig.push_str(&format!("|{n}"));
        }
        format!(
            "pontoon hostports net={} cfg={}",
            self.network,
            crate::masquerade::short_hash(sig.as_bytes())
        )
    }

    /// Creates the per-network maps and chains unless they are there (one netlink request).
    fn ensure_base(&self) -> Result<()> {
        let h = self.hash();
        if get_chain(TABLE, &format!("hp_post_{h}"))?.is_some_and(|r| {
            r.windows(self.comment().len())
                .any(|w| w == self.comment().as_bytes())
        }) {
            return Ok(());
        }
        run_tool(
            "nft",
            &["-f", "-"],
            Some(&base_script(
                &h,
                self.bridge,
                &self.subnets,
                &self.comment(),
            )),
        )?;
        if self.subnets.iter().any(IpNetwork::is_ipv4) {
            // The node's own 127.0.0.1 may be DNATed out through the bridge.
            crate::dataplane::sysctl::ensure(
                &format!("net/ipv4/conf/{}/route_localnet", self.bridge),
                "1",
            )?;
        }
        Ok(())
    }

    /// Installs `els` (the base objects first, if missing).
    pub fn install(&self, conn: &mut nftnl::Conn, els: &[Element]) -> Result<()> {
        if els.is_empty() {
            return Ok(());
        }
        self.ensure_base()?;
        conn.change(TABLE, &placed(self.network, els), true, false)
    }

    /// CHECK: every element in `els` is installed.
    pub fn check(&self, els: &[Element]) -> Result<()> {
        for e in els {
            let q = format!("{{ {} }}", e.key());
            let got = run_tool(
                "nft",
                &["get", "element", "inet", TABLE, &e.map(&self.hash()), &q],
                None,
            );
            if !got.is_ok_and(|out| out.contains(&e.pod_ip.to_string())) {
                return Err(Error::CheckFailed(format!(
                    "hostPort {}/{} -> {}:{} is not installed",
                    e.host_port, e.protocol, e.pod_ip, e.pod_port
                )));
            }
        }
        Ok(())
    }
}

/// The elements with the maps of `network` they go in.
fn placed<'e>(network: &str, els: &'e [Element]) -> Vec<(String, &'e Element)> {
    let h = net_hash(network);
    els.iter().map(|e| (e.map(&h), e)).collect()
}

/// Deletes `els` of `network`, those already gone (a flushed ruleset) included.
pub fn remove(conn: &mut nftnl::Conn, network: &str, els: &[Element]) -> Result<()> {
    conn.change(TABLE, &placed(network, els), false, true)
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
        assert_eq!(any[0].key(), "tcp . 8080");
        assert_eq!(v4only[0].key(), "192.0.2.1 . tcp . 8080");
    }
}

//! Egress SNAT for a pod network: one rule set per network (never per pod), installed
//! idempotently by `pontoon masquerade ensure` or by the first ADD of a network with
//! `ipMasq: true`. Traffic from the pod subnets to anywhere but the pod subnets, multicast and the
//! configured no-masquerade CIDRs leaves with the node's address.
//!
//! Two backends behind [`Backend`]: nftables (the default, over netlink; its own table
//! `inet pontoon`) and iptables (its own nat chain per network, for nodes managed with
//! iptables). Both decide "current" by comparing the kernel's rules with the ones they would
//! write; on the ADD hot path that is one netlink dump and no exec (iptables-legacy: one
//! `iptables-save`).

pub mod iptables;
pub mod nftables;

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use sha2::{Digest, Sha256};

use crate::cni::NetConf;
use crate::error::{Error, Result};
use crate::ipam::{self, Pool};

/// Everything that defines a network's masquerade rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub network: String,
    /// Pod subnets: traffic from them is masqueraded.
    pub sources: Vec<IpNetwork>,
    /// Destinations never masqueraded (pod subnets, multicast, configured CIDRs), merged.
    pub exclude: Vec<IpNetwork>,
}

impl RuleSet {
    pub fn new(network: &str, sources: &[IpNetwork], no_masq: &[IpNetwork]) -> RuleSet {
        let sources = merge(sources.iter().map(|n| canonical(*n)).collect());
        let mut ex: Vec<IpNetwork> = sources.clone();
        ex.extend(no_masq.iter().map(|n| canonical(*n)));
        if sources.iter().any(IpNetwork::is_ipv4) {
            ex.push("224.0.0.0/4".parse().unwrap());
            ex.push("255.255.255.255/32".parse().unwrap());
        }
        if sources.iter().any(IpNetwork::is_ipv6) {
            ex.push("ff00::/8".parse().unwrap());
            ex.push("fe80::/10".parse().unwrap());
        }
        RuleSet {
            network: network.to_string(),
            sources,
            exclude: merge(ex),
        }
    }

    /// Short hash of the network name: names the chain.
    pub fn network_hash(&self) -> String {
        short_hash(self.network.as_bytes())
    }

    /// Hash of the whole rule set: a chain whose comment carries another is stale.
    pub fn config_hash(&self) -> String {
        let mut s = self.network.clone();
        for n in self.sources.iter().chain(self.exclude.iter()) {
            s.push('|');
            s.push_str(&n.to_string());
        }
        short_hash(s.as_bytes())
    }

    /// The comment identifying this network's rules (and their version).
    pub fn comment(&self) -> String {
        format!("pontoon net={} cfg={}", self.network, self.config_hash())
    }

    pub fn family(&self, v4: bool) -> (Vec<IpNetwork>, Vec<IpNetwork>) {
        (
            self.sources
                .iter()
                .filter(|n| n.is_ipv4() == v4)
                .copied()
                .collect(),
            self.exclude
                .iter()
                .filter(|n| n.is_ipv4() == v4)
                .copied()
                .collect(),
        )
    }
}

pub fn short_hash(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .take(6)
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn canonical(n: IpNetwork) -> IpNetwork {
    IpNetwork::new(n.network(), n.prefix()).expect("same prefix")
}

/// Drops CIDRs contained in another, so the sets hold no overlapping intervals.
fn merge(v: Vec<IpNetwork>) -> Vec<IpNetwork> {
    aggregate(v)
}

/// The smallest list of CIDRs covering exactly the same addresses: canonical, CIDRs inside
/// another dropped, adjacent halves joined (10.244.0.0/24 + 10.244.1.0/24 = 10.244.0.0/23),
/// sorted. The pod CIDRs of 5,000 nodes inside one cluster range become a handful.
pub fn aggregate(v: Vec<IpNetwork>) -> Vec<IpNetwork> {
    use ipam::range::{from_u128, to_u128};
    // (is_v6, network as u128, prefix)
    let bits = |v6: bool| if v6 { 128u8 } else { 32u8 };
    let mut xs: Vec<(bool, u128, u8)> = v
        .into_iter()
        .map(|n| (n.is_ipv6(), to_u128(n.network()), n.prefix()))
        .collect();
    loop {
        xs.sort();
        xs.dedup();
        // Drop CIDRs inside the one kept before them (sorted: a container comes first).
        let mut kept: Vec<(bool, u128, u8)> = Vec::with_capacity(xs.len());
        for x in xs {
            if let Some(&(f, net, p)) = kept.last() {
                let span = bits(f) - p;
                let inside =
                    f == x.0 && p <= x.2 && (span >= 128 || (x.1 >> span) == (net >> span));
                if inside {
                    continue;
                }
            }
            kept.push(x);
        }
        // Join sibling halves into their parent.
        let mut joined = Vec::with_capacity(kept.len());
        let mut changed = false;
        let mut i = 0;
        while i < kept.len() {
            let (f, net, p) = kept[i];
            if p > 0 && i + 1 < kept.len() {
                let (g, net2, q) = kept[i + 1];
                let half = 1u128 << (bits(f) - p);
                let parent_aligned = (net >> (bits(f) - p + 1)) << (bits(f) - p + 1) == net;
                if g == f && q == p && parent_aligned && net2 == net + half {
                    joined.push((f, net, p - 1));
                    changed = true;
                    i += 2;
                    continue;
                }
            }
            joined.push(kept[i]);
            i += 1;
        }
        xs = joined;
        if !changed {
            break;
        }
    }
    xs.into_iter()
        .map(|(v6, net, p)| IpNetwork::new(from_u128(net, !v6), p).expect("a valid prefix"))
        .collect()
}

/// A masquerade backend.
pub trait Backend {
    fn name(&self) -> &'static str;
    /// Whether exactly this rule set is installed (cheap: used on every ADD).
    fn is_current(&self, rs: &RuleSet) -> Result<bool>;
    /// Installs or replaces the network's rules atomically.
    fn apply(&self, rs: &RuleSet) -> Result<()>;
    /// Removes the network's rules and nothing else.
    fn remove(&self, network: &str) -> Result<()>;
}

/// Picks the backend: explicit, else nftables (spoken over netlink: no tool needed).
pub fn backend(explicit: Option<&str>) -> Result<Box<dyn Backend>> {
    let choice = explicit.unwrap_or("nftables");
    match choice {
        "nftables" => Ok(Box::new(nftables::Nftables)),
        "iptables" => Ok(Box::new(iptables::Iptables)),
        other => Err(Error::config(format!(
            "`ipMasqBackend` {other:?} must be \"nftables\" or \"iptables\""
        ))),
    }
}

pub fn find_binary(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The rule set of a network config: its pool's subnets (or, with a delegated IPAM, the
/// subnets of the addresses just allocated) and `noMasqueradeCidrs`.
pub fn rule_set_for(conf: &NetConf, addrs: &[IpNetwork]) -> Result<RuleSet> {
    let mut sources: Vec<IpNetwork> = Vec::new();
    if let (Some(t), Some(v)) = (conf.ipam_type(), &conf.raw.ipam)
        && ipam::IN_PROCESS_TYPES.contains(&t)
    {
        let pool = Pool::from_config(&conf.name, v, conf.raw.runtime_config.ip_ranges.as_ref())?;
        sources.extend(pool.sets.iter().flat_map(|s| s.0.iter().map(|r| r.subnet)));
    }
    sources.extend(addrs.iter().copied());
    let no_masq: Vec<IpNetwork> = conf
        .raw
        .no_masquerade_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    Ok(RuleSet::new(&conf.name, &sources, &no_masq))
}

/// Installs `rs` unless it is already current. Safe to race: every apply is one atomic
/// replacement of the network's rules.
pub fn ensure(b: &dyn Backend, rs: &RuleSet) -> Result<()> {
    if b.is_current(rs)? {
        return Ok(());
    }
    log::info!(
        "installing masquerade rules for network {} with {}: from {:?}, except to {:?}",
        rs.network,
        b.name(),
        rs.sources,
        rs.exclude
    );
    b.apply(rs)
}

/// Runs a firewall command, mapping failures to a firewall error with its stderr.
pub(crate) fn run_tool(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let bin = find_binary(prog)
        .ok_or_else(|| Error::Firewall(format!("{prog} is not installed on this node")))?;
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Firewall(format!("cannot run {prog}: {e}")))?;
    if let Some(s) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(s.as_bytes())
            .map_err(|e| Error::Firewall(format!("cannot feed {prog}: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Firewall(format!("{prog} failed: {e}")))?;
    if !out.status.success() {
        return Err(Error::Firewall(format!(
            "{prog} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Forwarding on the node: pods' egress is routed by the node. The reference writes these on
/// every ADD with `isGateway`; pontoon writes them only when they are off.
pub fn ensure_forwarding(addrs: &[IpAddr]) -> Result<()> {
    crate::dataplane::enable_forwarding(
        addrs.iter().any(IpAddr::is_ipv4),
        addrs.iter().any(IpAddr::is_ipv6),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn rule_set_merges_and_adds_multicast() {
        let rs = RuleSet::new(
            "net",
            &[n("10.244.1.0/24"), n("fd00:1::/64")],
            &[n("10.244.0.0/16"), n("10.96.0.0/12")],
        );
        assert_eq!(rs.sources, vec![n("10.244.1.0/24"), n("fd00:1::/64")]);
        let (s4, x4) = rs.family(true);
        assert_eq!(s4, vec![n("10.244.1.0/24")]);
        assert_eq!(
            x4,
            vec![
                n("10.96.0.0/12"),
                n("10.244.0.0/16"),
                n("224.0.0.0/4"),
                n("255.255.255.255/32")
            ]
        );
        let (_, x6) = rs.family(false);
        assert!(x6.contains(&n("ff00::/8")));
        assert_eq!(rs.network_hash().len(), 12);
    }

    #[test]
    fn aggregation_joins_halves_and_drops_contained() {
        let many: Vec<IpNetwork> = (0..256).map(|i| n(&format!("10.244.{i}.0/24"))).collect();
        assert_eq!(aggregate(many), vec![n("10.244.0.0/16")]);
        assert_eq!(
            aggregate(vec![
                n("10.0.0.0/8"),
                n("10.1.2.0/24"),
                n("fd00::/64"),
                n("fd00::1/128")
            ]),
            vec![n("10.0.0.0/8"), n("fd00::/64")]
        );
        // Not siblings (10.0.1.0/24 + 10.0.2.0/24 are not two halves of one /23).
        assert_eq!(
            aggregate(vec![n("10.0.2.0/24"), n("10.0.1.0/24")]),
            vec![n("10.0.1.0/24"), n("10.0.2.0/24")]
        );
        assert_eq!(
            aggregate(vec![n("0.0.0.0/1"), n("128.0.0.0/1")]),
            vec![n("0.0.0.0/0")]
        );
    }

    #[test]
    fn config_hash_tracks_content() {
        let a = RuleSet::new("net", &[n("10.0.0.0/24")], &[]);
        let b = RuleSet::new("net", &[n("10.0.0.0/24")], &[n("10.1.0.0/16")]);
        assert_ne!(a.config_hash(), b.config_hash());
        assert_eq!(a.network_hash(), b.network_hash());
        assert_eq!(a, RuleSet::new("net", &[n("10.0.0.5/24")], &[]));
    }
}

//! `pontoon agent`: the long-running node agent the DaemonSet runs.
//!
//! Each reconcile (every `--interval`, and whenever the node source reports a change):
//! 1. learns this node's pod CIDRs (from its Node object, or flags) and every node's;
//! 2. installs the binary, `loopback` and the conflist (binary first; atomic; only on change),
//!    with every cluster pod CIDR excluded from masquerade;
//! 3. re-asserts the masquerade rules (the same rule set an ADD would install, so the two never
//!    fight), re-creating them if something flushed the ruleset;
//! 4. keeps, for every other node, a route `podCIDR via <InternalIP>` per family, owned by the
//!    dedicated route protocol [`RTPROT_PONTOON`]: added, replaced when the IP changes, removed
//!    when the node goes; routes of any other protocol are never touched.
//!
//! It answers `GET /healthz` on localhost (200 while the last reconcile succeeded recently) and
//! exits cleanly on SIGTERM/SIGINT, leaving routes and rules in place so pods keep working
//! during an upgrade.

#[cfg(feature = "kube")]
pub mod kube;
pub mod nodes;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;

use crate::dataplane::{Netlink, RouteSpec};
use crate::error::{Error, Result};
use crate::install::{self, Spec};
use crate::masquerade;
pub use nodes::{NodeInfo, NodeSource, StaticFile};

/// The route protocol number marking routes pontoon's agent owns (`ip route show proto 201`).
/// Unassigned in /etc/iproute2/rt_protos; chosen so no routing daemon claims it.
pub const RTPROT_PONTOON: u8 = 201;

pub struct Options {
    pub node_name: String,
    /// Pod CIDRs of this node given on the command line (override the Node object).
    pub pod_cidrs: Vec<IpNetwork>,
    /// Cluster pod CIDR(s) and other destinations never masqueraded (e.g. the service CIDR).
    pub no_masquerade: Vec<IpNetwork>,
    pub install: Spec,
    pub interval: Duration,
    pub healthz: Option<SocketAddr>,
    /// One reconcile, then exit (for init containers and tests).
    pub once: bool,
}

/// What one reconcile did, for the log.
#[derive(Debug, Default)]
pub struct Outcome {
    pub installed: install::Changes,
    pub masquerade_applied: bool,
    pub routes_added: Vec<String>,
    pub routes_removed: Vec<String>,
}

/// The desired routes to other nodes: pod CIDR -> gateway (that node's InternalIP of the same
/// family).
pub fn desired_routes(me: &str, nodes: &[NodeInfo]) -> BTreeMap<IpNetwork, IpAddr> {
    let mut out = BTreeMap::new();
    for n in nodes.iter().filter(|n| n.name != me) {
        for cidr in &n.pod_cidrs {
            if let Some(ip) = n
                .internal_ips
                .iter()
                .find(|ip| ip.is_ipv4() == cidr.is_ipv4())
            {
                out.insert(IpNetwork::new(cidr.network(), cidr.prefix()).unwrap(), *ip);
            }
        }
    }
    out
}

/// Makes the node's routes owned by [`RTPROT_PONTOON`] equal `want`.
pub fn sync_routes(
    nl: &mut Netlink,
    want: &BTreeMap<IpNetwork, IpAddr>,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut have: BTreeMap<IpNetwork, Option<IpAddr>> = BTreeMap::new();
    for v4 in [true, false] {
        for r in nl.routes(v4)? {
            if r.protocol == Some(RTPROT_PONTOON) && r.table == Some(254) {
                have.insert(r.dst, r.gw);
            }
        }
    }
    for (dst, gw) in want {
        if have.get(dst) == Some(&Some(*gw)) {
            continue;
        }
        nl.replace_route(&route(*dst, Some(*gw)))?;
        added.push(format!("{dst} via {gw}"));
    }
    for (dst, gw) in &have {
        if !want.contains_key(dst) {
            nl.del_route(&route(*dst, *gw))?;
            removed.push(dst.to_string());
        }
    }
    Ok((added, removed))
}

fn route(dst: IpNetwork, gw: Option<IpAddr>) -> RouteSpec {
    RouteSpec {
        protocol: Some(RTPROT_PONTOON),
        dst,
        gw,
        oif: None,
        priority: None,
        table: None,
        scope: None,
        mtu: None,
        advmss: None,
    }
}

/// Installs binary, loopback and conflist, then makes the network's firewall state (masquerade,
/// hostPort objects and every recorded mapping) equal what the conflist and the attachment
/// records say, and turns forwarding on. Returns what was installed and whether the firewall
/// had to be healed.
pub fn install_and_firewall(spec: &Spec, self_bin: &[u8]) -> Result<(install::Changes, bool)> {
    let installed = install::install(spec, self_bin)?;
    // The state an ADD with this conflist would install: the two agree by construction.
    let conf = crate::cni::NetConf::parse(
        install::plugin_conf(&install::conflist(spec))
            .to_string()
            .as_bytes(),
    )?;
    let healed = crate::firewall::Network::of(&conf, &[])?.reconcile()?;
    let rs = masquerade::rule_set_for(&conf, &[])?;
    let ips: Vec<IpAddr> = rs.sources.iter().map(|n| n.ip()).collect();
    masquerade::ensure_forwarding(&ips)?;
    Ok((installed, healed))
}

/// Watches nf_tables events and raises `dirty` when something removes a table, chain or rule
/// of pontoon's table (a flush, a firewall reload), so the agent heals within a second rather
/// than at its next interval.
pub fn watch_firewall(dirty: Arc<AtomicBool>) -> Result<()> {
    use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
    const NFNLGRP_NFTABLES: u32 = 7;
    let mut sock = Socket::new(NETLINK_NETFILTER)
        .map_err(|e| Error::io("cannot open an nfnetlink socket", e))?;
    sock.bind_auto()
        .map_err(|e| Error::io("cannot bind the nfnetlink socket", e))?;
    sock.add_membership(NFNLGRP_NFTABLES)
        .map_err(|e| Error::io("cannot subscribe to nftables events", e))?;
    std::thread::Builder::new()
        .name("nft-events".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match sock.recv(&mut &mut buf[..], 0) {
                    Ok(n) => n,
                    // ENOBUFS: events were lost; assume the worst.
                    Err(_) => {
                        dirty.store(true, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if crate::nft::removes_from_table(&buf[..n], crate::masquerade::nftables::TABLE) {
                    dirty.store(true, Ordering::Relaxed);
                }
            }
        })
        .map_err(|e| Error::io("cannot start the nftables event thread", e))?;
    Ok(())
}

/// One reconcile against a snapshot of the nodes.
pub fn reconcile(opts: &Options, nodes: &[NodeInfo], self_bin: &[u8]) -> Result<Outcome> {
    let me = nodes.iter().find(|n| n.name == opts.node_name);
    let pod_cidrs = if !opts.pod_cidrs.is_empty() {
        opts.pod_cidrs.clone()
    } else {
        match me {
            Some(n) if !n.pod_cidrs.is_empty() => n.pod_cidrs.clone(),
            _ => {
                return Err(Error::config(format!(
                    "node {} has no pod CIDRs yet (spec.podCIDRs), and none were given with \
                     --pod-cidr",
                    opts.node_name
                )));
            }
        }
    };
    // Traffic to any pod of the cluster keeps its source address.
    let mut no_masq: Vec<IpNetwork> = opts.no_masquerade.clone();
    let mut seen: HashSet<IpNetwork> = no_masq.iter().copied().collect();
    for c in nodes
        .iter()
        .flat_map(|n| n.pod_cidrs.iter())
        .chain(pod_cidrs.iter())
    {
        if seen.insert(*c) {
            no_masq.push(*c);
        }
    }
    let mut spec = opts.install.clone();
    spec.pod_cidrs = pod_cidrs;
    spec.no_masquerade = no_masq;
    let (installed, masquerade_applied) = install_and_firewall(&spec, self_bin)?;
    let mut nl = Netlink::new()?;
    let (routes_added, routes_removed) =
        sync_routes(&mut nl, &desired_routes(&opts.node_name, nodes))?;
    Ok(Outcome {
        installed,
        masquerade_applied,
        routes_added,
        routes_removed,
    })
}

fn log_outcome(o: &Outcome) {
    let i = &o.installed;
    if i.binary {
        log::info!("installed the pontoon binary");
    }
    if i.loopback {
        log::info!("installed loopback");
    }
    if i.conflist {
        log::info!("wrote the conflist");
    }
    if o.masquerade_applied {
        log::info!("firewall state (masquerade, hostPorts) re-installed from the records");
    }
    for r in &o.routes_added {
        log::info!("route {r}");
    }
    for r in &o.routes_removed {
        log::info!("route to {r} removed (node gone)");
    }
}

/// Serves `GET /healthz` on `addr`: 200 while the last successful reconcile is recent.
fn serve_healthz(addr: SocketAddr, last_ok: Arc<AtomicU64>, max_age: Duration) -> Result<()> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| Error::io(format!("cannot listen on {addr} for /healthz"), e))?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path_ok = req.starts_with("GET /healthz");
            let age =
                crate::ipam::store::unix_now().saturating_sub(last_ok.load(Ordering::Relaxed));
            let healthy = last_ok.load(Ordering::Relaxed) > 0 && age <= max_age.as_secs();
            let (code, body) = match (path_ok, healthy) {
                (false, _) => ("404 Not Found", "not found\n".to_string()),
                (true, true) => ("200 OK", "ok\n".to_string()),
                (true, false) => (
                    "503 Service Unavailable",
                    format!("last successful reconcile {age} s ago\n"),
                ),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {code}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}

/// Runs the agent until SIGTERM/SIGINT (or once). Returns the exit code.
pub fn run(opts: Options, mut source: Box<dyn NodeSource>) -> Result<i32> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .map_err(|e| Error::io("cannot install the signal handler", e))?;
    }
    let last_ok = Arc::new(AtomicU64::new(0));
    if let Some(addr) = opts.healthz {
        serve_healthz(
            addr,
            Arc::clone(&last_ok),
            opts.interval * 3 + Duration::from_secs(30),
        )?;
    }
    let self_bin = install::self_bytes()?;
    let firewall_dirty = Arc::new(AtomicBool::new(false));
    if let Err(e) = watch_firewall(Arc::clone(&firewall_dirty)) {
        log::warn!("{e}: the firewall state is checked every interval only");
    }
    log::info!(
        "pontoon agent on node {} ({}), every {:?}",
        opts.node_name,
        source.describe(),
        opts.interval
    );
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let result = source
            .nodes()
            .and_then(|nodes| reconcile(&opts, &nodes, &self_bin));
        match result {
            Ok(o) => {
                failures = 0;
                log_outcome(&o);
                last_ok.store(crate::ipam::store::unix_now(), Ordering::Relaxed);
            }
            Err(e) => {
                failures += 1;
                log::error!("reconcile failed ({failures} in a row): {e}");
                if opts.once {
                    return Err(e);
                }
            }
        }
        if opts.once {
            return Ok(0);
        }
        // Sleep until the next round, a change reported by the source, or a signal.
        let deadline = started + opts.interval;
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            if source.wait_change(Duration::from_millis(200))
                || firewall_dirty.swap(false, Ordering::Relaxed)
            {
                break;
            }
        }
        if stop.load(Ordering::Relaxed) {
            log::info!("signal received: exiting, routes and rules stay in place");
            return Ok(0);
        }
    }
}

/// The Kubernetes node source (watch-based; in-cluster config or a kubeconfig).
pub fn kube_source(kubeconfig: Option<PathBuf>) -> Result<Box<dyn NodeSource>> {
    #[cfg(feature = "kube")]
    return Ok(Box::new(kube::KubeNodes::start(kubeconfig)?));
    #[cfg(not(feature = "kube"))]
    {
        let _ = kubeconfig;
        Err(Error::config(
            "this pontoon was built without the kube feature: use --nodes-file",
        ))
    }
}

/// The installer options shared by `pontoon install` and `pontoon agent`.
pub fn spec_from(
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    network: String,
    bridge: String,
    mtu: Option<u32>,
    data_dir: Option<PathBuf>,
    loopback: install::LoopbackMode,
) -> Spec {
    Spec {
        bin_dir,
        conf_dir,
        conf_name: format!("10-{network}.conflist"),
        network,
        bridge,
        pod_cidrs: vec![],
        no_masquerade: vec![],
        mtu,
        data_dir,
        loopback,
        // kubelet passes hostPort mappings only to plugins declaring the capability.
        port_mappings: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ips: &[&str], cidrs: &[&str]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            internal_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn routes_per_family_to_other_nodes() {
        let nodes = vec![
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
            node("c", &["192.0.2.3"], &["10.244.2.0/24", "fd00:0:0:2::/64"]),
        ];
        let want = desired_routes("a", &nodes);
        assert_eq!(want.len(), 3, "{want:?}");
        assert_eq!(
            want[&"10.244.1.0/24".parse().unwrap()].to_string(),
            "192.0.2.2"
        );
        assert_eq!(
            want[&"fd00:0:0:1::/64".parse().unwrap()].to_string(),
            "2001:db8::2"
        );
        // Node c has no IPv6 address: no v6 route to it.
        assert!(!want.contains_key(&"fd00:0:0:2::/64".parse().unwrap()));
    }
}

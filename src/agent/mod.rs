//! `pontoon agent`: the long-running node agent the DaemonSet runs.
//!
//! Each pass (every `--interval`, and as soon as the node source reports a change, or nf_tables
//! reports something of pontoon's table removed) reconciles every item on its own; a failing
//! item is reported (logged once when it appears or changes, listed by `/readyz`, counted in
//! `/metrics`) and retried next pass, and never holds back another:
//! 1. this node's pod CIDRs (from its Node object, or flags);
//! 2. the binary, `loopback` and the conflist (binary first; atomic; only on change), with every
//!    cluster pod CIDR (aggregated) excluded from masquerade;
//! 3. the network's firewall state (masquerade, hostPort objects, every recorded mapping),
//!    compared with what it must be and re-installed when it differs;
//! 4. forwarding (a read-only `/proc/sys` with forwarding off is one clear problem);
//! 5. attachments whose pod is gone (reclaimed, with everything they hold);
//! 6. for every other node, a route `podCIDR via <InternalIP>` per family, owned by route
//!    protocol [`RTPROT_PONTOON`]; routes of any other protocol are never touched.
//!
//! It exits cleanly on SIGTERM/SIGINT, leaving routes and rules in place so pods keep working
//! during an upgrade. Between passes it sleeps on a channel: nothing wakes it but work.

pub mod http;
#[cfg(feature = "kube")]
pub mod kube;
pub mod local_pods;
pub mod metrics;
pub mod nodes;
pub mod overlay;
#[cfg(feature = "kube")]
pub mod policy_watch;
pub mod routes;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;

use crate::dataplane::Netlink;
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
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub listen: Option<SocketAddr>,
    /// One pass, then exit (for init containers and tests).
    pub once: bool,
    /// How other nodes' pods are reached.
    pub overlay: overlay::Overlay,
    /// Enforce NetworkPolicy (with the Kubernetes node source).
    pub network_policy: bool,
}

/// What wakes the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The nodes changed: a whole pass.
    Nodes,
    /// Something removed part of the masquerade/hostPort table: a whole pass.
    Firewall,
    /// Pods, namespaces or NetworkPolicies changed, or something removed part of the policy
    /// table: only the policy step runs, so a change is enforced in milliseconds rather than
    /// after the install, firewall, pool and route steps.
    Policy,
    /// An attachment record changed: the policy step runs if what the records say of pods
    /// did.
    Records,
    Stop,
}

/// A problem of one item of a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What it is about ("route 10.244.3.0/24", "forwarding", ...): one per item.
    pub item: String,
    /// For metrics: "route_unreachable", "route_conflict", "sysctl", "install", ...
    pub kind: &'static str,
    pub msg: String,
}

impl Problem {
    fn new(item: &str, kind: &'static str, e: impl std::fmt::Display) -> Problem {
        Problem {
            item: item.to_string(),
            kind,
            msg: e.to_string(),
        }
    }
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Pass {
    pub installed: install::Changes,
    pub healed: bool,
    pub routes: routes::Synced,
    /// The annotations this node's Node must carry (its VTEP MACs).
    pub annotations: BTreeMap<String, Option<String>>,
    pub overlay_changes: Vec<String>,
    pub vxlan_peers: usize,
    pub reclaimed: Vec<(crate::ipam::Owner, Vec<IpAddr>)>,
    pub problems: Vec<Problem>,
}

/// The plugin configuration the installed conflist makes (what an ADD on this node reads).
fn installed_conf(spec: &Spec) -> Result<crate::cni::NetConf> {
    crate::cni::NetConf::parse(
        install::plugin_conf(&install::conflist(spec))
            .to_string()
            .as_bytes(),
    )
}

/// Installs binary, loopback and conflist, then makes the network's firewall state equal what
/// the conflist and the attachment records say, and turns forwarding on. Returns what was
/// installed and whether the firewall had to be healed (`pontoon install` uses it whole).
pub fn install_and_firewall(spec: &Spec, self_bin: &[u8]) -> Result<(install::Changes, bool)> {
    let installed = install::install(spec, self_bin)?;
    let conf = installed_conf(spec)?;
    let healed = crate::firewall::Network::of(&conf, &[])?.reconcile()?;
    forwarding(spec)
        .into_iter()
        .next()
        .map_or(Ok(()), |p| Err(Error::config(p.msg)))?;
    Ok((installed, healed))
}

/// Turns on IPv4/IPv6 forwarding for the families of the node's pod CIDRs when it is off. A
/// read-only `/proc/sys` (a non-privileged container) with forwarding off is one problem that
/// says what to do.
fn forwarding(spec: &Spec) -> Vec<Problem> {
    let mut out = Vec::new();
    for (v4, key, name) in [
        (true, "net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        (
            false,
            "net/ipv6/conf/all/forwarding",
            "net.ipv6.conf.all.forwarding",
        ),
    ] {
        if !spec.pod_cidrs.iter().any(|c| c.is_ipv4() == v4) {
            continue;
        }
        match crate::dataplane::sysctl::ensure(key, "1") {
            Ok(()) => {}
            Err(e) if matches!(e.errno(), Some(libc::EROFS | libc::EACCES | libc::EPERM)) => {
                out.push(Problem::new(
                    "forwarding",
                    "sysctl",
                    format!(
                        "{name} is 0 and /proc/sys is read-only in this container, so pods \
                         cannot reach anything beyond the node: set it on the node \
                         (sysctl -w {name}=1, and in /etc/sysctl.d/ to keep it), or run the \
                         agent with a writable /proc/sys"
                    ),
                ));
            }
            Err(e) => out.push(Problem::new("forwarding", "sysctl", e)),
        }
    }
    out
}

/// One pass against a snapshot of the nodes: every item on its own.
pub fn reconcile(
    opts: &Options,
    nodes: &[NodeInfo],
    self_bin: &[u8],
    metrics: &std::sync::Mutex<metrics::Metrics>,
) -> Pass {
    let mut pass = Pass::default();
    let me = nodes.iter().find(|n| n.name == opts.node_name);
    let pod_cidrs = if !opts.pod_cidrs.is_empty() {
        opts.pod_cidrs.clone()
    } else {
        me.map(|n| n.pod_cidrs.clone()).unwrap_or_default()
    };
    if pod_cidrs.is_empty() {
        pass.problems.push(Problem::new(
            "pod CIDRs",
            "pod_cidrs",
            format!(
                "node {} has no pod CIDRs yet (spec.podCIDRs; is kube-controller-manager run with \
                 --allocate-node-cidrs?), and none were given with --pod-cidr: no conflist yet",
                opts.node_name
            ),
        ));
    } else {
        // Traffic to any pod of the cluster keeps its source address.
        let mut no_masq: Vec<IpNetwork> = opts.no_masquerade.clone();
        no_masq.extend(nodes.iter().flat_map(|n| n.pod_cidrs.iter().copied()));
        no_masq.extend(pod_cidrs.iter().copied());
        let mut spec = opts.install.clone();
        spec.pod_cidrs = pod_cidrs.clone();
        spec.no_masquerade = masquerade::aggregate(no_masq);
        // Pods fit in the overlay's encapsulation unless the operator set the MTU.
        if spec.mtu.is_none() {
            match Netlink::new().and_then(|mut nl| overlay::pod_mtu(&mut nl, &opts.overlay, me)) {
                Ok(m) => spec.mtu = m,
                Err(e) => pass.problems.push(Problem::new("pod MTU", "overlay", e)),
            }
        }
        match install::install(&spec, self_bin) {
            Ok(ch) => pass.installed = ch,
            Err(e) => pass.problems.push(Problem::new("install", "install", e)),
        }
        match installed_conf(&spec) {
            Err(e) => pass.problems.push(Problem::new("conflist", "install", e)),
            Ok(conf) => {
                match crate::firewall::Network::of(&conf, &[]).and_then(|fw| fw.reconcile()) {
                    Ok(healed) => pass.healed = healed,
                    Err(e) => pass.problems.push(Problem::new("firewall", "firewall", e)),
                }
                if let (Some(t), Some(v)) = (conf.ipam_type(), &conf.raw.ipam)
                    && crate::ipam::IN_PROCESS_TYPES.contains(&t)
                {
                    match crate::ipam::Pool::from_config(&conf.name, v, None) {
                        Ok(pool) => pool_item(&pool, &mut pass, metrics),
                        Err(e) => pass.problems.push(Problem::new("pool", "pool", e)),
                    }
                }
            }
        }
        pass.problems.extend(forwarding(&spec));
    }
    match Netlink::new().and_then(|mut nl| {
        let o = overlay::sync(&mut nl, &opts.overlay, &opts.node_name, &pod_cidrs, nodes)?;
        let r = routes::sync(&mut nl, &o.want)?;
        Ok((o, r))
    }) {
        Ok((o, r)) => {
            pass.problems.extend(o.problems);
            pass.annotations = o.annotations;
            pass.overlay_changes = o.changed;
            pass.vxlan_peers = o.vxlan_peers;
            pass.problems.extend(r.problems.iter().cloned());
            pass.routes = r;
        }
        Err(e) => pass.problems.push(Problem::new("routes", "route", e)),
    }
    pass
}

/// The pool: stale attachments reclaimed (with everything they hold), its state and the CNI
/// operations since the last pass into the metrics.
fn pool_item(
    pool: &crate::ipam::Pool,
    pass: &mut Pass,
    metrics: &std::sync::Mutex<metrics::Metrics>,
) {
    if !pool.dir().exists() {
        return; // no pod yet
    }
    let alive = crate::attachment::link_probe();
    match crate::attachment::reclaim_stale(pool, &alive) {
        Ok(r) => pass.reclaimed = r,
        Err(e) => pass
            .problems
            .push(Problem::new("stale attachments", "pool", e)),
    }
    let mut m = metrics.lock().unwrap();
    let n: usize = pass.reclaimed.iter().map(|(_, ips)| ips.len()).sum();
    if n > 0 {
        m.pool_reclaimed
            .get_or_create(&metrics::Net {
                network: pool.network.clone(),
            })
            .inc_by(n as u64);
    }
    m.fold_ops(pool);
    match crate::attachment::report(pool, &alive) {
        Ok(r) => m.pool(pool, &r),
        Err(e) => pass.problems.push(Problem::new("pool report", "pool", e)),
    }
}

fn log_pass(p: &Pass) {
    let i = &p.installed;
    if i.binary {
        log::info!("installed the pontoon binary");
    }
    if i.loopback {
        log::info!("installed loopback");
    }
    if i.conflist {
        log::info!("wrote the conflist");
    }
    if p.healed {
        log::info!("firewall state (masquerade, hostPorts) re-installed from the records");
    }
    for (o, ips) in &p.reclaimed {
        log::info!("reclaimed {ips:?} of {o}: its pod is gone");
    }
    for r in &p.routes.added {
        log::info!("route {r}");
    }
    for r in &p.routes.removed {
        log::info!("route to {r} removed (node gone)");
    }
    for c in &p.overlay_changes {
        log::info!("overlay: {c}");
    }
}

/// The policy step: the cluster's NetworkPolicies compiled for this node's pods and enforced.
struct PolicyStep {
    enforcer: crate::policy::nft::Enforcer,
    local: local_pods::LocalPods,
    /// The cluster last compiled (after [`crate::policy::fill_from_records`]) and its rules: an
    /// unchanged cluster (a record rewritten by an ADD's completion, a Pod's status update
    /// that changes nothing the policies read, the step's own table events) is not compiled
    /// again, only checked against the kernel.
    last: Option<(crate::policy::Cluster, crate::policy::Rules)>,
}

impl PolicyStep {
    /// Compiles (when the cluster changed) and makes the kernel enforce the rules; nothing when
    /// the source does not watch policies.
    fn run(&mut self, source: &mut dyn NodeSource, node: &str, problems: &mut Vec<Problem>) {
        let mut cluster = match source.policy_cluster() {
            None => return,
            Some(Err(e)) => return problems.push(Problem::new("network policy", "policy", e)),
            Some(Ok(c)) => c,
        };
        let t = Instant::now();
        // New pods whose status does not carry their addresses yet: from their records.
        if let Err(e) = self.local.refresh() {
            problems.push(Problem::new("attachment records", "policy", e));
        }
        let n = crate::policy::fill_from_records(&mut cluster, node, &self.local.pods());
        if n > 0 {
            log::debug!("network policy: {n} pod(s) addressed from their records");
        }
        let rules = match self.last.take() {
            Some((c, rules)) if c == cluster => rules,
            _ => crate::policy::compile(&cluster, node),
        };
        let compiled = t.elapsed();
        match self.enforcer.sync(&rules) {
            Ok(s) if s.rebuilt => log::info!(
                "network policy: table {} made, {} pod(s) isolated (compiled in {compiled:?}, \
                 applied in {:?})",
                crate::policy::nft::TABLE,
                s.isolated,
                t.elapsed() - compiled
            ),
            Ok(s) if s.pods_changed > 0 => log::info!(
                "network policy: {} pod(s) changed, {} isolated (compiled in {compiled:?}, \
                 applied in {:?})",
                s.pods_changed,
                s.isolated,
                t.elapsed() - compiled
            ),
            Ok(_) => {}
            Err(e) => problems.push(Problem::new("network policy", "policy", e)),
        }
        self.last = Some((cluster, rules));
    }
}

/// Watches nf_tables events and sends [`Wake::Firewall`] (or [`Wake::Policy`]) when something
/// removes a table, chain, rule or set of pontoon's masquerade (policy) table (a flush, a
/// firewall reload), so the agent heals within a second rather than at its next interval.
pub fn watch_firewall(wake: Sender<Wake>) -> Result<()> {
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
                let (firewall, policy) = match sock.recv(&mut &mut buf[..], 0) {
                    Ok(n) => (
                        crate::nft::removes_from_table(
                            &buf[..n],
                            crate::masquerade::nftables::TABLE,
                        ),
                        crate::nft::removes_from_table(&buf[..n], crate::policy::nft::TABLE),
                    ),
                    // ENOBUFS: events were lost; assume the worst.
                    Err(_) => (true, true),
                };
                let sent = match (firewall, policy) {
                    (true, _) => wake.send(Wake::Firewall),
                    (false, true) => wake.send(Wake::Policy),
                    (false, false) => Ok(()),
                };
                if sent.is_err() {
                    return;
                }
            }
        })
        .map_err(|e| Error::io("cannot start the nftables event thread", e))?;
    Ok(())
}

/// Runs the agent until SIGTERM/SIGINT (or once). Returns the exit code.
pub fn run(opts: Options, mut source: Box<dyn NodeSource>) -> Result<i32> {
    let (tx, rx) = std::sync::mpsc::channel::<Wake>();
    {
        let tx = tx.clone();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])
        .map_err(|e| Error::io("cannot install the signal handler", e))?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    let _ = tx.send(Wake::Stop);
                }
            })
            .map_err(|e| Error::io("cannot start the signal thread", e))?;
    }
    let shared = Arc::new(http::Shared::new(
        opts.interval * 3 + Duration::from_secs(30),
    ));
    if let Some(addr) = opts.listen {
        http::serve(addr, Arc::clone(&shared))?;
    }
    let self_bin = install::self_bytes()?;
    if let Err(e) = watch_firewall(tx.clone()) {
        log::warn!("{e}: the firewall state is checked every interval only");
    }
    source.subscribe(tx.clone());
    log::info!(
        "pontoon agent on node {} ({}), every {:?}",
        opts.node_name,
        source.describe(),
        opts.interval
    );
    let mut policy = PolicyStep {
        enforcer: crate::policy::nft::Enforcer::default(),
        local: local_pods::LocalPods::new(
            opts.install
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(crate::ipam::DEFAULT_DATA_DIR)),
            opts.install.network.clone(),
            tx.clone(),
        ),
        last: None,
    };
    if !opts.network_policy {
        match policy.enforcer.remove() {
            Ok(true) => log::info!("NetworkPolicy enforcement is off: removed its table"),
            Ok(false) => {}
            Err(e) => log::warn!("NetworkPolicy enforcement is off but its table stays: {e}"),
        }
    }
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut last_nodes: Option<Vec<NodeInfo>> = None;
    // A whole pass (install, firewall, pool, overlay, routes, then policy) at start, every
    // interval and on node or firewall events; policy events run the policy step alone. The
    // whole pass's problems stand until the next whole pass.
    let mut whole = true;
    let mut last_whole = Instant::now();
    let mut whole_problems: Vec<Problem> = Vec::new();
    loop {
        let started = Instant::now();
        if whole {
            last_whole = started;
            whole_problems = whole_pass(
                &opts,
                source.as_mut(),
                &mut last_nodes,
                &self_bin,
                &shared.metrics,
            );
        }
        let mut problems = whole_problems.clone();
        if opts.network_policy {
            policy.run(source.as_mut(), &opts.node_name, &mut problems);
        }
        // Each problem is logged when it appears or changes, and once more when it is gone.
        let now: BTreeMap<String, String> = problems
            .iter()
            .map(|p| (p.item.clone(), p.msg.clone()))
            .collect();
        {
            let m = shared.metrics.lock().unwrap();
            for p in &problems {
                if last.get(&p.item) != Some(&p.msg) {
                    log::warn!("{}: {}", p.item, p.msg);
                    m.reconcile_errors
                        .get_or_create(&metrics::Kind {
                            kind: p.kind.to_string(),
                        })
                        .inc();
                }
            }
            for item in last.keys().filter(|k| !now.contains_key(*k)) {
                log::info!("{item}: resolved");
            }
            m.reconcile_duration
                .observe(started.elapsed().as_secs_f64());
            m.ready.set(i64::from(problems.is_empty()));
            m.last_reconcile.set(crate::ipam::store::unix_now() as i64);
        }
        *shared.problems.lock().unwrap() = Some(
            problems
                .iter()
                .map(|p| format!("{}: {}", p.item, p.msg))
                .collect(),
        );
        *shared.last_pass.lock().unwrap() = Some(Instant::now());
        last = now;
        if opts.once {
            return if problems.is_empty() {
                Ok(0)
            } else {
                Err(Error::NotAvailable(
                    problems
                        .iter()
                        .map(|p| format!("{}: {}", p.item, p.msg))
                        .collect::<Vec<_>>()
                        .join("; "),
                ))
            };
        }
        // Sleep until the interval is up or something happens; a burst of events is one wake.
        // A burst of record changes alone that changes nothing the records say of pods (an
        // ADD's completion, an attachment of no pod) is slept through.
        let stop = loop {
            let deadline = last_whole + opts.interval;
            let woke = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
            let mut stop = woke == Ok(Wake::Stop) || woke == Err(RecvTimeoutError::Disconnected);
            let partial = |w: &Wake| matches!(w, Wake::Policy | Wake::Records);
            whole = !woke.as_ref().is_ok_and(partial);
            let mut records_only = woke == Ok(Wake::Records);
            if woke.is_ok() && !stop {
                std::thread::sleep(Duration::from_millis(20));
                for w in rx.try_iter() {
                    stop |= w == Wake::Stop;
                    whole |= !partial(&w);
                    records_only &= w == Wake::Records;
                }
            }
            if stop || !records_only || !opts.network_policy {
                break stop;
            }
            if policy.local.refresh().unwrap_or(true) {
                break false;
            }
        };
        if stop {
            log::info!("signal received: exiting, routes and rules stay in place");
            return Ok(0);
        }
    }
}

/// The whole pass: the node list, then [`reconcile`] against it (or the last list when the
/// source fails), this node's annotations published and the metrics set. Its problems.
fn whole_pass(
    opts: &Options,
    source: &mut dyn NodeSource,
    last_nodes: &mut Option<Vec<NodeInfo>>,
    self_bin: &[u8],
    metrics: &std::sync::Mutex<metrics::Metrics>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let nodes = match source.nodes() {
        Ok(n) => {
            *last_nodes = Some(n.clone());
            n
        }
        Err(e) => {
            let also = if last_nodes.is_some() {
                " (working from the last node list)"
            } else {
                ""
            };
            problems.push(Problem::new("nodes", "nodes", format!("{e}{also}")));
            match last_nodes {
                Some(n) => n.clone(),
                None => return problems,
            }
        }
    };
    let pass = reconcile(opts, &nodes, self_bin, metrics);
    log_pass(&pass);
    // This node's Node carries what its peers need (its VTEP MACs).
    let mine = nodes.iter().find(|n| n.name == opts.node_name);
    let stale: BTreeMap<String, Option<String>> = pass
        .annotations
        .iter()
        .filter(|(k, v)| mine.is_some_and(|n| n.annotations.get(*k) != v.as_ref()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !stale.is_empty() {
        match source.publish(&opts.node_name, &stale) {
            Ok(true) => {
                let said: Vec<String> = stale
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("(removed)")))
                    .collect();
                log::info!("annotated Node {}: {}", opts.node_name, said.join(", "))
            }
            Ok(false) => {}
            Err(e) => problems.push(Problem::new("node annotations", "nodes", e)),
        }
    }
    let m = metrics.lock().unwrap();
    m.routes.set(pass.routes.owned as i64);
    if pass.healed {
        m.firewall_heals.inc();
    }
    drop(m);
    problems.extend(pass.problems);
    problems
}

/// The Kubernetes node source (watch-based; in-cluster config or a kubeconfig).
pub fn kube_source(
    kubeconfig: Option<PathBuf>,
    network_policy: bool,
) -> Result<Box<dyn NodeSource>> {
    #[cfg(feature = "kube")]
    return Ok(Box::new(kube::KubeNodes::start(
        kubeconfig,
        network_policy,
    )?));
    #[cfg(not(feature = "kube"))]
    {
        let _ = (kubeconfig, network_policy);
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

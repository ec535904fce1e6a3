//! The two faces of the binary: the CNI plugin (when `CNI_COMMAND` is set) and the operator
//! command line (`pontoon masquerade ...`, `pontoon status`, ...).

use std::io::{Read, Write};
use std::time::Instant;

use clap::{Parser, Subcommand};
use ipnetwork::IpNetwork;
use serde::Deserialize;

use std::path::PathBuf;

use crate::cni::{self, Env, NetConf};
use crate::error::{Error, Result};
use crate::ipam::Pool;
use crate::masquerade::{self, RuleSet};
use crate::{logging, plugin};

/// Runs one CNI invocation: env + stdin in, result or error JSON on stdout. Returns the exit code.
pub fn cni_main() -> i32 {
    let started = Instant::now();
    let stdin = read_stdin();
    let (stdin, read_err) = match stdin {
        Ok(b) => (b, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    init_logging_from(&stdin);
    let (env, env_err) = match Env::from_lookup(|k| std::env::var(k).ok()) {
        Ok(e) => (Some(e), None),
        Err(e) => (None, Some(e)),
    };
    let result = match (read_err, env_err, &env) {
        (Some(e), _, _) | (None, Some(e), _) => Err(e),
        (None, None, Some(env)) if crate::loopback::invoked_as_loopback() => {
            crate::loopback::run(env, &stdin)
        }
        (None, None, Some(env)) => plugin::run(env, &stdin),
        (None, None, None) => unreachable!("either an env or its error"),
    };
    let (verb, cid, ifname) = match &env {
        Some(e) => (
            e.command.as_str(),
            e.container_id.as_str(),
            e.ifname.as_str(),
        ),
        None => ("?", "", ""),
    };
    let elapsed = started.elapsed();
    let outcome = match &result {
        Ok(_) => "ok".to_string(),
        Err(e) => e.code().to_string(),
    };
    crate::ipam::store::record_op(&format!(
        "op v1 {verb} {outcome} {} {}\n",
        elapsed.as_micros(),
        crate::attachment::RECLAIMED.load(std::sync::atomic::Ordering::Relaxed)
    ));
    let mut out = std::io::stdout().lock();
    match result {
        Ok(reply) => {
            if let Some(v) = reply {
                let _ = writeln!(out, "{v}");
            }
            log::info!(
                "{verb} container={cid} ifname={ifname} outcome=ok duration_ms={:.3}",
                elapsed.as_secs_f64() * 1e3
            );
            0
        }
        Err(e) => {
            let v = cni::error_reply(&e, &plugin::reply_version(&stdin));
            let _ = writeln!(out, "{v}");
            log::warn!(
                "{verb} container={cid} ifname={ifname} outcome=error code={} duration_ms={:.3} msg={:?}",
                e.code(),
                elapsed.as_secs_f64() * 1e3,
                e.to_string()
            );
            1
        }
    }
}

fn read_stdin() -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let limit = cni::config::MAX_STDIN as u64;
    std::io::stdin()
        .lock()
        .take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("cannot read the network configuration from stdin", e))?;
    if buf.len() as u64 > limit {
        return Err(Error::Decode(format!(
            "stdin is larger than {} MiB; a network configuration is a few KiB",
            limit >> 20
        )));
    }
    Ok(buf)
}

fn init_logging_from(stdin: &[u8]) {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct LogKeys {
        #[serde(default)]
        log_file: Option<std::path::PathBuf>,
        #[serde(default)]
        log_level: Option<String>,
    }
    let k: LogKeys = serde_json::from_slice(stdin).unwrap_or_default();
    logging::init(k.log_file.as_deref(), k.log_level.as_deref());
}

#[derive(Parser)]
#[command(
    name = "pontoon",
    version,
    about = "pontoon: a bridge + host-local CNI plugin for Kubernetes nodes.\n\nRun by a container runtime with CNI_COMMAND set, it is a CNI plugin. Run by hand, it offers the operator commands below."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct ConfArgs {
    /// Directory of CNI network configurations to read pontoon networks from.
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// Read these conflist/conf files instead of --conf-dir.
    #[arg(long)]
    conf: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct NodeArgs {
    /// The host's CNI bin dir (as mounted in the container).
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The host's CNI conf dir (as mounted in the container).
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Network name (the conflist is 10-<network>.conflist).
    #[arg(long, env = "PONTOON_NETWORK", default_value = "pontoon")]
    network: String,
    #[arg(long, env = "PONTOON_BRIDGE", default_value = "cni0")]
    bridge: String,
    /// MTU of bridge and veths (default: the node's default-route interface MTU).
    #[arg(long, env = "PONTOON_MTU")]
    mtu: Option<u32>,
    /// IPAM state dir (default /var/lib/cni/networks).
    #[arg(long, env = "PONTOON_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Install pontoon as the `loopback` plugin: auto = unless another loopback is there.
    #[arg(long, value_enum, default_value = "auto")]
    loopback: crate::install::LoopbackMode,
    /// This node's pod CIDR(s), comma-separated (default: spec.podCIDRs of the Node object).
    #[arg(long = "pod-cidr", env = "POD_CIDRS", value_delimiter = ',')]
    pod_cidrs: Vec<IpNetwork>,
    /// The cluster pod CIDR(s) and other destinations never masqueraded (e.g. the service CIDR).
    #[arg(
        long = "no-masquerade",
        env = "NO_MASQUERADE_CIDRS",
        value_delimiter = ','
    )]
    no_masquerade: Vec<IpNetwork>,
}

impl NodeArgs {
    fn spec(&self) -> crate::install::Spec {
        crate::agent::spec_from(
            self.cni_bin_dir.clone(),
            self.cni_conf_dir.clone(),
            self.network.clone(),
            self.bridge.clone(),
            self.mtu,
            self.data_dir.clone(),
            self.loopback,
        )
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the binary (also as `loopback`) and the conflist into the host's CNI dirs,
    /// atomically and idempotently, and set up masquerade. Pod CIDRs from --pod-cidr/POD_CIDRS
    /// or from a Node object (--node-json).
    Install {
        #[command(flatten)]
        node: NodeArgs,
        /// A Node object (JSON, e.g. `kubectl get node NAME -o json`) to take spec.podCIDRs from.
        #[arg(long)]
        node_json: Option<PathBuf>,
    },
    /// Remove pontoon from this node: the conflist, and once no pod is attached (or with
    /// --force) the routes, firewall state, IPAM state, the empty bridge and the binaries.
    Uninstall {
        #[command(flatten)]
        node: NodeArgs,
        /// Also when pods are still attached (they lose their network's state).
        #[arg(long)]
        force: bool,
    },
    /// The node agent: keeps the install, the masquerade rules and the routes to other nodes'
    /// pod CIDRs in place until SIGTERM.
    Agent {
        #[command(flatten)]
        node: NodeArgs,
        /// This node's name (Kubernetes: from the downward API).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Read the nodes from this NodeList JSON file instead of the Kubernetes API.
        #[arg(long)]
        nodes_file: Option<PathBuf>,
        /// kubeconfig to use (default: in-cluster config, then $KUBECONFIG, ~/.kube/config).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Seconds between reconciles (a resync; changes are acted on as they arrive).
        #[arg(long, default_value_t = 10)]
        interval: u64,
        /// Address serving /healthz (liveness), /readyz (readiness) and /metrics (Prometheus)
        /// ("off" to disable).
        #[arg(
            long,
            env = "PONTOON_LISTEN",
            alias = "healthz",
            default_value = "127.0.0.1:9765"
        )]
        listen: String,
        /// Reconcile once and exit.
        #[arg(long)]
        once: bool,
        /// How other nodes' pods are reached: `auto` (a direct route to a node on a subnet of
        /// this node, VXLAN to the others), `direct` (routes via InternalIPs only) or `vxlan`.
        #[arg(long, env = "PONTOON_ROUTING", default_value = "auto")]
        routing: crate::agent::overlay::Routing,
        /// The VXLAN UDP port (8472, the Linux and flannel default; 4789 is the IANA port).
        /// The same on every node.
        #[arg(long, env = "PONTOON_VXLAN_PORT", default_value_t = 8472)]
        vxlan_port: u16,
        /// The VXLAN network identifier. The same on every node.
        #[arg(long, env = "PONTOON_VXLAN_VNI", default_value_t = 1)]
        vxlan_vni: u32,
        /// `false` turns the VXLAN devices' transmit checksum offload off (kernels before 5.7
        /// can corrupt encapsulated packets' checksums with some NICs).
        #[arg(long, env = "PONTOON_VXLAN_CHECKSUM_OFFLOAD", default_value_t = true, action = clap::ArgAction::Set)]
        vxlan_checksum_offload: bool,
        /// Enforce Kubernetes NetworkPolicy (table `inet pontoon_policy`; needs the Kubernetes
        /// node source). `false` for clusters with another enforcer: the table is removed.
        #[arg(long, env = "PONTOON_NETWORK_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
        network_policy: bool,
    },
    /// Per pontoon network: pool size, used, free, stale, and every allocation with its owner,
    /// host veth and state.
    Status {
        #[command(flatten)]
        confs: ConfArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Reclaim stale allocations: those whose pontoon veth is gone and that no ADD is making.
    /// Allocations pontoon did not make (inherited from host-local) are never touched.
    Gc {
        #[command(flatten)]
        confs: ConfArgs,
    },
    /// The networks' firewall state (masquerade, hostPort objects and every recorded mapping).
    Firewall {
        #[command(subcommand)]
        action: FirewallAction,
    },
    /// Egress SNAT rules for a pod network (one rule set per network, v4 and v6).
    Masquerade {
        #[command(subcommand)]
        action: MasqAction,
    },
}

#[derive(clap::Args)]
struct MasqArgs {
    /// The network name (as in the conflist's `name`).
    #[arg(long)]
    network: String,
    /// Pod CIDR(s) whose egress is masqueraded (repeat for dual stack).
    #[arg(long = "pod-cidr", required = true)]
    pod_cidrs: Vec<IpNetwork>,
    /// Extra destinations never masqueraded, e.g. the cluster pod CIDR or the service CIDR.
    #[arg(long = "no-masquerade")]
    no_masquerade: Vec<IpNetwork>,
    /// nftables or iptables (default: nftables when `nft` is installed).
    #[arg(long)]
    backend: Option<String>,
}

#[derive(Subcommand)]
enum FirewallAction {
    /// Re-install every pontoon network's firewall state from its config and attachment
    /// records (after `nft flush ruleset`, a firewalld or nftables.service reload, ...).
    Reload {
        #[command(flatten)]
        confs: ConfArgs,
    },
}

#[derive(Subcommand)]
enum MasqAction {
    /// Install (or update) the rules; does nothing when they are current.
    Ensure(MasqArgs),
    /// Exit 0 when the rules are installed and current, 1 otherwise.
    Check(MasqArgs),
    /// Remove the network's rules and nothing else.
    Remove {
        #[arg(long)]
        network: String,
        #[arg(long)]
        backend: Option<String>,
    },
}

/// The operator command line. Returns the exit code.
pub fn operator_main() -> i32 {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(crate::reaper::ARG) {
        let indexes: Vec<u32> = args[2..].iter().filter_map(|a| a.parse().ok()).collect();
        return i32::from(crate::reaper::run(&indexes).is_err());
    }
    logging::init(None, Some("info"));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run_operator(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pontoon: {e}");
            1
        }
    }
}

/// The pontoon plugin entries (as a runtime passes them) configured in `confs`.
fn load_confs(confs: &ConfArgs) -> Result<Vec<NetConf>> {
    let files: Vec<PathBuf> = if confs.conf.is_empty() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&confs.conf_dir)
            .map_err(|e| Error::io(format!("cannot read {}", confs.conf_dir.display()), e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        v.sort();
        v
    } else {
        confs.conf.clone()
    };
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read(&f).map_err(|e| Error::io(format!("cannot read {}", f.display()), e))?;
        let v: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::Decode(format!("{}: {e}", f.display())))?;
        let plugins: Vec<serde_json::Value> = match v.get("plugins").and_then(|p| p.as_array()) {
            Some(list) => list
                .iter()
                .map(|p| {
                    let mut p = p.clone();
                    p["name"] = v["name"].clone();
                    p["cniVersion"] = v["cniVersion"].clone();
                    p
                })
                .collect(),
            None => vec![v.clone()],
        };
        for p in plugins.into_iter().filter(|p| p["type"] == "pontoon") {
            out.push(
                NetConf::parse(p.to_string().as_bytes())
                    .map_err(|e| Error::config(format!("{}: {e}", f.display())))?,
            );
        }
    }
    Ok(out)
}

/// The pontoon networks (with in-process IPAM) configured in `confs`.
fn load_pools(confs: &ConfArgs) -> Result<Vec<Pool>> {
    let mut pools = Vec::new();
    for conf in load_confs(confs)? {
        if let (Some(t), Some(ipam)) = (conf.ipam_type(), &conf.raw.ipam)
            && crate::ipam::IN_PROCESS_TYPES.contains(&t)
        {
            pools.push(Pool::from_config(&conf.name, ipam, None)?);
        }
    }
    Ok(pools)
}

fn print_report(r: &crate::attachment::Report) {
    println!(
        "network {}  ({})\n  pool {}  used {}  free {}  stale {}",
        r.network,
        r.data_dir.join(&r.network).display(),
        r.size,
        r.used,
        r.free,
        r.stale
    );
    if r.allocations.is_empty() {
        return;
    }
    println!(
        "  {:<40} {:<8} {:<16} {:<8} ADDRESSES",
        "CONTAINER", "IFNAME", "HOST VETH", "STATE"
    );
    for a in &r.allocations {
        let ips: Vec<String> = a.ips.iter().map(|i| i.to_string()).collect();
        println!(
            "  {:<40} {:<8} {:<16} {:<8} {}",
            a.container_id,
            a.ifname,
            a.host_veth.as_deref().unwrap_or("-"),
            format!("{:?}", a.state).to_lowercase(),
            ips.join(", ")
        );
    }
}

fn run_operator(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Install { node, node_json } => {
            let mut spec = node.spec();
            spec.pod_cidrs = node.pod_cidrs.clone();
            if spec.pod_cidrs.is_empty() {
                let Some(f) = node_json else {
                    return Err(Error::config(
                        "give this node's pod CIDRs with --pod-cidr (or POD_CIDRS), or a Node \
                         object with --node-json",
                    ));
                };
                let text = std::fs::read(&f)
                    .map_err(|e| Error::io(format!("cannot read {}", f.display()), e))?;
                let v: serde_json::Value = serde_json::from_slice(&text)
                    .map_err(|e| Error::Decode(format!("{}: {e}", f.display())))?;
                spec.pod_cidrs = crate::install::pod_cidrs_of_node(&v)?;
            }
            spec.no_masquerade = node.no_masquerade.clone();
            for c in spec.pod_cidrs.clone() {
                if !spec.no_masquerade.contains(&c) {
                    spec.no_masquerade.push(c);
                }
            }
            let (ch, masq) =
                crate::agent::install_and_firewall(&spec, &crate::install::self_bytes()?)?;
            let said = |b: bool| if b { "installed" } else { "already in place" };
            println!(
                "{}: {}",
                spec.bin_dir.join("pontoon").display(),
                said(ch.binary)
            );
            println!(
                "{}: {}",
                spec.bin_dir.join("loopback").display(),
                said(ch.loopback)
            );
            println!(
                "{}: {}",
                spec.conf_dir.join(&spec.conf_name).display(),
                said(ch.conflist)
            );
            println!("masquerade: {}", said(masq));
            Ok(0)
        }
        Cmd::Uninstall { node, force } => {
            for line in crate::install::uninstall(&node.spec(), force)? {
                println!("{line}");
            }
            Ok(0)
        }
        Cmd::Agent {
            node,
            node_name,
            nodes_file,
            kubeconfig,
            interval,
            listen,
            once,
            routing,
            vxlan_port,
            vxlan_vni,
            vxlan_checksum_offload,
            network_policy,
        } => {
            if vxlan_vni == 0 || vxlan_vni > 0xff_ffff {
                return Err(Error::config(format!(
                    "--vxlan-vni {vxlan_vni} is out of range 1-16777215"
                )));
            }
            let source: Box<dyn crate::agent::NodeSource> = match nodes_file {
                Some(f) => Box::new(crate::agent::StaticFile::new(f)),
                None => crate::agent::kube_source(kubeconfig, network_policy)?,
            };
            let opts = crate::agent::Options {
                node_name,
                pod_cidrs: node.pod_cidrs.clone(),
                no_masquerade: node.no_masquerade.clone(),
                install: node.spec(),
                interval: std::time::Duration::from_secs(interval.max(1)),
                listen: match listen.as_str() {
                    "off" | "" => None,
                    a => Some(a.parse().map_err(|_| {
                        Error::config(format!("--listen {a:?} is not an address:port"))
                    })?),
                },
                once,
                overlay: crate::agent::overlay::Overlay {
                    routing,
                    port: vxlan_port,
                    vni: vxlan_vni,
                    checksum_offload: vxlan_checksum_offload,
                },
                network_policy,
            };
            crate::agent::run(opts, source)
        }
        Cmd::Status { confs, json } => {
            let alive = crate::attachment::link_probe();
            let reports = load_pools(&confs)?
                .iter()
                .map(|p| crate::attachment::report(p, &alive))
                .collect::<Result<Vec<_>>>()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&reports).expect("serialises")
                );
            } else if reports.is_empty() {
                println!("no pontoon network with host-local IPAM found");
            } else {
                for r in &reports {
                    print_report(r);
                }
            }
            Ok(0)
        }
        Cmd::Gc { confs } => {
            let alive = crate::attachment::link_probe();
            for pool in load_pools(&confs)? {
                let reclaimed = crate::attachment::reclaim_stale(&pool, &alive)?;
                if reclaimed.is_empty() {
                    println!("network {}: nothing stale", pool.network);
                }
                for (owner, ips) in reclaimed {
                    let ips: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
                    println!(
                        "network {}: released {} of {owner} (its veth is gone)",
                        pool.network,
                        ips.join(", ")
                    );
                }
            }
            Ok(0)
        }
        Cmd::Firewall {
            action: FirewallAction::Reload { confs },
        } => {
            let confs = load_confs(&confs)?;
            for conf in &confs {
                let fw = crate::firewall::Network::of(conf, &[])?;
                if fw.is_empty() {
                    println!("network {}: no firewall state", conf.name);
                    continue;
                }
                fw.heal()?;
                println!("network {}: firewall state re-installed", conf.name);
            }
            Ok(0)
        }
        Cmd::Masquerade { action } => match action {
            MasqAction::Ensure(a) => {
                let rs = RuleSet::new(&a.network, &a.pod_cidrs, &a.no_masquerade);
                let b = masquerade::backend(a.backend.as_deref())?;
                masquerade::ensure(b.as_ref(), &rs)?;
                let ips: Vec<_> = rs.sources.iter().map(|n| n.ip()).collect();
                masquerade::ensure_forwarding(&ips)?;
                println!(
                    "masquerade for network {} is in place ({}): from {} except to {}",
                    rs.network,
                    b.name(),
                    join(&rs.sources),
                    join(&rs.exclude)
                );
                Ok(0)
            }
            MasqAction::Check(a) => {
                let rs = RuleSet::new(&a.network, &a.pod_cidrs, &a.no_masquerade);
                let b = masquerade::backend(a.backend.as_deref())?;
                if b.is_current(&rs)? {
                    println!(
                        "masquerade for network {} is current ({})",
                        rs.network,
                        b.name()
                    );
                    Ok(0)
                } else {
                    println!(
                        "masquerade for network {} is missing or outdated ({})",
                        rs.network,
                        b.name()
                    );
                    Ok(1)
                }
            }
            MasqAction::Remove { network, backend } => {
                let b = masquerade::backend(backend.as_deref())?;
                b.remove(&network)?;
                println!("masquerade for network {network} removed ({})", b.name());
                Ok(0)
            }
        },
    }
}

fn join(v: &[IpNetwork]) -> String {
    v.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

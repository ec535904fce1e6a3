//! The CNI verbs, composing the protocol, the address pool and the dataplane. The only place
//! that knows the order of steps, and how each ADD step is undone when a later one fails.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::Value;

use crate::attachment;
use crate::cni::result::{Interface, IpConfig, Route};
use crate::cni::{self, CniResult, Command, Env, NetConf, Version};
use crate::dataplane::{self, BridgeSpec, Netlink, PodSpec, PortSpec, RouteSpec};
use crate::error::{Error, ErrorList, Result};
use crate::firewall;
use crate::ipam::{self, Owner, Pool};
use crate::netns::NetNs;

/// Where a network's addresses come from.
enum Ipam {
    /// No `ipam`: an L2-only network.
    None,
    /// host-local, in-process.
    Pool(Pool),
    /// Another IPAM plugin, exec'ed from CNI_PATH.
    Delegate(String),
}

impl Ipam {
    fn from_conf(conf: &NetConf) -> Result<Ipam> {
        match (conf.ipam_type(), &conf.raw.ipam) {
            (None, _) | (_, None) => Ok(Ipam::None),
            (Some(t), Some(v)) if ipam::IN_PROCESS_TYPES.contains(&t) => Ok(Ipam::Pool(
                Pool::from_config(&conf.name, v, conf.raw.runtime_config.ip_ranges.as_ref())?,
            )),
            (Some(t), Some(_)) => Ok(Ipam::Delegate(t.to_string())),
        }
    }
}

/// The addresses, routes and DNS an attachment gets from IPAM.
struct Addressing {
    ips: Vec<(IpNetwork, Option<IpAddr>)>,
    routes: Vec<Route>,
    dns: cni::result::Dns,
}

/// Runs one CNI invocation; `Some(json)` is printed on stdout.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>> {
    if env.command == Command::Version {
        return Ok(Some(cni::version_answer(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    match env.command {
        Command::Add => add(env, &conf, stdin).map(Some),
        Command::Del => del(env, &conf, stdin).map(|_| None),
        Command::Check => {
            require(conf.version.has_check(), &conf, "CHECK", "0.4.0")?;
            check(env, &conf).map(|_| None)
        }
        Command::Gc => {
            require(conf.version.has_gc_status(), &conf, "GC", "1.1.0")?;
            gc(env, &conf, stdin).map(|_| None)
        }
        Command::Status => {
            require(conf.version.has_gc_status(), &conf, "STATUS", "1.1.0")?;
            status(env, &conf, stdin).map(|_| None)
        }
        Command::Version => unreachable!(),
    }
}

fn require(ok: bool, conf: &NetConf, verb: &str, since: &str) -> Result<()> {
    if ok {
        return Ok(());
    }
    Err(Error::IncompatibleVersion {
        version: conf.version.to_string(),
        supported: format!("{verb} needs cniVersion {since} or later"),
    })
}

fn owner(env: &Env) -> Owner {
    Owner::new(&env.container_id, &env.ifname)
}

// ---------------------------------------------------------------------------------------------
// ADD

fn add(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<Value> {
    // Validate every input before anything is touched.
    let mac = conf.requested_mac(env.args.mac.as_deref())?;
    let requested = conf.requested_ips(&env.args.ips)?;
    let ipam = Ipam::from_conf(conf)?;
    if !conf.raw.runtime_config.port_mappings.is_empty() && !matches!(ipam, Ipam::Pool(_)) {
        return Err(Error::UnsupportedField {
            key: "runtimeConfig.portMappings".into(),
            msg: "hostPort mappings need the in-process host-local IPAM".into(),
        });
    }
    if matches!(ipam, Ipam::None) && !requested.is_empty() {
        return Err(Error::config(
            "addresses were requested but the network has no `ipam`",
        ));
    }
    let netns_path = env
        .netns
        .as_deref()
        .ok_or_else(|| Error::env("CNI_NETNS", "is required for ADD"))?;
    let netns = NetNs::open(netns_path)?.ok_or_else(|| {
        Error::Netns(format!(
            "network namespace {} does not exist",
            netns_path.display()
        ))
    })?;
    let mut nl = Netlink::new()?;

    // 1. The attachment's record and addresses. Everything after this is undone if a later
    //    step fails.
    let addressing = allocate(&ipam, env, conf, stdin, &requested)?;
    let attached = (|| {
        let addrs: Vec<IpNetwork> = addressing.ips.iter().map(|(n, _)| *n).collect();
        let fw = firewall::Network::of(conf, &addrs)?;
        // 2. Bridge, firewall state, veth pair, pod interface.
        let (result, ifindex, port) = attach(env, conf, &mut nl, &netns, mac, &addressing, &fw)?;
        // 3. The record is complete: hostPort mappings and the MAC spoof check in, lease
        //    dropped. Without a pool there is no record: the check is keyed by the veth name.
        match &ipam {
            Ipam::Pool(pool) => attachment::complete(pool, &owner(env), &fw, ifindex, Some(port))?,
            _ => {
                if let Some(mac) = port
                    .mac_spoof_check
                    .as_deref()
                    .and_then(cni::config::parse_mac)
                {
                    let mut b = crate::nft::Batch::new();
                    crate::macspoof::add(
                        &mut b,
                        &dataplane::host_veth_name(&env.container_id, &env.ifname),
                        &mac,
                    );
                    crate::nft::Conn::new()?.commit(&b)?;
                }
            }
        }
        Ok(result)
    })();
    match attached {
        Ok(result) => Ok(result.to_json(conf.version)),
        Err(e) => {
            if let Err(cleanup) = release(&ipam, conf, env, stdin, &mut nl) {
                log::error!("ADD failed and its cleanup failed too: {cleanup}");
            }
            Err(e)
        }
    }
}

fn allocate(
    ipam: &Ipam,
    env: &Env,
    conf: &NetConf,
    stdin: &[u8],
    requested: &[IpAddr],
) -> Result<Addressing> {
    match ipam {
        Ipam::None => Ok(Addressing {
            ips: vec![],
            routes: vec![],
            dns: Default::default(),
        }),
        Ipam::Pool(pool) => {
            // Record the veth and mappings this ADD makes, and let a full pool reclaim
            // attachments whose pod is gone (lost to a crash or a reboot without DEL).
            let host_veth = dataplane::host_veth_name(&env.container_id, &env.ifname);
            let req = attachment::Request {
                requested,
                mappings: &conf.raw.runtime_config.port_mappings,
                host_veth: Some(&host_veth),
                alive: Some(attachment::link_probe()),
                pod: attachment::PodRef::from_args(&env.args),
            };
            let got = attachment::begin(pool, &owner(env), &req)?;
            Ok(Addressing {
                ips: got
                    .addrs
                    .iter()
                    .map(|a| (a.address, Some(a.gateway)))
                    .collect(),
                routes: pool.routes.clone(),
                dns: pool.dns.clone(),
            })
        }
        Ipam::Delegate(t) => {
            let r = ipam::delegate::add(t, env, stdin, conf.version)?;
            if r.ips.is_empty() {
                let _ = ipam::delegate::exec(t, "DEL", env, stdin);
                return Err(Error::Delegate(
                    format!("IPAM plugin {t} returned no IP addresses"),
                    crate::error::code::DELEGATE,
                ));
            }
            Ok(Addressing {
                ips: r.ips.iter().map(|i| (i.address, i.gateway)).collect(),
                routes: r.routes,
                dns: r.dns,
            })
        }
    }
}

/// Releases the attachment: with the in-process pool, everything its record holds (the one
/// release of [`attachment::release`]); otherwise the veth by its name and the delegated IPAM's
/// addresses. A veth pontoon did not make (no record of one, e.g. the reference bridge
/// plugin's) is looked for inside the pod.
fn release(ipam: &Ipam, conf: &NetConf, env: &Env, stdin: &[u8], nl: &mut Netlink) -> Result<()> {
    let mut errs = ErrorList::default();
    let host_name = dataplane::host_veth_name(&env.container_id, &env.ifname);
    let found_veth = match ipam {
        Ipam::Pool(pool) => errs
            .check(attachment::release(pool, &owner(env)))
            .map(|r| r.veth),
        _ => {
            if conf.raw.macspoofchk {
                errs.check(
                    crate::nft::Conn::new()
                        .and_then(|mut c| crate::macspoof::remove(&mut c, &host_name)),
                );
            }
            errs.check(dataplane::detach(nl, &host_name))
        }
    };
    if found_veth == Some(false)
        && let Some(path) = &env.netns
    {
        match NetNs::open(path) {
            Ok(Some(ns)) => {
                errs.check(dataplane::detach_in_pod(&ns, &env.ifname));
            }
            Ok(None) => {}
            Err(e) => log::info!("DEL: ignoring unusable CNI_NETNS: {e}"),
        }
    }
    if let Ipam::Delegate(t) = ipam {
        errs.check(ipam::delegate::exec(t, "DEL", env, stdin).map(|_| ()));
    }
    errs.into_result()
}

/// The pod's routes: IPAM's, plus a default route per family via the gateway when
/// `isDefaultGateway`.
fn pod_routes(conf: &NetConf, a: &Addressing) -> Result<Vec<Route>> {
    let mut routes = a.routes.clone();
    if conf.raw.is_default_gateway {
        for (net, gw) in &a.ips {
            let Some(gw) = gw else { continue };
            let any: IpNetwork = if net.is_ipv4() {
                "0.0.0.0/0".parse().unwrap()
            } else {
                "::/0".parse().unwrap()
            };
            match routes.iter().find(|r| r.dst == any) {
                Some(r) if r.gw.is_some_and(|g| g != *gw) => {
                    return Err(Error::config(format!(
                        "isDefaultGateway conflicts with the IPAM default route via {}",
                        r.gw.unwrap()
                    )));
                }
                Some(_) => {}
                None => routes.push(Route::new(any, Some(*gw))),
            }
        }
    }
    Ok(routes)
}

fn attach(
    env: &Env,
    conf: &NetConf,
    nl: &mut Netlink,
    netns: &NetNs,
    mac: Option<[u8; 6]>,
    a: &Addressing,
    fw: &firewall::Network,
) -> Result<(CniResult, u32, attachment::Port)> {
    let gateways: Vec<IpNetwork> = if conf.is_gateway() {
        a.ips
            .iter()
            .filter_map(|(net, gw)| gw.map(|g| IpNetwork::new(g, net.prefix()).unwrap()))
            .collect()
    } else {
        vec![]
    };
    let trunk = conf.vlan_trunk()?;
    let vlan = conf.raw.vlan;
    let bridge = dataplane::ensure_bridge(
        nl,
        &BridgeSpec {
            name: conf.bridge_name(),
            mtu: conf.raw.mtu,
            promisc: conf.raw.promisc_mode,
            gateways,
            force_address: conf.raw.force_address,
            vlan_filtering: vlan != 0 || !trunk.is_empty(),
            gateway_vlan: vlan,
        },
    )?;
    if conf.is_gateway() {
        dataplane::enable_forwarding(
            a.ips.iter().any(|(n, _)| n.is_ipv4()),
            a.ips.iter().any(|(n, _)| n.is_ipv6()),
        )?;
    }
    if !fw.is_empty() {
        fw.ensure()?;
    }
    let routes = pod_routes(conf, a)?;
    let route_specs: Vec<RouteSpec> = routes
        .iter()
        .map(|r| RouteSpec {
            protocol: None,
            dst: r.dst,
            // A route without `gw` goes via the gateway of its family, as in the reference.
            gw: r.gw.or_else(|| {
                a.ips
                    .iter()
                    .find(|(n, _)| n.is_ipv4() == r.dst.is_ipv4())
                    .and_then(|(_, g)| *g)
            }),
            oif: None,
            priority: r.priority,
            table: r.table,
            scope: r.scope,
            mtu: r.mtu,
            advmss: r.advmss,
            onlink: false,
        })
        .collect();
    let host_name = dataplane::host_veth_name(&env.container_id, &env.ifname);
    let mtu = conf.raw.mtu.unwrap_or(bridge.link.mtu);
    let (ingress, egress) = conf.shaping()?;
    let port = PortSpec {
        // A pod reaching its own hostPort through the node comes back out its own port.
        hairpin: conf.raw.hairpin_mode || !conf.raw.runtime_config.port_mappings.is_empty(),
        isolated: conf.raw.port_isolation,
        vlan,
        trunk,
        preserve_default_vlan: conf.preserve_default_vlan(),
        ingress,
    };
    let att = dataplane::attach(
        nl,
        &bridge.link,
        netns,
        &host_name,
        &port,
        &PodSpec {
            ifname: &env.ifname,
            mac,
            addrs: a.ips.iter().map(|(n, _)| *n).collect(),
            routes: if conf.raw.disable_container_interface {
                vec![]
            } else {
                route_specs
            },
            dad: conf.raw.enabledad,
            mtu,
            up: !conf.raw.disable_container_interface,
            egress,
        },
    )?;
    let record = attachment::Port {
        vlan: port.vlan,
        vlan_trunk: port.trunk.clone(),
        isolated: port.isolated,
        mac_spoof_check: conf
            .raw
            .macspoofchk
            .then(|| cni::config::format_mac(&att.pod.mac)),
        ingress_rate: ingress.map(|s| s.rate_bytes),
        egress_rate: egress.map(|s| s.rate_bytes),
    };
    let dns = match &conf.raw.dns {
        Some(d) if !d.is_empty() => d.clone(),
        _ => a.dns.clone(),
    };
    let mut result = CniResult {
        interfaces: vec![
            Interface {
                name: bridge.link.name.clone(),
                mac: cni::config::format_mac(&bridge.link.mac),
                ..Default::default()
            },
            Interface {
                name: att.host.name.clone(),
                mac: cni::config::format_mac(&att.host.mac),
                mtu: Some(att.host.mtu),
                ..Default::default()
            },
            Interface {
                name: env.ifname.clone(),
                mac: cni::config::format_mac(&att.pod.mac),
                mtu: Some(att.pod.mtu),
                sandbox: netns.path().display().to_string(),
                ..Default::default()
            },
        ],
        ips: a
            .ips
            .iter()
            .map(|(net, gw)| IpConfig {
                interface: Some(2),
                address: *net,
                gateway: *gw,
            })
            .collect(),
        routes,
        dns,
    };
    // As the reference: the VLAN device holding the gateway is listed after the pod's interface.
    if let Some(gw) = bridge.gateway.filter(|g| g.index != bridge.link.index) {
        result.interfaces.push(Interface {
            name: gw.name.clone(),
            mac: cni::config::format_mac(&gw.mac),
            ..Default::default()
        });
    }
    Ok((result, att.host.index, record))
}

// ---------------------------------------------------------------------------------------------
// DEL

fn del(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<()> {
    // Decoding errors of the IPAM config still fail DEL: nothing could be released otherwise.
    let ipam = Ipam::from_conf(conf)?;
    let mut nl = Netlink::new()?;
    release(&ipam, conf, env, stdin, &mut nl)
}

// ---------------------------------------------------------------------------------------------
// CHECK

fn check(env: &Env, conf: &NetConf) -> Result<()> {
    let prev = conf
        .prev_result()?
        .ok_or_else(|| Error::config("CHECK needs `prevResult` (the ADD result)"))?;
    let netns_path = env.netns.as_deref().unwrap();
    let netns = NetNs::open(netns_path)?.ok_or_else(|| {
        Error::CheckFailed(format!(
            "network namespace {} is gone",
            netns_path.display()
        ))
    })?;
    let fail = |m: String| Err(Error::CheckFailed(m));

    // Expected pod interface and addresses from prevResult.
    let pod_idx = prev.interfaces.iter().position(|i| {
        i.name == env.ifname && (i.sandbox.is_empty() || i.sandbox == netns_path.to_string_lossy())
    });
    let want_ips: Vec<IpNetwork> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || ip.interface == pod_idx)
        .map(|ip| ip.address)
        .collect();

    // The pool must still hold them for this attachment.
    let ipam = Ipam::from_conf(conf)?;
    let record = match &ipam {
        Ipam::Pool(pool) => attachment::held(pool, &owner(env))?,
        _ => None,
    };
    if let Ipam::Pool(_) = &ipam {
        let held = record.as_ref().map(|r| r.ips.clone()).unwrap_or_default();
        for ip in &want_ips {
            if !held.contains(&ip.ip()) {
                return fail(format!(
                    "the address pool does not hold {} for {}",
                    ip.ip(),
                    owner(env)
                ));
            }
        }
    }

    let mut nl = Netlink::new()?;
    let Some(bridge) = nl.link_by_name(conf.bridge_name())? else {
        return fail(format!("bridge {} is missing", conf.bridge_name()));
    };
    if bridge.kind.as_deref() != Some("bridge") {
        return fail(format!("{} is not a bridge", conf.bridge_name()));
    }
    let host_name = dataplane::host_veth_name(&env.container_id, &env.ifname);
    let Some(host) = nl.link_by_name(&host_name)? else {
        return fail(format!("host veth {host_name} is missing"));
    };
    if host.master != Some(bridge.index) {
        return fail(format!(
            "host veth {host_name} is not on bridge {}",
            bridge.name
        ));
    }
    let mut pod_nl = netns.run(Netlink::new)?;
    let Some(pod) = pod_nl.link_by_name(&env.ifname)? else {
        return fail(format!(
            "interface {} is missing in {}",
            env.ifname,
            netns_path.display()
        ));
    };
    if pod.kind.as_deref() != Some("veth") {
        return fail(format!("{} is not a veth", env.ifname));
    }
    if host.peer_index != Some(pod.index) {
        return fail(format!("{} is not the peer of {host_name}", env.ifname));
    }
    if let Some(i) = pod_idx
        && !prev.interfaces[i].mac.is_empty()
        && !prev.interfaces[i]
            .mac
            .eq_ignore_ascii_case(&cni::config::format_mac(&pod.mac))
    {
        return fail(format!(
            "{} has MAC {}, the ADD result says {}",
            env.ifname,
            cni::config::format_mac(&pod.mac),
            prev.interfaces[i].mac
        ));
    }
    check_port(conf, &mut nl, &host, &mut pod_nl, &pod)?;
    let have = pod_nl.addrs(pod.index, None)?;
    for ip in &want_ips {
        if !have
            .iter()
            .any(|a| a.net.ip() == ip.ip() && a.net.prefix() == ip.prefix())
        {
            return fail(format!("address {ip} is missing on {}", env.ifname));
        }
    }
    for v4 in [true, false] {
        let wanted: Vec<&Route> = prev
            .routes
            .iter()
            .filter(|r| r.dst.is_ipv4() == v4)
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let routes = pod_nl.routes(v4)?;
        for r in wanted {
            let found = routes.iter().any(|x| {
                x.dst == IpNetwork::new(r.dst.network(), r.dst.prefix()).unwrap()
                    && (r.gw.is_none() || x.gw == r.gw)
            });
            if !found {
                return fail(format!(
                    "route {}{} is missing in the pod",
                    r.dst,
                    r.gw.map(|g| format!(" via {g}")).unwrap_or_default()
                ));
            }
        }
    }
    let fw = firewall::Network::of(conf, &want_ips)?;
    if !fw.is_empty() {
        fw.check(
            record
                .as_ref()
                .map(|r| r.port_mappings.as_slice())
                .unwrap_or(&[]),
        )?;
    }
    Ok(())
}

/// CHECK of what the bridge keys and the `bandwidth` capability made: port isolation, VLANs,
/// shaping on both ends, the pod interface's state and the MAC spoof check.
fn check_port(
    conf: &NetConf,
    nl: &mut Netlink,
    host: &dataplane::Link,
    pod_nl: &mut Netlink,
    pod: &dataplane::Link,
) -> Result<()> {
    let fail = |m: String| Err(Error::CheckFailed(m));
    if host.port_isolated != conf.raw.port_isolation {
        return fail(format!(
            "bridge port {} is {}isolated, the config says portIsolation: {}",
            host.name,
            if host.port_isolated { "" } else { "not " },
            conf.raw.port_isolation
        ));
    }
    let trunk = conf.vlan_trunk()?;
    if conf.raw.vlan != 0 || !trunk.is_empty() {
        let have = nl.port_vlans(host.index)?;
        if conf.raw.vlan != 0 && !have.contains(&(conf.raw.vlan, true)) {
            return fail(format!(
                "bridge port {} does not have VLAN {} as its PVID",
                host.name, conf.raw.vlan
            ));
        }
        if let Some(t) = trunk.iter().find(|t| !have.iter().any(|(v, _)| v == *t)) {
            return fail(format!(
                "bridge port {} does not carry trunk VLAN {t}",
                host.name
            ));
        }
    }
    let (ingress, egress) = conf.shaping()?;
    for (shape, link, nl, what) in [
        (ingress, host, &mut *nl, "to the pod"),
        (egress, pod, pod_nl, "from the pod"),
    ] {
        let Some(s) = shape else { continue };
        let have = dataplane::shaped_rate(nl, link.index)?;
        if have != Some(s.rate_bytes) {
            return fail(format!(
                "traffic {what} is not shaped to {} bit/s on {} (found {})",
                s.rate_bytes * 8,
                link.name,
                have.map(|r| format!("{} bit/s", r * 8))
                    .unwrap_or_else(|| "no tbf".into())
            ));
        }
    }
    if pod.up == conf.raw.disable_container_interface {
        return fail(format!(
            "{} is {}, the config says disableContainerInterface: {}",
            pod.name,
            if pod.up { "up" } else { "down" },
            conf.raw.disable_container_interface
        ));
    }
    if conf.raw.macspoofchk
        && !crate::macspoof::is_current(&mut crate::nft::Conn::new()?, &host.name, &pod.mac)?
    {
        return fail(format!(
            "the MAC spoof check of {} (only {} may send) is missing or changed",
            host.name,
            cni::config::format_mac(&pod.mac)
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GC and STATUS

fn gc(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<()> {
    // Without the key nothing is valid, as libcni's GCNetworkList without arguments means
    // ("all attachments should be GC'ed").
    let valid: HashSet<Owner> = conf
        .valid_attachments()
        .unwrap_or_default()
        .iter()
        .map(|a| Owner::new(&a.container_id, &a.ifname))
        .collect();
    match Ipam::from_conf(conf)? {
        Ipam::Pool(pool) => {
            for (o, ips) in attachment::gc(&pool, &valid)? {
                log::info!("GC released {ips:?} of {o}");
            }
            Ok(())
        }
        Ipam::Delegate(t) => ipam::delegate::exec(&t, "GC", env, stdin).map(|_| ()),
        // Without records there is nothing to tell this network's veths from another's.
        Ipam::None => Ok(()),
    }
}

fn status(env: &Env, conf: &NetConf, stdin: &[u8]) -> Result<()> {
    match Ipam::from_conf(conf)? {
        Ipam::Pool(pool) => attachment::status(&pool, &attachment::link_probe()),
        Ipam::Delegate(t) => ipam::delegate::exec(&t, "STATUS", env, stdin).map(|_| ()),
        Ipam::None => Ok(()),
    }
}

/// The spec version to print errors in: the config's when it is readable.
pub fn reply_version(stdin: &[u8]) -> String {
    cni::config::sniff_version(stdin).unwrap_or_else(|| Version::V1_1_0.as_str().to_string())
}

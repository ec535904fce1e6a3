//! NetworkPolicy (`networking.k8s.io/v1`): the cluster's pods, namespaces and policies as the
//! agent keeps them, and what they mean for this node's pods, per the API's rules:
//!
//! - a pod is isolated for ingress (egress) when a policy of its namespace selects it with that
//!   policy type (`policyTypes`; absent: Ingress, plus Egress when the policy has egress rules);
//! - isolated traffic is allowed when any selecting policy's rule allows it (union);
//! - a rule's peers: a pod selector (in the policy's namespace), a namespace selector (any pod
//!   there), both (AND), or an ipBlock with excepts; no peers: everyone; its ports: numbers,
//!   named ports (the target pod's, so for egress each destination pod's own), `endPort`, TCP,
//!   UDP and SCTP; no ports: every port and protocol.
//!
//! [`compile`] turns that into, per local pod and direction, the set of (peer address range,
//! protocol range, port range) boxes it may talk to, made disjoint so the kernel can hold them
//! in one interval set per pod ([`nft`] renders and applies them).

pub mod nft;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::Value;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;

/// A label selector: matchLabels and matchExpressions, ANDed. Empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub labels: BTreeMap<String, String>,
    pub exprs: Vec<(String, Op, Vec<String>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    fn parse(v: &Value) -> Result<Selector, String> {
        let mut s = Selector::default();
        if let Some(m) = v["matchLabels"].as_object() {
            for (k, val) in m {
                s.labels
                    .insert(k.clone(), val.as_str().unwrap_or_default().to_string());
            }
        }
        for e in v["matchExpressions"].as_array().into_iter().flatten() {
            let key = e["key"].as_str().unwrap_or_default().to_string();
            let op = match e["operator"].as_str() {
                Some("In") => Op::In,
                Some("NotIn") => Op::NotIn,
                Some("Exists") => Op::Exists,
                Some("DoesNotExist") => Op::DoesNotExist,
                other => return Err(format!("unknown selector operator {other:?}")),
            };
            let values = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(String::from))
                .collect();
            s.exprs.push((key, op, values));
        }
        Ok(s)
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.exprs.iter().all(|(k, op, values)| {
                let have = labels.get(k);
                match op {
                    Op::In => have.is_some_and(|h| values.contains(h)),
                    Op::NotIn => have.is_none_or(|h| !values.contains(h)),
                    Op::Exists => have.is_some(),
                    Op::DoesNotExist => have.is_none(),
                }
            })
    }
}

/// What the agent keeps of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// Named container ports: (name, protocol, port).
    pub ports: Vec<(String, u8, u16)>,
}

fn proto_of(s: Option<&str>) -> Result<u8, String> {
    match s.unwrap_or("TCP") {
        "TCP" => Ok(TCP),
        "UDP" => Ok(UDP),
        "SCTP" => Ok(SCTP),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

impl Pod {
    /// From a Pod object; `None` for a pod that is finished (its addresses may already belong
    /// to another pod) or not yet scheduled with no addresses. A scheduled pod without
    /// addresses in its status is kept: its node's agent learns them from the attachment
    /// record (see [`fill_from_records`]).
    pub fn from_json(v: &Value) -> Option<Pod> {
        let phase = v["status"]["phase"].as_str().unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            return None;
        }
        let mut ips: Vec<IpAddr> = v["status"]["podIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["ip"].as_str()?.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = v["status"]["podIP"].as_str().and_then(|s| s.parse().ok())
        {
            ips.push(ip);
        }
        let node = v["spec"]["nodeName"].as_str().unwrap_or_default();
        if ips.is_empty() && node.is_empty() {
            return None;
        }
        let mut ports = vec![];
        for c in v["spec"]["containers"].as_array().into_iter().flatten() {
            for p in c["ports"].as_array().into_iter().flatten() {
                let (Some(name), Some(port)) = (p["name"].as_str(), p["containerPort"].as_u64())
                else {
                    continue;
                };
                if let Ok(proto) = proto_of(p["protocol"].as_str()) {
                    ports.push((name.to_string(), proto, port as u16));
                }
            }
        }
        Some(Pod {
            namespace: v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
            name: v["metadata"]["name"].as_str()?.to_string(),
            uid: v["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            node: node.to_string(),
            labels: labels_of(v),
            ips,
            host_network: v["spec"]["hostNetwork"].as_bool().unwrap_or(false),
            ports,
        })
    }

    fn port_named(&self, name: &str, proto: u8) -> Option<u16> {
        self.ports
            .iter()
            .find(|(n, p, _)| n == name && *p == proto)
            .map(|(_, _, port)| *port)
    }
}

/// A rule's port: a protocol and a number (or a container port's name), up to `end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub proto: u8,
    pub port: Option<PortRef>,
    pub end: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Pods: the selector in the policy's namespace (`ns` None), or in the namespaces the
    /// namespace selector matches (a missing pod selector: every pod there).
    Pods {
        pods: Option<Selector>,
        namespaces: Option<Selector>,
    },
    Block {
        cidr: IpNetwork,
        except: Vec<IpNetwork>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// Empty: every peer.
    pub peers: Vec<Peer>,
    /// Empty: every port and protocol.
    pub ports: Vec<Port>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub selector: Selector,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

fn parse_rules(v: &Value, peers_key: &str) -> Result<Vec<Rule>, String> {
    let mut out = vec![];
    for r in v.as_array().into_iter().flatten() {
        let mut rule = Rule::default();
        for p in r[peers_key].as_array().into_iter().flatten() {
            if p["ipBlock"].is_object() {
                let cidr: IpNetwork = p["ipBlock"]["cidr"]
                    .as_str()
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e| format!("ipBlock cidr: {e}"))?;
                let except = p["ipBlock"]["except"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        e.as_str()
                            .unwrap_or_default()
                            .parse::<IpNetwork>()
                            .map_err(|e| format!("ipBlock except: {e}"))
                    })
                    .collect::<Result<_, _>>()?;
                rule.peers.push(Peer::Block { cidr, except });
            } else {
                let sel = |k: &str| -> Result<Option<Selector>, String> {
                    if p[k].is_object() {
                        Selector::parse(&p[k]).map(Some)
                    } else {
                        Ok(None)
                    }
                };
                rule.peers.push(Peer::Pods {
                    pods: sel("podSelector")?,
                    namespaces: sel("namespaceSelector")?,
                });
            }
        }
        for p in r["ports"].as_array().into_iter().flatten() {
            let port = match &p["port"] {
                Value::Number(n) => Some(PortRef::Number(n.as_u64().unwrap_or(0) as u16)),
                Value::String(s) => Some(match s.parse::<u16>() {
                    Ok(n) => PortRef::Number(n),
                    Err(_) => PortRef::Name(s.clone()),
                }),
                _ => None,
            };
            rule.ports.push(Port {
                proto: proto_of(p["protocol"].as_str())?,
                port,
                end: p["endPort"].as_u64().map(|e| e as u16),
            });
        }
        out.push(rule);
    }
    Ok(out)
}

impl Policy {
    pub fn from_json(v: &Value) -> Result<Policy, String> {
        let spec = &v["spec"];
        let types: Vec<&str> = spec["policyTypes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .collect();
        let has_egress_rules = spec["egress"].as_array().is_some_and(|a| !a.is_empty());
        let (ingress, egress) = if types.is_empty() {
            (true, has_egress_rules)
        } else {
            (types.contains(&"Ingress"), types.contains(&"Egress"))
        };
        Ok(Policy {
            namespace: v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
            name: v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            selector: Selector::parse(&spec["podSelector"])?,
            ingress: if ingress {
                Some(parse_rules(&spec["ingress"], "from")?)
            } else {
                None
            },
            egress: if egress {
                Some(parse_rules(&spec["egress"], "to")?)
            } else {
                None
            },
        })
    }
}

/// The cluster as the agent keeps it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub pods: BTreeMap<(String, String), Pod>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub policies: BTreeMap<(String, String), Policy>,
}

/// An inclusive range of addresses of one family, as u128 (IPv4 in the low 32 bits).
pub type Range = (u128, u128);

/// One allowed box: peer addresses × protocols × ports, all inclusive ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cell {
    pub addr: Range,
    pub proto: (u8, u8),
    pub port: (u16, u16),
}

/// What a local pod may exchange, per direction: `None` when it is not isolated; else the
/// allowed cells per family (`true`: IPv4), disjoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRules {
    pub ips: Vec<IpAddr>,
    pub ingress: Option<BTreeMap<bool, Vec<Cell>>>,
    pub egress: Option<BTreeMap<bool, Vec<Cell>>>,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}

fn net_range(n: &IpNetwork) -> Range {
    let bits = if n.is_ipv4() { 32 } else { 128 };
    let host = bits - u32::from(n.prefix());
    let lo = to_u128(n.network());
    let span = if host >= 128 {
        u128::MAX
    } else {
        (1u128 << host) - 1
    };
    (lo, lo | span)
}

/// `r` minus `cut`.
fn subtract(ranges: Vec<Range>, cut: Range) -> Vec<Range> {
    let mut out = vec![];
    for (lo, hi) in ranges {
        if cut.1 < lo || cut.0 > hi {
            out.push((lo, hi));
            continue;
        }
        if cut.0 > lo {
            out.push((lo, cut.0 - 1));
        }
        if cut.1 < hi {
            out.push((cut.1 + 1, hi));
        }
    }
    out
}

/// Sorted, merged (overlapping and adjacent joined).
fn merge(mut v: Vec<Range>) -> Vec<Range> {
    v.sort();
    let mut out: Vec<Range> = vec![];
    for (lo, hi) in v {
        if let Some(last) = out.last_mut()
            && lo <= last.1.saturating_add(1)
        {
            last.1 = last.1.max(hi);
            continue;
        }
        out.push((lo, hi));
    }
    out
}

/// A peer's addresses per family, given the policy's namespace.
fn peer_addrs<'c>(
    c: &'c Cluster,
    policy_ns: &str,
    peer: &Peer,
) -> Vec<(bool, Range, Option<&'c Pod>)> {
    match peer {
        Peer::Block { cidr, except } => {
            let mut r = vec![net_range(cidr)];
            for e in except.iter().filter(|e| e.is_ipv4() == cidr.is_ipv4()) {
                r = subtract(r, net_range(e));
            }
            r.into_iter().map(|x| (cidr.is_ipv4(), x, None)).collect()
        }
        Peer::Pods { pods, namespaces } => c
            .pods
            .values()
            .filter(|p| !p.host_network)
            .filter(|p| match namespaces {
                None => p.namespace == policy_ns,
                Some(sel) => c
                    .namespaces
                    .get(&p.namespace)
                    .is_some_and(|labels| sel.matches(labels)),
            })
            .filter(|p| pods.as_ref().is_none_or(|s| s.matches(&p.labels)))
            .flat_map(|p| {
                p.ips.iter().map(move |ip| {
                    let a = to_u128(*ip);
                    (ip.is_ipv4(), (a, a), Some(p))
                })
            })
            .collect(),
    }
}

/// The (protocol range, port range) pairs of a rule's ports for a pod that resolves names.
fn port_boxes(ports: &[Port], named: Option<&Pod>) -> Vec<((u8, u8), (u16, u16))> {
    if ports.is_empty() {
        return vec![((0, 255), (0, 65535))];
    }
    ports
        .iter()
        .filter_map(|p| {
            let (lo, hi) = match &p.port {
                None => (0, 65535),
                Some(PortRef::Number(n)) => (*n, p.end.unwrap_or(*n).max(*n)),
                Some(PortRef::Name(name)) => {
                    let n = named?.port_named(name, p.proto)?;
                    (n, n)
                }
            };
            Some(((p.proto, p.proto), (lo, hi)))
        })
        .collect()
}

/// Disjoint cells covering the union of `boxes`, per family: elementary segments of the
/// protocol and port axes, the merged address ranges in each, adjacent port segments with the
/// same addresses joined.
fn disjoint(boxes: Vec<(bool, Cell)>) -> BTreeMap<bool, Vec<Cell>> {
    let mut out: BTreeMap<bool, Vec<Cell>> = BTreeMap::new();
    for fam in [true, false] {
        let mine: Vec<Cell> = boxes
            .iter()
            .filter(|(f, _)| *f == fam)
            .map(|(_, c)| *c)
            .collect();
        out.insert(fam, vec![]);
        if mine.is_empty() {
            continue;
        }
        let cuts = |lo: fn(&Cell) -> u32, hi: fn(&Cell) -> u32, max: u32| {
            let mut b: BTreeSet<u32> = BTreeSet::new();
            b.insert(0);
            for c in &mine {
                b.insert(lo(c));
                if hi(c) < max {
                    b.insert(hi(c) + 1);
                }
            }
            let v: Vec<u32> = b.into_iter().collect();
            v.iter()
                .enumerate()
                .map(|(i, s)| (*s, v.get(i + 1).map(|n| n - 1).unwrap_or(max)))
                .collect::<Vec<_>>()
        };
        let protos = cuts(|c| c.proto.0 as u32, |c| c.proto.1 as u32, 255);
        let ports = cuts(|c| c.port.0 as u32, |c| c.port.1 as u32, 65535);
        let cells = out.get_mut(&fam).unwrap();
        for (plo, phi) in &protos {
            let mut prev: Option<(Vec<Range>, u32, u32)> = None;
            let flush = |prev: &mut Option<(Vec<Range>, u32, u32)>, cells: &mut Vec<Cell>| {
                if let Some((addrs, lo, hi)) = prev.take() {
                    for a in addrs {
                        cells.push(Cell {
                            addr: a,
                            proto: (*plo as u8, *phi as u8),
                            port: (lo as u16, hi as u16),
                        });
                    }
                }
            };
            for (qlo, qhi) in &ports {
                let addrs = merge(
                    mine.iter()
                        .filter(|c| {
                            c.proto.0 as u32 <= *plo
                                && *phi <= c.proto.1 as u32
                                && c.port.0 as u32 <= *qlo
                                && *qhi <= c.port.1 as u32
                        })
                        .map(|c| c.addr)
                        .collect(),
                );
                match &mut prev {
                    Some((a, _, hi)) if *a == addrs && *hi + 1 == *qlo => *hi = *qhi,
                    _ => {
                        flush(&mut prev, cells);
                        if !addrs.is_empty() {
                            prev = Some((addrs, *qlo, *qhi));
                        }
                    }
                }
            }
            flush(&mut prev, cells);
        }
    }
    out
}

fn rules_in(p: &Policy) -> Option<&Vec<Rule>> {
    p.ingress.as_ref()
}

fn rules_out(p: &Policy) -> Option<&Vec<Rule>> {
    p.egress.as_ref()
}

/// One rule's peers: (IPv4?, address range, the pod when the peer is a pod).
type Peers<'c> = Vec<(bool, Range, Option<&'c Pod>)>;

/// The boxes one rule allows for `target` (named ports of ingress rules are the target's;
/// those of egress rules are each peer's, so egress boxes never depend on the target).
fn rule_boxes(
    c: &Cluster,
    r: &Rule,
    peers: &Peers,
    ingress: bool,
    target: &Pod,
) -> Vec<(bool, Cell)> {
    let mut boxes = vec![];
    let has_names = r
        .ports
        .iter()
        .any(|p| matches!(p.port, Some(PortRef::Name(_))));
    for (fam, addr, peer_pod) in peers.iter().copied() {
        let named = if ingress { Some(target) } else { peer_pod };
        for (proto, port) in port_boxes(&r.ports, named) {
            boxes.push((fam, Cell { addr, proto, port }));
        }
        // An egress peer that is an address range (everyone, an ipBlock): its named ports
        // are those of each pod in the range.
        if !ingress && peer_pod.is_none() && has_names {
            let only_named: Vec<Port> = r
                .ports
                .iter()
                .filter(|p| matches!(p.port, Some(PortRef::Name(_))))
                .cloned()
                .collect();
            for q in c.pods.values().filter(|q| !q.host_network) {
                for ip in q.ips.iter().filter(|i| i.is_ipv4() == fam) {
                    let a = to_u128(*ip);
                    if a < addr.0 || a > addr.1 {
                        continue;
                    }
                    for (proto, port) in port_boxes(&only_named, Some(q)) {
                        boxes.push((
                            fam,
                            Cell {
                                addr: (a, a),
                                proto,
                                port,
                            },
                        ));
                    }
                }
            }
        }
    }
    boxes
}

/// Gives the pods of node `node` whose Pod object carries no addresses yet the addresses of
/// their attachment records (`local`: what the CNI ADDs on this node recorded). kubelet
/// reports a pod's addresses only after its sandbox's ADD returned and the status update
/// reached the API server and the agent's watch; the record exists before the pod's veth
/// does, so a new pod is judged by its policies from its first packet. A record names the pod
/// by namespace and name, and by uid when the runtime passed it: a record of an earlier pod of
/// the same name (a StatefulSet's) is not taken for the new one.
pub fn fill_from_records(
    c: &mut Cluster,
    node: &str,
    local: &[(crate::attachment::PodRef, Vec<IpAddr>)],
) -> usize {
    let mut filled = 0;
    for (r, ips) in local {
        let key = (r.namespace.clone(), r.name.clone());
        let Some(p) = c.pods.get_mut(&key) else {
            continue;
        };
        let same_pod = match &r.uid {
            Some(uid) => p.uid.is_empty() || *uid == p.uid,
            None => true,
        };
        if p.node == node && p.ips.is_empty() && same_pod && !ips.is_empty() {
            p.ips = ips.clone();
            filled += 1;
        }
    }
    filled
}

/// The rules of each isolated pod of a node, by (namespace, name).
pub type Rules = BTreeMap<(String, String), PodRules>;

/// What the policies mean for the pods of node `node` (hostNetwork pods are never subject).
///
/// A rule's peers are resolved once per compile, not once per pod it selects, and pods that
/// the same policies select (and, where ingress rules name ports, with the same named ports)
/// share one computation of their cells: a compile costs per distinct group of pods, not per
/// pod times cluster size.
pub fn compile(c: &Cluster, node: &str) -> Rules {
    type PolicyKey = (String, String);
    let mut peers: HashMap<(&PolicyKey, bool, usize), Peers> = HashMap::new();
    type Group<'c> = (bool, Vec<&'c PolicyKey>, Option<&'c [(String, u8, u16)]>);
    let mut groups: HashMap<Group, Option<BTreeMap<bool, Vec<Cell>>>> = HashMap::new();
    let mut out = BTreeMap::new();
    for (key, pod) in c
        .pods
        .iter()
        .filter(|(_, p)| p.node == node && !p.host_network && !p.ips.is_empty())
    {
        let selecting: Vec<(&PolicyKey, &Policy)> = c
            .policies
            .iter()
            .filter(|(_, p)| p.namespace == pod.namespace && p.selector.matches(&pod.labels))
            .collect();
        let mut rules = PodRules {
            ips: pod.ips.clone(),
            ..Default::default()
        };
        for ingress in [true, false] {
            let list_of = if ingress { rules_in } else { rules_out };
            let names_matter = ingress
                && selecting.iter().any(|(_, pol)| {
                    list_of(pol).into_iter().flatten().any(|r| {
                        r.ports
                            .iter()
                            .any(|p| matches!(p.port, Some(PortRef::Name(_))))
                    })
                });
            let group: Group = (
                ingress,
                selecting
                    .iter()
                    .filter(|(_, pol)| list_of(pol).is_some())
                    .map(|(k, _)| *k)
                    .collect(),
                names_matter.then_some(pod.ports.as_slice()),
            );
            let cells = match groups.get(&group) {
                Some(cells) => cells.clone(),
                None => {
                    let mut boxes: Vec<(bool, Cell)> = vec![];
                    for (pk, pol) in &selecting {
                        for (i, r) in list_of(pol).into_iter().flatten().enumerate() {
                            let ps = peers.entry((*pk, ingress, i)).or_insert_with(|| {
                                if r.peers.is_empty() {
                                    vec![
                                        (true, (0, u32::MAX as u128), None),
                                        (false, (0, u128::MAX), None),
                                    ]
                                } else {
                                    r.peers
                                        .iter()
                                        .flat_map(|p| peer_addrs(c, &pol.namespace, p))
                                        .collect()
                                }
                            });
                            boxes.extend(rule_boxes(c, r, ps, ingress, pod));
                        }
                    }
                    let cells = (!group.1.is_empty()).then(|| disjoint(boxes));
                    groups.insert(group, cells.clone());
                    cells
                }
            };
            if ingress {
                rules.ingress = cells;
            } else {
                rules.egress = cells;
            }
        }
        out.insert(key.clone(), rules);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, node: &str, labels: Value, ip: &str) -> Pod {
        Pod::from_json(&json!({
            "metadata": {"namespace": ns, "name": name, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"ports": [
                {"name": "serve-80", "containerPort": 80},
                {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]}}))
        .unwrap()
    }

    fn cluster(policies: Vec<Value>) -> Cluster {
        let mut c = Cluster::default();
        for (ns, l) in [("x", "x"), ("y", "y")] {
            c.namespaces
                .insert(ns.into(), BTreeMap::from([("ns".into(), l.into())]));
        }
        for p in [
            pod("x", "a", "n1", json!({"pod": "a"}), "10.0.0.1"),
            pod("x", "b", "n1", json!({"pod": "b"}), "10.0.0.2"),
            pod("y", "a", "n2", json!({"pod": "a"}), "10.0.1.1"),
        ] {
            c.pods.insert((p.namespace.clone(), p.name.clone()), p);
        }
        for p in policies {
            let p = Policy::from_json(&p).unwrap();
            c.policies.insert((p.namespace.clone(), p.name.clone()), p);
        }
        c
    }

    fn allows(cells: &[Cell], ip: &str, proto: u8, port: u16) -> bool {
        let a = to_u128(ip.parse().unwrap());
        cells.iter().any(|c| {
            c.addr.0 <= a
                && a <= c.addr.1
                && c.proto.0 <= proto
                && proto <= c.proto.1
                && c.port.0 <= port
                && port <= c.port.1
        })
    }

    #[test]
    fn a_new_pod_is_addressed_from_its_record_until_its_status_says() {
        let deny = json!({"metadata": {"namespace": "x", "name": "deny"},
            "spec": {"podSelector": {}}});
        let mut c = cluster(vec![deny]);
        // Scheduled on n1, its ADD done, its status not updated yet.
        let new = json!({"metadata": {"namespace": "x", "name": "c", "uid": "u2",
            "labels": {"pod": "c"}}, "spec": {"nodeName": "n1"}, "status": {"phase": "Pending"}});
        let p = Pod::from_json(&new).unwrap();
        assert!(p.ips.is_empty());
        c.pods.insert(("x".into(), "c".into()), p);
        // Not yet scheduled: nothing to keep.
        assert!(Pod::from_json(&json!({"metadata": {"namespace": "x", "name": "d"}})).is_none());
        let key = ("x".to_string(), "c".to_string());
        assert!(
            !compile(&c, "n1").contains_key(&key),
            "no addresses, no rules"
        );
        let rec = |ns: &str, name: &str, uid: Option<&str>, ip: &str| {
            (
                crate::attachment::PodRef {
                    namespace: ns.into(),
                    name: name.into(),
                    uid: uid.map(str::to_string),
                },
                vec![ip.parse::<IpAddr>().unwrap()],
            )
        };
        // A record of an earlier pod of the same name (another uid) is not this pod's; records
        // of pods the API already addresses change nothing.
        let local = vec![
            rec("x", "c", Some("u1"), "10.0.0.9"),
            rec("x", "a", None, "10.0.0.99"),
        ];
        assert_eq!(fill_from_records(&mut c, "n1", &local), 0);
        assert_eq!(
            c.pods[&("x".to_string(), "a".to_string())].ips[0].to_string(),
            "10.0.0.1"
        );
        // Another node's agent does not take this node's records.
        let local = vec![rec("x", "c", Some("u2"), "10.0.0.3")];
        assert_eq!(fill_from_records(&mut c.clone(), "n2", &local), 0);
        assert_eq!(fill_from_records(&mut c, "n1", &local), 1);
        let rules = compile(&c, "n1");
        assert_eq!(rules[&key].ips, local[0].1);
        let isolated = rules[&key].ingress.as_ref().expect("isolated for ingress");
        assert!(
            isolated.values().all(|cells| cells.is_empty()),
            "deny-all: nothing allowed"
        );
    }

    #[test]
    fn selectors_follow_the_api() {
        let l = BTreeMap::from([("a".to_string(), "1".to_string())]);
        let s = Selector::parse(&json!({"matchExpressions": [
            {"key": "a", "operator": "In", "values": ["1", "2"]},
            {"key": "b", "operator": "DoesNotExist"}]}))
        .unwrap();
        assert!(s.matches(&l));
        let s = Selector::parse(&json!({"matchExpressions": [
            {"key": "a", "operator": "NotIn", "values": ["1"]}]}))
        .unwrap();
        assert!(!s.matches(&l));
        assert!(Selector::default().matches(&l));
    }

    #[test]
    fn unselected_pods_are_not_isolated_and_default_deny_allows_nothing() {
        let c = cluster(vec![json!({"metadata": {"namespace": "x", "name": "deny"},
            "spec": {"podSelector": {"matchLabels": {"pod": "a"}}}})]);
        let r = compile(&c, "n1");
        let a = &r[&("x".into(), "a".into())];
        assert!(a.ingress.as_ref().unwrap().values().all(|v| v.is_empty()));
        assert!(a.egress.is_none(), "no egress rules, no Egress type");
        assert!(r[&("x".into(), "b".into())].ingress.is_none());
        assert!(
            !r.contains_key(&("y".into(), "a".into())),
            "another node's pod"
        );
    }

    #[test]
    fn namespace_and_pod_selectors_and_named_ports_and_ranges() {
        let c = cluster(vec![json!({"metadata": {"namespace": "x", "name": "p"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
              "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                     "podSelector": {"matchLabels": {"pod": "a"}}}],
                           "ports": [{"port": "serve-80"}]}],
              "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}],
                          "ports": [{"protocol": "UDP", "port": 50, "endPort": 60}]},
                         {"to": [{"podSelector": {}}], "ports": [{"protocol": "UDP", "port": "serve-81-udp"}]}]}})]);
        let r = compile(&c, "n1");
        let a = &r[&("x".into(), "a".into())];
        let ing = &a.ingress.as_ref().unwrap()[&true];
        assert!(allows(ing, "10.0.1.1", TCP, 80));
        assert!(!allows(ing, "10.0.1.1", TCP, 81));
        assert!(!allows(ing, "10.0.0.2", TCP, 80), "same namespace is not y");
        let eg = &a.egress.as_ref().unwrap()[&true];
        assert!(allows(eg, "10.0.0.2", UDP, 55));
        assert!(allows(eg, "10.0.0.9", UDP, 60));
        assert!(!allows(eg, "10.0.1.1", UDP, 55), "excepted");
        assert!(!allows(eg, "10.0.0.2", UDP, 61));
        assert!(allows(eg, "10.0.0.2", UDP, 81), "b's named UDP port");
        assert!(!allows(eg, "10.0.1.1", UDP, 81), "y/a is not in x");
        // Disjoint: no two cells overlap.
        for (i, x) in eg.iter().enumerate() {
            for y in &eg[i + 1..] {
                let o = |a: (u128, u128), b: (u128, u128)| a.0 <= b.1 && b.0 <= a.1;
                assert!(
                    !(o(x.addr, y.addr)
                        && o(
                            (x.proto.0 as u128, x.proto.1 as u128),
                            (y.proto.0 as u128, y.proto.1 as u128)
                        )
                        && o(
                            (x.port.0 as u128, x.port.1 as u128),
                            (y.port.0 as u128, y.port.1 as u128)
                        )),
                    "{x:?} overlaps {y:?}"
                );
            }
        }
    }

    #[test]
    fn pods_sharing_policies_keep_their_own_named_ports() {
        let mut c = cluster(vec![json!({"metadata": {"namespace": "x", "name": "web"},
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": "web"}]}],
                     "policyTypes": ["Ingress", "Egress"],
                     "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": "web"}]}]}})]);
        c.pods.get_mut(&("x".into(), "a".into())).unwrap().ports = vec![("web".into(), TCP, 80)];
        c.pods.get_mut(&("x".into(), "b".into())).unwrap().ports = vec![("web".into(), TCP, 8080)];
        let r = compile(&c, "n1");
        let side = |p: &str, ingress: bool| {
            let r = &r[&("x".to_string(), p.to_string())];
            if ingress { &r.ingress } else { &r.egress }
                .as_ref()
                .unwrap()[&true]
                .clone()
        };
        assert!(allows(&side("a", true), "192.0.2.9", TCP, 80));
        assert!(!allows(&side("a", true), "192.0.2.9", TCP, 8080));
        assert!(allows(&side("b", true), "192.0.2.9", TCP, 8080));
        assert!(!allows(&side("b", true), "192.0.2.9", TCP, 80));
        // Egress names are the destination's: the same for both sources.
        assert_eq!(side("a", false), side("b", false));
        assert!(allows(&side("a", false), "10.0.0.2", TCP, 8080));
        assert!(!allows(&side("a", false), "10.0.0.2", TCP, 80));
    }

    #[test]
    fn an_empty_rule_allows_everything_and_policies_add_up() {
        let c = cluster(vec![
            json!({"metadata": {"namespace": "x", "name": "one"},
                "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}}),
            json!({"metadata": {"namespace": "x", "name": "two"},
                "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {}}]}]}}),
        ]);
        let r = compile(&c, "n1");
        let a = &r[&("x".into(), "a".into())].ingress.as_ref().unwrap()[&true];
        assert!(allows(a, "192.0.2.1", TCP, 80));
        assert!(!allows(a, "192.0.2.1", TCP, 81));
        assert!(
            allows(a, "10.0.0.2", TCP, 81),
            "from its namespace, any port"
        );
        assert!(allows(a, "10.0.0.2", 1, 0), "any protocol");
    }
}

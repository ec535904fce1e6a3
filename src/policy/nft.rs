//! The compiled policies in the kernel: table `inet pontoon_policy`.
//!
//! - base chains `forward` (pod to pod on this node, bridged through br_netfilter, and routed
//!   traffic to and from other nodes and the outside, after kube-proxy's DNAT) and `input`
//!   (pods to the node itself, for egress): established and related traffic, and ICMPv6
//!   neighbour discovery, pass first; then `ip[6] saddr vmap @eg4|@eg6` sends a packet from an
//!   egress-isolated local pod to its chain, and `ip[6] daddr vmap @in4|@in6` (forward only) a
//!   packet to an ingress-isolated one to its own;
//! - per isolated pod and direction, a chain `i_<id>` / `e_<id>` with one lookup per family
//!   (`ip saddr . meta l4proto . th dport @i4_<id> return`) and a final `drop`, and interval
//!   sets of the disjoint (address, protocol, port) ranges the pod may exchange.
//!
//! A packet costs two map lookups and at most one interval set lookup per direction, whatever
//! the number of pods and policies. Changes are applied as one transaction per pass: only the
//! pods whose rules changed are touched; a table that differs from what was applied is
//! rebuilt whole, in one transaction (no moment without enforcement).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::{Cell, PodRules};
use crate::error::Result;
use crate::nft::expr::{self, CmpOp, Expr, REG_1, REG_VERDICT, Verdict};
use crate::nft::{
    BaseChain, Batch, Chain, Conn, Hook, NFPROTO_INET, NFT_DATA_VERDICT, NFT_SET_CONCAT,
    NFT_SET_INTERVAL, NFT_SET_MAP, Rule, SetSpec, types,
};

pub const TABLE: &str = "pontoon_policy";

/// The id in the chain and set names of one pod (`i_<id>`, `i4_<id>`, ...).
pub fn pod_id(key: &(String, String)) -> String {
    let d = Sha256::digest(format!("{}/{}", key.0, key.1).as_bytes());
    d[..6].iter().map(|b| format!("{b:02x}")).collect()
}

fn vmap(name: &str, v4: bool) -> SetSpec {
    SetSpec {
        name: name.into(),
        flags: NFT_SET_MAP,
        key_type: if v4 { types::IPADDR } else { types::IP6ADDR },
        key_len: if v4 { 4 } else { 16 },
        data: Some((NFT_DATA_VERDICT, 0)),
        fields: vec![],
    }
}

fn cell_set(name: String, v4: bool) -> SetSpec {
    let addr = if v4 { types::IPADDR } else { types::IP6ADDR };
    SetSpec {
        name,
        flags: NFT_SET_INTERVAL | NFT_SET_CONCAT,
        key_type: types::concat(&[addr, types::INET_PROTOCOL, types::INET_SERVICE]),
        key_len: if v4 { 12 } else { 24 },
        data: None,
        fields: vec![if v4 { 4 } else { 16 }, 1, 2],
    }
}

/// A cell's first and last keys: address, protocol and port, each padded to 4 bytes.
fn cell_keys(c: &Cell, v4: bool) -> (Vec<u8>, Vec<u8>) {
    let key = |addr: u128, proto: u8, port: u16| {
        let mut k = if v4 {
            (addr as u32).to_be_bytes().to_vec()
        } else {
            addr.to_be_bytes().to_vec()
        };
        k.extend_from_slice(&[proto, 0, 0, 0]);
        k.extend_from_slice(&port.to_be_bytes());
        k.extend_from_slice(&[0, 0]);
        k
    };
    (
        key(c.addr.0, c.proto.0, c.port.0),
        key(c.addr.1, c.proto.1, c.port.1),
    )
}

fn addr_payload(v4: bool, source: bool) -> Expr {
    let (offset, len) = match (v4, source) {
        (true, true) => (12, 4),
        (true, false) => (16, 4),
        (false, true) => (8, 16),
        (false, false) => (24, 16),
    };
    Expr::Payload {
        base: expr::base::NETWORK,
        offset,
        len,
        dreg: REG_1,
    }
}

/// `ip[6] saddr|daddr vmap @map`.
fn vmap_rule(v4: bool, source: bool, map: &str) -> Rule {
    let mut e = expr::nfproto(v4);
    e.push(addr_payload(v4, source));
    e.push(Expr::Lookup {
        set: map.into(),
        sreg: REG_1,
        dreg: Some(REG_VERDICT),
        invert: false,
    });
    Rule::new(e)
}

/// `ip[6] saddr|daddr . meta l4proto . th dport @set return`.
fn cells_rule(v4: bool, source: bool, set: &str) -> Rule {
    let mut e = expr::nfproto(v4);
    e.push(addr_payload(v4, source));
    e.extend(expr::l4proto_dport(expr::reg_after(
        REG_1,
        if v4 { 4 } else { 16 },
    )));
    e.push(Expr::Lookup {
        set: set.into(),
        sreg: REG_1,
        dreg: None,
        invert: false,
    });
    e.push(Expr::Verdict(Verdict::Return));
    Rule::new(e)
}

fn base_chain(name: &str, hook: Hook, ingress: bool) -> Chain {
    let mut rules = vec![];
    let mut est = expr::ct_state(expr::CT_STATE_ESTABLISHED | expr::CT_STATE_RELATED, true);
    est.push(Expr::Verdict(Verdict::Accept));
    rules.push(Rule::new(est));
    // Neighbour discovery (router/neighbour solicitation and advertisement, redirect).
    for t in 133u8..=137 {
        let mut e = expr::nfproto(false);
        e.push(Expr::Meta {
            key: expr::meta::L4PROTO,
            dreg: REG_1,
        });
        e.push(Expr::Cmp {
            sreg: REG_1,
            op: CmpOp::Eq,
            data: vec![58],
        });
        e.push(Expr::Payload {
            base: expr::base::TRANSPORT,
            offset: 0,
            len: 1,
            dreg: REG_1,
        });
        e.push(Expr::Cmp {
            sreg: REG_1,
            op: CmpOp::Eq,
            data: vec![t],
        });
        e.push(Expr::Verdict(Verdict::Accept));
        rules.push(Rule::new(e));
    }
    rules.push(vmap_rule(true, true, "eg4"));
    rules.push(vmap_rule(false, true, "eg6"));
    if ingress {
        rules.push(vmap_rule(true, false, "in4"));
        rules.push(vmap_rule(false, false, "in6"));
    }
    Chain {
        name: name.into(),
        base: Some(BaseChain {
            kind: "filter",
            hook,
            priority: 0,
        }),
        rules,
    }
}

/// What one pod direction is in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Side {
    chain: String,
    cells: BTreeMap<bool, Vec<Cell>>,
}

/// What is applied for one pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Applied {
    ips: Vec<std::net::IpAddr>,
    ingress: Option<Side>,
    egress: Option<Side>,
}

/// The policy table as this agent last applied it.
#[derive(Default)]
pub struct Enforcer {
    applied: Option<BTreeMap<(String, String), Applied>>,
}

fn side(id: &str, ingress: bool, cells: &Option<BTreeMap<bool, Vec<Cell>>>) -> Option<Side> {
    cells.as_ref().map(|c| Side {
        chain: format!("{}_{id}", if ingress { "i" } else { "e" }),
        cells: c.clone(),
    })
}

fn want(rules: &BTreeMap<(String, String), PodRules>) -> BTreeMap<(String, String), Applied> {
    rules
        .iter()
        .filter(|(_, r)| r.ingress.is_some() || r.egress.is_some())
        .map(|(k, r)| {
            let id = pod_id(k);
            (
                k.clone(),
                Applied {
                    ips: r.ips.clone(),
                    ingress: side(&id, true, &r.ingress),
                    egress: side(&id, false, &r.egress),
                },
            )
        })
        .collect()
}

fn set_name(chain: &str, v4: bool) -> String {
    // i_<id> → i4_<id>
    let (dir, id) = chain.split_once('_').unwrap_or((chain, ""));
    format!("{dir}{}_{id}", if v4 { 4 } else { 6 })
}

/// A pod side's chain: one lookup per family (ingress: the peer is the source; egress: the
/// destination), then drop.
fn side_chain(s: &Side, ingress: bool) -> Chain {
    let mut rules: Vec<Rule> = [true, false]
        .into_iter()
        .map(|v4| cells_rule(v4, ingress, &set_name(&s.chain, v4)))
        .collect();
    rules.push(Rule::new(vec![Expr::Verdict(Verdict::Drop)]));
    Chain {
        name: s.chain.clone(),
        base: None,
        rules,
    }
}

/// Every chain the applied state consists of.
fn all_chains(applied: &BTreeMap<(String, String), Applied>) -> Vec<Chain> {
    let mut v = fixed().1;
    for p in applied.values() {
        if let Some(s) = &p.ingress {
            v.push(side_chain(s, true));
        }
        if let Some(s) = &p.egress {
            v.push(side_chain(s, false));
        }
    }
    v
}

/// Adds one pod side: its sets, filled, its chain, and its map elements.
fn add_side(b: &mut Batch, s: &Side, ips: &[std::net::IpAddr], ingress: bool) {
    for v4 in [true, false] {
        let set = set_name(&s.chain, v4);
        b.add_set(NFPROTO_INET, TABLE, &cell_set(set.clone(), v4));
        let els: Vec<(Vec<u8>, Vec<u8>)> = s
            .cells
            .get(&v4)
            .into_iter()
            .flatten()
            .map(|c| cell_keys(c, v4))
            .collect();
        b.add_range_elements(NFPROTO_INET, TABLE, &set, &els);
    }
    let chain = side_chain(s, ingress);
    b.add_chain(NFPROTO_INET, TABLE, &chain);
    for r in &chain.rules {
        b.add_rule(NFPROTO_INET, TABLE, &chain.name, r);
    }
    add_map_elements(b, s, ips, ingress);
}

/// Changes a side's sets from `o`'s cells to `n`'s by the difference only: a pod appearing
/// elsewhere in the cluster changes a few elements of many pods' sets, not every element.
fn update_cells(b: &mut Batch, o: &Side, n: &Side) {
    for v4 in [true, false] {
        let set = set_name(&n.chain, v4);
        let cells = |s: &Side| -> std::collections::BTreeSet<Cell> {
            s.cells.get(&v4).into_iter().flatten().copied().collect()
        };
        let (was, now) = (cells(o), cells(n));
        let keys = |a: &std::collections::BTreeSet<Cell>, b: &std::collections::BTreeSet<Cell>| {
            a.difference(b)
                .map(|c| cell_keys(c, v4))
                .collect::<Vec<_>>()
        };
        b.del_range_elements(NFPROTO_INET, TABLE, &set, &keys(&was, &now));
        b.add_range_elements(NFPROTO_INET, TABLE, &set, &keys(&now, &was));
    }
}

fn map_of(ingress: bool, v4: bool) -> &'static str {
    match (ingress, v4) {
        (true, true) => "in4",
        (true, false) => "in6",
        (false, true) => "eg4",
        (false, false) => "eg6",
    }
}

fn ip_key(ip: &std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn add_map_elements(b: &mut Batch, s: &Side, ips: &[std::net::IpAddr], ingress: bool) {
    for ip in ips {
        b.add_jump_elements(
            NFPROTO_INET,
            TABLE,
            map_of(ingress, ip.is_ipv4()),
            &[(ip_key(ip), s.chain.clone())],
        );
    }
}

fn del_map_elements(b: &mut Batch, ips: &[std::net::IpAddr], ingress: bool) {
    for ip in ips {
        b.del_elements(
            NFPROTO_INET,
            TABLE,
            map_of(ingress, ip.is_ipv4()),
            &[ip_key(ip)],
        );
    }
}

fn del_side(b: &mut Batch, s: &Side, ips: &[std::net::IpAddr], ingress: bool) {
    del_map_elements(b, ips, ingress);
    b.flush_chain(NFPROTO_INET, TABLE, &s.chain);
    b.del_chain(NFPROTO_INET, TABLE, &s.chain);
    for v4 in [true, false] {
        b.del_set(NFPROTO_INET, TABLE, &set_name(&s.chain, v4));
    }
}

fn fixed() -> (Vec<SetSpec>, Vec<Chain>) {
    (
        vec![
            vmap("in4", true),
            vmap("in6", false),
            vmap("eg4", true),
            vmap("eg6", false),
        ],
        vec![
            base_chain("forward", Hook::Forward, true),
            base_chain("input", Hook::Input, false),
        ],
    )
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct Synced {
    pub rebuilt: bool,
    pub pods_changed: usize,
    pub isolated: usize,
}

impl Enforcer {
    /// Makes the table enforce `rules` (this node's pods).
    pub fn sync(&mut self, rules: &BTreeMap<(String, String), PodRules>) -> Result<Synced> {
        let want = want(rules);
        let mut conn = Conn::new()?;
        let mut out = Synced {
            isolated: want.len(),
            ..Default::default()
        };
        // The kernel's rules must be the ones applied, compared by content (a flush, a reload,
        // another agent): otherwise everything is re-made in one transaction.
        let have = conn.rules(NFPROTO_INET, TABLE)?;
        let intact = match (&have, &self.applied) {
            (Some(h), Some(a)) => {
                let want_chains = all_chains(a);
                let mut names: Vec<&str> = h.iter().map(|r| r.chain.as_str()).collect();
                names.dedup();
                names.len() == want_chains.len()
                    && crate::nft::differing(&want_chains, h).is_empty()
            }
            _ => false,
        };
        let have_table = conn.has_table(NFPROTO_INET, TABLE)?;
        let mut b = Batch::new();
        if !intact {
            if have_table {
                b.del_table(NFPROTO_INET, TABLE);
            }
            let (sets, chains) = fixed();
            b.install(NFPROTO_INET, TABLE, &sets, &chains);
            for p in want.values() {
                if let Some(s) = &p.ingress {
                    add_side(&mut b, s, &p.ips, true);
                }
                if let Some(s) = &p.egress {
                    add_side(&mut b, s, &p.ips, false);
                }
            }
            conn.commit(&b)?;
            out.rebuilt = true;
            out.pods_changed = want.len();
            self.applied = Some(want);
            return Ok(out);
        }
        let applied = self.applied.as_ref().unwrap();
        for (k, old) in applied {
            let new = want.get(k);
            if new == Some(old) {
                continue;
            }
            out.pods_changed += 1;
            let empty = Applied::default();
            let new = new.unwrap_or(&empty);
            for ingress in [true, false] {
                let (o, n) = if ingress {
                    (&old.ingress, &new.ingress)
                } else {
                    (&old.egress, &new.egress)
                };
                match (o, n) {
                    (Some(o), None) => del_side(&mut b, o, &old.ips, ingress),
                    (Some(o), Some(n)) => {
                        if old.ips != new.ips {
                            del_map_elements(&mut b, &old.ips, ingress);
                            add_map_elements(&mut b, n, &new.ips, ingress);
                        }
                        if o.cells != n.cells {
                            update_cells(&mut b, o, n);
                        }
                    }
                    (None, Some(n)) => add_side(&mut b, n, &new.ips, ingress),
                    (None, None) => {}
                }
            }
        }
        for (k, new) in &want {
            if applied.contains_key(k) {
                continue;
            }
            out.pods_changed += 1;
            if let Some(s) = &new.ingress {
                add_side(&mut b, s, &new.ips, true);
            }
            if let Some(s) = &new.egress {
                add_side(&mut b, s, &new.ips, false);
            }
        }
        if !b.is_empty()
            && let Err(e) = conn.commit(&b)
        {
            // What was applied is unknown now: re-made whole next time.
            self.applied = None;
            return Err(e);
        }
        self.applied = Some(want);
        Ok(out)
    }

    /// Removes the table (enforcement turned off).
    pub fn remove(&mut self) -> Result<bool> {
        self.applied = None;
        let mut conn = Conn::new()?;
        if !conn.has_table(NFPROTO_INET, TABLE)? {
            return Ok(false);
        }
        let mut b = Batch::new();
        b.del_table(NFPROTO_INET, TABLE);
        conn.commit(&b)?;
        Ok(true)
    }
}

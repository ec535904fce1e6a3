//! Routes to other nodes' pod CIDRs, reconciled item by item: every route is added, replaced or
//! removed on its own (in batches of netlink requests), one node's problem never holds back
//! another's route nor the removal of departed nodes' routes, and a route pontoon did not
//! install (another protocol) is never touched: it is reported as a conflict.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::{Problem, RTPROT_PONTOON};
use crate::dataplane::{Netlink, RouteOp, RouteSpec};
use crate::error::Result;

const MAIN_TABLE: u32 = 254;

/// How to reach one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub gw: IpAddr,
    /// The overlay device, for a hop over it (the gateway is then onlink on it); `None` for a
    /// direct route via a node's InternalIP.
    pub dev: Option<u32>,
    /// The node it leads to.
    pub node: String,
}

/// The routes pontoon wants: destination → hop.
pub type Want = BTreeMap<IpNetwork, Hop>;

/// What one pass did.
#[derive(Debug, Default)]
pub struct Synced {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Routes of pontoon's in place after the pass.
    pub owned: usize,
    pub problems: Vec<Problem>,
}

fn spec(dst: IpNetwork, gw: Option<IpAddr>, dev: Option<u32>) -> RouteSpec {
    RouteSpec {
        protocol: Some(RTPROT_PONTOON),
        dst,
        gw,
        oif: dev,
        priority: None,
        table: None,
        scope: None,
        mtu: None,
        advmss: None,
        onlink: dev.is_some(),
    }
}

/// Makes the routes of protocol [`RTPROT_PONTOON`] in the main table equal `want`, where no
/// foreign route stands in the way.
pub fn sync(nl: &mut Netlink, want: &Want) -> Result<Synced> {
    let mut ours: BTreeMap<IpNetwork, (Option<IpAddr>, Option<u32>)> = BTreeMap::new();
    let mut foreign: BTreeMap<IpNetwork, (u8, Option<IpAddr>)> = BTreeMap::new();
    for v4 in [true, false] {
        for r in nl.routes(v4)? {
            if r.table != Some(MAIN_TABLE) || r.dst.prefix() == 0 {
                continue;
            }
            match r.protocol {
                Some(RTPROT_PONTOON) => {
                    ours.insert(r.dst, (r.gw, r.oif));
                }
                p => {
                    foreign.entry(r.dst).or_insert((p.unwrap_or(0), r.gw));
                }
            }
        }
    }
    let mut out = Synced::default();
    let mut ops: Vec<(RouteOp, RouteSpec, String, String)> = Vec::new(); // op, spec, item, node
    for (dst, hop) in want {
        let (gw, node) = (&hop.gw, &hop.node);
        let item = format!("route {dst}");
        if let Some((proto, fgw)) = foreign.get(dst) {
            out.problems.push(Problem {
                item,
                kind: "route_conflict",
                msg: format!(
                    "a route to {dst}{} of protocol {proto} is not pontoon's: it is left alone, so \
                     node {node}'s pods are not routed via {gw}; remove that route if pontoon \
                     should route them",
                    fgw.map(|g| format!(" via {g}")).unwrap_or_default()
                ),
            });
            continue;
        }
        let s = spec(*dst, Some(*gw), hop.dev);
        match ours.get(dst) {
            Some((Some(have), oif)) if have == gw && (hop.dev.is_none() || *oif == hop.dev) => {
                out.owned += 1
            }
            Some(_) => ops.push((RouteOp::Replace, s, item, node.clone())),
            None => ops.push((RouteOp::Add, s, item, node.clone())),
        }
    }
    for (dst, (gw, _)) in &ours {
        if !want.contains_key(dst) {
            ops.push((
                RouteOp::Delete,
                spec(*dst, *gw, None),
                format!("route {dst} removal"),
                String::new(),
            ));
        }
    }
    let batch: Vec<(RouteOp, RouteSpec)> = ops.iter().map(|(o, s, _, _)| (*o, s.clone())).collect();
    for ((op, s, item, node), r) in ops.into_iter().zip(nl.route_batch(&batch)) {
        match (op, r) {
            (RouteOp::Delete, Ok(())) => out.removed.push(s.dst.to_string()),
            (RouteOp::Delete, Err(e)) if e.raw_os_error() == Some(libc::ESRCH) => {}
            (_, Ok(())) => {
                out.owned += 1;
                out.added.push(format!(
                    "{} via {}{}",
                    s.dst,
                    s.gw.unwrap(),
                    if s.onlink { " (overlay)" } else { "" }
                ));
            }
            (RouteOp::Delete, Err(e)) => out.problems.push(Problem {
                item,
                kind: "route",
                msg: format!(
                    "cannot remove the route to {} (its node is gone): {e}",
                    s.dst
                ),
            }),
            (_, Err(e)) if e.raw_os_error() == Some(libc::ENETUNREACH) => {
                out.problems.push(Problem {
                    item,
                    kind: "route_unreachable",
                    msg: format!(
                        "node {node}: its InternalIP {} is not on a network of this node, so \
                         its pods ({}) cannot be routed to directly; give the nodes a shared \
                         network or a router route",
                        s.gw.unwrap(),
                        s.dst
                    ),
                })
            }
            (_, Err(e)) => out.problems.push(Problem {
                item,
                kind: "route",
                msg: format!(
                    "node {node}: cannot route {} via {}: {e}",
                    s.dst,
                    s.gw.unwrap()
                ),
            }),
        }
    }
    Ok(out)
}

//! `macspoofchk`: frames a pod sends with another source MAC than its own are dropped where
//! they enter the bridge, in pontoon's bridge-family table `pontoon`: the base chain
//! `macspoof` (filter, prerouting, priority -300) sends each checked port to its own chain
//! through the verdict map `ms_ports` (`<host veth> : jump ms_<host veth>`), and that chain
//! returns for the pod's MAC and drops the rest. Adding or removing a pod is one chain and one
//! map element; the per-packet cost is one map lookup whatever the number of pods.

use crate::error::Result;
use crate::nft::expr::{self, Expr, Verdict};
use crate::nft::{self, BaseChain, Batch, Chain, Conn, Hook, NFPROTO_BRIDGE, Rule, SetSpec};

pub const TABLE: &str = "pontoon";
const MAP: &str = "ms_ports";
const BASE: &str = "macspoof";

fn port_chain(veth: &str) -> String {
    format!("ms_{veth}")
}

fn ifname_key(name: &str) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.resize(16, 0);
    k
}

/// The table's fixed objects: the verdict map and the base chain.
fn base() -> (SetSpec, Chain) {
    (
        SetSpec {
            name: MAP.into(),
            flags: nft::NFT_SET_MAP,
            key_type: nft::types::IFNAME,
            key_len: 16,
            data: Some((nft::NFT_DATA_VERDICT, 0)),
            fields: vec![],
        },
        Chain {
            name: BASE.into(),
            base: Some(BaseChain {
                kind: "filter",
                hook: Hook::Prerouting,
                priority: -300,
            }),
            rules: vec![Rule::new(vec![
                Expr::Meta {
                    key: expr::meta::IIFNAME,
                    dreg: expr::REG_1,
                },
                Expr::Lookup {
                    set: MAP.into(),
                    sreg: expr::REG_1,
                    dreg: Some(expr::REG_VERDICT),
                    invert: false,
                },
            ])],
        },
    )
}

/// The chain of one port: the pod's MAC passes, anything else is dropped.
fn port(veth: &str, mac: &[u8]) -> Chain {
    Chain {
        name: port_chain(veth),
        base: None,
        rules: vec![
            Rule::new(vec![
                Expr::Payload {
                    base: 0, // link layer
                    offset: 6,
                    len: 6,
                    dreg: expr::REG_1,
                },
                Expr::Cmp {
                    sreg: expr::REG_1,
                    op: expr::CmpOp::Eq,
                    data: mac.to_vec(),
                },
                Expr::Verdict(Verdict::Return),
            ]),
            Rule::new(vec![Expr::Verdict(Verdict::Drop)]),
        ],
    }
}

/// Adds to `batch` the check of `veth` (the base objects created if missing, the port's
/// chain replaced).
pub fn add(batch: &mut Batch, veth: &str, mac: &[u8]) {
    let (map, chain) = base();
    let pc = port(veth, mac);
    batch.install(NFPROTO_BRIDGE, TABLE, &[map], &[chain, pc.clone()]);
    batch.add_jump_elements(NFPROTO_BRIDGE, TABLE, MAP, &[(ifname_key(veth), pc.name)]);
}

/// Removes the check of `veth` (what is already gone included).
pub fn remove(conn: &mut Conn, veth: &str) -> Result<()> {
    let mut b = Batch::new();
    b.del_elements(NFPROTO_BRIDGE, TABLE, MAP, &[ifname_key(veth)]);
    conn.commit_missing_ok(&b)?;
    let mut b = Batch::new();
    b.uninstall(NFPROTO_BRIDGE, TABLE, &[], &[port_chain(veth)]);
    conn.commit_missing_ok(&b)
}

/// Whether the check of `veth` is in place, as [`add`] would make it.
pub fn is_current(conn: &mut Conn, veth: &str, mac: &[u8]) -> Result<bool> {
    let Some(have) = conn.rules(NFPROTO_BRIDGE, TABLE)? else {
        return Ok(false);
    };
    let (_, chain) = base();
    if !nft::differing(&[chain, port(veth, mac)], &have).is_empty() {
        return Ok(false);
    }
    Ok(conn
        .elements(NFPROTO_BRIDGE, TABLE, MAP)?
        .unwrap_or_default()
        .iter()
        .any(|(k, _)| *k == ifname_key(veth)))
}

//! nftables backend, over netlink (no `nft` process): in table `inet pontoon`, per network a
//! base chain `masq_<hash(network)>` at postrouting (srcnat) sends traffic from each pod subnet
//! to `masq4_<hash>` / `masq6_<hash>`, which return for every excluded destination and
//! masquerade the rest. "Current" means the kernel's rules equal these, compared rule by rule
//! on one dump of the table.

use super::{Backend, RuleSet};
use crate::error::Result;
use crate::nft::expr::{self, Expr, Verdict};
use crate::nft::{self, BaseChain, Batch, Chain, Conn, Hook, NFPROTO_INET, Rule};

pub const TABLE: &str = "pontoon";

/// `srcnat`.
const PRIO_SRCNAT: i32 = 100;

pub struct Nftables;

fn chain_names(network_hash: &str) -> [String; 3] {
    [
        format!("masq_{network_hash}"),
        format!("masq4_{network_hash}"),
        format!("masq6_{network_hash}"),
    ]
}

/// The chains (with their rules) that make up `rs`.
pub fn chains(rs: &RuleSet) -> Vec<Chain> {
    let [base, c4, c6] = chain_names(&rs.network_hash());
    let mut entry = Vec::new();
    let mut out = Vec::new();
    for (v4, target) in [(true, c4), (false, c6)] {
        let (src, ex) = rs.family(v4);
        if src.is_empty() {
            continue;
        }
        for n in &src {
            let mut e = expr::addr_in(true, *n);
            e.push(Expr::Verdict(Verdict::Goto(target.clone())));
            entry.push(Rule::new(e).with_comment(&format!("pontoon:{}", rs.network)));
        }
        let mut rules: Vec<Rule> = ex
            .iter()
            .map(|x| {
                let mut e = expr::addr_in(false, *x);
                e.push(Expr::Verdict(Verdict::Return));
                Rule::new(e)
            })
            .collect();
        rules.push(Rule::new(vec![Expr::Masquerade]));
        out.push(Chain {
            name: target,
            base: None,
            rules,
        });
    }
    out.insert(
        0,
        Chain {
            name: base,
            base: Some(BaseChain {
                kind: "nat",
                hook: Hook::Postrouting,
                priority: PRIO_SRCNAT,
            }),
            rules: entry,
        },
    );
    out
}

/// Adds the installation of `rs` to `batch` (the rules of its chains replaced).
pub fn install(batch: &mut Batch, rs: &RuleSet) {
    batch.install(NFPROTO_INET, TABLE, &[], &chains(rs));
}

/// Removes those of `names` that exist, and the table once it holds no chain.
pub fn remove_chains(conn: &mut Conn, names: &[String]) -> Result<()> {
    let Some(have) = conn.chains(NFPROTO_INET, TABLE)? else {
        return Ok(());
    };
    let chains: Vec<String> = names.iter().filter(|c| have.contains(c)).cloned().collect();
    let mut b = Batch::new();
    b.uninstall(NFPROTO_INET, TABLE, &[], &chains);
    if chains.len() == have.len() {
        b.del_table(NFPROTO_INET, TABLE);
    }
    conn.commit(&b)
}

impl Backend for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn is_current(&self, rs: &RuleSet) -> Result<bool> {
        let mut conn = Conn::new()?;
        Ok(match conn.rules(NFPROTO_INET, TABLE)? {
            Some(have) => nft::differing(&chains(rs), &have).is_empty(),
            None => false,
        })
    }

    fn apply(&self, rs: &RuleSet) -> Result<()> {
        let mut b = Batch::new();
        install(&mut b, rs);
        Conn::new()?.commit(&b)
    }

    fn remove(&self, network: &str) -> Result<()> {
        let names = chain_names(&super::short_hash(network.as_bytes()));
        remove_chains(&mut Conn::new()?, &names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_shape() {
        let rs = RuleSet::new(
            "kind",
            &[
                "10.244.1.0/24".parse().unwrap(),
                "fd00::/64".parse().unwrap(),
            ],
            &[],
        );
        let c = chains(&rs);
        assert_eq!(c.len(), 3);
        assert!(c[0].base.is_some());
        assert_eq!(c[0].rules.len(), 2, "one entry rule per pod subnet");
        assert_eq!(c[0].rules[0].comment.as_deref(), Some("pontoon:kind"));
        // v4: the pod subnet, multicast, broadcast excluded, then masquerade.
        assert_eq!(c[1].rules.len(), 4);
        assert_eq!(c[1].rules.last().unwrap().exprs, vec![Expr::Masquerade]);
    }
}

//! iptables backend, for nodes whose firewall is managed through iptables: one nat chain per
//! network and family, `PONTOON-<hash(network)>-<hash(rules)>`, jumped to from POSTROUTING
//! once per pod subnet by rules commented `pontoon:<network>`.
//!
//! Every change is one `iptables-restore --noflush` transaction per family that declares (and
//! so empties) the current chain, fills it, deletes every existing jump of the network (by
//! rule number, last first), adds the jumps again and deletes the network's older chains. It
//! runs under the xtables lock (`-w`) and pontoon's own lock, and decides from the state read
//! again under that lock, so concurrent first uses end with exactly one jump per pod subnet and
//! a full chain.
//!
//! "Current" is decided by content: with iptables-nft (Debian's default) the `ip[6] nat` tables
//! are read over netlink in one dump per family and each rule is summarised (matched CIDRs and
//! verdict); with iptables-legacy from `iptables-save -t nat`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ipnetwork::IpNetwork;

use super::{Backend, RuleSet, find_binary, run_tool};
use crate::error::Result;
use crate::nft::expr::{Summary, summarize};
use crate::nft::{Conn, NFPROTO_IPV4, NFPROTO_IPV6};

pub struct Iptables;

/// pontoon's lock around its iptables transactions (the xtables lock is iptables' own).
const LOCK: &str = "/run/pontoon/iptables.lock";

fn chain(rs: &RuleSet) -> String {
    format!(
        "PONTOON-{}-{}",
        &rs.network_hash()[..8],
        &rs.config_hash()[..8]
    )
}

fn prefix(network: &str) -> String {
    format!("PONTOON-{}-", &super::short_hash(network.as_bytes())[..8])
}

fn tools(v4: bool) -> (&'static str, &'static str) {
    if v4 {
        ("iptables-save", "iptables-restore")
    } else {
        ("ip6tables-save", "ip6tables-restore")
    }
}

/// Whether `iptables` is the nf_tables variant (then its tables are readable over netlink).
fn is_nft_variant() -> bool {
    find_binary("iptables")
        .and_then(|p| std::fs::canonicalize(p).ok())
        .is_some_and(|p| p.to_string_lossy().contains("nft"))
}

/// The `nat` table of one family: every chain's rules, summarised, in order.
type NatTable = BTreeMap<String, Vec<Summary>>;

/// Reads the nat table (one netlink dump with iptables-nft; `iptables-save` otherwise).
fn read_nat(v4: bool) -> Result<NatTable> {
    let mut t = NatTable::new();
    if is_nft_variant() {
        let fam = if v4 { NFPROTO_IPV4 } else { NFPROTO_IPV6 };
        if let Some(rules) = Conn::new()?.rules(fam, "nat")? {
            for r in rules {
                t.entry(r.chain.clone())
                    .or_default()
                    .push(summarize(&r.exprs, v4));
            }
        }
        // Chains without rules are not in a rule dump; an empty current chain reads as missing,
        // which is what matters.
        return Ok(t);
    }
    let text = run_tool(tools(v4).0, &["-t", "nat"], None)?;
    for line in text.lines() {
        if let Some(c) = line.strip_prefix(':') {
            t.entry(c.split_whitespace().next().unwrap_or("").to_string())
                .or_default();
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let words = shell_words(rest);
            let Some((c, args)) = words.split_first() else {
                continue;
            };
            let mut s = Summary::default();
            let mut it = args.iter();
            while let Some(w) = it.next() {
                match w.as_str() {
                    "-s" => s.src = it.next().and_then(|v| parse_cidr(v, v4)),
                    "-d" => s.dst = it.next().and_then(|v| parse_cidr(v, v4)),
                    "-j" => {
                        s.verdict = it.next().map(|j| match j.as_str() {
                            "RETURN" | "MASQUERADE" | "ACCEPT" | "DROP" => j.clone(),
                            c if c.chars().all(|x| x.is_ascii_uppercase() || x == '-') => {
                                format!("jump {c}")
                            }
                            other => other.to_string(),
                        })
                    }
                    "-g" => s.verdict = it.next().map(|c| format!("goto {c}")),
                    _ => {}
                }
            }
            t.entry(c.clone()).or_default().push(s);
        }
    }
    Ok(t)
}

fn parse_cidr(s: &str, v4: bool) -> Option<IpNetwork> {
    let n: IpNetwork = s.parse().ok()?;
    (n.is_ipv4() == v4).then_some(n)
}

/// What the network's chain of one family must hold.
fn want_chain(rs: &RuleSet, v4: bool) -> Vec<Summary> {
    let (_, ex) = rs.family(v4);
    let mut v: Vec<Summary> = ex
        .iter()
        .map(|x| Summary {
            src: None,
            dst: Some(*x),
            verdict: Some("RETURN".into()),
        })
        .collect();
    v.push(Summary {
        src: None,
        dst: None,
        verdict: Some("MASQUERADE".into()),
    });
    v
}

/// POSTROUTING's rules that jump to one of the network's chains: (rule number, summary).
fn jumps(t: &NatTable, network: &str) -> Vec<(usize, Summary)> {
    let p = format!("jump {}", prefix(network));
    t.get("POSTROUTING")
        .map(|rules| {
            rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.verdict.as_deref().is_some_and(|v| v.starts_with(&p)))
                .map(|(i, r)| (i + 1, r.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn family_current(t: &NatTable, rs: &RuleSet, v4: bool) -> bool {
    let (src, _) = rs.family(v4);
    let c = chain(rs);
    let mut have: Vec<IpNetwork> = jumps(t, &rs.network)
        .into_iter()
        .filter(|(_, s)| s.verdict.as_deref() == Some(&format!("jump {c}")))
        .filter_map(|(_, s)| s.src)
        .collect();
    have.sort();
    let all_jumps = jumps(t, &rs.network).len();
    have == src && all_jumps == src.len() && t.get(&c) == Some(&want_chain(rs, v4))
}

/// The `iptables-restore --noflush` input that makes one family current, from the table as it
/// is now; `None` when it already is.
pub fn restore_input(t: &NatTable, rs: &RuleSet, v4: bool) -> Option<String> {
    let (src, ex) = rs.family(v4);
    if src.is_empty() || family_current(t, rs, v4) {
        return None;
    }
    let c = chain(rs);
    let mut s = format!("*nat\n:{c} - [0:0]\n");
    for x in &ex {
        s.push_str(&format!("-A {c} -d {x} -j RETURN\n"));
    }
    s.push_str(&format!("-A {c} -j MASQUERADE\n"));
    // Every jump of the network goes, last first so the numbers stay right; then one per
    // pod subnet comes back.
    for (n, _) in jumps(t, &rs.network).iter().rev() {
        s.push_str(&format!("-D POSTROUTING {n}\n"));
    }
    for n in &src {
        s.push_str(&format!(
            "-A POSTROUTING -s {n} -m comment --comment \"pontoon:{}\" -j {c}\n",
            rs.network
        ));
    }
    for old in t
        .keys()
        .filter(|k| k.starts_with(&prefix(&rs.network)) && **k != c)
    {
        s.push_str(&format!(":{old} - [0:0]\n-X {old}\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// Removes every jump and chain of `network` from one family's table.
fn removal_input(t: &NatTable, network: &str) -> Option<String> {
    let js = jumps(t, network);
    let chains: Vec<&String> = t
        .keys()
        .filter(|k| k.starts_with(&prefix(network)))
        .collect();
    if js.is_empty() && chains.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    for (n, _) in js.iter().rev() {
        s.push_str(&format!("-D POSTROUTING {n}\n"));
    }
    for c in chains {
        s.push_str(&format!(":{c} - [0:0]\n-X {c}\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// Holds pontoon's iptables lock while `f` runs.
fn with_lock<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let _lock = crate::ipam::store::lock_file(Path::new(LOCK), Duration::from_secs(10))?;
    f()
}

fn restore(v4: bool, input: &str) -> Result<()> {
    run_tool(tools(v4).1, &["-w", "5", "--noflush"], Some(input)).map(|_| ())
}

impl Backend for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn is_current(&self, rs: &RuleSet) -> Result<bool> {
        for v4 in [true, false] {
            if !rs.family(v4).0.is_empty() && !family_current(&read_nat(v4)?, rs, v4) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn apply(&self, rs: &RuleSet) -> Result<()> {
        with_lock(|| {
            for v4 in [true, false] {
                if rs.family(v4).0.is_empty() {
                    continue;
                }
                // Read again under the lock: a concurrent ADD may have done it.
                if let Some(input) = restore_input(&read_nat(v4)?, rs, v4) {
                    restore(v4, &input)?;
                }
            }
            Ok(())
        })
    }

    fn remove(&self, network: &str) -> Result<()> {
        with_lock(|| {
            for v4 in [true, false] {
                if find_binary(tools(v4).1).is_none() {
                    continue;
                }
                if let Some(input) = removal_input(&read_nat(v4)?, network) {
                    restore(v4, &input)?;
                }
            }
            Ok(())
        })
    }
}

/// Splits an `iptables -S` rule into arguments, honouring double quotes.
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jump(src: &str, to: &str) -> Summary {
        Summary {
            src: Some(src.parse().unwrap()),
            dst: None,
            verdict: Some(format!("jump {to}")),
        }
    }

    #[test]
    fn the_transaction_replaces_every_old_jump_and_chain() {
        let rs = RuleSet::new("net", &["10.0.0.0/24".parse().unwrap()], &[]);
        let c = chain(&rs);
        assert!(c.len() <= 28, "{c}");
        let old = format!("{}00000000", prefix("net"));
        // A race left two jumps (one to an older chain) and an empty current chain.
        let mut t = NatTable::new();
        t.insert(
            "POSTROUTING".into(),
            vec![
                Summary::default(),
                jump("10.0.0.0/24", &c),
                jump("10.0.0.0/24", &old),
            ],
        );
        t.insert(old.clone(), vec![]);
        let s = restore_input(&t, &rs, true).unwrap();
        assert!(s.starts_with(&format!("*nat\n:{c} - [0:0]\n")));
        assert!(s.contains(&format!("-A {c} -d 10.0.0.0/24 -j RETURN")));
        assert!(s.contains("-j MASQUERADE"));
        let d3 = s.find("-D POSTROUTING 3").unwrap();
        let d2 = s.find("-D POSTROUTING 2").unwrap();
        assert!(d3 < d2, "last first: {s}");
        assert_eq!(s.matches("-A POSTROUTING").count(), 1);
        assert!(s.contains("--comment \"pontoon:net\""));
        assert!(s.contains(&format!("-X {old}")));
        // Once current, nothing to do.
        let mut t = NatTable::new();
        t.insert("POSTROUTING".into(), vec![jump("10.0.0.0/24", &c)]);
        t.insert(c.clone(), want_chain(&rs, true));
        assert!(restore_input(&t, &rs, true).is_none());
        assert!(restore_input(&t, &rs, false).is_none(), "no v6 subnet");
    }

    #[test]
    fn words() {
        assert_eq!(
            shell_words(r#"-s 10.0.0.0/24 -m comment --comment "pontoon:a b" -j X"#),
            [
                "-s",
                "10.0.0.0/24",
                "-m",
                "comment",
                "--comment",
                "pontoon:a b",
                "-j",
                "X"
            ]
        );
    }
}

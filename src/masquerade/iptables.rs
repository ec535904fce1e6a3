//! iptables backend, for nodes whose firewall is managed through iptables: one nat chain per
//! network and family, `PONTOON-<hash(network)>-<hash(rules)>`, jumped to from POSTROUTING by a
//! rule commented `pontoon:<network>`. Installed with one `iptables-restore --noflush` batch per
//! family. The ADD-time check reads the chain over nftables netlink when iptables is the
//! nf_tables variant (Debian's default), else trusts a stamp file under `/run/pontoon`.

use std::path::PathBuf;

use super::nftables::{NFPROTO_IPV4, NFPROTO_IPV6, get_chain_in};
use super::{Backend, RuleSet, find_binary, run_tool};
use crate::error::Result;

pub struct Iptables;

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
        ("iptables", "iptables-restore")
    } else {
        ("ip6tables", "ip6tables-restore")
    }
}

/// Whether `iptables` is the nf_tables variant (then its chains are visible over netlink).
fn is_nft_variant() -> bool {
    find_binary("iptables")
        .and_then(|p| std::fs::canonicalize(p).ok())
        .is_some_and(|p| p.to_string_lossy().contains("nft"))
}

fn stamp(rs: &RuleSet) -> PathBuf {
    let ns = crate::netns::NetNs::current()
        .and_then(|n| n.id())
        .map(|(d, i)| format!("{d}-{i}"))
        .unwrap_or_default();
    PathBuf::from(format!("/run/pontoon/iptables/{ns}.{}", chain(rs)))
}

/// The `iptables-restore --noflush` input for one family.
pub fn restore_input(rs: &RuleSet, v4: bool) -> Option<String> {
    let (src, ex) = rs.family(v4);
    if src.is_empty() {
        return None;
    }
    let c = chain(rs);
    let mut s = format!("*nat\n:{c} - [0:0]\n");
    for x in &ex {
        s.push_str(&format!("-A {c} -d {x} -j RETURN\n"));
    }
    s.push_str(&format!("-A {c} -j MASQUERADE\n"));
    for n in &src {
        s.push_str(&format!(
            "-A POSTROUTING -s {n} -m comment --comment \"pontoon:{}\" -j {c}\n",
            rs.network
        ));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// Deletes the POSTROUTING jumps and chains of `network` in one family, except `keep`.
fn remove_family(network: &str, v4: bool, keep: Option<&str>) -> Result<()> {
    let (ipt, _) = tools(v4);
    let p = prefix(network);
    let rules = run_tool(ipt, &["-w", "5", "-t", "nat", "-S"], None)?;
    for line in rules.lines() {
        if let Some(rest) = line.strip_prefix("-A POSTROUTING ")
            && let Some(target) = rest.rsplit("-j ").next()
            && target.trim().starts_with(&p)
            && Some(target.trim()) != keep
        {
            let args: Vec<String> = shell_words(rest);
            let mut full = vec!["-w", "5", "-t", "nat", "-D", "POSTROUTING"];
            full.extend(args.iter().map(String::as_str));
            run_tool(ipt, &full, None)?;
        }
    }
    for line in rules.lines() {
        if let Some(c) = line.strip_prefix("-N ")
            && c.starts_with(&p)
            && Some(c) != keep
        {
            run_tool(ipt, &["-w", "5", "-t", "nat", "-F", c], None)?;
            run_tool(ipt, &["-w", "5", "-t", "nat", "-X", c], None)?;
        }
    }
    Ok(())
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

impl Backend for Iptables {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn is_current(&self, rs: &RuleSet) -> Result<bool> {
        if is_nft_variant() {
            let c = chain(rs);
            for (v4, fam) in [(true, NFPROTO_IPV4), (false, NFPROTO_IPV6)] {
                if !rs.family(v4).0.is_empty() && get_chain_in(fam, "nat", &c)?.is_none() {
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        Ok(stamp(rs).exists())
    }

    fn apply(&self, rs: &RuleSet) -> Result<()> {
        for v4 in [true, false] {
            let Some(input) = restore_input(rs, v4) else {
                continue;
            };
            let (ipt, restore) = tools(v4);
            // Replace: drop older versions and any previous jumps to this chain, then restore.
            remove_family(&rs.network, v4, None)?;
            let _ = ipt;
            run_tool(restore, &["-w", "5", "--noflush"], Some(&input))?;
        }
        let st = stamp(rs);
        if let Some(dir) = st.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(st, b"");
        Ok(())
    }

    fn remove(&self, network: &str) -> Result<()> {
        for v4 in [true, false] {
            if find_binary(tools(v4).0).is_some() {
                remove_family(network, v4, None)?;
            }
        }
        let p = prefix(network);
        if let Ok(rd) = std::fs::read_dir("/run/pontoon/iptables") {
            for de in rd.flatten() {
                if de.file_name().to_string_lossy().contains(&p) {
                    let _ = std::fs::remove_file(de.path());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_input_shape() {
        let rs = RuleSet::new("net", &["10.0.0.0/24".parse().unwrap()], &[]);
        let s = restore_input(&rs, true).unwrap();
        let c = chain(&rs);
        assert!(c.len() <= 28, "{c}");
        assert!(s.starts_with(&format!("*nat\n:{c} - [0:0]\n")));
        assert!(s.contains(&format!("-A {c} -d 10.0.0.0/24 -j RETURN")));
        assert!(s.contains("-j MASQUERADE"));
        assert!(s.contains("--comment \"pontoon:net\""));
        assert!(restore_input(&rs, false).is_none());
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

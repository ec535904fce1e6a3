//! nftables backend: table `inet pontoon`, one base chain `masq_<hash(network)>` per network
//! hooked at postrouting (srcnat), commented `pontoon net=<name> cfg=<hash>`. Setup is one atomic
//! `nft -f` batch; the ADD-time check is one NFT_MSG_GETCHAIN over netlink.

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::{Backend, RuleSet, run_tool};
use crate::error::{Error, Result};

pub const TABLE: &str = "pontoon";

pub struct Nftables;

fn chain_name(network_hash: &str) -> String {
    format!("masq_{network_hash}")
}

fn set_literal(nets: &[ipnetwork::IpNetwork]) -> String {
    let items: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

/// The `nft -f` script that (re)creates the network's chain atomically.
pub fn script(rs: &RuleSet) -> String {
    let chain = chain_name(&rs.network_hash());
    let mut s = String::new();
    s.push_str(&format!("add table inet {TABLE}\n"));
    // add + flush + delete + add: replaces the chain (and its comment) in one transaction,
    // whether or not it existed.
    s.push_str(&format!("add chain inet {TABLE} {chain}\n"));
    s.push_str(&format!("flush chain inet {TABLE} {chain}\n"));
    s.push_str(&format!("delete chain inet {TABLE} {chain}\n"));
    s.push_str(&format!(
        "add chain inet {TABLE} {chain} {{ type nat hook postrouting priority srcnat; policy accept; comment \"{}\"; }}\n",
        rs.comment()
    ));
    for (v4, proto) in [(true, "ip"), (false, "ip6")] {
        let (src, ex) = rs.family(v4);
        if src.is_empty() {
            continue;
        }
        s.push_str(&format!(
            "add rule inet {TABLE} {chain} {proto} saddr {} {proto} daddr != {} masquerade comment \"pontoon:{}\"\n",
            set_literal(&src),
            set_literal(&ex),
            rs.network
        ));
    }
    s
}

// nfnetlink constants (linux/netfilter/nfnetlink.h, nf_tables.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFPROTO_INET: u8 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NLMSG_ERROR: u16 = 2;

fn put_attr(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let len = 4 + s.len() + 1;
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

/// The raw NFT_MSG_NEWCHAIN reply for `inet <table> <chain>`, or `None` when it does not exist.
pub fn get_chain(table: &str, chain: &str) -> Result<Option<Vec<u8>>> {
    get_chain_in(NFPROTO_INET, table, chain)
}

/// Like [`get_chain`] for any nftables family (iptables-nft keeps `ip nat` / `ip6 nat` there).
pub fn get_chain_in(family: u8, table: &str, chain: &str) -> Result<Option<Vec<u8>>> {
    let nlerr =
        |what: &str, e: std::io::Error| Error::Firewall(format!("nftables netlink: {what}: {e}"));
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(|e| nlerr("socket", e))?;
    sock.bind_auto().map_err(|e| nlerr("bind", e))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| nlerr("connect", e))?;
    let mut msg = vec![0u8; 16];
    msg.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg: family, version, res_id
    put_attr(&mut msg, NFTA_CHAIN_TABLE, table);
    put_attr(&mut msg, NFTA_CHAIN_NAME, chain);
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    msg[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN).to_ne_bytes());
    msg[6..8].copy_from_slice(&1u16.to_ne_bytes()); // NLM_F_REQUEST
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes()); // seq
    sock.send(&msg, 0).map_err(|e| nlerr("send", e))?;
    let mut buf = vec![0u8; 16384];
    let n = sock
        .recv(&mut &mut buf[..], 0)
        .map_err(|e| nlerr("recv", e))?;
    if n < 16 {
        return Err(Error::Firewall("nftables netlink: short reply".into()));
    }
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    if ty == NLMSG_ERROR {
        let errno = -i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        return match errno {
            0 => Ok(None),
            libc::ENOENT => Ok(None),
            e => Err(nlerr("GETCHAIN", std::io::Error::from_raw_os_error(e))),
        };
    }
    if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN {
        return Ok(Some(buf[..n].to_vec()));
    }
    Err(Error::Firewall(format!(
        "nftables netlink: unexpected reply type {ty:#x}"
    )))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

impl Backend for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn is_current(&self, rs: &RuleSet) -> Result<bool> {
        let chain = chain_name(&rs.network_hash());
        Ok(
            get_chain(TABLE, &chain)?
                .is_some_and(|reply| contains(&reply, rs.comment().as_bytes())),
        )
    }

    fn apply(&self, rs: &RuleSet) -> Result<()> {
        run_tool("nft", &["-f", "-"], Some(&script(rs))).map(|_| ())
    }

    fn remove(&self, network: &str) -> Result<()> {
        let chain = chain_name(&super::short_hash(network.as_bytes()));
        if get_chain(TABLE, &chain)?.is_some() {
            run_tool(
                "nft",
                &["-f", "-"],
                Some(&format!(
                    "flush chain inet {TABLE} {chain}\ndelete chain inet {TABLE} {chain}\n"
                )),
            )?;
        }
        // Drop the table once no network uses it.
        let listing = match run_tool("nft", &["list", "table", "inet", TABLE], None) {
            Ok(l) => l,
            Err(_) => return Ok(()),
        };
        if !listing.contains("chain ") {
            run_tool("nft", &["delete", "table", "inet", TABLE], None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_shape() {
        let rs = RuleSet::new(
            "kind",
            &[
                "10.244.1.0/24".parse().unwrap(),
                "fd00::/64".parse().unwrap(),
            ],
            &[],
        );
        let s = script(&rs);
        assert!(s.contains("add table inet pontoon\n"));
        assert!(s.contains("type nat hook postrouting priority srcnat"));
        assert!(s.contains("ip saddr { 10.244.1.0/24 } ip daddr != { 10.244.1.0/24, 224.0.0.0/4, 255.255.255.255/32 } masquerade"));
        assert!(s.contains("ip6 saddr { fd00::/64 }"));
        assert!(s.contains(&rs.comment()));
    }
}

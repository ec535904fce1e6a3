//! nf_tables expressions: the few pontoon's rules are made of, encoded the way `nft` encodes
//! them (same registers, same attributes), so `nft list ruleset` shows pontoon's rules in plain
//! nft syntax and a dump compares with what pontoon would write.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::{NFPROTO_IPV4, NFPROTO_IPV6, attr, attr_str, attr_u32, attrs, nested};

// Registers: 0 is the verdict, 1-4 the 16-byte ones, 8-23 the 4-byte ones (nft's "reg 9" is
// the second 4-byte register, right after reg 1's first word).
pub const REG_VERDICT: u32 = 0;
pub const REG_1: u32 = 1;
pub const REG_2: u32 = 2;
pub const REG32_01: u32 = 9;
pub const REG32_02: u32 = 10;

pub mod meta {
    pub const IIFNAME: u32 = 6;
    pub const OIFNAME: u32 = 7;
    pub const NFPROTO: u32 = 15;
    pub const L4PROTO: u32 = 16;
}

pub mod base {
    pub const NETWORK: u32 = 1;
    pub const TRANSPORT: u32 = 2;
}

/// `ct status` bits (linux/netfilter/nf_conntrack_common.h).
pub const IPS_DST_NAT: u32 = 0x20;
const CT_STATUS: u32 = 2;
const CT_STATE: u32 = 0;
/// `ct state` bits.
pub const CT_STATE_ESTABLISHED: u32 = 0x2;
pub const CT_STATE_RELATED: u32 = 0x4;
const FIB_RESULT_ADDRTYPE: u32 = 3;
const FIB_F_DADDR: u32 = 2;
/// `RTN_LOCAL`: an address of this host.
const RTN_LOCAL: u32 = 2;
const NAT_DNAT: u32 = 1;
const IFNAMSIZ: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq = 0,
    Neq = 1,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Meta {
        key: u32,
        dreg: u32,
    },
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    Cmp {
        sreg: u32,
        op: CmpOp,
        data: Vec<u8>,
    },
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Verdict(Verdict),
    Lookup {
        set: String,
        sreg: u32,
        dreg: Option<u32>,
        invert: bool,
    },
    /// DNAT to the address in `addr` and, if given, the port in `proto`.
    Dnat {
        v4: bool,
        addr: u32,
        proto: Option<u32>,
    },
    Masquerade,
    /// `fib daddr type` into `dreg`.
    FibDaddrType {
        dreg: u32,
    },
    Ct {
        key: u32,
        dreg: u32,
    },
}

impl Expr {
    fn name(&self) -> &'static str {
        match self {
            Expr::Meta { .. } => "meta",
            Expr::Payload { .. } => "payload",
            Expr::Cmp { .. } => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Verdict(_) => "immediate",
            Expr::Lookup { .. } => "lookup",
            Expr::Dnat { .. } => "nat",
            Expr::Masquerade => "masq",
            Expr::FibDaddrType { .. } => "fib",
            Expr::Ct { .. } => "ct",
        }
    }

    /// The expression's `NFTA_LIST_ELEM` payload: its name and its data.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        attr_str(&mut b, 1, self.name()); // NFTA_EXPR_NAME
        nested(&mut b, 2, |d| self.data(d)); // NFTA_EXPR_DATA
        b
    }

    fn data(&self, d: &mut Vec<u8>) {
        let value = |d: &mut Vec<u8>, kind: u16, v: &[u8]| nested(d, kind, |n| attr(n, 1, v));
        match self {
            Expr::Meta { key, dreg } => {
                attr_u32(d, 2, *key);
                attr_u32(d, 1, *dreg);
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                attr_u32(d, 1, *dreg);
                attr_u32(d, 2, *base);
                attr_u32(d, 3, *offset);
                attr_u32(d, 4, *len);
            }
            Expr::Cmp { sreg, op, data } => {
                attr_u32(d, 1, *sreg);
                attr_u32(d, 2, *op as u32);
                value(d, 3, data);
            }
            Expr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
            } => {
                attr_u32(d, 1, *sreg);
                attr_u32(d, 2, *dreg);
                attr_u32(d, 3, mask.len() as u32);
                value(d, 4, mask);
                value(d, 5, xor);
            }
            Expr::Verdict(v) => {
                attr_u32(d, 1, REG_VERDICT);
                nested(d, 2, |data| {
                    nested(data, 2, |vd| {
                        let (code, chain): (i32, Option<&str>) = match v {
                            Verdict::Accept => (1, None),
                            Verdict::Drop => (0, None),
                            Verdict::Return => (-5, None),
                            Verdict::Jump(c) => (-3, Some(c)),
                            Verdict::Goto(c) => (-4, Some(c)),
                        };
                        attr(vd, 1, &code.to_be_bytes());
                        if let Some(c) = chain {
                            attr_str(vd, 2, c);
                        }
                    })
                });
            }
            Expr::Lookup {
                set,
                sreg,
                dreg,
                invert,
            } => {
                attr_str(d, 1, set);
                attr_u32(d, 2, *sreg);
                if let Some(r) = dreg {
                    attr_u32(d, 3, *r);
                }
                attr_u32(d, 5, u32::from(*invert));
            }
            Expr::Dnat { v4, addr, proto } => {
                attr_u32(d, 1, NAT_DNAT);
                attr_u32(
                    d,
                    2,
                    u32::from(if *v4 { NFPROTO_IPV4 } else { NFPROTO_IPV6 }),
                );
                attr_u32(d, 3, *addr);
                if let Some(p) = proto {
                    attr_u32(d, 5, *p);
                }
            }
            Expr::Masquerade => {}
            Expr::FibDaddrType { dreg } => {
                attr_u32(d, 1, *dreg);
                attr_u32(d, 2, FIB_RESULT_ADDRTYPE);
                attr_u32(d, 3, FIB_F_DADDR);
            }
            Expr::Ct { key, dreg } => {
                attr_u32(d, 1, *dreg);
                attr_u32(d, 2, *key);
            }
        }
    }
}

/// Whether an expression read back from the kernel (`theirs`) is `ours`: the same expression
/// with every attribute pontoon sets equal. Attributes the kernel adds in its dump (defaults
/// pontoon leaves out, newer fields) do not matter.
pub fn same(ours: &[u8], theirs: &[u8]) -> bool {
    if ours == theirs {
        return true;
    }
    fn get<'a>(a: &[(u16, &'a [u8])], k: u16) -> Option<&'a [u8]> {
        a.iter().find(|(t, _)| *t == k).map(|(_, v)| *v)
    }
    let (o, t) = (attrs(ours), attrs(theirs));
    if get(&o, 1) != get(&t, 1) {
        return false;
    }
    let td = attrs(get(&t, 2).unwrap_or_default());
    attrs(get(&o, 2).unwrap_or_default())
        .iter()
        .all(|(k, v)| td.iter().any(|(tk, tv)| tk == k && tv == v))
}

/// What a rule read back from the kernel does, in the terms iptables rules are written in:
/// the source and destination CIDRs it matches (from payload loads of the network header,
/// with or without a mask) and its verdict (`RETURN`, `MASQUERADE`, `jump X`, `goto X`,
/// `ACCEPT`, `DROP`, or a target's name). Counters, comments and the family check are
/// ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub src: Option<IpNetwork>,
    pub dst: Option<IpNetwork>,
    pub verdict: Option<String>,
}

/// Summarises a dumped rule's expressions (see [`Summary`]); `v4` says which header layout.
pub fn summarize(exprs: &[Vec<u8>], v4: bool) -> Summary {
    let mut s = Summary::default();
    let mut load: Option<(u32, u32)> = None; // offset, len
    let mut mask: Option<Vec<u8>> = None;
    let be32 = |v: &[u8]| {
        v.get(..4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    };
    for e in exprs {
        let a = attrs(e);
        let name = a
            .iter()
            .find(|(t, _)| *t == 1)
            .map(|(_, v)| {
                String::from_utf8_lossy(v.split(|c| *c == 0).next().unwrap()).into_owned()
            })
            .unwrap_or_default();
        let data = a
            .iter()
            .find(|(t, _)| *t == 2)
            .map(|(_, v)| attrs(v))
            .unwrap_or_default();
        let get = |k: u16| data.iter().find(|(t, _)| *t == k).map(|(_, v)| *v);
        let nested_value = |k: u16| {
            get(k).and_then(|v| {
                attrs(v)
                    .into_iter()
                    .find(|(t, _)| *t == 1)
                    .map(|(_, v)| v.to_vec())
            })
        };
        match name.as_str() {
            "payload" if get(2).and_then(be32) == Some(base::NETWORK) => {
                load = get(3).and_then(be32).zip(get(4).and_then(be32));
                mask = None;
            }
            "bitwise" => mask = nested_value(4),
            "cmp" => {
                if let (Some((off, len)), Some(val), Some(0)) =
                    (load, nested_value(3), get(2).and_then(be32))
                {
                    let (src_off, dst_off, full) = if v4 { (12, 16, 4) } else { (8, 24, 16) };
                    let bits = match &mask {
                        Some(m) => m.iter().map(|b| b.count_ones()).sum::<u32>(),
                        None => len * 8,
                    };
                    let mut addr = val.clone();
                    addr.resize(full, 0);
                    let ip: Option<IpAddr> = if v4 {
                        <[u8; 4]>::try_from(addr.as_slice()).ok().map(IpAddr::from)
                    } else {
                        <[u8; 16]>::try_from(addr.as_slice()).ok().map(IpAddr::from)
                    };
                    let net = ip.and_then(|ip| IpNetwork::new(ip, bits as u8).ok());
                    if off == src_off {
                        s.src = net;
                    } else if off == dst_off {
                        s.dst = net;
                    }
                }
                load = None;
            }
            "immediate" => {
                if let Some(v) = get(2) {
                    for (t, vd) in attrs(v) {
                        if t != 2 {
                            continue;
                        }
                        let vd = attrs(vd);
                        let code = vd
                            .iter()
                            .find(|(t, _)| *t == 1)
                            .and_then(|(_, v)| v.get(..4))
                            .map(|b| i32::from_be_bytes(b.try_into().unwrap()));
                        let chain = vd.iter().find(|(t, _)| *t == 2).map(|(_, v)| {
                            String::from_utf8_lossy(v.split(|c| *c == 0).next().unwrap())
                                .into_owned()
                        });
                        s.verdict = match (code, chain) {
                            (Some(1), _) => Some("ACCEPT".into()),
                            (Some(0), _) => Some("DROP".into()),
                            (Some(-5), _) => Some("RETURN".into()),
                            (Some(-3), Some(c)) => Some(format!("jump {c}")),
                            (Some(-4), Some(c)) => Some(format!("goto {c}")),
                            _ => None,
                        };
                    }
                }
            }
            "masq" => s.verdict = Some("MASQUERADE".into()),
            "target" => {
                s.verdict = get(1).map(|v| {
                    String::from_utf8_lossy(v.split(|c| *c == 0).next().unwrap()).into_owned()
                })
            }
            _ => {}
        }
    }
    s
}

// ---- the building blocks of pontoon's rules ----

/// `meta nfproto ipv4|ipv6`.
pub fn nfproto(v4: bool) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: meta::NFPROTO,
            dreg: REG_1,
        },
        Expr::Cmp {
            sreg: REG_1,
            op: CmpOp::Eq,
            data: vec![if v4 { NFPROTO_IPV4 } else { NFPROTO_IPV6 }],
        },
    ]
}

fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// `ip[6] saddr|daddr NET` (with the family check an inet table needs).
pub fn addr_in(source: bool, net: IpNetwork) -> Vec<Expr> {
    let v4 = net.is_ipv4();
    let (offset, len) = match (v4, source) {
        (true, true) => (12, 4),
        (true, false) => (16, 4),
        (false, true) => (8, 16),
        (false, false) => (24, 16),
    };
    let mut out = nfproto(v4);
    out.push(Expr::Payload {
        base: base::NETWORK,
        offset,
        len,
        dreg: REG_1,
    });
    let full = if v4 { 32 } else { 128 };
    if net.prefix() < full {
        out.push(Expr::Bitwise {
            sreg: REG_1,
            dreg: REG_1,
            mask: addr_bytes(net.mask()),
            xor: vec![0; len as usize],
        });
    }
    out.push(Expr::Cmp {
        sreg: REG_1,
        op: CmpOp::Eq,
        data: addr_bytes(net.network()),
    });
    out
}

/// `iifname NAME` (`output == false`) or `oifname NAME`.
pub fn ifname(output: bool, name: &str) -> Vec<Expr> {
    let mut data = name.as_bytes().to_vec();
    data.resize(IFNAMSIZ, 0);
    vec![
        Expr::Meta {
            key: if output { meta::OIFNAME } else { meta::IIFNAME },
            dreg: REG_1,
        },
        Expr::Cmp {
            sreg: REG_1,
            op: CmpOp::Eq,
            data,
        },
    ]
}

/// `ct status & BITS != 0` (`set`) or `== 0`.
pub fn ct_status(bits: u32, set: bool) -> Vec<Expr> {
    ct_bits(CT_STATUS, bits, set)
}

/// `ct state & BITS != 0` (`set`) or `== 0`.
pub fn ct_state(bits: u32, set: bool) -> Vec<Expr> {
    ct_bits(CT_STATE, bits, set)
}

fn ct_bits(key: u32, bits: u32, set: bool) -> Vec<Expr> {
    vec![
        Expr::Ct { key, dreg: REG_1 },
        Expr::Bitwise {
            sreg: REG_1,
            dreg: REG_1,
            mask: bits.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        },
        Expr::Cmp {
            sreg: REG_1,
            op: if set { CmpOp::Neq } else { CmpOp::Eq },
            data: vec![0; 4],
        },
    ]
}

/// `fib daddr type local`.
pub fn daddr_is_local() -> Vec<Expr> {
    vec![
        Expr::FibDaddrType { dreg: REG_1 },
        Expr::Cmp {
            sreg: REG_1,
            op: CmpOp::Eq,
            data: RTN_LOCAL.to_ne_bytes().to_vec(),
        },
    ]
}

/// `meta l4proto . th dport` into consecutive 4-byte registers from `first`.
pub fn l4proto_dport(first: u32) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: meta::L4PROTO,
            dreg: first,
        },
        Expr::Payload {
            base: base::TRANSPORT,
            offset: 2,
            len: 2,
            dreg: reg_after(first, 4),
        },
    ]
}

/// `ip[6] daddr` into `reg`.
pub fn daddr(v4: bool, reg: u32) -> Expr {
    Expr::Payload {
        base: base::NETWORK,
        offset: if v4 { 16 } else { 24 },
        len: if v4 { 4 } else { 16 },
        dreg: reg,
    }
}

/// The register right after the `len`-byte value starting in `reg` (values are padded to
/// 4-byte registers; `reg` is a 16-byte register or a 4-byte one).
pub fn reg_after(reg: u32, len: u32) -> u32 {
    let start32 = if reg <= 4 { 8 + (reg - 1) * 4 } else { reg };
    let next = start32 + len.div_ceil(4);
    if (next - 8).is_multiple_of(4) {
        (next - 8) / 4 + 1
    } else {
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_read_cidrs_and_verdicts() {
        let mut e: Vec<Vec<u8>> = addr_in(false, "10.96.0.0/12".parse().unwrap())
            .iter()
            .map(Expr::encode)
            .collect();
        e.push(Expr::Verdict(Verdict::Return).encode());
        let s = summarize(&e, true);
        assert_eq!(s.dst, Some("10.96.0.0/12".parse().unwrap()));
        assert_eq!(s.src, None);
        assert_eq!(s.verdict.as_deref(), Some("RETURN"));
        // iptables-nft's short form: a 3-byte load, no mask.
        let short = vec![
            Expr::Payload {
                base: base::NETWORK,
                offset: 12,
                len: 3,
                dreg: REG_1,
            }
            .encode(),
            Expr::Cmp {
                sreg: REG_1,
                op: CmpOp::Eq,
                data: vec![10, 1, 0],
            }
            .encode(),
            Expr::Verdict(Verdict::Jump("X".into())).encode(),
        ];
        let s = summarize(&short, true);
        assert_eq!(s.src, Some("10.1.0.0/24".parse().unwrap()));
        assert_eq!(s.verdict.as_deref(), Some("jump X"));
    }

    #[test]
    fn registers_follow_each_other_as_in_nft() {
        // ip daddr (4 bytes in reg 1) . l4proto -> reg 9 . dport -> reg 10
        assert_eq!(reg_after(REG_1, 4), REG32_01);
        assert_eq!(reg_after(REG32_01, 4), REG32_02);
        // an IPv6 address fills reg 1; the next value goes to reg 2 (as nft's "proto_min reg 2")
        assert_eq!(reg_after(REG_1, 16), REG_2);
    }

    #[test]
    fn encodes_like_nft() {
        // `[ cmp eq reg 1 0x00000002 ]` as nft sends it: NFTA_EXPR_NAME "cmp", then DATA with
        // SREG 1, OP 0 and DATA { VALUE 02 }.
        let e = Expr::Cmp {
            sreg: REG_1,
            op: CmpOp::Eq,
            data: vec![2],
        };
        let b = e.encode();
        assert_eq!(&b[..8], &[8, 0, 1, 0, b'c', b'm', b'p', 0]);
        let a = attrs(&b);
        let data = attrs(a[1].1);
        assert_eq!(data[0], (1, &[0, 0, 0, 1][..]));
        assert_eq!(data[1], (2, &[0, 0, 0, 0][..]));
        assert_eq!(attrs(data[2].1), vec![(1, &[2u8][..])]);
        assert!(same(&b, &b));
        let other = Expr::Cmp {
            sreg: REG_1,
            op: CmpOp::Neq,
            data: vec![2],
        };
        assert!(!same(&b, &other.encode()));
    }

    #[test]
    fn cidr_matches_load_mask_and_compare() {
        let m = addr_in(false, "10.96.0.0/12".parse().unwrap());
        assert_eq!(m.len(), 5);
        assert_eq!(
            m[3],
            Expr::Bitwise {
                sreg: REG_1,
                dreg: REG_1,
                mask: vec![255, 240, 0, 0],
                xor: vec![0; 4]
            }
        );
        // A host address needs no mask.
        assert_eq!(addr_in(true, "fd00::1/128".parse().unwrap()).len(), 4);
    }
}

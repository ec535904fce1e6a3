//! The nftables layer: pontoon's one way to talk to nf_tables, over nfnetlink, with no `nft`
//! process. Tables, chains, rules (built from [`expr`]), sets and maps, and their elements are
//! changed in batches: one transaction, all or nothing, every message acknowledged, every error
//! of the batch (its own sequence numbers included) reported, and a receive timeout so a kernel
//! that never answers cannot hang a caller. Dumps read rules and elements back so callers can
//! compare the kernel's state with what they would write ("check by content").
//!
//! Masquerade, hostPort and the martian guard describe what they need as [`Chain`]s and
//! [`SetSpec`]s; this module knows nothing of them.

pub mod expr;

use std::io;
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::error::{Error, Result};
pub use expr::Expr;

pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_BRIDGE: u8 = 7;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

/// How long to wait for the kernel's answer to one request or batch.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

// linux/netfilter/nfnetlink.h, nf_tables.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const MSG_NEWTABLE: u16 = 0;
const MSG_GETTABLE: u16 = 1;
const MSG_DELTABLE: u16 = 2;
const MSG_NEWCHAIN: u16 = 3;
const MSG_GETCHAIN: u16 = 4;
const MSG_DELCHAIN: u16 = 5;
const MSG_NEWRULE: u16 = 6;
const MSG_GETRULE: u16 = 7;
const MSG_DELRULE: u16 = 8;
const MSG_NEWSET: u16 = 9;
const MSG_DELSET: u16 = 11;
const MSG_NEWSETELEM: u16 = 12;
const MSG_GETSETELEM: u16 = 13;
const MSG_DELSETELEM: u16 = 14;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSGERR_ATTR_MSG: u16 = 1;

const TABLE_NAME: u16 = 1;
const CHAIN_TABLE: u16 = 1;
const CHAIN_NAME: u16 = 3;
const CHAIN_HOOK: u16 = 4;
const CHAIN_POLICY: u16 = 5;
const CHAIN_TYPE: u16 = 7;
const HOOK_HOOKNUM: u16 = 1;
const HOOK_PRIORITY: u16 = 2;
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const RULE_EXPRESSIONS: u16 = 4;
const RULE_USERDATA: u16 = 7;
const SET_TABLE: u16 = 1;
const SET_NAME: u16 = 2;
const SET_FLAGS: u16 = 3;
const SET_KEY_TYPE: u16 = 4;
const SET_KEY_LEN: u16 = 5;
const SET_DATA_TYPE: u16 = 6;
const SET_DATA_LEN: u16 = 7;
const SET_DESC: u16 = 9;
const SET_ID: u16 = 10;
const SET_DESC_CONCAT: u16 = 2;
const SET_FIELD_LEN: u16 = 1;
const ELEM_LIST_TABLE: u16 = 1;
const ELEM_LIST_SET: u16 = 2;
const ELEM_LIST_ELEMENTS: u16 = 3;
const LIST_ELEM: u16 = 1;
const ELEM_KEY: u16 = 1;
const ELEM_DATA: u16 = 2;
const ELEM_KEY_END: u16 = 10;
const DATA_VALUE: u16 = 1;
/// `NFTNL_UDATA_RULE_COMMENT`: how `nft` stores a rule's comment.
const UDATA_RULE_COMMENT: u8 = 0;

pub const NFT_SET_INTERVAL: u32 = 0x4;
pub const NFT_SET_MAP: u32 = 0x8;
pub const NFT_SET_CONCAT: u32 = 0x80;

/// Netfilter hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting = 0,
    Input = 1,
    Forward = 2,
    Output = 3,
    Postrouting = 4,
}

/// What makes a chain a base chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    /// "filter" or "nat".
    pub kind: &'static str,
    pub hook: Hook,
    pub priority: i32,
}

/// A chain and the rules it must hold, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

/// A rule: its expressions and an optional comment (shown by `nft list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub exprs: Vec<Expr>,
    pub comment: Option<String>,
}

impl Rule {
    pub fn new(exprs: Vec<Expr>) -> Rule {
        Rule {
            exprs,
            comment: None,
        }
    }

    pub fn with_comment(mut self, c: &str) -> Rule {
        self.comment = Some(c.to_string());
        self
    }

    fn userdata(&self) -> Option<Vec<u8>> {
        let c = self.comment.as_ref()?;
        let mut u = vec![UDATA_RULE_COMMENT, (c.len() + 1) as u8];
        u.extend_from_slice(c.as_bytes());
        u.push(0);
        Some(u)
    }

    /// Whether a rule read back from the kernel is this one.
    pub fn matches(&self, got: &DumpedRule) -> bool {
        self.exprs.len() == got.exprs.len()
            && self.userdata() == got.userdata
            && self
                .exprs
                .iter()
                .zip(&got.exprs)
                .all(|(e, g)| expr::same(&e.encode(), g))
    }
}

/// A named set or map. Types are nft's datatype ids (concatenations combined as `nft` does, so
/// `nft list` shows them), lengths in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    /// For maps: the data type and length.
    pub data: Option<(u32, u32)>,
    /// For an interval set of a concatenation (`NFT_SET_INTERVAL | NFT_SET_CONCAT`): each
    /// field's length in bytes (unpadded). Empty otherwise.
    pub fields: Vec<u32>,
}

/// The data type of a verdict map.
pub const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

/// nft's datatype ids (nftables `include/datatype.h`).
pub mod types {
    pub const IPADDR: u32 = 7;
    pub const IP6ADDR: u32 = 8;
    pub const ETHERADDR: u32 = 9;
    pub const INET_PROTOCOL: u32 = 12;
    pub const INET_SERVICE: u32 = 13;
    pub const IFINDEX: u32 = 20;
    pub const IFNAME: u32 = 41;

    /// The id of a concatenation, as nft combines it (6 bits per field).
    pub fn concat(fields: &[u32]) -> u32 {
        fields.iter().fold(0, |acc, t| (acc << 6) | t)
    }
}

/// A set element: its key and, in a map, its data.
/// What a set element maps to.
enum ElemData<'a> {
    None,
    Value(&'a [u8]),
    /// A verdict map's `jump <chain>`.
    Jump(&'a str),
}

/// NFTA_DATA_VERDICT and its NFTA_VERDICT_CODE / NFTA_VERDICT_CHAIN; NFT_JUMP.
const DATA_VERDICT: u16 = 2;
const VERDICT_CODE: u16 = 1;
const VERDICT_CHAIN: u16 = 2;
const NF_JUMP: i32 = -3;

pub type SetElem = (Vec<u8>, Option<Vec<u8>>);

/// The data messages of one answer: (message type, payload after the nfgenmsg header).
type Answer = Vec<(u16, Vec<u8>)>;

/// A rule as the kernel reports it.
#[derive(Debug, Clone)]
pub struct DumpedRule {
    pub chain: String,
    /// Each expression's `NFTA_LIST_ELEM` payload.
    pub exprs: Vec<Vec<u8>>,
    pub userdata: Option<Vec<u8>>,
}

// ---- attribute encoding ----

fn pad4(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// Appends one attribute.
pub(crate) fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    pad4(buf);
}

pub(crate) fn attr_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    attr(buf, kind, &v);
}

pub(crate) fn attr_u32(buf: &mut Vec<u8>, kind: u16, v: u32) {
    attr(buf, kind, &v.to_be_bytes());
}

/// Appends a nested attribute. No `NLA_F_NESTED` flag: nf_tables does not need it and does not
/// set it in its dumps, so what pontoon sends and what it reads back compare byte for byte.
pub(crate) fn nested(buf: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&kind.to_ne_bytes());
    inner(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// The attributes of a payload: `(type without flags, value)`.
pub(crate) fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        let next = (len + 3) & !3;
        b = &b[next.min(b.len())..];
    }
    out
}

fn cstr(b: &[u8]) -> String {
    String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or(b)).into_owned()
}

fn nferr(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Firewall(format!("nftables: {what}: {e}"))
}

/// One message of a batch and what it is for (named in errors).
struct Msg {
    kind: u16,
    flags: u16,
    family: u8,
    body: Vec<u8>,
    what: String,
}

/// A transaction: applied all or nothing by [`Conn::commit`].
#[derive(Default)]
pub struct Batch {
    msgs: Vec<Msg>,
    next_set_id: u32,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    fn push(&mut self, kind: u16, flags: u16, family: u8, body: Vec<u8>, what: String) {
        self.msgs.push(Msg {
            kind,
            flags,
            family,
            body,
            what,
        });
    }

    /// Creates the table unless it exists.
    pub fn add_table(&mut self, family: u8, table: &str) {
        let mut b = Vec::new();
        attr_str(&mut b, TABLE_NAME, table);
        self.push(
            MSG_NEWTABLE,
            NLM_F_CREATE,
            family,
            b,
            format!("create table {table}"),
        );
    }

    pub fn del_table(&mut self, family: u8, table: &str) {
        let mut b = Vec::new();
        attr_str(&mut b, TABLE_NAME, table);
        self.push(MSG_DELTABLE, 0, family, b, format!("delete table {table}"));
    }

    /// Creates the chain unless it exists (with its hook, for a base chain).
    pub fn add_chain(&mut self, family: u8, table: &str, chain: &Chain) {
        let mut b = Vec::new();
        attr_str(&mut b, CHAIN_TABLE, table);
        attr_str(&mut b, CHAIN_NAME, &chain.name);
        if let Some(base) = &chain.base {
            nested(&mut b, CHAIN_HOOK, |h| {
                attr_u32(h, HOOK_HOOKNUM, base.hook as u32);
                attr(h, HOOK_PRIORITY, &base.priority.to_be_bytes());
            });
            attr_u32(&mut b, CHAIN_POLICY, 1); // NF_ACCEPT
            attr_str(&mut b, CHAIN_TYPE, base.kind);
        }
        self.push(
            MSG_NEWCHAIN,
            NLM_F_CREATE,
            family,
            b,
            format!("create chain {}", chain.name),
        );
    }

    /// Deletes every rule of the chain.
    pub fn flush_chain(&mut self, family: u8, table: &str, chain: &str) {
        let mut b = Vec::new();
        attr_str(&mut b, RULE_TABLE, table);
        attr_str(&mut b, RULE_CHAIN, chain);
        self.push(MSG_DELRULE, 0, family, b, format!("flush chain {chain}"));
    }

    pub fn del_chain(&mut self, family: u8, table: &str, chain: &str) {
        let mut b = Vec::new();
        attr_str(&mut b, CHAIN_TABLE, table);
        attr_str(&mut b, CHAIN_NAME, chain);
        self.push(MSG_DELCHAIN, 0, family, b, format!("delete chain {chain}"));
    }

    /// Appends a rule to the chain.
    pub fn add_rule(&mut self, family: u8, table: &str, chain: &str, rule: &Rule) {
        let mut b = Vec::new();
        attr_str(&mut b, RULE_TABLE, table);
        attr_str(&mut b, RULE_CHAIN, chain);
        nested(&mut b, RULE_EXPRESSIONS, |l| {
            for e in &rule.exprs {
                attr(l, LIST_ELEM, &e.encode());
            }
        });
        if let Some(u) = rule.userdata() {
            attr(&mut b, RULE_USERDATA, &u);
        }
        self.push(
            MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            family,
            b,
            format!("add a rule to chain {chain}"),
        );
    }

    /// Creates the set or map unless it exists.
    pub fn add_set(&mut self, family: u8, table: &str, set: &SetSpec) {
        self.next_set_id += 1;
        let mut b = Vec::new();
        attr_str(&mut b, SET_TABLE, table);
        attr_str(&mut b, SET_NAME, &set.name);
        attr_u32(&mut b, SET_FLAGS, set.flags);
        attr_u32(&mut b, SET_KEY_TYPE, set.key_type);
        attr_u32(&mut b, SET_KEY_LEN, set.key_len);
        if let Some((ty, len)) = set.data {
            attr_u32(&mut b, SET_DATA_TYPE, ty);
            attr_u32(&mut b, SET_DATA_LEN, len);
        }
        if !set.fields.is_empty() {
            nested(&mut b, SET_DESC, |d| {
                nested(d, SET_DESC_CONCAT, |c| {
                    for f in &set.fields {
                        nested(c, LIST_ELEM, |e| attr_u32(e, SET_FIELD_LEN, *f));
                    }
                })
            });
        }
        attr_u32(&mut b, SET_ID, self.next_set_id);
        self.push(
            MSG_NEWSET,
            NLM_F_CREATE,
            family,
            b,
            format!("create set {}", set.name),
        );
    }

    pub fn del_set(&mut self, family: u8, table: &str, set: &str) {
        let mut b = Vec::new();
        attr_str(&mut b, SET_TABLE, table);
        attr_str(&mut b, SET_NAME, set);
        self.push(MSG_DELSET, 0, family, b, format!("delete set {set}"));
    }

    /// Removes every element of the set.
    pub fn flush_set(&mut self, family: u8, table: &str, set: &str) {
        let mut b = Vec::new();
        attr_str(&mut b, ELEM_LIST_TABLE, table);
        attr_str(&mut b, ELEM_LIST_SET, set);
        self.push(MSG_DELSETELEM, 0, family, b, format!("flush set {set}"));
    }

    fn elements<'e>(
        &mut self,
        (kind, flags): (u16, u16),
        family: u8,
        (table, set): (&str, &str),
        els: impl ExactSizeIterator<Item = (&'e [u8], Option<&'e [u8]>, ElemData<'e>)>,
        what: String,
    ) {
        if els.len() == 0 {
            return;
        }
        let mut b = Vec::new();
        attr_str(&mut b, ELEM_LIST_TABLE, table);
        attr_str(&mut b, ELEM_LIST_SET, set);
        nested(&mut b, ELEM_LIST_ELEMENTS, |l| {
            for (key, key_end, data) in els {
                nested(l, LIST_ELEM, |e| {
                    nested(e, ELEM_KEY, |k| attr(k, DATA_VALUE, key));
                    if let Some(end) = key_end {
                        nested(e, ELEM_KEY_END, |k| attr(k, DATA_VALUE, end));
                    }
                    match data {
                        ElemData::None => {}
                        ElemData::Value(d) => nested(e, ELEM_DATA, |k| attr(k, DATA_VALUE, d)),
                        ElemData::Jump(chain) => nested(e, ELEM_DATA, |d| {
                            nested(d, DATA_VERDICT, |v| {
                                attr(v, VERDICT_CODE, &NF_JUMP.to_be_bytes());
                                attr_str(v, VERDICT_CHAIN, chain);
                            })
                        }),
                    }
                });
            }
        });
        self.push(kind, flags, family, b, what);
    }

    /// Adds elements (`(key, data)`; data for maps). An element that is already there with the
    /// same data is fine.
    pub fn add_elements(&mut self, family: u8, table: &str, set: &str, els: &[SetElem]) {
        self.elements(
            (MSG_NEWSETELEM, NLM_F_CREATE),
            family,
            (table, set),
            els.iter().map(|(k, d)| {
                (
                    k.as_slice(),
                    None,
                    d.as_deref().map_or(ElemData::None, ElemData::Value),
                )
            }),
            format!("add elements to {set}"),
        );
    }

    /// Adds the ranges `(first key, last key)` to an interval set of a concatenation.
    pub fn add_range_elements(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
        els: &[(Vec<u8>, Vec<u8>)],
    ) {
        let what = format!("add elements to {set}");
        self.ranges(
            (MSG_NEWSETELEM, NLM_F_CREATE),
            family,
            (table, set),
            els,
            what,
        );
    }

    fn ranges(
        &mut self,
        op: (u16, u16),
        family: u8,
        at: (&str, &str),
        els: &[(Vec<u8>, Vec<u8>)],
        what: String,
    ) {
        let els = els
            .iter()
            .map(|(k, e)| (k.as_slice(), Some(e.as_slice()), ElemData::None));
        self.elements(op, family, at, els, what);
    }

    /// Adds elements of a verdict map: key → jump to a chain.
    pub fn add_jump_elements(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
        els: &[(Vec<u8>, String)],
    ) {
        self.elements(
            (MSG_NEWSETELEM, NLM_F_CREATE),
            family,
            (table, set),
            els.iter()
                .map(|(k, c)| (k.as_slice(), None, ElemData::Jump(c.as_str()))),
            format!("add elements to {set}"),
        );
    }

    /// Deletes interval elements of a set that has `key_end` (concatenations of ranges) by
    /// their exact (key, key end); each must exist, or the batch fails.
    pub fn del_range_elements(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
        els: &[(Vec<u8>, Vec<u8>)],
    ) {
        let what = format!("delete elements of {set}");
        self.ranges((MSG_DELSETELEM, 0), family, (table, set), els, what);
    }

    /// Deletes elements by key (each must exist, or the batch fails).
    pub fn del_elements(&mut self, family: u8, table: &str, set: &str, keys: &[Vec<u8>]) {
        self.elements(
            (MSG_DELSETELEM, 0),
            family,
            (table, set),
            keys.iter().map(|k| (k.as_slice(), None, ElemData::None)),
            format!("delete elements of {set}"),
        );
    }

    /// Installs `chains` and `sets` as they are described: created if missing, each chain's
    /// rules replaced. All chains exist before any rule refers to them.
    pub fn install(&mut self, family: u8, table: &str, sets: &[SetSpec], chains: &[Chain]) {
        self.add_table(family, table);
        for s in sets {
            self.add_set(family, table, s);
        }
        for c in chains {
            self.add_chain(family, table, c);
        }
        for c in chains {
            self.flush_chain(family, table, &c.name);
        }
        for c in chains {
            for r in &c.rules {
                self.add_rule(family, table, &c.name, r);
            }
        }
    }

    /// Removes `chains` and `sets` (rules first, so that jumps between them do not block).
    pub fn uninstall(&mut self, family: u8, table: &str, sets: &[String], chains: &[String]) {
        for c in chains {
            self.flush_chain(family, table, c);
        }
        for c in chains {
            self.del_chain(family, table, c);
        }
        for s in sets {
            self.del_set(family, table, s);
        }
    }
}

/// An nfnetlink socket for nf_tables. Closing one that deleted elements waits for the kernel's
/// RCU-deferred freeing of them (~25 ms here): whoever holds a lock drops it after unlocking.
pub struct Conn {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// What one reply message is.
enum Reply<'a> {
    Ack {
        seq: u32,
        errno: i32,
        msg: Option<String>,
    },
    Done {
        seq: u32,
    },
    Data {
        seq: u32,
        kind: u16,
        flags: u16,
        body: &'a [u8],
    },
}

fn parse_replies(b: &[u8]) -> Vec<Reply<'_>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= b.len() {
        let len = u32::from_ne_bytes(b[off..off + 4].try_into().unwrap()) as usize;
        if len < 16 || off + len > b.len() {
            break;
        }
        let kind = u16::from_ne_bytes([b[off + 4], b[off + 5]]);
        let flags = u16::from_ne_bytes([b[off + 6], b[off + 7]]);
        let seq = u32::from_ne_bytes(b[off + 8..off + 12].try_into().unwrap());
        let payload = &b[off + 16..off + len];
        match kind {
            NLMSG_ERROR if payload.len() >= 4 => {
                let errno = -i32::from_ne_bytes(payload[..4].try_into().unwrap());
                // With ACK TLVs (and capped acks) the original header follows, then TLVs.
                let msg = (flags & NLM_F_ACK_TLVS != 0 && payload.len() >= 20)
                    .then(|| attrs(&payload[20..]))
                    .and_then(|a| {
                        a.into_iter()
                            .find(|(t, _)| *t == NLMSGERR_ATTR_MSG)
                            .map(|(_, v)| cstr(v))
                    });
                out.push(Reply::Ack { seq, errno, msg });
            }
            NLMSG_DONE => out.push(Reply::Done { seq }),
            _ => out.push(Reply::Data {
                seq,
                kind,
                flags,
                body: payload,
            }),
        }
        off += (len + 3) & !3;
    }
    out
}

fn header(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[family, 0]);
    buf.extend_from_slice(&res_id.to_be_bytes());
    start
}

fn finish(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

impl Conn {
    pub fn new() -> Result<Conn> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(|e| nferr("socket", e))?;
        sock.bind_auto().map_err(|e| nferr("bind", e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| nferr("connect", e))?;
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        let tv = nix::sys::time::TimeVal::new(RECV_TIMEOUT.as_secs() as i64, 0);
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(|e| nferr("set the receive timeout", e))?;
        Ok(Conn {
            sock,
            seq: 0,
            buf: vec![0; 256 * 1024],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn recv(&mut self, what: &str) -> Result<usize> {
        match self.sock.recv(&mut &mut self.buf[..], 0) {
            Ok(n) => Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(Error::Firewall(format!(
                    "nftables: {what}: no answer from the kernel within {} s",
                    RECV_TIMEOUT.as_secs()
                )))
            }
            Err(e) => Err(nferr(what, e)),
        }
    }

    /// Applies the batch as one transaction. Every message is acknowledged; the first error
    /// reported for any of the batch's messages (or for the batch itself) fails it, naming the
    /// message, and then nothing of the batch is applied.
    pub fn commit(&mut self, batch: &Batch) -> Result<()> {
        self.commit_inner(batch).map_err(|(_, e)| e)
    }

    /// [`Conn::commit`] for a batch whose failure with ENOENT (what it deletes is already gone)
    /// is success.
    pub fn commit_missing_ok(&mut self, batch: &Batch) -> Result<()> {
        match self.commit_inner(batch) {
            Err((libc::ENOENT, _)) => Ok(()),
            r => r.map_err(|(_, e)| e),
        }
    }

    fn commit_inner(&mut self, batch: &Batch) -> std::result::Result<(), (i32, Error)> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        let first = self.next_seq();
        let s = header(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            first,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        finish(&mut buf, s);
        let mut what: Vec<(u32, &str)> = Vec::new();
        for m in &batch.msgs {
            let seq = self.next_seq();
            let s = header(
                &mut buf,
                (NFNL_SUBSYS_NFTABLES << 8) | m.kind,
                NLM_F_REQUEST | NLM_F_ACK | m.flags,
                seq,
                m.family,
                0,
            );
            buf.extend_from_slice(&m.body);
            finish(&mut buf, s);
            what.push((seq, &m.what));
        }
        let last = self.next_seq();
        let s = header(
            &mut buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            last,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        finish(&mut buf, s);
        // A big transaction (a policy table with hundreds of pods) is one message bigger than
        // the default socket buffers, and so are its acknowledgements: size them as nft does.
        if buf.len() > 128 * 1024 {
            use nix::sys::socket::{setsockopt, sockopt};
            let want = buf.len() * 2;
            let _ = setsockopt(&self.sock, sockopt::SndBufForce, &want);
            let acks = (batch.msgs.len() * 64).max(1 << 20);
            let _ = setsockopt(&self.sock, sockopt::RcvBufForce, &acks);
        }
        self.sock
            .send(&buf, 0)
            .map_err(|e| (0, nferr("send a batch", e)))?;
        let mut pending: std::collections::HashSet<u32> = what.iter().map(|(s, _)| *s).collect();
        let mut failure: Option<(i32, Error)> = None;
        while !pending.is_empty() {
            let n = match self.recv("commit a batch") {
                Ok(n) => n,
                // After an error the kernel may not answer the rest: what failed is known.
                Err(_) if failure.is_some() => break,
                Err(e) => return Err((0, e)),
            };
            for r in parse_replies(&self.buf[..n]) {
                let Reply::Ack { seq, errno, msg } = r else {
                    continue;
                };
                if !(first..=last).contains(&seq) {
                    continue; // an answer to an earlier request
                }
                pending.remove(&seq);
                if errno != 0 && failure.is_none() {
                    let step = what
                        .iter()
                        .find(|(s, _)| *s == seq)
                        .map(|(_, w)| w.to_string())
                        .unwrap_or_else(|| "start the transaction".into());
                    let os = io::Error::from_raw_os_error(errno);
                    failure = Some((
                        errno,
                        Error::Firewall(format!(
                            "nftables refused the transaction at \"{step}\": {os}{}",
                            msg.map(|m| format!(" ({m})")).unwrap_or_default()
                        )),
                    ));
                    // The rest of the answers, if any, are already queued: do not wait long.
                    let tv = nix::sys::time::TimeVal::new(0, 100_000);
                    let _ = nix::sys::socket::setsockopt(
                        &self.sock,
                        nix::sys::socket::sockopt::ReceiveTimeout,
                        &tv,
                    );
                }
            }
        }
        if failure.is_some() {
            let tv = nix::sys::time::TimeVal::new(RECV_TIMEOUT.as_secs() as i64, 0);
            let _ = nix::sys::socket::setsockopt(
                &self.sock,
                nix::sys::socket::sockopt::ReceiveTimeout,
                &tv,
            );
        }
        failure.map_or(Ok(()), Err)
    }

    /// Sends one request and collects its data messages (a dump, or a single answer).
    /// `Ok(None)` when the kernel answers ENOENT (no such table, chain, set or element).
    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        family: u8,
        body: &[u8],
        what: &str,
    ) -> Result<Option<Answer>> {
        for _attempt in 0..5 {
            let seq = self.next_seq();
            let mut buf = Vec::new();
            let s = header(
                &mut buf,
                (NFNL_SUBSYS_NFTABLES << 8) | kind,
                NLM_F_REQUEST | flags,
                seq,
                family,
                0,
            );
            buf.extend_from_slice(body);
            finish(&mut buf, s);
            self.sock.send(&buf, 0).map_err(|e| nferr(what, e))?;
            let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
            let mut out = Vec::new();
            let mut interrupted = false;
            'recv: loop {
                let n = self.recv(what)?;
                for r in parse_replies(&self.buf[..n]) {
                    match r {
                        Reply::Ack { seq: s, .. } | Reply::Done { seq: s } if s != seq => {}
                        Reply::Data { seq: s, .. } if s != seq => {}
                        Reply::Ack { errno: 0, .. } => break 'recv,
                        Reply::Ack { errno, .. } if errno == libc::ENOENT => return Ok(None),
                        Reply::Ack { errno, msg, .. } => {
                            return Err(Error::Firewall(format!(
                                "nftables: {what}: {}{}",
                                io::Error::from_raw_os_error(errno),
                                msg.map(|m| format!(" ({m})")).unwrap_or_default()
                            )));
                        }
                        Reply::Done { .. } => break 'recv,
                        Reply::Data {
                            kind, flags, body, ..
                        } => {
                            if flags & NLM_F_DUMP_INTR != 0 {
                                interrupted = true;
                            }
                            out.push((kind & 0xff, body[4.min(body.len())..].to_vec()));
                            if !dump && flags & NLM_F_MULTI == 0 {
                                break 'recv;
                            }
                        }
                    }
                }
            }
            if !interrupted {
                return Ok(Some(out));
            }
        }
        Err(Error::Firewall(format!(
            "nftables: {what}: the dump kept being interrupted by concurrent changes"
        )))
    }

    /// Every rule of `table` (all chains), in chain order. `Ok(None)` when the table does not
    /// exist. One round trip.
    pub fn rules(&mut self, family: u8, table: &str) -> Result<Option<Vec<DumpedRule>>> {
        let mut b = Vec::new();
        attr_str(&mut b, RULE_TABLE, table);
        let Some(msgs) = self.request(
            MSG_GETRULE,
            NLM_F_DUMP,
            family,
            &b,
            &format!("list the rules of table {table}"),
        )?
        else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for (kind, body) in msgs {
            if kind != MSG_NEWRULE {
                continue;
            }
            let mut r = DumpedRule {
                chain: String::new(),
                exprs: vec![],
                userdata: None,
            };
            let mut in_table = false;
            for (t, v) in attrs(&body) {
                match t {
                    RULE_TABLE => in_table = cstr(v) == table,
                    RULE_CHAIN => r.chain = cstr(v),
                    RULE_EXPRESSIONS => {
                        r.exprs = attrs(v)
                            .into_iter()
                            .filter(|(t, _)| *t == LIST_ELEM)
                            .map(|(_, e)| e.to_vec())
                            .collect()
                    }
                    RULE_USERDATA => r.userdata = Some(v.to_vec()),
                    _ => {}
                }
            }
            // Old kernels ignore the table filter of a dump.
            if in_table {
                out.push(r);
            }
        }
        Ok(Some(out))
    }

    /// The names of the chains of `table`; `Ok(None)` when the table does not exist.
    pub fn chains(&mut self, family: u8, table: &str) -> Result<Option<Vec<String>>> {
        let mut b = Vec::new();
        attr_str(&mut b, CHAIN_TABLE, table);
        let Some(msgs) = self.request(
            MSG_GETCHAIN,
            NLM_F_DUMP,
            family,
            &b,
            &format!("list the chains of table {table}"),
        )?
        else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for (kind, body) in msgs {
            if kind != MSG_NEWCHAIN {
                continue;
            }
            let a = attrs(&body);
            let t = a
                .iter()
                .find(|(k, _)| *k == CHAIN_TABLE)
                .map(|(_, v)| cstr(v));
            if t.as_deref() == Some(table)
                && let Some((_, n)) = a.iter().find(|(k, _)| *k == CHAIN_NAME)
            {
                out.push(cstr(n));
            }
        }
        // A table that exists but has no chain answers an empty dump; tell it from a missing one.
        if out.is_empty() && !self.has_table(family, table)? {
            return Ok(None);
        }
        Ok(Some(out))
    }

    /// Whether the table exists.
    pub fn has_table(&mut self, family: u8, table: &str) -> Result<bool> {
        let mut b = Vec::new();
        attr_str(&mut b, TABLE_NAME, table);
        Ok(self
            .request(MSG_GETTABLE, 0, family, &b, &format!("read table {table}"))?
            .is_some())
    }

    /// Every element of a set: `(key, data)`. `Ok(None)` when the set does not exist.
    pub fn elements(&mut self, family: u8, table: &str, set: &str) -> Result<Option<Vec<SetElem>>> {
        let mut b = Vec::new();
        attr_str(&mut b, ELEM_LIST_TABLE, table);
        attr_str(&mut b, ELEM_LIST_SET, set);
        let Some(msgs) = self.request(
            MSG_GETSETELEM,
            NLM_F_DUMP,
            family,
            &b,
            &format!("list the elements of {set}"),
        )?
        else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for (kind, body) in msgs {
            if kind != MSG_NEWSETELEM {
                continue;
            }
            for (t, v) in attrs(&body) {
                if t != ELEM_LIST_ELEMENTS {
                    continue;
                }
                for (_, el) in attrs(v) {
                    let mut key = None;
                    let mut data = None;
                    for (t, v) in attrs(el) {
                        let value = || {
                            attrs(v)
                                .into_iter()
                                .find(|(t, _)| *t == DATA_VALUE)
                                .map(|(_, v)| v.to_vec())
                        };
                        match t {
                            ELEM_KEY => key = value(),
                            ELEM_DATA => data = value(),
                            _ => {}
                        }
                    }
                    if let Some(k) = key {
                        out.push((k, data));
                    }
                }
            }
        }
        Ok(Some(out))
    }
}

/// Whether a buffer of nf_tables event messages removes a table, chain, rule or set of
/// `table`.
pub fn removes_from_table(buf: &[u8], table: &str) -> bool {
    parse_replies(buf).iter().any(|r| match r {
        Reply::Data { kind, body, .. } if kind >> 8 == NFNL_SUBSYS_NFTABLES => {
            matches!(
                kind & 0xff,
                MSG_DELTABLE | MSG_DELCHAIN | MSG_DELRULE | MSG_DELSET
            ) && body.len() > 4
                && attrs(&body[4..])
                    .iter()
                    .any(|(t, v)| *t == 1 && cstr(v) == table)
        }
        _ => false,
    })
}

/// Compares the rules the kernel has with the chains pontoon would write: the names of the
/// chains whose rules differ (missing chains included).
pub fn differing(want: &[Chain], have: &[DumpedRule]) -> Vec<String> {
    let mut by_chain: std::collections::HashMap<&str, Vec<&DumpedRule>> =
        std::collections::HashMap::new();
    for r in have {
        by_chain.entry(r.chain.as_str()).or_default().push(r);
    }
    want.iter()
        .filter(|c| {
            let got = by_chain
                .get(c.name.as_str())
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            got.len() != c.rules.len() || !c.rules.iter().zip(got).all(|(w, g)| w.matches(g))
        })
        .map(|c| c.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut b = Vec::new();
        attr_str(&mut b, 1, "pontoon");
        nested(&mut b, 2, |n| attr_u32(n, 3, 7));
        let a = attrs(&b);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], (1, &b"pontoon\0"[..]));
        assert_eq!(attrs(a[1].1), vec![(3, &[0, 0, 0, 7][..])]);
        // 4 + 8 bytes padded, then a nest of 4 + (4 + 4).
        assert_eq!(b.len(), 12 + 12);
    }

    #[test]
    fn concat_type_ids_match_nft() {
        // What `nft --debug=mnl` sends for `ipv4_addr . inet_proto . inet_service`.
        assert_eq!(
            types::concat(&[types::IPADDR, types::INET_PROTOCOL, types::INET_SERVICE]),
            0x730d
        );
        assert_eq!(types::concat(&[types::IPADDR, types::INET_SERVICE]), 0x1cd);
    }

    #[test]
    fn replies_parse_errors_with_their_message() {
        // An NLMSG_ERROR for seq 7, EEXIST, with an ext-ack message.
        let mut b = Vec::new();
        let s = header(&mut b, NLMSG_ERROR, NLM_F_ACK_TLVS, 7, 0, 0);
        // header() wrote an nfgenmsg; an error payload is errno + the original header instead.
        b.truncate(s + 16);
        b.extend_from_slice(&(-libc::EEXIST).to_ne_bytes());
        b.extend_from_slice(&[0u8; 16]);
        attr_str(&mut b, NLMSGERR_ATTR_MSG, "Chain exists");
        finish(&mut b, s);
        match &parse_replies(&b)[..] {
            [Reply::Ack { seq: 7, errno, msg }] => {
                assert_eq!(*errno, libc::EEXIST);
                assert_eq!(msg.as_deref(), Some("Chain exists"));
            }
            _ => panic!("not parsed"),
        }
    }
}

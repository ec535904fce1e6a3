//! Map element changes over nfnetlink (NFT_MSG_NEWSETELEM / NFT_MSG_DELSETELEM in a batch), so
//! that a pod's hostPort mappings cost a few netlink messages instead of an `nft` process
//! (which first loads the whole ruleset into its cache).
//!
//! Keys and values of concatenated types are the fields one after another, each padded to a
//! 4-byte register: `inet_proto` (1 byte), `inet_service` (2 bytes, network order),
//! `ipv4_addr` (4), `ipv6_addr` (16).

use std::net::IpAddr;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use super::Element;
use crate::error::{Error, Result};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
// nf_tables.h
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;

fn pad4(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    pad4(buf);
}

fn nested(buf: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    inner(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

fn proto_num(p: &str) -> u8 {
    match p {
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        _ => 0,
    }
}

fn push_addr(v: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => v.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => v.extend_from_slice(&a.octets()),
    }
}

fn push_port(v: &mut Vec<u8>, port: u16) {
    v.extend_from_slice(&port.to_be_bytes());
    v.extend_from_slice(&[0, 0]);
}

/// The element's key: `[addr .] proto . port`.
pub fn key(e: &Element) -> Vec<u8> {
    let mut k = Vec::new();
    if let Some(ip) = e.host_ip {
        push_addr(&mut k, ip);
    }
    k.extend_from_slice(&[proto_num(&e.protocol), 0, 0, 0]);
    push_port(&mut k, e.host_port);
    k
}

/// The element's value: `pod addr . pod port`.
pub fn value(e: &Element) -> Vec<u8> {
    let mut v = Vec::new();
    push_addr(&mut v, e.pod_ip);
    push_port(&mut v, e.pod_port);
    v
}

fn header(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) {
    buf.extend_from_slice(&[0; 4]); // length, set by finish()
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[family, 0]);
    buf.extend_from_slice(&res_id.to_be_bytes());
}

fn finish(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn nlerr(what: &str, e: std::io::Error) -> Error {
    Error::Firewall(format!("nftables netlink: {what}: {e}"))
}

/// An nfnetlink socket for element changes. Closing it after deleting elements waits for the
/// kernel's RCU-deferred freeing of them (~25 ms here), so whoever holds a lock drops the
/// connection after releasing it.
pub struct Conn {
    sock: Socket,
}

impl Conn {
    pub fn new() -> Result<Conn> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(|e| nlerr("socket", e))?;
        sock.bind_auto().map_err(|e| nlerr("bind", e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| nlerr("connect", e))?;
        Ok(Conn { sock })
    }

    /// Adds (`add`) or deletes the elements in one transaction. With `tolerate_missing`,
    /// deleting an element that is not there is not an error (each deletion is then its own
    /// transaction).
    pub fn change(
        &mut self,
        table: &str,
        elements: &[(String, &Element)],
        add: bool,
        tolerate_missing: bool,
    ) -> Result<()> {
        change(&self.sock, table, elements, add, tolerate_missing)
    }
}

fn change(
    sock: &Socket,
    table: &str,
    elements: &[(String, &Element)],
    add: bool,
    tolerate_missing: bool,
) -> Result<()> {
    if elements.is_empty() {
        return Ok(());
    }
    let groups: Vec<&[(String, &Element)]> = if tolerate_missing {
        elements.chunks(1).collect()
    } else {
        vec![elements]
    };
    let mut seq = 0u32;
    for group in groups {
        let mut buf = Vec::new();
        seq += 1;
        let begin = buf.len();
        header(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        finish(&mut buf, begin);
        let first = seq + 1;
        for (map, e) in group {
            seq += 1;
            let start = buf.len();
            let (ty, flags) = if add {
                (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK)
            } else {
                (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK)
            };
            header(
                &mut buf,
                (NFNL_SUBSYS_NFTABLES << 8) | ty,
                flags,
                seq,
                NFPROTO_INET,
                0,
            );
            attr(
                &mut buf,
                NFTA_SET_ELEM_LIST_TABLE,
                format!("{table}\0").as_bytes(),
            );
            attr(
                &mut buf,
                NFTA_SET_ELEM_LIST_SET,
                format!("{map}\0").as_bytes(),
            );
            nested(&mut buf, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                nested(b, NFTA_LIST_ELEM, |b| {
                    nested(b, NFTA_SET_ELEM_KEY, |b| attr(b, NFTA_DATA_VALUE, &key(e)));
                    if add {
                        nested(b, NFTA_SET_ELEM_DATA, |b| {
                            attr(b, NFTA_DATA_VALUE, &value(e))
                        });
                    }
                });
            });
            finish(&mut buf, start);
        }
        seq += 1;
        let end = buf.len();
        header(
            &mut buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        );
        finish(&mut buf, end);
        sock.send(&buf, 0).map_err(|e| nlerr("send", e))?;
        // One ACK (or error) per element message.
        let mut acked = 0;
        let want = group.len();
        let mut rbuf = vec![0u8; 16384];
        while acked < want {
            let n = sock
                .recv(&mut &mut rbuf[..], 0)
                .map_err(|e| nlerr("recv", e))?;
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(rbuf[off..off + 4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes([rbuf[off + 4], rbuf[off + 5]]);
                let rseq = u32::from_ne_bytes(rbuf[off + 8..off + 12].try_into().unwrap());
                if ty == NLMSG_ERROR && rseq >= first && len >= 20 {
                    let errno = -i32::from_ne_bytes(rbuf[off + 16..off + 20].try_into().unwrap());
                    match errno {
                        0 => acked += 1,
                        libc::ENOENT if tolerate_missing && !add => acked += 1,
                        e => {
                            return Err(nlerr(
                                if add {
                                    "cannot add a hostPort element"
                                } else {
                                    "cannot delete a hostPort element"
                                },
                                std::io::Error::from_raw_os_error(e),
                            ));
                        }
                    }
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let e = Element {
            host_ip: None,
            protocol: "tcp".into(),
            host_port: 8080,
            pod_ip: "10.0.0.5".parse().unwrap(),
            pod_port: 80,
        };
        assert_eq!(key(&e), [6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(value(&e), [10, 0, 0, 5, 0, 80, 0, 0]);
        let e6 = Element {
            host_ip: Some("2001:db8::1".parse().unwrap()),
            protocol: "udp".into(),
            host_port: 53,
            pod_ip: "fd00::5".parse().unwrap(),
            pod_port: 53,
        };
        assert_eq!(key(&e6).len(), 24);
        assert_eq!(key(&e6)[16], 17);
        assert_eq!(value(&e6).len(), 20);
    }
}

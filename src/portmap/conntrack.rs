//! Flushing stale UDP conntrack entries for a host port over ctnetlink (no `conntrack` exec):
//! a UDP "connection" to a hostPort keeps its old DNAT target for as long as packets flow, so
//! a pod replaced behind the port would never receive them (containernetworking/plugins#123).

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::error::{Error, Result};

fn nl_err(what: &str, e: std::io::Error) -> Error {
    Error::Firewall(format!("conntrack netlink: {what}: {e}"))
}

fn send(
    sock: &Socket,
    seq: u32,
    family: NetfilterProtoFamily,
    msg: ConntrackMessage,
    flags: u16,
) -> Result<()> {
    let mut h = NetlinkHeader::default();
    h.flags = NLM_F_REQUEST | flags;
    h.sequence_number = seq;
    let nf = NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), msg);
    let mut m = NetlinkMessage::new(h, NetlinkPayload::from(nf));
    m.finalize();
    let mut buf = vec![0u8; m.buffer_len()];
    m.serialize(&mut buf);
    sock.send(&buf, 0).map_err(|e| nl_err("send", e))?;
    Ok(())
}

/// Receives every reply to request `seq` (a dump, or an ACK/error).
fn recv_all(sock: &Socket, seq: u32) -> Result<Vec<ConntrackMessage>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = sock
            .recv(&mut &mut buf[..], 0)
            .map_err(|e| nl_err("recv", e))?;
        let mut off = 0;
        while off < n {
            let msg = match NetlinkMessage::<NetfilterMessage>::deserialize(&buf[off..n]) {
                Ok(m) => m,
                // Message types this crate does not model: skip by length.
                Err(_) => {
                    let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                    if len == 0 {
                        return Ok(out);
                    }
                    off += (len + 3) & !3;
                    continue;
                }
            };
            let len = msg.header.length as usize;
            off += (len.max(16) + 3) & !3;
            if msg.header.sequence_number != seq {
                continue;
            }
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(out),
                        Some(_) => {
                            let io = e.to_io();
                            if io.raw_os_error() == Some(libc::ENOENT) {
                                Ok(out)
                            } else {
                                Err(nl_err("request", io))
                            }
                        }
                    };
                }
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: netlink_packet_netfilter::NetfilterMessageInner::Conntrack(c),
                    ..
                }) => out.push(c),
                _ => {}
            }
        }
    }
}

fn orig_tuple(attrs: &[ConntrackAttribute]) -> Option<&Vec<Tuple>> {
    attrs.iter().find_map(|a| match a {
        ConntrackAttribute::CtaTupleOrig(t) => Some(t),
        _ => None,
    })
}

fn is_udp_to(tuple: &[Tuple], port: u16) -> bool {
    tuple.iter().any(|t| match t {
        Tuple::Proto(p) => {
            p.iter()
                .any(|x| matches!(x, ProtoTuple::Protocol(Protocol::Udp)))
                && p.iter()
                    .any(|x| matches!(x, ProtoTuple::DestinationPort(d) if *d == port))
        }
        _ => false,
    })
}

/// Deletes every UDP conntrack entry of the given families whose original destination port is
/// one of `ports`. Each family costs a dump, which walks the kernel's whole conntrack table
/// (~10 ms here), so only the families with UDP mappings are asked for. Returns how many were
/// deleted.
pub fn flush_udp_ports(ports: &[u16], v4: bool, v6: bool) -> Result<usize> {
    if ports.is_empty() || !(v4 || v6) {
        return Ok(0);
    }
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(|e| nl_err("socket", e))?;
    sock.bind_auto().map_err(|e| nl_err("bind", e))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|e| nl_err("connect", e))?;
    let mut seq = 0;
    let mut deleted = 0;
    let families = [
        (v4, NetfilterProtoFamily::IPv4),
        (v6, NetfilterProtoFamily::IPv6),
    ];
    for family in families.into_iter().filter(|(on, _)| *on).map(|(_, f)| f) {
        seq += 1;
        send(
            &sock,
            seq,
            family,
            ConntrackMessage::Get(vec![]),
            NLM_F_DUMP,
        )?;
        let entries = recv_all(&sock, seq)?;
        for e in entries {
            let ConntrackMessage::New(attrs) = e else {
                continue;
            };
            let Some(tuple) = orig_tuple(&attrs) else {
                continue;
            };
            if !ports.iter().any(|p| is_udp_to(tuple, *p)) {
                continue;
            }
            seq += 1;
            send(
                &sock,
                seq,
                family,
                ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(tuple.clone())]),
                NLM_F_ACK,
            )?;
            recv_all(&sock, seq)?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

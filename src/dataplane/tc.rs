//! Traffic shaping for the `bandwidth` capability: a token bucket filter (TBF) as the root qdisc
//! of a veth end, over rtnetlink (no `tc` process). Traffic to the pod is shaped on the host end's
//! egress, traffic from the pod on the pod end's egress: no extra (ifb) device per pod, and TBF
//! shapes (queues) rather than polices (drops), so TCP gets close to the configured rate.

use crate::nft::{attr, attrs, nested};

const RTM_NEWQDISC: u16 = 36;
const RTM_GETQDISC: u16 = 38;
const TC_H_ROOT: u32 = 0xFFFF_FFFF;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// The queue a TBF may hold beyond its burst, in time at the rate (what the reference's
/// bandwidth plugin uses).
const LATENCY_MS: u64 = 25;

/// One direction's limit: a rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    pub rate_bytes: u64,
    pub burst_bytes: u32,
}

impl Shape {
    /// From the CNI convention: bits per second and bits.
    pub fn from_bits(rate_bits: u64, burst_bits: u64) -> Shape {
        Shape {
            rate_bytes: rate_bits / 8,
            burst_bytes: (burst_bits / 8).min(u32::MAX as u64) as u32,
        }
    }
}

/// The `tcmsg` header: family, ifindex, handle, parent, info.
fn tcmsg(ifindex: u32, handle: u32, parent: u32) -> Vec<u8> {
    let mut b = vec![0u8; 4]; // family AF_UNSPEC, pads
    b.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    b.extend_from_slice(&handle.to_ne_bytes());
    b.extend_from_slice(&parent.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b
}

/// The RTM_NEWQDISC body installing `s` as the root TBF of `ifindex`.
pub fn tbf(ifindex: u32, s: &Shape) -> (u16, Vec<u8>) {
    let mut b = tcmsg(ifindex, 0x0001_0000, TC_H_ROOT);
    attr(&mut b, TCA_KIND, b"tbf\0");
    let rate32 = s.rate_bytes.min(u32::MAX as u64) as u32;
    // Ticks of 64 ns to send the burst at the rate (what `qopt.buffer` counts).
    let buffer_ns = (s.burst_bytes as u128 * 1_000_000_000) / s.rate_bytes.max(1) as u128;
    let buffer_ticks = (buffer_ns / 64).min(u32::MAX as u128) as u32;
    let limit = (s.rate_bytes as u128 * LATENCY_MS as u128 / 1000 + s.burst_bytes as u128)
        .min(u32::MAX as u128) as u32;
    let mut qopt = Vec::with_capacity(36);
    // rate: cell_log, linklayer, overhead, cell_align, mpu, rate
    qopt.extend_from_slice(&[0, TC_LINKLAYER_ETHERNET]);
    qopt.extend_from_slice(&0u16.to_ne_bytes());
    qopt.extend_from_slice(&0i16.to_ne_bytes());
    qopt.extend_from_slice(&0u16.to_ne_bytes());
    qopt.extend_from_slice(&rate32.to_ne_bytes());
    qopt.extend_from_slice(&[0u8; 12]); // no peak rate
    qopt.extend_from_slice(&limit.to_ne_bytes());
    qopt.extend_from_slice(&buffer_ticks.to_ne_bytes());
    qopt.extend_from_slice(&0u32.to_ne_bytes()); // mtu (peak rate only)
    nested(&mut b, TCA_OPTIONS, |o| {
        attr(o, TCA_TBF_PARMS, &qopt);
        if s.rate_bytes > u32::MAX as u64 {
            attr(o, TCA_TBF_RATE64, &s.rate_bytes.to_ne_bytes());
        }
        attr(o, TCA_TBF_BURST, &s.burst_bytes.to_ne_bytes());
    });
    (RTM_NEWQDISC, b)
}

/// The RTM_GETQDISC dump request (all qdiscs of the namespace).
pub fn qdisc_dump() -> (u16, Vec<u8>) {
    (RTM_GETQDISC, tcmsg(0, 0, 0))
}

/// A root TBF's rate in bytes/s, from one RTM_NEWQDISC message of a dump, if it is one on
/// `ifindex`.
pub fn root_tbf_rate(msg: &[u8], ifindex: u32) -> Option<u64> {
    if msg.len() < 20 {
        return None;
    }
    let idx = i32::from_ne_bytes(msg[4..8].try_into().unwrap()) as u32;
    let parent = u32::from_ne_bytes(msg[12..16].try_into().unwrap());
    if idx != ifindex || parent != TC_H_ROOT {
        return None;
    }
    let a = attrs(&msg[20..]);
    let kind = a.iter().find(|(t, _)| *t == TCA_KIND)?.1;
    if kind != b"tbf\0" {
        return None;
    }
    let opts = attrs(a.iter().find(|(t, _)| *t == TCA_OPTIONS)?.1);
    if let Some((_, r64)) = opts.iter().find(|(t, _)| *t == TCA_TBF_RATE64) {
        return Some(u64::from_ne_bytes((*r64).try_into().ok()?));
    }
    let parms = opts.iter().find(|(t, _)| *t == TCA_TBF_PARMS)?.1;
    Some(u32::from_ne_bytes(parms.get(8..12)?.try_into().ok()?) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tbf_message_reads_back() {
        let s = Shape::from_bits(8_000_000, 800_000);
        assert_eq!(s.rate_bytes, 1_000_000);
        assert_eq!(s.burst_bytes, 100_000);
        let (_, body) = tbf(7, &s);
        // A dump answers with the same layout (plus statistics).
        assert_eq!(root_tbf_rate(&body, 7), Some(1_000_000));
        assert_eq!(root_tbf_rate(&body, 8), None);
        let fast = Shape::from_bits(80_000_000_000, 8_000_000);
        assert_eq!(root_tbf_rate(&tbf(1, &fast).1, 1), Some(10_000_000_000));
    }
}

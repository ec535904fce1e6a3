//! host-local's address ranges: `ranges` (range sets), the legacy single-range keys, their
//! validation and defaults, and the round-robin walk over a range set.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RangeConf {
    #[serde(default)]
    pub subnet: String,
    #[serde(default)]
    pub range_start: Option<String>,
    #[serde(default)]
    pub range_end: Option<String>,
    #[serde(default)]
    pub gateway: Option<String>,
}

/// One validated range: every address in `start..=end` except `gateway` may be handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNetwork,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: IpAddr,
}

/// One range set: one address is allocated from each set; all ranges of a set share a family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet(pub Vec<Range>);

pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub fn from_u128(n: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

fn parse_addr(s: &str, what: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| Error::config(format!("ipam {what} {s:?} is not an IP address")))
}

impl Range {
    pub fn from_conf(c: &RangeConf) -> Result<Range> {
        if c.subnet.is_empty() {
            return Err(Error::config("ipam range has no `subnet`"));
        }
        let subnet: IpNetwork = c
            .subnet
            .parse()
            .map_err(|_| Error::config(format!("ipam subnet {:?} is not a CIDR", c.subnet)))?;
        if subnet.ip() != subnet.network() {
            return Err(Error::config(format!(
                "ipam subnet {} has host bits set; for a /{} the network address is {}",
                c.subnet,
                subnet.prefix(),
                subnet.network()
            )));
        }
        let bits = if subnet.is_ipv4() { 32 } else { 128 };
        if subnet.prefix() > bits - 2 {
            return Err(Error::config(format!(
                "ipam subnet {} is too small to allocate from; use at most a /{}",
                c.subnet,
                bits - 2
            )));
        }
        let v4 = subnet.is_ipv4();
        let net = to_u128(subnet.network());
        let last = to_u128(subnet.broadcast());
        let inside = |ip: IpAddr| ip.is_ipv4() == v4 && subnet.contains(ip);
        let gateway = match &c.gateway {
            Some(g) => parse_addr(g, "gateway")?,
            None => from_u128(net + 1, v4),
        };
        let start = match &c.range_start {
            Some(s) => {
                let ip = parse_addr(s, "rangeStart")?;
                if !inside(ip) {
                    return Err(Error::config(format!(
                        "ipam rangeStart {ip} is outside subnet {subnet}"
                    )));
                }
                ip
            }
            None => from_u128(net + 1, v4),
        };
        let end = match &c.range_end {
            Some(s) => {
                let ip = parse_addr(s, "rangeEnd")?;
                if !inside(ip) {
                    return Err(Error::config(format!(
                        "ipam rangeEnd {ip} is outside subnet {subnet}"
                    )));
                }
                ip
            }
            // IPv4 excludes the broadcast address; IPv6 has none.
            None => from_u128(if v4 { last - 1 } else { last }, v4),
        };
        if to_u128(start) > to_u128(end) {
            return Err(Error::config(format!(
                "ipam rangeStart {start} is after rangeEnd {end}"
            )));
        }
        if to_u128(start) == net || (v4 && to_u128(end) == last) {
            return Err(Error::config(format!(
                "ipam range {start}-{end} includes the network or broadcast address of {subnet}"
            )));
        }
        if gateway.is_ipv4() != v4 {
            return Err(Error::config(format!(
                "ipam gateway {gateway} is not of the family of subnet {subnet}"
            )));
        }
        if !subnet.contains(gateway) || to_u128(gateway) == net || (v4 && to_u128(gateway) == last)
        {
            return Err(Error::config(format!(
                "ipam gateway {gateway} is not a host address of subnet {subnet}; the pod's \
                 default route could never reach it"
            )));
        }
        Ok(Range {
            subnet,
            start,
            end,
            gateway,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.subnet.is_ipv4()
            && (to_u128(self.start)..=to_u128(self.end)).contains(&to_u128(ip))
    }

    fn overlaps(&self, o: &Range) -> bool {
        self.subnet.is_ipv4() == o.subnet.is_ipv4()
            && to_u128(self.start) <= to_u128(o.end)
            && to_u128(o.start) <= to_u128(self.end)
    }

    /// Number of addresses this range can hand out (the gateway excluded).
    pub fn size(&self) -> u128 {
        let n = to_u128(self.end) - to_u128(self.start) + 1;
        if self.contains(self.gateway) {
            n - 1
        } else {
            n
        }
    }

    /// The address with the subnet's prefix, as it goes on the interface and in the result.
    pub fn with_prefix(&self, ip: IpAddr) -> IpNetwork {
        IpNetwork::new(ip, self.subnet.prefix()).expect("prefix of a valid subnet")
    }
}

impl RangeSet {
    pub fn is_ipv4(&self) -> bool {
        self.0[0].subnet.is_ipv4()
    }

    /// The range holding `ip`, if any.
    pub fn range_of(&self, ip: IpAddr) -> Option<&Range> {
        self.0.iter().find(|r| r.contains(ip))
    }

    pub fn size(&self) -> u128 {
        self.0.iter().map(Range::size).sum()
    }

    /// Candidates in host-local's round-robin order: starting right after `last` when it lies in
    /// this set (else at the first range's start), range by range, wrapping around once; gateways
    /// are skipped.
    pub fn candidates(&self, last: Option<IpAddr>) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.is_ipv4();
        // Position = (range index, offset within the range).
        let start_pos = last
            .and_then(|l| {
                self.0
                    .iter()
                    .position(|r| r.contains(l))
                    .map(|i| (i, to_u128(l) - to_u128(self.0[i].start)))
            })
            .map(|(i, off)| {
                let r = &self.0[i];
                if to_u128(r.start) + off >= to_u128(r.end) {
                    ((i + 1) % self.0.len(), 0)
                } else {
                    (i, off + 1)
                }
            })
            .unwrap_or((0, 0));
        let total: u128 = self
            .0
            .iter()
            .map(|r| to_u128(r.end) - to_u128(r.start) + 1)
            .sum();
        let mut pos = start_pos;
        let mut left = total;
        std::iter::from_fn(move || {
            while left > 0 {
                left -= 1;
                let r = &self.0[pos.0];
                let ip = from_u128(to_u128(r.start) + pos.1, v4);
                if to_u128(r.start) + pos.1 >= to_u128(r.end) {
                    pos = ((pos.0 + 1) % self.0.len(), 0);
                } else {
                    pos.1 += 1;
                }
                if ip != r.gateway {
                    return Some(ip);
                }
            }
            None
        })
    }
}

/// Validates range sets: at least one, each non-empty and of one family, no overlaps anywhere.
pub fn build_range_sets(confs: &[Vec<RangeConf>]) -> Result<Vec<RangeSet>> {
    if confs.is_empty() {
        return Err(Error::config(
            "ipam has no address ranges: set `ranges` (or `subnet`)",
        ));
    }
    let mut sets = Vec::with_capacity(confs.len());
    for (i, set) in confs.iter().enumerate() {
        if set.is_empty() {
            return Err(Error::config(format!("ipam ranges[{i}] is empty")));
        }
        let ranges = set
            .iter()
            .map(Range::from_conf)
            .collect::<Result<Vec<_>>>()?;
        let v4 = ranges[0].subnet.is_ipv4();
        if ranges.iter().any(|r| r.subnet.is_ipv4() != v4) {
            return Err(Error::config(format!(
                "ipam ranges[{i}] mixes IPv4 and IPv6; put each family in its own range set"
            )));
        }
        sets.push(RangeSet(ranges));
    }
    let all: Vec<(usize, &Range)> = sets
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.0.iter().map(move |r| (i, r)))
        .collect();
    for (a, (ia, ra)) in all.iter().enumerate() {
        for (ib, rb) in &all[a + 1..] {
            if ra.overlaps(rb) {
                return Err(Error::config(format!(
                    "ipam ranges overlap: {}-{} (set {ia}) and {}-{} (set {ib})",
                    ra.start, ra.end, rb.start, rb.end
                )));
            }
        }
    }
    Ok(sets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(subnet: &str) -> RangeConf {
        RangeConf {
            subnet: subnet.into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_v4() {
        let r = Range::from_conf(&rc("10.22.0.0/24")).unwrap();
        assert_eq!(r.start.to_string(), "10.22.0.1");
        assert_eq!(r.end.to_string(), "10.22.0.254");
        assert_eq!(r.gateway.to_string(), "10.22.0.1");
        assert_eq!(r.size(), 253);
    }

    #[test]
    fn defaults_v6() {
        let r = Range::from_conf(&rc("fd00:1::/120")).unwrap();
        assert_eq!(r.start.to_string(), "fd00:1::1");
        assert_eq!(r.end.to_string(), "fd00:1::ff");
        assert_eq!(r.size(), 254);
    }

    #[test]
    fn validation() {
        for bad in [
            "10.22.0.5/24",
            "10.0.0.0/31",
            "10.0.0.0/32",
            "fd00::/127",
            "nope",
            "",
        ] {
            assert_eq!(Range::from_conf(&rc(bad)).unwrap_err().code(), 7, "{bad}");
        }
        let mut c = rc("10.0.0.0/24");
        c.range_start = Some("10.0.1.5".into());
        assert!(Range::from_conf(&c).is_err());
        let mut c = rc("10.0.0.0/24");
        c.range_start = Some("10.0.0.50".into());
        c.range_end = Some("10.0.0.40".into());
        assert!(Range::from_conf(&c).is_err());
        let mut c = rc("10.0.0.0/24");
        c.range_end = Some("10.0.0.255".into());
        assert!(Range::from_conf(&c).is_err());
        let mut c = rc("10.0.0.0/24");
        c.gateway = Some("fd00::1".into());
        assert!(Range::from_conf(&c).is_err());
    }

    #[test]
    fn sets_validation() {
        assert!(build_range_sets(&[]).is_err());
        assert!(build_range_sets(&[vec![]]).is_err());
        assert!(build_range_sets(&[vec![rc("10.0.0.0/24"), rc("fd00::/64")]]).is_err());
        let e = build_range_sets(&[vec![rc("10.0.0.0/16")], vec![rc("10.0.1.0/24")]]).unwrap_err();
        assert!(e.to_string().contains("overlap"));
        let ok = build_range_sets(&[vec![rc("10.0.0.0/24")], vec![rc("fd00::/64")]]).unwrap();
        assert_eq!(ok.len(), 2);
    }

    #[test]
    fn round_robin_order_skips_gateway_and_wraps() {
        let mut c = rc("10.0.0.0/29");
        c.range_start = Some("10.0.0.1".into());
        let set = RangeSet(vec![Range::from_conf(&c).unwrap()]);
        let all: Vec<String> = set.candidates(None).map(|i| i.to_string()).collect();
        assert_eq!(
            all,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
        let after: Vec<String> = set
            .candidates(Some("10.0.0.4".parse().unwrap()))
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            after,
            ["10.0.0.5", "10.0.0.6", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
        );
        // A last address outside the set restarts at the beginning.
        let outside: Vec<IpAddr> = set
            .candidates(Some("192.168.0.1".parse().unwrap()))
            .collect();
        assert_eq!(outside.len(), 5);
        assert_eq!(set.size(), 5);
    }

    #[test]
    fn multiple_ranges_in_a_set() {
        let set = RangeSet(vec![
            Range::from_conf(&RangeConf {
                subnet: "10.0.0.0/24".into(),
                range_start: Some("10.0.0.10".into()),
                range_end: Some("10.0.0.11".into()),
                gateway: None,
            })
            .unwrap(),
            Range::from_conf(&RangeConf {
                subnet: "10.0.1.0/24".into(),
                range_start: Some("10.0.1.10".into()),
                range_end: Some("10.0.1.11".into()),
                gateway: None,
            })
            .unwrap(),
        ]);
        let v: Vec<String> = set
            .candidates(Some("10.0.0.11".parse().unwrap()))
            .map(|i| i.to_string())
            .collect();
        assert_eq!(v, ["10.0.1.10", "10.0.1.11", "10.0.0.10", "10.0.0.11"]);
    }
}

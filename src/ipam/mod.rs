//! The address pool: host-local's configuration, allocation order and on-disk layout, run
//! in-process, plus what host-local lacks (a bounded lock wait, crash-safe reservations). What
//! one attachment holds, and releasing it, is [`crate::attachment`]'s.

pub mod delegate;
pub mod range;
pub mod store;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use serde_json::Value;

use crate::cni::result::{Dns, Route};
use crate::error::{Error, Result};
pub use range::{Range, RangeConf, RangeSet};
pub use store::{Owner, Store};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The `type`s served in-process.
pub const IN_PROCESS_TYPES: [&str; 2] = ["host-local", "pontoon"];

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(default)]
    ranges: Vec<Vec<RangeConf>>,
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default)]
    range_start: Option<String>,
    #[serde(default)]
    range_end: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    resolv_conf: Option<PathBuf>,
    /// pontoon: how long to wait for the pool lock before answering "try again later".
    #[serde(default)]
    lock_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRoute {
    dst: String,
    #[serde(default)]
    gw: Option<String>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    advmss: Option<u32>,
    #[serde(default)]
    priority: Option<u32>,
    #[serde(default)]
    table: Option<u32>,
    #[serde(default)]
    scope: Option<u8>,
}

/// A validated host-local configuration for one network.
#[derive(Debug, Clone)]
pub struct Pool {
    pub network: String,
    pub sets: Vec<RangeSet>,
    pub routes: Vec<Route>,
    pub data_dir: PathBuf,
    pub dns: Dns,
    pub lock_timeout: Duration,
}

/// One allocated address, with its range's gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    pub address: IpNetwork,
    pub gateway: IpAddr,
}

impl Pool {
    /// Reads the `ipam` object of `network`; `ip_ranges` (the `ipRanges` capability) go first.
    pub fn from_config(network: &str, ipam: &Value, ip_ranges: Option<&Value>) -> Result<Pool> {
        let raw: RawIpam = serde_path_to_error::deserialize(ipam)
            .map_err(|e| Error::config(format!("key `ipam.{}`: {}", e.path(), e.inner())))?;
        let mut confs: Vec<Vec<RangeConf>> = Vec::new();
        if let Some(v) = ip_ranges.filter(|v| !v.is_null()) {
            let extra: Vec<Vec<RangeConf>> = serde_path_to_error::deserialize(v).map_err(|e| {
                Error::config(format!(
                    "key `runtimeConfig.ipRanges.{}`: {}",
                    e.path(),
                    e.inner()
                ))
            })?;
            confs.extend(extra);
        }
        if let Some(subnet) = raw.subnet.clone() {
            confs.push(vec![RangeConf {
                subnet,
                range_start: raw.range_start.clone(),
                range_end: raw.range_end.clone(),
                gateway: raw.gateway.clone(),
            }]);
        }
        confs.extend(raw.ranges.iter().cloned());
        let sets = range::build_range_sets(&confs)?;
        let mut routes = Vec::with_capacity(raw.routes.len());
        for r in &raw.routes {
            let dst: IpNetwork = r
                .dst
                .parse()
                .map_err(|_| Error::config(format!("ipam route dst {:?} is not a CIDR", r.dst)))?;
            let gw = match &r.gw {
                Some(g) => Some(g.parse().map_err(|_| {
                    Error::config(format!("ipam route gw {g:?} is not an IP address"))
                })?),
                None => None,
            };
            routes.push(Route {
                dst,
                gw,
                mtu: r.mtu,
                advmss: r.advmss,
                priority: r.priority,
                table: r.table,
                scope: r.scope,
            });
        }
        let dns = match &raw.resolv_conf {
            Some(p) => parse_resolv_conf(p)?,
            None => Dns::default(),
        };
        Ok(Pool {
            network: network.to_string(),
            sets,
            routes,
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            dns,
            lock_timeout: raw
                .lock_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_LOCK_TIMEOUT),
        })
    }

    pub fn dir(&self) -> PathBuf {
        Store::network_dir(&self.data_dir, &self.network)
    }

    pub fn open(&self) -> Result<Store> {
        Store::open(&self.data_dir, &self.network, self.lock_timeout)
    }

    pub fn range_of(&self, ip: IpAddr) -> Option<&Range> {
        self.sets.iter().find_map(|s| s.range_of(ip))
    }

    pub fn allocated_of(&self, ip: IpAddr) -> Result<Allocated> {
        let r = self.range_of(ip).ok_or_else(|| {
            Error::Internal(format!("{ip} is allocated but in no range of the pool"))
        })?;
        Ok(Allocated {
            address: r.with_prefix(ip),
            gateway: r.gateway,
        })
    }

    /// The pod subnets of the pool.
    pub fn subnets(&self) -> Vec<IpNetwork> {
        self.sets
            .iter()
            .flat_map(|s| s.0.iter().map(|r| r.subnet))
            .collect()
    }

    /// One address for `owner` per range set (a library convenience: the record of an ADD
    /// without veth or mappings; see [`crate::attachment::begin`]).
    pub fn allocate(&self, owner: &Owner, requested: &[IpAddr]) -> Result<Vec<Allocated>> {
        let req = crate::attachment::Request {
            requested,
            ..Default::default()
        };
        crate::attachment::begin(self, owner, &req).map(|b| b.addrs)
    }

    /// Releases everything `owner` holds (see [`crate::attachment::release`]).
    pub fn release(&self, owner: &Owner) -> Result<Vec<IpAddr>> {
        crate::attachment::release(self, owner).map(|r| r.ips)
    }

    /// Picks one free address per range set, honouring `requested` ones, without writing
    /// anything (the store is locked by the caller).
    pub fn pick(&self, store: &Store, requested: &[IpAddr]) -> Result<Vec<IpAddr>> {
        for r in requested {
            if !self.sets.iter().any(|s| s.range_of(*r).is_some()) {
                return Err(Error::AddressUnavailable(format!(
                    "requested IP {r} is in none of the configured ranges of network {}",
                    self.network
                )));
            }
        }
        let mut picked: Vec<IpAddr> = Vec::with_capacity(self.sets.len());
        for (i, set) in self.sets.iter().enumerate() {
            let want: Vec<&IpAddr> = requested
                .iter()
                .filter(|r| set.range_of(**r).is_some())
                .collect();
            let ip = match want.as_slice() {
                [] => set
                    .candidates(store.last_reserved(i))
                    .find(|ip| !store.is_taken(*ip))
                    .ok_or_else(|| {
                        Error::PoolExhausted(format!(
                            "no free address left in range set {i} ({}) of network {}; \
                             free addresses with DEL or GC, or widen the range",
                            describe_set(set),
                            self.network
                        ))
                    })?,
                [one] => {
                    let ip = **one;
                    if set.range_of(ip).is_some_and(|r| r.gateway == ip) {
                        return Err(Error::AddressUnavailable(format!(
                            "requested IP {ip} is the gateway of its range"
                        )));
                    }
                    if store.is_taken(ip) {
                        let by = match store.holder(ip)? {
                            store::Stored::Ok(o) => o.to_string(),
                            _ => "an unknown holder".into(),
                        };
                        return Err(Error::AddressUnavailable(format!(
                            "requested IP {ip} is not available: it is held by {by}"
                        )));
                    }
                    ip
                }
                many => {
                    return Err(Error::AddressUnavailable(format!(
                        "requested IPs {many:?} fall in the same range set {i}; one address \
                         per range set is allocated"
                    )));
                }
            };
            picked.push(ip);
        }
        Ok(picked)
    }
}

/// A range set for messages: `start-end, ...`.
pub fn describe_set(set: &RangeSet) -> String {
    set.0
        .iter()
        .map(|r| format!("{}-{}", r.start, r.end))
        .collect::<Vec<_>>()
        .join(", ")
}

/// host-local's `resolvConf`: a resolv.conf file turned into the result's `dns`.
pub fn parse_resolv_conf(path: &Path) -> Result<Dns> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("cannot read ipam.resolvConf {}", path.display()), e))?;
    let mut dns = Dns::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("").trim();
        let mut f = line.split_whitespace();
        match f.next() {
            Some("nameserver") => dns.nameservers.extend(f.next().map(String::from)),
            Some("domain") => dns.domain = f.next().unwrap_or("").to_string(),
            Some("search") => dns.search = f.map(String::from).collect(),
            Some("options") => dns.options.extend(f.map(String::from)),
            _ => {}
        }
    }
    Ok(dns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashSet;

    fn pool(dir: &Path, ipam: Value) -> Pool {
        let mut ipam = ipam;
        ipam["dataDir"] = json!(dir);
        Pool::from_config("testnet", &ipam, None).unwrap()
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pontoon-ipam-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn config_forms_and_defaults() {
        let p = Pool::from_config(
            "n",
            &json!({"type":"host-local","subnet":"10.1.0.0/16","routes":[{"dst":"0.0.0.0/0"}],
                    "ranges":[[{"subnet":"fd00::/64"}]]}),
            Some(&json!([[{"subnet":"192.168.5.0/24"}]])),
        )
        .unwrap();
        assert_eq!(p.sets.len(), 3);
        assert_eq!(p.sets[0].0[0].subnet.to_string(), "192.168.5.0/24");
        assert_eq!(p.sets[1].0[0].subnet.to_string(), "10.1.0.0/16");
        assert_eq!(p.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(p.routes.len(), 1);
        let e = Pool::from_config("n", &json!({"type":"host-local"}), None).unwrap_err();
        assert_eq!(e.code(), 7);
        let e = Pool::from_config("n", &json!({"ranges":"x"}), None).unwrap_err();
        assert!(e.to_string().contains("ipam.ranges"), "{e}");
    }

    #[test]
    fn allocate_round_robin_release_and_reuse() {
        let d = tmpdir("rr");
        let p = pool(&d, json!({"subnet":"10.9.0.0/29"}));
        let a = p.allocate(&Owner::new("a", "eth0"), &[]).unwrap();
        assert_eq!(a[0].address.to_string(), "10.9.0.2/29");
        assert_eq!(a[0].gateway.to_string(), "10.9.0.1");
        let b = p.allocate(&Owner::new("b", "eth0"), &[]).unwrap();
        assert_eq!(b[0].address.to_string(), "10.9.0.3/29");
        // Repeated ADD of the same attachment: same address.
        let a2 = p.allocate(&Owner::new("a", "eth0"), &[]).unwrap();
        assert_eq!(a, a2);
        assert_eq!(p.release(&Owner::new("a", "eth0")).unwrap().len(), 1);
        assert!(p.release(&Owner::new("a", "eth0")).unwrap().is_empty());
        // Round robin continues after the last reserved, not at the freed one.
        let c = p.allocate(&Owner::new("c", "eth0"), &[]).unwrap();
        assert_eq!(c[0].address.to_string(), "10.9.0.4/29");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn exhaustion_and_status() {
        let d = tmpdir("ex");
        let p = pool(&d, json!({"subnet":"10.9.0.0/29"}));
        crate::attachment::status(&p, &|_| true).unwrap();
        for i in 0..5 {
            p.allocate(&Owner::new(&format!("c{i}"), "eth0"), &[])
                .unwrap();
        }
        let e = p.allocate(&Owner::new("x", "eth0"), &[]).unwrap_err();
        assert_eq!(e.code(), 100);
        assert_eq!(
            crate::attachment::status(&p, &|_| true).unwrap_err().code(),
            50
        );
        p.release(&Owner::new("c3", "eth0")).unwrap();
        crate::attachment::status(&p, &|_| true).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn requested_addresses() {
        let d = tmpdir("req");
        let p = pool(
            &d,
            json!({"ranges":[[{"subnet":"10.9.0.0/24"}],[{"subnet":"fd09::/64"}]]}),
        );
        let a = p
            .allocate(&Owner::new("a", "eth0"), &["10.9.0.77".parse().unwrap()])
            .unwrap();
        assert_eq!(a[0].address.to_string(), "10.9.0.77/24");
        assert!(a[1].address.is_ipv6());
        let e = p
            .allocate(&Owner::new("b", "eth0"), &["10.9.0.77".parse().unwrap()])
            .unwrap_err();
        assert!(e.to_string().contains("held by a/eth0"), "{e}");
        let e = p
            .allocate(&Owner::new("b", "eth0"), &["10.9.0.1".parse().unwrap()])
            .unwrap_err();
        assert!(e.to_string().contains("gateway"), "{e}");
        let e = p
            .allocate(&Owner::new("b", "eth0"), &["192.168.0.1".parse().unwrap()])
            .unwrap_err();
        assert_eq!(e.code(), 101);
        // Nothing was left behind by the failures.
        assert_eq!(store::list_allocated(&p.dir()).unwrap().len(), 2);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn gc_releases_all_but_valid() {
        let d = tmpdir("gc");
        let p = pool(&d, json!({"subnet":"10.9.0.0/24"}));
        for c in ["a", "b", "c"] {
            p.allocate(&Owner::new(c, "eth0"), &[]).unwrap();
        }
        std::fs::write(p.dir().join("10.9.0.200"), "").unwrap(); // torn file
        let valid: HashSet<Owner> = [Owner::new("b", "eth0")].into_iter().collect();
        let gone = crate::attachment::gc(&p, &valid).unwrap();
        assert_eq!(gone.len(), 3, "{gone:?}");
        let left = store::list_allocated(&p.dir()).unwrap();
        assert_eq!(left.len(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn resolv_conf() {
        let d = tmpdir("resolv");
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("resolv.conf");
        std::fs::write(
            &f,
            "# c\nnameserver 10.96.0.10\nnameserver 1.1.1.1\nsearch a.svc b.svc\ndomain x\noptions ndots:5\n",
        )
        .unwrap();
        let dns = parse_resolv_conf(&f).unwrap();
        assert_eq!(dns.nameservers, ["10.96.0.10", "1.1.1.1"]);
        assert_eq!(dns.search, ["a.svc", "b.svc"]);
        assert_eq!(dns.domain, "x");
        assert_eq!(dns.options, ["ndots:5"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

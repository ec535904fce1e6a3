//! The address pool: host-local's configuration, allocation order and on-disk layout, run
//! in-process, plus what host-local lacks (idempotent re-ADD, O(1) DEL, GC, STATUS, a bounded
//! lock wait, crash-safe reservations).

pub mod delegate;
pub mod range;
pub mod store;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::Deserialize;
use serde_json::Value;

use crate::cni::result::{Dns, Route};
use crate::error::{Error, Result};
pub use range::{Range, RangeConf, RangeSet};
pub use store::{Entry, Lease, Owner, Store};

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

/// Answers whether a host veth of that name exists on the node.
pub type LinkProbe = Box<dyn Fn(&str) -> bool>;

/// What an ADD tells the pool about the attachment it is making.
#[derive(Default)]
pub struct Attach {
    /// The host-side veth this ADD makes (recorded for stale detection).
    pub host_veth: Option<String>,
    /// Whether a host veth exists on the node; `None` disables reclaiming.
    pub alive: Option<LinkProbe>,
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

    fn range_of(&self, ip: IpAddr) -> Option<&Range> {
        self.sets.iter().find_map(|s| s.range_of(ip))
    }

    fn allocated_of(&self, ip: IpAddr) -> Result<Allocated> {
        let r = self.range_of(ip).ok_or_else(|| {
            Error::Internal(format!("{ip} is allocated but in no range of the pool"))
        })?;
        Ok(Allocated {
            address: r.with_prefix(ip),
            gateway: r.gateway,
        })
    }

    /// One address per range set for `owner`. A repeated ADD of the same attachment gets the
    /// addresses it already holds. `requested` addresses are honoured or refused.
    pub fn allocate(&self, owner: &Owner, requested: &[IpAddr]) -> Result<Vec<Allocated>> {
        let store = self.open()?;
        self.allocate_locked(&store, owner, requested, &Attach::default())
    }

    /// [`Pool::allocate`] for an ADD that will make `attach.host_veth`: the entry records the
    /// veth and an in-progress lease, and when the pool is full, allocations whose veth is gone
    /// (per `attach.alive`) are reclaimed first.
    pub fn allocate_for(
        &self,
        owner: &Owner,
        requested: &[IpAddr],
        attach: &Attach,
    ) -> Result<Vec<Allocated>> {
        let store = self.open()?;
        self.allocate_locked(&store, owner, requested, attach)
    }

    pub fn allocate_locked(
        &self,
        store: &Store,
        owner: &Owner,
        requested: &[IpAddr],
        attach: &Attach,
    ) -> Result<Vec<Allocated>> {
        match self.try_allocate(store, owner, requested, attach) {
            Err(Error::PoolExhausted(msg)) if attach.alive.is_some() => {
                let reclaimed = self.reclaim_stale_locked(store, attach)?;
                if reclaimed.is_empty() {
                    return Err(Error::PoolExhausted(msg));
                }
                for (o, ips) in &reclaimed {
                    log::warn!("reclaimed {ips:?} of {o}: its veth is gone (stale allocation)");
                }
                self.try_allocate(store, owner, requested, attach)
            }
            r => r,
        }
    }

    fn try_allocate(
        &self,
        store: &Store,
        owner: &Owner,
        requested: &[IpAddr],
        attach: &Attach,
    ) -> Result<Vec<Allocated>> {
        if let Some(existing) = self.held(store, owner)? {
            if requested.iter().all(|r| existing.contains(r)) {
                log::info!("{owner} already holds {existing:?}; returning them");
                return existing
                    .into_iter()
                    .map(|ip| self.allocated_of(ip))
                    .collect();
            }
            return Err(Error::AddressUnavailable(format!(
                "{owner} already holds {existing:?}, not the requested {requested:?}; DEL it first"
            )));
        }
        for r in requested {
            if !self.sets.iter().any(|s| s.range_of(*r).is_some()) {
                return Err(Error::AddressUnavailable(format!(
                    "requested IP {r} is in none of the configured ranges of network {}",
                    self.network
                )));
            }
        }
        // Pick one address per set without writing anything.
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
                        let by = store
                            .holder(ip)?
                            .flatten()
                            .map(|o| o.to_string())
                            .unwrap_or_else(|| "an unknown holder".into());
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
        // Record the attachment first, then the address files (see store.rs).
        store.write_entry(
            owner,
            &Entry {
                ips: picked.clone(),
                host_veth: attach.host_veth.clone(),
                adding: attach.host_veth.as_ref().map(|_| Lease::now()),
            },
        )?;
        let mut done: Vec<IpAddr> = Vec::new();
        for ip in &picked {
            match store.reserve(*ip, owner) {
                Ok(true) => done.push(*ip),
                other => {
                    for d in &done {
                        let _ = store.remove_ip(*d);
                    }
                    let _ = store.remove_entry(owner);
                    return Err(other.err().unwrap_or_else(|| {
                        Error::AddressUnavailable(format!("{ip} was taken concurrently"))
                    }));
                }
            }
        }
        for (i, ip) in picked.iter().enumerate() {
            if requested.is_empty() || !requested.contains(ip) {
                store.set_last_reserved(i, *ip)?;
            }
        }
        picked.into_iter().map(|ip| self.allocated_of(ip)).collect()
    }

    /// The addresses `owner` holds, if its entry is present and every address file still names
    /// it.
    pub fn held(&self, store: &Store, owner: &Owner) -> Result<Option<Vec<IpAddr>>> {
        let Some(entry) = store.entry(owner)? else {
            return Ok(None);
        };
        for ip in &entry.ips {
            if store.holder(*ip)?.flatten().as_ref() != Some(owner) {
                return Ok(None);
            }
        }
        if entry.ips.len() != self.sets.len()
            || entry.ips.iter().any(|ip| self.range_of(*ip).is_none())
        {
            return Ok(None);
        }
        Ok(Some(entry.ips))
    }

    fn has_stale_in(&self, set: &RangeSet, attach: &Attach) -> Result<bool> {
        let store = Store::unlocked(&self.data_dir, &self.network);
        if !store.dir().join(".pontoon/attachments").exists() {
            return Ok(false);
        }
        Ok(self
            .stale_locked(&store, attach)?
            .iter()
            .any(|(_, e)| e.ips.iter().any(|ip| set.range_of(*ip).is_some())))
    }

    /// Entries whose pontoon veth no longer exists and that are not mid-ADD.
    pub fn stale_locked(&self, store: &Store, attach: &Attach) -> Result<Vec<(Owner, Entry)>> {
        let Some(alive) = &attach.alive else {
            return Ok(vec![]);
        };
        let mut out = Vec::new();
        for (owner, e) in store.entries()? {
            let Some(veth) = &e.host_veth else { continue };
            if e.adding.is_some_and(|l| l.is_live()) {
                continue;
            }
            if !alive(veth) {
                out.push((owner, e));
            }
        }
        Ok(out)
    }

    /// Releases every stale allocation (see [`Pool::stale_locked`]).
    pub fn reclaim_stale_locked(
        &self,
        store: &Store,
        attach: &Attach,
    ) -> Result<Vec<(Owner, Vec<IpAddr>)>> {
        let mut out = Vec::new();
        for (owner, _) in self.stale_locked(store, attach)? {
            let ips = release_locked(store, &owner)?;
            out.push((owner, ips));
        }
        Ok(out)
    }

    /// Releases everything `owner` holds. Succeeds when it holds nothing.
    pub fn release(&self, owner: &Owner) -> Result<Vec<IpAddr>> {
        let store = self.open()?;
        release_locked(&store, owner)
    }

    /// GC: releases every allocation whose holder is not in `valid`.
    pub fn gc(&self, valid: &HashSet<Owner>) -> Result<Vec<(Owner, IpAddr)>> {
        let store = self.open()?;
        gc_locked(&store, valid)
    }

    /// STATUS: an error (code 50) when a range set has no free address (counting stale
    /// allocations, which the next ADD reclaims, as free) or the store is unusable.
    pub fn status(&self, attach: &Attach) -> Result<()> {
        let dir = self.dir();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return Err(Error::NotAvailable(format!(
                "the IPAM state directory {} is unusable: {e}",
                dir.display()
            )));
        }
        if let Err(e) = nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK) {
            return Err(Error::NotAvailable(format!(
                "the IPAM state directory {} is unusable: not writable ({e})",
                dir.display()
            )));
        }
        if let Ok(fs) = nix::sys::statvfs::statvfs(&dir)
            && (fs.blocks_available() == 0 || fs.files_available() == 0)
        {
            return Err(Error::NotAvailable(format!(
                "the IPAM state directory {} is unusable: its filesystem is full",
                dir.display()
            )));
        }
        let used = store::list_allocated(&dir).map_err(|e| Error::NotAvailable(e.to_string()))?;
        for (i, set) in self.sets.iter().enumerate() {
            let n = used
                .iter()
                .filter(|ip| set.range_of(**ip).is_some())
                .count() as u128;
            if n >= set.size() && !self.has_stale_in(set, attach)? {
                return Err(Error::NotAvailable(format!(
                    "the address pool of network {} is exhausted: range set {i} ({}) has all {} \
                     addresses allocated",
                    self.network,
                    describe_set(set),
                    set.size()
                )));
            }
        }
        Ok(())
    }
}

/// The state of one allocation, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocState {
    /// Its veth exists.
    Alive,
    /// An ADD is making it right now.
    Adding,
    /// Its veth is gone: reclaimable.
    Stale,
    /// Not made by pontoon (no veth recorded): only DEL or GC release it.
    Foreign,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocInfo {
    pub container_id: String,
    pub ifname: String,
    pub ips: Vec<IpAddr>,
    pub host_veth: Option<String>,
    pub state: AllocState,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub network: String,
    pub data_dir: PathBuf,
    pub size: u128,
    pub used: usize,
    pub free: u128,
    pub stale: usize,
    pub allocations: Vec<AllocInfo>,
}

impl Pool {
    /// What the pool holds, read without the lock (a snapshot for operators).
    pub fn report(&self, alive: &dyn Fn(&str) -> bool) -> Result<Report> {
        let store = Store::unlocked(&self.data_dir, &self.network);
        let allocated: Vec<IpAddr> = store::list_allocated(store.dir())?
            .into_iter()
            .filter(|ip| self.range_of(*ip).is_some())
            .collect();
        let mut allocations = Vec::new();
        let mut seen: HashSet<IpAddr> = HashSet::new();
        if store.dir().join(".pontoon/attachments").exists() {
            for (owner, e) in store.entries()? {
                let ips: Vec<IpAddr> = e
                    .ips
                    .iter()
                    .copied()
                    .filter(|ip| {
                        store.holder(*ip).ok().flatten().flatten().as_ref() == Some(&owner)
                    })
                    .collect();
                if ips.is_empty() {
                    continue;
                }
                seen.extend(ips.iter().copied());
                let state = match (&e.host_veth, e.adding) {
                    (None, _) => AllocState::Foreign,
                    (Some(_), Some(l)) if l.is_live() => AllocState::Adding,
                    (Some(v), _) if alive(v) => AllocState::Alive,
                    (Some(_), _) => AllocState::Stale,
                };
                allocations.push(AllocInfo {
                    container_id: owner.container_id,
                    ifname: owner.ifname,
                    ips,
                    host_veth: e.host_veth,
                    state,
                });
            }
        }
        for ip in &allocated {
            if seen.contains(ip) {
                continue;
            }
            let holder = store.holder(*ip)?.flatten();
            allocations.push(AllocInfo {
                container_id: holder
                    .as_ref()
                    .map(|h| h.container_id.clone())
                    .unwrap_or_default(),
                ifname: holder.map(|h| h.ifname).unwrap_or_default(),
                ips: vec![*ip],
                host_veth: None,
                state: AllocState::Foreign,
            });
        }
        allocations.sort_by(|a, b| a.ips.cmp(&b.ips));
        let size: u128 = self.sets.iter().map(RangeSet::size).sum();
        Ok(Report {
            network: self.network.clone(),
            data_dir: self.data_dir.clone(),
            size,
            used: allocated.len(),
            free: size.saturating_sub(allocated.len() as u128),
            stale: allocations
                .iter()
                .filter(|a| a.state == AllocState::Stale)
                .count(),
            allocations,
        })
    }
}

/// Releases the addresses of `owner` with the store already locked.
pub fn release_locked(store: &Store, owner: &Owner) -> Result<Vec<IpAddr>> {
    let mut released = Vec::new();
    if let Some(entry) = store.entry(owner)? {
        for ip in entry.ips {
            if store.release_if_held_by(ip, owner)? {
                released.push(ip);
            }
        }
        store.remove_entry(owner)?;
    }
    Ok(released)
}

/// GC with the store already locked: attachments not in `valid` lose their addresses, and
/// address files naming no valid holder (torn, legacy or foreign) are removed too.
pub fn gc_locked(store: &Store, valid: &HashSet<Owner>) -> Result<Vec<(Owner, IpAddr)>> {
    let mut out = Vec::new();
    let mut in_progress: HashSet<Owner> = HashSet::new();
    for (owner, e) in store.entries()? {
        // An attachment being ADDed right now is not released, listed or not.
        if e.adding.is_some_and(|l| l.is_live()) {
            in_progress.insert(owner);
            continue;
        }
        if !valid.contains(&owner) {
            for ip in release_locked(store, &owner)? {
                out.push((owner.clone(), ip));
            }
        }
    }
    for ip in store.allocated()? {
        let holder = store.holder(ip)?.flatten();
        let keep = holder.as_ref().is_some_and(|h| {
            valid.contains(h)
                || in_progress.contains(h)
                || (h.ifname.is_empty() && valid.iter().any(|v| v.container_id == h.container_id))
        });
        if !keep {
            store.remove_ip(ip)?;
            out.push((holder.unwrap_or_else(|| Owner::new("?", "?")), ip));
        }
    }
    Ok(out)
}

fn describe_set(set: &RangeSet) -> String {
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
        p.status(&Attach::default()).unwrap();
        for i in 0..5 {
            p.allocate(&Owner::new(&format!("c{i}"), "eth0"), &[])
                .unwrap();
        }
        let e = p.allocate(&Owner::new("x", "eth0"), &[]).unwrap_err();
        assert_eq!(e.code(), 100);
        assert_eq!(p.status(&Attach::default()).unwrap_err().code(), 50);
        p.release(&Owner::new("c3", "eth0")).unwrap();
        p.status(&Attach::default()).unwrap();
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
        let gone = p.gc(&valid).unwrap();
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

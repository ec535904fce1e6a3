//! One attachment, (network, container id, ifname), and everything it holds, in one record:
//! its addresses (one per range set), its host veth (name and ifindex), its hostPort mappings
//! and, while its ADD runs, a lease. The record is written under the pool lock before anything
//! is made, completed when the ADD finishes, and removed by [`release_locked`], the one
//! function that frees an attachment: DEL, ADD rollback, stale reclaim (a full pool,
//! `pontoon gc`), CNI GC and the agent all end there. Nothing else frees an address, a mapping
//! or a veth of pontoon's.
//!
//! Kernel work that is slow and safe to do later (closing the nftables socket that deleted
//! elements, deleting the veth, flushing UDP conntrack) is collected in a [`Cleanup`] and done
//! after the lock is released; what must happen before an address can be handed out again
//! (the veth down and off the bridge, the mappings gone) happens under it.

pub mod lease;

use std::collections::HashSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::dataplane::{self, Netlink};
use crate::error::{Error, Result};
use crate::ipam::store::{Store, Stored};
use crate::ipam::{Allocated, Owner, Pool};
use crate::macspoof;
use crate::nft;
use crate::portmap::{self, Element, PortMapping};
pub use lease::{LEASE_TTL_SECS, Lease, before_this_boot, boot_id};

/// Everything one attachment holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// One address per range set of the pool.
    pub ips: Vec<IpAddr>,
    /// The host-side veth pontoon made. `None` for allocations pontoon did not make (inherited
    /// from host-local): those are released only by DEL and GC (or after a reboot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_veth: Option<String>,
    /// Its ifindex, once the ADD completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ifindex: Option<u32>,
    /// The hostPort map elements installed for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<Element>,
    /// The ADD making it, until that ADD completes.
    #[serde(default, rename = "adding", skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// The boot the record was written in: a record of an earlier boot is stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// How its host veth sits on the bridge, when anything beyond the default was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
    /// The Kubernetes pod it is for (`CNI_ARGS` `K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
    /// `K8S_POD_UID`), so the node agent knows a new pod's addresses before kubelet reports
    /// them in the Pod's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// A Kubernetes pod, as the runtime names it in `CNI_ARGS`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl PodRef {
    /// From `CNI_ARGS`; `None` unless both the namespace and the name are given.
    pub fn from_args(args: &crate::cni::env::CniArgs) -> Option<PodRef> {
        Some(PodRef {
            namespace: args.get("K8S_POD_NAMESPACE")?.to_string(),
            name: args.get("K8S_POD_NAME")?.to_string(),
            uid: args.get("K8S_POD_UID").map(str::to_string),
        })
    }
}

/// The bridge-port settings of an attachment. Everything but the MAC spoof check lives on the
/// veth itself and goes with it; the check is a chain in pontoon's bridge table, removed by the
/// release.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vlan: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlan_trunk: Vec<u16>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolated: bool,
    /// The only source MAC the pod may send from (`macspoofchk`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_spoof_check: Option<String>,
    /// Shaping toward / from the pod, in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_rate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_rate: Option<u64>,
}

fn is_zero(v: &u16) -> bool {
    *v == 0
}

impl Port {
    /// Whether nothing beyond the default was asked.
    pub fn is_default(&self) -> bool {
        *self == Port::default()
    }

    fn spoof_mac(&self) -> Option<[u8; 6]> {
        self.mac_spoof_check
            .as_deref()
            .and_then(crate::cni::config::parse_mac)
    }
}

impl Record {
    /// Whether an ADD is making this attachment right now.
    pub fn adding(&self) -> bool {
        self.lease.as_ref().is_some_and(Lease::is_live)
    }

    fn written_in_earlier_boot(&self) -> bool {
        matches!((&self.boot_id, boot_id()), (Some(b), Some(now)) if b != now)
    }
}

/// Answers whether a host veth of that name exists on the node.
pub type LinkProbe = Box<dyn Fn(&str) -> bool>;

/// A [`LinkProbe`] over netlink in this (the node's) namespace; `true` on any doubt, so an
/// error never makes a live attachment look stale. The socket is opened on first use.
pub fn link_probe() -> LinkProbe {
    let nl: std::cell::RefCell<Option<Netlink>> = std::cell::RefCell::new(None);
    Box::new(move |name: &str| {
        let mut nl = nl.borrow_mut();
        if nl.is_none() {
            *nl = Netlink::new().ok();
        }
        nl.as_mut()
            .map(|nl| nl.link_by_name(name).map(|l| l.is_some()).unwrap_or(true))
            .unwrap_or(true)
    })
}

/// Kernel work of a release, done after the pool lock is dropped: closing the nftables socket,
/// flushing UDP conntrack, and handing the retired veths to the reaper.
#[derive(Default)]
pub struct Cleanup {
    nl: Option<Netlink>,
    nft: Option<nft::Conn>,
    /// Retired host veths to delete, by ifindex.
    links: Vec<u32>,
    /// Mappings whose UDP conntrack entries to flush.
    udp: Vec<Element>,
}

impl Cleanup {
    fn nl(&mut self) -> Result<&mut Netlink> {
        if self.nl.is_none() {
            self.nl = Some(Netlink::new()?);
        }
        Ok(self.nl.as_mut().unwrap())
    }

    fn nft(&mut self) -> Result<&mut nft::Conn> {
        if self.nft.is_none() {
            self.nft = Some(nft::Conn::new()?);
        }
        Ok(self.nft.as_mut().unwrap())
    }

    /// Takes the veth out of service now (down, off the bridge: it can no longer carry or
    /// answer traffic) and queues its deletion. `Ok(false)` when it does not exist.
    fn retire_link(&mut self, name: &str, recorded: Option<u32>) -> Result<bool> {
        let nl = self.nl()?;
        let Some(link) = nl.link_by_name(name)? else {
            return Ok(false);
        };
        if recorded.is_some_and(|i| i != link.index) {
            log::warn!(
                "veth {name} has ifindex {} but its record says {}; retiring it anyway",
                link.index,
                recorded.unwrap()
            );
        }
        if nl.take_out_of_service(link.index)? {
            self.links.push(link.index);
        }
        Ok(true)
    }

    /// Does what had to wait for the lock to be released.
    pub fn finish(mut self) -> Result<()> {
        // Closing the socket that deleted elements waits for the kernel (see nftnl::Conn).
        drop(self.nft.take());
        portmap::flush_udp(&self.udp);
        let links = std::mem::take(&mut self.links);
        if links.is_empty() {
            return Ok(());
        }
        // The veths are out of service already; deleting them (~20 ms each in the kernel) is
        // left to the runtime's netns teardown and a detached reaper.
        let nl = self.nl()?;
        crate::reaper::spawn(&links, nl)
    }
}

/// Runs `f` with the pool locked, then finishes its cleanup unlocked. Errors of the cleanup
/// are returned when `strict`, else logged.
fn locked<T>(
    pool: &Pool,
    strict: bool,
    f: impl FnOnce(&Store, &mut Cleanup) -> Result<T>,
) -> Result<T> {
    let mut k = Cleanup::default();
    let r = {
        let store = pool.open()?;
        let held = std::time::Instant::now();
        let r = f(&store, &mut k);
        drop(store);
        log::debug!(
            "pool lock of network {} held {:.3} ms",
            pool.network,
            held.elapsed().as_secs_f64() * 1e3
        );
        r
    };
    match (r, k.finish()) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(e)) if strict => Err(e),
        (r, Err(e)) => {
            log::warn!("cleanup after the pool lock: {e}");
            r
        }
        (r, Ok(())) => r,
    }
}

/// What an ADD asks of the pool.
#[derive(Default)]
pub struct Request<'a> {
    /// Addresses the runtime asked for (`ips` capability, `IP=`).
    pub requested: &'a [IpAddr],
    /// hostPort mappings (`portMappings` capability).
    pub mappings: &'a [PortMapping],
    /// The host veth this ADD makes; `None` for an IPAM-only caller.
    pub host_veth: Option<&'a str>,
    /// Lets a full pool reclaim stale attachments first; `None` disables reclaiming.
    pub alive: Option<LinkProbe>,
    /// The Kubernetes pod it is for, when the runtime said.
    pub pod: Option<PodRef>,
}

/// What ADD's first step got.
#[derive(Debug)]
pub struct Begun {
    pub addrs: Vec<Allocated>,
    pub elements: Vec<Element>,
}

/// ADD's first step, under the lock: the record of `owner` with its addresses and mappings and
/// a lease, before anything is made. A repeated ADD of a whole attachment gets the addresses it
/// holds; a partial or unreadable record (an ADD killed half way) is released first, so its
/// retry leaks nothing. Conflicting hostPorts are refused here, with nothing held.
pub fn begin(pool: &Pool, owner: &Owner, req: &Request) -> Result<Begun> {
    locked(pool, false, |store, k| {
        begin_locked(pool, store, owner, req, k)
    })
}

fn begin_locked(
    pool: &Pool,
    store: &Store,
    owner: &Owner,
    req: &Request,
    k: &mut Cleanup,
) -> Result<Begun> {
    let mut reuse: Option<Record> = None;
    match store.record(owner)? {
        Stored::Missing => {}
        Stored::Ok(rec) if consistent(pool, store, owner, &rec)? => {
            if !req.requested.iter().all(|r| rec.ips.contains(r)) {
                return Err(Error::AddressUnavailable(format!(
                    "{owner} already holds {:?}, not the requested {:?}; DEL it first",
                    rec.ips, req.requested
                )));
            }
            log::info!("{owner} already holds {:?}; returning them", rec.ips);
            reuse = Some(rec);
        }
        _ => {
            log::warn!("{owner} has a partial or unreadable record: releasing it first");
            release_locked(pool, store, owner, k)?;
        }
    }
    let ips = match &reuse {
        Some(r) => r.ips.clone(),
        None => pick_reclaiming(pool, store, req, k)?,
    };
    let elements = portmap::elements(req.mappings, &ips)?;
    if !elements.is_empty() {
        let records = store.records()?;
        portmap::find_conflict(
            &elements,
            records
                .iter()
                .filter(|(o, _)| o != owner)
                .filter_map(|(o, r)| match r {
                    Stored::Ok(r) => Some((o, r.port_mappings.as_slice())),
                    _ => None,
                }),
        )?;
    }
    if let Some(old) = &reuse {
        // A repeated ADD with other mappings drops the ones it no longer has.
        let gone: Vec<Element> = old
            .port_mappings
            .iter()
            .filter(|e| !elements.contains(e))
            .cloned()
            .collect();
        if !gone.is_empty() {
            portmap::remove(k.nft()?, &pool.network, &gone)?;
            k.udp.extend(gone);
        }
        // Its MAC spoof check is made again (or not) when this ADD completes.
        if let (Some(v), true) = (
            &old.host_veth,
            old.port
                .as_ref()
                .is_some_and(|p| p.mac_spoof_check.is_some()),
        ) {
            macspoof::remove(k.nft()?, v)?;
        }
    }
    let rec = Record {
        ips: ips.clone(),
        host_veth: req.host_veth.map(str::to_string),
        host_ifindex: None,
        port_mappings: elements.clone(),
        // Only an ADD that makes a veth has something in progress to protect.
        lease: req.host_veth.map(|_| Lease::now()),
        boot_id: boot_id().map(str::to_string),
        port: None,
        pod: req.pod.clone(),
    };
    // The record first, then the address files it lists (see store.rs).
    store.write_record(owner, &rec)?;
    if reuse.is_none() {
        let mut done: Vec<IpAddr> = Vec::new();
        for ip in &ips {
            match store.reserve(*ip, owner) {
                Ok(true) => done.push(*ip),
                other => {
                    for d in &done {
                        let _ = store.remove_ip(*d);
                    }
                    let _ = store.remove_record(owner);
                    return Err(other.err().unwrap_or_else(|| {
                        Error::AddressUnavailable(format!("{ip} was taken concurrently"))
                    }));
                }
            }
        }
        for (i, ip) in ips.iter().enumerate() {
            if !req.requested.contains(ip) {
                store.set_last_reserved(i, *ip)?;
            }
        }
    }
    Ok(Begun {
        addrs: ips
            .iter()
            .map(|ip| pool.allocated_of(*ip))
            .collect::<Result<_>>()?,
        elements,
    })
}

/// Addresses this process reclaimed from stale attachments (reported with the operation).
pub static RECLAIMED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Picks one address per range set; a full pool first reclaims stale attachments.
fn pick_reclaiming(
    pool: &Pool,
    store: &Store,
    req: &Request,
    k: &mut Cleanup,
) -> Result<Vec<IpAddr>> {
    match pool.pick(store, req.requested) {
        Err(Error::PoolExhausted(msg)) if req.alive.is_some() => {
            let reclaimed = reclaim_stale_locked(pool, store, req.alive.as_ref().unwrap(), k)?;
            if reclaimed.is_empty() {
                return Err(Error::PoolExhausted(msg));
            }
            for (o, ips) in &reclaimed {
                log::warn!("reclaimed {ips:?} of {o}: its pod is gone (stale attachment)");
                RECLAIMED.fetch_add(ips.len(), std::sync::atomic::Ordering::Relaxed);
            }
            pool.pick(store, req.requested)
        }
        r => r,
    }
}

/// Whether `rec` is whole: one address in each range set, every one held by `owner`.
fn consistent(pool: &Pool, store: &Store, owner: &Owner, rec: &Record) -> Result<bool> {
    if rec.ips.len() != pool.sets.len()
        || !pool.sets.iter().all(|s| {
            rec.ips
                .iter()
                .filter(|ip| s.range_of(**ip).is_some())
                .count()
                == 1
        })
    {
        return Ok(false);
    }
    for ip in &rec.ips {
        match store.holder(*ip)? {
            Stored::Ok(h) if owner.holds(&h) => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// ADD's last step, under the lock: the hostPort mappings go in, and the record gets its
/// veth's ifindex and loses its lease (rewritten in place: see [`Store::rewrite_record`]).
/// Maps that are gone (a flushed ruleset) make it re-install the network's whole firewall
/// state from the records, this one included.
pub fn complete(
    pool: &Pool,
    owner: &Owner,
    firewall: &crate::firewall::Network,
    host_ifindex: u32,
    port: Option<Port>,
) -> Result<()> {
    locked(pool, false, |store, k| {
        let Stored::Ok(mut rec) = store.record(owner)? else {
            return Err(Error::Internal(format!(
                "the record of {owner} vanished while its ADD ran"
            )));
        };
        if !rec.port_mappings.is_empty() {
            let mut b = nft::Batch::new();
            portmap::add_elements(&mut b, &pool.network, &rec.port_mappings);
            if let Err(e) = k.nft()?.commit(&b) {
                log::warn!(
                    "{e}: re-installing the firewall state of network {}",
                    pool.network
                );
                firewall.heal_locked(store, k.nft()?)?;
            }
            k.udp.extend(rec.port_mappings.iter().cloned());
        }
        rec.host_ifindex = Some(host_ifindex);
        rec.lease = None;
        rec.port = port.filter(|p| !p.is_default());
        // The record names the check before it exists: a failure from here on is rolled back
        // by the release, which removes what the record names.
        store.rewrite_record(owner, &rec)?;
        if let (Some(p), Some(veth)) = (&rec.port, &rec.host_veth)
            && let Some(mac) = p.spoof_mac()
        {
            let mut b = nft::Batch::new();
            macspoof::add(&mut b, veth, &mac);
            k.nft()?.commit(&b)?;
        }
        Ok(())
    })
}

/// What a release freed.
#[derive(Debug, Default)]
pub struct Released {
    pub ips: Vec<IpAddr>,
    /// Whether a veth of pontoon's was found (and retired).
    pub veth: bool,
}

/// Releases everything `owner` holds (DEL, ADD rollback). Succeeds when it holds nothing.
pub fn release(pool: &Pool, owner: &Owner) -> Result<Released> {
    locked(pool, true, |store, k| release_locked(pool, store, owner, k))
}

/// The one release of an attachment, with the pool locked: its veth retired (down and off the
/// bridge now, deleted after the lock), its hostPort elements removed, its addresses freed,
/// its record removed. An unreadable record falls back to the address files naming the owner
/// and the veth name derived from it; a missing record still retires that veth (a DEL killed
/// after the record went, retried).
pub fn release_locked(
    pool: &Pool,
    store: &Store,
    owner: &Owner,
    k: &mut Cleanup,
) -> Result<Released> {
    let derived = || {
        Some(dataplane::host_veth_name(
            &owner.container_id,
            &owner.ifname,
        ))
    };
    let (ips, veth, ifindex, els, spoof) = match store.record(owner)? {
        Stored::Ok(r) => {
            let spoof = r.port.as_ref().is_some_and(|p| p.mac_spoof_check.is_some());
            (r.ips, r.host_veth, r.host_ifindex, r.port_mappings, spoof)
        }
        Stored::Unreadable => {
            log::warn!("the record of {owner} is unreadable: releasing the addresses that name it");
            (store.addresses_of(owner)?, derived(), None, vec![], false)
        }
        Stored::Missing => (vec![], derived(), None, vec![], false),
    };
    let mut out = Released::default();
    if let Some(v) = &veth {
        out.veth = k.retire_link(v, ifindex)?;
        if spoof {
            macspoof::remove(k.nft()?, v)?;
        }
    }
    if !els.is_empty() {
        portmap::remove(k.nft()?, &pool.network, &els)?;
        k.udp.extend(els);
    }
    for ip in ips {
        if store.release_if_held_by(ip, owner)? {
            out.ips.push(ip);
        }
    }
    store.remove_record(owner)?;
    Ok(out)
}

/// CNI GC: releases every attachment of this network not in `valid`, except those whose ADD is
/// in progress, and removes address files that name no valid holder (torn, legacy or foreign
/// ones). Only this network's records are looked at: another network on the same bridge is
/// never touched.
pub fn gc(pool: &Pool, valid: &HashSet<Owner>) -> Result<Vec<(Owner, Vec<IpAddr>)>> {
    locked(pool, true, |store, k| {
        let mut out = Vec::new();
        let mut in_progress: HashSet<Owner> = HashSet::new();
        for (owner, rec) in store.records()? {
            if matches!(&rec, Stored::Ok(r) if r.adding()) {
                in_progress.insert(owner);
                continue;
            }
            if !valid.contains(&owner) {
                let r = release_locked(pool, store, &owner, k)?;
                out.push((owner, r.ips));
            }
        }
        for ip in store.allocated()? {
            let keep = match store.holder(ip)? {
                Stored::Ok(h) => {
                    valid.contains(&h)
                        || in_progress.contains(&h)
                        || (h.ifname.is_empty()
                            && valid.iter().any(|v| v.container_id == h.container_id))
                }
                _ => false,
            };
            if !keep {
                store.remove_ip(ip)?;
                out.push((Owner::new("?", "?"), vec![ip]));
            }
        }
        Ok(out)
    })
}

/// The attachments that are provably gone, decided without changing anything: no ADD in
/// progress and its veth does not exist, or written in an earlier boot (every pod died with
/// it), or unreadable and older than this boot (torn by a power loss). Address files that
/// hold no owner and predate this boot are listed with an empty owner.
pub fn stale(
    store: &Store,
    alive: &dyn Fn(&str) -> bool,
) -> Result<Vec<(Option<Owner>, Vec<IpAddr>)>> {
    let mut out = Vec::new();
    for (owner, rec) in store.records()? {
        let gone = match &rec {
            Stored::Ok(r) => {
                !r.adding()
                    && (r.written_in_earlier_boot()
                        || r.host_veth.as_deref().is_some_and(|v| !alive(v)))
            }
            Stored::Unreadable => before_this_boot(store.record_mtime(&owner)),
            Stored::Missing => false,
        };
        if gone {
            let ips = match rec {
                Stored::Ok(r) => r.ips,
                _ => store.addresses_of(&owner)?,
            };
            out.push((Some(owner), ips));
        }
    }
    for ip in store.allocated()? {
        if store.holder(ip)? == Stored::Unreadable && before_this_boot(store.ip_mtime(ip)) {
            out.push((None, vec![ip]));
        }
    }
    Ok(out)
}

/// Releases every stale attachment (see [`stale`]), with the pool locked.
pub fn reclaim_stale_locked(
    pool: &Pool,
    store: &Store,
    alive: &dyn Fn(&str) -> bool,
    k: &mut Cleanup,
) -> Result<Vec<(Owner, Vec<IpAddr>)>> {
    let mut out = Vec::new();
    for (owner, ips) in stale(store, alive)? {
        match owner {
            Some(o) => {
                let r = release_locked(pool, store, &o, k)?;
                out.push((o, r.ips));
            }
            None => {
                for ip in &ips {
                    store.remove_ip(*ip)?;
                }
                out.push((Owner::new("?", "?"), ips));
            }
        }
    }
    Ok(out)
}

/// `pontoon gc` and the agent: reclaims stale attachments now.
pub fn reclaim_stale(
    pool: &Pool,
    alive: &dyn Fn(&str) -> bool,
) -> Result<Vec<(Owner, Vec<IpAddr>)>> {
    locked(pool, true, |store, k| {
        reclaim_stale_locked(pool, store, alive, k)
    })
}

/// The addresses `owner` holds, if its record is whole (CHECK).
pub fn held(pool: &Pool, owner: &Owner) -> Result<Option<Record>> {
    let store = pool.open()?;
    match store.record(owner)? {
        Stored::Ok(r) if consistent(pool, &store, owner, &r)? => Ok(Some(r)),
        _ => Ok(None),
    }
}

/// STATUS: an error (code 50) when a range set has no free address (counting stale
/// attachments, which the next ADD reclaims, as free) or the store is unusable.
pub fn status(pool: &Pool, alive: &dyn Fn(&str) -> bool) -> Result<()> {
    let dir = pool.dir();
    let unusable = |why: String| {
        Err(Error::NotAvailable(format!(
            "the IPAM state directory {} is unusable: {why}",
            dir.display()
        )))
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return unusable(e.to_string());
    }
    if let Err(e) = nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK) {
        return unusable(format!("not writable ({e})"));
    }
    if let Ok(fs) = nix::sys::statvfs::statvfs(&dir)
        && (fs.blocks_available() == 0 || fs.files_available() == 0)
    {
        return unusable("its filesystem is full".into());
    }
    let store = Store::unlocked(&pool.data_dir, &pool.network);
    let used = store
        .allocated()
        .map_err(|e| Error::NotAvailable(e.to_string()))?;
    let mut stale_ips: Option<Vec<IpAddr>> = None;
    for (i, set) in pool.sets.iter().enumerate() {
        let n = used
            .iter()
            .filter(|ip| set.range_of(**ip).is_some())
            .count() as u128;
        if n < set.size() {
            continue;
        }
        if stale_ips.is_none() {
            stale_ips = Some(
                stale(&store, alive)?
                    .into_iter()
                    .flat_map(|(_, ips)| ips)
                    .collect(),
            );
        }
        if !stale_ips
            .as_ref()
            .unwrap()
            .iter()
            .any(|ip| set.range_of(*ip).is_some())
        {
            return Err(Error::NotAvailable(format!(
                "the address pool of network {} is exhausted: range set {i} ({}) has all {} \
                 addresses allocated",
                pool.network,
                crate::ipam::describe_set(set),
                set.size()
            )));
        }
    }
    Ok(())
}

/// The state of one allocation, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocState {
    /// Its veth exists.
    Alive,
    /// An ADD is making it right now.
    Adding,
    /// Its pod is gone: reclaimable.
    Stale,
    /// Not made by pontoon (no veth recorded): only DEL or GC release it.
    Foreign,
    /// Its record or address file holds nothing readable; reclaimable after a reboot, or by
    /// DEL / GC.
    Unreadable,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocInfo {
    pub container_id: String,
    pub ifname: String,
    pub ips: Vec<IpAddr>,
    pub host_veth: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<Element>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
    pub state: AllocState,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub network: String,
    pub data_dir: std::path::PathBuf,
    pub size: u128,
    pub used: usize,
    pub free: u128,
    pub stale: usize,
    pub allocations: Vec<AllocInfo>,
}

/// What the pool holds, read without the lock (a snapshot for operators and metrics).
pub fn report(pool: &Pool, alive: &dyn Fn(&str) -> bool) -> Result<Report> {
    let store = Store::unlocked(&pool.data_dir, &pool.network);
    let allocated: Vec<IpAddr> = store
        .allocated()?
        .into_iter()
        .filter(|ip| pool.range_of(*ip).is_some())
        .collect();
    let stale: HashSet<IpAddr> = stale(&store, alive)?
        .into_iter()
        .flat_map(|(_, ips)| ips)
        .collect();
    let mut allocations = Vec::new();
    let mut seen: HashSet<IpAddr> = HashSet::new();
    for (owner, rec) in store.records()? {
        let (ips, veth, ports, port, state) = match rec {
            Stored::Ok(r) => {
                let ips: Vec<IpAddr> = r
                    .ips
                    .iter()
                    .copied()
                    .filter(|ip| matches!(store.holder(*ip), Ok(Stored::Ok(h)) if owner.holds(&h)))
                    .collect();
                let state = if r.adding() {
                    AllocState::Adding
                } else if r.host_veth.is_none() {
                    AllocState::Foreign
                } else {
                    AllocState::Alive
                };
                (ips, r.host_veth, r.port_mappings, r.port, state)
            }
            _ => (
                store.addresses_of(&owner)?,
                None,
                vec![],
                None,
                AllocState::Unreadable,
            ),
        };
        let state = if state != AllocState::Adding && ips.iter().any(|ip| stale.contains(ip)) {
            AllocState::Stale
        } else {
            state
        };
        if ips.is_empty() {
            continue;
        }
        seen.extend(ips.iter().copied());
        allocations.push(AllocInfo {
            container_id: owner.container_id,
            ifname: owner.ifname,
            ips,
            host_veth: veth,
            host_ports: ports,
            port,
            state,
        });
    }
    for ip in &allocated {
        if seen.contains(ip) {
            continue;
        }
        let (holder, state) = match store.holder(*ip)? {
            Stored::Ok(h) => (h, AllocState::Foreign),
            _ if stale.contains(ip) => (Owner::new("", ""), AllocState::Stale),
            _ => (Owner::new("", ""), AllocState::Unreadable),
        };
        allocations.push(AllocInfo {
            container_id: holder.container_id,
            ifname: holder.ifname,
            ips: vec![*ip],
            host_veth: None,
            host_ports: vec![],
            port: None,
            state,
        });
    }
    allocations.sort_by(|a, b| a.ips.cmp(&b.ips));
    let size: u128 = pool.sets.iter().map(|s| s.size()).sum();
    Ok(Report {
        network: pool.network.clone(),
        data_dir: pool.data_dir.clone(),
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

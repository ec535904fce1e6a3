//! The on-disk allocation store, laid out as host-local lays it out so a node that ran host-local
//! keeps its allocations:
//!
//! ```text
//! <dataDir>/<network>/lock                 flock(2)ed for every change (shared with host-local)
//! <dataDir>/<network>/<ip>                 "<containerID>\r\n<ifname>", one file per address
//! <dataDir>/<network>/last_reserved_ip.<n> round-robin position of range set n
//! <dataDir>/<network>/.pontoon/            pontoon's own bookkeeping (host-local ignores it):
//!     attachments/<containerID>:<ifname>     the addresses of one attachment (O(1) DEL / re-ADD)
//!     tmp.<ip>                               an address file being written (never seen complete)
//!     v1                                     marker: every address file has an attachment entry
//! ```
//!
//! Crash safety: an address file is written in full to `tmp.<ip>` and then hard-linked into
//! place (`link(2)` fails if the name exists, like `O_EXCL`), so a process killed at any instant
//! leaves either a complete address file or none; the attachment entry is written (by rename)
//! before the address files it lists, so no address file ever lacks one. Leftover `tmp.*` files
//! can only be from a dead process (they are made under the lock) and are removed at the next
//! lock.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Who holds an address: one attachment of one container.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub container_id: String,
    /// Empty for allocations written by host-local before it recorded interface names.
    pub ifname: String,
}

impl Owner {
    pub fn new(container_id: &str, ifname: &str) -> Owner {
        Owner {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        }
    }

    /// host-local's file content.
    fn to_content(&self) -> String {
        format!("{}\r\n{}", self.container_id, self.ifname)
    }

    fn from_content(s: &str) -> Option<Owner> {
        let mut lines = s.lines().map(str::trim);
        let id = lines.next().filter(|l| !l.is_empty())?;
        let ifname = lines.next().unwrap_or("");
        Some(Owner::new(id, ifname))
    }

    fn index_name(&self) -> String {
        format!("{}:{}", self.container_id, self.ifname)
    }

    /// Parses an entry file name; temporaries of atomic writes (`.name.pid`) and anything that
    /// is not a valid container id / ifname pair are not entries.
    fn from_index_name(s: &str) -> Option<Owner> {
        let (id, ifname) = s.split_once(':')?;
        crate::cni::env::validate_container_id(id).ok()?;
        crate::cni::env::validate_ifname(ifname).ok()?;
        Some(Owner::new(id, ifname))
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// What pontoon records for one attachment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub ips: Vec<IpAddr>,
    /// The host-side veth pontoon made for this attachment. Its absence (outside an ADD in
    /// progress) proves the attachment is gone. `None` for allocations pontoon did not make
    /// (inherited from host-local): those are only released by DEL and GC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_veth: Option<String>,
    /// The ADD that made this entry. It counts as in progress while that process lives (and
    /// for at most [`LEASE_TTL_SECS`]); after that, the veth's existence alone tells whether
    /// the attachment is alive, so a finished ADD need not rewrite its entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adding: Option<Lease>,
}

/// An ADD in progress: the process doing it and when it started.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    pub pid: u32,
    /// Seconds since the Unix epoch.
    pub since: u64,
}

/// How long an ADD may take before its lease counts as expired even if its pid still exists
/// (the pid may have been reused).
pub const LEASE_TTL_SECS: u64 = 300;

impl Lease {
    pub fn now() -> Lease {
        Lease {
            pid: std::process::id(),
            since: unix_now(),
        }
    }

    /// A lease is live while its process exists and it is younger than [`LEASE_TTL_SECS`].
    pub fn is_live(&self) -> bool {
        let age = unix_now().saturating_sub(self.since);
        age < LEASE_TTL_SECS && Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An open, locked store of one network. The lock is released when it is dropped.
pub struct Store {
    dir: PathBuf,
    own: PathBuf,
    /// The flock'ed lock file; `None` for a read-only/unlocked handle.
    _lock: Option<File>,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

impl Store {
    /// The directory of `network` under `data_dir` (the name is validated by the caller).
    pub fn network_dir(data_dir: &Path, network: &str) -> PathBuf {
        data_dir.join(network)
    }

    /// Opens and locks the store, waiting at most `timeout` for another holder (then code 11).
    pub fn open(data_dir: &Path, network: &str, timeout: Duration) -> Result<Store> {
        let dir = Self::network_dir(data_dir, network);
        let own = dir.join(".pontoon");
        fs::create_dir_all(own.join("attachments")).map_err(io_err(format!(
            "cannot create the IPAM state directory {} (check `ipam.dataDir`)",
            own.display()
        )))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(format!("cannot open {}", lock_path.display())))?;
        lock_with_timeout(&lock, timeout, &lock_path)?;
        let store = Store {
            dir,
            own,
            _lock: Some(lock),
        };
        store.remove_temporaries();
        store.migrate_once()?;
        Ok(store)
    }

    /// A handle without the lock, for reads and for writes that only the owner of an
    /// attachment makes (its own entry).
    pub fn unlocked(data_dir: &Path, network: &str) -> Store {
        let dir = Self::network_dir(data_dir, network);
        let own = dir.join(".pontoon");
        Store {
            dir,
            own,
            _lock: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ip_path(&self, ip: IpAddr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    fn index_path(&self, owner: &Owner) -> PathBuf {
        self.own.join("attachments").join(owner.index_name())
    }

    /// The holder of `ip`, if its file exists (an unreadable or empty file has no owner but still
    /// holds the address).
    pub fn holder(&self, ip: IpAddr) -> Result<Option<Option<Owner>>> {
        match fs::read_to_string(self.ip_path(ip)) {
            Ok(s) => Ok(Some(Owner::from_content(&s))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("cannot read allocation {ip}"), e)),
        }
    }

    pub fn is_taken(&self, ip: IpAddr) -> bool {
        // lstat: a dangling or odd entry still blocks the name.
        fs::symlink_metadata(self.ip_path(ip)).is_ok()
    }

    /// Reserves `ip` for `owner`; `false` when it is already taken.
    pub fn reserve(&self, ip: IpAddr, owner: &Owner) -> Result<bool> {
        let tmp = self.own.join(format!("tmp.{ip}"));
        let _ = fs::remove_file(&tmp);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err(format!("cannot write {}", tmp.display())))?;
            f.write_all(owner.to_content().as_bytes())
                .map_err(io_err(format!("cannot write {}", tmp.display())))?;
        }
        let linked = fs::hard_link(&tmp, self.ip_path(ip));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io(format!("cannot reserve {ip}"), e)),
        }
    }

    /// Removes `ip` if `owner` holds it; `Ok(false)` if it is free or held by someone else.
    pub fn release_if_held_by(&self, ip: IpAddr, owner: &Owner) -> Result<bool> {
        match self.holder(ip)? {
            Some(Some(h))
                if &h == owner || (h.ifname.is_empty() && h.container_id == owner.container_id) =>
            {
                self.remove_ip(ip)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Removes the file of `ip` whoever holds it.
    pub fn remove_ip(&self, ip: IpAddr) -> Result<()> {
        match fs::remove_file(self.ip_path(ip)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("cannot release {ip}"), e)),
        }
    }

    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("last_reserved_ip.{set}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn set_last_reserved(&self, set: usize, ip: IpAddr) -> Result<()> {
        write_atomic(
            &self.dir.join(format!("last_reserved_ip.{set}")),
            ip.to_string().as_bytes(),
        )
    }

    pub fn entry(&self, owner: &Owner) -> Result<Option<Entry>> {
        match fs::read(self.index_path(owner)) {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("cannot read the entry of {owner}"), e)),
        }
    }

    pub fn write_entry(&self, owner: &Owner, entry: &Entry) -> Result<()> {
        let bytes = serde_json::to_vec(entry).expect("entry serialises");
        write_atomic(&self.index_path(owner), &bytes)
    }

    pub fn remove_entry(&self, owner: &Owner) -> Result<()> {
        match fs::remove_file(self.index_path(owner)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("cannot remove the entry of {owner}"), e)),
        }
    }

    /// Every attachment with an entry.
    pub fn entries(&self) -> Result<Vec<(Owner, Entry)>> {
        let mut out = Vec::new();
        let dir = self.own.join("attachments");
        for de in fs::read_dir(&dir).map_err(io_err(format!("cannot list {}", dir.display())))? {
            let Ok(de) = de else { continue };
            let name = de.file_name();
            let Some(owner) = name.to_str().and_then(Owner::from_index_name) else {
                continue;
            };
            if let Some(e) = self.entry(&owner)? {
                out.push((owner, e));
            }
        }
        Ok(out)
    }

    /// Every allocated address (file names that parse as addresses).
    pub fn allocated(&self) -> Result<Vec<IpAddr>> {
        list_allocated(&self.dir)
    }

    fn remove_temporaries(&self) {
        if let Ok(rd) = fs::read_dir(&self.own) {
            for de in rd.flatten() {
                if de.file_name().to_string_lossy().starts_with("tmp.") {
                    let _ = fs::remove_file(de.path());
                }
            }
        }
    }

    /// Indexes allocations pontoon did not make (host-local's) once, so DEL and re-ADD can rely
    /// on the attachment entries alone from then on.
    fn migrate_once(&self) -> Result<()> {
        let marker = self.own.join("v1");
        if marker.exists() {
            return Ok(());
        }
        let mut found: BTreeMap<Owner, Vec<IpAddr>> = BTreeMap::new();
        for ip in self.allocated()? {
            if let Some(Some(owner)) = self.holder(ip)?
                && !owner.ifname.is_empty()
            {
                found.entry(owner).or_default().push(ip);
            }
        }
        for (owner, ips) in found {
            let mut entry = self.entry(&owner)?.unwrap_or_default();
            for ip in ips {
                if !entry.ips.contains(&ip) {
                    entry.ips.push(ip);
                }
            }
            self.write_entry(&owner, &entry)?;
        }
        write_atomic(&marker, b"")
    }
}

/// Allocated addresses in a network directory, without taking the lock (STATUS reads only).
pub fn list_allocated(dir: &Path) -> Result<Vec<IpAddr>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("cannot list {}", dir.display()), e)),
    };
    Ok(rd
        .flatten()
        .filter_map(|de| de.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect())
}

fn lock_with_timeout(f: &File, timeout: Duration, path: &Path) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(50);
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("cannot lock {}", path.display()), e));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::TryAgainLater(format!(
                "the address pool lock {} is held by another process for more than {} ms; \
                 try again later (a stuck holder can be found with `fuser {}`)",
                path.display(),
                timeout.as_millis(),
                path.display()
            )));
        }
        std::thread::sleep(pause.min(deadline - now));
        // A holder keeps the lock for well under a millisecond: poll often enough that a
        // waiter does not sleep through many free periods (a try is one cheap syscall).
        pause = (pause * 2).min(Duration::from_millis(2));
    }
}

/// Writes `path` through a temporary file and a rename, so readers see the old or the new
/// content, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(format!("cannot write {}", path.display()), e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "pontoon-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn reserve_release_and_host_local_format() {
        let d = tmpdir();
        let s = Store::open(&d, "net", Duration::from_secs(1)).unwrap();
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let o = Owner::new("c1", "eth0");
        assert!(s.reserve(ip, &o).unwrap());
        assert!(!s.reserve(ip, &Owner::new("c2", "eth0")).unwrap());
        assert_eq!(
            fs::read_to_string(d.join("net/10.0.0.5")).unwrap(),
            "c1\r\neth0"
        );
        assert!(!s.release_if_held_by(ip, &Owner::new("c2", "eth0")).unwrap());
        assert!(s.release_if_held_by(ip, &o).unwrap());
        assert!(!d.join("net/10.0.0.5").exists());
        drop(s);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn host_local_allocations_are_indexed_once() {
        let d = tmpdir();
        fs::create_dir_all(d.join("net")).unwrap();
        fs::write(d.join("net/10.0.0.7"), "old\r\neth0").unwrap();
        fs::write(d.join("net/10.0.0.8"), "legacy").unwrap();
        fs::write(d.join("net/last_reserved_ip.0"), "10.0.0.8").unwrap();
        let s = Store::open(&d, "net", Duration::from_secs(1)).unwrap();
        let e = s.entry(&Owner::new("old", "eth0")).unwrap().unwrap();
        assert_eq!(e.ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.last_reserved(0), Some("10.0.0.8".parse().unwrap()));
        assert_eq!(s.allocated().unwrap().len(), 2);
        drop(s);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn lock_times_out_with_code_11() {
        let d = tmpdir();
        let s = Store::open(&d, "net", Duration::from_secs(1)).unwrap();
        let t = Instant::now();
        let e = match Store::open(&d, "net", Duration::from_millis(100)) {
            Err(e) => e,
            Ok(_) => panic!("second lock succeeded"),
        };
        assert_eq!(e.code(), 11);
        assert!(t.elapsed() < Duration::from_secs(1));
        drop(s);
        assert!(Store::open(&d, "net", Duration::from_millis(100)).is_ok());
        fs::remove_dir_all(&d).unwrap();
    }
}

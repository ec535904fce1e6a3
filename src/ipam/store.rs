//! The on-disk allocation store, laid out as host-local lays it out so a node that ran host-local
//! keeps its allocations:
//!
//! ```text
//! <dataDir>/<network>/lock                 flock(2)ed for every change (shared with host-local)
//! <dataDir>/<network>/<ip>                 "<containerID>\r\n<ifname>", one file per address
//! <dataDir>/<network>/last_reserved_ip.<n> round-robin position of range set n
//! <dataDir>/<network>/.pontoon/            pontoon's own bookkeeping (host-local ignores it):
//!     attachments/<containerID>:<ifname>     the attachment record (see crate::attachment)
//!     tmp.<ip>                               an address file being written (never seen complete)
//!     v1, v2                                 markers: the one-time migrations below are done
//! ```
//!
//! Crash safety: an address file is written in full to `tmp.<ip>` and then hard-linked into
//! place (`link(2)` fails if the name exists, like `O_EXCL`), so a process killed at any instant
//! leaves either a complete address file or none; the record is written (by rename) before the
//! address files it lists, so no address file of pontoon's ever lacks one. Leftover `tmp.*`
//! files can only be from a dead process (they are made under the lock) and are removed at the
//! next lock. A power loss can still leave empty files (no fsync, see the README): those are
//! recognised by their age (older than this boot) and reclaimed.
//!
//! This module only reads and writes files; what a record means, and releasing it, is
//! [`crate::attachment`]'s.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::attachment::Record;
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

    /// The record's file name.
    pub fn index_name(&self) -> String {
        format!("{}:{}", self.container_id, self.ifname)
    }

    /// Parses a record file name; temporaries of atomic writes (`.name.pid`) and anything that
    /// is not a valid container id / ifname pair are not records.
    pub fn from_index_name(s: &str) -> Option<Owner> {
        let (id, ifname) = s.split_once(':')?;
        crate::cni::env::validate_container_id(id).ok()?;
        crate::cni::env::validate_ifname(ifname).ok()?;
        Some(Owner::new(id, ifname))
    }

    /// Whether an address file naming `holder` belongs to this attachment (host-local's oldest
    /// files name only the container).
    pub fn holds(&self, holder: &Owner) -> bool {
        holder == self || (holder.ifname.is_empty() && holder.container_id == self.container_id)
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// What a file holds: nothing, something that parses, or something that does not (a torn write
/// after a power loss, or a hand edit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored<T> {
    Missing,
    Ok(T),
    Unreadable,
}

impl<T> Stored<T> {
    pub fn ok(self) -> Option<T> {
        match self {
            Stored::Ok(t) => Some(t),
            _ => None,
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
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
        lock_file(&dir.join("lock"), timeout)
            .map(|lock| {
                if let Ok(dup) = lock.try_clone() {
                    let _ = OPS.set(dup);
                }
                let store = Store {
                    dir,
                    own,
                    _lock: Some(lock),
                };
                store.remove_temporaries();
                store
            })
            .and_then(|store| {
                store.migrate_once()?;
                Ok(store)
            })
    }

    /// A handle without the lock, for reads (operator reports, STATUS).
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

    fn record_path(&self, owner: &Owner) -> PathBuf {
        self.own.join("attachments").join(owner.index_name())
    }

    // ---- address files ----

    /// The holder of `ip`: `Missing` when free, `Unreadable` when the file holds no owner (an
    /// empty or torn file: it still blocks the address).
    pub fn holder(&self, ip: IpAddr) -> Result<Stored<Owner>> {
        match fs::read_to_string(self.ip_path(ip)) {
            Ok(s) => Ok(Owner::from_content(&s).map_or(Stored::Unreadable, Stored::Ok)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Stored::Missing),
            Err(e) if e.kind() == ErrorKind::InvalidData => Ok(Stored::Unreadable),
            Err(e) => Err(Error::io(format!("cannot read allocation {ip}"), e)),
        }
    }

    pub fn is_taken(&self, ip: IpAddr) -> bool {
        // lstat: a dangling or odd entry still blocks the name.
        fs::symlink_metadata(self.ip_path(ip)).is_ok()
    }

    /// When the file of `ip` was last written (`None` if it does not exist).
    pub fn ip_mtime(&self, ip: IpAddr) -> Option<SystemTime> {
        fs::symlink_metadata(self.ip_path(ip))
            .and_then(|m| m.modified())
            .ok()
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
            Stored::Ok(h) if owner.holds(&h) => {
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

    /// Every allocated address (file names that parse as addresses).
    pub fn allocated(&self) -> Result<Vec<IpAddr>> {
        list_allocated(&self.dir)
    }

    /// The addresses whose files name `owner`: a walk of the whole directory, for records that
    /// cannot be read (the normal paths read only the record).
    pub fn addresses_of(&self, owner: &Owner) -> Result<Vec<IpAddr>> {
        let mut out = Vec::new();
        for ip in self.allocated()? {
            if let Stored::Ok(h) = self.holder(ip)?
                && owner.holds(&h)
            {
                out.push(ip);
            }
        }
        Ok(out)
    }

    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("last_reserved_ip.{set}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Updates the round-robin position in place (the lock is held; see [`overwrite`]). A
    /// torn file after a power cut only restarts the round robin at the range start, for
    /// host-local too.
    pub fn set_last_reserved(&self, set: usize, ip: IpAddr) -> Result<()> {
        overwrite(
            &self.dir.join(format!("last_reserved_ip.{set}")),
            ip.to_string().as_bytes(),
        )
    }

    // ---- records ----

    pub fn record(&self, owner: &Owner) -> Result<Stored<Record>> {
        match fs::read(self.record_path(owner)) {
            Ok(b) => Ok(serde_json::from_slice(&b).map_or(Stored::Unreadable, Stored::Ok)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Stored::Missing),
            Err(e) if e.kind() == ErrorKind::InvalidData => Ok(Stored::Unreadable),
            Err(e) => Err(Error::io(format!("cannot read the record of {owner}"), e)),
        }
    }

    /// When the record of `owner` was last written.
    pub fn record_mtime(&self, owner: &Owner) -> Option<SystemTime> {
        fs::symlink_metadata(self.record_path(owner))
            .and_then(|m| m.modified())
            .ok()
    }

    /// Writes a new record (or replaces one) through a temporary file and a rename: a reader
    /// sees the old or the new one, whatever happens.
    pub fn write_record(&self, owner: &Owner, record: &Record) -> Result<()> {
        let bytes = serde_json::to_vec(record).expect("a record serialises");
        write_atomic(&self.record_path(owner), &bytes)
    }

    /// Rewrites an existing record in place. Only for a store locked by the caller (no reader
    /// of the record can run meanwhile; unlocked readers tolerate an unreadable record).
    pub fn rewrite_record(&self, owner: &Owner, record: &Record) -> Result<()> {
        let bytes = serde_json::to_vec(record).expect("a record serialises");
        overwrite(&self.record_path(owner), &bytes)
    }

    pub fn remove_record(&self, owner: &Owner) -> Result<()> {
        match fs::remove_file(self.record_path(owner)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("cannot remove the record of {owner}"), e)),
        }
    }

    /// Every attachment with a record file, readable or not.
    pub fn records(&self) -> Result<Vec<(Owner, Stored<Record>)>> {
        let mut out = Vec::new();
        let dir = self.own.join("attachments");
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(format!("cannot list {}", dir.display()), e)),
        };
        for de in rd {
            let Ok(de) = de else { continue };
            let name = de.file_name();
            let Some(owner) = name.to_str().and_then(Owner::from_index_name) else {
                continue;
            };
            let r = self.record(&owner)?;
            if r != Stored::Missing {
                out.push((owner, r));
            }
        }
        Ok(out)
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

    /// One-time migrations of a network directory, each behind its marker:
    /// - v1: allocations pontoon did not make (host-local's) get a record, so DEL and re-ADD can
    ///   rely on the records alone from then on;
    /// - v2: hostPort mappings kept by earlier pontoons in `.pontoon/portmaps/<owner>` move
    ///   into their attachment's record.
    fn migrate_once(&self) -> Result<()> {
        let v1 = self.own.join("v1");
        if !v1.exists() {
            let mut found: BTreeMap<Owner, Vec<IpAddr>> = BTreeMap::new();
            for ip in self.allocated()? {
                if let Stored::Ok(owner) = self.holder(ip)?
                    && !owner.ifname.is_empty()
                {
                    found.entry(owner).or_default().push(ip);
                }
            }
            for (owner, ips) in found {
                let mut rec = self.record(&owner)?.ok().unwrap_or_default();
                for ip in ips {
                    if !rec.ips.contains(&ip) {
                        rec.ips.push(ip);
                    }
                }
                self.write_record(&owner, &rec)?;
            }
            write_atomic(&v1, b"")?;
        }
        let v2 = self.own.join("v2");
        if !v2.exists() {
            let old = self.own.join("portmaps");
            if let Ok(rd) = fs::read_dir(&old) {
                for de in rd.flatten() {
                    let Some(owner) = de.file_name().to_str().and_then(Owner::from_index_name)
                    else {
                        continue;
                    };
                    let els: Vec<crate::portmap::Element> = fs::read(de.path())
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    if let Stored::Ok(mut rec) = self.record(&owner)?
                        && !els.is_empty()
                    {
                        rec.port_mappings = els;
                        self.write_record(&owner, &rec)?;
                    }
                }
                let _ = fs::remove_dir_all(&old);
            }
            write_atomic(&v2, b"")?;
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // The descriptor kept for record_op shares this lock: release it explicitly.
        if let Some(f) = &self._lock {
            let _ = f.unlock();
        }
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

/// Opens (creating it) and flocks `path`, waiting in the kernel at most `timeout` (then code
/// 11, naming `what`). The lock lasts as long as the returned file.
pub fn lock_file(path: &Path, timeout: Duration) -> Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    }
    lock_with_timeout(open_lock(path)?, timeout, path)
}

/// Opens a lock file for appending (see [`record_op`]); its content is never read by the lock.
fn open_lock(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("cannot open {}", path.display())))
}

/// A second descriptor of the first pool lock file this process opened, kept for
/// [`record_op`]. (A flock belongs to the open file description, so a [`Store`] unlocks
/// explicitly when dropped.)
static OPS: std::sync::OnceLock<File> = std::sync::OnceLock::new();

/// Appends one line about this CNI invocation to its network's pool lock file (the agent's
/// metrics read it): one `write` with `O_APPEND` on a descriptor the invocation holds anyway,
/// no open, no lock. Nothing happens when the invocation opened no pool.
pub fn record_op(line: &str) {
    if let Some(mut f) = OPS.get() {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Empties a pool lock file's operation lines (the agent, holding the lock).
pub fn truncate_ops(store: &Store) {
    if let Some(f) = &store._lock {
        let _ = f.set_len(0);
    }
}

/// Takes the flock, waiting in the kernel (no polling) at most `timeout`. The uncontended case
/// is one `try_lock`. Otherwise a helper thread blocks in `flock(2)` on its own descriptor of
/// the file while this thread waits for it with a deadline; at the deadline the helper is
/// abandoned, and if it gets the lock later it drops it at once (its descriptor closes).
fn lock_with_timeout(f: File, timeout: Duration, path: &Path) -> Result<File> {
    match f.try_lock() {
        Ok(()) => return Ok(f),
        Err(fs::TryLockError::WouldBlock) => {}
        Err(fs::TryLockError::Error(e)) => {
            return Err(Error::io(format!("cannot lock {}", path.display()), e));
        }
    }
    // flock locks belong to the open file description: the helper needs its own.
    let mine = open_lock(path)?;
    drop(f);
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<File>>(1);
    std::thread::Builder::new()
        .name("pool-lock".into())
        .spawn(move || {
            let r = mine.lock().map(|()| mine);
            // A receiver that gave up is gone: the file (and its lock) is dropped here.
            let _ = tx.send(r);
        })
        .map_err(io_err("cannot start the lock waiter thread"))?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(f)) => Ok(f),
        Ok(Err(e)) => Err(Error::io(format!("cannot lock {}", path.display()), e)),
        Err(_) => Err(Error::TryAgainLater(format!(
            "the lock {} is held by another process for more than {} ms; try again later (a \
             stuck holder can be found with `fuser {}`)",
            path.display(),
            timeout.as_millis(),
            path.display()
        ))),
    }
}

/// Rewrites `path` in place: one `pwrite` and, when it got shorter, a truncation to the new,
/// non-zero, length. Replacing a file by rename, or truncating it to zero and writing it
/// again, makes ext4 start writing the new data out at once (`auto_da_alloc`): ~0.3 ms here,
/// which an ADD would pay for each such file. Callers hold the pool lock, so no reader sees
/// the file half written; only a power cut can tear it.
pub fn overwrite(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let res = (|| {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        f.write_all_at(bytes, 0)?;
        if f.metadata()?.len() > bytes.len() as u64 {
            f.set_len(bytes.len() as u64)?;
        }
        Ok(())
    })();
    res.map_err(|e: io::Error| Error::io(format!("cannot write {}", path.display()), e))
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
    use std::time::Instant;

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
        fs::write(d.join("net/10.0.0.6"), "").unwrap();
        assert_eq!(
            s.holder("10.0.0.6".parse().unwrap()).unwrap(),
            Stored::Unreadable
        );
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
        let e = s.record(&Owner::new("old", "eth0")).unwrap().ok().unwrap();
        assert_eq!(e.ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.last_reserved(0), Some("10.0.0.8".parse().unwrap()));
        assert_eq!(s.allocated().unwrap().len(), 2);
        drop(s);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn earlier_portmap_state_moves_into_the_record() {
        let d = tmpdir();
        let own = d.join("net/.pontoon");
        fs::create_dir_all(own.join("attachments")).unwrap();
        fs::create_dir_all(own.join("portmaps")).unwrap();
        fs::write(own.join("v1"), "").unwrap();
        fs::write(
            own.join("attachments/a:eth0"),
            r#"{"ips":["10.0.0.2"],"hostVeth":"pon000000000001","adding":{"pid":1,"since":5}}"#,
        )
        .unwrap();
        fs::write(
            own.join("portmaps/a:eth0"),
            r#"[{"hostIp":null,"protocol":"tcp","hostPort":8080,"podIp":"10.0.0.2","podPort":80}]"#,
        )
        .unwrap();
        let s = Store::open(&d, "net", Duration::from_secs(1)).unwrap();
        let r = s.record(&Owner::new("a", "eth0")).unwrap().ok().unwrap();
        assert_eq!(r.port_mappings.len(), 1);
        assert_eq!(r.host_veth.as_deref(), Some("pon000000000001"));
        assert!(!own.join("portmaps").exists());
        drop(s);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn lock_times_out_with_code_11_and_waits_without_polling() {
        let d = tmpdir();
        let s = Store::open(&d, "net", Duration::from_secs(1)).unwrap();
        let t = Instant::now();
        let e = match Store::open(&d, "net", Duration::from_millis(100)) {
            Err(e) => e,
            Ok(_) => panic!("second lock succeeded"),
        };
        assert_eq!(e.code(), 11);
        assert!(t.elapsed() < Duration::from_secs(1));
        // A waiter gets the lock as soon as the holder lets go.
        let d2 = d.clone();
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            let s = Store::open(&d2, "net", Duration::from_secs(5)).map(|_| ());
            (s.is_ok(), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
        let (ok, waited) = waiter.join().unwrap();
        assert!(ok);
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        // The abandoned helper of the timed-out attempt did not keep the lock.
        assert!(Store::open(&d, "net", Duration::from_millis(500)).is_ok());
        fs::remove_dir_all(&d).unwrap();
    }
}

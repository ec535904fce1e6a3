//! The pods of this node as its attachment records name them: (namespace, name, uid) and
//! addresses, written by each CNI ADD before the pod's veth exists. NetworkPolicy uses them
//! for pods whose Pod object does not carry addresses yet (see
//! [`crate::policy::fill_from_records`]), so a new pod is isolated from its first packet rather
//! than from the moment kubelet's status update reaches the agent.
//!
//! The records directory is watched with inotify: a record written, rewritten or removed sends
//! [`Wake::Records`] and marks the cache stale; it is read again (one small file per
//! attachment, without the pool lock) only then, and the policy step runs only when what the
//! records say of pods changed (not for an ADD's completion, nor for attachments of no pod).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::Wake;
use crate::attachment::PodRef;
use crate::error::{Error, Result};
use crate::ipam::Owner;
use crate::ipam::store::{Store, Stored};

pub struct LocalPods {
    data_dir: PathBuf,
    network: String,
    wake: Sender<Wake>,
    stale: Arc<AtomicBool>,
    watching: bool,
    pods: BTreeMap<Owner, (PodRef, Vec<IpAddr>)>,
}

impl LocalPods {
    pub fn new(data_dir: PathBuf, network: String, wake: Sender<Wake>) -> LocalPods {
        LocalPods {
            data_dir,
            network,
            wake,
            stale: Arc::new(AtomicBool::new(true)),
            watching: false,
            pods: BTreeMap::new(),
        }
    }

    /// Starts watching the records directory (made if missing, as the first ADD would), once.
    fn watch(&mut self) -> Result<()> {
        if self.watching {
            return Ok(());
        }
        let dir = Store::network_dir(&self.data_dir, &self.network).join(".pontoon/attachments");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        let ino = Inotify::init(InitFlags::IN_CLOEXEC)
            .map_err(|e| Error::io("cannot start inotify", e.into()))?;
        ino.add_watch(
            &dir,
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_DELETE_SELF,
        )
        .map_err(|e| Error::io(format!("cannot watch {}", dir.display()), e.into()))?;
        let stale = Arc::clone(&self.stale);
        let wake = self.wake.clone();
        std::thread::Builder::new()
            .name("records-watch".into())
            .spawn(move || {
                while let Ok(events) = ino.read_events() {
                    // Only records, not the temporaries their atomic writes go through.
                    let records = events.iter().any(|e| {
                        e.name
                            .as_ref()
                            .and_then(|n| n.to_str())
                            .is_none_or(|n| Owner::from_index_name(n).is_some())
                    });
                    if !records {
                        continue;
                    }
                    stale.store(true, Ordering::Release);
                    if wake.send(Wake::Records).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("cannot start the records watch thread", e))?;
        self.watching = true;
        Ok(())
    }

    /// Reads the records again if one changed since the last call (the first call starts the
    /// watch); whether what they say of pods changed. A record caught mid-rewrite (unreadable)
    /// keeps what was read of it before.
    pub fn refresh(&mut self) -> Result<bool> {
        self.watch()?;
        // Stale from the start: what was written before the watch began is read too.
        if !self.stale.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        let mut next = BTreeMap::new();
        for (owner, rec) in Store::unlocked(&self.data_dir, &self.network).records()? {
            match rec {
                Stored::Ok(r) => {
                    if let Some(p) = r.pod {
                        next.insert(owner, (p, r.ips));
                    }
                }
                _ => {
                    if let Some(old) = self.pods.get(&owner) {
                        next.insert(owner, old.clone());
                    }
                }
            }
        }
        let changed = next != self.pods;
        self.pods = next;
        Ok(changed)
    }

    /// The pods the records name, as last read.
    pub fn pods(&self) -> Vec<(PodRef, Vec<IpAddr>)> {
        self.pods.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attachment::Record;

    #[test]
    fn records_name_their_pods_and_changes_are_seen() {
        let dir = std::env::temp_dir().join(format!("pontoon-localpods-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut lp = LocalPods::new(dir.clone(), "net".into(), tx);
        assert!(!lp.refresh().unwrap(), "nothing yet");
        assert!(lp.pods().is_empty());
        let store = Store::unlocked(&dir, "net");
        let owner = Owner {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        let pod = PodRef {
            namespace: "x".into(),
            name: "a".into(),
            uid: Some("u1".into()),
        };
        let rec = Record {
            ips: vec!["10.0.0.2".parse().unwrap()],
            pod: Some(pod.clone()),
            ..Default::default()
        };
        store.write_record(&owner, &rec).unwrap();
        let wait = || {
            assert_eq!(
                rx.recv_timeout(std::time::Duration::from_secs(5)),
                Ok(Wake::Records)
            );
            // The rest of a burst.
            std::thread::sleep(std::time::Duration::from_millis(50));
            while rx.try_recv().is_ok() {}
        };
        wait();
        assert!(lp.refresh().unwrap(), "a new pod");
        assert_eq!(lp.pods(), vec![(pod.clone(), rec.ips.clone())]);
        // The same record written again (an ADD's completion): no change.
        store.rewrite_record(&owner, &rec).unwrap();
        wait();
        assert!(!lp.refresh().unwrap());
        // A torn record keeps what was read of it.
        std::fs::write(dir.join("net/.pontoon/attachments/c1:eth0"), b"{\"ips\":").unwrap();
        wait();
        assert!(!lp.refresh().unwrap());
        assert_eq!(lp.pods().len(), 1);
        // A record of no pod (an attachment of another runtime) changes nothing.
        let other = Owner {
            container_id: "c2".into(),
            ifname: "eth0".into(),
        };
        store.write_record(&other, &Record::default()).unwrap();
        wait();
        assert!(!lp.refresh().unwrap());
        store.remove_record(&owner).unwrap();
        wait();
        assert!(lp.refresh().unwrap(), "the pod's record gone");
        assert!(lp.pods().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

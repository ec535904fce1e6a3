//! The lease an ADD in progress holds on its record, and the facts about this boot and process
//! that make it checkable from anywhere: the boot id, the pid namespace and the process start
//! time. A pid alone is not enough: a `pontoon gc` in a pod without `hostPID` sees none of the
//! node's processes, and pids are reused.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::ipam::store::unix_now;

/// How long an ADD may take before its lease counts as expired even if its process seems to
/// exist (or cannot be seen from here).
pub const LEASE_TTL_SECS: u64 = 300;

/// An ADD in progress: the process doing it and when it started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub pid: u32,
    /// Seconds since the Unix epoch.
    pub since: u64,
    /// `/proc/sys/kernel/random/boot_id` when the lease was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Inode of the holder's pid namespace (`/proc/self/ns/pid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<u64>,
    /// The holder's start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
}

impl Lease {
    /// A lease for this process, now.
    pub fn now() -> Lease {
        Lease {
            pid: std::process::id(),
            since: unix_now(),
            boot_id: boot_id().map(str::to_string),
            pid_ns: pid_ns_of("self"),
            start_time: start_time_of("self"),
        }
    }

    /// Whether the ADD holding this lease may still be running: not older than
    /// [`LEASE_TTL_SECS`], taken in this boot, and its process is alive (the same pid with the
    /// same start time). A holder in another pid namespace cannot be looked up from here: its
    /// lease counts as live until it expires.
    pub fn is_live(&self) -> bool {
        if unix_now().saturating_sub(self.since) >= LEASE_TTL_SECS {
            return false;
        }
        if let (Some(theirs), Some(ours)) = (&self.boot_id, boot_id())
            && theirs != ours
        {
            return false;
        }
        match self.pid_ns {
            Some(ns) if Some(ns) != pid_ns_of("self") => true,
            _ => {
                let pid = self.pid.to_string();
                match self.start_time {
                    Some(st) => start_time_of(&pid) == Some(st),
                    None => Path::new("/proc").join(&pid).exists(),
                }
            }
        }
    }
}

/// This boot's id.
pub fn boot_id() -> Option<&'static str> {
    static ID: OnceLock<Option<String>> = OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
    })
    .as_deref()
}

/// When this boot started (`btime` of `/proc/stat`). Files last written before it are from an
/// earlier boot.
pub fn boot_time() -> Option<SystemTime> {
    static T: OnceLock<Option<SystemTime>> = OnceLock::new();
    *T.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let secs: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(UNIX_EPOCH + Duration::from_secs(secs))
    })
}

/// Whether a file written at `mtime` predates this boot.
pub fn before_this_boot(mtime: Option<SystemTime>) -> bool {
    matches!((mtime, boot_time()), (Some(m), Some(b)) if m < b)
}

fn pid_ns_of(pid: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// Field 22 of `/proc/<pid>/stat` (after the parenthesised command name, which may hold spaces).
fn start_time_of(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    // rest starts with field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_lease_is_live_and_a_dead_or_foreign_one_is_judged_right() {
        let mine = Lease::now();
        assert!(mine.boot_id.is_some() && mine.pid_ns.is_some() && mine.start_time.is_some());
        assert!(mine.is_live());
        let reused_pid = Lease {
            start_time: mine.start_time.map(|t| t + 1),
            ..mine.clone()
        };
        assert!(!reused_pid.is_live(), "same pid, other start time");
        let other_ns = Lease {
            pid: 999_999,
            pid_ns: Some(1),
            ..mine.clone()
        };
        assert!(
            other_ns.is_live(),
            "another pid namespace: live until the TTL"
        );
        let old = Lease {
            since: unix_now() - LEASE_TTL_SECS,
            ..other_ns.clone()
        };
        assert!(!old.is_live());
        let last_boot = Lease {
            boot_id: Some("another-boot".into()),
            ..mine.clone()
        };
        assert!(!last_boot.is_live());
        // An earlier pontoon's lease: pid and time only.
        let legacy: Lease = serde_json::from_str(&format!(
            r#"{{"pid":{},"since":{}}}"#,
            std::process::id(),
            unix_now()
        ))
        .unwrap();
        assert!(legacy.is_live());
        assert!(before_this_boot(Some(UNIX_EPOCH)));
        assert!(!before_this_boot(Some(SystemTime::now())));
    }
}

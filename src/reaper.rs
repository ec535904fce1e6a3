//! Deleting retired host veths off the runtime's clock.
//!
//! Deleting a veth costs ~20 ms of kernel time (`unregister_netdevice` waits for an RCU
//! barrier), ~90% of a DEL. Before DEL returns, the veth is already out of service (down and off
//! the bridge, see [`crate::attachment`]); its deletion then happens in a detached process:
//! every runtime deletes the pod's netns right after DEL, and the kernel destroys the pair with
//! it (batched with other namespaces), so the reaper first waits, on link events and without
//! polling, up to [`WAIT`] for that. What is still there then it deletes by ifindex, never by
//! name (a re-ADD may have made a new link with the same name). A link already gone makes it a
//! no-op.
//!
//! The reaper holds none of the runtime's descriptors: its stdin, stdout and stderr are
//! `/dev/null`, and everything pontoon opens is close-on-exec (runtimes hand a plugin only
//! those three), so containerd, which reads the plugin's stdout until EOF, sees DEL end the
//! moment the plugin exits. It runs in its own process group and is reparented to init when
//! the plugin exits, which reaps it: no zombie.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::dataplane::Netlink;
use crate::error::{Error, Result};

/// How long the reaper waits for the runtime's netns teardown before deleting the link itself.
pub const WAIT: Duration = Duration::from_secs(2);

/// The hidden operator command the reaper runs as.
pub const ARG: &str = "__reap-links";

/// Hands the deletion of `ifindexes` to a detached reaper. Falls back to deleting them here when
/// no process can be started.
pub fn spawn(ifindexes: &[u32], nl: &mut Netlink) -> Result<()> {
    if ifindexes.is_empty() {
        return Ok(());
    }
    let spawned = std::env::current_exe().and_then(|exe| {
        Command::new(exe)
            .arg(ARG)
            .args(ifindexes.iter().map(|i| i.to_string()))
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
    });
    match spawned {
        // Not waited for: it outlives this process and init reaps it.
        Ok(_child) => Ok(()),
        Err(e) => {
            log::warn!("cannot start the veth reaper ({e}): deleting the veths now");
            for i in ifindexes {
                nl.del_link_by_index(*i)?;
            }
            Ok(())
        }
    }
}

const RTNLGRP_LINK: u32 = 1;
const RTM_DELLINK: u16 = 17;

/// The reaper process: waits up to [`WAIT`] for the links to go, then deletes what is left.
pub fn run(ifindexes: &[u32]) -> Result<()> {
    let mut events = Socket::new(NETLINK_ROUTE)
        .map_err(|e| Error::netlink("cannot open a netlink socket", e))?;
    events
        .bind(&SocketAddr::new(0, 0))
        .map_err(|e| Error::netlink("cannot bind the netlink socket", e))?;
    events
        .add_membership(RTNLGRP_LINK)
        .map_err(|e| Error::netlink("cannot subscribe to link events", e))?;
    // Subscribed first, then looked at: no deletion can slip between the two.
    let mut nl = Netlink::new()?;
    let mut left: Vec<u32> = Vec::new();
    for i in ifindexes {
        if nl.link_by_index(*i)?.is_some() {
            left.push(*i);
        }
    }
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 64 * 1024];
    while !left.is_empty() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let rest = deadline - now;
        let tv =
            nix::sys::time::TimeVal::new(rest.as_secs() as i64, rest.subsec_micros().max(1) as i64);
        let _ =
            nix::sys::socket::setsockopt(&events, nix::sys::socket::sockopt::ReceiveTimeout, &tv);
        let n = match events.recv(&mut &mut buf[..], 0) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // ENOBUFS: events were lost; look again.
            Err(_) => {
                left.retain(|i| nl.link_by_index(*i).ok().flatten().is_some());
                continue;
            }
        };
        for gone in deleted_links(&buf[..n]) {
            left.retain(|i| *i != gone);
        }
    }
    for i in left {
        nl.del_link_by_index(i)?;
    }
    Ok(())
}

/// The ifindexes of the RTM_DELLINK messages in `buf`.
fn deleted_links(buf: &[u8]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        if len < 16 || off + len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        // ifinfomsg: family (1), pad (1), type (2), index (4), ...
        if kind == RTM_DELLINK && len >= 16 + 8 {
            out.push(i32::from_ne_bytes(buf[off + 20..off + 24].try_into().unwrap()) as u32);
        }
        off += (len + 3) & !3;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_deleted_link_indexes() {
        let mut b = vec![0u8; 32];
        b[0..4].copy_from_slice(&32u32.to_ne_bytes());
        b[4..6].copy_from_slice(&RTM_DELLINK.to_ne_bytes());
        b[20..24].copy_from_slice(&42i32.to_ne_bytes());
        assert_eq!(deleted_links(&b), vec![42]);
        b[4..6].copy_from_slice(&16u16.to_ne_bytes()); // RTM_NEWLINK
        assert!(deleted_links(&b).is_empty());
    }
}

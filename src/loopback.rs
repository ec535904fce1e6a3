//! The `loopback` plugin: pontoon answers as `loopback` when installed under that name, so a
//! node needs no other CNI binary (containerd 1.x adds a loopback network to every pod and
//! fails without the binary). ADD brings `lo` up in the pod and reports 127.0.0.1/8 and ::1/128,
//! as the reference loopback plugin does; DEL sets it down (best effort: the netns may be gone);
//! CHECK verifies it is up.

use serde_json::Value;

use crate::cni::result::{Interface, IpConfig};
use crate::cni::{self, CniResult, Command, Env, NetConf};
use crate::dataplane::Netlink;
use crate::error::{Error, Result};
use crate::netns::NetNs;

/// Whether the binary was invoked as the loopback plugin.
pub fn invoked_as_loopback() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n == "loopback")
        })
        .unwrap_or(false)
}

fn lo_in(netns: &NetNs) -> Result<(Netlink, u32, bool)> {
    let mut nl = netns.run(Netlink::new)?;
    let lo = nl
        .link_by_name("lo")?
        .ok_or_else(|| Error::Netns(format!("{} has no lo", netns.path().display())))?;
    Ok((nl, lo.index, lo.up))
}

pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>> {
    if env.command == Command::Version {
        return Ok(Some(cni::version_answer(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    match env.command {
        Command::Add => {
            let path = env.netns.as_deref().unwrap();
            let ns = NetNs::open(path)?.ok_or_else(|| {
                Error::Netns(format!(
                    "network namespace {} does not exist",
                    path.display()
                ))
            })?;
            let (mut nl, idx, up) = lo_in(&ns)?;
            if !up {
                nl.set_up(idx)?;
            }
            let result = CniResult {
                interfaces: vec![Interface {
                    name: "lo".into(),
                    mac: "00:00:00:00:00:00".into(),
                    sandbox: path.display().to_string(),
                    ..Default::default()
                }],
                ips: vec![
                    IpConfig {
                        interface: Some(0),
                        address: "127.0.0.1/8".parse().unwrap(),
                        gateway: None,
                    },
                    IpConfig {
                        interface: Some(0),
                        address: "::1/128".parse().unwrap(),
                        gateway: None,
                    },
                ],
                ..Default::default()
            };
            Ok(Some(result.to_json(conf.version)))
        }
        Command::Del => {
            // Nothing to release; setting lo down is a courtesy when the netns still exists.
            if let Some(path) = &env.netns
                && let Ok(Some(ns)) = NetNs::open(path)
                && let Ok((mut nl, idx, true)) = lo_in(&ns)
            {
                let _ = nl.set_down(idx);
            }
            Ok(None)
        }
        Command::Check => {
            let path = env.netns.as_deref().unwrap();
            let ns = NetNs::open(path)?
                .ok_or_else(|| Error::CheckFailed(format!("{} is gone", path.display())))?;
            match lo_in(&ns)? {
                (_, _, true) => Ok(None),
                _ => Err(Error::CheckFailed("lo is down".into())),
            }
        }
        Command::Gc | Command::Status | Command::Version => Ok(None),
    }
}

//! `/proc/sys` writes. `/proc/sys/net` resolves in the network namespace of the thread that opens
//! the file, so pod sysctls are written from inside [`crate::netns::NetNs::run`].

use std::fs;

use crate::error::{Error, Result};

fn path(key: &str) -> String {
    format!("/proc/sys/{key}")
}

/// Sets `key` to `value` unless it already has it (a read is cheaper than a write).
pub fn ensure(key: &str, value: &str) -> Result<()> {
    let p = path(key);
    if fs::read_to_string(&p).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    fs::write(&p, value).map_err(|e| Error::io(format!("cannot set sysctl {key}={value}"), e))
}

/// Writes `key` (without reading it first: for fresh interfaces, whose defaults differ),
/// ignoring a key that does not exist (e.g. IPv6 disabled on the node).
pub fn set_if_exists(key: &str, value: &str) {
    if let Err(e) = fs::write(path(key), value)
        .map_err(|e| Error::io(format!("cannot set sysctl {key}={value}"), e))
        && e.errno() != Some(libc::ENOENT)
    {
        log::warn!("{e}");
    }
}

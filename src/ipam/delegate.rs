//! IPAM plugins other than host-local (`dhcp`, `static`, ...) run as the spec says: the named
//! binary from `CNI_PATH`, with our environment and stdin.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Proc, Stdio};

use serde_json::Value;

use crate::cni::{CniResult, Env, Version};
use crate::error::{Error, Result, code};

fn find(plugin: &str, env: &Env) -> Result<PathBuf> {
    if plugin.contains('/') || plugin == "." || plugin == ".." {
        return Err(Error::config(format!(
            "ipam type {plugin:?} must be a plugin name, not a path"
        )));
    }
    if env.path.is_empty() {
        return Err(Error::env(
            "CNI_PATH",
            format!("is empty, so the IPAM plugin {plugin:?} cannot be found"),
        ));
    }
    env.path
        .iter()
        .map(|d| d.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::config(format!(
                "IPAM plugin {plugin:?} not found in CNI_PATH {:?}",
                env.path
            ))
        })
}

/// Runs the IPAM plugin `plugin` for `command` ("ADD", "DEL", "CHECK", "GC", "STATUS") and
/// returns its stdout on success.
pub fn exec(plugin: &str, command: &str, env: &Env, stdin: &[u8]) -> Result<Vec<u8>> {
    let bin = find(plugin, env)?;
    let path = std::env::join_paths(&env.path).unwrap_or_default();
    let mut cmd = Proc::new(&bin);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &env.container_id)
        .env(
            "CNI_NETNS",
            env.netns
                .as_ref()
                .map(|p| p.as_os_str().to_owned())
                .unwrap_or_default(),
        )
        .env("CNI_IFNAME", &env.ifname)
        .env(
            "CNI_ARGS",
            env.args
                .pairs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(";"),
        )
        .env("CNI_PATH", path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("cannot run IPAM plugin {}", bin.display()), e))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin)
        .map_err(|e| Error::io(format!("cannot write to IPAM plugin {plugin}"), e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(format!("IPAM plugin {plugin} failed"), e))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    // A plugin error is a CNI error object on stdout; keep its code and message.
    let (msg, c) = match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(v) => (
            format!(
                "IPAM plugin {plugin}: {}{}",
                v["msg"].as_str().unwrap_or("failed"),
                v["details"]
                    .as_str()
                    .filter(|d| !d.is_empty())
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ),
            v["code"]
                .as_u64()
                .map(|c| c as u32)
                .unwrap_or(code::DELEGATE),
        ),
        Err(_) => (
            format!(
                "IPAM plugin {plugin} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            code::DELEGATE,
        ),
    };
    Err(Error::Delegate(msg, c))
}

/// ADD through a delegated IPAM plugin; the result is read in `version`.
pub fn add(plugin: &str, env: &Env, stdin: &[u8], version: Version) -> Result<CniResult> {
    let out = exec(plugin, "ADD", env, stdin)?;
    let v: Value = serde_json::from_slice(&out).map_err(|e| {
        Error::Delegate(
            format!("IPAM plugin {plugin} printed a result that is not JSON: {e}"),
            code::DELEGATE,
        )
    })?;
    CniResult::from_json(&v, version)
}

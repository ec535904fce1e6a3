//! Installing pontoon on a node: the binary into the CNI bin dir (and as `loopback`), then the
//! conflist into the CNI conf dir, each atomically (temporary file in the same directory, fsync,
//! rename: a runtime never sees a half-written plugin or config, and retries "text file busy").
//! Binary first, conflist second: CRI-O validates a conflist as soon as it appears. Idempotent:
//! nothing is rewritten when it is already in place.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// What to do about the `loopback` plugin containerd 1.x requires in the bin dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoopbackMode {
    /// Install pontoon as `loopback` unless another `loopback` is there.
    Auto,
    /// Always install pontoon as `loopback`.
    Always,
    /// Never touch `loopback`.
    Never,
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub conf_name: String,
    pub network: String,
    pub bridge: String,
    /// This node's pod CIDRs (one per family).
    pub pod_cidrs: Vec<IpNetwork>,
    /// Destinations never masqueraded: the cluster pod CIDR(s), the service CIDR, ...
    pub no_masquerade: Vec<IpNetwork>,
    pub mtu: Option<u32>,
    pub data_dir: Option<PathBuf>,
    pub loopback: LoopbackMode,
    /// Declare and handle the `portMappings` capability (hostPort).
    pub port_mappings: bool,
}

/// What `install` changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub binary: bool,
    pub loopback: bool,
    pub conflist: bool,
}

/// A Node object's pod CIDRs: `spec.podCIDRs` (dual stack), else `spec.podCIDR`.
pub fn pod_cidrs_of_node(node: &Value) -> Result<Vec<IpNetwork>> {
    let spec = &node["spec"];
    let list: Vec<&str> = match spec["podCIDRs"].as_array() {
        Some(a) if !a.is_empty() => a.iter().filter_map(|v| v.as_str()).collect(),
        _ => spec["podCIDR"].as_str().into_iter().collect(),
    };
    if list.is_empty() {
        let name = node["metadata"]["name"].as_str().unwrap_or("?");
        return Err(Error::config(format!(
            "node {name} has no spec.podCIDRs yet (is kube-controller-manager run with \
             --allocate-node-cidrs?)"
        )));
    }
    list.iter()
        .map(|s| {
            s.parse()
                .map_err(|_| Error::config(format!("node pod CIDR {s:?} is not a CIDR")))
        })
        .collect()
}

/// The conflist for this node.
pub fn conflist(spec: &Spec) -> Value {
    let ranges: Vec<Value> = spec
        .pod_cidrs
        .iter()
        .map(|c| json!([{"subnet": IpNetwork::new(c.network(), c.prefix()).unwrap().to_string()}]))
        .collect();
    let mut ipam = json!({"type": "host-local", "ranges": ranges});
    if let Some(d) = &spec.data_dir {
        ipam["dataDir"] = json!(d);
    }
    let mut plugin = json!({
        "type": "pontoon",
        "bridge": spec.bridge,
        "isGateway": true,
        "isDefaultGateway": true,
        "hairpinMode": true,
        "ipMasq": true,
        "noMasqueradeCidrs": spec.no_masquerade.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "ipam": ipam,
    });
    if let Some(m) = spec.mtu {
        plugin["mtu"] = json!(m);
    }
    // Every capability pontoon handles: `bandwidth` (kubelet's ingress/egress-bandwidth pod
    // annotations), `ips` and `mac` (static addresses and MACs: Podman, Multus), and
    // `portMappings` unless another plugin does hostPorts. Declaring `ips` also keeps Podman
    // from replacing the whole object with `{"ips": true}` for `--ip` (and dropping the rest).
    plugin["capabilities"] = json!({"bandwidth": true, "ips": true, "mac": true});
    if spec.port_mappings {
        plugin["capabilities"]["portMappings"] = json!(true);
    }
    json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"],
        "name": spec.network,
        "plugins": [plugin],
    })
}

/// The plugin entry of a conflist as the runtime passes it (name and cniVersion injected).
pub fn plugin_conf(list: &Value) -> Value {
    let mut p = list["plugins"][0].clone();
    p["name"] = list["name"].clone();
    p["cniVersion"] = list["cniVersion"].clone();
    p
}

fn same_content(path: &Path, bytes: &[u8]) -> bool {
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let Ok(meta) = f.metadata() else { return false };
    if meta.len() != bytes.len() as u64 {
        return false;
    }
    let mut have = Vec::with_capacity(bytes.len());
    f.read_to_end(&mut have).is_ok() && have == bytes
}

/// Writes `name` in `dir` atomically with `mode`; `Ok(false)` when it already had this content.
pub fn put_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<bool> {
    let target = dir.join(name);
    if same_content(&target, bytes) {
        return Ok(false);
    }
    fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    // A dot-name with a .tmp suffix: no CNI loader picks it up.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, &target)?;
        // Make the rename itself durable.
        File::open(dir)?.sync_all()
    })();
    res.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(format!("cannot install {}", target.display()), e)
    })?;
    Ok(true)
}

/// Installs the running binary, `loopback` and the conflist.
pub fn install(spec: &Spec, self_bytes: &[u8]) -> Result<Changes> {
    let mut ch = Changes {
        binary: put_atomic(&spec.bin_dir, "pontoon", self_bytes, 0o755)?,
        ..Default::default()
    };
    let lo = spec.bin_dir.join("loopback");
    let ours = same_content(&lo, self_bytes);
    let install_lo = match spec.loopback {
        LoopbackMode::Never => false,
        LoopbackMode::Always => true,
        // Replace only our own (older) copy; never someone else's loopback.
        LoopbackMode::Auto => !lo.exists() || ours || is_older_pontoon(&lo),
    };
    if install_lo {
        ch.loopback = put_atomic(&spec.bin_dir, "loopback", self_bytes, 0o755)?;
    }
    let list = conflist(spec);
    // The conflist must be one pontoon itself accepts.
    crate::cni::NetConf::parse(plugin_conf(&list).to_string().as_bytes())?;
    let text = serde_json::to_string_pretty(&list).expect("serialises") + "\n";
    ch.conflist = put_atomic(&spec.conf_dir, &spec.conf_name, text.as_bytes(), 0o644)?;
    Ok(ch)
}

/// Whether the file is a conflist pontoon wrote (a plugin of type `pontoon`).
fn is_pontoon_conflist(path: &Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["plugins"].as_array().cloned())
        .is_some_and(|p| p.iter().any(|x| x["type"] == "pontoon"))
}

/// Removes what pontoon put on this node: the conflist (first: no new pod gets pontoon), and,
/// once no pod is attached (or with `force`), the routes to other nodes (protocol 201), the
/// overlay devices, pontoon's firewall state (tables `inet pontoon` and `bridge pontoon`, the
/// iptables chains of the network), the
/// IPAM state of the network, the bridge if it has no port left, and the binaries (pontoon, and
/// `loopback` when it is pontoon). While pods are attached, the rest stays so that they keep
/// working and their DEL still finds the plugin. Returns what it did, one line each.
pub fn uninstall(spec: &Spec, force: bool) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let conflist = spec.conf_dir.join(&spec.conf_name);
    if is_pontoon_conflist(&conflist) {
        fs::remove_file(&conflist)
            .map_err(|e| Error::io(format!("cannot remove {}", conflist.display()), e))?;
        done.push(format!("removed {}", conflist.display()));
    }
    let data_dir = spec
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::ipam::DEFAULT_DATA_DIR));
    let store = crate::ipam::Store::unlocked(&data_dir, &spec.network);
    let alive = crate::attachment::link_probe();
    let attached: Vec<String> = store
        .records()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(o, r)| match r {
            crate::ipam::store::Stored::Ok(r) if r.host_veth.as_deref().is_some_and(&alive) => {
                Some(o.to_string())
            }
            _ => None,
        })
        .collect();
    if !attached.is_empty() && !force {
        done.push(format!(
            "{} pod(s) still attached ({}): the binaries, routes, firewall and IPAM state stay \
             so they keep working; delete them and run again, or use --force",
            attached.len(),
            attached.join(", ")
        ));
        return Ok(done);
    }
    let mut nl = crate::dataplane::Netlink::new()?;
    let mut routes = 0;
    for v4 in [true, false] {
        for r in nl.routes(v4)? {
            if r.protocol == Some(crate::agent::RTPROT_PONTOON) && r.table == Some(254) {
                nl.del_route(&r)?;
                routes += 1;
            }
        }
    }
    done.push(format!("removed {routes} route(s) of protocol 201"));
    for v4 in [true, false] {
        let name = crate::agent::overlay::device_name(v4);
        if nl.del_link_by_name(name)? {
            done.push(format!("removed the overlay device {name}"));
        }
    }
    let mut conn = crate::nft::Conn::new()?;
    for (family, table, label) in [
        (
            crate::nft::NFPROTO_INET,
            crate::masquerade::nftables::TABLE,
            "inet",
        ),
        (crate::nft::NFPROTO_BRIDGE, crate::macspoof::TABLE, "bridge"),
    ] {
        if conn.has_table(family, table)? {
            let mut b = crate::nft::Batch::new();
            b.del_table(family, table);
            conn.commit(&b)?;
            done.push(format!("removed nftables table {label} {table}"));
        }
    }
    drop(conn);
    if crate::masquerade::find_binary("iptables-restore").is_some() {
        use crate::masquerade::Backend;
        crate::masquerade::iptables::Iptables.remove(&spec.network)?;
    }
    let pool_dir = crate::ipam::Store::network_dir(&data_dir, &spec.network);
    if pool_dir.exists() {
        fs::remove_dir_all(&pool_dir)
            .map_err(|e| Error::io(format!("cannot remove {}", pool_dir.display()), e))?;
        done.push(format!("removed the IPAM state {}", pool_dir.display()));
    }
    if let Some(br) = nl.link_by_name(&spec.bridge)?
        && br.kind.as_deref() == Some("bridge")
        && !nl.links()?.iter().any(|l| l.master == Some(br.index))
    {
        nl.del_link_by_index(br.index)?;
        done.push(format!("removed bridge {}", spec.bridge));
    }
    let lo = spec.bin_dir.join("loopback");
    if lo.exists() && is_older_pontoon(&lo) {
        fs::remove_file(&lo)
            .map_err(|e| Error::io(format!("cannot remove {}", lo.display()), e))?;
        done.push(format!("removed {}", lo.display()));
    }
    let bin = spec.bin_dir.join("pontoon");
    if bin.exists() {
        fs::remove_file(&bin)
            .map_err(|e| Error::io(format!("cannot remove {}", bin.display()), e))?;
        done.push(format!("removed {}", bin.display()));
    }
    Ok(done)
}

/// A `loopback` that is an earlier pontoon (it carries pontoon's about string).
fn is_older_pontoon(p: &Path) -> bool {
    fs::read(p)
        .map(|b| b.windows(PONTOON_MARK.len()).any(|w| w == PONTOON_MARK))
        .unwrap_or(false)
}

/// A byte string every pontoon binary contains.
pub const PONTOON_MARK: &[u8] = b"pontoon: a bridge + host-local CNI plugin for Kubernetes nodes";

/// The bytes of the running binary.
pub fn self_bytes() -> Result<Vec<u8>> {
    fs::read("/proc/self/exe").map_err(|e| Error::io("cannot read /proc/self/exe", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_cidrs() {
        let dual = json!({"metadata":{"name":"n1"},"spec":{"podCIDR":"10.244.1.0/24","podCIDRs":["10.244.1.0/24","fd00:10:244:1::/64"]}});
        assert_eq!(pod_cidrs_of_node(&dual).unwrap().len(), 2);
        let single = json!({"spec":{"podCIDR":"10.244.2.0/24"}});
        assert_eq!(
            pod_cidrs_of_node(&single).unwrap()[0].to_string(),
            "10.244.2.0/24"
        );
        let none = json!({"metadata":{"name":"n3"},"spec":{}});
        assert!(
            pod_cidrs_of_node(&none)
                .unwrap_err()
                .to_string()
                .contains("n3")
        );
    }
}

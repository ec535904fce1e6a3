//! Where the agent learns the cluster's nodes: one small trait, a static file (for tests and
//! non-Kubernetes users) and the Kubernetes API ([`super::kube`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::time::{Duration, SystemTime};

use ipnetwork::IpNetwork;
use serde_json::Value;

use super::Wake;
use crate::error::{Error, Result};

/// What the agent needs to know of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `status.addresses` of type InternalIP.
    pub internal_ips: Vec<IpAddr>,
    /// `spec.podCIDRs` (or `spec.podCIDR`).
    pub pod_cidrs: Vec<IpNetwork>,
    /// Its `pontoon.dev/` annotations (what its agent publishes, e.g. its VTEP MACs).
    pub annotations: BTreeMap<String, String>,
}

impl NodeInfo {
    /// Reads a Kubernetes Node object (as JSON).
    pub fn from_node_object(v: &Value) -> Option<NodeInfo> {
        let name = v["metadata"]["name"].as_str()?.to_string();
        let internal_ips = v["status"]["addresses"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["type"] == "InternalIP")
                    .filter_map(|x| x["address"].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let pod_cidrs = crate::install::pod_cidrs_of_node(v).unwrap_or_default();
        let annotations = v["metadata"]["annotations"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Some(NodeInfo {
            name,
            internal_ips,
            pod_cidrs,
            annotations,
        })
    }
}

/// The prefix of the annotations pontoon's agents publish on their Node.
pub const ANNOTATION_PREFIX: &str = "pontoon.dev/";

/// A source of the cluster's nodes.
pub trait NodeSource {
    /// The current nodes.
    fn nodes(&mut self) -> Result<Vec<NodeInfo>>;
    /// Sets (`Some`) or removes (`None`) annotations of Node `name` (this node's own);
    /// `false` when the source has nowhere to write them.
    fn publish(
        &mut self,
        name: &str,
        annotations: &BTreeMap<String, Option<String>>,
    ) -> Result<bool>;
    /// The cluster's pods, namespaces and NetworkPolicies, when this source watches them
    /// (`None`: it does not; an error: not completely listed yet).
    fn policy_cluster(&mut self) -> Option<Result<crate::policy::Cluster>> {
        None
    }
    /// From now on, sends [`Wake::Nodes`] on `wake` whenever the nodes change.
    fn subscribe(&mut self, wake: Sender<Wake>);
    fn describe(&self) -> String;
}

/// Nodes from a JSON file: a Kubernetes NodeList (`kubectl get nodes -o json`), re-read when
/// it changes.
pub struct StaticFile {
    pub path: PathBuf,
    mtime: Option<SystemTime>,
}

impl StaticFile {
    pub fn new(path: PathBuf) -> StaticFile {
        StaticFile { path, mtime: None }
    }

    fn modified(&self) -> Option<SystemTime> {
        std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()
    }
}

/// Parses a NodeList (or a bare list of Node objects).
pub fn parse_node_list(v: &Value) -> Result<Vec<NodeInfo>> {
    let items = v["items"]
        .as_array()
        .or_else(|| v.as_array())
        .ok_or_else(|| Error::config("a node list must be a NodeList ({\"items\": [...]})"))?;
    Ok(items
        .iter()
        .filter_map(NodeInfo::from_node_object)
        .collect())
}

impl NodeSource for StaticFile {
    fn nodes(&mut self) -> Result<Vec<NodeInfo>> {
        self.mtime = self.modified();
        let text = std::fs::read(&self.path)
            .map_err(|e| Error::io(format!("cannot read {}", self.path.display()), e))?;
        let v: Value = serde_json::from_slice(&text)
            .map_err(|e| Error::Decode(format!("{}: {e}", self.path.display())))?;
        parse_node_list(&v)
    }

    fn subscribe(&mut self, wake: Sender<Wake>) {
        // A stat a second: files have no change notification that survives renames simply.
        let path = self.path.clone();
        let mut seen = self.mtime;
        let _ = std::thread::Builder::new()
            .name("nodes-file".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let now = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                    if now != seen {
                        seen = now;
                        if wake.send(Wake::Nodes).is_err() {
                            return;
                        }
                    }
                }
            });
    }

    /// A nodes file is the operator's: it is never written. Peers read the annotations from
    /// it when it has them, and derive the VTEP MAC from the node name when it does not.
    fn publish(&mut self, _: &str, _: &BTreeMap<String, Option<String>>) -> Result<bool> {
        Ok(false)
    }

    fn describe(&self) -> String {
        format!("nodes from {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn node_list() {
        let v = json!({"kind": "NodeList", "items": [
            {"metadata": {"name": "a"}, "spec": {"podCIDRs": ["10.244.0.0/24", "fd00::/64"]},
             "status": {"addresses": [{"type": "Hostname", "address": "a"},
                                      {"type": "InternalIP", "address": "192.0.2.1"},
                                      {"type": "InternalIP", "address": "2001:db8::1"}]}},
            {"metadata": {"name": "b"}, "spec": {}, "status": {}}
        ]});
        let n = parse_node_list(&v).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].internal_ips.len(), 2);
        assert_eq!(n[0].pod_cidrs.len(), 2);
        assert!(n[1].pod_cidrs.is_empty());
    }
}

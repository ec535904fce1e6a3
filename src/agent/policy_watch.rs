//! What NetworkPolicy enforcement needs from the API: Pods (all namespaces: targets on this
//! node and peers everywhere, keeping only namespace, labels, IPs, node and named ports),
//! Namespaces (their labels) and NetworkPolicies, each with a `kube` watcher on the node
//! watch's runtime, into one [`Cluster`] the agent compiles on every change.

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::Value;

use crate::policy::{self, Cluster};

#[derive(Default)]
pub struct State {
    pub cluster: Cluster,
    /// Each kind's initial list is complete (pods, namespaces, policies).
    pub synced: [bool; 3],
    pub last_error: Option<String>,
    pub wake: Option<std::sync::mpsc::Sender<super::Wake>>,
}

pub type Shared = Arc<Mutex<State>>;

fn key(v: &Value) -> (String, String) {
    (
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// Applies (`present`) or removes one object of kind `k` (0 pods, 1 namespaces, 2 policies).
fn apply(st: &mut State, k: usize, v: &Value, present: bool) {
    let c = &mut st.cluster;
    let id = key(v);
    match k {
        0 => match present.then(|| policy::Pod::from_json(v)).flatten() {
            Some(p) => {
                c.pods.insert(id, p);
            }
            None => {
                c.pods.remove(&id);
            }
        },
        1 => {
            if present {
                let labels = v["metadata"]["labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().into()))
                            .collect()
                    })
                    .unwrap_or_default();
                c.namespaces.insert(id.1, labels);
            } else {
                c.namespaces.remove(&id.1);
            }
        }
        _ => {
            c.policies.remove(&id);
            if present {
                match policy::Policy::from_json(v) {
                    Ok(p) => {
                        c.policies.insert(id, p);
                    }
                    // The API server validates policies: this is a field pontoon does not
                    // know. The policy is not enforced (its pods stay as they were).
                    Err(e) => log::warn!("NetworkPolicy {}/{} is not enforced: {e}", id.0, id.1),
                }
            }
        }
    }
}

fn clear(st: &mut State, k: usize) {
    match k {
        0 => st.cluster.pods.clear(),
        1 => st.cluster.namespaces.clear(),
        _ => st.cluster.policies.clear(),
    }
}

async fn watch_kind<K>(api: Api<K>, k: usize, shared: Shared)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K: Send + Sync + 'static,
    K::DynamicType: Default,
{
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut pending: Option<Vec<Value>> = None;
    while let Some(ev) = events.next().await {
        let mut st = shared.lock().unwrap();
        let changed = match ev {
            Ok(watcher::Event::Init) => {
                pending = Some(vec![]);
                false
            }
            Ok(watcher::Event::InitApply(o)) => {
                if let (Some(p), Ok(v)) = (pending.as_mut(), serde_json::to_value(&o)) {
                    p.push(v);
                }
                false
            }
            Ok(watcher::Event::InitDone) => {
                clear(&mut st, k);
                for v in pending.take().unwrap_or_default() {
                    apply(&mut st, k, &v, true);
                }
                st.synced[k] = true;
                st.last_error = None;
                true
            }
            Ok(watcher::Event::Apply(o)) => {
                if let Ok(v) = serde_json::to_value(&o) {
                    log::debug!(
                        "{} {:?} changed",
                        ["pod", "namespace", "networkpolicy"][k],
                        key(&v)
                    );
                    apply(&mut st, k, &v, true);
                }
                true
            }
            Ok(watcher::Event::Delete(o)) => {
                if let Ok(v) = serde_json::to_value(&o) {
                    apply(&mut st, k, &v, false);
                }
                true
            }
            Err(e) => {
                let what = ["pods", "namespaces", "networkpolicies"][k];
                log::warn!("{what} watch: {e}");
                st.last_error = Some(format!("{what} watch: {e}"));
                false
            }
        };
        if changed && let Some(w) = &st.wake {
            let _ = w.send(super::Wake::Policy);
        }
    }
}

/// Starts the three watchers on the current runtime.
pub fn spawn(client: Client, shared: Shared) {
    tokio::spawn(watch_kind(
        Api::<Pod>::all(client.clone()),
        0,
        Arc::clone(&shared),
    ));
    tokio::spawn(watch_kind(
        Api::<Namespace>::all(client.clone()),
        1,
        Arc::clone(&shared),
    ));
    tokio::spawn(watch_kind(Api::<NetworkPolicy>::all(client), 2, shared));
}

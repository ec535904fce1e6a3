//! Nodes from the Kubernetes API: a `kube` watcher (list + watch, re-listing after errors with
//! backoff) on a background thread with its own single-threaded tokio runtime, feeding a
//! snapshot the synchronous agent loop reads. In-cluster config, else a kubeconfig.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};

use super::nodes::{NodeInfo, NodeSource};
use crate::error::{Error, Result};

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, NodeInfo>,
    /// Nodes of a re-list in progress, swapped in when it completes.
    pending: Option<BTreeMap<String, NodeInfo>>,
    synced: bool,
    last_error: Option<String>,
    generation: u64,
    /// Told of every change, once the agent subscribed.
    wake: Option<std::sync::mpsc::Sender<super::Wake>>,
    /// The API client, once built (for this node's annotations).
    client: Option<Client>,
}

impl State {
    fn changed(&mut self) {
        self.generation += 1;
        if let Some(w) = &self.wake {
            let _ = w.send(super::Wake::Nodes);
        }
    }
}

pub struct KubeNodes {
    shared: Arc<(Mutex<State>, Condvar)>,
    /// Pods, namespaces and policies, when NetworkPolicy is enforced.
    policy: Option<super::policy_watch::Shared>,
    seen: u64,
    describe: String,
    /// The watch thread's runtime, which also runs this node's patches.
    runtime: tokio::runtime::Handle,
}

fn info(node: &Node) -> Option<NodeInfo> {
    NodeInfo::from_node_object(&serde_json::to_value(node).ok()?)
}

async fn client(kubeconfig: Option<PathBuf>) -> std::result::Result<Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path)
                .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => Config::infer()
            .await
            .map_err(|e| format!("no in-cluster config or kubeconfig: {e}"))?,
    };
    Client::try_from(config).map_err(|e| format!("cannot build the Kubernetes client: {e}"))
}

async fn watch(
    kubeconfig: Option<PathBuf>,
    shared: Arc<(Mutex<State>, Condvar)>,
    policy: Option<super::policy_watch::Shared>,
) {
    let set_error = |e: String| {
        let (m, cv) = &*shared;
        let mut st = m.lock().unwrap();
        log::warn!("node watch: {e}");
        st.last_error = Some(e);
        cv.notify_all();
    };
    let client = loop {
        match client(kubeconfig.clone()).await {
            Ok(c) => break c,
            Err(e) => {
                set_error(e);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    shared.0.lock().unwrap().client = Some(client.clone());
    if let Some(p) = policy {
        super::policy_watch::spawn(client.clone(), p);
    }
    let api: Api<Node> = Api::all(client);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = events.next().await {
        let (m, cv) = &*shared;
        match ev {
            Ok(ev) => {
                let mut st = m.lock().unwrap();
                match ev {
                    watcher::Event::Init => st.pending = Some(BTreeMap::new()),
                    watcher::Event::InitApply(n) => {
                        if let (Some(p), Some(i)) = (st.pending.as_mut(), info(&n)) {
                            p.insert(i.name.clone(), i);
                        }
                    }
                    watcher::Event::InitDone => {
                        if let Some(p) = st.pending.take() {
                            st.nodes = p;
                        }
                        st.synced = true;
                        st.last_error = None;
                        st.changed();
                    }
                    watcher::Event::Apply(n) => {
                        if let Some(i) = info(&n)
                            && st.nodes.get(&i.name) != Some(&i)
                        {
                            st.nodes.insert(i.name.clone(), i);
                            st.changed();
                        }
                    }
                    watcher::Event::Delete(n) => {
                        if let Some(name) = n.metadata.name.as_ref()
                            && st.nodes.remove(name).is_some()
                        {
                            st.changed();
                        }
                    }
                }
                cv.notify_all();
            }
            Err(e) => set_error(format!("{e}")),
        }
    }
}

impl KubeNodes {
    /// Starts watching Nodes in the background (and Pods, Namespaces and NetworkPolicies with
    /// `network_policy`).
    pub fn start(kubeconfig: Option<PathBuf>, network_policy: bool) -> Result<KubeNodes> {
        let describe = match &kubeconfig {
            Some(p) => format!("Kubernetes nodes via {}", p.display()),
            None => "Kubernetes nodes (in-cluster config or default kubeconfig)".into(),
        };
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let bg = Arc::clone(&shared);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot start the watch runtime", e))?;
        let runtime = rt.handle().clone();
        let policy = network_policy.then(super::policy_watch::Shared::default);
        let pbg = policy.clone();
        std::thread::Builder::new()
            .name("node-watch".into())
            .spawn(move || rt.block_on(watch(kubeconfig, bg, pbg)))
            .map_err(|e| Error::io("cannot start the node watch thread", e))?;
        Ok(KubeNodes {
            shared,
            policy,
            seen: 0,
            describe,
            runtime,
        })
    }
}

impl NodeSource for KubeNodes {
    fn nodes(&mut self) -> Result<Vec<NodeInfo>> {
        let (m, cv) = &*self.shared;
        let mut st = m.lock().unwrap();
        // The first reconcile waits (bounded) for the initial list.
        if !st.synced {
            st = cv
                .wait_timeout_while(st, Duration::from_secs(10), |s| !s.synced)
                .unwrap()
                .0;
        }
        if !st.synced {
            return Err(Error::TryAgainLater(format!(
                "no node list from the API server yet{}",
                st.last_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )));
        }
        self.seen = st.generation;
        Ok(st.nodes.values().cloned().collect())
    }

    fn policy_cluster(&mut self) -> Option<Result<crate::policy::Cluster>> {
        let st = self.policy.as_ref()?.lock().unwrap();
        if st.synced.iter().all(|s| *s) {
            return Some(Ok(st.cluster.clone()));
        }
        Some(Err(Error::TryAgainLater(format!(
            "no complete list of pods, namespaces and network policies yet{}",
            st.last_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ))))
    }

    fn subscribe(&mut self, wake: std::sync::mpsc::Sender<super::Wake>) {
        if let Some(p) = &self.policy {
            p.lock().unwrap().wake = Some(wake.clone());
        }
        let (m, _) = &*self.shared;
        let mut st = m.lock().unwrap();
        if st.generation != self.seen {
            let _ = wake.send(super::Wake::Nodes);
        }
        st.wake = Some(wake);
    }

    /// A JSON merge patch of the Node's annotations (`null` removes one) through the status
    /// subresource, as flannel does: the agent's ClusterRole grants `patch` on `nodes/status`
    /// only, which cannot touch a Node's spec (pod CIDRs, taints, unschedulable).
    fn publish(
        &mut self,
        name: &str,
        annotations: &BTreeMap<String, Option<String>>,
    ) -> Result<bool> {
        let client = self
            .shared
            .0
            .lock()
            .unwrap()
            .client
            .clone()
            .ok_or_else(|| Error::TryAgainLater("not connected to the API server yet".into()))?;
        let api: Api<Node> = Api::all(client);
        let patch = serde_json::json!({"metadata": {"annotations": annotations}});
        let node = name.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let r = api
                .patch_status(
                    &node,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
            let _ = tx.send(r);
        });
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(Ok(())) => Ok(true),
            Ok(Err(e)) => Err(Error::NotAvailable(format!(
                "cannot annotate Node {name}: {e} (the agent's ClusterRole must allow patch on \
                 nodes/status)"
            ))),
            Err(_) => Err(Error::TryAgainLater(format!(
                "annotating Node {name} took more than 15 s"
            ))),
        }
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

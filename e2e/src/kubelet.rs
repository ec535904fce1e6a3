//! What kubelet does with the DaemonSet's pod, done here over CRI: the pod template is read from
//! `deploy/pontoon.yaml` (no copy of it in the tests), and turned into RunPodSandbox and
//! CreateContainer requests as kubelet would: host networking, the command, env (the downward
//! API's `spec.nodeName`, the in-cluster `KUBERNETES_SERVICE_*`), the service-account token
//! where kubelet mounts it, every hostPath volume (mapped under the node's root directory), the
//! securityContext as written (capabilities, non-privileged so containerd's read-only
//! `/proc/sys` and masked paths apply, seccomp, read-only root filesystem, no privilege
//! escalation) and the memory limit.

use std::path::{Path, PathBuf};

use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    SecurityProfile, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};

use crate::Cri;

/// kubelet's masked and read-only paths for a non-privileged container (the default
/// procMount).
const MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The DaemonSet of `deploy/pontoon.yaml`.
pub fn daemonset(repo: &Path) -> DaemonSet {
    let text =
        std::fs::read_to_string(repo.join("deploy/pontoon.yaml")).expect("deploy/pontoon.yaml");
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["kind"] == "DaemonSet" {
            return serde_json::from_value(v).expect("a valid DaemonSet");
        }
    }
    panic!("deploy/pontoon.yaml has no DaemonSet");
}

/// The node the pod runs on, as kubelet knows it.
pub struct Node {
    pub name: String,
    /// Where the node's hostPath volumes live (a temp dir standing in for `/`).
    pub root: PathBuf,
    /// The API server as the in-cluster environment names it.
    pub api_host: String,
    pub api_port: u16,
    /// The service-account volume: token, ca.crt, namespace.
    pub service_account: PathBuf,
}

/// How a test changes what the manifest says (the manifest itself is never copied).
#[derive(Default, Clone)]
pub struct Overrides {
    pub image: Option<String>,
    pub command: Option<Vec<String>>,
    /// Replaces the capabilities to add (e.g. none, to show what NET_ADMIN is for).
    pub add_capabilities: Option<Vec<String>>,
    pub extra_env: Vec<(String, String)>,
}

/// A running DaemonSet pod: its sandbox and container.
pub struct AgentPod {
    pub sandbox: String,
    pub container: String,
}

fn pod_spec(ds: &DaemonSet) -> PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("the DaemonSet has a pod template")
}

fn agent_container(spec: &PodSpec) -> Container {
    spec.containers[0].clone()
}

/// The sandbox kubelet asks for: the DaemonSet pod on the node's network.
pub fn sandbox_config(ds: &DaemonSet, node: &Node, attempt: u32) -> PodSandboxConfig {
    let spec = pod_spec(ds);
    let name = format!("{}-{}", ds.metadata.name.clone().unwrap(), node.name);
    let ns = ds
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    // NamespaceMode: POD = 0, CONTAINER = 1, NODE = 2.
    let network = if spec.host_network == Some(true) {
        2
    } else {
        0
    };
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.clone(),
            uid: format!("uid-{name}-{attempt}"),
            namespace: ns,
            attempt,
        }),
        // A host-network pod shares the node's UTS namespace: kubelet sends no hostname.
        hostname: if network == 2 {
            String::new()
        } else {
            node.name.clone()
        },
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network,
                    pid: 1,
                    ipc: 0,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The container kubelet creates from the pod template.
pub fn container_config(
    ds: &DaemonSet,
    node: &Node,
    o: &Overrides,
    attempt: u32,
) -> ContainerConfig {
    let spec = pod_spec(ds);
    let c = agent_container(&spec);
    let mut envs: Vec<KeyValue> = Vec::new();
    for e in c.env.clone().unwrap_or_default() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                let field = from
                    .field_ref
                    .as_ref()
                    .map(|f| f.field_path.clone())
                    .expect("only fieldRef env sources are used");
                assert_eq!(
                    field, "spec.nodeName",
                    "unsupported downward API field {field}"
                );
                node.name.clone()
            }
            (None, None) => String::new(),
        };
        envs.push(KeyValue { key: e.name, value });
    }
    // What kubelet injects for the `kubernetes` Service.
    for (k, v) in [
        ("KUBERNETES_SERVICE_HOST", node.api_host.clone()),
        ("KUBERNETES_SERVICE_PORT", node.api_port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS", node.api_port.to_string()),
        (
            "KUBERNETES_PORT",
            format!("tcp://{}:{}", node.api_host, node.api_port),
        ),
    ] {
        envs.push(KeyValue {
            key: k.into(),
            value: v,
        });
    }
    for (k, v) in &o.extra_env {
        envs.retain(|e| &e.key != k);
        envs.push(KeyValue {
            key: k.clone(),
            value: v.clone(),
        });
    }
    let volumes = spec.volumes.clone().unwrap_or_default();
    let mut mounts = vec![Mount {
        container_path: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
        host_path: node.service_account.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    for m in c.volume_mounts.clone().unwrap_or_default() {
        let v = volumes
            .iter()
            .find(|v| v.name == m.name)
            .unwrap_or_else(|| panic!("volumeMount {} has no volume", m.name));
        let hp = v
            .host_path
            .as_ref()
            .unwrap_or_else(|| panic!("volume {} is not a hostPath", m.name));
        let host = node.root.join(hp.path.trim_start_matches('/'));
        match hp.type_.as_deref() {
            Some("FileOrCreate") => {
                std::fs::create_dir_all(host.parent().unwrap()).unwrap();
                if !host.exists() {
                    std::fs::write(&host, "").unwrap();
                }
            }
            Some("DirectoryOrCreate") | None => std::fs::create_dir_all(&host).unwrap(),
            Some(t) => panic!("hostPath type {t} is not handled here"),
        }
        mounts.push(Mount {
            container_path: m.mount_path.clone(),
            host_path: host.display().to_string(),
            readonly: m.read_only == Some(true),
            ..Default::default()
        });
    }
    let sc = c.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged == Some(true);
    let caps = sc.capabilities.clone().unwrap_or_default();
    let seccomp = sc.seccomp_profile.as_ref().map(|p| SecurityProfile {
        // RuntimeDefault = 0, Unconfined = 1, Localhost = 2.
        profile_type: match p.type_.as_str() {
            "RuntimeDefault" => 0,
            "Unconfined" => 1,
            _ => 2,
        },
        localhost_ref: p.localhost_profile.clone().unwrap_or_default(),
    });
    let memory = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .map(|q| parse_quantity(&q.0))
        .unwrap_or(0);
    let (cmd, args) = match &o.command {
        Some(c) => (c.clone(), vec![]),
        None => (
            c.command.clone().unwrap_or_default(),
            c.args.clone().unwrap_or_default(),
        ),
    };
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: c.name.clone(),
            attempt,
        }),
        image: Some(ImageSpec {
            image: o.image.clone().or(c.image.clone()).unwrap(),
            ..Default::default()
        }),
        command: cmd,
        args,
        envs,
        mounts,
        log_path: format!("{}-{attempt}.log", c.name),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: memory,
                ..Default::default()
            }),
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    add_capabilities: o
                        .add_capabilities
                        .clone()
                        .unwrap_or_else(|| caps.add.clone().unwrap_or_default()),
                    drop_capabilities: caps.drop.clone().unwrap_or_default(),
                    ..Default::default()
                }),
                privileged,
                readonly_rootfs: sc.read_only_root_filesystem == Some(true),
                no_new_privs: sc.allow_privilege_escalation == Some(false),
                masked_paths: if privileged {
                    vec![]
                } else {
                    MASKED.iter().map(|s| s.to_string()).collect()
                },
                readonly_paths: if privileged {
                    vec![]
                } else {
                    READONLY.iter().map(|s| s.to_string()).collect()
                },
                seccomp,
                namespace_options: Some(NamespaceOption {
                    network: 2,
                    pid: 1,
                    ipc: 0,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// `100Mi`, `1Gi`, `50M`, bytes.
fn parse_quantity(q: &str) -> i64 {
    let (num, mult) = [
        ("Ki", 1i64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ]
    .iter()
    .find_map(|(s, m)| q.strip_suffix(s).map(|n| (n, *m)))
    .unwrap_or((q, 1));
    num.parse::<i64>().unwrap_or(0) * mult
}

/// Runs the DaemonSet's pod on the node, as kubelet does when it is scheduled there.
pub async fn run(
    cri: &mut Cri,
    ds: &DaemonSet,
    node: &Node,
    o: &Overrides,
    attempt: u32,
) -> Result<AgentPod, String> {
    let sandbox_config = sandbox_config(ds, node, attempt);
    let sandbox = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map_err(|e| format!("RunPodSandbox: {}", e.message()))?
        .into_inner()
        .pod_sandbox_id;
    let container = start_container(cri, &sandbox, &sandbox_config, ds, node, o, attempt).await?;
    Ok(AgentPod { sandbox, container })
}

/// Creates and starts the agent container in an existing sandbox (kubelet's restart).
pub async fn start_container(
    cri: &mut Cri,
    sandbox: &str,
    sandbox_config: &PodSandboxConfig,
    ds: &DaemonSet,
    node: &Node,
    o: &Overrides,
    attempt: u32,
) -> Result<String, String> {
    let container = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sandbox.into(),
            config: Some(container_config(ds, node, o, attempt)),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await
        .map_err(|e| format!("CreateContainer: {}", e.message()))?
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest {
        container_id: container.clone(),
    })
    .await
    .map_err(|e| format!("StartContainer: {}", e.message()))?;
    Ok(container)
}

/// Stops and removes the pod (a DaemonSet pod deleted by an update or an uninstall).
pub async fn remove(cri: &mut Cri, pod: &AgentPod) -> Result<(), String> {
    let _ = cri
        .stop_container(StopContainerRequest {
            container_id: pod.container.clone(),
            timeout: 10,
        })
        .await;
    let _ = cri
        .remove_container(RemoveContainerRequest {
            container_id: pod.container.clone(),
        })
        .await;
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.sandbox.clone(),
    })
    .await
    .map_err(|e| format!("StopPodSandbox: {}", e.message()))?;
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.sandbox.clone(),
    })
    .await
    .map_err(|e| format!("RemovePodSandbox: {}", e.message()))?;
    Ok(())
}

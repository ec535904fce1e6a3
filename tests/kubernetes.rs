//! What a node of a Kubernetes cluster gets: the installer (run for real in a throwaway
//! sandbox), the loopback plugin, and the DaemonSet manifest checked against the API types.

mod common;

use common::*;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::{Value, json};

fn node_object(name: &str, cidrs: &[&str]) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
           "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}})
}

fn install(node: &Node, extra: &[&str]) -> std::process::Output {
    let bin = node.dir.join("host/opt/cni/bin");
    let conf = node.dir.join("host/etc/cni/net.d");
    let mut args = vec![
        "install".to_string(),
        "--cni-bin-dir".into(),
        bin.display().to_string(),
        "--cni-conf-dir".into(),
        conf.display().to_string(),
        "--data-dir".into(),
        node.data_dir().display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    node.pontoon(&refs)
}

fn stdout(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_installer_places_binary_loopback_and_conflist_atomically_and_idempotently() {
    if !require_root() {
        return;
    }
    for (tag, cidrs) in [
        ("v4", vec!["10.244.1.0/24"]),
        ("ds", vec!["10.244.1.0/24", "fd00:10:244:1::/64"]),
    ] {
        let mut node = Node::new(&format!("inst{tag}"));
        let nj = node.dir.join("node.json");
        std::fs::write(&nj, node_object("n1", &cidrs).to_string()).unwrap();
        let out = stdout(&install(
            &node,
            &[
                "--node-json",
                nj.to_str().unwrap(),
                "--no-masquerade",
                "10.244.0.0/16",
            ],
        ));
        assert!(
            out.contains("pontoon: installed") && out.contains("loopback: installed"),
            "{out}"
        );
        let bin = node.dir.join("host/opt/cni/bin");
        let me = std::fs::read(BIN).unwrap();
        assert_eq!(std::fs::read(bin.join("pontoon")).unwrap(), me);
        assert_eq!(std::fs::read(bin.join("loopback")).unwrap(), me);
        let confdir = node.dir.join("host/etc/cni/net.d");
        let names: Vec<String> = std::fs::read_dir(&confdir)
            .unwrap()
            .chain(std::fs::read_dir(&bin).unwrap())
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.ends_with(".tmp")),
            "temporaries left: {names:?}"
        );
        let list: Value =
            serde_json::from_slice(&std::fs::read(confdir.join("10-pontoon.conflist")).unwrap())
                .unwrap();
        assert_eq!(list["cniVersion"], "1.0.0");
        assert!(
            list["cniVersions"]
                .as_array()
                .unwrap()
                .contains(&json!("1.1.0"))
        );
        let ranges = &list["plugins"][0]["ipam"]["ranges"];
        assert_eq!(ranges.as_array().unwrap().len(), cidrs.len(), "{list}");
        // Idempotent: a second run changes nothing.
        let again = stdout(&install(
            &node,
            &[
                "--node-json",
                nj.to_str().unwrap(),
                "--no-masquerade",
                "10.244.0.0/16",
            ],
        ));
        assert_eq!(again.matches("already in place").count(), 4, "{again}");
        // The conflist it wrote works: ADD with the installed binary, as a runtime would.
        let mut plugin = list["plugins"][0].clone();
        plugin["name"] = list["name"].clone();
        plugin["cniVersion"] = list["cniVersion"].clone();
        let pod = node.pod("p");
        let r = node.cni("ADD", "c1", &pod, "eth0", &plugin).ok();
        assert!(result_ips(&r)[0].starts_with("10.244.1."), "{r}");
        if cidrs.len() == 2 {
            assert!(result_ips(&r)[1].starts_with("fd00:10:244:1:"), "{r}");
        }
        // The masquerade rules the installer set up are exactly the ones ADD checks for.
        let mut chk = plugin.clone();
        chk["prevResult"] = r;
        node.cni("CHECK", "c1", &pod, "eth0", &chk).ok();
        assert!(
            node.node_ok(&["nft", "list", "table", "inet", "pontoon"])
                .contains("10.244.0.0/16")
        );
    }
}

#[test]
fn the_installer_leaves_a_foreign_loopback_alone_and_needs_pod_cidrs() {
    if !require_root() {
        return;
    }
    let node = Node::new("instlo");
    let bin = node.dir.join("host/opt/cni/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/usr/lib/cni/loopback", bin.join("loopback")).unwrap();
    let before = std::fs::read(bin.join("loopback")).unwrap();
    stdout(&install(&node, &["--pod-cidr", "10.250.0.0/24"]));
    assert_eq!(
        std::fs::read(bin.join("loopback")).unwrap(),
        before,
        "replaced someone else's loopback"
    );
    let o = install(&node, &["--node-json", "/nonexistent"]);
    assert!(!o.status.success());
    let node_without = node.dir.join("bare.json");
    std::fs::write(
        &node_without,
        json!({"metadata": {"name": "n9"}, "spec": {}}).to_string(),
    )
    .unwrap();
    let o = node.pontoon(&[
        "install",
        "--cni-bin-dir",
        bin.to_str().unwrap(),
        "--cni-conf-dir",
        node.dir.join("c").to_str().unwrap(),
        "--node-json",
        node_without.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("podCIDRs"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn loopback_mode_brings_lo_up_as_containerd_expects() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("lo");
    let dir = node.dir.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(BIN, dir.join("loopback")).unwrap();
    let lo = dir.join("loopback");
    let ns = node.pod("p");
    assert!(
        !node
            .in_pod_ok(&ns, &["ip", "link", "show", "lo"])
            .contains(",UP")
    );
    let conf = json!({"cniVersion": "0.3.1", "name": "cni-loopback", "type": "loopback"});
    let run = |cmd: &str, netns: &str| {
        let env = [
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "lo"),
        ];
        cni_exec(&node.name, &lo, cmd, &env, conf.to_string().as_bytes())
    };
    let r = run("ADD", &ns).ok();
    assert_eq!(r["cniVersion"], "0.3.1");
    assert_eq!(r["interfaces"][0]["name"], "lo");
    assert_eq!(r["ips"][0]["address"], "127.0.0.1/8");
    assert_eq!(r["ips"][0]["version"], "4");
    assert!(
        node.in_pod_ok(&ns, &["ip", "link", "show", "lo"])
            .contains(",UP")
    );
    assert!(
        node.in_pod(&ns, &["ping", "-c1", "-W1", "127.0.0.1"])
            .status
            .success()
    );
    run("DEL", &ns).ok();
    run("DEL", "").ok(); // with an empty netns
    assert!(run("VERSION", "").stdout.contains("0.3.1"));
}

/// The manifests deserialize strictly into the Kubernetes API types and carry what a CNI
/// DaemonSet needs.
#[test]
fn the_manifest_is_a_valid_daemonset_with_what_it_needs_and_no_more() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/pontoon.yaml"))
        .unwrap();
    let mut kinds = vec![];
    let mut ds: Option<DaemonSet> = None;
    let mut role: Option<ClusterRole> = None;
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        let kind = v["kind"].as_str().unwrap().to_string();
        // Unknown fields are typos: the typed structs ignore them, so compare round trips.
        let round = |v: &Value, typed: Value| {
            assert_eq!(
                strip_nulls(typed),
                strip_nulls(v.clone()),
                "{kind}: a field is misspelled or misplaced"
            );
        };
        match kind.as_str() {
            "DaemonSet" => {
                let d: DaemonSet = serde_json::from_value(v.clone()).unwrap();
                round(&v, serde_json::to_value(&d).unwrap());
                ds = Some(d);
            }
            "ClusterRole" => {
                let r: ClusterRole = serde_json::from_value(v.clone()).unwrap();
                round(&v, serde_json::to_value(&r).unwrap());
                role = Some(r);
            }
            "ClusterRoleBinding" => {
                let b: ClusterRoleBinding = serde_json::from_value(v.clone()).unwrap();
                round(&v, serde_json::to_value(&b).unwrap());
                assert_eq!(b.subjects.unwrap()[0].name, "pontoon");
            }
            "ServiceAccount" => {
                let s: ServiceAccount = serde_json::from_value(v.clone()).unwrap();
                round(&v, serde_json::to_value(&s).unwrap());
            }
            other => panic!("unexpected kind {other}"),
        }
        kinds.push(kind);
    }
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet"
        ]
    );
    let rules = role.unwrap().rules.unwrap();
    assert_eq!(rules[0].resources.as_ref().unwrap(), &["nodes"]);
    assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
    // Its own VTEP MACs, through the status subresource only: no write to any Node's spec.
    assert_eq!(rules[1].resources.as_ref().unwrap(), &["nodes/status"]);
    assert_eq!(rules[1].verbs, ["patch"]);
    // NetworkPolicy: read-only access to what policies select.
    assert_eq!(
        rules[2].resources.as_ref().unwrap(),
        &["pods", "namespaces"]
    );
    assert_eq!(rules[2].verbs, ["get", "list", "watch"]);
    assert_eq!(
        rules[3].api_groups.as_ref().unwrap(),
        &["networking.k8s.io"]
    );
    assert_eq!(rules[3].resources.as_ref().unwrap(), &["networkpolicies"]);
    assert_eq!(rules[3].verbs, ["get", "list", "watch"]);
    assert_eq!(rules.len(), 4);
    let ds = ds.unwrap();
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let spec = ds.spec.unwrap();
    assert_eq!(
        spec.update_strategy.unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("pontoon"));
    let tol = pod.tolerations.unwrap();
    assert!(
        tol.iter().any(|t| t.operator.as_deref() == Some("Exists")
            && t.key.is_none()
            && t.effect.is_none())
    );
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.clone().unwrap(), ["ALL"]);
    assert_eq!(
        caps.add.clone().unwrap(),
        ["NET_ADMIN"],
        "only the capabilities it needs (the containerd tier shows NET_ADMIN is needed)"
    );
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    // The tag is the crate version, never `latest`.
    assert_eq!(
        c.image.as_deref(),
        Some(concat!(
            "ghcr.io/pontoon-cni/pontoon:",
            env!("CARGO_PKG_VERSION")
        ))
    );
    assert!(c.resources.as_ref().unwrap().requests.is_some());
    let env: Vec<&str> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert!(env.contains(&"NODE_NAME") && env.contains(&"NO_MASQUERADE_CIDRS"));
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
    let host_paths: Vec<String> = pod
        .volumes
        .unwrap()
        .iter()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
        .collect();
    let mut want = vec!["/etc/cni/net.d", "/opt/cni/bin", "/var/lib/cni"];
    let mut have: Vec<&str> = host_paths.iter().map(String::as_str).collect();
    have.sort();
    want.sort();
    assert_eq!(have, want, "exactly the hostPaths it uses");
    // The agent's flags exist: the command line the manifest runs parses.
    let cmd = c.command.clone().unwrap();
    assert_eq!(cmd, ["/pontoon", "agent"]);
    let help = std::process::Command::new(BIN)
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    // Every variable the manifest sets is one the agent reads.
    for var in &env {
        assert!(help.contains(var), "the agent does not read {var}");
    }
}

fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

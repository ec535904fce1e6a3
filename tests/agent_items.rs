//! The agent keeps going item by item: nodes it cannot route to, foreign routes and a
//! read-only /proc/sys are reported (readiness, once in the log) while everything else is
//! reconciled; liveness stays up; /metrics tells the pool's real state and the CNI
//! operations.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn node_json(name: &str, addr: &str, cidr: &str) -> Value {
    json!({"metadata": {"name": name}, "spec": {"podCIDRs": [cidr]},
           "status": {"addresses": [{"type": "InternalIP", "address": addr}]}})
}

fn write_nodes(path: &Path, nodes: &[Value]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        json!({"kind": "NodeList", "items": nodes}).to_string(),
    )
    .unwrap();
    std::fs::rename(tmp, path).unwrap();
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node whose uplink (a veth with its peer in the node) is on 192.0.2.0/24, its agent reading `nodes`.
fn node_with_agent(node: &Node, nodes: &Path, wrap: &[&str]) -> Agent {
    node.node_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    node.node_ok(&["ip", "addr", "add", "192.0.2.11/24", "dev", "eth0"]);
    node.node_ok(&["ip", "link", "set", "eth0p", "up"]);
    node.node_ok(&["ip", "link", "set", "eth0", "up"]);
    let host = node.dir.join("host");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node.name])
        .args(wrap)
        .args([BIN, "agent", "--node-name", "n1"]);
    cmd.arg("--nodes-file")
        .arg(nodes)
        .arg("--cni-bin-dir")
        .arg(host.join("bin"))
        .arg("--cni-conf-dir")
        .arg(host.join("net.d"))
        .arg("--data-dir")
        .arg(node.data_dir())
        .args(["--interval", "1", "--listen", "127.0.0.1:9765"])
        // Off-link peers stay unroutable (a problem to report) rather than going over the
        // overlay, which tests/overlay.rs covers.
        .args(["--routing", "direct"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Agent(cmd.spawn().unwrap())
}

fn routes(node: &Node) -> String {
    node.node_ok(&["ip", "route", "show", "proto", "201"])
}

#[test]
fn one_bad_node_holds_back_nothing_and_foreign_routes_are_left_alone() {
    if !require_root() {
        return;
    }
    let node = Node::new("items");
    let nodes = node.dir.join("nodes.json");
    // Two good peers, and two whose InternalIP is on no network of this node: one sorting
    // before them in pod-CIDR order, one after.
    let mut list = vec![
        node_json("n1", "192.0.2.11", "10.244.1.0/24"),
        node_json("bad0", "198.51.100.7", "10.244.0.0/24"),
        node_json("n2", "192.0.2.12", "10.244.2.0/24"),
        node_json("n3", "192.0.2.13", "10.244.3.0/24"),
        node_json("bad9", "203.0.113.9", "10.244.9.0/24"),
    ];
    write_nodes(&nodes, &list);
    let _agent = node_with_agent(&node, &nodes, &[]);
    wait_for("routes to both good nodes", || {
        let r = routes(&node);
        r.contains("10.244.2.0/24 via 192.0.2.12") && r.contains("10.244.3.0/24 via 192.0.2.13")
    });
    assert!(!routes(&node).contains("10.244.0.0") && !routes(&node).contains("10.244.9.0"));
    assert_eq!(
        http_get(&node.name, 9765, "/healthz").0,
        200,
        "liveness stays up"
    );
    let (code, body) = http_get(&node.name, 9765, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("bad0") && body.contains("198.51.100.7"),
        "{body}"
    );
    assert!(
        body.contains("bad9") && body.contains("203.0.113.9"),
        "{body}"
    );

    // A node leaves while the bad ones are still there: its route goes.
    list.retain(|n| n["metadata"]["name"] != "n3");
    write_nodes(&nodes, &list);
    wait_for("the departed node's route to go", || {
        !routes(&node).contains("10.244.3.0/24")
    });

    // An operator's own route to a new node's pod CIDR is left alone, and reported.
    node.node_ok(&[
        "ip",
        "route",
        "add",
        "10.244.4.0/24",
        "via",
        "192.0.2.100",
        "proto",
        "static",
    ]);
    list.push(node_json("n4", "192.0.2.14", "10.244.4.0/24"));
    write_nodes(&nodes, &list);
    wait_for("the conflict to be reported", || {
        http_get(&node.name, 9765, "/readyz")
            .1
            .contains("10.244.4.0/24")
    });
    std::thread::sleep(Duration::from_millis(1500));
    let all = node.node_ok(&["ip", "route", "show", "10.244.4.0/24"]);
    assert!(
        all.contains("via 192.0.2.100") && all.contains("proto static"),
        "{all}"
    );
    assert!(
        !routes(&node).contains("10.244.4.0/24"),
        "{}",
        routes(&node)
    );
    // Once the bad nodes and the conflict are gone, the node is ready.
    node.node_ok(&[
        "ip",
        "route",
        "del",
        "10.244.4.0/24",
        "via",
        "192.0.2.100",
        "proto",
        "static",
    ]);
    list.retain(|n| !n["metadata"]["name"].as_str().unwrap().starts_with("bad"));
    write_nodes(&nodes, &list);
    wait_for("readiness", || {
        http_get(&node.name, 9765, "/readyz").0 == 200
    });
    assert!(routes(&node).contains("10.244.4.0/24 via 192.0.2.14"));
}

#[test]
fn a_read_only_proc_sys_with_forwarding_off_is_one_clear_problem() {
    if !require_root() {
        return;
    }
    let node = Node::new("rosys");
    node.node_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    let nodes = node.dir.join("nodes.json");
    write_nodes(
        &nodes,
        &[
            node_json("n1", "192.0.2.11", "10.244.1.0/24"),
            node_json("n2", "192.0.2.12", "10.244.2.0/24"),
        ],
    );
    // As a non-privileged container sees it: /proc/sys mounted read-only.
    let _agent = node_with_agent(
        &node,
        &nodes,
        &[
            "unshare",
            "-m",
            "sh",
            "-c",
            "mount --bind -o ro /proc/sys /proc/sys && exec \"$@\"",
            "-",
        ],
    );
    wait_for("the route to n2 regardless", || {
        routes(&node).contains("10.244.2.0/24")
    });
    wait_for("readiness to say why", || {
        http_get(&node.name, 9765, "/readyz")
            .1
            .contains("net.ipv4.ip_forward")
    });
    let (code, body) = http_get(&node.name, 9765, "/readyz");
    assert_eq!(code, 503);
    assert!(
        body.contains("read-only") && body.contains("sysctl -w net.ipv4.ip_forward=1"),
        "{body}"
    );
    assert_eq!(http_get(&node.name, 9765, "/healthz").0, 200);
}

#[test]
fn metrics_tell_the_pools_real_state_and_the_cni_operations() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("metric");
    let nodes = node.dir.join("nodes.json");
    write_nodes(&nodes, &[node_json("n1", "192.0.2.11", "10.244.1.0/24")]);
    let _agent = node_with_agent(&node, &nodes, &[]);
    let list_path = node.dir.join("host/net.d/10-pontoon.conflist");
    wait_for("the conflist", || list_path.exists());
    let list: Value = serde_json::from_slice(&std::fs::read(&list_path).unwrap()).unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    let bin = node.dir.join("host/bin/pontoon");
    let mut pods = vec![];
    for i in 0..4 {
        let ns = node.pod(&format!("p{i}"));
        let env = [
            ("CNI_CONTAINERID", format!("c{i}")),
            ("CNI_NETNS", ns.clone()),
            ("CNI_IFNAME", "eth0".into()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        cni_exec(&node.name, &bin, "ADD", &env, conf.to_string().as_bytes()).ok();
        pods.push((format!("c{i}"), ns));
    }
    for (cid, ns) in &pods[..1] {
        let env = [
            ("CNI_CONTAINERID", cid.as_str()),
            ("CNI_NETNS", ns.as_str()),
            ("CNI_IFNAME", "eth0"),
        ];
        cni_exec(&node.name, &bin, "DEL", &env, conf.to_string().as_bytes()).ok();
    }
    // A failed ADD (a requested address outside the pool) is counted with its code.
    let mut bad = conf.clone();
    bad["runtimeConfig"] = json!({"ips": ["192.0.2.200"]});
    let ns = node.pod("bad");
    cni_exec(
        &node.name,
        &bin,
        "ADD",
        &[
            ("CNI_CONTAINERID", "bad"),
            ("CNI_NETNS", ns.as_str()),
            ("CNI_IFNAME", "eth0"),
        ],
        bad.to_string().as_bytes(),
    )
    .err(101);
    let used = node.allocations("pontoon").len();
    assert_eq!(used, 3);
    let sample = |text: &str, name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("a Prometheus text exposition");
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .and_then(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
    };
    let net = [("network", "pontoon")];
    // The agent folds the operations log at its passes: one may have run between the DEL
    // and the failed ADD, so wait for the last operation to be counted too.
    wait_for("the metrics to catch up", || {
        let t = http_get(&node.name, 9765, "/metrics").1;
        sample(&t, "pontoon_pool_used_addresses", &net) == Some(used as f64)
            && sample(
                &t,
                "pontoon_cni_operations_total",
                &[("verb", "ADD"), ("outcome", "ok")],
            ) == Some(4.0)
            && sample(
                &t,
                "pontoon_cni_operations_total",
                &[("verb", "ADD"), ("outcome", "101")],
            )
            .is_some()
    });
    let t = http_get(&node.name, 9765, "/metrics").1;
    assert_eq!(
        sample(&t, "pontoon_pool_addresses", &net),
        Some(253.0),
        "{t}"
    );
    assert_eq!(sample(&t, "pontoon_pool_stale_addresses", &net), Some(0.0));
    assert_eq!(
        sample(
            &t,
            "pontoon_cni_operations_total",
            &[("verb", "DEL"), ("outcome", "ok")]
        ),
        Some(1.0),
        "{t}"
    );
    assert_eq!(
        sample(
            &t,
            "pontoon_cni_operations_total",
            &[("verb", "ADD"), ("outcome", "101")]
        ),
        Some(1.0),
        "{t}"
    );
    assert_eq!(sample(&t, "pontoon_agent_ready", &[]), Some(1.0), "{t}");
    assert!(t.contains("pontoon_cni_operation_duration_seconds_bucket"));
    assert!(t.contains("pontoon_agent_reconcile_duration_seconds_count"));
    // A pod lost without DEL: stale, then reclaimed by the agent itself.
    let (_, ns) = pods[1].clone();
    node.del_pod(&ns);
    wait_for("the agent to reclaim the lost pod", || {
        let t = http_get(&node.name, 9765, "/metrics").1;
        sample(&t, "pontoon_pool_reclaimed_addresses_total", &net) == Some(1.0)
            && sample(&t, "pontoon_pool_used_addresses", &net) == Some(2.0)
    });
    assert_eq!(node.allocations("pontoon").len(), 2);
}

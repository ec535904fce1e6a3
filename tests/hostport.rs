//! hostPort (the `portMappings` capability) for real: TCP and UDP through the node's ports from
//! outside, from the node itself (node IP and 127.0.0.1), from another pod and from the pod
//! itself; hostIP binding; the conformance test's triple; DEL, conflicts, parallel pods, stale
//! UDP conntrack, and the stock `portmap` chained after pontoon instead.

mod common;

use common::*;
use serde_json::{Value, json};

fn conf_with(node: &Node, mappings: Value) -> Value {
    let mut c = node.conf(
        "1.0.0",
        v4(),
        json!({"capabilities": {"portMappings": true}}),
    );
    c["runtimeConfig"] = json!({"portMappings": mappings});
    c
}

#[test]
fn host_ports_reach_the_pod_from_everywhere() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("hp");
    let out = node.add_outside();
    let a = node.pod("a");
    let b = node.pod("b");
    let plain = node.conf("1.0.0", v4(), json!({}));
    let conf = conf_with(
        &node,
        json!([
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 5353, "containerPort": 80, "protocol": "udp"},
        {"hostPort": 9090, "containerPort": 80, "protocol": "tcp", "hostIP": "192.0.2.1"}]),
    );
    let ra = node.cni("ADD", "a", &a, "eth0", &conf).ok();
    node.cni("ADD", "b", &b, "eth0", &plain).ok();
    let _srv = PodServer::start(&a, "A", 80);
    let ia = result_ips(&ra)[0].clone();
    // From outside: the pod sees the real client.
    assert_eq!(
        talk(&out, "tcp", "192.0.2.1", 8080, None).as_deref(),
        Some("A 192.0.2.2")
    );
    assert_eq!(
        talk(&out, "udp", "192.0.2.1", 5353, None).as_deref(),
        Some("A 192.0.2.2")
    );
    // From the node itself, by its address and by 127.0.0.1.
    assert!(talk(&node.name, "tcp", "192.0.2.1", 8080, None).is_some_and(|s| s.starts_with("A ")));
    assert!(talk(&node.name, "tcp", "127.0.0.1", 8080, None).is_some_and(|s| s.starts_with("A ")));
    assert!(talk(&node.name, "udp", "127.0.0.1", 5353, None).is_some_and(|s| s.starts_with("A ")));
    // From another pod on the bridge, and hairpin: the pod through its own hostPort.
    assert!(talk(&b, "tcp", "192.0.2.1", 8080, None).is_some_and(|s| s.starts_with("A ")));
    assert!(
        talk(&a, "tcp", "192.0.2.1", 8080, None).is_some_and(|s| s.starts_with("A ")),
        "hairpin"
    );
    // hostIP-bound: answers on that address only.
    assert!(talk(&out, "tcp", "192.0.2.1", 9090, None).is_some());
    assert!(
        talk(&node.name, "tcp", "127.0.0.1", 9090, None).is_none(),
        "9090 is bound to 192.0.2.1 only"
    );
    // CHECK sees the mappings; after DEL the ports are closed and the maps hold nothing of it.
    let mut chk = conf.clone();
    chk["prevResult"] = ra.clone();
    node.cni("CHECK", "a", &a, "eth0", &chk).ok();
    assert!(table(&node).contains(&ia));
    node.cni("DEL", "a", "", "eth0", &conf).ok();
    assert!(!table(&node).contains(&ia), "{}", table(&node));
    assert!(talk(&out, "tcp", "192.0.2.1", 8080, None).is_none());
}

#[test]
fn the_conformance_triple_and_conflicts() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("hp3");
    let out = node.add_outside();
    // Same port: 127.0.0.1/TCP, nodeIP/TCP, nodeIP/UDP on three pods (sig-network HostPort).
    let specs = [
        ("127.0.0.1", "tcp", "P1"),
        ("192.0.2.1", "tcp", "P2"),
        ("192.0.2.1", "udp", "P3"),
    ];
    let mut servers = vec![];
    for (i, (ip, proto, tag)) in specs.iter().enumerate() {
        let ns = node.pod(&format!("p{i}"));
        let conf = conf_with(
            &node,
            json!([{"hostPort": 54323, "containerPort": 8080, "protocol": proto, "hostIP": ip}]),
        );
        node.cni("ADD", &format!("p{i}"), &ns, "eth0", &conf).ok();
        servers.push(PodServer::start(&ns, tag, 8080));
    }
    assert!(
        talk(&node.name, "tcp", "127.0.0.1", 54323, None).is_some_and(|s| s.starts_with("P1 "))
    );
    assert!(talk(&out, "tcp", "192.0.2.1", 54323, None).is_some_and(|s| s.starts_with("P2 ")));
    assert!(talk(&out, "udp", "192.0.2.1", 54323, None).is_some_and(|s| s.starts_with("P3 ")));
    // A fourth pod asking for nodeIP/TCP 54323 (or all addresses/TCP) is refused, cleanly.
    for host_ip in ["192.0.2.1", ""] {
        let ns = node.pod(&format!("x{}", host_ip.len()));
        let conf = conf_with(
            &node,
            json!([{"hostPort": 54323, "containerPort": 80, "protocol": "tcp", "hostIP": host_ip}]),
        );
        let msg = node.cni("ADD", "x", &ns, "eth0", &conf).err(101);
        assert!(
            msg.contains("54323") && msg.contains("already mapped"),
            "{msg}"
        );
        assert_eq!(
            node.allocations("testnet").len(),
            3,
            "the refused pod holds an address"
        );
        assert_eq!(node.veths().len(), 3, "the refused pod left a veth");
    }
    assert!(talk(&out, "tcp", "192.0.2.1", 54323, None).is_some_and(|s| s.starts_with("P2 ")));
    // The network's pool changes (new subnet and bridge): the hostPort chains are re-created.
    for i in 0..3 {
        node.cni(
            "DEL",
            &format!("p{i}"),
            "",
            "eth0",
            &node.conf("1.0.0", v4(), json!({})),
        )
        .ok();
    }
    let ns = node.pod("moved");
    let mut conf = conf_with(
        &node,
        json!([{"hostPort": 54323, "containerPort": 8080, "protocol": "tcp"}]),
    );
    conf["bridge"] = json!("cni9");
    conf["ipam"]["ranges"] = json!([[{"subnet": "10.87.0.0/24"}]]);
    node.cni("ADD", "moved", &ns, "eth0", &conf).ok();
    servers.push(PodServer::start(&ns, "M", 8080));
    assert!(talk(&out, "tcp", "192.0.2.1", 54323, None).is_some_and(|s| s.starts_with("M ")));
}

#[test]
fn parallel_pods_with_host_ports_leave_a_clean_table() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("hppar");
    let pods: Vec<String> = (0..32).map(|i| node.pod(&format!("p{i}"))).collect();
    let confs: Vec<Value> = (0..32)
        .map(|i| conf_with(&node, json!([{"hostPort": 20000 + i, "containerPort": 80, "protocol": "tcp"},
                                          {"hostPort": 21000 + i, "containerPort": 53, "protocol": "udp"}])))
        .collect();
    std::thread::scope(|s| {
        for (i, ns) in pods.iter().enumerate() {
            let (node, conf) = (&node, &confs[i]);
            s.spawn(move || node.cni("ADD", &format!("c{i}"), ns, "eth0", conf).ok());
        }
    });
    let t = table(&node);
    assert_eq!(t.matches(" : 10.88.0.").count(), 64, "{t}");
    std::thread::scope(|s| {
        for (i, ns) in pods.iter().enumerate() {
            let (node, conf) = (&node, &confs[i]);
            s.spawn(move || node.cni("DEL", &format!("c{i}"), ns, "eth0", conf).ok());
        }
    });
    let t = table(&node);
    assert_eq!(t.matches("elements").count(), 0, "{t}");
}

#[test]
fn udp_conntrack_is_flushed_when_a_mapping_moves() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("hpct");
    let out = node.add_outside();
    let conf = conf_with(
        &node,
        json!([{"hostPort": 5353, "containerPort": 53, "protocol": "udp"}]),
    );
    let a = node.pod("a");
    node.cni("ADD", "a", &a, "eth0", &conf).ok();
    let sa = PodServer::start(&a, "A", 53);
    // The same client flow (fixed source port) before and after the pod behind the port changes.
    assert!(talk(&out, "udp", "192.0.2.1", 5353, Some(40000)).is_some_and(|s| s.starts_with("A ")));
    node.cni("DEL", "a", &a, "eth0", &conf).ok();
    drop(sa);
    let b = node.pod("b");
    node.cni("ADD", "b", &b, "eth0", &conf).ok();
    let _sb = PodServer::start(&b, "B", 53);
    assert!(
        talk(&out, "udp", "192.0.2.1", 5353, Some(40000)).is_some_and(|s| s.starts_with("B ")),
        "the old conntrack entry still sends the flow to the deleted pod"
    );
}

#[test]
fn the_stock_portmap_plugin_chained_after_pontoon_works() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("hpchain");
    let out = node.add_outside();
    let ns = node.pod("a");
    let plain = node.conf("1.0.0", v4(), json!({}));
    let r = node.cni("ADD", "a", &ns, "eth0", &plain).ok();
    let pm = json!({"cniVersion": "1.0.0", "name": "testnet", "type": "portmap", "prevResult": r,
                    "runtimeConfig": {"portMappings": [{"hostPort": 7070, "containerPort": 80, "protocol": "tcp"}]}});
    let env = [
        ("CNI_CONTAINERID", "a"),
        ("CNI_NETNS", ns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let portmap = std::path::Path::new("/usr/lib/cni/portmap");
    let run = |cmd: &str, stdin: &Value| {
        cni_exec(&node.name, portmap, cmd, &env, stdin.to_string().as_bytes()).ok();
    };
    run("ADD", &pm);
    let _srv = PodServer::start(&ns, "A", 80);
    assert!(talk(&out, "tcp", "192.0.2.1", 7070, None).is_some_and(|s| s.starts_with("A ")));
    run("DEL", &pm);
    node.cni("DEL", "a", &ns, "eth0", &plain).ok();
}

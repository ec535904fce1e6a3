//! Egress SNAT for real: a node namespace routing to an "outside" namespace; the outside host
//! reports the source address it sees. Both backends; rules live only in the node namespace.

mod common;

use common::*;
use serde_json::json;

fn masq_conf(node: &Node, backend: &str) -> serde_json::Value {
    node.conf(
        "1.0.0",
        dual(),
        json!({"ipMasq": true, "ipMasqBackend": backend, "noMasqueradeCidrs": ["10.0.0.0/8"]}),
    )
}

fn egress_is_masqueraded_and_pod_traffic_is_not(backend: &str) {
    let mut node = Node::new(&format!("mq{}", &backend[..2]));
    let out = node.add_outside();
    let _server = EchoServer::start(&out, &["192.0.2.2", "2001:db8::2"]);
    let conf = masq_conf(&node, backend);
    let a = node.pod("a");
    let b = node.pod("b");
    let ra = node.cni("ADD", "a", &a, "eth0", &conf).ok();
    let rb = node.cni("ADD", "b", &b, "eth0", &conf).ok();
    // Egress leaves with the node's address, v4 and v6.
    assert_eq!(whoami(&a, "192.0.2.2"), "192.0.2.1");
    assert_eq!(whoami(&b, "2001:db8::2"), "2001:db8::1");
    // Pod to pod keeps the pod's own source address.
    let b_name = std::path::Path::new(&b)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let ib = result_ips(&rb);
    let _pod_server = EchoServer::start(&b_name, &[&ib[0], &ib[1]]);
    let ia = result_ips(&ra);
    assert_eq!(whoami(&a, &ib[0]), ia[0]);
    assert_eq!(whoami(&a, &ib[1]), ia[1]);
    // CHECK sees the rules; after they are removed by hand it fails.
    let mut check = conf.clone();
    check["prevResult"] = ra.clone();
    node.cni("CHECK", "a", &a, "eth0", &check).ok();
    let rm = node.pontoon(&[
        "masquerade",
        "remove",
        "--network",
        "testnet",
        "--backend",
        backend,
    ]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    node.cni("CHECK", "a", &a, "eth0", &check).err(105);
    // The next ADD puts them back.
    let c = node.pod("c");
    node.cni("ADD", "c", &c, "eth0", &conf).ok();
    node.cni("CHECK", "a", &a, "eth0", &check).ok();
    assert_eq!(whoami(&c, "192.0.2.2"), "192.0.2.1");
}

#[test]
fn nftables_egress_is_masqueraded_and_pod_traffic_is_not() {
    if !require_root() {
        return;
    }
    egress_is_masqueraded_and_pod_traffic_is_not("nftables");
}

#[test]
fn iptables_egress_is_masqueraded_and_pod_traffic_is_not() {
    if !require_root() {
        return;
    }
    egress_is_masqueraded_and_pod_traffic_is_not("iptables");
}

fn ruleset(node: &Node, backend: &str) -> String {
    match backend {
        "nftables" => node.node_ok(&["nft", "-a", "list", "ruleset"]),
        _ => {
            let mut s = node.node_ok(&["iptables-save", "-t", "nat"]);
            s.push_str(&node.node_ok(&["ip6tables-save", "-t", "nat"]));
            // Drop counters and the timestamp comments.
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split(" [").next().unwrap().to_string() + "\n")
                .collect()
        }
    }
}

fn ensure_is_idempotent_and_remove_restores_the_ruleset(backend: &str) {
    let node = Node::new(&format!("rm{}", &backend[..2]));
    // Someone else's rules, which must survive.
    match backend {
        "nftables" => {
            node.node_ok(&["nft", "add", "table", "inet", "other"]);
            node.node_ok(&[
                "nft",
                "add",
                "chain",
                "inet",
                "other",
                "post",
                "{ type nat hook postrouting priority 100; }",
            ]);
            node.node_ok(&[
                "nft",
                "add",
                "rule",
                "inet",
                "other",
                "post",
                "ip",
                "saddr",
                "10.9.9.0/24",
                "masquerade",
            ]);
        }
        _ => {
            node.node_ok(&["iptables", "-t", "nat", "-N", "KUBE-POSTROUTING"]);
            node.node_ok(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-j",
                "KUBE-POSTROUTING",
            ]);
        }
    }
    let before = ruleset(&node, backend);
    let args = [
        "masquerade",
        "ensure",
        "--network",
        "net1",
        "--pod-cidr",
        "10.244.1.0/24",
        "--pod-cidr",
        "fd00:10:244:1::/64",
        "--no-masquerade",
        "10.244.0.0/16",
        "--backend",
        backend,
    ];
    let o = node.pontoon(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let once = ruleset(&node, backend);
    assert_ne!(once, before);
    assert!(once.contains("10.244.1.0/24"), "{once}");
    // A second ensure changes nothing (not even rule handles).
    assert!(node.pontoon(&args).status.success());
    assert_eq!(ruleset(&node, backend), once);
    let mut check = args.to_vec();
    check[1] = "check";
    assert!(node.pontoon(&check).status.success());
    // Another network's rules are independent.
    let other = [
        "masquerade",
        "ensure",
        "--network",
        "net2",
        "--pod-cidr",
        "10.245.0.0/24",
        "--backend",
        backend,
    ];
    assert!(node.pontoon(&other).status.success());
    let rm = node.pontoon(&[
        "masquerade",
        "remove",
        "--network",
        "net2",
        "--backend",
        backend,
    ]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert_eq!(ruleset(&node, backend), once, "removing net2 touched net1");
    let rm = node.pontoon(&[
        "masquerade",
        "remove",
        "--network",
        "net1",
        "--backend",
        backend,
    ]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert_eq!(
        ruleset(&node, backend),
        before,
        "remove did not restore the ruleset"
    );
    assert!(
        !node.pontoon(&check).status.success(),
        "check passes after remove"
    );
}

#[test]
fn nftables_ensure_is_idempotent_and_remove_restores_the_ruleset() {
    if !require_root() {
        return;
    }
    ensure_is_idempotent_and_remove_restores_the_ruleset("nftables");
}

#[test]
fn iptables_ensure_is_idempotent_and_remove_restores_the_ruleset() {
    if !require_root() {
        return;
    }
    ensure_is_idempotent_and_remove_restores_the_ruleset("iptables");
}

#[test]
fn parallel_adds_leave_one_rule_set() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("mqpar");
    let conf = masq_conf(&node, "nftables");
    let pods: Vec<String> = (0..32).map(|i| node.pod(&format!("p{i}"))).collect();
    std::thread::scope(|s| {
        for (i, ns) in pods.iter().enumerate() {
            let (node, conf) = (&node, &conf);
            s.spawn(move || node.cni("ADD", &format!("c{i}"), ns, "eth0", conf).ok());
        }
    });
    let rules = node.node_ok(&["nft", "list", "table", "inet", "pontoon"]);
    // One rule set: the entry chain and one chain per family, each rule once.
    assert_eq!(rules.matches("chain ").count(), 3, "{rules}");
    assert_eq!(
        rules.matches("comment \"pontoon:testnet\"").count(),
        2,
        "{rules}"
    );
    assert_eq!(rules.matches("masquerade").count(), 2, "{rules}");
    // DEL has nothing per pod to remove: the rule set stays for the remaining pods.
    node.cni("DEL", "c0", &pods[0], "eth0", &conf).ok();
    assert_eq!(
        node.node_ok(&["nft", "list", "table", "inet", "pontoon"]),
        rules
    );
}

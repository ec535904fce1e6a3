//! The pod network for real: the built binary run as a runtime runs it, inside throwaway node
//! and pod namespaces; assertions on kernel state and on traffic between the namespaces.

mod common;

use common::*;
use serde_json::{Value, json};

#[test]
fn add_for_every_version_has_the_right_shape_and_state() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("ver");
    for (i, v) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let ns = node.pod(&format!("p{i}"));
        let cid = format!("ctr-{i}");
        let conf = node.conf(v, dual(), json!({"mtu": 1400, "hairpinMode": true}));
        let r = node.cni("ADD", &cid, &ns, "eth0", &conf).ok();
        assert_eq!(r["cniVersion"], *v);
        let ifs = r["interfaces"].as_array().unwrap();
        assert_eq!(ifs.len(), 3);
        assert_eq!(ifs[0]["name"], "cni0");
        assert!(ifs[1]["name"].as_str().unwrap().starts_with("pon"));
        assert_eq!(ifs[2]["name"], "eth0");
        assert_eq!(ifs[2]["sandbox"], ns.as_str());
        let ips = r["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 2);
        for ip in ips {
            assert_eq!(ip["interface"], 2, "containerd needs the eth0 index");
            let has_version = ip.get("version").is_some();
            assert_eq!(has_version, v.starts_with('0'), "{v}: {ip}");
        }
        if *v == "1.1.0" {
            assert_eq!(ifs[2]["mtu"], 1400);
        } else {
            assert!(ifs[2].get("mtu").is_none());
        }
        // Real state in the pod: addresses, MTU, default routes.
        let addrs = node.in_pod_ok(&ns, &["ip", "-o", "addr", "show", "dev", "eth0"]);
        for ip in result_ips(&r) {
            assert!(addrs.contains(&ip), "{ip} not on eth0: {addrs}");
        }
        assert!(
            node.in_pod_ok(&ns, &["ip", "link", "show", "eth0"])
                .contains("mtu 1400")
        );
        assert!(
            node.in_pod_ok(&ns, &["ip", "route"])
                .contains("default via 10.88.0.1 dev eth0")
        );
        assert!(
            node.in_pod_ok(&ns, &["ip", "-6", "route"])
                .contains("default via fd88::1 dev eth0")
        );
        assert!(
            node.in_pod_ok(&ns, &["ip", "link", "show", "lo"])
                .contains("UP")
        );
        // The bridge holds the gateways; the host end is on it.
        let br = node.node_ok(&["ip", "-o", "addr", "show", "dev", "cni0"]);
        assert!(
            br.contains("10.88.0.1/24") && br.contains("fd88::1/64"),
            "{br}"
        );
        let host = ifs[1]["name"].as_str().unwrap();
        assert!(
            node.node_ok(&["ip", "link", "show", host])
                .contains("master cni0")
        );
        let port = node.node_ok(&["ip", "-d", "link", "show", host]);
        assert!(
            port.contains("hairpin on"),
            "hairpinMode not applied: {port}"
        );
        // DEL takes the pair out of service at once and releases the allocation; the pair is
        // deleted within the reaper's bound (the runtime keeps this netns).
        node.cni("DEL", &cid, &ns, "eth0", &conf).ok();
        assert!(!node.veths().contains(&host.to_string()));
        wait_for("the pair to be deleted", || {
            !node.links().contains(&host.to_string())
                && node
                    .in_pod(&ns, &["ip", "link", "show", "eth0"])
                    .status
                    .code()
                    != Some(0)
        });
    }
    assert!(node.allocations("testnet").is_empty());
    assert!(node.veths().is_empty());
    // Without ipMasq or port mappings an ADD never touches the firewall (no nft on the hot path).
    let tables = node.node_ok(&["nft", "list", "tables"]);
    assert!(!tables.contains("pontoon"), "{tables}");
}

#[test]
fn pods_reach_each_other_the_gateway_and_over_ipv6() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("ping");
    let conf = node.conf("1.0.0", dual(), json!({}));
    let a = node.pod("a");
    let b = node.pod("b");
    let ra = node.cni("ADD", "a", &a, "eth0", &conf).ok();
    let rb = node.cni("ADD", "b", &b, "eth0", &conf).ok();
    let ia = result_ips(&ra);
    let ib = result_ips(&rb);
    assert_ne!(ia, ib);
    // Nothing on the bridge waits for duplicate address detection: with a tentative
    // link-local address the node would not resolve pods for IPv6 packets it forwards.
    let tentative = node.node_ok(&["ip", "-6", "addr", "show", "dev", "cni0", "tentative"]);
    assert!(tentative.trim().is_empty(), "{tentative}");
    // The very first packet after ADD must get through (no warm-up ping).
    assert!(node.ping(&a, &ib[0]), "a -> b v4");
    assert!(node.ping(&b, &ia[0]), "b -> a v4");
    assert!(node.ping(&a, "10.88.0.1"), "a -> gateway");
    assert!(node.ping(&a, &ib[1]), "a -> b v6");
    assert!(node.ping(&b, "fd88::1"), "b -> v6 gateway");
    // The node reaches the pod through the bridge.
    assert!(
        node.exec(&["ping", "-c", "1", "-W", "2", &ia[0]])
            .status
            .success()
    );
}

#[test]
fn check_passes_when_healthy_and_names_what_is_missing() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("check");
    let ns = node.pod("p");
    let mut conf = node.conf("1.0.0", v4(), json!({}));
    let r = node.cni("ADD", "c1", &ns, "eth0", &conf).ok();
    conf["prevResult"] = r.clone();
    node.cni("CHECK", "c1", &ns, "eth0", &conf).ok();
    let ip = r["ips"][0]["address"].as_str().unwrap();
    node.in_pod_ok(&ns, &["ip", "addr", "del", ip, "dev", "eth0"]);
    let msg = node.cni("CHECK", "c1", &ns, "eth0", &conf).err(105);
    assert!(msg.contains(ip), "{msg}");
    node.in_pod_ok(&ns, &["ip", "link", "del", "eth0"]);
    let msg = node.cni("CHECK", "c1", &ns, "eth0", &conf).err(105);
    assert!(msg.contains("missing"), "{msg}");
    // CHECK without prevResult is a config error; on 0.3.1 CHECK does not exist.
    let plain = node.conf("1.0.0", v4(), json!({}));
    node.cni("CHECK", "c1", &ns, "eth0", &plain).err(7);
    let old = node.conf("0.3.1", v4(), json!({}));
    node.cni("CHECK", "c1", &ns, "eth0", &old).err(1);
}

#[test]
fn del_is_idempotent_and_needs_no_netns() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("del");
    let conf = node.conf("1.0.0", v4(), json!({}));
    // DEL without ADD.
    node.cni("DEL", "never", "", "eth0", &conf).ok();
    // DEL twice with the netns, then with an empty one (containerd's habit).
    let ns = node.pod("p");
    node.cni("ADD", "c1", &ns, "eth0", &conf).ok();
    node.cni("DEL", "c1", &ns, "eth0", &conf).ok();
    node.cni("DEL", "c1", &ns, "eth0", &conf).ok();
    node.cni("DEL", "c1", "", "eth0", &conf).ok();
    assert!(node.allocations("testnet").is_empty());
    // DEL after the netns is gone (node reboot, sandbox torn down): the veth goes with the
    // netns; DEL still releases the address.
    let ns2 = node.pod("q");
    node.cni("ADD", "c2", &ns2, "eth0", &conf).ok();
    assert_eq!(node.allocations("testnet").len(), 1);
    node.del_pod(&ns2);
    node.cni("DEL", "c2", &ns2, "eth0", &conf).ok();
    node.cni("DEL", "c2", "", "eth0", &conf).ok();
    assert!(node.allocations("testnet").is_empty());
    assert!(node.veths().is_empty());
    // DEL with a netns path that is not a netns still succeeds.
    let file = node.dir.join("not-a-netns");
    std::fs::write(&file, "").unwrap();
    node.cni("DEL", "c3", file.to_str().unwrap(), "eth0", &conf)
        .ok();
    // The bridge stays.
    assert!(node.links().contains(&"cni0".to_string()));
}

#[test]
fn parallel_adds_get_distinct_reachable_addresses() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("par");
    let conf = node.conf("1.0.0", v4(), json!({}));
    let pods: Vec<String> = (0..32).map(|i| node.pod(&format!("p{i}"))).collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let node = &node;
                let conf = &conf;
                s.spawn(move || node.cni("ADD", &format!("c{i}"), ns, "eth0", conf).ok())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips: Vec<String> = results.iter().map(|r| result_ips(r)[0].clone()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 32, "duplicate addresses handed out");
    assert_eq!(node.allocations("testnet").len(), 32);
    assert_eq!(node.veths().len(), 32);
    for ip in &ips {
        assert!(
            node.ping(&pods[0], ip) || ip == &result_ips(&results[0])[0],
            "{ip} unreachable"
        );
    }
    // And all go away in parallel too.
    std::thread::scope(|s| {
        for (i, ns) in pods.iter().enumerate() {
            let node = &node;
            let conf = &conf;
            s.spawn(move || node.cni("DEL", &format!("c{i}"), ns, "eth0", conf).ok());
        }
    });
    assert!(node.allocations("testnet").is_empty());
    assert!(node.veths().is_empty());
}

#[test]
fn failed_adds_leave_nothing_behind() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("fail");
    // A /29 pool has 5 addresses (gateway excluded).
    let conf = node.conf("1.0.0", json!([[{"subnet": "10.99.0.0/29"}]]), json!({}));
    for i in 0..5 {
        let ns = node.pod(&format!("p{i}"));
        node.cni("ADD", &format!("c{i}"), &ns, "eth0", &conf).ok();
    }
    let ns = node.pod("full");
    let msg = node.cni("ADD", "c-full", &ns, "eth0", &conf).err(100);
    assert!(msg.contains("no free address"), "{msg}");
    assert_eq!(node.allocations("testnet").len(), 5);
    assert_eq!(node.veths().len(), 5);
    // CNI_IFNAME already taken inside the pod: error, no address held, no veth left.
    node.cni("DEL", "c0", "", "eth0", &conf).ok();
    let clash = node.pod("clash");
    node.in_pod_ok(
        &clash,
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "x0",
        ],
    );
    let msg = node.cni("ADD", "c-clash", &clash, "eth0", &conf).err(102);
    assert!(msg.contains("already exists"), "{msg}");
    assert_eq!(node.allocations("testnet").len(), 4);
    assert_eq!(node.veths().len(), 4);
    // The bridge name taken by a non-bridge link: config error, nothing allocated.
    node.node_ok(&[
        "ip", "link", "add", "notabr", "type", "veth", "peer", "name", "notabr1",
    ]);
    let bad = node.conf(
        "1.0.0",
        json!([[{"subnet": "10.98.0.0/24"}]]),
        json!({"bridge": "notabr", "name": "other"}),
    );
    let ns2 = node.pod("nb");
    let msg = node.cni("ADD", "c-nb", &ns2, "eth0", &bad).err(7);
    assert!(msg.contains("not a bridge"), "{msg}");
    assert!(node.allocations("other").is_empty());
    // A netns path that is not a netns.
    let file = node.dir.join("plain-file");
    std::fs::write(&file, "").unwrap();
    node.cni("ADD", "c-file", file.to_str().unwrap(), "eth0", &conf)
        .err(103);
    // Nor a directory.
    let dir = node.dir.join("a-directory");
    std::fs::create_dir_all(&dir).unwrap();
    let msg = node
        .cni("ADD", "c-dir", dir.to_str().unwrap(), "eth0", &conf)
        .err(103);
    assert!(msg.contains("not a network namespace"), "{msg}");
    node.cni("DEL", "c-dir", dir.to_str().unwrap(), "eth0", &conf)
        .ok();
    assert_eq!(node.allocations("testnet").len(), 4);
    assert_eq!(node.veths().len(), 4);
}

#[test]
fn repeated_add_returns_the_same_addresses() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("readd");
    let conf = node.conf("1.0.0", v4(), json!({}));
    let ns = node.pod("p");
    let a = node.cni("ADD", "c1", &ns, "eth0", &conf).ok();
    let b = node.cni("ADD", "c1", &ns, "eth0", &conf).ok();
    assert_eq!(result_ips(&a), result_ips(&b));
    assert_eq!(node.veths().len(), 1);
    let other = node.pod("o");
    let c = node.cni("ADD", "c2", &other, "eth0", &conf).ok();
    assert!(node.ping(&other, &result_ips(&b)[0]));
    let _ = c;
}

#[test]
fn requested_ip_and_mac_are_honoured() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("req");
    let conf = node.conf(
        "1.0.0",
        v4(),
        json!({"runtimeConfig": {"ips": ["10.88.0.77/24"], "mac": "0a:58:0a:58:00:4d"}}),
    );
    let ns = node.pod("p");
    let r = node.cni("ADD", "c1", &ns, "eth0", &conf).ok();
    assert_eq!(result_ips(&r), ["10.88.0.77"]);
    assert_eq!(r["interfaces"][2]["mac"], "0a:58:0a:58:00:4d");
    assert!(
        node.in_pod_ok(&ns, &["ip", "link", "show", "eth0"])
            .contains("0a:58:0a:58:00:4d")
    );
    // The same address for another pod is refused with a clear error.
    let ns2 = node.pod("q");
    let msg = node
        .cni_env(
            "ADD",
            &[
                ("CNI_CONTAINERID", "c2"),
                ("CNI_NETNS", &ns2),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", "IgnoreUnknown=1;IP=10.88.0.77"),
            ],
            node.conf("1.0.0", v4(), json!({})).to_string().as_bytes(),
        )
        .err(101);
    assert!(msg.contains("10.88.0.77"), "{msg}");
    assert_eq!(node.veths().len(), 1);
}

#[test]
fn gc_releases_stale_attachments_and_status_reports_exhaustion() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("gc");
    let conf = node.conf("1.1.0", json!([[{"subnet": "10.99.0.0/29"}]]), json!({}));
    let mut nss = vec![];
    for i in 0..5 {
        let ns = node.pod(&format!("p{i}"));
        node.cni("ADD", &format!("c{i}"), &ns, "eth0", &conf).ok();
        nss.push(ns);
    }
    let status = node.cni_env("STATUS", &[], conf.to_string().as_bytes());
    assert!(status.err(50).contains("exhausted"));
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "c1", "ifname": "eth0"}]);
    node.cni_env("GC", &[], gc.to_string().as_bytes()).ok();
    assert_eq!(node.allocations("testnet").len(), 1);
    assert_eq!(node.veths().len(), 1);
    node.cni_env("STATUS", &[], conf.to_string().as_bytes())
        .ok();
    assert!(
        node.ping(&nss[1], "10.99.0.1"),
        "the valid pod keeps working"
    );
}

#[test]
fn a_recycled_address_is_announced_with_the_new_mac() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("garp");
    let conf = node.conf("1.0.0", v4(), json!({}));
    // Another pod keeps the bridge up (with no port left the kernel flushes its neighbours).
    let keep = node.pod("keep");
    node.cni("ADD", "keep", &keep, "eth0", &conf).ok();
    let old = node.pod("old");
    let mut req = conf.clone();
    req["runtimeConfig"] = json!({"ips": ["10.88.0.50"]});
    node.cni("ADD", "old", &old, "eth0", &req).ok();
    node.node_ok(&["ping", "-c", "1", "-W", "2", "10.88.0.50"]);
    node.cni("DEL", "old", &old, "eth0", &conf).ok();
    let new = node.pod("new");
    let r = node.cni("ADD", "new", &new, "eth0", &req).ok();
    let mac = r["interfaces"][2]["mac"].as_str().unwrap().to_string();
    // Right after ADD, before any traffic: the node's entry already has the new MAC.
    let neigh = node.node_ok(&["ip", "neigh", "show", "10.88.0.50"]);
    assert!(
        neigh.contains(&mac),
        "node still caches the old MAC: {neigh} (new {mac})"
    );
}

#[test]
fn other_ipam_plugins_are_delegated() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("deleg");
    let mut conf = node.conf("1.0.0", v4(), json!({}));
    conf["ipam"] = json!({"type": "static", "addresses": [{"address": "10.77.0.9/24", "gateway": "10.77.0.1"}]});
    let ns = node.pod("p");
    let r = node.cni("ADD", "c1", &ns, "eth0", &conf).ok();
    assert_eq!(result_ips(&r), ["10.77.0.9"]);
    assert!(
        node.in_pod_ok(&ns, &["ip", "-o", "addr", "show", "dev", "eth0"])
            .contains("10.77.0.9/24")
    );
    assert!(
        node.ping(&ns, "10.77.0.1"),
        "the gateway from the delegated result is on the bridge"
    );
    node.cni("DEL", "c1", &ns, "eth0", &conf).ok();
    assert!(node.veths().is_empty());
    // A missing plugin is a clear config error, and nothing is left.
    conf["ipam"] = json!({"type": "no-such-ipam"});
    let ns2 = node.pod("q");
    let msg = node.cni("ADD", "c2", &ns2, "eth0", &conf).err(7);
    assert!(msg.contains("no-such-ipam"), "{msg}");
    assert!(node.veths().is_empty());
}

/// The documented plugin keys take effect: enabledad, promiscMode, dns, ipam routes, logFile,
/// forceAddress.
#[test]
fn documented_keys_take_effect() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("keys");
    let log = node.dir.join("pontoon.log");
    let mut conf = node.conf(
        "1.0.0",
        dual(),
        json!({"promiscMode": true, "logFile": log,
               "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}}),
    );
    conf["ipam"]["routes"] = json!([{"dst": "192.168.77.0/24"}]);
    let ns = node.pod("p");
    let r = node.cni("ADD", "c1", &ns, "eth0", &conf).ok();
    assert_eq!(r["dns"]["nameservers"], json!(["10.96.0.10"]));
    assert_eq!(r["dns"]["search"], json!(["svc.cluster.local"]));
    let routes = node.in_pod_ok(&ns, &["ip", "route"]);
    assert!(
        routes.contains("192.168.77.0/24 via 10.88.0.1 dev eth0"),
        "{routes}"
    );
    let br = node.node_ok(&["ip", "-d", "link", "show", "cni0"]);
    assert!(
        br.contains("PROMISC") || br.contains("promiscuity 1"),
        "{br}"
    );
    // IPv6 DAD is off by default (nodad) ...
    let v6 = node.in_pod_ok(
        &ns,
        &[
            "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global",
        ],
    );
    assert!(v6.contains("nodad"), "{v6}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("ADD container=c1 ifname=eth0 outcome=ok"),
        "{logged}"
    );
    // ... and with enabledad the address went through DAD before ADD returned.
    let mut dad = conf.clone();
    dad["enabledad"] = json!(true);
    let ns2 = node.pod("q");
    node.cni("ADD", "c2", &ns2, "eth0", &dad).ok();
    let v6 = node.in_pod_ok(
        &ns2,
        &[
            "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global",
        ],
    );
    assert!(
        v6.contains("fd88::") && !v6.contains("nodad") && !v6.contains("tentative"),
        "{v6}"
    );

    // forceAddress: a bridge holding another IPv4 address is refused, unless forced.
    node.node_ok(&["ip", "link", "add", "br9", "type", "bridge"]);
    node.node_ok(&["ip", "addr", "add", "10.5.5.1/24", "dev", "br9"]);
    let mut other = node.conf(
        "1.0.0",
        json!([[{"subnet": "10.89.0.0/24"}]]),
        json!({"bridge": "br9", "name": "net9"}),
    );
    let ns3 = node.pod("r");
    let msg = node.cni("ADD", "c3", &ns3, "eth0", &other).err(7);
    assert!(msg.contains("forceAddress"), "{msg}");
    assert!(node.allocations("net9").is_empty());
    other["forceAddress"] = json!(true);
    node.cni("ADD", "c3", &ns3, "eth0", &other).ok();
    let addrs = node.node_ok(&["ip", "-4", "-o", "addr", "show", "dev", "br9"]);
    assert!(
        addrs.contains("10.89.0.1/24") && !addrs.contains("10.5.5.1"),
        "{addrs}"
    );
}

//! The firewall converges to the records: concurrent first uses of both masquerade backends end
//! with one full rule set; a flushed ruleset is healed by the next ADD, by CHECK and by
//! `pontoon firewall reload`, every existing pod's hostPort included; the martian guard keeps
//! pods off the node's loopback; a batch the kernel refuses is an error, not a hang.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn masq_conf(node: &Node, backend: &str) -> Value {
    node.conf(
        "1.0.0",
        dual(),
        json!({"ipMasq": true, "ipMasqBackend": backend, "noMasqueradeCidrs": ["10.0.0.0/8"],
               "capabilities": {"portMappings": true}}),
    )
}

fn masq_check(node: &Node, backend: &str) -> bool {
    node.pontoon(&[
        "masquerade",
        "check",
        "--network",
        "testnet",
        "--pod-cidr",
        "10.88.0.0/24",
        "--pod-cidr",
        "fd88::/64",
        "--no-masquerade",
        "10.0.0.0/8",
        "--backend",
        backend,
    ])
    .status
    .success()
}

fn concurrent_first_use(backend: &str) {
    for trial in 0..20 {
        let mut node = Node::new(&format!("cc{}", &backend[..2]));
        let out = node.add_outside();
        let _srv = EchoServer::start(&out, &["192.0.2.2"]);
        let conf = masq_conf(&node, backend);
        let pods: Vec<String> = (0..8).map(|i| node.pod(&format!("p{i}"))).collect();
        let go = std::sync::Barrier::new(8);
        let replies: Vec<Reply> = std::thread::scope(|s| {
            let hs: Vec<_> = pods
                .iter()
                .enumerate()
                .map(|(i, ns)| {
                    let (node, conf, go) = (&node, &conf, &go);
                    s.spawn(move || {
                        go.wait();
                        node.cni("ADD", &format!("c{i}"), ns, "eth0", conf)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in &replies {
            r.ok();
        }
        assert!(
            masq_check(&node, backend),
            "trial {trial}: rules not current"
        );
        if backend == "iptables" {
            for (save, chain_rules) in [("iptables-save", 4), ("ip6tables-save", 4)] {
                let t = node.node_ok(&[save, "-t", "nat"]);
                let jumps = t
                    .lines()
                    .filter(|l| l.starts_with("-A POSTROUTING") && l.contains("pontoon:testnet"))
                    .count();
                assert_eq!(jumps, 1, "trial {trial}, {save}: {t}");
                let chains: Vec<&str> = t.lines().filter(|l| l.starts_with(":PONTOON-")).collect();
                assert_eq!(chains.len(), 1, "trial {trial}, {save}: {t}");
                let rules = t.lines().filter(|l| l.starts_with("-A PONTOON-")).count();
                assert_eq!(rules, chain_rules, "trial {trial}, {save}: {t}");
            }
        } else {
            let t = table(&node);
            assert_eq!(t.matches("comment \"pontoon:testnet\"").count(), 2, "{t}");
        }
        assert_eq!(whoami(&pods[trial % 8], "192.0.2.2"), "192.0.2.1");
    }
}

#[test]
fn nftables_concurrent_first_adds_end_with_one_full_rule_set() {
    if require_root() {
        concurrent_first_use("nftables");
    }
}

#[test]
fn iptables_concurrent_first_adds_end_with_one_full_rule_set() {
    if require_root() {
        concurrent_first_use("iptables");
    }
}

fn with_ports(conf: &Value, ports: Value) -> Value {
    let mut c = conf.clone();
    c["runtimeConfig"] = json!({"portMappings": ports});
    c
}

/// Both hostPorts answer from the outside host.
fn host_ports_work(out: &str) -> bool {
    talk(out, "tcp", "192.0.2.1", 8080, None).is_some_and(|r| r.starts_with("A "))
        && talk(out, "udp", "192.0.2.1", 8081, None).is_some_and(|r| r.starts_with("B "))
}

#[test]
fn a_flushed_ruleset_is_healed_by_check_add_and_reload() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("flush");
    let out = node.add_outside();
    let _srv = EchoServer::start(&out, &["192.0.2.2"]);
    let conf = masq_conf(&node, "nftables");
    let a = node.pod("a");
    let b = node.pod("b");
    let ra = node
        .cni(
            "ADD",
            "A",
            &a,
            "eth0",
            &with_ports(&conf, json!([{"hostPort": 8080, "containerPort": 80}])),
        )
        .ok();
    node.cni(
        "ADD",
        "B",
        &b,
        "eth0",
        &with_ports(
            &conf,
            json!([{"hostPort": 8081, "containerPort": 80, "protocol": "udp"}]),
        ),
    )
    .ok();
    let _sa = PodServer::start(&a, "A", 80);
    let _sb = PodServer::start(&b, "B", 80);
    let c = node.pod("c");
    assert!(host_ports_work(&out));
    let flush = |node: &Node| node.node_ok(&["nft", "flush", "ruleset"]);

    // CHECK notices, says so, and heals.
    flush(&node);
    assert!(!host_ports_work(&out));
    let mut check = with_ports(&conf, json!([{"hostPort": 8080, "containerPort": 80}]));
    check["prevResult"] = ra.clone();
    let msg = node.cni("CHECK", "A", &a, "eth0", &check).err(105);
    assert!(msg.contains("re-installed"), "{msg}");
    assert!(host_ports_work(&out), "after CHECK");
    node.cni("CHECK", "A", &a, "eth0", &check).ok();

    // The next ADD, without mappings of its own, restores every pod's hostPort and masquerade.
    flush(&node);
    node.cni("ADD", "C", &c, "eth0", &conf).ok();
    assert!(host_ports_work(&out), "after an ADD without mappings");
    assert_eq!(whoami(&c, "192.0.2.2"), "192.0.2.1");

    // The operator's reload does the same.
    flush(&node);
    let list = node.dir.join("10-test.conflist");
    let mut plugin = conf.clone();
    let o = plugin.as_object_mut().unwrap();
    o.remove("name");
    o.remove("cniVersion");
    std::fs::write(
        &list,
        json!({"cniVersion": "1.0.0", "name": "testnet", "plugins": [plugin]}).to_string(),
    )
    .unwrap();
    let r = node.pontoon(&["firewall", "reload", "--conf", list.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(host_ports_work(&out), "after pontoon firewall reload");
    assert_eq!(whoami(&a, "192.0.2.2"), "192.0.2.1");
}

/// A listener on the node's 127.0.0.1 only.
struct LoopbackListener(std::process::Child);

impl LoopbackListener {
    fn start(node: &str) -> LoopbackListener {
        let code = r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9999)); s.listen(8)
print("ready", flush=True)
while True:
    c, p = s.accept(); c.sendall(b"node-loopback\n"); c.close()
"#;
        let mut c = Command::new("ip")
            .args(["netns", "exec", node, "python3", "-c", code])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        LoopbackListener(c)
    }
}

impl Drop for LoopbackListener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_martian_guard_keeps_pods_off_the_node_loopback() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("martian");
    let conf = node.conf(
        "1.0.0",
        v4(),
        json!({"capabilities": {"portMappings": true}}),
    );
    let a = node.pod("a");
    let b = node.pod("b");
    node.cni(
        "ADD",
        "A",
        &a,
        "eth0",
        &with_ports(&conf, json!([{"hostPort": 8080, "containerPort": 80}])),
    )
    .ok();
    node.cni("ADD", "B", &b, "eth0", &conf).ok();
    let _srv = PodServer::start(&a, "A", 80);
    let _lo = LoopbackListener::start(&node.name);
    // B sends to 127.0.0.1 through its gateway, as an attacker would.
    node.in_pod_ok(
        &b,
        &["sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1"],
    );
    node.in_pod_ok(
        &b,
        &[
            "ip",
            "rule",
            "add",
            "to",
            "127.0.0.1",
            "lookup",
            "99",
            "pref",
            "10",
        ],
    );
    // (its own `local` table would otherwise claim 127.0.0.1 first)
    node.in_pod_ok(&b, &["ip", "rule", "add", "pref", "100", "lookup", "local"]);
    node.in_pod_ok(&b, &["ip", "rule", "del", "pref", "0"]);
    node.in_pod_ok(
        &b,
        &[
            "ip",
            "route",
            "add",
            "127.0.0.1",
            "via",
            "10.88.0.1",
            "dev",
            "eth0",
            "table",
            "99",
        ],
    );
    let attack = || talk(&b, "tcp", "127.0.0.1", 9999, None);
    assert_eq!(
        attack(),
        None,
        "a pod reached the node's loopback-only listener"
    );
    // The node's own 127.0.0.1 still reaches the hostPort.
    let own = talk(&node.name, "tcp", "127.0.0.1", 8080, None).unwrap_or_default();
    assert!(own.starts_with("A "), "{own:?}");
    // Without the guard the attack works: the test measures something real.
    let guard = table(&node)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("chain hp_guard_")
                .map(|c| c.trim_end_matches(" {").to_string())
        })
        .expect("a guard chain");
    node.node_ok(&[
        "nft",
        "flush",
        "chain",
        "inet",
        "pontoon",
        &format!("hp_guard_{guard}"),
    ]);
    assert_eq!(attack().as_deref(), Some("node-loopback"));
}

#[test]
fn a_refused_batch_is_an_error_and_changes_nothing() {
    if !require_root() {
        return;
    }
    let node = Node::new("refuse");
    let (r, took, table_after) = in_netns(&node.name, || {
        use pontoon::nft::{Batch, Conn, NFPROTO_INET};
        let mut conn = Conn::new().unwrap();
        let mut b = Batch::new();
        b.add_table(NFPROTO_INET, "pontoon");
        b.add_elements(NFPROTO_INET, "pontoon", "nope", &[(vec![1, 2, 3, 4], None)]);
        let t = Instant::now();
        let r = conn.commit(&b);
        let took = t.elapsed();
        (r, took, conn.has_table(NFPROTO_INET, "pontoon").unwrap())
    });
    let e = r.expect_err("a batch adding to a missing set must fail");
    assert_eq!(e.code(), 104);
    assert!(e.to_string().contains("add elements to nope"), "{e}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(!table_after, "a refused transaction left its table behind");
}

#[test]
fn the_agent_heals_a_flushed_ruleset_within_a_second_not_an_interval() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("agfw");
    let out = node.add_outside();
    let nodes = node.dir.join("nodes.json");
    std::fs::write(
        &nodes,
        json!({"kind": "NodeList", "items": [{"metadata": {"name": "me"},
            "spec": {"podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}]})
        .to_string(),
    )
    .unwrap();
    let host = node.dir.join("host");
    let mut agent = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.name,
            BIN,
            "agent",
            "--node-name",
            "me",
        ])
        .arg("--nodes-file")
        .arg(&nodes)
        .arg("--cni-bin-dir")
        .arg(host.join("bin"))
        .arg("--cni-conf-dir")
        .arg(host.join("net.d"))
        .arg("--data-dir")
        .arg(node.data_dir())
        .args(["--interval", "60", "--healthz", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Kill(&mut agent);
    let list_path = host.join("net.d/10-pontoon.conflist");
    wait_for("the agent's conflist", || list_path.exists());
    let list: Value = serde_json::from_slice(&std::fs::read(&list_path).unwrap()).unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["runtimeConfig"] = json!({"portMappings": [{"hostPort": 8080, "containerPort": 80}]});
    let a = node.pod("a");
    let env = [
        ("CNI_CONTAINERID", "A"),
        ("CNI_NETNS", a.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    cni_exec(
        &node.name,
        &host.join("bin/pontoon"),
        "ADD",
        &env,
        conf.to_string().as_bytes(),
    )
    .ok();
    let _srv = PodServer::start(&a, "A", 80);
    let works = || talk(&out, "tcp", "192.0.2.1", 8080, None).is_some_and(|r| r.starts_with("A "));
    assert!(works());
    node.node_ok(&["nft", "flush", "ruleset"]);
    let t = Instant::now();
    wait_for("the agent to restore the hostPort", works);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "healed after {:?}: the agent waited for its interval",
        t.elapsed()
    );
    assert!(table(&node).contains("masquerade"));
}

//! The node agent across nodes: a three-node "cluster" made of namespaces (three node netns on
//! an underlay bridge in its own netns, an outside host on the same underlay), an agent per
//! node, two pods per node; and the Kubernetes discovery path against a stand-in API server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

struct Cluster {
    prefix: String,
    namespaces: Vec<String>,
    agents: Vec<Child>,
    servers: Vec<EchoServer>,
    dir: PathBuf,
    root_before: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        self.servers.clear();
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if !std::thread::panicking() {
            assert_eq!(root_links(), self.root_before, "the root netns changed");
        }
    }
}

fn exec(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap()
}

fn node_json(name: &str, addr: &str, cidr: &str) -> Value {
    json!({"metadata": {"name": name}, "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
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

fn routes(ns: &str) -> String {
    String::from_utf8_lossy(&exec(ns, &["ip", "route", "show", "proto", "201"]).stdout).into_owned()
}

#[test]
fn three_nodes_route_pods_to_each_other_and_follow_node_changes() {
    if !require_root() {
        return;
    }
    let prefix = format!("pa{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("pontoon-agent-{prefix}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cl = Cluster {
        prefix: prefix.clone(),
        namespaces: vec![],
        agents: vec![],
        servers: vec![],
        dir: dir.clone(),
        root_before: root_links(),
    };
    let ul = format!("{prefix}-ul");
    run_ok(&["ip", "netns", "add", &ul]);
    cl.namespaces.push(ul.clone());
    ip(&ul, "link add ubr type bridge");
    ip(&ul, "link set ubr up");
    // The outside host, on the underlay; the nodes' default gateway.
    let out = format!("{prefix}-out");
    run_ok(&["ip", "netns", "add", &out]);
    cl.namespaces.push(out.clone());
    ip(
        &ul,
        &format!("link add uout type veth peer name eth0 netns {out}"),
    );
    ip(&ul, "link set uout master ubr up");
    ip(&out, "addr add 192.0.2.100/24 dev eth0");
    ip(&out, "link set eth0 up");
    ip(&out, "link set lo up");
    cl.servers.push(EchoServer::start(&out, &["192.0.2.100"]));
    let names = ["n1", "n2", "n3"];
    let mut node_objs = vec![];
    for (i, n) in names.iter().enumerate() {
        let ns = format!("{prefix}-{n}");
        run_ok(&["ip", "netns", "add", &ns]);
        cl.namespaces.push(ns.clone());
        ip(
            &ul,
            &format!("link add u{n} type veth peer name eth0 netns {ns}"),
        );
        ip(&ul, &format!("link set u{n} master ubr up"));
        ip(&ns, &format!("addr add 192.0.2.{}/24 dev eth0", 11 + i));
        ip(&ns, "link set eth0 up");
        ip(&ns, "link set lo up");
        ip(&ns, "route add default via 192.0.2.100");
        node_objs.push(node_json(
            n,
            &format!("192.0.2.{}", 11 + i),
            &format!("10.244.{}.0/24", i + 1),
        ));
    }
    let nodes_file = dir.join("nodes.json");
    write_nodes(&nodes_file, &node_objs);
    for n in names {
        let nd = dir.join(n);
        let agent = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{prefix}-{n}"),
                BIN,
                "agent",
                "--node-name",
                n,
            ])
            .arg("--nodes-file")
            .arg(&nodes_file)
            .arg("--cni-bin-dir")
            .arg(nd.join("bin"))
            .arg("--cni-conf-dir")
            .arg(nd.join("net.d"))
            .arg("--data-dir")
            .arg(nd.join("ipam"))
            .args([
                "--no-masquerade",
                "10.244.0.0/16",
                "--interval",
                "1",
                "--healthz",
                "127.0.0.1:9765",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        cl.agents.push(agent);
    }
    for n in names {
        let f = dir.join(n).join("net.d/10-pontoon.conflist");
        wait_for(&format!("{n}'s conflist"), || f.exists());
    }
    // Two pods per node.
    let mut pods: Vec<(String, String, String)> = vec![]; // (node, pod netns, ip)
    for n in names {
        for k in 0..2 {
            let pod = format!("{prefix}-{n}p{k}");
            run_ok(&["ip", "netns", "add", &pod]);
            cl.namespaces.push(pod.clone());
            let r = add_pod_with_conflist(
                &dir.join(n),
                &format!("{prefix}-{n}"),
                &format!("{n}-c{k}"),
                &pod,
                None,
            );
            pods.push((n.to_string(), pod, result_ips(&r)[0].clone()));
        }
    }
    wait_for("routes on n1", || {
        routes(&format!("{prefix}-n1")).lines().count() == 2
    });
    let r1 = routes(&format!("{prefix}-n1"));
    assert!(
        r1.contains("10.244.2.0/24 via 192.0.2.12") && r1.contains("10.244.3.0/24 via 192.0.2.13"),
        "{r1}"
    );
    // Every pod reaches every other pod.
    for (_, from, _) in &pods {
        for (_, _, to) in &pods {
            let o = exec(from, &["ping", "-c1", "-W2", to]);
            assert!(o.status.success(), "{from} -> {to}");
        }
    }
    // Across nodes, with its own source address (no NAT between pods).
    let (_, srv_pod, srv_ip) = pods[5].clone();
    cl.servers.push(EchoServer::start(&srv_pod, &[&srv_ip]));
    assert_eq!(whoami(&pods[0].1, &srv_ip), pods[0].2);
    // Egress to the outside is masqueraded to the node's address.
    assert_eq!(whoami(&pods[0].1, "192.0.2.100"), "192.0.2.11");
    assert_eq!(whoami(&pods[3].1, "192.0.2.100"), "192.0.2.12");
    // Something flushes the node's whole ruleset: the agent puts masquerade back.
    let n1 = format!("{prefix}-n1");
    assert!(exec(&n1, &["nft", "flush", "ruleset"]).status.success());
    wait_for("masquerade to come back on n1", || {
        String::from_utf8_lossy(&exec(&n1, &["nft", "list", "table", "inet", "pontoon"]).stdout)
            .contains("masquerade")
    });
    assert_eq!(whoami(&pods[0].1, "192.0.2.100"), "192.0.2.11");
    // Health.
    let h = exec(
        &format!("{prefix}-n1"),
        &[
            "python3",
            "-c",
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9765/healthz', timeout=3).status)",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&h.stdout).trim(), "200");
    // n2 changes its address: the others follow.
    let n2 = format!("{prefix}-n2");
    // Keep the new address when the old (primary) one is deleted.
    assert!(
        exec(
            &n2,
            &["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"]
        )
        .status
        .success()
    );
    ip(&n2, "addr add 192.0.2.22/24 dev eth0");
    node_objs[1] = node_json("n2", "192.0.2.22", "10.244.2.0/24");
    write_nodes(&nodes_file, &node_objs);
    wait_for("n1 to follow n2's new address", || {
        routes(&format!("{prefix}-n1")).contains("10.244.2.0/24 via 192.0.2.22")
    });
    ip(&n2, "addr del 192.0.2.12/24 dev eth0");
    assert!(
        exec(&pods[0].1, &["ping", "-c1", "-W2", &pods[2].2])
            .status
            .success(),
        "n1 pod -> n2 pod after the move"
    );
    // n3 leaves: its routes go from the others.
    node_objs.pop();
    write_nodes(&nodes_file, &node_objs);
    wait_for("n3's route to go", || {
        !routes(&format!("{prefix}-n1")).contains("10.244.3.0/24")
    });
    wait_for("n3's route to go from n2", || {
        !routes(&n2).contains("10.244.3.0/24")
    });
    // Routes not made by the agent are never touched.
    ip(
        &format!("{prefix}-n1"),
        "route add 10.99.0.0/24 via 192.0.2.100",
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        String::from_utf8_lossy(&exec(&format!("{prefix}-n1"), &["ip", "route"]).stdout)
            .contains("10.99.0.0/24")
    );
    // SIGTERM: a clean exit, routes stay.
    for a in &mut cl.agents {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }
    for a in &mut cl.agents {
        let st = a.wait().unwrap();
        assert_eq!(st.code(), Some(0), "agent did not exit cleanly on SIGTERM");
    }
    assert!(routes(&format!("{prefix}-n1")).contains("10.244.2.0/24"));
    let _ = &cl.prefix;
}

#[test]
fn kubernetes_discovery_lists_and_watches_nodes() {
    if !require_root() {
        return;
    }
    let node = Node::new("kube");
    let with_kind = |mut n: Value| {
        n["kind"] = json!("Node");
        n["apiVersion"] = json!("v1");
        n
    };
    let api = common::standin::StandIn::start(
        &node.name,
        "127.0.0.1:16443",
        &node.dir.join("api"),
        &[
            with_kind(node_json("me", "192.0.2.1", "10.244.5.0/24")),
            with_kind(node_json("peer", "192.0.2.2", "10.244.6.0/24")),
        ],
    );
    node.node_ok(&["ip", "addr", "add", "192.0.2.1/24", "dev", "lo"]);
    let nd = node.dir.join("host");
    let mut agent = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.name,
            BIN,
            "agent",
            "--node-name",
            "me",
            "--kubeconfig",
        ])
        .arg(api.kubeconfig())
        .arg("--cni-bin-dir")
        .arg(nd.join("bin"))
        .arg("--cni-conf-dir")
        .arg(nd.join("net.d"))
        .arg("--data-dir")
        .arg(node.data_dir())
        .args(["--interval", "30", "--listen", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let conf = nd.join("net.d/10-pontoon.conflist");
    let t = Instant::now();
    while !conf.exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !conf.exists() {
        let _ = agent.kill();
        let out = agent.wait_with_output().unwrap();
        panic!(
            "no conflist from the API's Node object: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list: Value = serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
    assert_eq!(
        list["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
        "10.244.5.0/24"
    );
    // The route to the listed peer; a node created later gets one too, a deleted one loses it.
    let routes = |n: &Node| {
        String::from_utf8_lossy(&n.exec(&["ip", "route", "show", "proto", "201"]).stdout)
            .into_owned()
    };
    wait_for("the peer's route", || {
        routes(&node).contains("10.244.6.0/24 via 192.0.2.2")
    });
    api.apply(&with_kind(node_json("new", "192.0.2.3", "10.244.7.0/24")));
    wait_for("the watched node's route", || {
        routes(&node).contains("10.244.7.0/24 via 192.0.2.3")
    });
    api.kubectl(&["delete", "node", "peer"]);
    wait_for("the deleted node's route to go", || {
        !routes(&node).contains("10.244.6.0/24")
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(agent.wait().unwrap().code(), Some(0));
    // The agent asked for nothing but what its ClusterRole grants: get/list/watch nodes,
    // pods, namespaces and networkpolicies, and a patch of its own Node's status.
    let agent_get = [
        "GET /api/v1/nodes?",
        "GET /api/v1/pods?",
        "GET /api/v1/namespaces?",
        "GET /apis/networking.k8s.io/v1/networkpolicies?",
    ];
    let (mine, kubectl): (Vec<String>, Vec<String>) = api.requests().into_iter().partition(|r| {
        agent_get.iter().any(|p| r.starts_with(p)) || r.starts_with("PATCH /api/v1/nodes/me/status")
    });
    for p in agent_get {
        assert!(mine.iter().any(|r| r.starts_with(p)), "no {p} in {mine:?}");
    }
    for r in kubectl {
        // kubectl's own requests in this test (discovery, create, delete of nodes).
        assert!(
            r.starts_with("GET /api")
                || r.starts_with("GET /version")
                || r.starts_with("POST /api/v1/nodes")
                || r.starts_with("DELETE /api/v1/nodes/")
                || r.starts_with("GET /api/v1/nodes/"),
            "unexpected request {r}"
        );
    }
}

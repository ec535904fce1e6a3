//! The overlay across subnets: a router namespace between two underlay subnets, node 1 and 2 on
//! one, node 3 on the other, an agent per node reading the Nodes from the stand-in API server
//! (served from the router) and publishing its VTEP MAC on its own Node. With `auto`, 1 and 2
//! talk over a direct route and 3 over VXLAN, which counters on the nodes' uplinks prove
//! (encapsulated only towards node 3, nothing unencapsulated towards it, no fragments).
//! And the same over an IPv6-only underlay, from a static nodes file.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::standin::StandIn;
use common::*;
use serde_json::{Value, json};

/// Namespaces, agents and servers made by one test; all removed on drop, also on failure.
struct Cluster {
    prefix: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    agents: Vec<(String, Child)>,
    servers: Vec<EchoServer>,
    procs: Vec<Child>,
    api: Option<StandIn>,
    root_before: Vec<String>,
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        let prefix = format!("{tag}{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("pontoon-overlay-{prefix}"));
        std::fs::create_dir_all(&dir).unwrap();
        Cluster {
            prefix,
            dir,
            namespaces: vec![],
            agents: vec![],
            servers: vec![],
            procs: vec![],
            api: None,
            root_before: root_links(),
        }
    }

    fn ns(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        run_ok(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&ns, "link set lo up");
        ns
    }

    fn node_ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join(node)
    }

    /// Starts node `node`'s agent with the node source `source` and `extra` flags.
    fn start_agent(&mut self, node: &str, source: &[&str], extra: &[&str]) {
        let nd = self.node_dir(node);
        let log = std::fs::File::create(self.dir.join(format!("agent-{node}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns(node), BIN, "agent"])
            .args(["--node-name", node])
            .args(source)
            .arg("--cni-bin-dir")
            .arg(nd.join("bin"))
            .arg("--cni-conf-dir")
            .arg(nd.join("net.d"))
            .arg("--data-dir")
            .arg(nd.join("ipam"))
            .args(["--no-masquerade", "10.244.0.0/16,fd00:10:244::/48"])
            .args(["--interval", "1", "--listen", "127.0.0.1:9765"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push((node.to_string(), child));
    }

    /// Stops node `node`'s agent: SIGTERM (`crash` false) or SIGKILL.
    fn stop_agent(&mut self, node: &str, crash: bool) {
        let i = self.agents.iter().position(|(n, _)| n == node).unwrap();
        let (_, mut child) = self.agents.remove(i);
        if crash {
            child.kill().unwrap();
        } else {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
        }
        child.wait().unwrap();
    }

    fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("agent-{node}.log"))).unwrap_or_default()
    }

    fn conflist(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("net.d/10-pontoon.conflist")
    }

    /// A dual-stack pod on `node` (with the conflist its agent wrote): (netns, [v4, v6]).
    fn pod(&mut self, node: &str, name: &str) -> (String, Vec<String>) {
        let pod = self.ns(name);
        let r = add_pod_with_conflist(&self.node_dir(node), &self.node_ns(node), name, &pod, None);
        let ips = result_ips(&r);
        assert_eq!(ips.len(), 2, "a dual-stack pod: {r}");
        (pod, ips)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, a) in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        self.servers.clear();
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        self.api = None;
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if std::thread::panicking() {
            for f in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.starts_with("agent-") {
                    eprintln!(
                        "--- {name}:\n{}",
                        std::fs::read_to_string(f.path()).unwrap_or_default()
                    );
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if !std::thread::panicking() {
            assert_eq!(root_links(), self.root_before, "the root netns changed");
        }
    }
}

fn out(ns: &str, args: &[&str]) -> String {
    let o = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(ns: &str, args: &[&str]) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Waits until no IPv6 address in the namespaces is tentative: until its link-local address
/// passed duplicate detection, a router sends no neighbour solicitation for the hosts it
/// forwards to (the first packets of a fresh underlay would be lost).
fn settle_ipv6(namespaces: &[&str]) {
    for ns in namespaces {
        wait_for(&format!("{ns}'s IPv6 addresses to pass DAD"), || {
            out(ns, &["ip", "-6", "addr", "show", "tentative"])
                .trim()
                .is_empty()
        });
    }
}

fn ping(from: &str, to: &str) -> bool {
    ok(from, &["ping", "-c1", "-W2", to])
}

/// Both families' routes of the agent (protocol 201) on a node.
fn routes(ns: &str) -> String {
    out(ns, &["ip", "route", "show", "proto", "201"])
        + &out(ns, &["ip", "-6", "route", "show", "proto", "201"])
}

/// Permanent neighbour entries and forwarding entries of device `dev` on a node.
fn overlay_entries(ns: &str, dev: &str) -> String {
    out(ns, &["ip", "neigh", "show", "dev", dev, "nud", "permanent"])
        + &out(
            ns,
            &["ip", "-6", "neigh", "show", "dev", dev, "nud", "permanent"],
        )
        + &out(ns, &["bridge", "fdb", "show", "dev", dev])
}

fn link_json(ns: &str, dev: &str) -> Option<Value> {
    let s = out(ns, &["ip", "-j", "-d", "link", "show", dev]);
    serde_json::from_str::<Value>(&s)
        .ok()
        .and_then(|v| v.get(0).cloned())
}

fn mac_of(ns: &str, dev: &str) -> String {
    link_json(ns, dev).unwrap()["address"]
        .as_str()
        .unwrap()
        .to_string()
}

fn mtu_of(ns: &str, dev: &str) -> u64 {
    link_json(ns, dev).unwrap()["mtu"].as_u64().unwrap()
}

/// Named counters on a node's uplink, in its own tables (the agent never touches them): VXLAN
/// packets and unencapsulated pod packets leaving towards each peer (postrouting), and every
/// IP fragment arriving (the uplink's ingress, before any reassembly; a sender's fragments are
/// made after postrouting, so they are counted where they arrive).
fn add_probe(ns: &str, uplink: &str, peers: &[(&str, &str, &[&str])]) {
    let mut rules = String::from("table inet probe {\n");
    let mut chain = String::new();
    for (name, underlay, cidrs) in peers {
        let fam = if underlay.contains(':') { "ip6" } else { "ip" };
        rules.push_str(&format!(
            "  counter vx_{name} {{ }}\n  counter plain_{name} {{ }}\n"
        ));
        chain.push_str(&format!(
            "    oifname \"{uplink}\" {fam} daddr {underlay} udp dport 8472 counter name vx_{name}\n"
        ));
        for c in *cidrs {
            let f = if c.contains(':') { "ip6" } else { "ip" };
            chain.push_str(&format!(
                "    oifname \"{uplink}\" {f} daddr {c} counter name plain_{name}\n"
            ));
        }
    }
    rules.push_str(
        "  chain post {\n    type filter hook postrouting priority 300; policy accept;\n",
    );
    rules.push_str(&chain);
    rules.push_str("  }\n}\n");
    rules.push_str(&format!(
        "table netdev probe {{\n  counter fragments {{ }}\n  chain in {{\n    type filter hook \
         ingress device \"{uplink}\" priority 0; policy accept;\n    ip frag-off & 0x3fff != 0 \
         counter name fragments\n    ip6 nexthdr ipv6-frag counter name fragments\n  }}\n}}\n"
    ));
    let f = std::env::temp_dir().join(format!("pontoon-probe-{ns}.nft"));
    std::fs::write(&f, rules).unwrap();
    run_ok(&["ip", "netns", "exec", ns, "nft", "-f", f.to_str().unwrap()]);
    let _ = std::fs::remove_file(f);
}

/// (packets, bytes) of a probe counter (`fragments` is in the netdev table).
fn count(ns: &str, name: &str) -> (u64, u64) {
    let family = if name == "fragments" {
        "netdev"
    } else {
        "inet"
    };
    let s = out(ns, &["nft", "-j", "list", "counter", family, "probe", name]);
    let v: Value = serde_json::from_str(&s).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| {
            Some((
                o["counter"]["packets"].as_u64()?,
                o["counter"]["bytes"].as_u64()?,
            ))
        })
        .unwrap()
}

fn counter(ns: &str, name: &str) -> u64 {
    count(ns, name).0
}

fn reset_counters(ns: &str) {
    for family in ["inet", "netdev"] {
        run_ok(&[
            "ip", "netns", "exec", ns, "nft", "reset", "counters", "table", family, "probe",
        ]);
    }
}

/// A TCP sink in a pod on port 9000 (both families): reads to EOF, answers the byte count.
fn start_sink(c: &mut Cluster, pod: &str) {
    let code = r#"
import socket, threading
def serve(fam, addr):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, 9000)); s.listen(8)
    while True:
        conn, _ = s.accept(); n = 0
        while True:
            b = conn.recv(1 << 16)
            if not b: break
            n += len(b)
        conn.sendall(str(n).encode()); conn.close()
for a in [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]:
    threading.Thread(target=serve, args=a, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;
    let child = spawn_ready(
        Command::new("ip").args(["netns", "exec", pod, "python3", "-c", code]),
        "the TCP sink",
    );
    c.procs.push(child);
}

/// Sends `bytes` over TCP from `pod` to `addr`:9000 within 60 s; what the sink counted.
fn transfer(pod: &str, addr: &str, bytes: usize) -> u64 {
    let code = format!(
        "import socket\ns = socket.create_connection(({addr:?}, 9000), 5)\ns.settimeout(60)\n\
         chunk = b'x' * (1 << 20)\nfor _ in range({bytes} >> 20): s.sendall(chunk)\n\
         s.shutdown(socket.SHUT_WR)\nprint(s.recv(100).decode())\n"
    );
    let o = Command::new("ip")
        .args(["netns", "exec", pod, "python3", "-c", &code])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "transfer {pod} -> {addr}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

fn node_obj(name: &str, ips: &[&str], cidrs: &[&str]) -> Value {
    json!({"kind": "Node", "apiVersion": "v1",
           "metadata": {"name": name},
           "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
           "status": {"addresses": ips.iter()
               .map(|a| json!({"type": "InternalIP", "address": a}))
               .collect::<Vec<_>>()}})
}

fn annotations(api: &StandIn, node: &str) -> Value {
    let s = api.kubectl(&["get", "node", node, "-o", "json"]);
    serde_json::from_str::<Value>(&s).unwrap()["metadata"]["annotations"].clone()
}

/// Node `n` of the two-subnet cluster: its underlay addresses and pod CIDRs.
fn addrs(n: usize) -> (String, String, [String; 2]) {
    let (v4, v6) = if n == 3 {
        ("198.51.100.13".to_string(), "2001:db8:b::13".to_string())
    } else {
        (format!("192.0.2.1{n}"), format!("2001:db8:a::1{n}"))
    };
    (
        v4,
        v6,
        [format!("10.244.{n}.0/24"), format!("fd00:10:244:{n}::/64")],
    )
}

#[test]
fn auto_routes_direct_on_a_shared_subnet_and_vxlan_across_the_router() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("ov");
    // The router: subnet A on a bridge (nodes 1 and 2), subnet B on a veth (node 3).
    let rt = c.ns("rt");
    for s in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        run_ok(&["ip", "netns", "exec", &rt, "sysctl", "-qw", s]);
    }
    ip(&rt, "link add bra type bridge");
    ip(&rt, "addr add 192.0.2.1/24 dev bra");
    ip(&rt, "addr add 2001:db8:a::1/64 dev bra nodad");
    ip(&rt, "link set bra up");
    for n in 1..=3 {
        let name = format!("n{n}");
        let ns = c.ns(&name);
        ip(
            &rt,
            &format!("link add r{n} type veth peer name eth0 netns {ns}"),
        );
        let (v4, v6, _) = addrs(n);
        let (gw4, gw6, len) = if n == 3 {
            ip(&rt, "addr add 198.51.100.1/24 dev r3");
            ip(&rt, "addr add 2001:db8:b::1/64 dev r3 nodad");
            ("198.51.100.1", "2001:db8:b::1", 24)
        } else {
            ip(&rt, &format!("link set r{n} master bra"));
            ("192.0.2.1", "2001:db8:a::1", 24)
        };
        ip(&rt, &format!("link set r{n} up"));
        // Keeps a new address when the old primary one goes (the InternalIP change below).
        run_ok(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.conf.eth0.promote_secondaries=1",
        ]);
        ip(&ns, &format!("addr add {v4}/{len} dev eth0"));
        ip(&ns, &format!("addr add {v6}/64 dev eth0 nodad"));
        ip(&ns, "link set eth0 up");
        ip(&ns, &format!("route add default via {gw4}"));
        ip(&ns, &format!("-6 route add default via {gw6}"));
    }
    let objs: Vec<Value> = (1..=3)
        .map(|n| {
            let (v4, v6, cidrs) = addrs(n);
            node_obj(&format!("n{n}"), &[&v4, &v6], &[&cidrs[0], &cidrs[1]])
        })
        .collect();
    c.api = Some(StandIn::start(
        &rt,
        "192.0.2.1:16443",
        &c.dir.join("api"),
        &objs,
    ));
    let kubeconfig = c.api.as_ref().unwrap().kubeconfig();
    let kc = kubeconfig.to_str().unwrap().to_string();
    for n in 1..=3 {
        c.start_agent(&format!("n{n}"), &["--kubeconfig", &kc], &[]);
    }
    for n in 1..=3 {
        let f = c.conflist(&format!("n{n}"));
        wait_for(&format!("n{n}'s conflist"), || f.exists());
    }
    // Pods here may cross the overlay: the installed conflist says the underlay MTU minus
    // 50 bytes (IPv4 underlay).
    for n in 1..=3 {
        let list: Value =
            serde_json::from_slice(&std::fs::read(c.conflist(&format!("n{n}"))).unwrap()).unwrap();
        assert_eq!(list["plugins"][0]["mtu"], 1450, "n{n}: {list}");
    }
    let n1 = c.node_ns("n1");
    let n2 = c.node_ns("n2");
    let n3 = c.node_ns("n3");
    // Each node publishes its VTEP MACs (its devices' addresses) on its own Node.
    {
        let api = c.api.as_ref().unwrap();
        for (n, ns) in [("n1", &n1), ("n2", &n2), ("n3", &n3)] {
            wait_for(&format!("{n}'s annotations"), || {
                annotations(api, n)["pontoon.dev/vtep6-mac"].is_string()
            });
            let a = annotations(api, n);
            assert_eq!(
                a["pontoon.dev/vtep-mac"],
                mac_of(ns, "pontoon.vxlan"),
                "{n}"
            );
            assert_eq!(
                a["pontoon.dev/vtep6-mac"],
                mac_of(ns, "pontoon.vxlan6"),
                "{n}"
            );
        }
    }
    // The device as the issue asks: VNI 1, port 8472, learning off, over the InternalIP.
    let dev = link_json(&n1, "pontoon.vxlan").unwrap();
    let vx = &dev["linkinfo"]["info_data"];
    assert_eq!(vx["id"], 1, "{dev}");
    assert_eq!(vx["port"], 8472, "{dev}");
    assert_eq!(vx["learning"], false, "{dev}");
    assert_eq!(vx["local"], "192.0.2.11", "{dev}");
    assert_eq!(mtu_of(&n1, "pontoon.vxlan"), 1450);

    // Routes on n1: n2 direct via its InternalIP, n3 via its VTEP address on the overlay.
    wait_for("n1's routes to both peers, both families", || {
        let r = routes(&n1);
        r.contains("10.244.2.0/24 via 192.0.2.12 dev eth0")
            && r.contains("fd00:10:244:2::/64 via 2001:db8:a::12 dev eth0")
            && r.contains("10.244.3.0/24 via 10.244.3.0 dev pontoon.vxlan")
            && r.contains("fd00:10:244:3::/64 via fd00:10:244:3:: dev pontoon.vxlan")
    });
    let r = routes(&n1);
    assert!(r.contains("onlink"), "{r}");
    wait_for("n3's routes to 1 and 2 over the overlay", || {
        let r = routes(&n3);
        r.contains("10.244.1.0/24 via 10.244.1.0 dev pontoon.vxlan")
            && r.contains("10.244.2.0/24 via 10.244.2.0 dev pontoon.vxlan")
            && r.contains("fd00:10:244:1::/64 via fd00:10:244:1:: dev pontoon.vxlan")
            && r.contains("fd00:10:244:2::/64 via fd00:10:244:2:: dev pontoon.vxlan")
    });
    wait_for("n2's routes to 1 (direct) and 3 (overlay)", || {
        let r = routes(&n2);
        r.contains("10.244.1.0/24 via 192.0.2.11 dev eth0")
            && r.contains("fd00:10:244:1::/64 via 2001:db8:a::11 dev eth0")
            && r.contains("10.244.3.0/24 via 10.244.3.0 dev pontoon.vxlan")
            && r.contains("fd00:10:244:3::/64 via fd00:10:244:3:: dev pontoon.vxlan")
    });
    let mac3 = mac_of(&n3, "pontoon.vxlan");
    let e = overlay_entries(&n1, "pontoon.vxlan");
    assert!(e.contains(&format!("10.244.3.0 lladdr {mac3}")), "{e}");
    assert!(e.contains(&format!("{mac3} dst 198.51.100.13")), "{e}");
    assert!(
        !e.contains("192.0.2.12"),
        "no overlay entry for the direct peer: {e}"
    );

    // One pod per node; each reaches every other, both families, ping and TCP, with its own
    // address (no NAT between pods).
    settle_ipv6(&[&rt, &n1, &n2, &n3]);
    let pods: Vec<(String, Vec<String>)> = (1..=3)
        .map(|n| c.pod(&format!("n{n}"), &format!("p{n}")))
        .collect();
    for (p, _) in &pods {
        assert_eq!(mtu_of(p, "eth0"), 1450, "{p}'s MTU");
    }
    for (p, ips) in &pods {
        let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        let s = EchoServer::start(p, &refs);
        c.servers.push(s);
    }
    let peers = |me: usize| -> Vec<(String, String, Vec<String>)> {
        (1..=3)
            .filter(|n| *n != me)
            .map(|n| {
                let (v4, _, cidrs) = addrs(n);
                (format!("n{n}"), v4, cidrs.to_vec())
            })
            .collect()
    };
    for (me, ns) in [(1, &n1), (2, &n2), (3, &n3)] {
        let p = peers(me);
        let list: Vec<(&str, &str, Vec<&str>)> = p
            .iter()
            .map(|(n, u, c)| {
                (
                    n.as_str(),
                    u.as_str(),
                    c.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        let refs: Vec<(&str, &str, &[&str])> = list
            .iter()
            .map(|(n, u, c)| (*n, *u, c.as_slice()))
            .collect();
        add_probe(ns, "eth0", &refs);
    }
    for (i, (from, _)) in pods.iter().enumerate() {
        for (j, (_, ips)) in pods.iter().enumerate() {
            if i == j {
                continue;
            }
            for to in ips {
                assert!(ping(from, to), "ping {from} -> {to}");
                assert_eq!(whoami(from, to), pods[i].1[usize::from(to.contains(':'))]);
            }
        }
    }
    // Encapsulated only towards node 3; towards node 2 plain; nothing plain towards node 3.
    for (ns, direct, overlay) in [(&n1, "n2", "n3"), (&n2, "n1", "n3")] {
        assert_eq!(
            counter(ns, &format!("vx_{direct}")),
            0,
            "{ns}: VXLAN to {direct}"
        );
        assert!(
            counter(ns, &format!("plain_{direct}")) > 0,
            "{ns}: direct to {direct}"
        );
        assert!(
            counter(ns, &format!("vx_{overlay}")) > 0,
            "{ns}: VXLAN to {overlay}"
        );
        assert_eq!(
            counter(ns, &format!("plain_{overlay}")),
            0,
            "{ns}: plain to {overlay}"
        );
    }
    for peer in ["n1", "n2"] {
        assert!(counter(&n3, &format!("vx_{peer}")) > 0);
        assert_eq!(counter(&n3, &format!("plain_{peer}")), 0);
    }

    // A full-size transfer each way, both families: complete, and no fragment on the underlay.
    start_sink(&mut c, &pods[2].0);
    start_sink(&mut c, &pods[0].0);
    for ns in [&n1, &n3] {
        reset_counters(ns);
    }
    const BYTES: usize = 32 << 20;
    for fam in 0..2 {
        assert_eq!(transfer(&pods[0].0, &pods[2].1[fam], BYTES), BYTES as u64);
        assert_eq!(transfer(&pods[2].0, &pods[0].1[fam], BYTES), BYTES as u64);
    }
    // (Bytes, not packets: segmentation offload hands postrouting packets of up to 64 KiB.)
    assert!(
        count(&n1, "vx_n3").1 > 2 * BYTES as u64,
        "the transfer went over the overlay: {:?}",
        count(&n1, "vx_n3")
    );
    assert_eq!(counter(&n1, "fragments"), 0, "fragments on n1's uplink");
    assert_eq!(counter(&n3, "fragments"), 0, "fragments on n3's uplink");

    // n3 changes its InternalIP (kubelet updates the status): the others follow in place.
    ip(&n3, "addr add 198.51.100.23/24 dev eth0");
    c.api.as_ref().unwrap().kubectl(&[
        "patch",
        "node",
        "n3",
        "--subresource=status",
        "--type=merge",
        "-p",
        &json!({"status": {"addresses": [
            {"type": "InternalIP", "address": "198.51.100.23"},
            {"type": "InternalIP", "address": "2001:db8:b::13"}]}})
        .to_string(),
    ]);
    for ns in [&n1, &n2] {
        wait_for("the forwarding entry to follow n3's address", || {
            let e = overlay_entries(ns, "pontoon.vxlan");
            e.contains(&format!("{mac3} dst 198.51.100.23")) && !e.contains("198.51.100.13")
        });
    }
    wait_for("n3's device to use its new address", || {
        // (None while it is being re-made.)
        link_json(&n3, "pontoon.vxlan")
            .is_some_and(|l| l["linkinfo"]["info_data"]["local"] == "198.51.100.23")
    });
    ip(&n3, "addr del 198.51.100.13/24 dev eth0");
    wait_for("p1 -> p3 after the move", || {
        ping(&pods[0].0, &pods[2].1[0])
    });
    assert!(
        ping(&pods[2].0, &pods[1].1[1]),
        "p3 -> p2 (IPv6) after the move"
    );
    assert_eq!(whoami(&pods[1].0, &pods[2].1[0]), pods[1].1[0]);

    // n3's VTEP MAC changes (here by hand, its agent stopped): the others follow what its
    // Node says, in place; its restarted agent puts its own MAC back (and the neighbour
    // entries the change flushed), republishes it, and the others follow again.
    c.stop_agent("n3", false);
    let other = "02:00:00:00:03:33";
    ip(&n3, &format!("link set pontoon.vxlan address {other}"));
    c.api.as_ref().unwrap().kubectl(&[
        "annotate",
        "node",
        "n3",
        "--overwrite",
        &format!("pontoon.dev/vtep-mac={other}"),
    ]);
    for ns in [&n1, &n2] {
        wait_for("the others to follow n3's new MAC", || {
            let e = overlay_entries(ns, "pontoon.vxlan");
            e.contains(&format!("10.244.3.0 lladdr {other}"))
                && e.contains(&format!("{other} dst 198.51.100.23"))
                && !e.contains(&mac3)
        });
    }
    // (Traffic to n3 now waits for its agent: a MAC change flushes the device's neighbour
    // entries, which only the agent's pass that changes the MAC restores.)
    c.start_agent("n3", &["--kubeconfig", &kc], &[]);
    wait_for("n3's agent to republish its own MAC", || {
        annotations(c.api.as_ref().unwrap(), "n3")["pontoon.dev/vtep-mac"] == mac3.as_str()
    });
    assert_eq!(mac_of(&n3, "pontoon.vxlan"), mac3);
    wait_for("n1 to follow back", || {
        overlay_entries(&n1, "pontoon.vxlan").contains(&format!("{mac3} dst 198.51.100.23"))
    });
    wait_for("p1 -> p3 again", || ping(&pods[0].0, &pods[2].1[0]));

    // Node 3 leaves: its route, neighbour and forwarding entries go from the others.
    c.api.as_ref().unwrap().kubectl(&["delete", "node", "n3"]);
    for ns in [&n1, &n2] {
        wait_for("n3's entries to go", || {
            let r = routes(ns);
            let e = overlay_entries(ns, "pontoon.vxlan");
            !r.contains("10.244.3.0") && !r.contains("fd00:10:244:3:") && !e.contains(&mac3)
        });
        assert!(!overlay_entries(ns, "pontoon.vxlan").contains("10.244.3.0"));
    }
    assert!(!ping(&pods[0].0, &pods[2].1[0]));

    // It comes back; n1's agent is killed, n3 is deleted meanwhile: the restarted agent
    // removes what no peer needs any more.
    let (_, v6, cidrs) = addrs(3);
    c.api.as_ref().unwrap().apply(&node_obj(
        "n3",
        &["198.51.100.23", &v6],
        &[&cidrs[0], &cidrs[1]],
    ));
    wait_for("n3 back on n1", || {
        routes(&n1).contains("10.244.3.0/24 via 10.244.3.0 dev pontoon.vxlan")
            && ping(&pods[0].0, &pods[2].1[0])
    });
    c.stop_agent("n1", true);
    c.api.as_ref().unwrap().kubectl(&["delete", "node", "n3"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        overlay_entries(&n1, "pontoon.vxlan").contains(&mac3),
        "left behind by the crash"
    );
    c.start_agent("n1", &["--kubeconfig", &kc], &[]);
    wait_for("the restarted agent to remove n3's leftovers", || {
        let r = routes(&n1);
        !r.contains("10.244.3.0")
            && !r.contains("fd00:10:244:3:")
            && !overlay_entries(&n1, "pontoon.vxlan").contains(&mac3)
    });
    // ... and keeps what is still needed.
    assert!(routes(&n1).contains("10.244.2.0/24 via 192.0.2.12"));
    assert!(ping(&pods[0].0, &pods[1].1[0]));
    assert!(!c.agent_log("n1").contains("panicked"));
}

#[test]
fn an_ipv6_only_underlay_carries_both_families_from_a_nodes_file() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("ov6");
    let rt = c.ns("rt");
    run_ok(&[
        "ip",
        "netns",
        "exec",
        &rt,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.forwarding=1",
    ]);
    let mut objs = vec![];
    for n in 1..=2 {
        let ns = c.ns(&format!("n{n}"));
        ip(
            &rt,
            &format!("link add r{n} type veth peer name eth0 netns {ns}"),
        );
        ip(&rt, &format!("addr add 2001:db8:{n}::1/64 dev r{n} nodad"));
        ip(&rt, &format!("link set r{n} up"));
        ip(&ns, &format!("addr add 2001:db8:{n}::10/64 dev eth0 nodad"));
        ip(&ns, "link set eth0 up");
        ip(&ns, &format!("-6 route add default via 2001:db8:{n}::1"));
        objs.push(node_obj(
            &format!("n{n}"),
            &[&format!("2001:db8:{n}::10")],
            &[
                &format!("10.244.{n}.0/24"),
                &format!("fd00:10:244:{n}::/64"),
            ],
        ));
    }
    let file = c.dir.join("nodes.json");
    std::fs::write(
        &file,
        json!({"kind": "NodeList", "items": objs}).to_string(),
    )
    .unwrap();
    let f = file.to_str().unwrap().to_string();
    // n2 turns its device's transmit checksum offload off (the old-kernel switch); n1 keeps
    // the kernel's default. Traffic must flow both ways either way.
    c.start_agent("n1", &["--nodes-file", &f], &[]);
    c.start_agent(
        "n2",
        &["--nodes-file", &f],
        &["--vxlan-checksum-offload", "false"],
    );
    for n in 1..=2 {
        let f = c.conflist(&format!("n{n}"));
        wait_for(&format!("n{n}'s conflist"), || f.exists());
        let list: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        assert_eq!(
            list["plugins"][0]["mtu"], 1430,
            "70 bytes less over IPv6: {list}"
        );
    }
    let (n1, n2) = (c.node_ns("n1"), c.node_ns("n2"));
    assert!(
        link_json(&n1, "pontoon.vxlan").is_none(),
        "no IPv4 underlay, no IPv4 device"
    );
    let dev = link_json(&n1, "pontoon.vxlan6").unwrap();
    assert_eq!(
        dev["linkinfo"]["info_data"]["local6"], "2001:db8:1::10",
        "{dev}"
    );
    wait_for("both families' routes over the IPv6 device", || {
        let r = routes(&n1);
        r.contains("10.244.2.0/24 via 10.244.2.0 dev pontoon.vxlan6")
            && r.contains("fd00:10:244:2::/64 via fd00:10:244:2:: dev pontoon.vxlan6")
    });
    wait_for("n2's routes back", || {
        let r = routes(&n2);
        r.contains("10.244.1.0/24 via 10.244.1.0 dev pontoon.vxlan6")
            && r.contains("fd00:10:244:1::/64 via fd00:10:244:1:: dev pontoon.vxlan6")
    });
    let tx_csum = |node: &str| {
        let k = out(node, &["ethtool", "-k", "pontoon.vxlan6"]);
        k.lines()
            .find(|l| l.starts_with("tx-checksumming:"))
            .unwrap_or_else(|| panic!("no tx-checksumming in ethtool -k: {k}"))
            .to_string()
    };
    assert!(tx_csum(&n1).contains(": on"), "n1: {}", tx_csum(&n1));
    assert!(tx_csum(&n2).contains(": off"), "n2: {}", tx_csum(&n2));
    // A nodes file carries no annotations: both sides derive the same MAC from the name.
    let e = overlay_entries(&n1, "pontoon.vxlan6");
    assert!(
        e.contains(&format!(
            "{} dst 2001:db8:2::10",
            mac_of(&n2, "pontoon.vxlan6")
        )),
        "{e}"
    );
    add_probe(
        &n1,
        "eth0",
        &[(
            "n2",
            "2001:db8:2::10",
            &["10.244.2.0/24", "fd00:10:244:2::/64"],
        )],
    );
    settle_ipv6(&[&rt, &n1, &n2]);
    let p1 = c.pod("n1", "p1");
    let p2 = c.pod("n2", "p2");
    assert_eq!(mtu_of(&p1.0, "eth0"), 1430);
    for fam in 0..2 {
        assert!(ping(&p1.0, &p2.1[fam]), "p1 -> p2 {}", p2.1[fam]);
        assert!(ping(&p2.0, &p1.1[fam]), "p2 -> p1 {}", p1.1[fam]);
    }
    start_sink(&mut c, &p2.0);
    for fam in 0..2 {
        assert_eq!(transfer(&p1.0, &p2.1[fam], 16 << 20), 16 << 20);
    }
    assert!(count(&n1, "vx_n2").1 > 2 * (16 << 20));
    assert_eq!(counter(&n1, "plain_n2"), 0);
    assert_eq!(counter(&n1, "fragments"), 0);
}

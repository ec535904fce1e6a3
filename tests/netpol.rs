//! NetworkPolicy truth tables, in the style of the upstream network-policy e2e suite:
//! namespaces x, y, z with pods a, b, c each, spread over two nodes (namespaces on one
//! underlay, an agent per node reading Pods, Namespaces and NetworkPolicies from the stand-in
//! API server). For each case an evaluator written here from the API's rules computes the 9×9
//! reachability matrix for TCP 80, TCP 81 and UDP 80; real probes between the pod namespaces
//! must match it exactly (polled until they do, within a few seconds of the change). A
//! mismatch prints both matrices.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::standin::StandIn;
use common::*;
use ipnetwork::IpNetwork;
use serde_json::{Value, json};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const SERVICE_IP: &str = "10.96.0.10";

struct World {
    prefix: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    children: Vec<Child>,
    /// Each node's agent.
    agents: BTreeMap<String, Child>,
    api: Option<StandIn>,
    /// (namespace, name) → (pod netns, node, [v4, v6]).
    pods: BTreeMap<(String, String), (String, String, Vec<String>)>,
    /// The Pod objects as applied (labels change in some cases).
    objects: BTreeMap<(String, String), Value>,
    root_before: Vec<String>,
}

impl Drop for World {
    fn drop(&mut self) {
        for c in self.children.iter_mut().chain(self.agents.values_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.api = None;
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if std::thread::panicking() {
            for n in ["n1", "n2"] {
                let log = std::fs::read_to_string(self.dir.join(format!("agent-{n}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- agent {n} (last lines):");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if !std::thread::panicking() {
            assert_eq!(root_links(), self.root_before, "the root netns changed");
        }
    }
}

fn pod_json(ns: &str, name: &str, node: &str, labels: Value, ips: &[String]) -> Value {
    let port =
        |n: &str, p: u16, proto: &str| json!({"name": n, "containerPort": p, "protocol": proto});
    json!({"kind": "Pod", "apiVersion": "v1",
    "metadata": {"namespace": ns, "name": name, "labels": labels},
    "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none", "ports": [
        port("serve-80-tcp", 80, "TCP"), port("serve-81-tcp", 81, "TCP"),
        port("serve-80-udp", 80, "UDP"), port("serve-81-udp", 81, "UDP"),
        port("dns", 53, "UDP")]}]},
    "status": if ips.is_empty() {
        // Scheduled, not yet reported by kubelet.
        json!({"phase": "Pending"})
    } else {
        json!({"phase": "Running", "podIP": ips[0],
               "podIPs": ips.iter().map(|i| json!({"ip": i})).collect::<Vec<_>>()})
    }})
}

fn ns_json(name: &str, labels: Value) -> Value {
    let mut l = labels;
    l["kubernetes.io/metadata.name"] = json!(name);
    json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": name, "labels": l}})
}

const SERVER: &str = r#"
import socket, threading
def tcp(fam, addr, port):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port)); s.listen(128)
    while True:
        c, _ = s.accept(); c.sendall(b"ok"); c.close()
def udp(fam, addr, port):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    while True:
        d, p = s.recvfrom(100); s.sendto(b"ok", p)
for fam, addr in [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]:
    for p in (80, 81):
        threading.Thread(target=tcp, args=(fam, addr, p), daemon=True).start()
    for p in (80, 81, 53):
        threading.Thread(target=udp, args=(fam, addr, p), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// Probes `targets` ("proto/port@addr") from one pod concurrently; what answered.
const PROBER: &str = r#"
import socket, sys, json, threading
res = {}
def probe(t):
    proto, rest = t.split("/", 1)
    port, addr = rest.split("@", 1)
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    ok = False
    try:
        if proto == "tcp":
            s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(1.0)
            s.connect((addr, int(port))); ok = s.recv(2) == b"ok"
        else:
            s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(1.0)
            for _ in range(2):
                s.sendto(b"x", (addr, int(port)))
                try:
                    ok = s.recv(2) == b"ok"; break
                except socket.timeout:
                    pass
        s.close()
    except Exception:
        ok = False
    res[t] = ok
ts = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[1:]]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(res))
"#;

impl World {
    fn new() -> World {
        let prefix = format!("np{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("pontoon-netpol-{prefix}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = World {
            prefix,
            dir,
            namespaces: vec![],
            children: vec![],
            agents: BTreeMap::new(),
            api: None,
            pods: BTreeMap::new(),
            objects: BTreeMap::new(),
            root_before: root_links(),
        };
        let ul = w.ns("ul");
        ip(&ul, "link add ubr type bridge");
        ip(&ul, "addr add 192.0.2.1/24 dev ubr");
        ip(&ul, "link set ubr up");
        let mut objs = vec![];
        for (i, n) in ["n1", "n2"].iter().enumerate() {
            let ns = w.ns(n);
            ip(
                &ul,
                &format!("link add u{i} type veth peer name eth0 netns {ns}"),
            );
            ip(&ul, &format!("link set u{i} master ubr up"));
            ip(&ns, &format!("addr add 192.0.2.1{}/24 dev eth0", i + 1));
            ip(
                &ns,
                &format!("addr add 2001:db8::1{}/64 dev eth0 nodad", i + 1),
            );
            ip(&ns, "link set eth0 up");
            ip(&ns, "route add default via 192.0.2.1");
            // kube-proxy's part of a Service: 10.96.0.10:80 → x/a:80 (filled in below).
            objs.push(json!({"kind": "Node", "apiVersion": "v1", "metadata": {"name": n},
                "spec": {"podCIDRs": [format!("10.244.{}.0/24", i + 1), format!("fd00:10:244:{}::/64", i + 1)]},
                "status": {"addresses": [{"type": "InternalIP", "address": format!("192.0.2.1{}", i + 1)}, {"type": "InternalIP", "address": format!("2001:db8::1{}", i + 1)}]}}));
        }
        for ns in NAMESPACES {
            objs.push(ns_json(ns, json!({"ns": ns})));
        }
        w.api = Some(StandIn::start(
            &ul,
            "192.0.2.1:16443",
            &w.dir.join("api"),
            &objs,
        ));
        for n in ["n1", "n2"] {
            w.start_agent(n, &[]);
        }
        for n in ["n1", "n2"] {
            let f = w.dir.join(n).join("net.d/10-pontoon.conflist");
            wait_for(&format!("{n}'s conflist"), || f.exists());
        }
        wait_for("the routes between the nodes", || {
            out(&w.node_ns("n1"), &["ip", "route", "show", "proto", "201"])
                .contains("10.244.2.0/24")
                && out(&w.node_ns("n2"), &["ip", "route", "show", "proto", "201"])
                    .contains("10.244.1.0/24")
                && out(
                    &w.node_ns("n1"),
                    &["ip", "-6", "route", "show", "proto", "201"],
                )
                .contains("fd00:10:244:2::/64")
                && out(
                    &w.node_ns("n2"),
                    &["ip", "-6", "route", "show", "proto", "201"],
                )
                .contains("fd00:10:244:1::/64")
        });
        let mut i = 0;
        for ns in NAMESPACES {
            for p in PODS {
                let node = if i % 2 == 0 { "n1" } else { "n2" };
                i += 1;
                w.add_pod(ns, p, node, json!({"pod": p}));
            }
        }
        // The Service: DNAT on both nodes, as kube-proxy would program it.
        let target = w.pods[&("x".to_string(), "a".to_string())].2[0].clone();
        for n in ["n1", "n2"] {
            let rules = format!(
                "table ip kubeproxy {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n  \
                 ip daddr {SERVICE_IP} tcp dport 80 dnat to {target}:80\n }}\n}}\n"
            );
            let f = w.dir.join("kubeproxy.nft");
            std::fs::write(&f, rules).unwrap();
            run_ok(&[
                "ip",
                "netns",
                "exec",
                &w.node_ns(n),
                "nft",
                "-f",
                f.to_str().unwrap(),
            ]);
        }
        w
    }

    fn ns(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        run_ok(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&ns, "link set lo up");
        ns
    }

    fn node_ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    /// Starts node `n`'s agent (stopping the one running first).
    fn start_agent(&mut self, n: &str, extra: &[&str]) {
        if let Some(mut old) = self.agents.remove(n) {
            let _ = old.kill();
            let _ = old.wait();
        }
        let nd = self.dir.join(n);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("agent-{n}.log")))
            .unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.node_ns(n),
                BIN,
                "agent",
                "--node-name",
                n,
            ])
            .arg("--kubeconfig")
            .arg(self.api.as_ref().unwrap().kubeconfig())
            .arg("--cni-bin-dir")
            .arg(nd.join("bin"))
            .arg("--cni-conf-dir")
            .arg(nd.join("net.d"))
            .arg("--data-dir")
            .arg(nd.join("ipam"))
            .args([
                "--no-masquerade",
                "10.244.0.0/16,fd00:10:244::/48,10.96.0.0/16",
            ])
            .args([
                "--routing",
                "direct",
                "--interval",
                "5",
                "--listen",
                "127.0.0.1:9765",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.insert(n.to_string(), child);
    }

    fn api(&self) -> &StandIn {
        self.api.as_ref().unwrap()
    }

    /// A pod as Kubernetes makes one: its Pod object, then its CNI ADD on its node and a server
    /// in it, then kubelet's status update with its addresses.
    fn add_pod(&mut self, ns: &str, name: &str, node: &str, labels: Value) {
        self.add_pod_scheduled(ns, name, node, labels);
        self.report_status(ns, name);
    }

    /// kubelet's status update: the Pod object gets its addresses and phase Running.
    fn report_status(&mut self, ns: &str, name: &str) {
        let k = (ns.to_string(), name.to_string());
        let obj = &self.objects[&k];
        let full = pod_json(
            ns,
            name,
            obj["spec"]["nodeName"].as_str().unwrap(),
            obj["metadata"]["labels"].clone(),
            &self.pods[&k].2,
        );
        // The status subresource, as kubelet writes it (a replace of the Pod leaves its status
        // alone, in the stand-in as in a real API server).
        self.api().kubectl(&[
            "patch",
            "pod",
            "-n",
            ns,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &json!({"status": full["status"]}).to_string(),
        ]);
        self.objects.insert(k, full);
    }

    /// A pod scheduled (its Pod object without addresses, as the scheduler leaves it), its
    /// CNI ADD done and its server running, before kubelet reports its status. Its addresses.
    fn add_pod_scheduled(
        &mut self,
        ns: &str,
        name: &str,
        node: &str,
        labels: Value,
    ) -> Vec<String> {
        let obj = pod_json(ns, name, node, labels, &[]);
        self.api().apply(&obj);
        let netns = self.ns(&format!("{ns}{name}"));
        let r = add_pod_with_conflist(
            &self.dir.join(node),
            &self.node_ns(node),
            &format!("{ns}-{name}"),
            &netns,
            Some((ns, name)),
        );
        let ips = result_ips(&r);
        assert_eq!(ips.len(), 2, "{r}");
        let server = spawn_ready(
            Command::new("ip").args(["netns", "exec", &netns, "python3", "-c", SERVER]),
            "the pod's servers",
        );
        self.children.push(server);
        self.objects.insert((ns.into(), name.into()), obj);
        self.pods
            .insert((ns.into(), name.into()), (netns, node.into(), ips.clone()));
        ips
    }

    fn relabel_pod(&mut self, ns: &str, name: &str, labels: Value) {
        let k = (ns.to_string(), name.to_string());
        let mut obj = self.objects[&k].clone();
        obj["metadata"]["labels"] = labels;
        self.api().apply(&obj);
        self.objects.insert(k, obj);
    }

    fn apply_policies(&self, policies: &[Value]) {
        for p in policies {
            self.api().apply(p);
        }
    }

    fn delete_policies(&self, policies: &[Value]) {
        for p in policies {
            self.api().kubectl(&[
                "delete",
                "networkpolicy",
                "-n",
                p["metadata"]["namespace"].as_str().unwrap(),
                p["metadata"]["name"].as_str().unwrap(),
            ]);
        }
    }

    /// Probes every pair (and `extra` targets) and returns what answered, keyed as the
    /// evaluator keys its expectations: "src -> dst proto/port".
    fn probe(
        &self,
        family: usize,
        ports: &[&str],
        only: Option<&[(String, String)]>,
    ) -> BTreeMap<String, bool> {
        let keys: Vec<(String, String)> = self.pods.keys().cloned().collect();
        let sources: Vec<&(String, String)> = match only {
            Some(o) => keys.iter().filter(|k| o.contains(k)).collect(),
            None => keys.iter().collect(),
        };
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let (netns, _, _) = &self.pods[*src];
                let mut targets = vec![];
                for dst in &keys {
                    if dst == *src {
                        continue;
                    }
                    for p in ports {
                        targets.push(format!("{p}@{}", self.pods[dst].2[family]));
                    }
                }
                let child = Command::new("ip")
                    .args(["netns", "exec", netns, "python3", "-c", PROBER])
                    .args(&targets)
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                ((*src).clone(), child)
            })
            .collect();
        let by_addr: BTreeMap<String, (String, String)> = keys
            .iter()
            .map(|k| (self.pods[k].2[family].clone(), k.clone()))
            .collect();
        let mut out = BTreeMap::new();
        for (src, child) in handles {
            let o = child.wait_with_output().unwrap();
            let res: BTreeMap<String, bool> = serde_json::from_slice(&o.stdout).unwrap();
            for (t, ok) in res {
                let (p, addr) = t.split_once('@').unwrap();
                let dst = &by_addr[addr];
                out.insert(key(&src, dst, p), ok);
            }
        }
        out
    }

    /// Probes from `src` to one address (a Service).
    fn probe_one(&self, src: &(String, String), target: &str) -> bool {
        self.probe_from(&self.pods[src].0, target)
    }

    /// Probes from any of the test's namespaces (a pod's, or a node's own) to one target.
    fn probe_from(&self, netns: &str, target: &str) -> bool {
        let o = Command::new("ip")
            .args(["netns", "exec", netns, "python3", "-c", PROBER, target])
            .output()
            .unwrap();
        let res: BTreeMap<String, bool> = serde_json::from_slice(&o.stdout).unwrap();
        res[target]
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

fn key(src: &(String, String), dst: &(String, String), port: &str) -> String {
    format!("{}/{} -> {}/{} {port}", src.0, src.1, dst.0, dst.1)
}

// ---- the evaluator: the API's rules, written from the documentation ----

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(sel: &Value, l: &BTreeMap<String, String>) -> bool {
    let ml = labels(&sel["matchLabels"])
        .into_iter()
        .all(|(k, v)| l.get(&k) == Some(&v));
    let me = sel["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let k = e["key"].as_str().unwrap();
            let vals: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v.as_str().unwrap())
                .collect();
            match e["operator"].as_str().unwrap() {
                "In" => l.get(k).is_some_and(|v| vals.contains(&v.as_str())),
                "NotIn" => !l.get(k).is_some_and(|v| vals.contains(&v.as_str())),
                "Exists" => l.contains_key(k),
                "DoesNotExist" => !l.contains_key(k),
                o => panic!("operator {o}"),
            }
        });
    ml && me
}

struct Model<'a> {
    world: &'a World,
    ns_labels: BTreeMap<String, BTreeMap<String, String>>,
    policies: &'a [Value],
}

impl Model<'_> {
    fn pod_labels(&self, k: &(String, String)) -> BTreeMap<String, String> {
        labels(&self.world.objects[k]["metadata"]["labels"])
    }

    fn named_port(&self, k: &(String, String), name: &str, proto: &str) -> Option<u16> {
        self.world.objects[k]["spec"]["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name && p["protocol"] == proto)
            .map(|p| p["containerPort"].as_u64().unwrap() as u16)
    }

    fn peer_matches(
        &self,
        pol_ns: &str,
        peer: &Value,
        other: &(String, String),
        family: usize,
    ) -> bool {
        if let Some(b) = peer.get("ipBlock") {
            let addr: std::net::IpAddr = self.world.pods[other].2[family].parse().unwrap();
            let cidr: IpNetwork = b["cidr"].as_str().unwrap().parse().unwrap();
            let excepted = b["except"].as_array().into_iter().flatten().any(|e| {
                e.as_str()
                    .unwrap()
                    .parse::<IpNetwork>()
                    .unwrap()
                    .contains(addr)
            });
            return cidr.contains(addr) && !excepted;
        }
        let ns_ok = match peer.get("namespaceSelector") {
            Some(s) => selects(s, &self.ns_labels[&other.0]),
            None => other.0 == pol_ns,
        };
        let pod_ok = match peer.get("podSelector") {
            Some(s) => selects(s, &self.pod_labels(other)),
            None => true,
        };
        ns_ok && pod_ok
    }

    fn port_matches(
        &self,
        ports: &Value,
        target: &(String, String),
        proto: &str,
        port: u16,
    ) -> bool {
        let Some(list) = ports.as_array() else {
            return true;
        };
        if list.is_empty() {
            return true;
        }
        list.iter().any(|p| {
            let pp = p["protocol"].as_str().unwrap_or("TCP");
            if pp != proto {
                return false;
            }
            match &p["port"] {
                Value::Null => true,
                Value::String(name) => self.named_port(target, name, proto) == Some(port),
                Value::Number(n) => {
                    let lo = n.as_u64().unwrap() as u16;
                    let hi = p["endPort"].as_u64().map(|e| e as u16).unwrap_or(lo);
                    (lo..=hi).contains(&port)
                }
                _ => false,
            }
        })
    }

    /// Whether `who` is isolated in direction `ingress`, and whether traffic with `other` on
    /// proto/port is allowed by its policies.
    fn allowed_one_side(
        &self,
        who: &(String, String),
        other: &(String, String),
        ingress: bool,
        proto: &str,
        port: u16,
        family: usize,
    ) -> bool {
        let mut isolated = false;
        for pol in self.policies {
            let spec = &pol["spec"];
            if pol["metadata"]["namespace"] != who.0.as_str()
                || !selects(&spec["podSelector"], &self.pod_labels(who))
            {
                continue;
            }
            let types: Vec<&str> = spec["policyTypes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| t.as_str().unwrap())
                .collect();
            let applies = if types.is_empty() {
                if ingress {
                    true
                } else {
                    spec["egress"].as_array().is_some_and(|a| !a.is_empty())
                }
            } else {
                types.contains(&if ingress { "Ingress" } else { "Egress" })
            };
            if !applies {
                continue;
            }
            isolated = true;
            let (rules, peers_key) = if ingress {
                (&spec["ingress"], "from")
            } else {
                (&spec["egress"], "to")
            };
            for r in rules.as_array().into_iter().flatten() {
                let peers = r[peers_key].as_array();
                let peer_ok = match peers {
                    None => true,
                    Some(p) if p.is_empty() => true,
                    Some(p) => p.iter().any(|peer| {
                        self.peer_matches(
                            pol["metadata"]["namespace"].as_str().unwrap(),
                            peer,
                            other,
                            family,
                        )
                    }),
                };
                // Named ports are the destination's.
                let target = if ingress { who } else { other };
                if peer_ok && self.port_matches(&r["ports"], target, proto, port) {
                    return true;
                }
            }
        }
        !isolated
    }

    fn expect(&self, family: usize, ports: &[&str]) -> BTreeMap<String, bool> {
        let keys: Vec<(String, String)> = self.world.pods.keys().cloned().collect();
        let mut out = BTreeMap::new();
        for src in &keys {
            for dst in &keys {
                if src == dst {
                    continue;
                }
                for p in ports {
                    let (proto, port) = p.split_once('/').unwrap();
                    let (proto, port) = (proto.to_uppercase(), port.parse::<u16>().unwrap());
                    let ok = self.allowed_one_side(src, dst, false, &proto, port, family)
                        && self.allowed_one_side(dst, src, true, &proto, port, family);
                    out.insert(key(src, dst, p), ok);
                }
            }
        }
        out
    }
}

/// The matrix of one port, rows from, columns to ("." allowed, "X" blocked, "!" mismatch).
fn render(
    world: &World,
    want: &BTreeMap<String, bool>,
    got: &BTreeMap<String, bool>,
    port: &str,
) -> String {
    let keys: Vec<(String, String)> = world.pods.keys().cloned().collect();
    let mut s = format!("{port}: expected/observed (. allowed, X blocked, ! differs)\n       ");
    for d in &keys {
        s.push_str(&format!("{:>5}", format!("{}/{}", d.0, d.1)));
    }
    s.push('\n');
    for src in &keys {
        s.push_str(&format!("{:>6} ", format!("{}/{}", src.0, src.1)));
        for dst in &keys {
            if src == dst {
                s.push_str("    -");
                continue;
            }
            let k = key(src, dst, port);
            let (w, g) = (want[&k], got.get(&k).copied().unwrap_or(false));
            let c = match (w, g) {
                (true, true) => ".",
                (false, false) => "X",
                _ => "!",
            };
            s.push_str(&format!(
                "{:>5}",
                format!("{}{c}", if w { "." } else { "X" })
            ));
        }
        s.push('\n');
    }
    s
}

const PORTS: [&str; 3] = ["tcp/80", "tcp/81", "udp/80"];

/// Applies nothing itself: polls the probes until they equal the model's matrix (a few
/// seconds: the agent applies a change within a second), else fails printing the matrices.
fn check(
    world: &World,
    name: &str,
    policies: &[Value],
    ns_labels: &BTreeMap<String, BTreeMap<String, String>>,
    family: usize,
    ports: &[&str],
) {
    let model = Model {
        world,
        ns_labels: ns_labels.clone(),
        policies,
    };
    let want = model.expect(family, ports);
    let t = Instant::now();
    let mut got;
    let mut rounds = 0;
    loop {
        rounds += 1;
        got = world.probe(family, ports, None);
        if got == want || t.elapsed() > Duration::from_secs(20) {
            break;
        }
        let diff: Vec<&String> = want
            .keys()
            .filter(|k| want[*k] != got.get(*k).copied().unwrap_or(false))
            .collect();
        eprintln!(
            "  round {rounds} at {:?}: {} differ, e.g. {:?}",
            t.elapsed(),
            diff.len(),
            diff.first()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    if got != want {
        let mut m = String::new();
        for p in ports {
            m.push_str(&render(world, &want, &got, p));
        }
        panic!(
            "case {name:?} (IPv{}): the probes differ from the API's rules:\n{m}",
            if family == 0 { 4 } else { 6 }
        );
    }
    eprintln!("case {name:?}: matched after {:?}", t.elapsed());
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
           "metadata": {"namespace": ns, "name": name}, "spec": spec})
}

fn default_ns_labels() -> BTreeMap<String, BTreeMap<String, String>> {
    NAMESPACES
        .iter()
        .map(|n| {
            (
                n.to_string(),
                BTreeMap::from([
                    ("ns".to_string(), n.to_string()),
                    ("kubernetes.io/metadata.name".to_string(), n.to_string()),
                ]),
            )
        })
        .collect()
}

/// One case: the policies applied, the matrix checked, the policies deleted again (and the
/// matrix back to everything allowed).
fn case(world: &World, name: &str, policies: Vec<Value>, family: usize, ports: &[&str]) {
    world.apply_policies(&policies);
    check(world, name, &policies, &default_ns_labels(), family, ports);
    world.delete_policies(&policies);
}

#[test]
fn network_policy_truth_tables() {
    if !require_root() {
        return;
    }
    let mut w = World::new();
    let ns = default_ns_labels();
    check(&w, "no policies: all allowed", &[], &ns, 0, &PORTS);

    case(
        &w,
        "default deny ingress",
        vec![policy("x", "deny", json!({"podSelector": {}}))],
        0,
        &PORTS,
    );
    case(
        &w,
        "default deny egress",
        vec![policy(
            "x",
            "deny-egress",
            json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        )],
        0,
        &PORTS,
    );
    case(
        &w,
        "allow from the same namespace",
        vec![policy(
            "x",
            "same-ns",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        )],
        0,
        &PORTS,
    );
    case(
        &w,
        "allow from a namespace by label",
        vec![policy(
            "x",
            "from-y",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        )],
        0,
        &PORTS,
    );
    case(
        &w,
        "podSelector AND namespaceSelector",
        vec![policy(
            "x",
            "and",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{
            "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]},
            "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )],
        0,
        &PORTS,
    );
    case(
        &w,
        "ipBlock with except",
        vec![policy(
            "x",
            "block",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"ipBlock": {
            "cidr": "10.244.0.0/16", "except": ["10.244.2.0/24"]}}]}]}),
        )],
        0,
        &PORTS,
    );
    case(
        &w,
        "named port",
        vec![policy(
            "x",
            "named",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]}),
        )],
        0,
        &PORTS,
    );
    case(
        &w,
        "endPort range",
        vec![policy(
            "x",
            "range",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": 80, "endPort": 81}]}]}),
        )],
        0,
        &PORTS,
    );
    case(
        &w,
        "egress only to DNS",
        vec![policy(
            "x",
            "dns",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{
            "to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}, "podSelector": {"matchLabels": {"pod": "c"}}}],
            "ports": [{"protocol": "UDP", "port": 53}]}]}),
        )],
        0,
        &["tcp/80", "udp/80", "udp/53"],
    );
    case(
        &w,
        "egress named ports resolve per destination",
        vec![policy(
            "y",
            "egress-named",
            json!({"podSelector": {}, "egress": [{"ports": [{"protocol": "UDP", "port": "serve-80-udp"}]}]}),
        )],
        0,
        &PORTS,
    );
    case(
        &w,
        "multiple policies add up",
        vec![
            policy(
                "x",
                "one",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 80}]}]}),
            ),
            policy(
                "x",
                "two",
                json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["c"]}]},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}], "ports": [{"port": 81}]}]}),
            ),
        ],
        0,
        &PORTS,
    );
    // Deleted again by `case`: everything allowed.
    check(&w, "policies deleted: all allowed", &[], &ns, 0, &PORTS);
    case(
        &w,
        "IPv6: allow from a namespace by label",
        vec![policy(
            "x",
            "from-y6",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        )],
        1,
        &PORTS,
    );
    case(
        &w,
        "IPv6: ipBlock",
        vec![policy(
            "y",
            "block6",
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "fd00:10:244:1::/64"}}]}]}),
        )],
        1,
        &PORTS,
    );

    // Pod labels changed: x/c becomes a "b" and is let in.
    let from_b = vec![policy(
        "x",
        "from-b",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )];
    w.apply_policies(&from_b);
    check(&w, "from pod b", &from_b, &ns, 0, &PORTS);
    w.relabel_pod("x", "c", json!({"pod": "b"}));
    check(&w, "from pod b, x/c relabelled b", &from_b, &ns, 0, &PORTS);
    w.relabel_pod("x", "c", json!({"pod": "c"}));
    w.delete_policies(&from_b);

    // Namespace labels changed: z joins team blue.
    let blue = vec![policy(
        "x",
        "from-blue",
        json!({"podSelector": {},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]}),
    )];
    w.apply_policies(&blue);
    check(&w, "from team blue (nobody)", &blue, &ns, 0, &PORTS);
    w.api()
        .apply(&ns_json("z", json!({"ns": "z", "team": "blue"})));
    let mut ns2 = ns.clone();
    ns2.get_mut("z")
        .unwrap()
        .insert("team".into(), "blue".into());
    check(&w, "from team blue, z labelled", &blue, &ns2, 0, &PORTS);
    w.api().apply(&ns_json("z", json!({"ns": "z"})));
    w.delete_policies(&blue);

    // A new pod matching an existing policy is isolated as soon as it exists.
    let deny_a = vec![policy(
        "y",
        "deny-a",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}}),
    )];
    w.apply_policies(&deny_a);
    check(&w, "deny y/a", &deny_a, &ns, 0, &PORTS);
    w.add_pod("y", "d", "n2", json!({"pod": "a"}));
    check(
        &w,
        "deny y/a, and new y/d labelled a",
        &deny_a,
        &ns,
        0,
        &PORTS,
    );
    // A new pod is isolated before kubelet reports its addresses: n1's agent takes them from
    // the attachment record its CNI ADD wrote (CNI_ARGS names the pod), not from the status.
    let t = Instant::now();
    let ips = w.add_pod_scheduled("y", "e", "n1", json!({"pod": "a"}));
    let added = t.elapsed();
    let n1 = w.node_ns("n1");
    let in_vmap = |ip: &str, map: &str| {
        out(&n1, &["nft", "list", "map", "inet", "pontoon_policy", map]).contains(ip)
    };
    wait_for("y/e isolated from its record", || {
        in_vmap(&ips[0], "in4") && in_vmap(&ips[1], "in6")
    });
    let isolated = t.elapsed() - added;
    eprintln!("y/e: ADD {added:?}, then isolated after {isolated:?}, its status never reported");
    assert!(
        isolated < Duration::from_secs(1),
        "y/e, with no addresses in its status, was isolated only {isolated:?} after its ADD"
    );
    let xb = ("x".to_string(), "b".to_string());
    assert!(
        !w.probe_one(&xb, &format!("tcp/80@{}", ips[0])),
        "y/e (labelled a, under deny-a) answers x/b before its status is reported"
    );
    w.report_status("y", "e");
    check(
        &w,
        "deny y/a, new y/e isolated before its status",
        &deny_a,
        &ns,
        0,
        &PORTS,
    );
    w.delete_policies(&deny_a);

    // A Service in front of x/a: the policy applies to the backend after the DNAT.
    let from_y = vec![policy(
        "x",
        "svc",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    )];
    w.apply_policies(&from_y);
    let svc = format!("tcp/80@{SERVICE_IP}");
    let (yb, zb) = (
        ("y".to_string(), "b".to_string()),
        ("z".to_string(), "b".to_string()),
    );
    wait_for("the Service to refuse z/b", || !w.probe_one(&zb, &svc));
    assert!(
        w.probe_one(&yb, &svc),
        "y/b reaches x/a through the Service"
    );
    let (xa_node, yb_node, zb_node) = (
        &w.pods[&("x".into(), "a".into())].1,
        &w.pods[&yb].1,
        &w.pods[&zb].1,
    );
    eprintln!("service: backend on {xa_node}, y/b on {yb_node}, z/b on {zb_node}");
    w.delete_policies(&from_y);
    wait_for("the Service to let z/b in again", || w.probe_one(&zb, &svc));

    // The kernel state follows the records, not a marker: the policy table deleted under a
    // policy (a firewall reload, `nft flush ruleset`) is made again within a second.
    let deny_x = vec![policy("x", "deny-x", json!({"podSelector": {}}))];
    w.apply_policies(&deny_x);
    check(&w, "deny into x", &deny_x, &ns, 0, &PORTS);
    // Traffic from the node itself (kubelet's probes) is not filtered, as the API documents:
    // every pod of x, isolated for ingress, still answers its own node, over both families.
    for ((pns, pname), (_, node, addrs)) in w.pods.iter().filter(|(k, _)| k.0 == "x") {
        for addr in addrs {
            for port in ["tcp/80", "udp/80"] {
                let target = format!("{port}@{addr}");
                assert!(
                    w.probe_from(&w.node_ns(node), &target),
                    "{pns}/{pname} isolated by deny-x does not answer its node {node} on {target}"
                );
            }
        }
    }
    let n1 = w.node_ns("n1");
    let table = |node: &str| out(node, &["nft", "list", "tables"]).contains("pontoon_policy");
    let isolating = |node: &str| {
        out(node, &["nft", "list", "table", "inet", "pontoon_policy"]).contains("chain i_")
    };
    run_ok(&[
        "ip",
        "netns",
        "exec",
        &n1,
        "nft",
        "delete",
        "table",
        "inet",
        "pontoon_policy",
    ]);
    let t = Instant::now();
    wait_for("n1's policy table made again", || isolating(&n1));
    eprintln!("policy table made again after {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the deleted policy table came back only after {:?}",
        t.elapsed()
    );
    check(
        &w,
        "deny into x, table deleted and made again",
        &deny_x,
        &ns,
        0,
        &PORTS,
    );

    // `--network-policy false` (another enforcer runs): n1's agent removes its table, so
    // n1's pods are not isolated any more; n2 still enforces.
    w.start_agent("n1", &["--network-policy", "false"]);
    wait_for("n1's policy table removed", || !table(&n1));
    let (xa, xb) = (
        &w.pods[&("x".into(), "a".into())],
        &w.pods[&("x".into(), "b".into())],
    );
    assert_eq!((xa.1.as_str(), xb.1.as_str()), ("n1", "n2"));
    let (xa_addr, xb_addr) = (format!("tcp/80@{}", xa.2[0]), format!("tcp/80@{}", xb.2[0]));
    wait_for("x/a on n1 reachable again", || w.probe_one(&yb, &xa_addr));
    assert!(
        !w.probe_one(&yb, &xb_addr),
        "x/b on n2 is still isolated by deny-x"
    );
    // Started again with enforcement on, it isolates n1's pods again.
    w.start_agent("n1", &[]);
    check(
        &w,
        "deny into x, n1's agent restarted",
        &deny_x,
        &ns,
        0,
        &PORTS,
    );
    w.delete_policies(&deny_x);
}

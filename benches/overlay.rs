//! Pod-to-pod throughput between two nodes over the VXLAN overlay against the same over a
//! direct route, in the same run, on the same topology: two node namespaces on one underlay
//! bridge, an agent on each (`--routing direct`, then `--routing vxlan`, interleaved rounds), a
//! pod on each, iperf3 between the pods (TCP, one stream) and ping for latency. Prints the
//! medians and the ratio, and writes target/bench-overlay.json.
//!
//! Run as root: `cargo bench --bench overlay -- [--quick]` (hack/bench.sh runs it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

#[allow(dead_code)]
mod util;
use util::{ip, sh, wait};

/// One two-node cluster in throwaway namespaces, removed on drop.
struct Pair {
    namespaces: Vec<String>,
    agents: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// ADD of pod netns `pod` on node `node` with the conflist its agent wrote; its IPv4 address.
fn add_pod(bin_dir: &Path, conf_dir: &Path, node: &str, pod: &str) -> String {
    let list: Value =
        serde_json::from_slice(&std::fs::read(conf_dir.join("10-pontoon.conflist")).unwrap())
            .unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    let mut c = Command::new("ip")
        .args(["netns", "exec", node])
        .arg(bin_dir.join("pontoon"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", pod)
        .env("CNI_NETNS", format!("/var/run/netns/{pod}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", bin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "ADD: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    r["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

struct Sample {
    gbps: f64,
    retransmits: u64,
    rtt_us: f64,
    pod_mtu: u64,
}

fn run(bin: &Path, routing: &str, secs: u64) -> Sample {
    let prefix = format!("pov{}{}", std::process::id(), &routing[..1]);
    let dir = std::env::temp_dir().join(format!("pontoon-bench-{prefix}"));
    let mut pair = Pair {
        namespaces: vec![],
        agents: vec![],
        dir: dir.clone(),
    };
    let mut ns = |name: &str| {
        let n = format!("{prefix}-{name}");
        sh(&["ip", "netns", "add", &n]);
        ip(&n, "link set lo up");
        pair.namespaces.push(n.clone());
        n
    };
    let ul = ns("ul");
    let nodes = [ns("n1"), ns("n2")];
    let pods = [ns("p1"), ns("p2")];
    ip(&ul, "link add ubr type bridge");
    ip(&ul, "link set ubr up");
    let mut objs = vec![];
    for (i, n) in nodes.iter().enumerate() {
        ip(
            &ul,
            &format!("link add u{i} type veth peer name eth0 netns {n}"),
        );
        ip(&ul, &format!("link set u{i} master ubr up"));
        ip(n, &format!("addr add 192.0.2.{}/24 dev eth0", 11 + i));
        ip(n, "link set eth0 up");
        let cidr = format!("10.244.{}.0/24", i + 1);
        objs.push(json!({"metadata": {"name": format!("n{}", i + 1)},
            "spec": {"podCIDRs": [cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.0.2.{}", 11 + i)}]}}));
    }
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("nodes.json");
    std::fs::write(
        &file,
        json!({"kind": "NodeList", "items": objs}).to_string(),
    )
    .unwrap();
    for (i, n) in nodes.iter().enumerate() {
        let nd = dir.join(format!("n{}", i + 1));
        let a = Command::new("ip")
            .args(["netns", "exec", n])
            .arg(bin)
            .args([
                "agent",
                "--node-name",
                &format!("n{}", i + 1),
                "--nodes-file",
            ])
            .arg(&file)
            .arg("--cni-bin-dir")
            .arg(nd.join("bin"))
            .arg("--cni-conf-dir")
            .arg(nd.join("net.d"))
            .arg("--data-dir")
            .arg(nd.join("ipam"))
            .args(["--no-masquerade", "10.244.0.0/16", "--listen", "off"])
            .args(["--routing", routing])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        pair.agents.push(a);
    }
    let mut addrs = vec![];
    for (i, n) in nodes.iter().enumerate() {
        let nd = dir.join(format!("n{}", i + 1));
        let other = format!("10.244.{}.0/24", 2 - i);
        wait(
            "the agent's conflist and route",
            Duration::from_secs(30),
            || {
                nd.join("net.d/10-pontoon.conflist").exists()
                    && sh(&["ip", "-n", n, "route", "show", &other]).contains("proto 201")
            },
        );
        addrs.push(add_pod(&nd.join("bin"), &nd.join("net.d"), n, &pods[i]));
    }
    let mtu: Value =
        serde_json::from_str(&sh(&["ip", "-n", &pods[0], "-j", "link", "show", "eth0"])).unwrap();
    let pod_mtu = mtu[0]["mtu"].as_u64().unwrap_or(0);
    // Latency first (no load), then throughput.
    let ping = sh(&[
        "ip", "netns", "exec", &pods[0], "ping", "-q", "-c", "200", "-i", "0.002", &addrs[1],
    ]);
    let rtt_us = ping
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| {
            l.split('=')
                .nth(1)?
                .split('/')
                .nth(1)?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(f64::NAN)
        * 1e3;
    let mut server = Command::new("ip")
        .args([
            "netns", "exec", &pods[1], "iperf3", "-s", "-1", "-B", &addrs[1],
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait("iperf3 to listen", Duration::from_secs(30), || {
        sh(&[
            "ip", "netns", "exec", &pods[1], "ss", "-Hltn", "sport", "= :5201",
        ])
        .contains("5201")
    });
    let o = Command::new("ip")
        .args(["netns", "exec", &pods[0], "iperf3", "-J", "-c", &addrs[1]])
        .args(["-t", &secs.to_string()])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let r: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    let end = &r["end"];
    assert!(
        end["sum_received"]["bits_per_second"].is_number(),
        "iperf3 {routing}: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    Sample {
        gbps: end["sum_received"]["bits_per_second"].as_f64().unwrap() / 1e9,
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        rtt_us,
        pod_mtu,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the overlay benchmark needs root (it creates network namespaces)");
        std::process::exit(1);
    }
    if Command::new("iperf3").arg("--version").output().is_err() {
        eprintln!("the overlay benchmark needs iperf3 (bash hack/install-deps.sh installs it)");
        std::process::exit(1);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let (rounds, secs) = if quick { (1, 2) } else { (3, 5) };
    let bin = std::fs::canonicalize(
        std::env::var("PONTOON_BIN").unwrap_or_else(|_| "target/release/pontoon".into()),
    )
    .expect("build pontoon first");
    let modes = ["direct", "vxlan"];
    let mut samples: Vec<Vec<Sample>> = vec![vec![], vec![]];
    for _ in 0..rounds {
        for (i, m) in modes.iter().enumerate() {
            samples[i].push(run(&bin, m, secs));
        }
    }
    println!(
        "pod-to-pod across two nodes, TCP one stream ({rounds} x {secs} s each, interleaved), \
         ping 200 x 2 ms:"
    );
    println!(
        "  {:<8} {:>8} {:>12} {:>13} {:>10}",
        "routing", "pod MTU", "Gbit/s", "retransmits", "RTT µs"
    );
    let mut out = json!({});
    let mut gbps = vec![];
    for (i, m) in modes.iter().enumerate() {
        let s = &samples[i];
        let g = median(s.iter().map(|x| x.gbps).collect());
        let rt = median(s.iter().map(|x| x.retransmits as f64).collect());
        let rtt = median(s.iter().map(|x| x.rtt_us).collect());
        println!(
            "  {m:<8} {:>8} {g:>12.2} {rt:>13.0} {rtt:>10.1}",
            s[0].pod_mtu
        );
        out[m] = json!({"gbps": g, "retransmits": rt, "rtt_us": rtt, "pod_mtu": s[0].pod_mtu});
        gbps.push(g);
    }
    let ratio = gbps[1] / gbps[0];
    println!("  vxlan / direct throughput: {ratio:.2}x");
    out["vxlan_over_direct"] = json!(ratio);
    let _ = std::fs::write("target/bench-overlay.json", out.to_string());
}

//! The node agent at cluster scale: the stand-in API server holds N Nodes (5,000; 500 with
//! `--quick`), one agent serves a throwaway node namespace, and this measures what an operator
//! of a big cluster cares about: time from start to every route installed, time for one node
//! added and one removed to be applied, the agent's peak RSS, and its CPU at idle.
//!
//! Run as root: `cargo bench --bench agent_scale -- [--quick]` (hack/bench.sh runs it).

#[allow(dead_code)]
#[path = "../tests/common/standin.rs"]
mod standin;
#[allow(dead_code)]
mod util;
use util::{sh, spawn_agent};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn node(i: usize) -> Value {
    json!({"kind": "Node", "apiVersion": "v1",
           "metadata": {"name": format!("n{i}"), "labels": {"kubernetes.io/os": "linux"}},
           "spec": {"podCIDR": cidr(i), "podCIDRs": [cidr(i)]},
           "status": {"addresses": [{"type": "InternalIP", "address": ip(i)},
                                    {"type": "Hostname", "address": format!("n{i}")}]}})
}

/// Node i's address, all on the node's uplink subnet 172.16.0.0/16.
fn ip(i: usize) -> String {
    format!("172.16.{}.{}", i / 250, 1 + i % 250)
}

fn cidr(i: usize) -> String {
    format!("10.{}.{}.0/24", i / 256, i % 256)
}

fn routes(ns: &str) -> usize {
    sh(&["ip", "-n", ns, "route", "show", "proto", "201"])
        .lines()
        .count()
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = &s[s.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the agent scale benchmark needs root (it creates a network namespace)");
        std::process::exit(1);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let n = if quick { 500 } else { 5000 };
    let bin = std::fs::canonicalize(
        std::env::var("PONTOON_BIN").unwrap_or_else(|_| "target/release/pontoon".into()),
    )
    .expect("build pontoon first");
    let ns = format!("pscale{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("pontoon-scale-{}", std::process::id()));
    sh(&["ip", "netns", "add", &ns]);
    let result = std::panic::catch_unwind(|| {
        for cmd in [
            "link set lo up",
            "link add eth0 type veth peer name eth0p",
            "addr add 172.16.0.1/16 dev eth0",
            "link set eth0p up",
            "link set eth0 up",
        ] {
            let mut a = vec!["ip", "-n", &ns];
            a.extend(cmd.split_whitespace());
            sh(&a);
        }
        let nodes: Vec<Value> = (0..n).map(node).collect();
        let api = standin::StandIn::start(&ns, "127.0.0.1:16443", &dir.join("api"), &nodes);
        let host = dir.join("host");
        let t0 = Instant::now();
        let mut agent = spawn_agent(&ns, &bin, &api.kubeconfig(), &host, &[], Stdio::null());
        let pid = agent.id();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let all = wait("every route", Duration::from_secs(120), || {
                routes(&ns) == n - 1
            });
            let all = all.max(t0.elapsed());
            // One node joins, one leaves.
            let added = {
                let t = Instant::now();
                api.apply(&node(n));
                wait("the new node's route", Duration::from_secs(30), || {
                    sh(&["ip", "-n", &ns, "route", "show", &cidr(n)]).contains("proto 201")
                });
                t.elapsed()
            };
            let removed = {
                let t = Instant::now();
                api.kubectl(&["delete", "node", "n1"]);
                wait(
                    "the departed node's route to go",
                    Duration::from_secs(30),
                    || !sh(&["ip", "-n", &ns, "route", "show", &cidr(1)]).contains("proto 201"),
                );
                t.elapsed()
            };
            // Idle: nothing changes for a while; how much CPU does the agent use?
            std::thread::sleep(Duration::from_secs(2));
            let hz = 100.0; // USER_HZ
            let c0 = cpu_ticks(pid);
            let idle = Duration::from_secs(if quick { 5 } else { 20 });
            std::thread::sleep(idle);
            let cpu = (cpu_ticks(pid) - c0) as f64 / hz / idle.as_secs_f64() * 100.0;
            let rss = peak_rss_kib(pid) as f64 / 1024.0;
            println!(
                "agent with {n} nodes in the API server (stand-in), {} routes:",
                n - 1
            );
            println!(
                "  start to every route installed   {:>8.2} s   (target <= 5 s)",
                all.as_secs_f64()
            );
            println!(
                "  a node added, its route in place {:>8.0} ms  (target <= 1000 ms)",
                added.as_secs_f64() * 1e3
            );
            println!(
                "  a node removed, its route gone   {:>8.0} ms  (target <= 1000 ms)",
                removed.as_secs_f64() * 1e3
            );
            println!("  peak RSS                         {rss:>8.1} MiB (target <= 50 MiB)");
            println!(
                "  CPU at idle over {} s           {cpu:>8.2} %",
                idle.as_secs()
            );
            let out = json!({"nodes": n, "all_routes_s": all.as_secs_f64(),
                             "node_added_ms": added.as_secs_f64() * 1e3,
                             "node_removed_ms": removed.as_secs_f64() * 1e3,
                             "peak_rss_mib": rss, "idle_cpu_percent": cpu});
            let _ = std::fs::write("target/bench-agent-scale.json", out.to_string());
        }));
        let _ = agent.kill();
        let _ = agent.wait();
        drop(api);
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    });
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let _ = std::fs::remove_dir_all(&dir);
    if result.is_err() {
        std::process::exit(1);
    }
}

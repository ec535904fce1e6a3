//! NetworkPolicy at size: the stand-in API server holds 1,000 pods (100 on this node) in 20
//! namespaces and 200 policies; one agent enforces them in a throwaway node namespace. It
//! measures what an operator cares about: time from a policy change (the API write returning)
//! to its enforcement in the kernel (p50/p99), the agent's peak RSS, TCP throughput between
//! two pods on the node with the policies against none, and an ADD's latency with and without
//! them. Prints a table and writes target/bench-netpol.json.
//!
//! Run as root: `cargo bench --bench netpol -- [--quick]` (hack/bench.sh runs it).

#[allow(dead_code)]
#[path = "../tests/common/standin.rs"]
mod standin;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod util;
use util::{ip, sh, spawn_agent, wait};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn pod(ns: usize, i: usize, node: &str, ip: &str) -> Value {
    json!({"kind": "Pod", "apiVersion": "v1",
        "metadata": {"namespace": format!("ns{ns}"), "name": format!("p{i}"),
                     "labels": {"app": format!("app{}", i % 10), "tier": if i.is_multiple_of(2) { "web" } else { "db" }}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none",
                 "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn policy(ns: usize, k: usize) -> Value {
    json!({"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
        "metadata": {"namespace": format!("ns{ns}"), "name": format!("pol{k}")},
        "spec": {"podSelector": {"matchLabels": {"app": format!("app{}", k % 10)}},
                 "policyTypes": ["Ingress", "Egress"],
                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", k % 5)}}},
                                       {"podSelector": {"matchLabels": {"tier": "web"}}},
                                       {"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.{k}.0.0/16")]}}],
                              "ports": [{"port": 80}, {"port": "http"}, {"port": 9000, "endPort": 9100}]}],
                 "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP", "port": 53}]},
                            {"to": [{"podSelector": {"matchLabels": {"tier": "db"}}}]}]}})
}

/// The local pods everything may reach: selected by `bench` (allow all ingress and egress).
fn bench_policy() -> Value {
    json!({"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
        "metadata": {"namespace": "ns0", "name": "bench"},
        "spec": {"podSelector": {"matchLabels": {"bench": "yes"}}, "policyTypes": ["Ingress", "Egress"],
                 "ingress": [{}], "egress": [{}]}})
}

fn add(node: &str, bin_dir: &Path, conf: &Value, pod: &str, cmd: &str) -> (Duration, Value) {
    let t = Instant::now();
    let mut c = Command::new("ip")
        .args(["netns", "exec", node])
        .arg(bin_dir.join("pontoon"))
        .env("CNI_COMMAND", cmd)
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
    let took = t.elapsed();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    (
        took,
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null),
    )
}

fn iperf(client: &str, server: &str, addr: &str, secs: u64) -> f64 {
    let mut s = Command::new("ip")
        .args(["netns", "exec", server, "iperf3", "-s", "-1", "-B", addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait("iperf3 to listen", Duration::from_secs(10), || {
        sh(&[
            "ip", "netns", "exec", server, "ss", "-Hltn", "sport", "= :5201",
        ])
        .contains("5201")
    });
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            client,
            "iperf3",
            "-J",
            "-c",
            addr,
            "-t",
            &secs.to_string(),
        ])
        .output()
        .unwrap();
    let _ = s.kill();
    let _ = s.wait();
    let r: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    r["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(f64::NAN)
        / 1e9
}

/// New TCP connections per second, `count` of them (few enough that conntrack's table stays
/// small), from pod netns `client` to `addr` in pod netns `server` (connect, then close with a reset so no TIME_WAIT piles up): each one's first packet is
/// judged by the policy chains, unlike a long transfer's.
fn connections(client: &str, server: &str, addr: &str, count: u32) -> f64 {
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    let open = |n: &str| {
        pontoon::netns::NetNs::open(Path::new(&format!("/run/netns/{n}")))
            .unwrap()
            .unwrap()
    };
    let (cns, sns) = (open(client), open(server));
    let sa: std::net::SocketAddr = format!("{addr}:5301").parse().unwrap();
    let listener = sns.run(|| Ok(TcpListener::bind(sa).unwrap())).unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            // Non-blocking, so that it stops when the client is done whatever is queued.
            listener.set_nonblocking(true).unwrap();
            while !done.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(c) => drop(c),
                    Err(_) => std::thread::sleep(Duration::from_micros(100)),
                }
            }
        });
        let n = cns
            .run(|| {
                let t = Instant::now();
                for _ in 0..count {
                    let c = TcpStream::connect_timeout(&sa, Duration::from_secs(5)).unwrap();
                    nix::sys::socket::setsockopt(
                        &c,
                        nix::sys::socket::sockopt::Linger,
                        &libc::linger {
                            l_onoff: 1,
                            l_linger: 0,
                        },
                    )
                    .unwrap();
                    drop(c);
                }
                Ok(count as f64 / t.elapsed().as_secs_f64())
            })
            .unwrap();
        done.store(true, Ordering::Relaxed);
        n
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the network policy benchmark needs root (it creates network namespaces)");
        std::process::exit(1);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let (changes, secs, adds, rounds) = if quick {
        (5, 2, 5usize, 1)
    } else {
        (30, 5, 20, 4)
    };
    let bin = std::fs::canonicalize(
        std::env::var("PONTOON_BIN").unwrap_or_else(|_| "target/release/pontoon".into()),
    )
    .expect("build pontoon first");
    let prefix = format!("pnp{}", std::process::id());
    let node = format!("{prefix}-node");
    let pods = [
        format!("{prefix}-p1"),
        format!("{prefix}-p2"),
        format!("{prefix}-p3"),
    ];
    let dir = std::env::temp_dir().join(format!("pontoon-netpol-bench-{}", std::process::id()));
    for n in std::iter::once(&node).chain(pods.iter()) {
        sh(&["ip", "netns", "add", n]);
        ip(n, "link set lo up");
    }
    let result = std::panic::catch_unwind(|| {
        ip(&node, "link add eth0 type veth peer name eth0p");
        ip(&node, "addr add 192.0.2.1/24 dev eth0");
        ip(&node, "link set eth0p up");
        ip(&node, "link set eth0 up");
        let mut objs = vec![
            json!({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n0"},
            "spec": {"podCIDRs": ["10.244.0.0/22"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}),
        ];
        for ns in 0..20 {
            objs.push(json!({"kind": "Namespace", "apiVersion": "v1",
                "metadata": {"name": format!("ns{ns}"), "labels": {"team": format!("t{}", ns % 5)}}}));
        }
        // 1,000 pods: 100 here (fake addresses high in this node's CIDR), 900 elsewhere.
        for i in 0..1000 {
            let (node_name, addr) = if i < 100 {
                ("n0".to_string(), format!("10.244.3.{}", i + 1))
            } else {
                (
                    format!("n{}", i % 9 + 1),
                    format!("10.245.{}.{}", i / 250, i % 250 + 1),
                )
            };
            objs.push(pod(i % 20, i, &node_name, &addr));
        }
        for k in 0..200 {
            objs.push(policy(k % 20, k));
        }
        let api = standin::StandIn::start(&node, "127.0.0.1:16443", &dir.join("api"), &objs);
        let host = dir.join("host");
        let t0 = Instant::now();
        let mut agent = spawn_agent(
            &node,
            &bin,
            &api.kubeconfig(),
            &host,
            &["--routing", "direct"],
            std::fs::File::create(dir.join("agent.log")).unwrap().into(),
        );
        let pid = agent.id();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let table = || {
                Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &node,
                        "nft",
                        "list",
                        "table",
                        "inet",
                        "pontoon_policy",
                    ])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            let conf_path = host.join("net.d/10-pontoon.conflist");
            let first = wait("the first enforcement", Duration::from_secs(60), || {
                conf_path.exists() && table().matches("chain i_").count() >= 50
            })
            .max(t0.elapsed());
            let list: Value = serde_json::from_slice(&std::fs::read(&conf_path).unwrap()).unwrap();
            let mut conf = list["plugins"][0].clone();
            conf["name"] = list["name"].clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            // Two real pods, selected by `bench` (everything allowed, so traffic is judged).
            let mut addrs = vec![];
            for (i, p) in pods.iter().take(2).enumerate() {
                let (_, r) = add(&node, &host.join("bin"), &conf, p, "ADD");
                let a = r["ips"][0]["address"]
                    .as_str()
                    .unwrap()
                    .split('/')
                    .next()
                    .unwrap()
                    .to_string();
                let mut o = pod(0, 5000 + i, "n0", &a);
                o["metadata"]["labels"]["bench"] = json!("yes");
                api.apply(&o);
                addrs.push(a);
            }
            api.apply(&bench_policy());
            wait("the bench pods isolated", Duration::from_secs(30), || {
                table().matches("chain i_").count() >= 52
            });
            // Policy changes: each adds an ipBlock to `bench`; done when the kernel has it.
            let node_ns = pontoon::netns::NetNs::open(Path::new(&format!("/run/netns/{node}")))
                .unwrap()
                .unwrap();
            let mut lat = vec![];
            for k in 0..changes {
                let mut p = bench_policy();
                let cidr = format!("198.51.100.{}/32", k + 1);
                p["spec"]["ingress"] = json!([{"from": [{"ipBlock": {"cidr": cidr}}]}]);
                api.apply(&p);
                let t = Instant::now();
                let needle = [198u8, 51, 100, k as u8 + 1];
                // The set of the bench pod p5000's ingress, read over netlink from a thread
                // in the node (no process per probe, so the probing barely loads the CPU).
                let set = format!(
                    "i4_{}",
                    pontoon::policy::nft::pod_id(&("ns0".into(), "p5000".into()))
                );
                wait("the change enforced", Duration::from_secs(30), || {
                    node_ns
                        .run(|| {
                            let got = pontoon::nft::Conn::new()?.elements(
                                pontoon::nft::NFPROTO_INET,
                                "pontoon_policy",
                                &set,
                            )?;
                            Ok(got
                                .unwrap_or_default()
                                .iter()
                                .any(|(key, _)| key.starts_with(&needle)))
                        })
                        .unwrap_or(false)
                });
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            api.apply(&bench_policy());
            std::thread::sleep(Duration::from_secs(1));
            let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0;
            // With and without, interleaved so that the VM's drift falls on both alike.
            // "Without" is the node with no policy table at all (the agent paused meanwhile,
            // or it would make the table again at once).
            let (mut gbps, mut conns, mut adds_ms) =
                ([vec![], vec![]], [vec![], vec![]], [vec![], vec![]]);
            let agent_pid = nix::unistd::Pid::from_raw(pid as i32);
            for _ in 0..rounds {
                for (i, with) in [true, false].into_iter().enumerate() {
                    if !with {
                        nix::sys::signal::kill(agent_pid, nix::sys::signal::SIGSTOP).unwrap();
                        sh(&[
                            "ip",
                            "netns",
                            "exec",
                            &node,
                            "nft",
                            "delete",
                            "table",
                            "inet",
                            "pontoon_policy",
                        ]);
                    }
                    gbps[i].push(iperf(&pods[0], &pods[1], &addrs[1], secs));
                    conns[i].push(connections(&pods[0], &pods[1], &addrs[1], 3000));
                    for _ in 0..adds.div_ceil(rounds) {
                        let (t, _) = add(&node, &host.join("bin"), &conf, &pods[2], "ADD");
                        adds_ms[i].push(t.as_secs_f64() * 1e3);
                        add(&node, &host.join("bin"), &conf, &pods[2], "DEL");
                    }
                    if !with {
                        nix::sys::signal::kill(agent_pid, nix::sys::signal::SIGCONT).unwrap();
                        wait(
                            "the policy table made again",
                            Duration::from_secs(30),
                            || table().matches("chain i_").count() >= 52,
                        );
                    }
                }
            }
            let samples = json!({"gbps": gbps, "connections_per_s": conns, "add_ms": adds_ms});
            // Each round's ratio, then their median: the VM's drift between rounds cancels.
            let paired = |v: &[Vec<f64>; 2]| {
                let mut r: Vec<f64> = v[0].iter().zip(&v[1]).map(|(a, b)| a / b).collect();
                pct(&mut r, 0.5)
            };
            let (gbps_ratio, conn_ratio) = (paired(&gbps), paired(&conns));
            let [mut g0, mut g1] = gbps;
            let [mut c0, mut c1] = conns;
            let [mut add_with, mut add_without] = adds_ms;
            let (with, without) = (pct(&mut g0, 0.5), pct(&mut g1, 0.5));
            let (conn_with, conn_without) = (pct(&mut c0, 0.5), pct(&mut c1, 0.5));
            // All policies deleted: nothing isolated any more.
            for k in 0..200 {
                api.kubectl(&[
                    "delete",
                    "networkpolicy",
                    "-n",
                    &format!("ns{}", k % 20),
                    &format!("pol{k}"),
                ]);
            }
            api.kubectl(&["delete", "networkpolicy", "-n", "ns0", "bench"]);
            wait("no pod isolated", Duration::from_secs(60), || {
                !table().contains("chain i_")
            });
            let (p50, p99) = (pct(&mut lat.clone(), 0.5), pct(&mut lat, 0.99));
            let (aw, awo) = (pct(&mut add_with, 0.5), pct(&mut add_without, 0.5));
            println!(
                "NetworkPolicy, 1,000 pods (100 on this node) in 20 namespaces, 200 policies:"
            );
            println!(
                "  start to every local pod enforced     {:>8.2} s",
                first.as_secs_f64()
            );
            println!(
                "  policy change to enforcement p50/p99  {p50:>8.0} / {p99:.0} ms  ({changes} changes, target <= 1000 ms)"
            );
            println!("  agent peak RSS                        {rss:>8.1} MiB");
            println!(
                "  TCP pod to pod on the node            {with:>8.2} Gbit/s with the policies, {without:.2} with no policy table ({gbps_ratio:.2}x)"
            );
            println!(
                "  new TCP connections pod to pod        {conn_with:>8.0} /s with the policies, {conn_without:.0} with none ({conn_ratio:.2}x)"
            );
            println!(
                "  ADD p50                               {aw:>8.2} ms with the policies, {awo:.2} with none ({:.2}x)",
                aw / awo
            );
            let out = json!({"first_enforcement_s": first.as_secs_f64(), "change_p50_ms": p50, "change_p99_ms": p99,
                             "peak_rss_mib": rss, "gbps_with": with, "gbps_without": without,
                             "connections_per_s_with": conn_with, "connections_per_s_without": conn_without,
                             "samples_with_then_without": samples,
                             "add_p50_ms_with": aw, "add_p50_ms_without": awo});
            let _ = std::fs::write("target/bench-netpol.json", out.to_string());
        }));
        let _ = agent.kill();
        let _ = agent.wait();
        drop(api);
        let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
        let _ = std::fs::write("target/bench-netpol-agent.log", &log);
        if r.is_err() {
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("agent log (last lines):");
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
        }
        if let Err(e) = r {
            std::panic::resume_unwind(e);
        }
    });
    for n in pods.iter().chain(std::iter::once(&node)) {
        let _ = Command::new("ip").args(["netns", "del", n]).status();
    }
    let _ = std::fs::remove_dir_all(&dir);
    if result.is_err() {
        std::process::exit(1);
    }
}

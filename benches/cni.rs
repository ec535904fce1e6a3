//! ADD/DEL latency and throughput of pontoon against the Go reference (`bridge` + `host-local`
//! from containernetworking-plugins) and the kernel floor (the same links, addresses and routes
//! made by `ip -batch`), measured as a runtime sees them: a whole process, env + stdin.
//!
//! Run as root: `bash hack/bench.sh` (or `cargo bench --bench cni -- [--quick] [--out FILE]
//! [--only sequential,hostports,parallel,drain,scale]`). With `PONTOON_BASE_BIN=<an earlier pontoon>`
//! that build runs too, interleaved, and a second table gives pontoon / base.
//! Everything happens in namespaces this program creates and removes. Contenders are
//! interleaved pod by pod so machine drift hits all equally.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const REFERENCE_DIR: &str = "/usr/lib/cni";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Who {
    Pontoon,
    /// An earlier pontoon (`PONTOON_BASE_BIN`), to measure a change in the same run.
    Base,
    Reference,
    Floor,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Pontoon => "pontoon",
            Who::Base => "base",
            Who::Reference => "reference",
            Who::Floor => "floor",
        }
    }
}

/// One contender's node: its own bridge and subnet inside the shared bench node namespace.
struct Contender {
    who: Who,
    idx: usize,
    bin: PathBuf,
    data_dir: PathBuf,
    masq: bool,
    /// Two hostPort mappings per pod (the reference chains the stock portmap plugin).
    ports: bool,
}

impl Contender {
    fn bridge(&self) -> String {
        format!("br{}", self.idx)
    }

    fn subnet_octet(&self) -> usize {
        100 + self.idx
    }

    fn conf(&self, i: usize) -> Value {
        let ty = match self.who {
            Who::Pontoon | Who::Base => "pontoon",
            _ => "bridge",
        };
        json!({
            "cniVersion": "1.0.0",
            "name": format!("bench{}", self.idx),
            "type": ty,
            "bridge": self.bridge(),
            "isGateway": true,
            "isDefaultGateway": true,
            "ipMasq": self.masq,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("10.{}.0.0/16", self.subnet_octet())}]],
                     "dataDir": self.data_dir},
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": self.mappings(i)},
        })
    }

    fn mappings(&self, i: usize) -> Value {
        if !self.ports {
            return json!([]);
        }
        json!([{"hostPort": 30000 + i, "containerPort": 80, "protocol": "tcp"},
               {"hostPort": 40000 + i, "containerPort": 53, "protocol": "udp"}])
    }

    fn pod_ip(&self, i: usize) -> String {
        format!("10.{}.{}.{}", self.subnet_octet(), 1 + i / 250, 1 + i % 250)
    }

    fn veth(&self, i: usize) -> String {
        format!("fl{}x{i}", self.idx)
    }

    /// One ADD, timed; returns the duration.
    fn add(&self, pod: &str, i: usize) -> Duration {
        match self.who {
            Who::Floor => {
                let ip = self.pod_ip(i);
                let gw = format!("10.{}.0.1", self.subnet_octet());
                let host = format!(
                    "link add {v} type veth peer name eth0 netns {pod}\nlink set {v} master {br} up\n",
                    v = self.veth(i),
                    br = self.bridge()
                );
                let inpod = format!(
                    "addr add {ip}/16 dev eth0\nlink set eth0 up\nroute add default via {gw}\n"
                );
                let t = Instant::now();
                run_batch(None, &host);
                run_batch(Some(pod), &inpod);
                t.elapsed()
            }
            Who::Reference if self.ports => {
                let (d, out) = self.cni("ADD", pod, i);
                let prev: Value = serde_json::from_str(&out).unwrap();
                d + self.portmap("ADD", pod, i, prev)
            }
            _ => self.cni("ADD", pod, i).0,
        }
    }

    /// The stock portmap plugin chained after bridge, as a runtime runs a conflist.
    fn portmap(&self, verb: &str, pod: &str, i: usize, prev: Value) -> Duration {
        let conf = json!({"cniVersion": "1.0.0", "name": format!("bench{}", self.idx), "type": "portmap",
                          "capabilities": {"portMappings": true}, "prevResult": prev,
                          "runtimeConfig": {"portMappings": self.mappings(i)}});
        self.exec(
            &Path::new(REFERENCE_DIR).join("portmap"),
            verb,
            pod,
            i,
            &conf,
        )
        .0
    }

    fn del(&self, pod: &str, i: usize) -> Duration {
        match self.who {
            Who::Floor => {
                let t = Instant::now();
                run_batch(None, &format!("link del {}\n", self.veth(i)));
                t.elapsed()
            }
            Who::Reference if self.ports => {
                self.portmap("DEL", pod, i, Value::Null) + self.cni("DEL", pod, i).0
            }
            _ => self.cni("DEL", pod, i).0,
        }
    }

    fn cni(&self, verb: &str, pod: &str, i: usize) -> (Duration, String) {
        self.exec(&self.bin, verb, pod, i, &self.conf(i))
    }

    /// Runs plugin `bin` for pod `i` as a runtime does (env + stdin) and times the whole process.
    fn exec(
        &self,
        bin: &Path,
        verb: &str,
        pod: &str,
        i: usize,
        conf: &Value,
    ) -> (Duration, String) {
        let t = Instant::now();
        let mut child = Command::new(bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", format!("bench-{}-{i}", self.idx))
            .env("CNI_NETNS", format!("/var/run/netns/{pod}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", REFERENCE_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn plugin");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let d = t.elapsed();
        if !out.status.success() {
            panic!(
                "{} ({}) {verb} failed: {} {}",
                self.who.name(),
                bin.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (d, String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A DEL of pod `i` with pontoon's debug log written to `log`.
fn del_logged(c: &Contender, pod: &str, i: usize, log: &Path) {
    let mut child = Command::new(&c.bin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", "DEL")
        .env("CNI_CONTAINERID", format!("bench-{}-{i}", c.idx))
        .env("CNI_NETNS", format!("/var/run/netns/{pod}"))
        .env("CNI_IFNAME", "eth0")
        .env("PONTOON_LOG_FILE", log)
        .env("PONTOON_LOG_LEVEL", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(c.conf(i).to_string().as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

fn run_batch(netns: Option<&str>, script: &str) {
    let mut c = Command::new("ip");
    if let Some(ns) = netns {
        c.args(["-n", ns]);
    }
    let mut child = c
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ip -batch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}");
}

/// Pod namespaces, created ahead of time (not measured) and removed at the end.
struct Pods {
    prefix: String,
    made: Vec<String>,
}

impl Pods {
    fn get(&mut self, tag: &str) -> String {
        let name = format!("{}-{tag}", self.prefix);
        sh(&["ip", "netns", "add", &name]);
        self.made.push(name.clone());
        name
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for n in &self.made {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[derive(Default)]
struct Stats(Vec<Duration>);

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        let mut v: Vec<f64> = self.0.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i]
    }
    fn summary(&self) -> Value {
        json!({"n": self.0.len(), "p50_ms": self.pct(50.0), "p90_ms": self.pct(90.0),
               "p99_ms": self.pct(99.0), "max_ms": self.pct(100.0)})
    }
}

struct Bench {
    pods: Pods,
    rows: BTreeMap<String, BTreeMap<Who, Value>>,
    work: PathBuf,
    pontoon: PathBuf,
    base: Option<PathBuf>,
    next_idx: usize,
}

impl Bench {
    fn contenders(&mut self, masq: bool) -> Vec<Contender> {
        self.contenders_with(masq, false, &[Who::Pontoon, Who::Reference, Who::Floor])
    }

    fn contenders_with(&mut self, masq: bool, ports: bool, who_list: &[Who]) -> Vec<Contender> {
        let mut v = Vec::new();
        let mut list = who_list.to_vec();
        if self.base.is_some() && list.contains(&Who::Pontoon) {
            list.insert(1, Who::Base);
        }
        for who in list {
            self.next_idx += 1;
            let idx = self.next_idx;
            let bin = match who {
                Who::Pontoon => self.pontoon.clone(),
                Who::Base => self.base.clone().unwrap(),
                Who::Reference => Path::new(REFERENCE_DIR).join("bridge"),
                Who::Floor => PathBuf::new(),
            };
            let c = Contender {
                who,
                idx,
                bin,
                data_dir: self.work.join(format!("ipam{idx}")),
                masq,
                ports,
            };
            if who == Who::Floor {
                // The floor's bridge, made like a plugin would on first use.
                run_batch(
                    None,
                    &format!(
                        "link add {br} type bridge\naddr add 10.{o}.0.1/16 dev {br}\nlink set {br} up\n",
                        br = c.bridge(),
                        o = c.subnet_octet()
                    ),
                );
            }
            v.push(c);
        }
        v
    }

    fn record(&mut self, row: &str, who: Who, v: Value) {
        self.rows.entry(row.to_string()).or_default().insert(who, v);
    }

    /// N pods ADDed, then DELed, contenders interleaved pod by pod; the ADD and DEL latencies
    /// of each contender.
    fn interleaved(&mut self, cs: &[Contender], n: usize, tag: &str) -> Vec<(Stats, Stats)> {
        let mut st: Vec<(Stats, Stats)> = cs.iter().map(|_| Default::default()).collect();
        let mut pods = Vec::new();
        for i in 0..n {
            let per: Vec<String> = cs
                .iter()
                .map(|c| self.pods.get(&format!("{tag}{}-{i}", c.idx)))
                .collect();
            for (k, c) in cs.iter().enumerate() {
                st[k].0.0.push(c.add(&per[k], i));
            }
            pods.push(per);
        }
        for (i, per) in pods.iter().enumerate() {
            for (k, c) in cs.iter().enumerate() {
                st[k].1.0.push(c.del(&per[k], i));
            }
        }
        st
    }

    /// Sequential pods, with and without masquerade. The floor has no masquerade: its "+masq"
    /// row is the same floor again.
    fn sequential(&mut self, n: usize) {
        let mut cs = self.contenders(false);
        cs.extend(self.contenders(true));
        for (c, (add, del)) in cs.iter().zip(self.interleaved(&cs, n, "s")) {
            let tag = if c.masq { " +masq" } else { "" };
            self.record(&format!("sequential ADD{tag}"), c.who, add.summary());
            self.record(&format!("sequential DEL{tag}"), c.who, del.summary());
        }
    }

    /// ADD/DEL with two hostPort mappings per pod against pontoon without any.
    fn hostports(&mut self, n: usize) {
        let mut cs = self.contenders_with(false, false, &[Who::Pontoon]);
        cs.extend(self.contenders_with(false, true, &[Who::Pontoon, Who::Reference]));
        for (c, (add, del)) in cs.iter().zip(self.interleaved(&cs, n, "h")) {
            let row = if c.ports {
                "2 hostPorts"
            } else {
                "0 hostPorts"
            };
            self.record(&format!("ADD, {row}"), c.who, add.summary());
            self.record(&format!("DEL, {row}"), c.who, del.summary());
        }
    }

    /// How long a hostPort DEL holds the pool lock (from pontoon's debug log), over `n` pods.
    fn lock_hold(&mut self, n: usize) {
        let cs = self.contenders_with(false, true, &[Who::Pontoon]);
        let c = &cs[0];
        // (an earlier pontoon does not log its lock hold: only this one is measured)
        let log = self.work.join("lock-hold.log");
        let mut holds = Stats::default();
        for i in 0..n {
            let p = self.pods.get(&format!("l{}-{i}", c.idx));
            c.add(&p, i);
            let _ = std::fs::remove_file(&log);
            del_logged(c, &p, i, &log);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            for l in text.lines().filter(|l| l.contains("pool lock of network")) {
                if let Some(ms) = l
                    .split("held ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|v| v.parse::<f64>().ok())
                {
                    holds.0.push(Duration::from_secs_f64(ms / 1e3));
                }
            }
        }
        self.record(
            "pool lock held by a DEL, 2 hostPorts",
            Who::Pontoon,
            holds.summary(),
        );
    }

    /// P workers over `total` pods: pods/s and latency. Contenders run one after another.
    fn parallel(&mut self, workers: usize, total: usize) {
        let cs = self.contenders(false);
        for c in &cs {
            let pods: Vec<String> = (0..total)
                .map(|i| self.pods.get(&format!("p{}-{i}", c.idx)))
                .collect();
            let t = Instant::now();
            let lat: Vec<Duration> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..workers)
                    .map(|w| {
                        let pods = &pods;
                        s.spawn(move || {
                            (w..total)
                                .step_by(workers)
                                .map(|i| c.add(&pods[i], i))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
            });
            let secs = t.elapsed().as_secs_f64();
            let st = Stats(lat);
            let mut v = st.summary();
            v["pods_per_s"] = json!(total as f64 / secs);
            self.record(&format!("parallel ADD x{workers}"), c.who, v);
            for (i, p) in pods.iter().enumerate() {
                c.del(p, i);
            }
        }
    }

    /// A node drain: `total` pods ADDed (not timed), then all DELed by `workers` at a time;
    /// the DEL latencies and the whole drain's time.
    fn drain(&mut self, total: usize, workers: usize) {
        let cs = self.contenders(false);
        for c in &cs {
            let pods: Vec<String> = (0..total)
                .map(|i| self.pods.get(&format!("d{}-{i}", c.idx)))
                .collect();
            for (i, p) in pods.iter().enumerate() {
                c.add(p, i);
            }
            let t = Instant::now();
            let lat: Vec<Duration> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..workers)
                    .map(|w| {
                        let pods = &pods;
                        s.spawn(move || {
                            (w..total)
                                .step_by(workers)
                                .map(|i| c.del(&pods[i], i))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
            });
            let mut v = Stats(lat).summary();
            v["drain_s"] = json!(t.elapsed().as_secs_f64());
            let how = if workers == 1 {
                "back to back".to_string()
            } else {
                format!("{workers} at a time")
            };
            self.record(&format!("drain {total} pods, {how}"), c.who, v);
        }
    }

    /// ADD/DEL latency with `existing` pods on the bridge and `prealloc` allocations in the pool.
    fn scale(&mut self, levels: &[usize], samples: usize, prealloc: usize) {
        let cs = self.contenders(false);
        // Allocations of other containers in host-local's format (both pools read it).
        for c in &cs {
            if c.who == Who::Floor {
                continue;
            }
            let dir = c.data_dir.join(format!("bench{}", c.idx));
            std::fs::create_dir_all(&dir).unwrap();
            for k in 0..prealloc {
                let ip = format!("10.{}.{}.{}", c.subnet_octet(), 200 + k / 250, 1 + k % 250);
                std::fs::write(dir.join(ip), format!("other-{k}\r\neth0")).unwrap();
            }
        }
        let mut filled = 0;
        let mut next = 0usize;
        let mut base: Vec<Vec<(String, usize)>> = cs.iter().map(|_| vec![]).collect();
        for &level in levels {
            while filled < level {
                for (k, c) in cs.iter().enumerate() {
                    let p = self.pods.get(&format!("b{}-{next}", c.idx));
                    c.add(&p, next);
                    base[k].push((p, next));
                }
                next += 1;
                filled += 1;
            }
            let mut add: Vec<Stats> = cs.iter().map(|_| Stats::default()).collect();
            let mut del: Vec<Stats> = cs.iter().map(|_| Stats::default()).collect();
            for _ in 0..samples {
                for (k, c) in cs.iter().enumerate() {
                    let p = self.pods.get(&format!("x{}-{next}", c.idx));
                    add[k].0.push(c.add(&p, next));
                    del[k].0.push(c.del(&p, next));
                }
                next += 1;
            }
            for (k, c) in cs.iter().enumerate() {
                self.record(
                    &format!("ADD with {level} pods, {prealloc} allocs"),
                    c.who,
                    add[k].summary(),
                );
                self.record(
                    &format!("DEL with {level} pods, {prealloc} allocs"),
                    c.who,
                    del[k].summary(),
                );
            }
        }
        for (k, c) in cs.iter().enumerate() {
            for (p, i) in &base[k] {
                c.del(p, *i);
            }
        }
    }

    fn print(&self) {
        let base = self.base.is_some();
        if base {
            println!(
                "\n{:<34} {:>22} {:>22} {:>9}",
                "", "pontoon p50/p99 ms", "base p50/p99", "pon/base"
            );
        }
        for (row, m) in self.rows.iter().filter(|_| base) {
            let f = |w: Who| m.get(&w).and_then(|v| v["p50_ms"].as_f64());
            let c = |w: Who| {
                m.get(&w)
                    .and_then(|v| {
                        Some(format!(
                            "{:.2} / {:.2}",
                            v["p50_ms"].as_f64()?,
                            v["p99_ms"].as_f64()?
                        ))
                    })
                    .unwrap_or_else(|| "-".into())
            };
            let r = match (f(Who::Pontoon), f(Who::Base)) {
                (Some(a), Some(b)) => format!("{:.2}", a / b),
                _ => String::new(),
            };
            let rate = |w: Who| {
                m.get(&w)
                    .and_then(|v| v["pods_per_s"].as_f64())
                    .map(|r| format!(" ({r:.0}/s)"))
                    .unwrap_or_default()
            };
            println!(
                "{:<34} {:>22} {:>22} {:>9}",
                row,
                c(Who::Pontoon) + &rate(Who::Pontoon),
                c(Who::Base) + &rate(Who::Base),
                r
            );
        }
        println!(
            "\n{:<34} {:>22} {:>22} {:>22} {:>9} {:>9}",
            "", "pontoon p50/p99 ms", "reference p50/p99", "floor p50/p99", "pon/ref", "pon/floor"
        );
        for (row, m) in &self.rows {
            let cell = |w: Who| {
                m.get(&w)
                    .map(|v| {
                        let (Some(p50), Some(p99)) = (v["p50_ms"].as_f64(), v["p99_ms"].as_f64())
                        else {
                            return "-".to_string();
                        };
                        let mut s = format!("{p50:.2} / {p99:.2}");
                        if let Some(r) = v["pods_per_s"].as_f64() {
                            s = format!("{s} ({r:.0}/s)");
                        }
                        if let Some(d) = v["drain_s"].as_f64() {
                            s = format!("{s} ({d:.2} s)");
                        }
                        s
                    })
                    .unwrap_or_default()
            };
            let p50 = |w: Who| {
                m.get(&w)
                    .and_then(|v| v["p50_ms"].as_f64())
                    .unwrap_or(f64::NAN)
            };
            let ratio = |a: f64, b: f64| {
                if b.is_nan() {
                    String::new()
                } else {
                    format!("{:.2}", a / b)
                }
            };
            println!(
                "{:<34} {:>22} {:>22} {:>22} {:>9} {:>9}",
                row,
                cell(Who::Pontoon),
                cell(Who::Reference),
                cell(Who::Floor),
                ratio(p50(Who::Pontoon), p50(Who::Reference)),
                ratio(p50(Who::Pontoon), p50(Who::Floor)),
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // cargo bench/test discovery
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the benchmark needs root (it creates network namespaces)");
        std::process::exit(1);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench-cni.json"));
    assert!(
        Path::new(REFERENCE_DIR).join("bridge").exists(),
        "the Go reference is missing: apt-get install containernetworking-plugins"
    );
    let pontoon = std::env::var_os("PONTOON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/pontoon"));
    let pontoon =
        std::fs::canonicalize(&pontoon).expect("build pontoon first: cargo build --release");
    let base = std::env::var_os("PONTOON_BASE_BIN")
        .map(|p| std::fs::canonicalize(p).expect("PONTOON_BASE_BIN does not exist"));
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(String::from).collect());
    let want = move |s: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == s));

    // A throwaway node namespace; this process enters it so every plugin it starts runs there,
    // as under a runtime on the node (no `ip netns exec` in the measured path).
    let node = format!("pbench{}", std::process::id());
    sh(&["ip", "netns", "add", &node]);
    let node_ns = std::fs::File::open(format!("/var/run/netns/{node}")).unwrap();
    let work = std::env::temp_dir().join(format!("pontoon-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let result = std::panic::catch_unwind(move || {
        nix::sched::setns(&node_ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        sh(&["ip", "link", "set", "lo", "up"]);
        let mut b = Bench {
            pods: Pods {
                prefix: format!("pb{}", std::process::id()),
                made: vec![],
            },
            rows: BTreeMap::new(),
            work: work.clone(),
            pontoon,
            base,
            next_idx: 0,
        };
        let (n, par, total, levels, samples, prealloc) = if quick {
            (5, 4, 12, vec![3], 3, 20)
        } else {
            (100, 8, 200, vec![10, 100, 250], 20, 1000)
        };
        if want("sequential") {
            b.sequential(n);
        }
        if want("hostports") {
            b.hostports(if quick { 3 } else { 50 });
            b.lock_hold(if quick { 3 } else { 20 });
        }
        if want("parallel") {
            b.parallel(par, total);
        }
        if want("drain") {
            let pods = if quick { 8 } else { 110 };
            b.drain(pods, 1);
            b.drain(pods, 8);
        }
        if want("scale") {
            b.scale(&levels, samples, prealloc);
        }
        b.print();
        let json: BTreeMap<&String, BTreeMap<&str, &Value>> = b
            .rows
            .iter()
            .map(|(k, m)| (k, m.iter().map(|(w, v)| (w.name(), v)).collect()))
            .collect();
        std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        println!("\nwritten: {}", out.display());
        drop(b);
        let _ = std::fs::remove_dir_all(&work);
    });
    let _ = Command::new("ip").args(["netns", "del", &node]).status();
    if result.is_err() {
        std::process::exit(1);
    }
}

//! Whatever happens, the pool and the node converge to exactly the pods that exist: reboots,
//! SIGKILLs mid-ADD and mid-DEL, a hung lock holder, inherited host-local state, many
//! concurrent operations, an unusable state directory.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn small(node: &Node) -> Value {
    node.conf("1.1.0", json!([[{"subnet": "10.99.0.0/29"}]]), json!({}))
}

#[test]
fn after_a_reboot_a_full_pool_serves_new_pods_at_once() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("reboot");
    let conf = small(&node);
    let mut pods = vec![];
    for i in 0..5 {
        let ns = node.pod(&format!("p{i}"));
        node.cni("ADD", &format!("c{i}"), &ns, "eth0", &conf).ok();
        pods.push(ns);
    }
    node.cni_env("STATUS", &[], conf.to_string().as_bytes())
        .err(50);
    // "Reboot": every pod netns (and so every veth) is gone, the state dir is kept, no DEL came.
    for ns in &pods {
        node.del_pod(ns);
    }
    // The kernel tears a namespace (and its veths) down asynchronously.
    wait_for("the veths to go with their netns", || {
        node.veths().is_empty()
    });
    assert_eq!(node.allocations("testnet").len(), 5);
    // STATUS counts the stale allocations as free; a new pod gets an address at once.
    node.cni_env("STATUS", &[], conf.to_string().as_bytes())
        .ok();
    let st = node.pontoon(&["status", "--conf", &write_conflist(&node, &conf), "--json"]);
    let report: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(report[0]["stale"], 5, "{report}");
    let fresh = node.pod("fresh");
    node.cni("ADD", "fresh", &fresh, "eth0", &conf).ok();
    assert!(node.ping(&fresh, "10.99.0.1"));
    // Every stale allocation was reclaimed in that one go.
    assert_eq!(node.allocations("testnet").len(), 1);
    let list = write_conflist(&node, &conf);
    let gc = node.pontoon(&["gc", "--conf", &list]);
    assert!(String::from_utf8_lossy(&gc.stdout).contains("nothing stale"));
    // Another "reboot", this time cleaned up by the operator command.
    let more: Vec<String> = (0..4).map(|i| node.pod(&format!("m{i}"))).collect();
    for (i, ns) in more.iter().enumerate() {
        node.cni("ADD", &format!("m{i}"), ns, "eth0", &conf).ok();
    }
    node.del_pod(&fresh);
    for ns in &more {
        node.del_pod(ns);
    }
    // The kernel tears a namespace (and its veths) down asynchronously.
    wait_for("the veths to go with their netns", || {
        node.veths().is_empty()
    });
    let gc = node.pontoon(&["gc", "--conf", &list]);
    assert!(gc.status.success());
    let said = String::from_utf8_lossy(&gc.stdout);
    assert_eq!(said.matches("released").count(), 5, "{said}");
    assert!(node.allocations("testnet").is_empty());
}

fn write_conflist(node: &Node, conf: &Value) -> String {
    let mut plugin = conf.clone();
    let name = plugin["name"].clone();
    let version = plugin["cniVersion"].clone();
    plugin.as_object_mut().unwrap().remove("name");
    plugin.as_object_mut().unwrap().remove("cniVersion");
    let list = json!({"cniVersion": version, "name": name, "plugins": [plugin]});
    let p = node.dir.join("10-test.conflist");
    std::fs::write(&p, list.to_string()).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn allocations_from_host_local_are_never_reclaimed_as_stale() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("foreign");
    let conf = small(&node);
    // A node that ran host-local: its allocations, for veths with random names.
    let dir = node.data_dir().join("testnet");
    std::fs::create_dir_all(&dir).unwrap();
    for (ip, cid) in [("10.99.0.2", "hl-a"), ("10.99.0.3", "hl-b")] {
        std::fs::write(dir.join(ip), format!("{cid}\r\neth0")).unwrap();
    }
    for i in 0..3 {
        let ns = node.pod(&format!("p{i}"));
        node.cni("ADD", &format!("c{i}"), &ns, "eth0", &conf).ok();
    }
    // Full: the foreign ones have no veth pontoon knows, yet they are not stale.
    let ns = node.pod("x");
    node.cni("ADD", "x", &ns, "eth0", &conf).err(100);
    let st = node.pontoon(&["status", "--conf", &write_conflist(&node, &conf), "--json"]);
    let report: Value = serde_json::from_slice(&st.stdout).unwrap();
    let states: Vec<&str> = report[0]["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states.iter().filter(|s| **s == "foreign").count(),
        2,
        "{report}"
    );
    assert_eq!(
        states.iter().filter(|s| **s == "alive").count(),
        3,
        "{report}"
    );
    node.pontoon(&["gc", "--conf", &write_conflist(&node, &conf)]);
    assert_eq!(node.allocations("testnet").len(), 5);
    // DEL releases them (host-local's attachments are indexed on first use).
    node.cni("DEL", "hl-a", "", "eth0", &conf).ok();
    assert_eq!(node.allocations("testnet").len(), 4);
    // And GC releases what is not valid.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([
        {"containerID": "c0", "ifname": "eth0"}, {"containerID": "c1", "ifname": "eth0"},
        {"containerID": "c2", "ifname": "eth0"}]);
    node.cni_env("GC", &[], gc.to_string().as_bytes()).ok();
    assert_eq!(node.allocations("testnet").len(), 3);
}

#[test]
fn an_add_in_progress_is_not_stale_until_its_lease_expires() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("lease");
    let conf = small(&node);
    for i in 0..4 {
        let ns = node.pod(&format!("p{i}"));
        node.cni("ADD", &format!("c{i}"), &ns, "eth0", &conf).ok();
    }
    // An ADD "in progress" (its process alive, its veth not made yet) holds the last address.
    let mut holder = Command::new("sleep").arg("30").spawn().unwrap();
    let dir = node.data_dir().join("testnet");
    std::fs::write(dir.join("10.99.0.6"), "busy\r\neth0").unwrap();
    let lease = json!({"ips": ["10.99.0.6"], "hostVeth": "ponfffffffffff0",
                       "adding": {"pid": holder.id(), "since": now()}});
    std::fs::write(
        dir.join(".pontoon/attachments/busy:eth0"),
        lease.to_string(),
    )
    .unwrap();
    let ns = node.pod("late");
    node.cni("ADD", "late", &ns, "eth0", &conf).err(100);
    // GC does not release it either, even unlisted (the pods c0..c3 are listed).
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([
        {"containerID": "c0", "ifname": "eth0"}, {"containerID": "c1", "ifname": "eth0"},
        {"containerID": "c2", "ifname": "eth0"}, {"containerID": "c3", "ifname": "eth0"}]);
    node.cni_env("GC", &[], gc.to_string().as_bytes()).ok();
    assert_eq!(node.allocations("testnet").len(), 5);
    // The ADD's process dies without finishing: the lease expires and the address is reclaimed.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let r = node.cni("ADD", "late", &ns, "eth0", &conf).ok();
    assert_eq!(result_ips(&r), ["10.99.0.6"]);
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_hung_lock_holder_makes_adds_fail_fast_with_code_11() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("hung");
    let conf = node.conf(
        "1.0.0",
        v4(),
        json!({"ipam": {"type": "host-local", "ranges": v4(), "dataDir": node.data_dir(), "lockTimeoutMs": 500}}),
    );
    let ns = node.pod("p");
    node.cni("ADD", "c0", &ns, "eth0", &conf).ok();
    let lock = node.data_dir().join("testnet/lock");
    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Stop the holder only once it holds the lock (a loaded machine may take a while).
    wait_for("flock to take the pool lock", || {
        let f = std::fs::File::open(&lock).unwrap();
        match f.try_lock() {
            Ok(()) => {
                f.unlock().unwrap();
                false
            }
            Err(_) => true,
        }
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder.id() as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let ns2 = node.pod("q");
    let t = Instant::now();
    let msg = node.cni("ADD", "c1", &ns2, "eth0", &conf).err(11);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(msg.contains("try again"), "{msg}");
    // A DEL that cannot get the lock changes nothing (the runtime retries it): c0 keeps its
    // veth and address; the failed ADD left no veth.
    node.cni("DEL", "c0", &ns, "eth0", &conf).err(11);
    assert_eq!(node.veths().len(), 1, "{:?}", node.veths());
    assert_eq!(node.allocations("testnet").len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder.id() as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    holder.wait().unwrap();
    node.cni("ADD", "c1", &ns2, "eth0", &conf).ok();
    node.cni("DEL", "c0", &ns, "eth0", &conf).ok();
    assert_eq!(node.allocations("testnet").len(), 1);
    assert_eq!(node.veths().len(), 1);
}

#[test]
fn sigkill_during_add_and_del_leaks_nothing() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("kill");
    // Dual stack: a kill can land between the two range sets of one ADD.
    let conf = node.conf(
        "1.0.0",
        json!([[{"subnet": "10.96.0.0/24"}], [{"subnet": "fd96::/64"}]]),
        json!({}),
    );
    let mut rng = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut pods = vec![];
    for i in 0..100 {
        let ns = node.pod(&format!("k{i}"));
        let cid = format!("k{i}");
        let verb = if i % 4 == 3 { "DEL" } else { "ADD" };
        if verb == "DEL" {
            node.cni("ADD", &cid, &ns, "eth0", &conf).ok();
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.name, BIN])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", &cid)
            .env("CNI_NETNS", &ns)
            .env("CNI_IFNAME", "eth0")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        let _ = child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes());
        std::thread::sleep(Duration::from_micros(3_000 + next() % 12_000));
        // Kill the plugin itself (the child of `ip netns exec`, which execs it in place).
        let _ = child.kill();
        let _ = child.wait();
        // Half of the killed ADDs are retried, as a runtime does; the retry must work.
        if verb == "ADD" && next() % 2 == 0 {
            node.cni("ADD", &cid, &ns, "eth0", &conf).ok();
            assert!(
                node.ping(&ns, "10.96.0.1"),
                "retried {cid} cannot reach its gateway"
            );
        }
        pods.push((cid, ns));
    }
    // No pod that can carry traffic holds an address the pool does not give it. (A DEL killed
    // after its release and before the veth's deletion leaves the pod end with its address,
    // but its host end is down and off the bridge: nobody can reach it, and the retried DEL
    // deletes it.)
    let dir = node.data_dir().join("testnet");
    for (cid, ns) in &pods {
        let out = node.in_pod(ns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Some(ip) = word.strip_suffix("/24") {
                let holder = std::fs::read_to_string(dir.join(ip)).unwrap_or_default();
                if holder == format!("{cid}\r\neth0") {
                    continue;
                }
                let host = pontoon::dataplane::host_veth_name(cid, "eth0");
                let link = node.node_ok(&["ip", "-o", "link", "show", &host]);
                assert!(
                    !link.contains("master") && !link.contains(",UP"),
                    "{cid} has {ip} (the pool says {holder:?}) and its port is in service: {link}"
                );
            }
        }
    }
    // Every address file is listed by its holder's record (else DEL could never free it).
    for ip in node.allocations("testnet") {
        let holder = std::fs::read_to_string(dir.join(&ip)).unwrap();
        let (cid, ifname) = holder.split_once("\r\n").expect("a complete address file");
        let rec: Value = serde_json::from_slice(
            &std::fs::read(dir.join(format!(".pontoon/attachments/{cid}:{ifname}")))
                .unwrap_or_else(|_| panic!("{ip} of {cid} has no record")),
        )
        .unwrap();
        assert!(
            rec["ips"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i == &json!(ip)),
            "{ip} of {cid} is not in its record {rec}"
        );
    }
    // One DEL per container leaves nothing behind.
    for (cid, ns) in &pods {
        node.cni("DEL", cid, ns, "eth0", &conf).ok();
    }
    assert!(
        node.allocations("testnet").is_empty(),
        "{:?}",
        node.allocations("testnet")
    );
    assert!(node.veths().is_empty(), "{:?}", node.veths());
    wait_for("the reaper to delete the retired veths", || {
        node.all_veths().is_empty()
    });
}

#[test]
fn concurrent_operations_converge_to_the_live_pods() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("race");
    let conf = node.conf("1.1.0", json!([[{"subnet": "10.97.0.0/24"}]]), json!({}));
    const WORKERS: usize = 64;
    const PER: usize = 3; // containers per worker
    const OPS: usize = 24; // operations per worker
    let netns: Vec<Vec<String>> = (0..WORKERS)
        .map(|w| (0..PER).map(|c| node.pod(&format!("w{w}c{c}"))).collect())
        .collect();
    let universe: Vec<Value> = (0..WORKERS)
        .flat_map(|w| {
            (0..PER).map(move |c| json!({"containerID": format!("w{w}c{c}"), "ifname": "eth0"}))
        })
        .collect();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = Value::Array(universe);
    let finals: Vec<HashMap<String, Option<String>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (node, conf, gc, netns) = (&node, &conf, &gc, &netns);
                s.spawn(move || {
                    let mut rng = (w as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15);
                    let mut state: HashMap<String, Option<(String, Value)>> = HashMap::new();
                    for _ in 0..OPS {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let c = (rng % PER as u64) as usize;
                        let cid = format!("w{w}c{c}");
                        let ns = &netns[w][c];
                        match (rng >> 8) % 10 {
                            0..=3 => {
                                let r = node.cni("ADD", &cid, ns, "eth0", conf).ok();
                                state.insert(cid, Some((result_ips(&r)[0].clone(), r)));
                            }
                            4..=6 => {
                                node.cni("DEL", &cid, ns, "eth0", conf).ok();
                                state.insert(cid, None);
                            }
                            7 => {
                                if let Some(Some((_, r))) = state.get(&cid) {
                                    let mut chk = conf.clone();
                                    chk["prevResult"] = r.clone();
                                    node.cni("CHECK", &cid, ns, "eth0", &chk).ok();
                                }
                            }
                            8 => {
                                node.cni_env("GC", &[], gc.to_string().as_bytes()).ok();
                            }
                            _ => {
                                node.cni_env("STATUS", &[], conf.to_string().as_bytes())
                                    .ok();
                            }
                        }
                    }
                    state
                        .into_iter()
                        .map(|(k, v)| (k, v.map(|(ip, _)| ip)))
                        .collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let live: HashMap<String, String> = finals
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.map(|ip| (k, ip)))
        .collect();
    let ips: HashSet<&String> = live.values().collect();
    assert_eq!(ips.len(), live.len(), "an address is given twice: {live:?}");
    let mut want: Vec<String> = live.values().cloned().collect();
    want.sort();
    assert_eq!(node.allocations("testnet"), want, "pool != live pods");
    assert_eq!(node.veths().len(), live.len());
}

/// A tmpfs for the state directory (mounted under the test's own temp dir, removed on drop).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn new(at: std::path::PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).unwrap();
        run_ok(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            at.to_str().unwrap(),
        ]);
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_or_read_only_state_dir_fails_cleanly() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("disk");
    let mnt = Tmpfs::new(node.dir.join("state"), "64k");
    let conf = node.conf(
        "1.1.0",
        v4(),
        json!({"ipam": {"type": "host-local", "ranges": v4(), "dataDir": mnt.0}}),
    );
    let ns = node.pod("p");
    node.cni("ADD", "c0", &ns, "eth0", &conf).ok();
    // Fill the filesystem.
    let _ = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}/fill", mnt.0.display()),
            "bs=4k",
        ])
        .stderr(Stdio::null())
        .status();
    let ns2 = node.pod("q");
    let r = node.cni("ADD", "c1", &ns2, "eth0", &conf);
    let msg = r.err(5);
    assert!(msg.contains("cannot"), "{msg}");
    assert_eq!(node.veths().len(), 1, "a failed ADD left a veth");
    // Read-only.
    std::fs::remove_file(mnt.0.join("fill")).unwrap();
    run_ok(&["mount", "-o", "remount,ro", mnt.0.to_str().unwrap()]);
    node.cni("ADD", "c1", &ns2, "eth0", &conf).err(5);
    assert_eq!(node.veths().len(), 1);
    let msg = node
        .cni_env("STATUS", &[], conf.to_string().as_bytes())
        .err(50);
    assert!(
        msg.contains("unusable") || msg.contains("Read-only"),
        "{msg}"
    );
    run_ok(&["mount", "-o", "remount,rw", mnt.0.to_str().unwrap()]);
    node.cni("ADD", "c1", &ns2, "eth0", &conf).ok();
    node.cni_env("STATUS", &[], conf.to_string().as_bytes())
        .ok();
}

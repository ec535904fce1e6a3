//! One attachment, one record: whatever path releases an attachment (DEL, ADD rollback, a full
//! pool's reclaim, `pontoon gc`, CNI GC) frees exactly what it holds (addresses, hostPort
//! mappings, veth) and nothing of anyone else's; partial, unreadable and power-lost state
//! leaks nothing; leases hold across pid namespaces.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn small(node: &Node, extra: Value) -> Value {
    node.conf("1.1.0", json!([[{"subnet": "10.99.0.0/29"}]]), extra)
}

fn with_ports(conf: &Value, ports: Value) -> Value {
    let mut c = conf.clone();
    c["runtimeConfig"] = json!({"portMappings": ports});
    c
}

fn port_8080() -> Value {
    json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}])
}

/// The conflist file of `conf`, for the operator commands.
fn conflist(node: &Node, conf: &Value) -> String {
    let mut plugin = conf.clone();
    let obj = plugin.as_object_mut().unwrap();
    let name = obj.remove("name").unwrap();
    let version = obj.remove("cniVersion").unwrap();
    obj.remove("runtimeConfig");
    let p = node
        .dir
        .join(format!("{}.conflist", name.as_str().unwrap()));
    std::fs::write(
        &p,
        json!({"cniVersion": version, "name": name, "plugins": [plugin]}).to_string(),
    )
    .unwrap();
    p.to_string_lossy().into_owned()
}

fn record_path(node: &Node, net: &str, cid: &str) -> std::path::PathBuf {
    node.data_dir()
        .join(net)
        .join(format!(".pontoon/attachments/{cid}:eth0"))
}

/// Lines of the node's pontoon table that map host port 8080.
fn mapped_8080(node: &Node) -> Vec<String> {
    table(node)
        .lines()
        .filter(|l| l.contains("8080 :"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// A pod lost without DEL (its netns, hence its veth, is gone).
fn lose(node: &mut Node, ns: &str) {
    let before = node.all_veths().len();
    node.del_pod(ns);
    wait_for("the lost pod's veth to go", || {
        node.all_veths().len() < before
    });
}

#[test]
fn a_reclaimed_address_takes_its_host_port_with_it() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("rclhp");
    let conf = small(&node, json!({"capabilities": {"portMappings": true}}));
    // A holds 8080 and is lost; the pool fills up.
    let a = node.pod("a");
    let ra = node
        .cni("ADD", "A", &a, "eth0", &with_ports(&conf, port_8080()))
        .ok();
    let a_ip = result_ips(&ra)[0].clone();
    assert_eq!(mapped_8080(&node).len(), 1, "{}", table(&node));
    let mut others = vec![];
    for i in 0..4 {
        let ns = node.pod(&format!("c{i}"));
        node.cni("ADD", &format!("c{i}"), &ns, "eth0", &conf).ok();
        others.push(ns);
    }
    lose(&mut node, &a);
    // The next ADD reclaims A's address, and with it A's mapping and record.
    let d = node.pod("d");
    let rd = node.cni("ADD", "D", &d, "eth0", &conf).ok();
    assert_eq!(
        result_ips(&rd),
        std::slice::from_ref(&a_ip),
        "D gets A's address"
    );
    assert!(
        mapped_8080(&node).is_empty(),
        "D must not receive A's hostPort: {:?}",
        mapped_8080(&node)
    );
    assert!(!record_path(&node, "testnet", "A").exists());
    // 8080 is free again: a new pod gets it, and traffic to it reaches that pod.
    node.cni("DEL", "c0", &others[0], "eth0", &conf).ok();
    let e = node.pod("e");
    let re = node
        .cni("ADD", "E", &e, "eth0", &with_ports(&conf, port_8080()))
        .ok();
    let e_ip = result_ips(&re)[0].clone();
    let m = mapped_8080(&node);
    assert!(m.len() == 1 && m[0].contains(&e_ip), "{m:?}");
    let srv = PodServer::start(&e, "E", 80);
    let got = talk(&node.name, "tcp", "10.99.0.1", 8080, None).unwrap_or_default();
    assert!(got.starts_with("E "), "hostPort 8080 reaches E: {got:?}");
    drop(srv); // its process would keep E's netns alive

    // The same through the operator's `pontoon gc`.
    lose(&mut node, &e);
    let gc = node.pontoon(&["gc", "--conf", &conflist(&node, &conf)]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert!(
        String::from_utf8_lossy(&gc.stdout).contains("of E/eth0"),
        "{}",
        String::from_utf8_lossy(&gc.stdout)
    );
    assert!(mapped_8080(&node).is_empty(), "{:?}", mapped_8080(&node));
    assert!(!node.allocations("testnet").contains(&e_ip));
}

#[test]
fn gc_on_a_shared_bridge_touches_only_its_own_network() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("gcshr");
    // Two networks on the default bridge: one the gateway, one L2 among its pods.
    let net1 = node.conf(
        "1.1.0",
        json!([[{"subnet": "10.71.0.0/24"}]]),
        json!({"name": "net1"}),
    );
    let net2 = node.conf(
        "1.1.0",
        json!([[{"subnet": "10.72.0.0/24"}]]),
        json!({"name": "net2", "isGateway": false, "isDefaultGateway": false}),
    );
    let mut pods = vec![];
    for (net, conf) in [("n1", &net1), ("n2", &net2)] {
        for p in ["a", "b"] {
            let ns = node.pod(&format!("{net}{p}"));
            let r = node
                .cni("ADD", &format!("{net}{p}"), &ns, "eth0", conf)
                .ok();
            pods.push((ns, result_ips(&r)[0].clone()));
        }
    }
    assert_eq!(node.veths().len(), 4);
    let gc = |conf: &Value, keep: &str| {
        let mut c = conf.clone();
        c["cni.dev/valid-attachments"] = json!([{"containerID": keep, "ifname": "eth0"}]);
        node.cni_env("GC", &[], c.to_string().as_bytes()).ok();
    };
    gc(&net1, "n1a");
    assert_eq!(node.veths().len(), 3, "only n1b went: {:?}", node.veths());
    assert!(node.ping(&pods[2].0, &pods[3].1), "net2's pods still talk");
    assert!(node.ping(&pods[0].0, "10.71.0.1"), "n1a still works");
    assert_eq!(node.allocations("net2").len(), 2);
    gc(&net2, "n2a");
    assert_eq!(node.veths().len(), 2, "only n2b went: {:?}", node.veths());
    assert!(
        node.ping(&pods[0].0, "10.71.0.1"),
        "net1 untouched by net2's GC"
    );
    assert_eq!(node.allocations("net1"), [pods[0].1.clone()]);
    assert_eq!(node.allocations("net2"), [pods[2].1.clone()]);
}

#[test]
fn gc_never_touches_an_add_in_progress_and_without_the_key_nothing_is_valid() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("gcrace");
    // Duplicate address detection keeps the ADD busy for a second after its veth exists.
    let conf = node.conf("1.1.0", dual(), json!({"enabledad": true}));
    let ns = node.pod("p");
    let mut add = Command::new("ip")
        .args(["netns", "exec", &node.name, BIN])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "inflight")
        .env("CNI_NETNS", &ns)
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    add.stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    wait_for("the in-flight ADD's veth", || node.veths().len() == 1);
    // The runtime's GC lists the pods it knew of when it started: not this one.
    let mut empty = conf.clone();
    empty["cni.dev/valid-attachments"] = json!([]);
    node.cni_env("GC", &[], empty.to_string().as_bytes()).ok();
    let out = add.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the in-flight ADD failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(node.veths().len(), 1, "GC removed an in-flight pod's veth");
    assert_eq!(node.allocations("testnet").len(), 2);
    assert!(node.ping(&ns, "10.88.0.1"));
    // libcni's GC without arguments sends no valid-attachments: nothing is valid.
    node.cni_env("GC", &[], conf.to_string().as_bytes()).ok();
    assert!(node.allocations("testnet").is_empty());
    wait_for("the released veth to go", || node.veths().is_empty());
}

#[test]
fn a_partial_record_is_completed_or_released_by_the_retry() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("partl");
    let conf = node.conf("1.0.0", dual(), json!({}));
    // An ADD killed between its range sets: the record names both addresses, only the IPv4
    // one was reserved.
    let dir = node.data_dir().join("testnet");
    std::fs::create_dir_all(dir.join(".pontoon/attachments")).unwrap();
    std::fs::write(dir.join(".pontoon/v1"), "").unwrap();
    std::fs::write(dir.join(".pontoon/v2"), "").unwrap();
    std::fs::write(
        record_path(&node, "testnet", "k"),
        json!({"ips": ["10.88.0.2", "fd88::2"], "hostVeth": "pon000000000000"}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("10.88.0.2"), "k\r\neth0").unwrap();
    // A neighbour took the IPv6 address the dead ADD had picked.
    std::fs::write(dir.join("fd88::2"), "other\r\neth0").unwrap();
    let ns = node.pod("k");
    let r = node.cni("ADD", "k", &ns, "eth0", &conf).ok();
    assert_eq!(result_ips(&r).len(), 2);
    node.cni("DEL", "k", &ns, "eth0", &conf).ok();
    assert_eq!(
        node.allocations("testnet"),
        ["fd88::2"],
        "the retry leaked the partial ADD's address"
    );
}

#[test]
fn an_unreadable_record_still_releases_its_addresses() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("torn");
    let conf = node.conf("1.0.0", dual(), json!({}));
    let ns = node.pod("p");
    node.cni("ADD", "p", &ns, "eth0", &conf).ok();
    std::fs::write(record_path(&node, "testnet", "p"), "{\"ips\": [\"10.8").unwrap();
    node.cni("DEL", "p", &ns, "eth0", &conf).ok();
    assert!(
        node.allocations("testnet").is_empty(),
        "{:?}",
        node.allocations("testnet")
    );
    wait_for("its veth to go", || node.veths().is_empty());
    // A re-ADD over an unreadable record leaks nothing either.
    node.cni("ADD", "p", &ns, "eth0", &conf).ok();
    std::fs::write(record_path(&node, "testnet", "p"), "").unwrap();
    let r = node.cni("ADD", "p", &ns, "eth0", &conf).ok();
    assert_eq!(node.allocations("testnet").len(), 2);
    assert!(node.ping(&ns, "10.88.0.1"), "{r}");
    node.cni("DEL", "p", &ns, "eth0", &conf).ok();
    assert!(node.allocations("testnet").is_empty());
}

/// Sets a file's mtime to before this boot (as files written before a power cut are).
fn age_past_boot(path: &std::path::Path) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let btime: i64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    run_ok(&[
        "touch",
        "-h",
        "-d",
        &format!("@{}", btime - 3600),
        path.to_str().unwrap(),
    ]);
}

#[test]
fn after_a_power_loss_empty_and_torn_files_are_reclaimed() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("power");
    let conf = small(&node, json!({}));
    let list = conflist(&node, &conf);
    let dir = node.data_dir().join("testnet");
    // Warm the pool up so its directory and markers exist, then empty it.
    let p = node.pod("p");
    node.cni("ADD", "warm", &p, "eth0", &conf).ok();
    node.cni("DEL", "warm", &p, "eth0", &conf).ok();
    // What a power cut leaves of five pods: zero-length address files, zero-length records,
    // and a complete address file whose record came back empty.
    for (i, ip) in ["10.99.0.2", "10.99.0.3", "10.99.0.4", "10.99.0.5"]
        .iter()
        .enumerate()
    {
        std::fs::write(dir.join(ip), "").unwrap();
        age_past_boot(&dir.join(ip));
        let rec = record_path(&node, "testnet", &format!("lost{i}"));
        std::fs::write(&rec, "").unwrap();
        age_past_boot(&rec);
    }
    std::fs::write(dir.join("10.99.0.6"), "lost9\r\neth0").unwrap();
    age_past_boot(&dir.join("10.99.0.6"));
    let rec = record_path(&node, "testnet", "lost9");
    std::fs::write(&rec, "").unwrap();
    age_past_boot(&rec);
    assert_eq!(node.allocations("testnet").len(), 5);
    // STATUS counts them as free; an ADD on the full pool reclaims them.
    node.cni_env("STATUS", &[], conf.to_string().as_bytes())
        .ok();
    let st = node.pontoon(&["status", "--conf", &list, "--json"]);
    let report: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(report[0]["stale"], 5, "{report}");
    let r = node.cni("ADD", "fresh", &p, "eth0", &conf).ok();
    assert!(node.ping(&p, "10.99.0.1"), "{r}");
    assert_eq!(node.allocations("testnet").len(), 1);
    let gc = node.pontoon(&["gc", "--conf", &list]);
    assert!(String::from_utf8_lossy(&gc.stdout).contains("nothing stale"));
    assert!(
        std::fs::read_dir(dir.join(".pontoon/attachments"))
            .unwrap()
            .flatten()
            .all(|e| e.file_name() == "fresh:eth0"),
        "the torn records went with their addresses"
    );
}

/// What `/proc/<pid>` says of a process, as a lease records it.
fn lease_of(pid: u32) -> Value {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let start: u64 = rest.split_whitespace().nth(19).unwrap().parse().unwrap();
    let ns = std::fs::metadata(format!("/proc/{pid}/ns/pid")).unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({"pid": pid, "since": now, "bootId": boot.trim(), "startTime": start,
           "pidNs": std::os::unix::fs::MetadataExt::ino(&ns)})
}

#[test]
fn a_lease_from_another_pid_namespace_counts_as_live() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("pidns");
    let conf = small(&node, json!({}));
    let list = conflist(&node, &conf);
    let p = node.pod("p");
    node.cni("ADD", "c0", &p, "eth0", &conf).ok();
    // An ADD in progress in the node's pid namespace: record and address, no veth yet.
    let mut holder = Command::new("sleep").arg("60").spawn().unwrap();
    let dir = node.data_dir().join("testnet");
    std::fs::write(dir.join("10.99.0.6"), "busy\r\neth0").unwrap();
    std::fs::write(
        record_path(&node, "testnet", "busy"),
        json!({"ips": ["10.99.0.6"], "hostVeth": "ponfffffffffff0", "adding": lease_of(holder.id())})
            .to_string(),
    )
    .unwrap();
    let gc_in_own_pidns = || {
        Command::new("ip")
            .args(["netns", "exec", &node.name])
            .args([
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                BIN,
                "gc",
                "--conf",
                &list,
            ])
            .output()
            .unwrap()
    };
    // `pontoon gc` in a pod without hostPID cannot see the ADD's process: it is not stale.
    let o = gc_in_own_pidns();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        dir.join("10.99.0.6").exists(),
        "a lease from another pid namespace was taken for dead: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Seen from its own pid namespace it is alive too.
    node.pontoon(&["gc", "--conf", &list]);
    assert!(dir.join("10.99.0.6").exists());
    // A reused pid (another process start time) does not keep it alive.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let o = node.pontoon(&["gc", "--conf", &list]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("of busy/eth0"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!dir.join("10.99.0.6").exists());
}

#[test]
fn bad_input_that_used_to_get_through_is_refused_up_front() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("badin");
    let ns = node.pod("p");
    // `ipam` as a string used to make an L2-only pod.
    let mut c = node.conf("1.0.0", v4(), json!({}));
    c["ipam"] = json!("host-local");
    let msg = node.cni("ADD", "c", &ns, "eth0", &c).err(7);
    assert!(msg.contains("`ipam`"), "{msg}");
    // A gateway outside its subnet used to fail late, at the route, after making the bridge
    // and the masquerade table.
    let c = node.conf(
        "1.0.0",
        json!([[{"subnet": "10.88.0.0/24", "gateway": "10.1.0.1"}]]),
        json!({"ipMasq": true}),
    );
    let msg = node.cni("ADD", "c", &ns, "eth0", &c).err(7);
    assert!(msg.contains("10.1.0.1"), "{msg}");
    assert!(
        !node.links().iter().any(|l| l == "cni0"),
        "a bridge was made"
    );
    assert!(
        !node
            .exec(&["nft", "list", "table", "inet", "pontoon"])
            .status
            .success(),
        "a masquerade table was made"
    );
    assert!(node.allocations("testnet").is_empty());
    // The CNI environment without CNI_COMMAND is a plugin call, answered as one.
    let t = Instant::now();
    let mut plugin = Command::new(BIN)
        .env_clear()
        .env("CNI_CONTAINERID", "c")
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    plugin
        .stdin
        .take()
        .unwrap()
        .write_all(c.to_string().as_bytes())
        .unwrap();
    let out = plugin.wait_with_output().unwrap();
    let r = Reply {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let msg = r.err(4);
    assert!(msg.contains("CNI_COMMAND"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

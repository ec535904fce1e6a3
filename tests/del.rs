//! DEL off the kernel's slow path: before DEL returns the attachment is released and its veth
//! is out of service; the veth's deletion follows (the netns teardown, or the reaper within its
//! bound) without holding up the runtime, without inherited descriptors, without zombies.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn del_then_an_immediate_add_of_the_same_attachment_works() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("readd");
    let conf = node.conf("1.0.0", dual(), json!({}));
    let ns = node.pod("p");
    for _ in 0..5 {
        node.cni("ADD", "same", &ns, "eth0", &conf).ok();
        assert!(node.ping(&ns, "10.88.0.1"));
        node.cni("DEL", "same", &ns, "eth0", &conf).ok();
    }
    node.cni("ADD", "same", &ns, "eth0", &conf).ok();
    assert!(node.ping(&ns, "10.88.0.1"), "the re-added pod works");
    assert_eq!(node.all_veths().len(), 1, "{:?}", node.all_veths());
}

#[test]
fn a_released_address_reaches_only_its_new_pod() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("reuse");
    let conf = node.conf("1.0.0", v4(), json!({}));
    let old = node.pod("old");
    let new = node.pod("new");
    let peer = node.pod("peer");
    let r = node.cni("ADD", "old", &old, "eth0", &conf).ok();
    let ip = result_ips(&r)[0].clone();
    let rp = node.cni("ADD", "peer", &peer, "eth0", &conf).ok();
    let peer_ip = result_ips(&rp)[0].clone();
    let _old_srv = PodServer::start(&old, "old", 80);
    // The runtime keeps the old netns a moment: its eth0 still holds the address.
    node.cni("DEL", "old", &old, "eth0", &conf).ok();
    let mut want = conf.clone();
    want["runtimeConfig"] = json!({"ips": [ip]});
    node.cni("ADD", "new", &new, "eth0", &want).ok();
    let _new_srv = PodServer::start(&new, "new", 80);
    let _peer_srv = PodServer::start(&peer, "peer", 80);
    for _ in 0..5 {
        // To the address: only the new pod answers (from another pod and from the node).
        let got = talk(&peer, "tcp", &ip, 80, None).unwrap_or_default();
        assert!(got.starts_with("new "), "{got:?}");
        let got = talk(&node.name, "tcp", &ip, 80, None).unwrap_or_default();
        assert!(got.starts_with("new "), "{got:?}");
        // From the address: the new pod's traffic gets its answers.
        let got = talk(&new, "tcp", &peer_ip, 80, None).unwrap_or_default();
        assert_eq!(got, format!("peer {ip}"));
    }
}

#[test]
fn with_a_kept_netns_the_pod_interface_goes_within_the_bound() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("kept");
    let conf = node.conf("1.0.0", v4(), json!({}));
    let ns = node.pod("p");
    node.cni("ADD", "k", &ns, "eth0", &conf).ok();
    let t = Instant::now();
    node.cni("DEL", "k", &ns, "eth0", &conf).ok();
    assert!(node.veths().is_empty(), "out of service when DEL returns");
    let has_eth0 = || {
        node.in_pod(&ns, &["ip", "link", "show", "eth0"])
            .status
            .success()
    };
    wait_for("the pod interface to go", || !has_eth0());
    assert!(
        t.elapsed() < pontoon::reaper::WAIT + Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    assert!(node.all_veths().is_empty());
}

#[test]
fn a_runtime_reading_stdout_to_eof_returns_as_soon_as_del_exits() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("eof");
    let conf = node.conf("1.0.0", v4(), json!({}));
    let ns = node.pod("p");
    node.cni("ADD", "e", &ns, "eth0", &conf).ok();
    // Like containerd: stdout and stderr are pipes read to EOF; the netns is kept, so the
    // reaper lives for its whole bound. Holding any of the pipes would show as a wait here.
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.name, BIN])
        .env_clear()
        .env("CNI_COMMAND", "DEL")
        .env("CNI_CONTAINERID", "e")
        .env("CNI_NETNS", &ns)
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let took = t.elapsed();
    assert!(child.wait().unwrap().success(), "{out} {err}");
    assert!(
        took < Duration::from_millis(1000),
        "stdout/stderr reached EOF only after {took:?}: an inherited descriptor"
    );
}

/// pontoon processes (reapers) whose network namespace is `ns`, and pontoon zombies anywhere.
fn leftovers(ns: &str) -> (usize, usize) {
    let target = std::fs::metadata(format!("/var/run/netns/{ns}"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let (mut live, mut zombies) = (0, 0);
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = p.file_name();
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue;
        };
        if !stat.contains("(pontoon)") || pid.to_str().and_then(|s| s.parse::<u32>().ok()).is_none()
        {
            continue;
        }
        let state = stat[stat.rfind(')').unwrap() + 2..].chars().next();
        if state == Some('Z') {
            zombies += 1;
        } else if std::fs::metadata(p.path().join("ns/net"))
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == target)
        {
            live += 1;
        }
    }
    (live, zombies)
}

#[test]
fn a_thousand_dels_leave_no_process_zombie_or_link() {
    if !require_root() {
        return;
    }
    let mut node = Node::new("k1000");
    let conf = node.conf("1.0.0", json!([[{"subnet": "10.90.0.0/16"}]]), json!({}));
    // Half the pods' netns are deleted right after DEL (as runtimes do), half are kept.
    let kept = node.pod("kept");
    for i in 0..1000 {
        let ns = if i % 2 == 0 {
            kept.clone()
        } else {
            node.pod(&format!("t{i}"))
        };
        node.cni("ADD", &format!("c{i}"), &ns, "eth0", &conf).ok();
        node.cni("DEL", &format!("c{i}"), &ns, "eth0", &conf).ok();
        if i % 2 == 1 {
            node.del_pod(&ns);
        }
    }
    wait_for("every veth to be deleted", || node.all_veths().is_empty());
    wait_for("every reaper to finish", || leftovers(&node.name) == (0, 0));
    assert!(node.allocations("testnet").is_empty());
}

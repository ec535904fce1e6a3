//! The address pool under many processes at once and under SIGKILL at random instants.
//! Worker processes are this test binary re-executed into the ignored `worker` helper.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pontoon::ipam::{Owner, Pool};
use serde_json::json;

fn pool(dir: &Path, subnet: &str) -> Pool {
    Pool::from_config(
        "net",
        &json!({"type": "host-local", "subnet": subnet, "dataDir": dir}),
        None,
    )
    .unwrap()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pontoon-procs-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn spawn_worker(dir: &Path, id: usize, mode: &str, n: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "worker",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PONTOON_WORKER_DIR", dir)
        .env("PONTOON_WORKER_ID", id.to_string())
        .env("PONTOON_WORKER_MODE", mode)
        .env("PONTOON_WORKER_N", n.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Helper process: allocates `N` addresses as owners `w<id>-<i>` and prints them; mode `half`
/// then releases the odd ones; mode `loop` allocates and releases forever (until killed).
#[test]
#[ignore = "helper process for the multi-process tests"]
fn worker() {
    let Ok(dir) = std::env::var("PONTOON_WORKER_DIR") else {
        return;
    };
    let id: usize = std::env::var("PONTOON_WORKER_ID").unwrap().parse().unwrap();
    let mode = std::env::var("PONTOON_WORKER_MODE").unwrap();
    let n: usize = std::env::var("PONTOON_WORKER_N").unwrap().parse().unwrap();
    let p = pool(Path::new(&dir), "10.50.0.0/24");
    match mode.as_str() {
        "half" => {
            for i in 0..n {
                let o = Owner::new(&format!("w{id}-{i}"), "eth0");
                let a = p.allocate(&o, &[]).unwrap();
                println!("ALLOC {} {}", o.container_id, a[0].address.ip());
            }
            for i in (1..n).step_by(2) {
                let o = Owner::new(&format!("w{id}-{i}"), "eth0");
                assert_eq!(p.release(&o).unwrap().len(), 1);
            }
        }
        "loop" => {
            for i in 0.. {
                let o = Owner::new(&format!("w{id}-{}", i % n), "eth0");
                let _ = p.allocate(&o, &[]);
                if i.is_multiple_of(3) {
                    let _ = p.release(&o);
                }
            }
        }
        _ => unreachable!(),
    }
}

#[test]
fn many_processes_never_share_an_address_and_release_exactly_their_own() {
    let dir = tmp("multi");
    let workers: Vec<Child> = (0..8)
        .map(|id| spawn_worker(&dir, id, "half", 30))
        .collect();
    let mut owner_of: HashMap<IpAddr, String> = HashMap::new();
    for w in workers {
        let out = w.wait_with_output().unwrap();
        assert!(out.status.success(), "worker failed");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // libtest may print "test worker ... " before the first line.
            let Some(at) = line.find("ALLOC ") else {
                continue;
            };
            let rest = &line[at + 6..];
            let (owner, ip) = rest.split_once(' ').unwrap();
            let ip: IpAddr = ip.parse().unwrap();
            if let Some(prev) = owner_of.insert(ip, owner.to_string()) {
                panic!("{ip} handed to both {prev} and {owner}");
            }
        }
    }
    assert_eq!(owner_of.len(), 240);
    // Exactly the even-numbered allocations are left, each file naming its owner.
    let netdir = dir.join("net");
    let mut left = 0;
    for (ip, owner) in &owner_of {
        let i: usize = owner.rsplit('-').next().unwrap().parse().unwrap();
        let file = netdir.join(ip.to_string());
        if i.is_multiple_of(2) {
            assert_eq!(
                std::fs::read_to_string(&file).unwrap(),
                format!("{owner}\r\neth0")
            );
            left += 1;
        } else {
            assert!(!file.exists(), "{ip} of {owner} not released");
        }
    }
    assert_eq!(left, 120);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every address file is complete and listed by its holder's entry; returns the owners.
fn assert_consistent(dir: &Path) -> HashSet<Owner> {
    let netdir = dir.join("net");
    let mut owners = HashSet::new();
    let entries = netdir.join(".pontoon/attachments");
    // A crashed ADD's entry may still list an address someone else took since: an entry is an
    // intent; what must hold is that every address file is listed by its holder's entry.
    let mut listed: HashMap<IpAddr, HashSet<Owner>> = HashMap::new();
    for e in std::fs::read_dir(&entries).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue; // a temporary of an interrupted atomic write
        }
        let (cid, ifname) = name.split_once(':').unwrap();
        let owner = Owner::new(cid, ifname);
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.path()).unwrap()).expect("entry is whole JSON");
        for ip in v["ips"].as_array().unwrap() {
            listed
                .entry(ip.as_str().unwrap().parse().unwrap())
                .or_default()
                .insert(owner.clone());
        }
        owners.insert(owner);
    }
    for e in std::fs::read_dir(&netdir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(ip) = name.parse::<IpAddr>() else {
            continue;
        };
        let content = std::fs::read_to_string(e.path()).unwrap();
        let (cid, ifname) = content
            .split_once("\r\n")
            .expect("address file is complete");
        assert!(
            cid.starts_with('w') && ifname == "eth0",
            "torn file {ip}: {content:?}"
        );
        let owner = Owner::new(cid, ifname);
        assert!(
            listed.get(&ip).is_some_and(|o| o.contains(&owner)),
            "{ip} held by {owner} is in no entry of its holder"
        );
    }
    owners
}

#[test]
fn sigkill_at_random_instants_never_leaks_an_address() {
    let dir = tmp("crash");
    let mut rng = 0x2545F4914F6CDD1Du64;
    for round in 0..150 {
        let mut w = spawn_worker(&dir, round % 4, "loop", 20);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(2_000 + rng % 15_000));
        let _ = w.kill();
        let _ = w.wait();
        assert_consistent(&dir);
    }
    // One DEL per attachment that may exist leaves nothing allocated.
    let p = pool(&dir, "10.50.0.0/24");
    let owners = assert_consistent(&dir);
    for o in &owners {
        p.release(o).unwrap();
    }
    for id in 0..4 {
        for i in 0..20 {
            p.release(&Owner::new(&format!("w{id}-{i}"), "eth0"))
                .unwrap();
        }
    }
    let left: Vec<String> = std::fs::read_dir(dir.join("net"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<IpAddr>().is_ok())
        .collect();
    assert!(left.is_empty(), "leaked: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// DEL and the repeated-ADD check read only the attachment's own entry: with 1,000 other
/// allocations in the pool, each a FIFO that would block any reader (host-local's directory
/// walk reads every file), they still finish at once.
#[test]
fn release_and_re_add_do_not_read_other_allocations() {
    let dir = tmp("flat");
    let p = Pool::from_config(
        "net",
        &json!({"type": "host-local", "subnet": "10.60.0.0/16", "dataDir": dir}),
        None,
    )
    .unwrap();
    let me = Owner::new("me", "eth0");
    let mine = p.allocate(&me, &[]).unwrap();
    let netdir = dir.join("net");
    for k in 0..1000u32 {
        let ip = format!("10.60.{}.{}", 10 + k / 250, 1 + k % 250);
        nix::unistd::mkfifo(
            &netdir.join(ip),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let p2 = p.clone();
    std::thread::spawn(move || {
        let again = p2.allocate(&me, &[]).unwrap();
        let released = p2.release(&me).unwrap();
        tx.send((again, released)).unwrap();
    });
    let (again, released) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("blocked: something read the other allocations");
    assert_eq!(again, mine, "a repeated ADD returns the held address");
    assert_eq!(released, vec![mine[0].address.ip()]);
    std::fs::remove_dir_all(&dir).unwrap();
}

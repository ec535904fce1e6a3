//! The DaemonSet of `deploy/pontoon.yaml` on an empty node, run through CRI the way kubelet runs
//! it (see kubelet.rs): the node comes up, pods get addresses and connectivity, the agent is
//! upgraded under a stream of sandbox operations, killed and restarted, shown to need what its
//! manifest grants, and removed with `pontoon uninstall`.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1::ContainerStatusRequest;
use serde_json::{Value, json};

use crate::kubelet::{self, Overrides};
use crate::standin::{self, StandIn};
use crate::{Cri, Report, World, in_pod, network_ready, remove_pod, run_pod, sh, sh_ok};

const NODE: &str = "e2e-node";
const API: &str = "10.96.0.1";

/// GET `path` from the node's `127.0.0.1:port` (the agent runs on the node's network).
fn http_get(netns: &str, port: u16, path: &str) -> (u16, String) {
    let file = std::fs::File::open(format!("/var/run/netns/{netns}")).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::io::{Read, Write};
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                return (0, String::new());
            };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let _ = c.write_all(req.as_bytes());
            let mut r = String::new();
            let _ = c.read_to_string(&mut r);
            let code = r
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            (
                code,
                r.split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_string())
                    .unwrap_or_default(),
            )
        })
        .join()
        .unwrap()
    })
}

async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// The agent container's host pid (from CRI's verbose status).
async fn container_pid(cri: &mut Cri, id: &str) -> Option<u32> {
    let st = cri
        .container_status(ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await
        .ok()?
        .into_inner();
    let info: Value = serde_json::from_str(st.info.get("info")?).ok()?;
    info["pid"].as_u64().map(|p| p as u32)
}

/// What must not change across an agent's upgrade or restart: rule handles (a re-install makes
/// new ones) and the routes it owns.
fn firewall_and_routes(node: &str) -> (String, String) {
    (
        String::from_utf8_lossy(
            &sh(&[
                "ip", "netns", "exec", node, "nft", "-a", "list", "table", "inet", "pontoon",
            ])
            .stdout,
        )
        .into_owned(),
        sh_ok(&["ip", "-n", node, "route", "show", "proto", "201"]),
    )
}

pub async fn steps(
    world: &mut World,
    r: &mut Report,
    cri: &mut Cri,
    sock: &Path,
) -> Result<(), String> {
    let work = world.work.clone();
    let node = world.node.clone();
    let root = work.join("node");
    let conf_dir = root.join("etc/cni/net.d");
    let bin_dir = root.join("opt/cni/bin");
    let repo = std::env::current_dir().unwrap();
    let ds = kubelet::daemonset(&repo);
    let image = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone()
        .unwrap();
    let version = std::fs::read_to_string(repo.join("Cargo.toml"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("version = \"")
                .map(|v| v.trim_end_matches('"').to_string())
        })
        .unwrap();
    r.check(
        image.ends_with(&format!(":{version}")),
        &format!("the manifest's image {image} is tagged with the crate version {version}"),
    );
    let next_image = std::env::var("PONTOON_IMAGE_NEXT").unwrap_or_default();
    let next_bin =
        std::fs::read(std::env::var("PONTOON_BIN_NEXT").unwrap_or_default()).unwrap_or_default();

    // Before: an empty node.
    let (ready, why) = network_ready(cri).await;
    let empty = std::fs::read_dir(&conf_dir).map(|d| d.count()).unwrap_or(0) == 0;
    r.check(
        empty && !ready,
        &format!("before the agent: no conflist and NetworkReady=false ({why})"),
    );

    // The API server the in-cluster config points at, holding this node and a peer.
    sh_ok(&[
        "ip",
        "-n",
        &node,
        "addr",
        "add",
        &format!("{API}/32"),
        "dev",
        "lo",
    ]);
    let node_obj = |name: &str, ip: &str, cidr: &str| {
        json!({"kind": "Node", "apiVersion": "v1", "metadata": {"name": name},
               "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
               "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    };
    let api = StandIn::start(
        &node,
        &format!("{API}:443"),
        &work.join("api"),
        &[
            node_obj(NODE, "192.0.2.1", "10.244.1.0/24"),
            node_obj("peer", "192.0.2.9", "10.244.9.0/24"),
        ],
    );
    let sa = work.join("serviceaccount");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), standin::TOKEN).unwrap();
    std::fs::copy(api.ca(), sa.join("ca.crt")).unwrap();
    std::fs::write(sa.join("namespace"), "kube-system").unwrap();
    let kn = kubelet::Node {
        name: NODE.into(),
        root: root.clone(),
        api_host: API.into(),
        api_port: 443,
        service_account: sa,
    };

    // The DaemonSet pod starts: binary and conflist installed, the node becomes ready.
    let t = Instant::now();
    let mut agent = kubelet::run(cri, &ds, &kn, &Overrides::default(), 0).await?;
    let mut ready = false;
    while t.elapsed() < Duration::from_secs(10) {
        if network_ready(cri).await.0 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.check(
        ready,
        &format!(
            "NetworkReady=true {:.1} s after the agent started (limit 10 s)",
            t.elapsed().as_secs_f64()
        ),
    );
    let conflist = conf_dir.join("10-pontoon.conflist");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    r.check(
        matches!((mtime(&bin_dir.join("pontoon")), mtime(&conflist)), (Some(b), Some(c)) if b <= c)
            && bin_dir.join("loopback").exists(),
        "the agent installed pontoon and loopback, then the conflist",
    );

    // Pods get addresses from the node's podCIDR, reach each other and the outside host.
    let (a, _) = run_pod(cri, "ds-a").await?;
    let (b, _) = run_pod(cri, "ds-b").await?;
    let pool = root.join("var/lib/cni/networks/pontoon");
    let held = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&pool)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    r.check(
        a.ip.starts_with("10.244.1.") && b.ip.starts_with("10.244.1.") && held().len() == 2,
        &format!(
            "pods get addresses from the node's podCIDR, held in the node's pool: {} and {}",
            a.ip, b.ip
        ),
    );
    let alive = |x: &crate::Pod, y: &crate::Pod| {
        in_pod(x.pid, &["ping", "-c1", "-W2", &y.ip])
            .status
            .success()
    };
    r.check(
        alive(&a, &b) && alive(&b, &a),
        "the DaemonSet's pods reach each other",
    );
    let seen = in_pod(
        a.pid,
        &[
            "python3",
            "-c",
            "import socket; s=socket.create_connection(('192.0.2.2',8080),3); print(s.recv(64).decode().strip())",
        ],
    );
    let seen = String::from_utf8_lossy(&seen.stdout).trim().to_string();
    r.check(
        seen == "192.0.2.1",
        &format!("their egress is masqueraded: the outside host sees {seen:?}"),
    );
    let ok = wait_until(Duration::from_secs(10), || {
        sh_ok(&["ip", "-n", &node, "route", "show", "proto", "201"])
            .contains("10.244.9.0/24 via 192.0.2.9")
            && http_get(&node, 9765, "/readyz").0 == 200
    })
    .await;
    r.check(
        ok,
        "the route to the peer node is in place and /readyz answers 200",
    );
    // Its VTEP MAC on its own Node, through the status subresource.
    let own_status = format!("PATCH /api/v1/nodes/{NODE}/status");
    let published = wait_until(Duration::from_secs(10), || {
        api.requests().iter().any(|q| q.starts_with(&own_status))
    })
    .await;
    let reqs = api.requests();
    let granted = reqs.iter().all(|q| {
        [
            "GET /api/v1/nodes",
            "GET /api/v1/pods",
            "GET /api/v1/namespaces",
            "GET /apis/networking.k8s.io/v1/networkpolicies",
        ]
        .iter()
        .any(|p| q.starts_with(p))
            || q.starts_with(&own_status)
    });
    r.check(
        published && granted && !reqs.is_empty(),
        &format!(
            "the agent used only what its ClusterRole grants (get/list/watch nodes, pods, \
             namespaces and networkpolicies, patch its own nodes/status): {} requests",
            reqs.len()
        ),
    );

    // Upgrade: another image replaces the agent while sandboxes come and go.
    let before = firewall_and_routes(&node);
    let mut monitor = std::process::Command::new("ip")
        .args(["-n", &node, "monitor", "route"])
        .stdout(std::fs::File::create(work.join("route-monitor.txt")).unwrap())
        .spawn()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        let sock = sock.to_path_buf();
        tokio::spawn(async move {
            let mut cri = crate::connect(&sock).await;
            let (mut ok, mut failed) = (0usize, Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match run_pod(&mut cri, &format!("churn-{i}")).await {
                    Ok((p, _)) => match remove_pod(&mut cri, &p.id).await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e),
                    },
                    Err(e) => failed.push(e),
                }
                i += 1;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kubelet::remove(cri, &agent).await?;
    let next = Overrides {
        image: Some(next_image.clone()),
        ..Default::default()
    };
    agent = kubelet::run(cri, &ds, &kn, &next, 0).await?;
    let replaced = wait_until(Duration::from_secs(20), || {
        std::fs::read(bin_dir.join("pontoon")).is_ok_and(|b| b == next_bin)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ops, failed) = churn.await.unwrap();
    let _ = monitor.kill();
    let _ = monitor.wait();
    r.check(
        replaced,
        &format!("the upgraded agent ({next_image}) replaced the binary on the node"),
    );
    r.check(
        failed.is_empty() && ops > 0,
        &format!(
            "{ops} sandboxes created and removed during the upgrade, {} failed {:?}",
            failed.len(),
            failed.first()
        ),
    );
    r.check(
        alive(&a, &b) && alive(&b, &a),
        "running pods kept their connectivity through the upgrade",
    );
    let flaps = std::fs::read_to_string(work.join("route-monitor.txt")).unwrap_or_default();
    let after = firewall_and_routes(&node);
    r.check(
        after == before
            && !flaps
                .lines()
                .any(|l| l.starts_with("Deleted") && l.contains("proto 201")),
        "the new agent adopted the old one's rules and routes without flapping them",
    );

    // Crash: SIGKILL; kubelet starts the container again; nothing lost or duplicated.
    let pool_before = held();
    if let Some(pid) = container_pid(cri, &agent.container).await {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sandbox_config = kubelet::sandbox_config(&ds, &kn, 0);
    let _ = cri
        .remove_container(k8s_cri::v1::RemoveContainerRequest {
            container_id: agent.container.clone(),
        })
        .await;
    agent.container =
        kubelet::start_container(cri, &agent.sandbox, &sandbox_config, &ds, &kn, &next, 1).await?;
    let back = wait_until(Duration::from_secs(15), || {
        http_get(&node, 9765, "/readyz").0 == 200
    })
    .await;
    let pool_after = held();
    r.check(
        back && firewall_and_routes(&node) == before && pool_after == pool_before,
        "after a SIGKILL and a restart: no route, rule or allocation lost or duplicated",
    );

    // Removing the DaemonSet leaves the node working: conflist, binary, rules, routes stay.
    kubelet::remove(cri, &agent).await?;
    r.check(
        conflist.exists() && bin_dir.join("pontoon").exists() && firewall_and_routes(&node) == before && alive(&a, &b),
        "with the DaemonSet removed, the conflist, binary, rules and routes stay and pods keep working",
    );

    // What NET_ADMIN is for: the agent without it cannot do its work, and says so.
    let bare = Overrides {
        image: Some(next_image.clone()),
        add_capabilities: Some(vec![]),
        extra_env: vec![("PONTOON_LISTEN".into(), "127.0.0.1:9766".into())],
        ..Default::default()
    };
    let probe = kubelet::run(cri, &ds, &kn, &bare, 0).await?;
    let mut why = String::new();
    let refused = wait_until(Duration::from_secs(15), || {
        let (code, body) = http_get(&node, 9766, "/readyz");
        why = body;
        code == 503 && why.contains("Operation not permitted")
    })
    .await;
    r.check(
        refused,
        &format!(
            "without NET_ADMIN the agent cannot manage routes and nftables: {:?}",
            why.lines().next().unwrap_or("")
        ),
    );
    kubelet::remove(cri, &probe).await?;

    // Uninstall: pods first, then `pontoon uninstall` on the node.
    for p in [&a, &b] {
        remove_pod(cri, &p.id).await?;
    }
    let holder = world.holder.as_ref().unwrap().id().to_string();
    let out = sh(&[
        "nsenter",
        "-t",
        &holder,
        "-m",
        "-n",
        bin_dir.join("pontoon").to_str().unwrap(),
        "uninstall",
        "--cni-bin-dir",
        bin_dir.to_str().unwrap(),
        "--cni-conf-dir",
        conf_dir.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let table = sh(&[
        "ip", "netns", "exec", &node, "nft", "list", "table", "inet", "pontoon",
    ]);
    let clean = out.status.success()
        && !conflist.exists()
        && !bin_dir.join("pontoon").exists()
        && !bin_dir.join("loopback").exists()
        && !table.status.success()
        && sh_ok(&["ip", "-n", &node, "route", "show", "proto", "201"]).is_empty()
        && !sh(&["ip", "-n", &node, "link", "show", "pontoon.vxlan"]).status.success()
        && !pool.exists();
    r.check(
        clean,
        &format!(
            "pontoon uninstall leaves the node clean: {}",
            said.replace('\n', "; ")
        ),
    );
    drop(api);
    Ok(())
}

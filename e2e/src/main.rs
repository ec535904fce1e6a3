//! containerd drives pontoon through its CRI plugin, as kubelet would.
//!
//! containerd runs inside a throwaway node netns and a private mount namespace (its shims,
//! `/run/containerd` and `/var/lib/cni` stay there), with its own root, state, socket and CNI
//! dirs under a temp dir, and a sandbox image built here from Debian's static busybox. A real
//! gRPC client speaks CRI runtime.v1 over the socket. Everything made is removed at the end,
//! also on failure. Run as root: `bash hack/e2e-containerd.sh`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StatusRequest, StopPodSandboxRequest, VersionRequest,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

mod daemonset;
mod kubelet;
#[allow(dead_code)]
#[path = "../../tests/common/standin.rs"]
mod standin;

const IMAGE: &str = "pontoon.e2e/sandbox:1";
const NET: &str = "e2e";

pub type Cri = RuntimeServiceClient<Channel>;

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn sh_ok(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Counts checks and prints one line each; the closing line is "N passed, M failed".
#[derive(Default)]
struct Report {
    passed: usize,
    failed: usize,
}

impl Report {
    fn check(&mut self, ok: bool, what: &str) {
        if ok {
            self.passed += 1;
            println!("PASS {what}");
        } else {
            self.failed += 1;
            println!("FAIL {what}");
        }
    }
}

/// Everything this run made, removed on drop (also when a check panics).
struct World {
    work: PathBuf,
    node: String,
    outside: String,
    holder: Option<Child>,
    containerd: Option<Child>,
    echo: Option<Child>,
}

impl World {
    fn mnt_ns_of(pid: u32) -> Option<u64> {
        std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
    }

    /// Stops containerd (SIGTERM, by the pid we started) and waits for it.
    fn stop_containerd(&mut self) {
        if let Some(mut c) = self.containerd.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_containerd();
        if let Some(mut e) = self.echo.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
        // Shims and sandbox processes our containerd started live in the holder's mount
        // namespace; end exactly those.
        if let Some(mut h) = self.holder.take() {
            if let Some(ns) = World::mnt_ns_of(h.id()) {
                for _ in 0..3 {
                    for p in std::fs::read_dir("/proc").unwrap().flatten() {
                        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
                            continue;
                        };
                        if pid != h.id() && World::mnt_ns_of(pid) == Some(ns) {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid as i32),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            let _ = h.kill();
            let _ = h.wait();
        }
        for ns in [&self.outside, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        // Mounts under the work dir (overlay snapshots) went with the mount namespace.
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// containerd's config: its own root/state/socket, the CRI plugin's CNI dirs, the local image.
fn containerd_config(work: &Path) -> String {
    format!(
        r#"version = 2
root = "{w}/root"
state = "{w}/state"
[grpc]
  address = "{w}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{w}/node/opt/cni/bin"
    conf_dir = "{w}/node/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#,
        w = work.display()
    )
}

/// The mounts containerd needs inside its own mount namespace: `ip netns exec` remounted /sys
/// (so the cgroup hierarchies are mounted again, as the host has them), and private tmpfs for
/// the paths containerd 1.6 uses whatever its root/state say.
fn holder_script(work: &Path) -> String {
    let mut s = String::from("set -e\n");
    for line in std::fs::read_to_string("/proc/mounts").unwrap().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || !f[1].starts_with("/sys/fs/cgroup") {
            continue;
        }
        let opts: Vec<&str> = f[3]
            .split(',')
            .filter(|o| !matches!(*o, "rw" | "relatime" | "ro"))
            .collect();
        s.push_str(&format!(
            "mkdir -p {m}; mount -t {t} -o {o} {d} {m}\n",
            m = f[1],
            t = f[2],
            o = if opts.is_empty() {
                "defaults".to_string()
            } else {
                opts.join(",")
            },
            d = f[0]
        ));
    }
    // containerd also pins sandbox netns as files in /run/netns: keep those private too.
    // Private /var/lib and /run (tmpfs), with the paths containerd 1.6 uses whatever its
    // root/state say, so no mount point is made on the machine; /var/lib/cni is the node's own
    // (the DaemonSet mounts the same directory).
    s.push_str(&format!(
        "mount -t tmpfs tmpfs /var/lib\nmkdir -p /var/lib/cni\nmount --bind {}/node/var/lib/cni /var/lib/cni\n\
         mount -t tmpfs tmpfs /run\nmkdir -p /run/containerd /run/netns\n",
        work.display()
    ));
    s.push_str(&format!(
        "echo ready > {}/holder.ready\nexec sleep 100000\n",
        work.display()
    ));
    s
}

fn start_containerd(world: &mut World) {
    let holder = world.holder.as_ref().unwrap().id().to_string();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(world.work.join("containerd.log"))
        .unwrap();
    let child = Command::new("nsenter")
        .args(["-t", &holder, "-m", "-n", "containerd", "--config"])
        .arg(world.work.join("config.toml"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start containerd");
    world.containerd = Some(child);
    let sock = world.work.join("containerd.sock");
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "containerd did not start; see its log"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn connect(sock: &Path) -> Cri {
    let sock = sock.to_path_buf();
    let t = Instant::now();
    loop {
        let s = sock.clone();
        let ch = tonic::transport::Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let s = s.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(s).await?,
                    ))
                }
            }))
            .await;
        match ch {
            Ok(ch) => return RuntimeServiceClient::new(ch),
            Err(e) if t.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect to containerd: {e}"),
        }
    }
}

/// The sandbox image: one layer holding Debian's static busybox; the entrypoint sleeps.
fn build_image(work: &Path) -> PathBuf {
    let dir = work.join("image");
    let rootfs = dir.join("rootfs/bin");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("busybox")).expect("busybox-static is needed");
    for app in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", rootfs.join(app)).unwrap();
    }
    let layer = dir.join("layer.tar");
    sh_ok(&[
        "tar",
        "--numeric-owner",
        "-C",
        dir.join("rootfs").to_str().unwrap(),
        "-cf",
        layer.to_str().unwrap(),
        ".",
    ]);
    let blobs = dir.join("oci/blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let p = dir.join("tmp.blob");
        std::fs::write(&p, bytes).unwrap();
        let sum = sh_ok(&["sha256sum", p.to_str().unwrap()]);
        let digest = sum.split_whitespace().next().unwrap().to_string();
        std::fs::rename(&p, blobs.join(&digest)).unwrap();
        (digest, bytes.len())
    };
    let layer_bytes = std::fs::read(&layer).unwrap();
    let (layer_d, layer_n) = put(&layer_bytes);
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/sleep", "2147483647"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_d}")]},
    });
    let (config_d, config_n) = put(config.to_string().as_bytes());
    let manifest = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_d}"), "size": config_n},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{layer_d}"), "size": layer_n}],
    });
    let (man_d, man_n) = put(manifest.to_string().as_bytes());
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{man_d}"), "size": man_n,
                       "annotations": {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "1"},
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    });
    std::fs::write(dir.join("oci/index.json"), index.to_string()).unwrap();
    std::fs::write(
        dir.join("oci/oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let tar = dir.join("image.tar");
    sh_ok(&[
        "tar",
        "-C",
        dir.join("oci").to_str().unwrap(),
        "-cf",
        tar.to_str().unwrap(),
        ".",
    ]);
    tar
}

/// Writes a conflist in place (temp file + rename inside conf_dir, which containerd notices).
fn write_conflist(work: &Path, plugin: Value) {
    let dir = work.join("node/etc/cni/net.d");
    let list = json!({"cniVersion": "1.0.0", "cniVersions": ["0.4.0", "1.0.0", "1.1.0"], "name": NET, "plugins": [plugin]});
    let tmp = dir.join(".10-e2e.conflist.tmp");
    std::fs::write(&tmp, list.to_string()).unwrap();
    std::fs::rename(&tmp, dir.join("10-e2e.conflist")).unwrap();
}

fn pontoon_plugin(work: &Path, subnet: &str) -> Value {
    // One bridge per subnet: a bridge keeps the gateway of the subnet it was set up for.
    let bridge = if subnet.starts_with("10.244.") {
        "cni0"
    } else {
        "cni2"
    };
    json!({"type": "pontoon", "bridge": bridge, "capabilities": {"portMappings": true}, "isGateway": true, "isDefaultGateway": true,
           "ipMasq": true, "logFile": work.join("pontoon.log"),
           "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": work.join("ipam")}})
}

fn reference_plugin(work: &Path, subnet: &str) -> Value {
    json!({"type": "bridge", "bridge": "cni1", "isGateway": true, "isDefaultGateway": true, "ipMasq": true,
           "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": work.join("ipam-ref")}})
}

fn pod_config(name: &str) -> PodSandboxConfig {
    pod_config_ports(name, vec![])
}

fn pod_config_ports(name: &str, port_mappings: Vec<k8s_cri::v1::PortMapping>) -> PodSandboxConfig {
    PodSandboxConfig {
        port_mappings,
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "e2e".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption::default()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Pod {
    id: String,
    ip: String,
    pid: u32,
}

async fn run_pod(cri: &mut Cri, name: &str) -> Result<(Pod, Duration), String> {
    run_pod_with(cri, pod_config(name)).await
}

async fn run_pod_with(cri: &mut Cri, config: PodSandboxConfig) -> Result<(Pod, Duration), String> {
    let t = Instant::now();
    let id = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner()
        .pod_sandbox_id;
    let took = t.elapsed();
    let st = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: true,
        })
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    let ip = st
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    let info: Value = st
        .info
        .get("info")
        .and_then(|i| serde_json::from_str(i).ok())
        .unwrap_or(Value::Null);
    let pid = info["pid"].as_u64().unwrap_or(0) as u32;
    Ok((Pod { id, ip, pid }, took))
}

/// StopPodSandbox (timed: CNI DEL runs in it) then RemovePodSandbox.
async fn remove_pod(cri: &mut Cri, id: &str) -> Result<Duration, String> {
    let t = Instant::now();
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .map_err(|e| e.message().to_string())?;
    let stopped = t.elapsed();
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await
    .map_err(|e| e.message().to_string())?;
    Ok(stopped)
}

async fn network_ready(cri: &mut Cri) -> (bool, String) {
    // Right after a (re)start containerd answers "server is not initialized yet": not ready.
    let st = match cri.status(StatusRequest { verbose: false }).await {
        Ok(r) => r.into_inner(),
        Err(e) => return (false, format!("CRI Status failed: {}", e.message())),
    };
    let cond = st
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady");
    match cond {
        Some(c) => (c.status, format!("{} {}", c.reason, c.message)),
        None => (false, "no NetworkReady condition".into()),
    }
}

/// Runs a command in the network namespace of a sandbox process.
fn in_pod(pid: u32, args: &[&str]) -> std::process::Output {
    let net = format!("--net=/proc/{pid}/ns/net");
    let mut full = vec!["nsenter", net.as_str()];
    full.extend_from_slice(args);
    sh(&full)
}

fn allocations(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join(NET))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

/// pontoon's host veths in the node that still exist (`in_service`: only those up or on a
/// bridge; a released one is out of service when DEL returns and deleted soon after).
fn node_veths_where(node: &str, in_service: bool) -> usize {
    sh_ok(&["ip", "-n", node, "-o", "link", "show"])
        .lines()
        .filter(|l| l.contains(": pon"))
        .filter(|l| {
            let flags = l
                .split('<')
                .nth(1)
                .and_then(|r| r.split('>').next())
                .unwrap_or("");
            !in_service || flags.split(',').any(|f| f == "UP") || l.contains(" master ")
        })
        .count()
}

/// No veth of pontoon's is in service, and within a few seconds none is left at all.
fn node_veths_gone(node: &str) -> bool {
    if node_veths_where(node, true) != 0 {
        return false;
    }
    let t = Instant::now();
    while node_veths_where(node, false) != 0 {
        if t.elapsed() > Duration::from_secs(5) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    if v.is_empty() {
        return f64::NAN;
    }
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize].as_secs_f64() * 1e3
}

async fn wait_ready(cri: &mut Cri, want: bool) -> (bool, String) {
    let t = Instant::now();
    loop {
        let (ready, why) = network_ready(cri).await;
        if ready == want || t.elapsed() > Duration::from_secs(15) {
            return (ready, why);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the containerd e2e tier needs root");
        std::process::exit(1);
    }
    let pontoon = std::fs::canonicalize(
        std::env::var("PONTOON_BIN").unwrap_or_else(|_| "target/release/pontoon".into()),
    )
    .expect("build pontoon first (cargo build --release)");
    let id = std::process::id();
    let work = PathBuf::from(format!("/tmp/pontoon-e2e-{id}"));
    let _ = std::fs::remove_dir_all(&work);
    for d in [
        "node/opt/cni/bin",
        "node/etc/cni/net.d",
        "node/var/lib/cni",
        "root",
        "state",
    ] {
        std::fs::create_dir_all(work.join(d)).unwrap();
    }
    let mut world = World {
        work: work.clone(),
        node: format!("pe2e{id}-node"),
        outside: format!("pe2e{id}-out"),
        holder: None,
        containerd: None,
        echo: None,
    };
    let mut r = Report::default();
    let result = run(&mut world, &mut r, &pontoon).await;
    if let Err(e) = &result {
        r.check(false, &format!("e2e aborted: {e}"));
        let log = std::fs::read_to_string(work.join("containerd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!("--- containerd log (last lines) ---");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
    drop(world);
    println!("{} passed, {} failed", r.passed, r.failed);
    std::process::exit(if r.failed == 0 { 0 } else { 1 });
}

async fn run(world: &mut World, r: &mut Report, pontoon: &Path) -> Result<(), String> {
    let work = world.work.clone();
    let node = world.node.clone();
    let outside = world.outside.clone();
    // The Go reference plugins, for the comparisons; pontoon and loopback come from the
    // DaemonSet's agent (and are put back by hand after its uninstall).
    for p in ["bridge", "host-local"] {
        std::fs::copy(
            format!("/usr/lib/cni/{p}"),
            work.join("node/opt/cni/bin").join(p),
        )
        .map_err(|e| {
            format!("/usr/lib/cni/{p}: {e} (apt-get install containernetworking-plugins)")
        })?;
    }
    std::fs::write(work.join("config.toml"), containerd_config(&work)).unwrap();
    let image = build_image(&work);

    // The node and an outside host (documentation subnets, only between these namespaces).
    sh_ok(&["ip", "netns", "add", &node]);
    sh_ok(&["ip", "netns", "add", &outside]);
    for (ns, cmd) in [
        (
            &node,
            "ip link set lo up; ip link add uplink type veth peer name eth0 netns OUT; ip addr add 192.0.2.1/24 dev uplink; ip link set uplink up; ip route add default via 192.0.2.2",
        ),
        (
            &outside,
            "ip link set lo up; ip addr add 192.0.2.2/24 dev eth0; ip link set eth0 up",
        ),
    ] {
        sh_ok(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &cmd.replace("OUT", &outside),
        ]);
    }
    world.echo = Some(
        Command::new("ip")
            .args(["netns", "exec", &outside, "python3", "-c",
                   "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('192.0.2.2',8080)); s.listen(64)\nwhile True:\n c,p=s.accept(); c.sendall((p[0]+'\\n').encode()); c.close()"])
            .spawn()
            .unwrap(),
    );
    // The holder keeps containerd's mount namespace (and the node netns) across restarts.
    std::fs::write(work.join("holder.sh"), holder_script(&work)).unwrap();
    world.holder = Some(
        Command::new("ip")
            .args(["netns", "exec", &node, "sh"])
            .arg(work.join("holder.sh"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while !work.join("holder.ready").exists() {
        if t.elapsed() > Duration::from_secs(10) {
            return Err("the mount namespace holder did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    start_containerd(world);
    let sock = work.join("containerd.sock");
    let mut images = vec![image.clone()];
    images.extend(
        ["PONTOON_IMAGE_TAR", "PONTOON_IMAGE_NEXT_TAR"]
            .iter()
            .filter_map(std::env::var_os)
            .map(PathBuf::from),
    );
    for tar in &images {
        sh_ok(&[
            "ctr",
            "-a",
            sock.to_str().unwrap(),
            "-n",
            "k8s.io",
            "images",
            "import",
            tar.to_str().unwrap(),
        ]);
    }
    let mut cri = connect(&sock).await;

    // The DaemonSet as kubelet runs it, on this empty node.
    if images.len() == 3 {
        daemonset::steps(world, r, &mut cri, &sock).await?;
    } else {
        println!(
            "NOTE PONTOON_IMAGE_TAR/PONTOON_IMAGE_NEXT_TAR unset: the DaemonSet steps are skipped (hack/e2e-containerd.sh sets them)"
        );
    }
    // The steps below bring their own conflists and this pontoon.
    std::fs::copy(pontoon, work.join("node/opt/cni/bin/pontoon")).unwrap();
    std::fs::copy(
        "/usr/lib/cni/loopback",
        work.join("node/opt/cni/bin/loopback"),
    )
    .unwrap();
    write_conflist(&work, pontoon_plugin(&work, "10.244.1.0/24"));

    let v = cri
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    r.check(
        v.runtime_name == "containerd",
        &format!("CRI Version: {} {}", v.runtime_name, v.runtime_version),
    );
    let (ready, why) = wait_ready(&mut cri, true).await;
    r.check(
        ready,
        &format!("CRI Status: NetworkReady once the conflist is there ({why})"),
    );

    // Two pods: addresses, reachability, egress.
    let (a, _) = run_pod(&mut cri, "pod-a").await?;
    let (b, _) = run_pod(&mut cri, "pod-b").await?;
    let ipam_dir = work.join("ipam");
    for p in [&a, &b] {
        r.check(
            allocations(&ipam_dir).contains(&p.ip),
            &format!("pod IP {} is allocated in the pool", p.ip),
        );
        let addrs = String::from_utf8_lossy(
            &in_pod(p.pid, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout,
        )
        .into_owned();
        r.check(
            addrs.contains(&format!("{}/24", p.ip)),
            &format!("{} is on eth0 in the sandbox netns", p.ip),
        );
        let lo =
            String::from_utf8_lossy(&in_pod(p.pid, &["ip", "-o", "link", "show", "lo"]).stdout)
                .into_owned();
        r.check(
            lo.contains("UP"),
            "lo is up in the sandbox (loopback network)",
        );
    }
    r.check(
        in_pod(a.pid, &["ping", "-c1", "-W2", &b.ip])
            .status
            .success(),
        "pod-a reaches pod-b",
    );
    r.check(
        in_pod(b.pid, &["ping", "-c1", "-W2", "10.244.1.1"])
            .status
            .success(),
        "pod-b reaches the gateway",
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
        &format!("egress is masqueraded: the outside host sees {seen:?}"),
    );
    // hostPort: kubelet's port mappings reach pontoon through containerd's portMappings.
    let (hp, _) = run_pod_with(
        &mut cri,
        pod_config_ports(
            "pod-hp",
            vec![k8s_cri::v1::PortMapping {
                protocol: 0, // TCP
                container_port: 80,
                host_port: 8080,
                host_ip: String::new(),
            }],
        ),
    )
    .await?;
    let net = format!("--net=/proc/{}/ns/net", hp.pid);
    let serve = "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0',80)); s.listen(8)\nwhile True:\n c,p=s.accept(); c.sendall(b'hostport'); c.close()";
    let mut server = Command::new("nsenter")
        .args([net.as_str(), "python3", "-c", serve])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let probe = "import socket; s=socket.create_connection(('192.0.2.1',8080),3); print(s.recv(64).decode().strip())";
    let got = sh(&["ip", "netns", "exec", &outside, "python3", "-c", probe]);
    r.check(
        String::from_utf8_lossy(&got.stdout).trim() == "hostport",
        "hostPort 8080 reaches the pod from outside the node",
    );
    let _ = server.kill();
    let _ = server.wait();
    remove_pod(&mut cri, &hp.id).await?;
    let closed = sh(&["ip", "netns", "exec", &outside, "python3", "-c", probe]);
    r.check(
        !closed.status.success(),
        "after Stop+Remove the hostPort is closed",
    );
    for p in [&a, &b] {
        remove_pod(&mut cri, &p.id).await?;
    }
    r.check(
        allocations(&ipam_dir).is_empty(),
        "after Stop+Remove the pool is empty",
    );
    r.check(
        node_veths_gone(&node),
        "after Stop+Remove the host veths are gone",
    );

    // 20 pods in a row leave nothing.
    let mut ok = true;
    for i in 0..20 {
        match run_pod(&mut cri, &format!("seq-{i}")).await {
            Ok((p, _)) => {
                ok &= !p.ip.is_empty();
                remove_pod(&mut cri, &p.id).await?;
            }
            Err(e) => {
                ok = false;
                eprintln!("seq-{i}: {e}");
            }
        }
    }
    r.check(
        ok && allocations(&ipam_dir).is_empty() && node_veths_gone(&node),
        "20 pods created and removed in a row leave nothing",
    );
    // Latency against the Go reference chain, in alternating blocks of 5 pods (containerd
    // serves one conflist: it is switched between blocks).
    let (mut run_p, mut stop_p, mut run_r, mut stop_r) = (vec![], vec![], vec![], vec![]);
    for block in 0..8 {
        let reference = block % 2 == 1;
        let (plugin, prefix) = if reference {
            (reference_plugin(&work, "10.245.1.0/24"), "10.245.")
        } else {
            (pontoon_plugin(&work, "10.244.1.0/24"), "10.244.")
        };
        write_conflist(&work, plugin);
        tokio::time::sleep(Duration::from_millis(600)).await;
        for i in 0..5 {
            let (p, d) = run_pod(&mut cri, &format!("lat-{block}-{i}")).await?;
            if !p.ip.starts_with(prefix) {
                return Err(format!(
                    "the conflist switch was not picked up (pod got {:?})",
                    p.ip
                ));
            }
            let s = remove_pod(&mut cri, &p.id).await?;
            let (run, stop) = if reference {
                (&mut run_r, &mut stop_r)
            } else {
                (&mut run_p, &mut stop_p)
            };
            run.push(d);
            stop.push(s);
        }
    }
    println!(
        "RunPodSandbox over 20 pods: pontoon p50 {:.1} ms p90 {:.1} ms; Go bridge+host-local p50 {:.1} ms p90 {:.1} ms",
        pct(&mut run_p, 50.0),
        pct(&mut run_p, 90.0),
        pct(&mut run_r, 50.0),
        pct(&mut run_r, 90.0)
    );
    println!(
        "StopPodSandbox over 20 pods: pontoon p50 {:.1} ms p90 {:.1} ms; Go bridge+host-local p50 {:.1} ms p90 {:.1} ms",
        pct(&mut stop_p, 50.0),
        pct(&mut stop_p, 90.0),
        pct(&mut stop_r, 50.0),
        pct(&mut stop_r, 90.0)
    );
    write_conflist(&work, pontoon_plugin(&work, "10.244.1.0/24"));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A containerd restart in the middle leaves nothing leaked.
    let mut pods = Vec::new();
    for i in 0..3 {
        pods.push(run_pod(&mut cri, &format!("rs-{i}")).await?.0);
    }
    world.stop_containerd();
    start_containerd(world);
    let mut cri = connect(&sock).await;
    let _ = wait_ready(&mut cri, true).await;
    for p in &pods {
        remove_pod(&mut cri, &p.id).await?;
    }
    r.check(
        allocations(&ipam_dir).is_empty() && node_veths_gone(&node),
        "a containerd restart in the middle leaks nothing",
    );

    // An exhausted pool: pontoon's STATUS says so; containerd reports it where it asks.
    write_conflist(&work, pontoon_plugin(&work, "10.246.0.0/29"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut full = Vec::new();
    for i in 0..5 {
        full.push(run_pod(&mut cri, &format!("full-{i}")).await?.0);
    }
    let sixth = run_pod(&mut cri, "full-5").await;
    r.check(
        sixth.is_err(),
        "a sixth pod in a 5-address pool fails cleanly",
    );
    let (ready, why) = network_ready(&mut cri).await;
    let cv = v.runtime_version.clone();
    if cv.starts_with("1.") {
        // containerd 1.x vendors libcni 1.1, which predates the CNI STATUS verb: it never asks.
        println!(
            "NOTE containerd {cv} does not send CNI STATUS (libcni < 1.2); NetworkReady stays {ready} ({why})"
        );
        let mut plugin = pontoon_plugin(&work, "10.246.0.0/29");
        plugin["name"] = json!(NET);
        plugin["cniVersion"] = json!("1.1.0");
        let out = Command::new("ip")
            .args(["netns", "exec", &node])
            .arg(work.join("node/opt/cni/bin/pontoon"))
            .env("CNI_COMMAND", "STATUS")
            .env("CNI_PATH", work.join("node/opt/cni/bin"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(plugin.to_string().as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        r.check(
            reply["code"] == 50,
            &format!("pontoon STATUS on the exhausted pool answers code 50: {reply}"),
        );
    } else {
        r.check(
            !ready,
            &format!("CRI Status reports the network not ready on an exhausted pool ({why})"),
        );
    }
    for p in &full {
        remove_pod(&mut cri, &p.id).await?;
    }
    let (ready, why) = wait_ready(&mut cri, true).await;
    r.check(ready, &format!("NetworkReady with free addresses ({why})"));
    Ok(())
}

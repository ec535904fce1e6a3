//! Test harness: throwaway "node" network namespaces with pod namespaces, the pontoon binary run
//! exactly as a runtime runs it (env + stdin), and cleanup that also happens when a test fails.
//! Nothing here touches the machine's own network namespace.
#![allow(dead_code)]

pub mod standin;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_pontoon");

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Fails loudly under CI when not root; elsewhere returns false so the test can skip.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
        panic!("this test needs root (network namespaces) and CI is set: run the suite as root");
    }
    eprintln!("skipping: needs root");
    false
}

fn sh(cmd: &mut Command) -> Output {
    cmd.output().expect("spawn")
}

pub fn run_ok(args: &[&str]) -> String {
    let out = sh(Command::new(args[0]).args(&args[1..]));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The links of the machine's own namespace (to prove tests never touch it).
pub fn root_links() -> Vec<String> {
    let s = run_ok(&["ip", "-o", "link", "show"]);
    let mut v: Vec<String> = s
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
        .collect();
    v.sort();
    v
}

/// A throwaway node: a network namespace standing in for a kubelet node, with a state dir.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pods: Vec<String>,
    root_before: Vec<String>,
}

impl Node {
    pub fn new(tag: &str) -> Node {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("pt{}-{}-{n}", std::process::id(), &tag[..tag.len().min(6)]);
        let dir = std::env::temp_dir().join(format!("pontoon-test-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let root_before = root_links();
        run_ok(&["ip", "netns", "add", &name]);
        run_ok(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up",
        ]);
        Node {
            name,
            dir,
            pods: vec![],
            root_before,
        }
    }

    /// Creates a pod namespace and returns its path (as a runtime passes it in CNI_NETNS).
    pub fn pod(&mut self, tag: &str) -> String {
        let name = format!("{}-{tag}", self.name);
        run_ok(&["ip", "netns", "add", &name]);
        self.pods.push(name.clone());
        format!("/var/run/netns/{name}")
    }

    pub fn del_pod(&mut self, path: &str) {
        let name = Path::new(path)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        run_ok(&["ip", "netns", "del", &name]);
        self.pods.retain(|p| p != &name);
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("ipam")
    }

    /// A conflist entry as a runtime would pass it, with the state under this node's dir.
    pub fn conf(&self, version: &str, ipam_ranges: Value, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": "testnet",
            "type": "pontoon",
            "bridge": "cni0",
            "isGateway": true,
            "isDefaultGateway": true,
            "ipam": {"type": "host-local", "ranges": ipam_ranges, "dataDir": self.data_dir()},
        });
        if let Value::Object(m) = extra {
            for (k, v) in m {
                c[k] = v;
            }
        }
        c
    }

    /// Runs the plugin inside the node namespace as a runtime would.
    pub fn cni(&self, cmd: &str, cid: &str, netns: &str, ifname: &str, conf: &Value) -> Reply {
        self.cni_env(
            cmd,
            &[
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", ifname),
            ],
            conf.to_string().as_bytes(),
        )
    }

    pub fn cni_env(&self, cmd: &str, env: &[(&str, &str)], stdin: &[u8]) -> Reply {
        cni_exec(&self.name, Path::new(BIN), cmd, env, stdin)
    }

    /// Runs a command inside the node namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(Command::new("ip").args(&full))
    }

    /// Runs a command inside a pod namespace (by CNI_NETNS path).
    pub fn in_pod(&self, netns: &str, args: &[&str]) -> Output {
        let name = Path::new(netns).file_name().unwrap().to_str().unwrap();
        let mut full = vec!["netns", "exec", name];
        full.extend_from_slice(args);
        sh(Command::new("ip").args(&full))
    }

    pub fn in_pod_ok(&self, netns: &str, args: &[&str]) -> String {
        let o = self.in_pod(netns, args);
        assert!(
            o.status.success(),
            "{args:?} in {netns}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn node_ok(&self, args: &[&str]) -> String {
        let o = self.exec(args);
        assert!(
            o.status.success(),
            "{args:?} in node: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Link names in the node namespace.
    pub fn links(&self) -> Vec<String> {
        self.node_ok(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| {
                l.split(':')
                    .nth(1)
                    .map(|n| n.trim().split('@').next().unwrap().to_string())
            })
            .collect()
    }

    /// pontoon's host veths that are in service (up, or on a bridge). A released attachment's
    /// veth is out of service when DEL returns; its deletion follows (the netns teardown or
    /// the reaper): see [`Node::all_veths`].
    pub fn veths(&self) -> Vec<String> {
        self.node_ok(&["ip", "-o", "link", "show"])
            .lines()
            .filter(|l| {
                let flags = l
                    .split('<')
                    .nth(1)
                    .and_then(|r| r.split('>').next())
                    .unwrap_or("");
                flags.split(',').any(|f| f == "UP") || l.contains(" master ")
            })
            .filter_map(|l| {
                l.split(':')
                    .nth(1)
                    .map(|n| n.trim().split('@').next().unwrap().to_string())
            })
            .filter(|l| l.starts_with("pon"))
            .collect()
    }

    /// Every pontoon host veth that exists, in service or not.
    pub fn all_veths(&self) -> Vec<String> {
        self.links()
            .into_iter()
            .filter(|l| l.starts_with("pon"))
            .collect()
    }

    /// Addresses allocated in the pool of `network`.
    pub fn allocations(&self, network: &str) -> Vec<String> {
        let d = self.data_dir().join(network);
        let mut v: Vec<String> = std::fs::read_dir(&d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn ping(&self, netns: &str, ip: &str) -> bool {
        let o = self.in_pod(netns, &["ping", "-c", "1", "-W", "2", ip]);
        o.status.success()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for p in self.pods.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &p]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
        if !std::thread::panicking() {
            assert_eq!(
                root_links(),
                self.root_before,
                "the machine's root netns links changed"
            );
        }
    }
}

/// Runs CNI plugin `bin` inside namespace `ns` exactly as a runtime would: a clean environment
/// with `CNI_COMMAND` (plus `env`, `CNI_PATH` defaulting to the Go reference's dir) and `stdin`.
pub fn cni_exec(ns: &str, bin: &Path, cmd: &str, env: &[(&str, &str)], stdin: &[u8]) -> Reply {
    use std::io::Write;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(bin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", cmd)
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("spawn a CNI plugin");
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    Reply {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[derive(Debug)]
pub struct Reply {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Reply {
    pub fn ok(&self) -> Value {
        assert_eq!(
            self.code, 0,
            "expected success: stdout={} stderr={}",
            self.stdout, self.stderr
        );
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&self.stdout).expect("stdout is JSON")
        }
    }

    /// Asserts a CNI error with `code` and returns its message.
    pub fn err(&self, code: u64) -> String {
        assert_ne!(self.code, 0, "expected failure, got {}", self.stdout);
        let v: Value = serde_json::from_str(&self.stdout).unwrap_or_else(|_| {
            panic!(
                "error is not JSON on stdout: {:?} (stderr {})",
                self.stdout, self.stderr
            )
        });
        assert_eq!(v["code"], code, "wrong code: {v}");
        v["msg"].as_str().unwrap().to_string()
    }
}

/// `ip` (address without prefix) of the pod interface from an ADD result.
pub fn result_ips(r: &Value) -> Vec<String> {
    r["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["address"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

pub fn v4() -> Value {
    json!([[{"subnet": "10.88.0.0/24"}]])
}

pub fn dual() -> Value {
    json!([[{"subnet": "10.88.0.0/24"}], [{"subnet": "fd88::/64"}]])
}

/// A TCP server in a namespace that answers each connection with the peer address it sees.
pub struct EchoServer(std::process::Child);

impl EchoServer {
    /// Listens on `addrs` (port 8080) inside namespace `ns` (a name under /var/run/netns).
    pub fn start(ns: &str, addrs: &[&str]) -> EchoServer {
        let list = addrs
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(",");
        let code = format!(
            r#"
import socket, threading, sys
def serve(addr):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 8080)); s.listen(64)
    while True:
        c, peer = s.accept(); c.sendall((peer[0] + "\n").encode()); c.close()
ts = [threading.Thread(target=serve, args=(a,), daemon=True) for a in [{list}]]
[t.start() for t in ts]
print("ready", flush=True)
[t.join() for t in ts]
"#
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", &code])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start echo server");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "echo server did not start");
        EchoServer(child)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects from namespace `ns` (a CNI_NETNS path or a name) to `addr`:8080 and returns the
/// peer address the server reported.
pub fn whoami(ns: &str, addr: &str) -> String {
    let name = Path::new(ns).file_name().unwrap().to_str().unwrap();
    let code = format!(
        "import socket; s=socket.create_connection(({addr:?},8080),3); print(s.recv(100).decode().strip())"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", name, "python3", "-c", &code])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "connect {addr} from {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Node {
    /// An "outside" host joined to the node by a veth on documentation subnets (192.0.2.0/24,
    /// 2001:db8::/64), which is the node's default gateway. Returns its namespace name.
    pub fn add_outside(&mut self) -> String {
        let out = format!("{}-out", self.name);
        run_ok(&["ip", "netns", "add", &out]);
        self.pods.push(out.clone());
        let n = self.name.clone();
        ip(
            &n,
            &format!("link add uplink type veth peer name eth0 netns {out}"),
        );
        ip(&n, "addr add 192.0.2.1/24 dev uplink");
        ip(&n, "addr add 2001:db8::1/64 dev uplink nodad");
        ip(&out, "addr add 192.0.2.2/24 dev eth0");
        ip(&out, "addr add 2001:db8::2/64 dev eth0 nodad");
        ip(&n, "link set uplink up");
        ip(&out, "link set eth0 up");
        ip(&out, "link set lo up");
        ip(&n, "route add default via 192.0.2.2");
        ip(&n, "-6 route add default via 2001:db8::2");
        out
    }

    /// Runs the operator CLI inside the node namespace.
    pub fn pontoon(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, BIN];
        full.extend_from_slice(args);
        sh(Command::new("ip").args(&full))
    }
}

/// Polls `f` until it holds; fails the test after 15 s, naming `what`.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `ip -n NS ARGS...` (ARGS split on whitespace), which must succeed.
pub fn ip(ns: &str, args: &str) {
    let mut full = vec!["ip", "-n", ns];
    full.extend(args.split_whitespace());
    run_ok(&full);
}

/// A TCP+UDP server in a pod answering "<tag> <peer address>".
pub struct PodServer(Child);

impl PodServer {
    pub fn start(netns: &str, tag: &str, port: u16) -> PodServer {
        let name = std::path::Path::new(netns)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let code = format!(
            r#"
import socket, threading
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", {port})); s.listen(64)
    while True:
        c, p = s.accept(); c.sendall(("{tag} " + p[0] + "\n").encode()); c.close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", {port}))
    while True:
        d, p = s.recvfrom(100); s.sendto(("{tag} " + p[0]).encode(), p)
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
import time
while True: time.sleep(3600)
"#
        );
        let mut c = Command::new("ip")
            .args(["netns", "exec", &name, "python3", "-c", &code])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        PodServer(c)
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Talks to addr:port from namespace `ns` (a name or a netns path); None if nothing answers.
pub fn talk(ns: &str, proto: &str, addr: &str, port: u16, src_port: Option<u16>) -> Option<String> {
    let name = std::path::Path::new(ns)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    let bind = src_port
        .map(|p| format!("s.bind(('0.0.0.0', {p}));"))
        .unwrap_or_default();
    let code = match proto {
        "tcp" => format!(
            "import socket; s=socket.create_connection(({addr:?},{port}),2); print(s.recv(100).decode().strip())"
        ),
        _ => format!(
            "import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); {bind} s.settimeout(2); s.sendto(b'x',({addr:?},{port})); print(s.recv(100).decode())"
        ),
    };
    let o = Command::new("ip")
        .args(["netns", "exec", name, "python3", "-c", &code])
        .output()
        .unwrap();
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// `nft list table inet pontoon` in the node.
pub fn table(node: &Node) -> String {
    String::from_utf8_lossy(
        &node
            .exec(&["nft", "list", "table", "inet", "pontoon"])
            .stdout,
    )
    .into_owned()
}

/// Runs `f` on a thread inside network namespace `ns` (a name under /var/run/netns), for
/// library calls that open netlink sockets: they bind to that namespace, never the machine's.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// GET `path` from `127.0.0.1:port` inside namespace `ns`: (status code, body).
pub fn http_get(ns: &str, port: u16, path: &str) -> (u16, String) {
    in_netns(ns, || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        let code = r
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = r
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    })
}

/// Runs a conflist the way libcni does: ADD through the plugins in order, each given the
/// previous result as `prevResult`; CHECK and DEL with the cached ADD result (`cached`), DEL in
/// reverse order; `runtimeConfig` filled per plugin from `rc` for the capabilities it declares.
/// `type: pontoon` runs the binary under test, any other type the Go reference's.
/// Returns the final result (ADD), or the index and reply of the plugin that failed.
pub fn run_list(
    node: &Node,
    cmd: &str,
    list: &Value,
    (cid, netns, ifname): (&str, &str, &str),
    rc: &Value,
    cached: Option<&Value>,
) -> Result<Value, (usize, Reply)> {
    let plugins = list["plugins"].as_array().expect("plugins");
    let mut order: Vec<usize> = (0..plugins.len()).collect();
    if cmd == "DEL" {
        order.reverse();
    }
    let mut prev = cached.cloned();
    for i in order {
        let mut conf = plugins[i].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(caps) = plugins[i]["capabilities"].as_object() {
            for (k, on) in caps {
                if on == &json!(true) && !rc[k].is_null() {
                    conf["runtimeConfig"][k] = rc[k].clone();
                }
            }
        }
        if let Some(p) = &prev {
            conf["prevResult"] = p.clone();
        }
        let ty = conf["type"].as_str().unwrap().to_string();
        let bin = if ty == "pontoon" {
            PathBuf::from(BIN)
        } else {
            PathBuf::from("/usr/lib/cni").join(&ty)
        };
        let env = [
            ("CNI_CONTAINERID", cid),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", ifname),
        ];
        let r = cni_exec(&node.name, &bin, cmd, &env, conf.to_string().as_bytes());
        if r.code != 0 {
            return Err((i, r));
        }
        if cmd == "ADD" {
            prev = Some(
                serde_json::from_str(&r.stdout)
                    .unwrap_or_else(|_| panic!("{ty} ADD printed no result: {:?}", r.stdout)),
            );
        }
    }
    Ok(prev.unwrap_or(Value::Null))
}

/// Runs the plugin (ADD, `eth0`) in node namespace `node_ns` with the conflist an agent wrote
/// under `node_dir` (`net.d/10-pontoon.conflist`, the binary in `bin/`), as a runtime would;
/// `k8s` names the Kubernetes pod (namespace, name) in `CNI_ARGS` as containerd and CRI-O do.
pub fn add_pod_with_conflist(
    node_dir: &Path,
    node_ns: &str,
    cid: &str,
    pod: &str,
    k8s: Option<(&str, &str)>,
) -> Value {
    let list: Value =
        serde_json::from_slice(&std::fs::read(node_dir.join("net.d/10-pontoon.conflist")).unwrap())
            .unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    let netns = format!("/var/run/netns/{pod}");
    let args = k8s.map_or(String::new(), |(ns, name)| {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};\
             K8S_POD_INFRA_CONTAINER_ID={cid}"
        )
    });
    let env = [
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args.as_str()),
    ];
    cni_exec(
        node_ns,
        &node_dir.join("bin/pontoon"),
        "ADD",
        &env,
        conf.to_string().as_bytes(),
    )
    .ok()
}

/// Spawns `cmd` (stdout piped) and waits for its first line to be `ready`.
pub fn spawn_ready(cmd: &mut Command, what: &str) -> Child {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "{what} did not start");
    child
}

//! The stand-in Kubernetes API server (`tests/standin/apiserver.py`) run inside a test's
//! namespace: a TLS certificate made for it, its state file, a kubeconfig and in-cluster
//! style credentials for clients, kubectl against it, and the log of requests it served.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

pub const TOKEN: &str = "standin-token";

pub struct StandIn {
    pub dir: PathBuf,
    pub addr: String,
    pub netns: String,
    child: Child,
}

fn script() -> PathBuf {
    // From the main crate's tests and benches, and from the e2e crate beside it.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    [
        root.join("tests/standin/apiserver.py"),
        root.join("../tests/standin/apiserver.py"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("tests/standin/apiserver.py")
}

impl StandIn {
    /// Starts the server in namespace `netns` on `addr` (ip:port) with `objects`.
    pub fn start(netns: &str, addr: &str, dir: &Path, objects: &[Value]) -> StandIn {
        std::fs::create_dir_all(dir).unwrap();
        let ip = addr.rsplit_once(':').unwrap().0;
        make_certificates(dir, ip);
        let (cert, key) = (dir.join("server.pem"), dir.join("server-key.pem"));
        let state = dir.join("state.json");
        std::fs::write(&state, Value::Array(objects.to_vec()).to_string()).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "python3"])
            .arg(script())
            .args([addr, TOKEN])
            .arg(&state)
            .arg(&cert)
            .arg(&key)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "the stand-in API server did not start"
        );
        let s = StandIn {
            dir: dir.to_path_buf(),
            addr: addr.to_string(),
            netns: netns.to_string(),
            child,
        };
        std::fs::write(s.kubeconfig(), s.kubeconfig_text()).unwrap();
        s
    }

    /// The CA that signed the server's certificate (what a client trusts).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    fn kubeconfig_text(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: https://{}\n    certificate-authority: {}\nusers:\n- name: agent\n  user:\n    token: {TOKEN}\ncontexts:\n- name: standin\n  context: {{cluster: standin, user: agent}}\ncurrent-context: standin\n",
            self.addr,
            self.ca().display()
        )
    }

    /// kubectl against the stand-in, from its namespace; stdout, or a panic with stderr.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.netns, "kubectl", "--kubeconfig"])
            .arg(self.kubeconfig())
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Creates or replaces an object (`kubectl apply` needs OpenAPI; create/replace do not).
    pub fn apply(&self, obj: &Value) {
        let f = self.dir.join(format!("obj-{}.json", std::process::id()));
        std::fs::write(&f, obj.to_string()).unwrap();
        let path = f.to_str().unwrap();
        let exists = Command::new("ip")
            .args(["netns", "exec", &self.netns, "kubectl", "--kubeconfig"])
            .arg(self.kubeconfig())
            .args(["get", "-f", path])
            .output()
            .unwrap()
            .status
            .success();
        let verb = if exists { "replace" } else { "create" };
        self.kubectl(&[verb, "--validate=false", "-f", path]);
    }

    /// The requests served so far: "METHOD PATH".
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("requests.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

/// A CA and a server certificate it signed, for `ip` and the in-cluster service names.
fn make_certificates(dir: &Path, ip: &str) {
    let run = |args: &[&str]| {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("openssl");
        assert!(st.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=standin-ca",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=kubernetes",
        "-keyout",
        "server-key.pem",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        format!(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:{ip},DNS:kubernetes.default.svc,\
             DNS:kubernetes.default,DNS:localhost\n"
        ),
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

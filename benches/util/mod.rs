//! Helpers the benchmarks share: commands that must succeed, and bounded polling.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a command that must succeed; its stdout.
pub fn sh(args: &[&str]) -> String {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `ip -n NS CMD...` (CMD split on whitespace), which must succeed.
pub fn ip(ns: &str, cmd: &str) {
    let mut a = vec!["ip", "-n", ns];
    a.extend(cmd.split_whitespace());
    sh(&a);
}

/// Polls `f` every 2 ms until it holds; panics after `limit`. How long it took.
pub fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
    t.elapsed()
}

/// `pontoon agent` as node n0 in netns `ns` against the stand-in API server's `kubeconfig`,
/// its binary, conflist and pool dirs under `host`, passes every 60 s, no HTTP endpoint; then
/// `extra` arguments.
pub fn spawn_agent(
    ns: &str,
    bin: &Path,
    kubeconfig: &Path,
    host: &Path,
    extra: &[&str],
    stderr: Stdio,
) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin)
        .args(["agent", "--node-name", "n0", "--kubeconfig"])
        .arg(kubeconfig)
        .arg("--cni-bin-dir")
        .arg(host.join("bin"))
        .arg("--cni-conf-dir")
        .arg(host.join("net.d"))
        .arg("--data-dir")
        .arg(host.join("ipam"))
        .args([
            "--no-masquerade",
            "10.0.0.0/8",
            "--interval",
            "60",
            "--listen",
            "off",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

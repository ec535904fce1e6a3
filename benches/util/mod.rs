//! Helpers the benchmarks share: commands that must succeed, and bounded polling.

use std::process::Command;
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

//! The binary's protocol behaviour where nothing is touched yet: VERSION, and bad input of every
//! kind giving a CNI error object on stdout, a non-zero exit and a message naming the problem.
//! These run the binary directly (no namespace is needed: validation fails before any change).

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_pontoon");

fn run(env: &[(&str, &str)], stdin: &[u8]) -> (i32, String, String) {
    let mut c = Command::new(BIN);
    c.env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    // A huge stdin may be cut short by the plugin refusing it: ignore EPIPE.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn add_env<'a>(over: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_NETNS", "/var/run/netns/does-not-matter"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];
    for (k, val) in over {
        v.retain(|(kk, _)| kk != k);
        v.push((k, val));
    }
    v
}

fn good_conf() -> Value {
    json!({"cniVersion": "1.0.0", "name": "net", "type": "pontoon",
           "ipam": {"type": "host-local", "subnet": "10.1.0.0/24", "dataDir": "/nonexistent/pontoon-test"}})
}

/// Asserts a CNI error object on stdout with `code`; returns it.
fn expect_err(env: &[(&str, &str)], stdin: &[u8], code: u64) -> Value {
    let (rc, out, err) = run(env, stdin);
    assert_ne!(rc, 0, "expected failure: {out} {err}");
    let v: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|_| panic!("stdout is not a CNI error object: {out:?} (stderr {err})"));
    assert_eq!(v["code"], code, "{v}");
    assert!(!v["msg"].as_str().unwrap().is_empty());
    assert!(v.get("cniVersion").is_some() && v.get("details").is_some());
    v
}

#[test]
fn version_lists_every_supported_version() {
    for input in [
        &b"{\"cniVersion\":\"1.1.0\"}"[..],
        b"{\"cniVersion\":\"0.4.0\"}",
        b"",
    ] {
        let (rc, out, _) = run(&[("CNI_COMMAND", "VERSION")], input);
        assert_eq!(rc, 0);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let want = if input.is_empty() {
            "1.1.0"
        } else {
            if input.windows(5).any(|w| w == b"0.4.0") {
                "0.4.0"
            } else {
                "1.1.0"
            }
        };
        assert_eq!(v["cniVersion"], want);
    }
}

#[test]
fn bad_environment_is_code_4_naming_the_variable() {
    let conf = good_conf().to_string();
    let long = "a".repeat(300);
    let cases: Vec<(&str, &str)> = vec![
        ("CNI_COMMAND", "FROB"),
        ("CNI_CONTAINERID", ""),
        ("CNI_CONTAINERID", "a/b"),
        ("CNI_CONTAINERID", "../../etc"),
        ("CNI_CONTAINERID", &long),
        ("CNI_IFNAME", "0123456789abcdef"),
        ("CNI_IFNAME", "eth/0"),
        ("CNI_IFNAME", ""),
        ("CNI_NETNS", ""),
        ("CNI_ARGS", "FOO=bar"),
        ("CNI_ARGS", "IP=not-an-ip;IgnoreUnknown=1"),
    ];
    for (k, v) in cases {
        let e = expect_err(&add_env(&[(k, v)]), conf.as_bytes(), 4);
        assert!(e["msg"].as_str().unwrap().contains(k), "{k}={v:?}: {e}");
        assert_eq!(
            e["cniVersion"], "1.0.0",
            "errors speak the config's version"
        );
    }
    // No CNI_COMMAND, no arguments, a config on stdin: a runtime-like call, answered as a
    // plugin (code 4 naming CNI_COMMAND), not with the CLI's usage text.
    let e = expect_err(&[("CNI_CONTAINERID", "abc")], conf.as_bytes(), 4);
    assert!(e["msg"].as_str().unwrap().contains("CNI_COMMAND"), "{e}");
    let e = expect_err(&[], conf.as_bytes(), 4);
    assert!(e["msg"].as_str().unwrap().contains("required"), "{e}");
    // With arguments it is the operator CLI.
    let out = Command::new(BIN)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
}

#[test]
fn bad_stdin_is_decode_or_config_error() {
    let env = add_env(&[]);
    for bad in [
        &b"{"[..],
        b"",
        b"[]",
        b"\"x\"",
        b"{\"cniVersion\": \"1.0.0\", \"name\": \"n\"",
        b"\x00\xff",
    ] {
        expect_err(&env, bad, 6);
    }
    // Huge stdin (MBs) is refused, not parsed.
    let huge = vec![b' '; 6 << 20];
    let e = expect_err(&env, &huge, 6);
    assert!(e["msg"].as_str().unwrap().contains("MiB"), "{e}");
    // Unknown or missing cniVersion.
    let mut c = good_conf();
    c["cniVersion"] = json!("0.2.0");
    expect_err(&env, c.to_string().as_bytes(), 1);
    c["cniVersion"] = json!("7.0.0");
    expect_err(&env, c.to_string().as_bytes(), 1);
    // Wrong types name the key.
    for (k, v) in [
        ("mtu", json!("big")),
        ("isGateway", json!(1)),
        ("ipam", json!({"type":"host-local","ranges":"x"})),
    ] {
        let mut c = good_conf();
        c[k] = v;
        let e = expect_err(&env, c.to_string().as_bytes(), 7);
        assert!(e["msg"].as_str().unwrap().contains(k), "{e}");
    }
    // Network names that would escape the state directory.
    for name in ["../../etc", "a/b", "x\u{0}y", &"n".repeat(300)] {
        let mut c = good_conf();
        c["name"] = json!(name);
        expect_err(&env, c.to_string().as_bytes(), 7);
    }
    // Subnets with host bits, too small, overlapping.
    for ipam in [
        json!({"type":"host-local","subnet":"10.1.0.5/24"}),
        json!({"type":"host-local","subnet":"10.1.0.0/31"}),
        json!({"type":"host-local","ranges":[[{"subnet":"10.0.0.0/16"}],[{"subnet":"10.0.5.0/24"}]]}),
    ] {
        let mut c = good_conf();
        c["ipam"] = ipam;
        expect_err(&env, c.to_string().as_bytes(), 7);
    }
    // Out-of-range bridge keys name the key (code 7), before anything is touched.
    for (k, v) in [
        ("vlan", json!(5000)),
        ("vlanTrunk", json!([{"minID": 9, "maxID": 3}])),
    ] {
        let mut c = good_conf();
        c[k] = v;
        let e = expect_err(&env, c.to_string().as_bytes(), 7);
        assert!(e["msg"].as_str().unwrap().contains(k), "{e}");
    }
}

#[test]
fn verbs_gated_by_version() {
    let mut c = good_conf();
    c["cniVersion"] = json!("1.0.0");
    expect_err(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")],
        c.to_string().as_bytes(),
        1,
    );
    expect_err(
        &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/x")],
        c.to_string().as_bytes(),
        1,
    );
}

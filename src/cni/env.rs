//! The CNI environment: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`,
//! `CNI_PATH`, validated as the spec requires before anything is touched.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnetwork::IpNetwork;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            other => {
                return Err(Error::env(
                    "CNI_COMMAND",
                    format!("{other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"),
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }

    /// Verbs that act on one attachment (container id + ifname).
    pub fn per_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

/// The validated environment of one invocation.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: Command,
    /// Empty for GC, STATUS and VERSION.
    pub container_id: String,
    /// `None` when unset or empty (allowed on DEL only).
    pub netns: Option<PathBuf>,
    /// Empty for GC, STATUS and VERSION.
    pub ifname: String,
    pub args: CniArgs,
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Reads the environment through `get` (the process environment in production, a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Env> {
        let command = match get("CNI_COMMAND") {
            Some(c) if !c.is_empty() => Command::parse(&c)?,
            _ => {
                return Err(Error::env(
                    "CNI_COMMAND",
                    "is required (ADD, DEL, CHECK, GC, STATUS or VERSION)",
                ));
            }
        };
        let path = get("CNI_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
        let mut env = Env {
            command,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
            args: CniArgs::default(),
            path,
        };
        if !command.per_attachment() {
            return Ok(env);
        }
        env.container_id = get("CNI_CONTAINERID").unwrap_or_default();
        validate_container_id(&env.container_id).map_err(|m| Error::env("CNI_CONTAINERID", m))?;
        env.ifname = get("CNI_IFNAME").unwrap_or_default();
        validate_ifname(&env.ifname).map_err(|m| Error::env("CNI_IFNAME", m))?;
        env.netns = get("CNI_NETNS")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        if env.netns.is_none() && command != Command::Del {
            return Err(Error::env(
                "CNI_NETNS",
                format!("is required for {}", command.as_str()),
            ));
        }
        env.args = CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(env)
    }
}

/// The spec's container id rule: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`, and short enough to be a file
/// name.
pub fn validate_container_id(id: &str) -> std::result::Result<(), String> {
    validate_name(id, "container id")
}

/// Network names follow the same rule as container ids: they become directory names.
pub fn validate_network_name(name: &str) -> std::result::Result<(), String> {
    validate_name(name, "network name")
}

fn validate_name(s: &str, what: &str) -> std::result::Result<(), String> {
    if s.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if s.len() > 255 {
        return Err(format!(
            "the {what} is {} bytes long; at most 255 are allowed",
            s.len()
        ));
    }
    let mut chars = s.chars();
    let first = chars.next().unwrap();
    if !first.is_ascii_alphanumeric() {
        return Err(format!(
            "the {what} {s:?} must start with a letter or digit"
        ));
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "the {what} {s:?} contains {bad:?}; only letters, digits, '_', '.' and '-' are allowed"
        ));
    }
    Ok(())
}

/// The spec's interface name rule: 1–15 bytes, not `.` or `..`, no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("the interface name is empty".into());
    }
    if name.len() > 15 {
        return Err(format!(
            "the interface name {name:?} is {} bytes long; Linux allows at most 15",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || *c == '\0')
    {
        return Err(format!(
            "the interface name {name:?} contains {bad:?}, which Linux does not allow"
        ));
    }
    Ok(())
}

/// `CNI_ARGS` (`K=V;K=V`, any order). pontoon understands `IP` (comma-separated addresses, with
/// or without prefix) and `MAC`; other keys are kept for logging (`K8S_POD_NAME`, ...). As in the
/// reference, a key pontoon does not know is an error unless `IgnoreUnknown` is `1` or `true`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub ips: Vec<IpAddr>,
    pub mac: Option<String>,
    pub pairs: Vec<(String, String)>,
}

const KNOWN_ARGS: [&str; 7] = [
    "IP",
    "MAC",
    "IgnoreUnknown",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
];

impl CniArgs {
    pub fn parse(s: &str) -> Result<CniArgs> {
        let mut args = CniArgs::default();
        for item in s.split(';').filter(|i| !i.is_empty()) {
            let Some((k, v)) = item.split_once('=') else {
                return Err(Error::env(
                    "CNI_ARGS",
                    format!("{item:?} is not of the form KEY=VALUE"),
                ));
            };
            if v.contains('=') {
                return Err(Error::env(
                    "CNI_ARGS",
                    format!("{item:?} has more than one '='"),
                ));
            }
            args.pairs.push((k.to_string(), v.to_string()));
        }
        let ignore_unknown = args
            .get("IgnoreUnknown")
            .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        for (k, v) in &args.pairs {
            match k.as_str() {
                "IP" => {
                    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        args.ips.push(parse_ip_maybe_cidr(part).ok_or_else(|| {
                            Error::env("CNI_ARGS", format!("IP={part:?} is not an IP address"))
                        })?);
                    }
                }
                "MAC" => args.mac = Some(v.clone()),
                k if KNOWN_ARGS.contains(&k) => {}
                k if ignore_unknown => {
                    let _ = k;
                }
                k => {
                    return Err(Error::env(
                        "CNI_ARGS",
                        format!(
                            "unknown key {k:?}; add IgnoreUnknown=1 to CNI_ARGS to pass keys \
                             pontoon does not use"
                        ),
                    ));
                }
            }
        }
        Ok(args)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `10.0.0.5` or `10.0.0.5/24` → the address.
pub fn parse_ip_maybe_cidr(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<IpNetwork>().ok().map(|n| n.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Env> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| m.get(k).cloned())
    }

    const GOOD: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-123_x.y"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
    ];

    fn with(over: &[(&'static str, &'static str)]) -> Result<Env> {
        let mut v: Vec<(&str, &str)> = GOOD.to_vec();
        for (k, val) in over {
            v.retain(|(kk, _)| kk != k);
            v.push((k, val));
        }
        env(&v)
    }

    #[test]
    fn good_env_parses() {
        let e = with(&[]).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.container_id, "abc-123_x.y");
        assert_eq!(e.ifname, "eth0");
        assert_eq!(e.path.len(), 2);
    }

    #[test]
    fn bad_values_are_code_4_naming_the_variable() {
        let cases: [(&str, &str); 13] = [
            ("CNI_COMMAND", "FROB"),
            ("CNI_COMMAND", ""),
            ("CNI_CONTAINERID", ""),
            ("CNI_CONTAINERID", "-abc"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_CONTAINERID", "../../etc"),
            ("CNI_CONTAINERID", "a\0b"),
            ("CNI_IFNAME", "0123456789abcdef"),
            ("CNI_IFNAME", "a/b"),
            ("CNI_IFNAME", "a:b"),
            ("CNI_IFNAME", "a b"),
            ("CNI_IFNAME", ".."),
            ("CNI_NETNS", ""),
        ];
        for (k, v) in cases {
            let e = with(&[(k, v)]).unwrap_err();
            assert_eq!(e.code(), 4, "{k}={v:?}");
            assert!(e.to_string().contains(k), "{e}");
        }
        let long: &'static str = Box::leak("a".repeat(300).into_boxed_str());
        assert_eq!(with(&[("CNI_CONTAINERID", long)]).unwrap_err().code(), 4);
    }

    #[test]
    fn netns_is_optional_on_del() {
        let e = with(&[("CNI_COMMAND", "DEL"), ("CNI_NETNS", "")]).unwrap();
        assert!(e.netns.is_none());
    }

    #[test]
    fn gc_and_status_need_no_attachment() {
        for c in ["GC", "STATUS", "VERSION"] {
            let e = env(&[("CNI_COMMAND", c)]).unwrap();
            assert!(e.container_id.is_empty());
        }
    }

    #[test]
    fn ifname_limits() {
        assert!(validate_ifname("012345678901234").is_ok());
        assert!(validate_ifname("0123456789012345").is_err());
        assert!(validate_ifname(".").is_err());
        assert!(validate_ifname("eth0.1").is_ok());
    }

    #[test]
    fn cni_args_any_order_and_ignore_unknown() {
        let a = CniArgs::parse(
            "K8S_POD_NAME=p;IgnoreUnknown=1;FOO=bar;IP=10.0.0.5,10.0.0.6/24;MAC=aa:bb:cc:dd:ee:ff",
        )
        .unwrap();
        assert_eq!(a.ips.len(), 2);
        assert_eq!(a.mac.as_deref(), Some("aa:bb:cc:dd:ee:ff"));
        assert_eq!(a.get("K8S_POD_NAME"), Some("p"));
        assert_eq!(a.get("FOO"), Some("bar"));
    }

    #[test]
    fn cni_args_errors() {
        assert!(CniArgs::parse("FOO=bar").is_err());
        assert!(CniArgs::parse("IgnoreUnknown=0;FOO=bar").is_err());
        assert!(CniArgs::parse("IgnoreUnknown=true;FOO=bar").is_ok());
        assert!(CniArgs::parse("novalue").is_err());
        assert!(CniArgs::parse("A=b=c").is_err());
        assert!(CniArgs::parse("IP=notanip").is_err());
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
        assert_eq!(CniArgs::parse(";;").unwrap(), CniArgs::default());
    }
}

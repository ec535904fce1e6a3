//! The network configuration on stdin: the keys every CNI plugin gets (`cniVersion`, `name`,
//! `prevResult`, `runtimeConfig`, `args`, GC's attachments) and the keys of the reference `bridge`
//! plugin, which keep their meaning so that a bridge + host-local conflist works by changing
//! `type`. The `ipam` object is kept raw here and read by [`crate::ipam`].

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use super::env::{parse_ip_maybe_cidr, validate_network_name};
use super::result::{CniResult, Dns};
use super::version::Version;
use crate::error::{Error, Result};

/// The largest stdin pontoon reads; a real config is a few KiB.
pub const MAX_STDIN: usize = 4 << 20;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RawConf {
    #[serde(default)]
    pub cni_version: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "type")]
    pub plugin_type: Option<String>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub args: Option<Args>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
    #[serde(default, rename = "cni.dev/attachments")]
    pub legacy_attachments: Option<Vec<Attachment>>,

    // The reference bridge plugin's keys.
    #[serde(default)]
    pub bridge: Option<String>,
    #[serde(default)]
    pub is_gateway: bool,
    #[serde(default)]
    pub is_default_gateway: bool,
    #[serde(default)]
    pub force_address: bool,
    #[serde(default)]
    pub ip_masq: bool,
    #[serde(default)]
    pub ip_masq_backend: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub hairpin_mode: bool,
    #[serde(default)]
    pub promisc_mode: bool,
    #[serde(default)]
    pub vlan: u16,
    #[serde(default)]
    pub vlan_trunk: Option<Vec<VlanTrunk>>,
    /// Keep VLAN 1 on the pod's port besides `vlan`/`vlanTrunk` (the reference's default: true).
    #[serde(default)]
    pub preserve_default_vlan: Option<bool>,
    #[serde(default)]
    pub macspoofchk: bool,
    #[serde(default)]
    pub enabledad: bool,
    #[serde(default)]
    pub disable_container_interface: bool,
    #[serde(default)]
    pub port_isolation: bool,
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub dns: Option<Dns>,
    /// The capabilities the conflist declares for this plugin (`{"portMappings": true}`).
    #[serde(default)]
    pub capabilities: Option<serde_json::Map<String, Value>>,

    // pontoon's own keys.
    /// Destinations never masqueraded besides the pod subnets (e.g. the cluster pod CIDR).
    #[serde(default)]
    pub no_masquerade_cidrs: Vec<String>,
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    #[serde(default)]
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub ip_ranges: Option<Value>,
    /// The `portMappings` capability (hostPort).
    #[serde(default)]
    pub port_mappings: Vec<crate::portmap::PortMapping>,
    /// The `bandwidth` capability: bits per second and bits, as kubelet and the reference
    /// bandwidth plugin use them.
    #[serde(default)]
    pub bandwidth: Option<Bandwidth>,
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    #[serde(default)]
    pub ingress_rate: i64,
    #[serde(default)]
    pub ingress_burst: i64,
    #[serde(default)]
    pub egress_rate: i64,
    #[serde(default)]
    pub egress_burst: i64,
}

/// One `vlanTrunk` entry: `{"id": N}` or `{"minID": A, "maxID": B}`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct VlanTrunk {
    #[serde(default)]
    pub id: Option<i64>,
    #[serde(default, rename = "minID")]
    pub min_id: Option<i64>,
    #[serde(default, rename = "maxID")]
    pub max_id: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct Args {
    #[serde(default)]
    pub cni: Option<ArgsCni>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct ArgsCni {
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub mac: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The validated network configuration.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub version: Version,
    pub name: String,
    pub raw: RawConf,
    /// The raw stdin as JSON, for delegating to another IPAM plugin.
    pub json: Value,
}

impl NetConf {
    /// Decodes and validates stdin. Malformed JSON is code 6; a key of the wrong type or a bad
    /// value is code 7 naming the key; an unsupported `cniVersion` is code 1.
    pub fn parse(stdin: &[u8]) -> Result<NetConf> {
        let json: Value = serde_json::from_slice(stdin)
            .map_err(|e| Error::Decode(format!("stdin is not valid JSON: {e}")))?;
        if !json.is_object() {
            return Err(Error::Decode(
                "stdin must be a JSON object (the network configuration)".into(),
            ));
        }
        let raw: RawConf = serde_path_to_error::deserialize(&json)
            .map_err(|e| Error::config(format!("key `{}`: {}", e.path(), e.inner())))?;
        let version = Version::parse(raw.cni_version.as_deref().unwrap_or("0.1.0"))?;
        let name = raw.name.clone().unwrap_or_default();
        validate_network_name(&name).map_err(|m| Error::config(format!("`name`: {m}")))?;
        let conf = NetConf {
            version,
            name,
            raw,
            json,
        };
        conf.validate()?;
        Ok(conf)
    }

    fn validate(&self) -> Result<()> {
        let r = &self.raw;
        if r.vlan > 4094 {
            return Err(Error::config(format!(
                "`vlan` {} is out of range 0-4094",
                r.vlan
            )));
        }
        self.vlan_trunk()?;
        if r.disable_container_interface && self.ipam_type().is_some() {
            return Err(Error::config(
                "`disableContainerInterface` leaves the pod interface down: it cannot be used \
                 with `ipam` (as in the reference)",
            ));
        }
        self.shaping()?;
        if let Some(v) = &r.ipam
            && !v.is_object()
            && !v.is_null()
        {
            return Err(Error::config(format!(
                "key `ipam`: must be an object such as {{\"type\": \"host-local\", \"ranges\": \
                 [[{{\"subnet\": \"10.22.0.0/16\"}}]]}}, not {v}"
            )));
        }
        if r.hairpin_mode && r.promisc_mode {
            return Err(Error::config(
                "`hairpinMode` and `promiscMode` cannot both be true; pick one",
            ));
        }
        if let Some(mtu) = r.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Err(Error::config(format!(
                "`mtu` {mtu} is out of range 68-65535"
            )));
        }
        let bridge = self.bridge_name();
        super::env::validate_ifname(bridge).map_err(|m| Error::config(format!("`bridge`: {m}")))?;
        if let Some(b) = &r.ip_masq_backend
            && b != "nftables"
            && b != "iptables"
        {
            return Err(Error::config(format!(
                "`ipMasqBackend` {b:?} must be \"nftables\" or \"iptables\""
            )));
        }
        for c in &r.no_masquerade_cidrs {
            c.parse::<ipnetwork::IpNetwork>()
                .map_err(|_| Error::config(format!("`noMasqueradeCidrs`: {c:?} is not a CIDR")))?;
        }
        Ok(())
    }

    /// The VLANs of `vlanTrunk`, sorted, each once (the reference's rules: an `id`, or a
    /// `minID`..`maxID` range, within 1-4094).
    pub fn vlan_trunk(&self) -> Result<Vec<u16>> {
        let mut out: Vec<u16> = Vec::new();
        for t in self.raw.vlan_trunk.iter().flatten() {
            let ok = |v: i64| (1..=4094).contains(&v);
            match (t.id, t.min_id, t.max_id) {
                (_, Some(a), Some(b)) => {
                    if !ok(a) || !ok(b) || a > b {
                        return Err(Error::config(format!(
                            "`vlanTrunk`: minID {a} and maxID {b} must be within 1-4094, minID \
                             not above maxID"
                        )));
                    }
                    out.extend((a..=b).map(|v| v as u16));
                }
                (Some(id), None, None) => {
                    if !ok(id) {
                        return Err(Error::config(format!(
                            "`vlanTrunk`: id {id} is out of range 1-4094"
                        )));
                    }
                    out.push(id as u16);
                }
                _ => {
                    return Err(Error::config(
                        "`vlanTrunk`: each entry is {\"id\": N} or {\"minID\": A, \"maxID\": B}",
                    ));
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Whether VLAN 1 stays on the pod's port (default true, as in the reference).
    pub fn preserve_default_vlan(&self) -> bool {
        self.raw.preserve_default_vlan.unwrap_or(true)
    }

    /// The shaping `runtimeConfig.bandwidth` asks for: (to the pod, from the pod). A rate needs
    /// a burst and a burst a rate (as in the reference); zero is no limit.
    pub fn shaping(
        &self,
    ) -> Result<(
        Option<crate::dataplane::tc::Shape>,
        Option<crate::dataplane::tc::Shape>,
    )> {
        let Some(b) = &self.raw.runtime_config.bandwidth else {
            return Ok((None, None));
        };
        let one =
            |dir: &str, rate: i64, burst: i64| -> Result<Option<crate::dataplane::tc::Shape>> {
                let key = |k: &str| format!("runtimeConfig.bandwidth.{dir}{k}");
                if rate < 0 || burst < 0 {
                    return Err(Error::config(format!(
                        "`{}` and `{}` must not be negative",
                        key("Rate"),
                        key("Burst")
                    )));
                }
                match (rate, burst) {
                    (0, 0) => Ok(None),
                    (_, 0) => Err(Error::config(format!(
                        "`{}` is set: `{}` must be too",
                        key("Rate"),
                        key("Burst")
                    ))),
                    (0, _) => Err(Error::config(format!(
                        "`{}` is set: `{}` must be too",
                        key("Burst"),
                        key("Rate")
                    ))),
                    (r, _) if r < 8 => Err(Error::config(format!(
                        "`{}` {r} is below 8 bits per second",
                        key("Rate")
                    ))),
                    (_, b) if b / 8 >= u32::MAX as i64 => Err(Error::config(format!(
                        "`{}` {b} is more than 4 GB",
                        key("Burst")
                    ))),
                    (r, b) => Ok(Some(crate::dataplane::tc::Shape::from_bits(
                        r as u64, b as u64,
                    ))),
                }
            };
        Ok((
            one("ingress", b.ingress_rate, b.ingress_burst)?,
            one("egress", b.egress_rate, b.egress_burst)?,
        ))
    }

    /// Whether the conflist declares capability `name` for this plugin.
    pub fn has_capability(&self, name: &str) -> bool {
        self.raw
            .capabilities
            .as_ref()
            .and_then(|c| c.get(name))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    pub fn bridge_name(&self) -> &str {
        self.raw.bridge.as_deref().unwrap_or("cni0")
    }

    /// `isDefaultGateway` implies `isGateway`, as in the reference.
    pub fn is_gateway(&self) -> bool {
        self.raw.is_gateway || self.raw.is_default_gateway
    }

    /// The IPAM plugin type, or `None` for an L2-only network.
    pub fn ipam_type(&self) -> Option<&str> {
        self.raw
            .ipam
            .as_ref()
            .and_then(|v| v.get("type"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
    }

    /// The previous result, if the runtime passed one, read in this config's version.
    pub fn prev_result(&self) -> Result<Option<CniResult>> {
        match &self.raw.prev_result {
            None | Some(Value::Null) => Ok(None),
            Some(v) => CniResult::from_json(v, self.version).map(Some),
        }
    }

    /// The MAC the runtime asked for: `runtimeConfig.mac`, then `args.cni.mac`, then
    /// `CNI_ARGS MAC=` (the reference's order).
    pub fn requested_mac(&self, env_mac: Option<&str>) -> Result<Option<[u8; 6]>> {
        let s = self
            .raw
            .runtime_config
            .mac
            .as_deref()
            .or(self
                .raw
                .args
                .as_ref()
                .and_then(|a| a.cni.as_ref())
                .and_then(|c| c.mac.as_deref()))
            .or(env_mac);
        match s {
            None => Ok(None),
            Some(s) => parse_mac(s).map(Some).ok_or_else(|| {
                Error::config(format!(
                    "requested MAC {s:?} is not a MAC address like 0a:58:0a:16:00:05"
                ))
            }),
        }
    }

    /// Addresses asked for by `runtimeConfig.ips`, `args.cni.ips` and `CNI_ARGS IP=` together.
    pub fn requested_ips(&self, env_ips: &[std::net::IpAddr]) -> Result<Vec<std::net::IpAddr>> {
        let mut out: Vec<std::net::IpAddr> = env_ips.to_vec();
        let from_args = self
            .raw
            .args
            .as_ref()
            .and_then(|a| a.cni.as_ref())
            .map(|c| c.ips.as_slice())
            .unwrap_or(&[]);
        for s in from_args.iter().chain(self.raw.runtime_config.ips.iter()) {
            let ip = parse_ip_maybe_cidr(s)
                .ok_or_else(|| Error::config(format!("requested IP {s:?} is not an IP address")))?;
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    /// GC's list of attachments to keep: `cni.dev/valid-attachments`, or the legacy
    /// `cni.dev/attachments`. `None` when neither is present.
    pub fn valid_attachments(&self) -> Option<Vec<Attachment>> {
        self.raw
            .valid_attachments
            .clone()
            .or_else(|| self.raw.legacy_attachments.clone())
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        mac[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Best-effort extraction of `cniVersion` from stdin that may not parse, so that an error
/// reply can carry it.
pub fn sniff_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    let s = v.get("cniVersion")?.as_str()?;
    Version::parse(s).ok().map(|v| v.as_str().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConf> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn reference_bridge_conflist_entry_parses() {
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"mynet","type":"pontoon","bridge":"br0",
                "isDefaultGateway":true,"ipMasq":true,"hairpinMode":true,"mtu":1450,
                "someFutureKey":{"x":1},
                "ipam":{"type":"host-local","subnet":"10.22.0.0/16"}}"#,
        )
        .unwrap();
        assert_eq!(c.bridge_name(), "br0");
        assert!(c.is_gateway());
        assert_eq!(c.ipam_type(), Some("host-local"));
        assert_eq!(c.version, Version::V1_0_0);
    }

    #[test]
    fn defaults() {
        let c = parse(r#"{"cniVersion":"0.4.0","name":"n","type":"pontoon"}"#).unwrap();
        assert_eq!(c.bridge_name(), "cni0");
        assert!(!c.is_gateway());
        assert_eq!(c.ipam_type(), None);
    }

    #[test]
    fn error_codes() {
        assert_eq!(parse("{").unwrap_err().code(), 6);
        assert_eq!(parse("[]").unwrap_err().code(), 6);
        assert_eq!(parse("").unwrap_err().code(), 6);
        assert_eq!(
            parse(r#"{"cniVersion":"9.0.0","name":"n"}"#)
                .unwrap_err()
                .code(),
            1
        );
        assert_eq!(parse(r#"{"name":"n"}"#).unwrap_err().code(), 1);
        let e = parse(r#"{"cniVersion":"1.0.0","name":"n","mtu":"big"}"#).unwrap_err();
        assert_eq!(e.code(), 7);
        assert!(e.to_string().contains("mtu"), "{e}");
        let e = parse(r#"{"cniVersion":"1.0.0","name":"n","isGateway":"yes"}"#).unwrap_err();
        assert!(e.to_string().contains("isGateway"), "{e}");
        for bad in ["../../etc", "a/b", "", "-x"] {
            let e = parse(&format!(r#"{{"cniVersion":"1.0.0","name":"{bad}"}}"#)).unwrap_err();
            assert_eq!(e.code(), 7, "{bad}");
        }
        assert!(parse(r#"{"cniVersion":"1.0.0","name":"n","vlan":5}"#).is_ok());
        for bad in [
            r#""vlanTrunk":[{"id":0}]"#,
            r#""vlanTrunk":[{"minID":10,"maxID":5}]"#,
            r#""vlanTrunk":[{"minID":10}]"#,
            r#""vlanTrunk":[{"id":5000}]"#,
            r#""disableContainerInterface":true,"ipam":{"type":"host-local","subnet":"10.0.0.0/24"}"#,
            r#""runtimeConfig":{"bandwidth":{"ingressRate":-1,"ingressBurst":5}}"#,
            r#""runtimeConfig":{"bandwidth":{"ingressRate":1000}}"#,
            r#""runtimeConfig":{"bandwidth":{"egressBurst":1000}}"#,
            r#""runtimeConfig":{"bandwidth":{"egressRate":100000,"egressBurst":99999999999999}}"#,
            r#""runtimeConfig":{"bandwidth":{"egressRate":1e40,"egressBurst":1}}"#,
        ] {
            let e = parse(&format!(r#"{{"cniVersion":"1.0.0","name":"n",{bad}}}"#)).unwrap_err();
            assert_eq!(e.code(), 7, "{bad}: {e}");
        }
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"n","vlanTrunk":[{"id":7},{"minID":3,"maxID":5},{"id":4}]}"#,
        )
        .unwrap();
        assert_eq!(c.vlan_trunk().unwrap(), [3, 4, 5, 7]);
        assert!(c.preserve_default_vlan());
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","name":"n","hairpinMode":true,"promiscMode":true}"#)
                .unwrap_err()
                .code(),
            7
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","name":"n","bridge":"a-very-long-bridge-name"}"#)
                .unwrap_err()
                .code(),
            7
        );
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","name":"n","ipMasqBackend":"pf"}"#)
                .unwrap_err()
                .code(),
            7
        );
    }

    #[test]
    fn mac_precedence() {
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"n","runtimeConfig":{"mac":"02:00:00:00:00:01"},
                "args":{"cni":{"mac":"02:00:00:00:00:02"}}}"#,
        )
        .unwrap();
        assert_eq!(
            c.requested_mac(Some("02:00:00:00:00:03")).unwrap(),
            Some([2, 0, 0, 0, 0, 1])
        );
        let c = parse(r#"{"cniVersion":"1.0.0","name":"n"}"#).unwrap();
        assert_eq!(
            c.requested_mac(Some("02:00:00:00:00:03")).unwrap(),
            Some([2, 0, 0, 0, 0, 3])
        );
        assert!(c.requested_mac(Some("zz")).is_err());
    }

    #[test]
    fn requested_ips_merge() {
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"n","runtimeConfig":{"ips":["10.0.0.5/24"]},
                "args":{"cni":{"ips":["fd00::5"]}}}"#,
        )
        .unwrap();
        let ips = c.requested_ips(&["10.0.0.5".parse().unwrap()]).unwrap();
        assert_eq!(ips.len(), 2);
    }

    #[test]
    fn attachments_legacy_key() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","name":"n","cni.dev/attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.valid_attachments().unwrap().len(), 1);
    }

    #[test]
    fn mac_format() {
        assert_eq!(
            parse_mac("0A:58:0a:16:00:05"),
            Some([0x0a, 0x58, 0x0a, 0x16, 0, 5])
        );
        assert_eq!(
            format_mac(&[0x0a, 0x58, 0x0a, 0x16, 0, 5]),
            "0a:58:0a:16:00:05"
        );
        assert_eq!(parse_mac("0a:58"), None);
    }
}

//! The CNI ADD result, held in one version-neutral shape and converted to exactly the JSON each
//! spec version defines.
//!
//! [`CniResult::to_json`] is the one conversion out (to any supported version) and
//! [`CniResult::from_json`] the one conversion in (from any supported version, e.g. a
//! `prevResult`).

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::version::Version;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// 1.1.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    /// 1.1.0 only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub socket_path: String,
    /// 1.1.0 only.
    #[serde(default, rename = "pciID", skip_serializing_if = "String::is_empty")]
    pub pci_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Index into `interfaces` of the interface holding this address.
    pub interface: Option<usize>,
    /// The address with its prefix length (host bits kept, e.g. `10.22.0.5/16`).
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    /// 1.1.0 only, like the fields below.
    pub mtu: Option<u32>,
    pub advmss: Option<u32>,
    pub priority: Option<u32>,
    pub table: Option<u32>,
    pub scope: Option<u8>,
}

impl Route {
    pub fn new(dst: IpNetwork, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self == &Dns::default()
    }
}

// The wire shapes. Addresses travel as strings; everything optional is omitted when empty, as the
// Go reference types do.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResult {
    #[serde(default)]
    cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ips: Vec<WireIp>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    routes: Vec<WireRoute>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    dns: Dns,
}

#[derive(Serialize, Deserialize)]
struct WireIp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interface: Option<usize>,
    address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WireRoute {
    dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gw: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
    #[serde(default, rename = "advmss", skip_serializing_if = "Option::is_none")]
    advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<u8>,
}

fn parse_ip(s: &str, what: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| Error::Decode(format!("{what}: {s:?} is not an IP address")))
}

/// Parses `addr/prefix`, keeping host bits (`10.0.0.5/24` stays `10.0.0.5/24`).
pub fn parse_cidr(s: &str, what: &str) -> Result<IpNetwork> {
    if !s.contains('/') {
        return Err(Error::Decode(format!(
            "{what}: {s:?} must be an address with a prefix length, e.g. 10.22.0.5/16"
        )));
    }
    s.parse()
        .map_err(|_| Error::Decode(format!("{what}: {s:?} is not a valid CIDR")))
}

impl CniResult {
    /// The result as the JSON of spec version `v`: `ips[].version` for 0.3.x/0.4.0 only, the 1.1
    /// interface and route fields for 1.1.0 only.
    pub fn to_json(&self, v: Version) -> Value {
        let eleven = v.has_gc_status();
        let wire = WireResult {
            cni_version: v.as_str().to_string(),
            interfaces: self
                .interfaces
                .iter()
                .map(|i| {
                    let mut i = i.clone();
                    if !eleven {
                        i.mtu = None;
                        i.socket_path.clear();
                        i.pci_id.clear();
                    }
                    i
                })
                .collect(),
            ips: self
                .ips
                .iter()
                .map(|ip| WireIp {
                    version: v
                        .ips_have_version()
                        .then(|| if ip.address.is_ipv4() { "4" } else { "6" }.to_string()),
                    interface: ip.interface,
                    address: ip.address.to_string(),
                    gateway: ip.gateway.map(|g| g.to_string()),
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|r| WireRoute {
                    dst: r.dst.to_string(),
                    gw: r.gw.map(|g| g.to_string()),
                    mtu: r.mtu.filter(|_| eleven),
                    advmss: r.advmss.filter(|_| eleven),
                    priority: r.priority.filter(|_| eleven),
                    table: r.table.filter(|_| eleven),
                    scope: r.scope.filter(|_| eleven),
                })
                .collect(),
            dns: self.dns.clone(),
        };
        serde_json::to_value(wire).expect("a result always serialises")
    }

    /// Reads a result of any supported version (e.g. `prevResult`). A result without
    /// `cniVersion` is read as `assumed`, as libcni does.
    pub fn from_json(value: &Value, assumed: Version) -> Result<CniResult> {
        let wire: WireResult = serde_json::from_value(value.clone())
            .map_err(|e| Error::Decode(format!("result: {e}")))?;
        let v = if wire.cni_version.is_empty() {
            assumed
        } else {
            Version::parse(&wire.cni_version)?
        };
        let mut ips = Vec::with_capacity(wire.ips.len());
        for ip in wire.ips {
            let address = parse_cidr(&ip.address, "result ips[].address")?;
            if v.ips_have_version() {
                let want = if address.is_ipv4() { "4" } else { "6" };
                match ip.version.as_deref() {
                    Some(got) if got == want => {}
                    other => {
                        return Err(Error::Decode(format!(
                            "result ips[].version {other:?} does not match address {address} \
                             (spec {v} requires \"{want}\")"
                        )));
                    }
                }
            }
            ips.push(IpConfig {
                interface: ip.interface,
                address,
                gateway: ip
                    .gateway
                    .as_deref()
                    .map(|g| parse_ip(g, "result ips[].gateway"))
                    .transpose()?,
            });
        }
        let mut routes = Vec::with_capacity(wire.routes.len());
        for r in wire.routes {
            let dst: IpNetwork = r
                .dst
                .parse()
                .map_err(|_| Error::Decode(format!("result routes[].dst {:?}", r.dst)))?;
            routes.push(Route {
                dst,
                gw: r
                    .gw
                    .as_deref()
                    .map(|g| parse_ip(g, "result routes[].gw"))
                    .transpose()?,
                mtu: r.mtu,
                advmss: r.advmss,
                priority: r.priority,
                table: r.table,
                scope: r.scope,
            });
        }
        if let Some(bad) = ips
            .iter()
            .filter_map(|i| i.interface)
            .find(|&i| i >= wire.interfaces.len())
        {
            return Err(Error::Decode(format!(
                "result ips[].interface {bad} points past the {} interfaces",
                wire.interfaces.len()
            )));
        }
        Ok(CniResult {
            interfaces: wire.interfaces,
            ips,
            routes,
            dns: wire.dns,
        })
    }
}

/// `{"cniVersion":…,"supportedVersions":[…]}` for the VERSION verb.
pub fn version_reply(requested: &str) -> Value {
    let mut m = Map::new();
    m.insert("cniVersion".into(), Value::String(requested.to_string()));
    m.insert(
        "supportedVersions".into(),
        Value::Array(
            super::version::SUPPORTED
                .iter()
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
    );
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: "0a:58:0a:16:00:01".into(),
                    ..Default::default()
                },
                Interface {
                    name: "veth1234".into(),
                    mac: "aa:bb:cc:dd:ee:ff".into(),
                    mtu: Some(1500),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: "11:22:33:44:55:66".into(),
                    mtu: Some(1500),
                    sandbox: "/var/run/netns/x".into(),
                    ..Default::default()
                },
            ],
            ips: vec![
                IpConfig {
                    interface: Some(2),
                    address: "10.22.0.5/16".parse().unwrap(),
                    gateway: Some("10.22.0.1".parse().unwrap()),
                },
                IpConfig {
                    interface: Some(2),
                    address: "fd00::5/64".parse().unwrap(),
                    gateway: Some("fd00::1".parse().unwrap()),
                },
            ],
            routes: vec![Route {
                table: Some(100),
                ..Route::new(
                    "0.0.0.0/0".parse().unwrap(),
                    Some("10.22.0.1".parse().unwrap()),
                )
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                ..Default::default()
            },
        }
    }

    #[test]
    fn v040_and_older_carry_ip_version_and_no_11_fields() {
        for v in [Version::V0_3_0, Version::V0_3_1, Version::V0_4_0] {
            let j = sample().to_json(v);
            assert_eq!(j["cniVersion"], v.as_str());
            assert_eq!(j["ips"][0]["version"], "4");
            assert_eq!(j["ips"][1]["version"], "6");
            assert_eq!(j["ips"][0]["interface"], 2);
            assert!(j["interfaces"][1].get("mtu").is_none());
            assert!(j["routes"][0].get("table").is_none());
        }
    }

    #[test]
    fn v100_has_no_ip_version_and_no_11_fields() {
        let j = sample().to_json(Version::V1_0_0);
        assert!(j["ips"][0].get("version").is_none());
        assert!(j["interfaces"][2].get("mtu").is_none());
        assert!(j["routes"][0].get("table").is_none());
        assert_eq!(j["interfaces"][2]["sandbox"], "/var/run/netns/x");
    }

    #[test]
    fn v110_has_the_11_fields() {
        let j = sample().to_json(Version::V1_1_0);
        assert!(j["ips"][0].get("version").is_none());
        assert_eq!(j["interfaces"][2]["mtu"], 1500);
        assert_eq!(j["routes"][0]["table"], 100);
        assert_eq!(j["dns"]["nameservers"][0], "10.96.0.10");
    }

    #[test]
    fn exact_shape_for_040() {
        let r = CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                sandbox: "/n".into(),
                ..Default::default()
            }],
            ips: vec![IpConfig {
                interface: Some(0),
                address: "10.1.0.5/16".parse().unwrap(),
                gateway: None,
            }],
            routes: vec![],
            dns: Dns::default(),
        };
        assert_eq!(
            r.to_json(Version::V0_4_0),
            json!({"cniVersion":"0.4.0",
                   "interfaces":[{"name":"eth0","sandbox":"/n"}],
                   "ips":[{"version":"4","interface":0,"address":"10.1.0.5/16"}]})
        );
    }

    #[test]
    fn round_trip_every_version() {
        for v in Version::ALL {
            let j = sample().to_json(v);
            let back = CniResult::from_json(&j, v).unwrap();
            let mut expect = sample();
            if !v.has_gc_status() {
                for i in &mut expect.interfaces {
                    i.mtu = None;
                }
                expect.routes[0].table = None;
            }
            assert_eq!(back, expect, "{v}");
        }
    }

    #[test]
    fn cross_version_conversion() {
        // An 0.4.0 prevResult read and printed as 1.1.0, and back.
        let old = sample().to_json(Version::V0_4_0);
        let r = CniResult::from_json(&old, Version::V1_1_0).unwrap();
        let new = r.to_json(Version::V1_1_0);
        assert!(new["ips"][0].get("version").is_none());
        let again = CniResult::from_json(&new, Version::V1_1_0).unwrap();
        assert_eq!(again.to_json(Version::V0_4_0), old);
    }

    #[test]
    fn from_json_rejects_bad_results() {
        let missing_version = json!({"cniVersion":"0.4.0","ips":[{"address":"10.0.0.1/24"}]});
        assert_eq!(
            CniResult::from_json(&missing_version, Version::V0_4_0)
                .unwrap_err()
                .code(),
            6
        );
        let wrong_family =
            json!({"cniVersion":"0.3.1","ips":[{"version":"6","address":"10.0.0.1/24"}]});
        assert!(CniResult::from_json(&wrong_family, Version::V0_3_1).is_err());
        let bad_index = json!({"cniVersion":"1.0.0","interfaces":[],"ips":[{"interface":0,"address":"10.0.0.1/24"}]});
        assert!(CniResult::from_json(&bad_index, Version::V1_0_0).is_err());
        let no_prefix = json!({"cniVersion":"1.0.0","ips":[{"address":"10.0.0.1"}]});
        assert!(CniResult::from_json(&no_prefix, Version::V1_0_0).is_err());
        let unknown = json!({"cniVersion":"9.9.9"});
        assert_eq!(
            CniResult::from_json(&unknown, Version::V1_0_0)
                .unwrap_err()
                .code(),
            1
        );
    }

    #[test]
    fn missing_cni_version_is_assumed() {
        let j = json!({"ips":[{"address":"10.0.0.1/24"}]});
        let r = CniResult::from_json(&j, Version::V1_0_0).unwrap();
        assert_eq!(r.ips.len(), 1);
    }

    #[test]
    fn empty_dns_is_omitted() {
        let r = CniResult::default();
        let j = r.to_json(Version::V1_0_0);
        assert_eq!(j, json!({"cniVersion":"1.0.0"}));
    }

    #[test]
    fn version_reply_lists_all() {
        let j = version_reply("0.4.0");
        assert_eq!(j["cniVersion"], "0.4.0");
        assert_eq!(j["supportedVersions"].as_array().unwrap().len(), 5);
    }
}

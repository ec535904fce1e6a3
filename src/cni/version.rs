//! CNI spec versions pontoon speaks, and what each one allows.

use crate::error::{Error, Result};

/// Every spec version pontoon accepts in a network configuration, oldest first.
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest spec version: used for VERSION and error replies when the config's is unknown.
pub const LATEST: &str = "1.1.0";

/// A supported CNI spec version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub const ALL: [Version; 5] = [
        Version::V0_3_0,
        Version::V0_3_1,
        Version::V0_4_0,
        Version::V1_0_0,
        Version::V1_1_0,
    ];

    pub fn parse(s: &str) -> Result<Version> {
        Ok(match s {
            "0.3.0" => Version::V0_3_0,
            "0.3.1" => Version::V0_3_1,
            "0.4.0" => Version::V0_4_0,
            "1.0.0" => Version::V1_0_0,
            "1.1.0" => Version::V1_1_0,
            other => {
                return Err(Error::IncompatibleVersion {
                    version: other.to_string(),
                    supported: SUPPORTED.join(", "),
                });
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        SUPPORTED[self as usize]
    }

    /// 0.3.x and 0.4.0 results carry `ips[].version`; 1.x results do not.
    pub fn ips_have_version(self) -> bool {
        self < Version::V1_0_0
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= Version::V0_4_0
    }

    /// GC, STATUS and the 1.1 result fields exist from 1.1.0 on.
    pub fn has_gc_status(self) -> bool {
        self >= Version::V1_1_0
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_every_supported_version() {
        for s in SUPPORTED {
            assert_eq!(Version::parse(s).unwrap().as_str(), s);
        }
        assert_eq!(Version::ALL.len(), SUPPORTED.len());
    }

    #[test]
    fn unknown_versions_are_code_1() {
        for bad in ["0.1.0", "0.2.0", "1.2.0", "", "1.0"] {
            let e = Version::parse(bad).unwrap_err();
            assert_eq!(e.code(), 1, "{bad}");
            assert!(e.to_string().contains("1.1.0"));
        }
    }

    #[test]
    fn feature_gates() {
        assert!(Version::V0_3_1.ips_have_version());
        assert!(Version::V0_4_0.ips_have_version());
        assert!(!Version::V1_0_0.ips_have_version());
        assert!(!Version::V0_3_1.has_check());
        assert!(Version::V0_4_0.has_check());
        assert!(!Version::V1_0_0.has_gc_status());
        assert!(Version::V1_1_0.has_gc_status());
    }
}

//! The CNI protocol: environment, network configuration, results per spec version, error replies.

pub mod config;
pub mod env;
pub mod result;
pub mod version;

pub use config::{Attachment, NetConf};
pub use env::{Command, Env};
pub use result::CniResult;
pub use version::Version;

use serde_json::{Value, json};

use crate::error::Error;

/// The VERSION verb's answer: the versions pontoon speaks, in the version stdin asked for.
pub fn version_answer(stdin: &[u8]) -> Value {
    let requested = config::sniff_version(stdin).unwrap_or(version::LATEST.into());
    result::version_reply(&requested)
}

/// The CNI error object `{"cniVersion","code","msg","details"}`; printed on stdout with a
/// non-zero exit, where libcni reads it.
pub fn error_reply(err: &Error, cni_version: &str) -> Value {
    json!({
        "cniVersion": cni_version,
        "code": err.code(),
        "msg": err.to_string(),
        "details": err.details(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reply_shape() {
        let e = Error::env("CNI_IFNAME", "is empty");
        let j = error_reply(&e, "1.0.0");
        assert_eq!(j["code"], 4);
        assert_eq!(j["cniVersion"], "1.0.0");
        assert!(j["msg"].as_str().unwrap().contains("CNI_IFNAME"));
        assert!(j.get("details").is_some());
    }
}

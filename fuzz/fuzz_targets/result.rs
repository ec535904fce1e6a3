//! Result conversion: any result that parses converts to every version and back to the same
//! result (up to the fields a version cannot carry).
#![no_main]
use libfuzzer_sys::fuzz_target;
use pontoon::cni::{CniResult, Version};

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(r) = CniResult::from_json(&v, Version::V1_1_0) else {
        return;
    };
    for ver in Version::ALL {
        let j = r.to_json(ver);
        let back = CniResult::from_json(&j, ver).expect("our own output parses");
        assert_eq!(back.ips, r.ips);
        assert_eq!(back.to_json(ver), j);
    }
});

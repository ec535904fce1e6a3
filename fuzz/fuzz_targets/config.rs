//! The network configuration parser (stdin of every CNI call), including the IPAM ranges:
//! never panics, and anything it accepts can be turned into a pool without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = pontoon::cni::NetConf::parse(data) {
        let _ = conf.prev_result();
        let _ = conf.requested_mac(None);
        let _ = conf.requested_ips(&[]);
        let _ = conf.valid_attachments();
        if let Some(ipam) = &conf.raw.ipam
            && let Ok(pool) = pontoon::ipam::Pool::from_config(&conf.name, ipam, None)
        {
            for set in &pool.sets {
                let _ = set.size();
                let _ = set.candidates(None).take(4).count();
            }
        }
    }
});

//! CNI_ARGS parsing: never panics; a parsed value keeps every pair.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(args) = pontoon::cni::env::CniArgs::parse(s)
    {
        assert!(args.pairs.len() <= s.split(';').count());
    }
});

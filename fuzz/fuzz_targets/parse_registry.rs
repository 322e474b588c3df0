//! Arbitrary bytes into the endpoint registry parser, as YAML and as JSON.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = netpol::api::parse_registry(Path::new("fuzz.yaml"), text);
    let _ = netpol::api::parse_registry(Path::new("fuzz.json"), text);
});

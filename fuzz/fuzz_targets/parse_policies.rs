//! Arbitrary bytes into the policy parser, as YAML and as JSON: problems are
//! fine, a panic, a hang or a blow-up is a finding.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The loader refuses non-UTF-8 before parsing; the parser sees text only.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = netpol::api::parse_policies(Path::new("fuzz.yaml"), text);
    let _ = netpol::api::parse_policies(Path::new("fuzz.json"), text);
});

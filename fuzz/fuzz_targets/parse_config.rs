//! Arbitrary bytes into the daemon config (`netpold.toml`) deserializer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = toml::from_str::<netpol::config::Config>(text);
});

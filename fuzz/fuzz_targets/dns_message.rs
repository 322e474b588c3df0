//! Arbitrary bytes through the DNS proxy's message handling
//! (`netpol::dns::proxy::handle_offline`): parsed as a workload's query,
//! decided against DNS rules, answered REFUSED, and parsed as an upstream
//! answer to that query and to a query of the fuzzer's ID. Drops are fine; a
//! panic, a hang or a blow-up is a finding.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use netpol::api::model::FqdnSelector;

fn rules() -> &'static [FqdnSelector] {
    static R: OnceLock<Vec<FqdnSelector>> = OnceLock::new();
    R.get_or_init(|| {
        vec![
            FqdnSelector::Name("api.example.com.".into()),
            FqdnSelector::Pattern("*.example.com.".into()),
            FqdnSelector::Pattern("**.example.org.".into()),
            FqdnSelector::Pattern("a*b*c.example.net.".into()),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    netpol::dns::proxy::handle_offline(data, rules());
});

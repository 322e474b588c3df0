//! A policy file (arbitrary text) against the seed registry: whatever parses
//! must compile (within the default map sizes, or be refused with an error) and
//! trace without panicking, and the compiled state must be consistent (trace =
//! lookup on both directions).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use netpol::api::model::{PolicySet, RegistrySet};
use netpol::policy::compile::{try_compile, CompileOptions};
use netpol::policy::trace::trace_str;

const REGISTRY: &str = include_str!("../../etc/examples/seed/endpoints.d/seed.yaml");

/// The seed registry plus a host endpoint, a remote node and a namespace, so
/// entity and namespace rules have something to select.
const EXTRA: &str = "apiVersion: netpol/v1
kind: HostEndpoint
metadata: {name: host-a, labels: {role: web}}
spec: {interface: eth0, addresses: [192.0.2.10]}
---
apiVersion: netpol/v1
kind: Node
metadata: {name: host-b, labels: {rack: r2}}
spec: {addresses: [192.0.2.11]}
---
apiVersion: netpol/v1
kind: Namespace
metadata: {name: default, labels: {team: web}}
---
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: api, namespace: prod, labels: {app: api}}
spec: {node: host-b, addresses: [10.0.2.5, \"fd00:2::5\"]}
";

fn registry() -> &'static RegistrySet {
    static R: OnceLock<RegistrySet> = OnceLock::new();
    R.get_or_init(|| {
        let text = format!("{REGISTRY}\n---\n{EXTRA}");
        netpol::api::parse_registry(Path::new("seed.yaml"), &text).expect("seed registry is valid")
    })
}

const SIDES: &[&str] = &[
    "default/frontend-1",
    "backend",
    "default/database",
    "10.0.1.21",
    "fd00:1::31",
    "192.0.2.10",
    "192.0.2.11",
    "10.0.2.5",
    "8.8.8.8",
    "2001:db8::1",
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (sel, text) = data.split_at(2);
    let Ok(text) = std::str::from_utf8(text) else { return };
    let Ok(policies) = netpol::api::parse_policies(Path::new("fuzz.yaml"), text) else { return };
    let set = PolicySet { policies };
    let opts = CompileOptions {
        node_name: "host-a".into(),
        audit: sel[0] & 1 != 0,
        allow_localhost: sel[0] & 2 != 0,
        ..CompileOptions::default()
    };
    let Ok(c) = try_compile(&set, registry(), &opts) else { return };
    let ports = [0u16, 1, 53, 80, 443, 5432, 8080, 65535, u16::from(sel[1]) * 257];
    let protos = [6u8, 17, 132, 1, 58, 0];
    for (i, src) in SIDES.iter().enumerate() {
        let dst = SIDES[(i + usize::from(sel[1])) % SIDES.len()];
        let proto = protos[(i + usize::from(sel[0] >> 2)) % protos.len()];
        let port = ports[(i * 7 + usize::from(sel[1])) % ports.len()];
        let _ = trace_str(&c, src, dst, proto, port);
        let _ = trace_str(&c, dst, src, proto, port);
    }
});

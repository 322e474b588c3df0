//! Per-packet cost of the datapath through BPF_PROG_TEST_RUN with 10, 1,000,
//! 10,000 and 100,000 policy entries, and the ratio 100k vs 10 (target ≤ 1.3).
//! Needs root. `cargo run --release --example bench_lookup [repeat]`.
//!
//! Two packets: the policy decision of a new flow — one the endpoint's
//! default deny drops, so every repeat runs the whole lookup (conntrack miss,
//! anti-spoofing and remote ipcache, both policy lookups) — printed as
//! `<entries> entries: <ns> ns/packet` and used for the ratio; and an
//! established flow (conntrack hit, cached verdict), printed as
//! `established <entries> entries: <ns> ns/packet`.

use std::net::IpAddr;
use std::path::PathBuf;

use netpol::api::model::EndpointKind;
use netpol::datapath::packet::{PacketSpec, TCP_ACK};
use netpol::datapath::{Attachment, Datapath, DatapathSettings, Hook, KernelDatapath};
use netpol::policy::types::{
    Compiled, CompiledEndpoint, Direction, EntryVerdict, IpcacheEntry, PolicyEntry,
};

fn state(n: usize) -> Compiled {
    let mut c = Compiled::default();
    for (slot, addr) in [(0u32, "10.201.9.1"), (1, "10.201.9.2")] {
        let a: IpAddr = addr.parse().unwrap();
        c.endpoints.push(CompiledEndpoint {
            slot,
            name: format!("ep{slot}").into(),
            namespace: None,
            kind: EndpointKind::Workload,
            identity: 1000 + slot,
            local: true,
            interface: None,
            addresses: vec![a],
            default_deny_ingress: true,
            default_deny_egress: true,
            enforced_ingress: true,
            enforced_egress: true,
            audit: false,
        });
        c.ipcache.push(IpcacheEntry {
            net: a.into(),
            identity: 1000 + slot,
            endpoint: Some(slot),
        });
    }
    // n entries of endpoint 0: identities 1001.. with 100 ports each, both directions.
    for i in 0..n {
        c.entries.push(PolicyEntry {
            endpoint: 0,
            direction: if i % 2 == 0 {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            identity: 1001 + (i / 200) as u32,
            proto: 6,
            port: 1000 + ((i / 2) % 100) as u16,
            port_prefix: 16,
            verdict: EntryVerdict::Allow,
            rule: i as u32,
        });
    }
    c.entries.sort();
    c.entries.dedup_by(|a, b| {
        (a.endpoint, a.direction, a.identity, a.proto, a.port)
            == (b.endpoint, b.direction, b.identity, b.proto, b.port)
    });
    c
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench_lookup needs root (BPF_PROG_TEST_RUN)");
        std::process::exit(2);
    }
    let repeat: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let pin = PathBuf::from(format!("/sys/fs/bpf/npd-bench-{}", std::process::id()));
    let settings = DatapathSettings {
        policy_max_entries: 200_000,
        recheck_established: true,
        ..DatapathSettings::default()
    };
    let mut dp = KernelDatapath::open(&pin, &settings).expect("open datapath");
    // An established flow (the common case: its conntrack entry answers) to
    // the identity with entries, on a port that has one.
    let src: IpAddr = "10.201.9.1".parse().unwrap();
    let dst: IpAddr = "10.201.9.2".parse().unwrap();
    let established = PacketSpec::tcp(src, dst, 40000, 1002, TCP_ACK).build();
    // A port no entry opens: dropped by default deny after every lookup.
    let decided = PacketSpec::tcp(src, dst, 40001, 999, TCP_ACK).build();
    let mut results = Vec::new();
    // One attachment: slot 0 on a made-up ifindex (test runs need no device).
    let one = [Attachment {
        slot: 0,
        ifindex: 1,
    }];
    for n in [10usize, 1_000, 10_000, 100_000] {
        let c = state(n);
        dp.apply(&c, &one).expect("apply");
        let best = |pkt: &[u8], allowed: bool| {
            let mut best = f64::MAX;
            for _ in 0..7 {
                let r = dp.test_run(Hook::Ingress, pkt, repeat).expect("test run");
                assert_eq!(r.passed(), allowed, "the probe's verdict");
                best = best.min(r.duration.as_nanos() as f64);
            }
            best
        };
        let d = best(&decided, false);
        let e = best(&established, true);
        println!("{:>7} entries: {:>7.1} ns/packet", c.entries.len(), d);
        println!(
            "established {:>7} entries: {:>7.1} ns/packet",
            c.entries.len(),
            e
        );
        results.push(d);
    }
    let ratio = results[3] / results[0];
    println!("ratio 100k vs 10: {ratio:.2} (target <= 1.30)");
    if let Err(e) = dp.detach_all() {
        eprintln!("detach_all: {e}");
    }
}

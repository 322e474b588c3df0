//! Differential test: the kernel datapath (through BPF_PROG_TEST_RUN) and the
//! offline lookup contract must agree on every generated (policy state, flow)
//! probe — verdict and deciding rule. Privileged: skips without root, fails
//! under CI=true.
//!
//! The offline side is the core's `netpol::policy::lookup` (the contract
//! written down in bpf/lib/netpol_abi.h and in that module's doc).

use std::net::IpAddr;

use netpol::api::model::EndpointKind;
use netpol::datapath::packet::{PacketSpec, L4, TCP_SYN};
use netpol::datapath::{Attachment, Datapath, DatapathSettings, EventVerdict, Hook};
use netpol::policy::lookup::{self, Outcome};
use netpol::policy::types::{
    Compiled, CompiledEndpoint, Direction, EntryVerdict, IpcacheEntry, PolicyEntry,
};

use crate::harness::dp::{entry, ipcache_of_endpoints, push_world, Dp};
use crate::harness::privileged;
use crate::harness::rng::Rng;

// ---------------------------------------------------------------------------
// The offline side: the core's lookup contract (netpol::policy::lookup) for
// the decision and the ipcache, plus what the datapath adds around it: hook to
// direction, anti-spoofing, audit.

/// (passes, reported rule of a drop or audit)
fn model(
    c: &Compiled,
    slot: u32,
    hook: Hook,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    port: u16,
) -> (bool, Option<u32>) {
    let ep = &c.endpoints[slot as usize];
    let host = ep.kind == EndpointKind::Host;
    let dir = match (host, hook) {
        (false, Hook::Ingress) | (true, Hook::Egress) => Direction::Egress,
        _ => Direction::Ingress,
    };
    if !host && hook == Hook::Ingress && c.endpoint_by_ip(src) != Some(slot) {
        return (false, None); // spoofed: never audited
    }
    let remote = if dir == Direction::Egress { dst } else { src };
    let d = lookup::decide(c, slot, dir, c.lookup_ip(remote), proto, port);
    let rule = match d.outcome {
        Outcome::DeniedByEntry | Outcome::StagedDeny | Outcome::StagedDefaultDeny => {
            d.entry.map(|e| e.rule)
        }
        _ => None,
    };
    if !d.allowed() && ep.audit {
        return (true, rule);
    }
    (d.allowed(), rule)
}

// ---------------------------------------------------------------------------
// Generation of states and probes.

const IDS: [u32; 6] = [1000, 1001, 1002, 1003, 16_777_217, 2];
const PROTOS: [u8; 5] = [0, 1, 6, 17, 132];
const PORTS: [u16; 10] = [0, 22, 53, 80, 443, 1024, 2047, 8080, 32768, 65535];

fn addr_v4(i: u32) -> IpAddr {
    IpAddr::from([10, 201, 1, i as u8])
}
fn addr_v6(i: u32) -> IpAddr {
    format!("fd01:201::1:{i:x}").parse().unwrap()
}

fn gen_state(rng: &mut Rng) -> Compiled {
    let mut c = Compiled::default();
    for slot in 0..4u32 {
        let kind = if slot == 0 && rng.chance(25) {
            EndpointKind::Host
        } else {
            EndpointKind::Workload
        };
        c.endpoints.push(CompiledEndpoint {
            slot,
            name: format!("ep{slot}").into(),
            namespace: Some("default".into()),
            kind,
            identity: IDS[slot as usize],
            local: true,
            interface: None,
            addresses: vec![addr_v4(10 + slot), addr_v6(10 + slot)],
            default_deny_ingress: rng.chance(60),
            default_deny_egress: rng.chance(60),
            enforced_ingress: true,
            enforced_egress: true,
            audit: rng.chance(10),
        });
    }
    ipcache_of_endpoints(&mut c);
    // A CIDR identity covering part of the world, and explicit /0 entries (as compile emits).
    c.ipcache.push(IpcacheEntry {
        net: "10.202.0.0/16".parse().unwrap(),
        identity: 16_777_217,
        endpoint: None,
    });
    c.ipcache.push(IpcacheEntry {
        net: "fd01:202::/32".parse().unwrap(),
        identity: 16_777_217,
        endpoint: None,
    });
    if rng.chance(50) {
        push_world(&mut c);
    }
    c.ipcache.sort();

    let n = 5 + rng.below(60);
    let mut seen = std::collections::BTreeSet::new();
    let mut rule = 0;
    for _ in 0..n {
        let slot = if rng.chance(80) {
            0
        } else {
            1 + rng.below(3) as u32
        };
        let dir = if rng.chance(50) {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let identity = if rng.chance(30) {
            0
        } else {
            *rng.pick(&[1000, 1001, 1002, 1003, 16_777_217, 2, 9, 10])
        };
        let proto = *rng.pick(&PROTOS);
        let (port, prefix) = if proto == 0 {
            (0, 0)
        } else {
            let prefix = *rng.pick(&[0u8, 16, 16, 16, 8, 6, 12, 1]);
            let port = if proto == 1 {
                *rng.pick(&[0u16, 8, 13])
            } else {
                *rng.pick(&PORTS)
            };
            let mask: u16 = if prefix == 0 {
                0
            } else {
                u16::MAX << (16 - u32::from(prefix))
            };
            (port & mask, prefix)
        };
        if !seen.insert((slot, dir, identity, proto, port, prefix)) {
            continue;
        }
        let verdict = match rng.below(100) {
            0..30 => EntryVerdict::Deny,
            30..36 => EntryVerdict::StagedDeny,
            36..42 => EntryVerdict::AllowStagedDeny,
            // Compile writes it with identity 0 and any protocol only; the
            // lookup contract reads it wherever it is.
            42..46 => EntryVerdict::StagedDefaultDeny,
            _ => EntryVerdict::Allow,
        };
        c.entries.push(PolicyEntry {
            endpoint: slot,
            ..entry(dir, identity, proto, port, prefix, verdict, rule)
        });
        rule += 1;
    }
    c.entries.sort();
    c
}

struct Probe {
    hook: Hook,
    spec: PacketSpec,
    proto: u8,
    port: u16,
}

fn gen_probe(rng: &mut Rng, c: &Compiled, sport: u16) -> Probe {
    let v6 = rng.chance(30);
    let me = &c.endpoints[0];
    let local = if v6 { me.addresses[1] } else { me.addresses[0] };
    let remote = match rng.below(4) {
        0 | 1 => {
            let ep = &c.endpoints[1 + rng.below(3) as usize];
            if v6 {
                ep.addresses[1]
            } else {
                ep.addresses[0]
            }
        }
        2 => {
            if v6 {
                "fd01:202::77".parse().unwrap()
            } else {
                "10.202.3.4".parse().unwrap()
            }
        }
        _ => {
            if v6 {
                "fd01:203::9".parse().unwrap()
            } else {
                "10.203.9.9".parse().unwrap()
            }
        }
    };
    let hook = if rng.chance(50) {
        Hook::Ingress
    } else {
        Hook::Egress
    };
    let (mut src, dst) = if hook == Hook::Ingress {
        (local, remote)
    } else {
        (remote, local)
    };
    if rng.chance(5) {
        // A spoofed source (leaving a workload: dropped; elsewhere: judged).
        src = if v6 {
            "fd01:201::1:11".parse().unwrap()
        } else {
            addr_v4(11)
        };
    }
    let proto = *rng.pick(&[6u8, 6, 17, 17, 132, 1, 47]);
    let port = if rng.chance(70) {
        let base = *rng.pick(&PORTS);
        base.wrapping_add(*rng.pick(&[0u16, 0, 1, 0xffff]))
    } else {
        rng.below(65536) as u16
    };
    let (spec, proto, port) = match proto {
        6 => (PacketSpec::tcp(src, dst, sport, port, TCP_SYN), 6, port),
        17 => (PacketSpec::udp(src, dst, sport, port), 17, port),
        132 => (
            PacketSpec::new(src, dst, L4::Sctp { sport, dport: port }),
            132,
            port,
        ),
        1 => {
            // Echo request or timestamp (not errors, not ND: those have their own rules).
            let ty = if v6 {
                *rng.pick(&[128u8, 129, 139])
            } else {
                *rng.pick(&[8u8, 0, 13])
            };
            (
                PacketSpec::icmp(src, dst, ty, 0, sport),
                if v6 { 58 } else { 1 },
                u16::from(ty),
            )
        }
        _ => (PacketSpec::new(src, dst, L4::Raw { proto: 47 }), 47, 0),
    };
    Probe {
        hook,
        spec,
        proto,
        port,
    }
}

#[test]
fn kernel_and_offline_lookup_agree_on_generated_probes() {
    let Some(_turn) = privileged("kernel_and_offline_lookup_agree_on_generated_probes") else {
        return;
    };
    let settings = DatapathSettings {
        events_per_sec: 10_000_000,
        ct_max_entries: 4096,
        ipcache_max_entries: 1024,
        policy_max_entries: 4096,
        endpoint_max_entries: 16,
        ..DatapathSettings::default()
    };
    let mut guard = Dp::open("npd", "diff", &settings);
    let dp = guard.dp();
    let seed = std::env::var("NETPOL_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6e70_6431u64);
    let mut rng = Rng::new(seed);
    let states = 25;
    let per_state = 420;
    let mut probes = 0usize;
    let mut disagreements = Vec::new();
    for s in 0..states {
        let c = gen_state(&mut rng);
        dp.apply(
            &c,
            &[Attachment {
                slot: 0,
                ifindex: 1,
            }],
        )
        .expect("apply");
        dp.clear_conntrack().unwrap();
        let _ = dp.poll_events(usize::MAX);
        for i in 0..per_state {
            let sport = 1024 + (i as u16);
            let p = gen_probe(&mut rng, &c, sport);
            let (src, dst) = (p.spec.src, p.spec.dst);
            let want = model(&c, 0, p.hook, src, dst, p.proto, p.port);
            let got = dp.test_run(p.hook, &p.spec.build(), 1).expect("test run");
            let events = dp.poll_events(16);
            let got_rule = events
                .iter()
                .find(|e| matches!(e.verdict, EventVerdict::Denied | EventVerdict::Audit))
                .and_then(|e| e.rule);
            probes += 1;
            if got.passed() != want.0 || got_rule != want.1 {
                disagreements.push(format!(
                    "state {s} probe {i}: {:?} {src} -> {dst} proto {} port {}: kernel passed={} rule={:?}, offline passed={} rule={:?}\n  entries: {:?}\n  endpoint: {:?}",
                    p.hook, p.proto, p.port, got.passed(), got_rule, want.0, want.1, c.entries.iter().filter(|e| e.endpoint == 0).collect::<Vec<_>>(), c.endpoints[0]
                ));
            }
            // Each probe is a new flow: forget what the last one created.
            if got.passed() {
                dp.clear_conntrack().unwrap();
            }
        }
    }
    dp.detach_all().unwrap();
    assert!(probes >= 10_000, "only {probes} probes");
    assert!(
        disagreements.is_empty(),
        "{} of {probes} probes disagree (seed {seed:#x}); first:\n{}",
        disagreements.len(),
        disagreements
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("{probes} probes, 0 disagreements (seed {seed:#x})");
}

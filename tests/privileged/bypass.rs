//! Bypass attempts on the kernel datapath with REAL frames between network
//! namespaces: a workload (`a`) crafts frames with an AF_PACKET socket and
//! sends them towards a denied port of another workload (`b`); a sniffer on
//! `b`'s interface proves they never arrive, and the datapath's counters
//! report the drops. Every attempt has a contrast: the same shape towards an
//! ALLOWED port does arrive, so each test can fail.
//!
//! Most attempts run twice: once denied by `a`'s egress policy (enforced on
//! the ingress hook of `a`'s host-side veth, where the kernel has already
//! moved the outer VLAN tag out of the frame) and once by `b`'s ingress
//! policy (the egress hook of `b`'s host-side veth, after the bridge).
//!
//! Privileged: root and bpffs; skipped with a message otherwise, failed
//! under CI=true. Prefix `npy`: netns `npy-<pid>-<test>-*`, addresses
//! 10.207.0.0/16 and fd01:207::/64, pins /sys/fs/bpf/npy-test-*.

mod frames;
mod local;
mod wire;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use frames::{marker, Injector, Sniffer};
use netpol::api::model::PolicySet;
use netpol::datapath::{Datapath, DatapathSettings, EventReason, EventVerdict};
use netpol::policy::compile::{compile, CompileOptions};
use netpol::policy::types::{Compiled, Direction};
use wire::{Ext, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TPID_8021AD, TPID_8021Q};

use crate::harness::dp::{enforce, settings, Dp};
use crate::harness::privileged;
use crate::harness::probe::{connects, Listeners};
use crate::harness::topo::{Topo, Workload, NODE_MAC};

/// Prefix of every name this file creates (netns, links, pins).
const PREFIX: &str = "npy";

const A4: &str = "10.207.0.11";
const B4: &str = "10.207.0.21";
const C4: &str = "10.207.0.31";
const A6: &str = "fd01:207::11";
const B6: &str = "fd01:207::21";
const C6: &str = "fd01:207::31";

const DENIED: u16 = 22;
const ALLOWED: u16 = 80;

/// How long a frame that must not arrive is waited for.
const NEVER: Duration = Duration::from_millis(300);
/// How long a frame that must arrive may take.
const SOON: Duration = Duration::from_millis(1500);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A fresh source port per attempt, so no attempt meets another's conntrack entry.
fn sport() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(41000);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

const REGISTRY: &str = r#"
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: a, labels: {app: a}}
spec: {interface: npy-a, addresses: [10.207.0.11, "fd01:207::11"]}
---
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: b, labels: {app: b}}
spec: {interface: npy-b, addresses: [10.207.0.21, "fd01:207::21"]}
---
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: c, labels: {app: c}}
spec: {interface: npy-c, addresses: [10.207.0.31, "fd01:207::31"]}
"#;

/// Compile policy YAML and registry YAML as the daemon would (this host is
/// `<prefix>-node`; endpoints without `node` are local), keeping only the
/// local endpoints' entries.
fn compile_yaml(policies: &str, registry: &str) -> Compiled {
    let pfile = std::path::Path::new("/etc/netpol.d/test.yaml");
    let rfile = std::path::Path::new("/etc/netpol/endpoints.d/test.yaml");
    let policies = netpol::api::parse_policies(pfile, policies).unwrap_or_else(|p| {
        panic!(
            "test policies do not parse: {}",
            p.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    let registry = netpol::api::parse_registry(rfile, registry).unwrap_or_else(|p| {
        panic!(
            "test registry does not parse: {}",
            p.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    let opts = CompileOptions {
        node_name: format!("{PREFIX}-node"),
        ..Default::default()
    };
    let mut c = compile(&PolicySet { policies }, &registry, &opts);
    c.retain_local_entries();
    c
}

/// Slot of the endpoint named `name` in `c`.
fn slot(c: &Compiled, name: &str) -> u32 {
    c.endpoints
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no endpoint {name}"))
        .slot
}

/// Which side denies port 22.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// `a` may open only TCP 80 on `b` (egress default deny at `a`).
    Egress,
    /// `b` admits only TCP 80 from `a`, and denies TCP 22 from everyone
    /// explicitly (ingress at `b`); `a` has no policy.
    Ingress,
}

const MODES: [Mode; 2] = [Mode::Egress, Mode::Ingress];

fn policy(mode: Mode) -> &'static str {
    match mode {
        Mode::Egress => {
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEndpoints: [{matchLabels: {app: b}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#
        }
        Mode::Ingress => {
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-ingress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: a}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  ingressDeny:
  - fromEntities: [all]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
"#
        }
    }
}

/// A policy `a`: workload a may open TCP 80 of `peer` and nothing else; then `more` rules.
fn a_may_open_port_80_of(peer: &str, more: &str) -> String {
    format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: a, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: a}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{app: {peer}}}}}]
    toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]{more}"#
    )
}

const WORKLOADS: [Workload<'static>; 3] = [
    Workload {
        name: "a",
        addrs: &["10.207.0.11/24", "fd01:207::11/64"],
    },
    Workload {
        name: "b",
        addrs: &["10.207.0.21/24", "fd01:207::21/64"],
    },
    Workload {
        name: "c",
        addrs: &["10.207.0.31/24", "fd01:207::31/64"],
    },
];

/// Three workloads a, b, c on a bridge, enforced; sniffers on a's and b's
/// (and c's) eth0, TCP listeners on b:22 and b:80 so a SYN that reaches b's
/// stack is answered. Fields drop in order: sockets, datapath, namespaces.
struct Lab {
    sniff_a: Sniffer,
    sniff_b: Sniffer,
    sniff_c: Sniffer,
    inject_a: Injector,
    inject_b: Injector,
    inject_c: Injector,
    _listeners: Listeners,
    dp: Dp,
    compiled: Compiled,
    topo: Topo,
}

impl Lab {
    fn new(tag: &str, policies: &str) -> Lab {
        Lab::with_settings(tag, policies, &settings())
    }

    fn with_settings(tag: &str, policies: &str, settings: &DatapathSettings) -> Lab {
        let topo = Topo::new(PREFIX, tag, &[], &WORKLOADS);
        let mut dp = Dp::open(PREFIX, tag, settings);
        let compiled = compile_yaml(policies, REGISTRY);
        enforce(&mut dp, &topo, &compiled);
        let (na, nb, nc) = (topo.ns("a"), topo.ns("b"), topo.ns("c"));
        Lab {
            sniff_a: Sniffer::open(&na, "eth0"),
            sniff_b: Sniffer::open(&nb, "eth0"),
            sniff_c: Sniffer::open(&nc, "eth0"),
            inject_a: Injector::open(&na, "eth0"),
            inject_b: Injector::open(&nb, "eth0"),
            inject_c: Injector::open(&nc, "eth0"),
            _listeners: Listeners::start(&nb, &[DENIED, ALLOWED]),
            dp,
            compiled,
            topo,
        }
    }

    /// Replace the policy (a new generation; conntrack stays).
    fn set_policy(&mut self, policies: &str) {
        self.compiled = compile_yaml(policies, REGISTRY);
        enforce(&mut self.dp, &self.topo, &self.compiled);
    }

    fn injector(&self, w: &str) -> &Injector {
        match w {
            "a" => &self.inject_a,
            "b" => &self.inject_b,
            _ => &self.inject_c,
        }
    }

    fn sniffer(&self, w: &str) -> &Sniffer {
        match w {
            "a" => &self.sniff_a,
            "b" => &self.sniff_b,
            _ => &self.sniff_c,
        }
    }

    /// Send an IP packet from workload `from` to `to`'s MAC, under `vlans`.
    fn send(&self, from: &str, to: &str, vlans: &[(u16, u16)], ip_packet: &[u8]) {
        let f = wire::ether(
            self.topo.mac(to),
            self.topo.mac(from),
            vlans,
            wire::ethertype_of(ip_packet),
            ip_packet,
        );
        self.injector(from).send(&f);
    }

    /// Send a SYN (sequence 1, from a fresh source port, which it returns)
    /// `src -> dst:dport` from workload `from` to `to`'s MAC, under `vlans`,
    /// carrying `m`.
    #[allow(clippy::too_many_arguments)]
    fn syn(
        &self,
        from: &str,
        to: &str,
        vlans: &[(u16, u16)],
        src: IpAddr,
        dst: IpAddr,
        dport: u16,
        m: &[u8],
    ) -> u16 {
        let sp = sport();
        let seg = wire::tcp(src, dst, sp, dport, TCP_SYN, 1, 0, m);
        self.send(from, to, vlans, &wire::ip(src, dst, 6, &seg));
        sp
    }

    /// Like `send`, with extra bytes after the IP packet (an Ethernet
    /// trailer: on the wire, not part of the datagram).
    fn send_with_trailer(&self, from: &str, to: &str, ip_packet: &[u8], trailer: &[u8]) {
        let mut f = wire::ether(
            self.topo.mac(to),
            self.topo.mac(from),
            &[],
            wire::ethertype_of(ip_packet),
            ip_packet,
        );
        f.truncate(14 + ip_packet.len());
        f.extend_from_slice(trailer);
        self.injector(from).send(&f);
    }

    /// All drops counted for endpoint `name` so far.
    fn drops(&mut self, name: &str) -> u64 {
        let s = slot(&self.compiled, name);
        let c = self.dp.dp().counters();
        c.get(&s)
            .map(|c| c.denied_policy + c.denied_default + c.denied_spoof + c.denied_other)
            .unwrap_or(0)
    }

    /// The endpoint whose policy denies port 22 in `mode`.
    fn enforcer(mode: Mode) -> &'static str {
        match mode {
            Mode::Egress => "a",
            Mode::Ingress => "b",
        }
    }

    /// Did `to`'s stack answer a SYN from `from_port` (a SYN-ACK back to it)?
    fn answered(&self, sniffer: &str, to_port: u16) -> bool {
        self.sniffer(sniffer).wait(SOON, |f| {
            matches!(wire::parse_tcp(f), Some((_, _, _, dport, fl, _)) if dport == to_port && fl & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK)
        })
    }
}

/// A batch of attempts: frames that must not arrive and frames that must.
#[derive(Default)]
struct Batch {
    denied: Vec<(String, Vec<u8>)>,
    allowed: Vec<(String, Vec<u8>)>,
}

impl Batch {
    /// Check the batch on `to`'s sniffer: every allowed marker arrives, and
    /// after `NEVER` no denied marker has.
    fn verify(&self, lab: &Lab, to: &str) {
        for (what, m) in &self.allowed {
            assert!(
                lab.sniffer(to).seen(m, SOON),
                "contrast: {what} did not arrive at {to}"
            );
        }
        std::thread::sleep(NEVER);
        let mut bypasses = Vec::new();
        for (what, m) in &self.denied {
            if lab.sniffer(to).seen(m, Duration::ZERO) {
                for f in lab
                    .sniffer(to)
                    .frames()
                    .iter()
                    .filter(|f| frames::contains(f, m))
                {
                    eprintln!("{what}: received {} bytes: {:02x?}", f.len(), f);
                }
                bypasses.push(what.as_str());
            }
        }
        assert!(
            bypasses.is_empty(),
            "BYPASS: arrived at {to}:\n  {}",
            bypasses.join("\n  ")
        );
    }
}

fn addrs(v6: bool) -> (IpAddr, IpAddr) {
    if v6 {
        (ip(A6), ip(B6))
    } else {
        (ip(A4), ip(B4))
    }
}

// ---------------------------------------------------------------------------

#[test]
fn vlan_and_qinq_tagged_frames_do_not_bypass_policy() {
    let Some(_turn) = privileged("vlan_and_qinq_tagged_frames_do_not_bypass_policy") else {
        return;
    };
    let mut lab = Lab::new("vlan", policy(Mode::Egress));
    let tag_sets: [(&str, Vec<(u16, u16)>); 6] = [
        ("802.1Q vid 10", vec![(TPID_8021Q, 10)]),
        ("802.1Q priority tag (vid 0)", vec![(TPID_8021Q, 0)]),
        (
            "QinQ 802.1ad+802.1Q",
            vec![(TPID_8021AD, 100), (TPID_8021Q, 10)],
        ),
        (
            "QinQ priority tags",
            vec![(TPID_8021AD, 0), (TPID_8021Q, 0)],
        ),
        (
            "three priority tags",
            vec![(TPID_8021Q, 0), (TPID_8021Q, 0), (TPID_8021Q, 0)],
        ),
        (
            "four tags",
            vec![
                (TPID_8021AD, 0),
                (TPID_8021Q, 0),
                (TPID_8021Q, 0),
                (TPID_8021Q, 0),
            ],
        ),
    ];
    for mode in MODES {
        lab.set_policy(policy(mode));
        let before = lab.drops("a") + lab.drops("b");
        let mut batch = Batch::default();
        let mut answered = Vec::new();
        for (name, tags) in &tag_sets {
            for v6 in [false, true] {
                let (src, dst) = addrs(v6);
                let m = marker();
                lab.syn("a", "b", tags, src, dst, DENIED, &m);
                batch
                    .denied
                    .push((format!("{mode:?}: {name} SYN to {dst}:{DENIED}"), m));
                let m = marker();
                let sp = lab.syn("a", "b", tags, src, dst, ALLOWED, &m);
                // Four tags are malformed to the datapath (three remain after
                // the kernel takes the outer one off): dropped even to port 80.
                if tags.len() < 4 {
                    batch
                        .allowed
                        .push((format!("{mode:?}: {name} SYN to {dst}:{ALLOWED}"), m));
                    if tags.iter().all(|t| t.1 == 0) {
                        answered.push((name.to_string(), sp));
                    }
                } else {
                    batch
                        .denied
                        .push((format!("{mode:?}: {name} SYN to {dst}:{ALLOWED}"), m));
                }
            }
        }
        batch.verify(&lab, "b");
        // Priority-tagged frames are real traffic: b's stack answers them.
        for (name, sp) in answered {
            assert!(
                lab.answered("a", sp),
                "{mode:?}: {name}: b's stack did not answer the allowed SYN"
            );
        }
        // Four tags are dropped as malformed at a's interface whatever the
        // policy; the rest by the enforcing side.
        let dropped = lab.drops("a") + lab.drops("b") - before;
        assert!(
            dropped >= 14,
            "{mode:?}: {dropped} drops counted for 14 denied frames"
        );
    }
}

#[test]
fn ipv4_options_do_not_hide_the_port() {
    let Some(_turn) = privileged("ipv4_options_do_not_hide_the_port") else {
        return;
    };
    let mut lab = Lab::new("ipopt", policy(Mode::Egress));
    // Record route (7), 39 bytes with room for 9 addresses: IHL 15.
    let mut rr = vec![7u8, 39, 4];
    rr.resize(39, 0);
    let option_sets: [(&str, Vec<u8>); 4] = [
        ("4 NOPs (IHL 6)", vec![1, 1, 1, 1]),
        ("40 NOPs (IHL 15)", vec![1; 40]),
        ("record route (IHL 15)", rr),
        (
            "timestamp (IHL 8)",
            vec![68, 12, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
    ];
    let (src, dst) = (wire::v4(ip(A4)), wire::v4(ip(B4)));
    for mode in MODES {
        lab.set_policy(policy(mode));
        let enforcer = Lab::enforcer(mode);
        let before = lab.drops(enforcer);
        let mut batch = Batch::default();
        let mut answered = Vec::new();
        for (name, opts) in &option_sets {
            for (port, allowed) in [(DENIED, false), (ALLOWED, true)] {
                let m = marker();
                let sp = sport();
                let seg = wire::tcp(src.into(), dst.into(), sp, port, TCP_SYN, 1, 0, &m);
                lab.send(
                    "a",
                    "b",
                    &[],
                    &wire::ipv4(src, dst, 6, 0x77, (0, false), opts, &seg),
                );
                let what = format!("{mode:?}: SYN with {name} to port {port}");
                if allowed {
                    batch.allowed.push((what, m));
                    answered.push((name.to_string(), sp));
                } else {
                    batch.denied.push((what, m));
                }
            }
        }
        batch.verify(&lab, "b");
        for (name, sp) in answered {
            assert!(
                lab.answered("a", sp),
                "{mode:?}: {name}: b's stack did not answer the allowed SYN"
            );
        }
        assert!(
            lab.drops(enforcer) - before >= 4,
            "{mode:?}: drops not counted"
        );
    }
}

#[test]
fn ipv6_extension_header_chains_do_not_hide_the_port() {
    let Some(_turn) = privileged("ipv6_extension_header_chains_do_not_hide_the_port") else {
        return;
    };
    let mut lab = Lab::new("v6ext", policy(Mode::Egress));
    let frag0 = || Ext::Fragment {
        offset: 0,
        more: false,
        id: 0x5151,
        nh: None,
    };
    let chains: Vec<(&str, Vec<Ext>, bool)> = vec![
        // (name, chain, b's stack processes it)
        ("hop-by-hop", vec![Ext::HopByHop(1)], true),
        ("destination options", vec![Ext::DestOpts(2)], true),
        (
            "routing (type 0, segments left 0)",
            vec![Ext::Routing],
            true,
        ),
        ("atomic fragment", vec![frag0()], true),
        ("AH", vec![Ext::Ah], false),
        (
            "hop-by-hop, dstopts, routing, fragment, dstopts",
            vec![
                Ext::HopByHop(1),
                Ext::DestOpts(1),
                Ext::Routing,
                frag0(),
                Ext::DestOpts(1),
            ],
            true,
        ),
        (
            "8 headers (the walk's bound)",
            vec![
                Ext::HopByHop(1),
                Ext::DestOpts(1),
                Ext::DestOpts(1),
                Ext::DestOpts(1),
                Ext::DestOpts(1),
                Ext::DestOpts(1),
                Ext::DestOpts(1),
                Ext::DestOpts(1),
            ],
            false,
        ),
    ];
    let (src, dst) = (wire::v6(ip(A6)), wire::v6(ip(B6)));
    for mode in MODES {
        lab.set_policy(policy(mode));
        let before = lab.drops("a") + lab.drops("b");
        let mut batch = Batch::default();
        let mut answered = Vec::new();
        for (name, chain, stack_ok) in &chains {
            for (port, allowed) in [(DENIED, false), (ALLOWED, true)] {
                let m = marker();
                let sp = sport();
                let seg = wire::tcp(src.into(), dst.into(), sp, port, TCP_SYN, 1, 0, &m);
                lab.send("a", "b", &[], &wire::ipv6(src, dst, chain, 6, &seg));
                let what = format!("{mode:?}: SYN behind {name} to port {port}");
                if allowed {
                    batch.allowed.push((what, m));
                    if *stack_ok {
                        answered.push((name.to_string(), sp));
                    }
                } else {
                    batch.denied.push((what, m));
                }
            }
        }
        // A chain longer than the datapath walks is dropped whatever the port.
        for port in [DENIED, ALLOWED] {
            let m = marker();
            let seg = wire::tcp(src.into(), dst.into(), sport(), port, TCP_SYN, 1, 0, &m);
            let long: Vec<Ext> = std::iter::once(Ext::HopByHop(1))
                .chain((0..8).map(|_| Ext::DestOpts(1)))
                .collect();
            lab.send("a", "b", &[], &wire::ipv6(src, dst, &long, 6, &seg));
            batch.denied.push((
                format!("{mode:?}: SYN behind 9 extension headers to port {port}"),
                m,
            ));
        }
        batch.verify(&lab, "b");
        for (name, sp) in answered {
            assert!(
                lab.answered("a", sp),
                "{mode:?}: {name}: b's stack did not answer the allowed SYN"
            );
        }
        let ev = lab.dp.dp().poll_events(10_000);
        assert!(
            ev.iter()
                .any(|e| e.verdict == EventVerdict::Denied && e.reason == EventReason::Malformed),
            "{mode:?}: the over-long chain is reported as malformed: {ev:?}"
        );
        // The over-long chains are malformed: dropped at a's interface
        // whatever the policy.
        assert!(
            lab.drops("a") + lab.drops("b") - before >= 9,
            "{mode:?}: drops not counted"
        );
    }
}

/// First fragments too short for the L4 header: IPv4 with only the first 8
/// bytes of TCP (judged by its real ports) or with none of it, and IPv6 with
/// only an extension header, the TCP header following in the second
/// fragment. Where the first fragment has no L4 header, an Ethernet trailer
/// (bytes after the datagram, which the receiver trims) pretends one for the
/// allowed port: the datapath must not read it.
#[test]
fn tiny_first_fragments_do_not_bypass_policy() {
    let Some(_turn) = privileged("tiny_first_fragments_do_not_bypass_policy") else {
        return;
    };
    let mut lab = Lab::new("tinyfrag", policy(Mode::Egress));
    for mode in MODES {
        lab.set_policy(policy(mode));
        let mut batch = Batch::default();
        let mut id = 0x3000u16 + if mode == Mode::Egress { 0 } else { 0x100 };
        // IPv4, 8 bytes of TCP in the first fragment (the ports, not the
        // flags), the rest of the header and the payload in the second.
        let (s4, d4) = (wire::v4(ip(A4)), wire::v4(ip(B4)));
        for (port, allowed) in [(DENIED, false), (ALLOWED, true)] {
            let m = marker();
            let mut payload = m.clone();
            payload.resize(32, 0);
            let seg = wire::tcp(s4.into(), d4.into(), sport(), port, TCP_SYN, 1, 0, &payload);
            id += 1;
            lab.send(
                "a",
                "b",
                &[],
                &wire::ipv4(s4, d4, 6, id, (0, true), &[], &seg[..8]),
            );
            lab.send(
                "a",
                "b",
                &[],
                &wire::ipv4(s4, d4, 6, id, (1, false), &[], &seg[8..]),
            );
            let what = format!("{mode:?}: v4 8-byte first fragment + rest, to port {port}");
            if allowed {
                batch.allowed.push((what, m));
            } else {
                batch.denied.push((what, m));
            }
        }
        // IPv4, no L4 bytes at all in the first fragment: the TCP header an
        // Ethernet trailer pretends (port 80) is not part of the datagram,
        // the receiver trims it. The rest of a SYN to :22 follows.
        {
            let (m1, m2) = (marker(), marker());
            let mut payload = m2.clone();
            payload.resize(24, 0);
            let seg = wire::tcp(
                s4.into(),
                d4.into(),
                sport(),
                DENIED,
                TCP_SYN,
                1,
                0,
                &payload,
            );
            id += 1;
            let mut fake = wire::tcp(s4.into(), d4.into(), 1, ALLOWED, TCP_SYN, 1, 0, &[]);
            fake.extend_from_slice(&m1);
            lab.send_with_trailer(
                "a",
                "b",
                &wire::ipv4(s4, d4, 6, id, (0, true), &[], &[]),
                &fake,
            );
            lab.send(
                "a",
                "b",
                &[],
                &wire::ipv4(s4, d4, 6, id, (1, false), &[], &seg[8..]),
            );
            batch.denied.push((
                format!("{mode:?}: v4 empty first fragment whose trailer claims :80"),
                m1,
            ));
            batch.denied.push((
                format!("{mode:?}: v4 second fragment after an empty first fragment"),
                m2,
            ));
        }
        // IPv6: the first fragment holds a destination-options header and
        // no TCP header; the real TCP header (port 22) comes in the second
        // fragment. An Ethernet trailer pretends a TCP header for port 80,
        // and the second fragment's next-header claims TCP so its key
        // matches the first's.
        let (s6, d6) = (wire::v6(ip(A6)), wire::v6(ip(B6)));
        for trailer in [false, true] {
            let m = marker();
            let fid = 0x7700_0000 + u32::from(id) + u32::from(trailer);
            let seg = wire::tcp(s6.into(), d6.into(), sport(), DENIED, TCP_SYN, 1, 0, &m);
            let (_, dst_opts) = wire::ext_chain(&[Ext::DestOpts(1)], 6);
            let (first_nh, first) = wire::ext_chain(
                &[Ext::Fragment {
                    offset: 0,
                    more: true,
                    id: fid,
                    nh: None,
                }],
                60,
            );
            let mut p1 = first.clone();
            p1.extend_from_slice(&dst_opts);
            let pkt1 = wire::ipv6_raw(s6, d6, first_nh, &p1);
            if trailer {
                let m1 = marker();
                let mut fake = wire::tcp(s6.into(), d6.into(), 1, ALLOWED, TCP_SYN, 1, 0, &[]);
                fake.extend_from_slice(&m1);
                lab.send_with_trailer("a", "b", &pkt1, &fake);
                batch.denied.push((
                    format!(
                        "{mode:?}: v6 first fragment without TCP header whose trailer claims :80"
                    ),
                    m1,
                ));
            } else {
                lab.send("a", "b", &[], &pkt1);
            }
            let (_, second) = wire::ext_chain(
                &[Ext::Fragment {
                    offset: 1,
                    more: false,
                    id: fid,
                    nh: Some(6),
                }],
                6,
            );
            let mut p2 = second.clone();
            p2.extend_from_slice(&seg);
            lab.send("a", "b", &[], &wire::ipv6_raw(s6, d6, 44, &p2));
            batch.denied.push((format!("{mode:?}: v6 first fragment without TCP header (trailer: {trailer}), SYN to :22 in the second"), m));
        }
        // Contrast: a properly fragmented SYN to port 80 passes, v4 and v6.
        {
            // A SYN to :80 whose 40 bytes of payload end with a fresh marker.
            let padded_syn = |src: IpAddr, dst: IpAddr| {
                let m = marker();
                let mut payload = vec![0x55; 40 - m.len()];
                payload.extend_from_slice(&m);
                let seg = wire::tcp(src, dst, sport(), ALLOWED, TCP_SYN, 1, 0, &payload);
                (m, seg)
            };
            let (m, seg) = padded_syn(s4.into(), d4.into());
            id += 1;
            lab.send(
                "a",
                "b",
                &[],
                &wire::ipv4(s4, d4, 6, id, (0, true), &[], &seg[..32]),
            );
            lab.send(
                "a",
                "b",
                &[],
                &wire::ipv4(s4, d4, 6, id, (4, false), &[], &seg[32..]),
            );
            batch.allowed.push((
                format!("{mode:?}: v4 fragmented SYN to :80 (marker in the second fragment)"),
                m[..].to_vec(),
            ));
            let (m, seg) = padded_syn(s6.into(), d6.into());
            let fid = 0x7800_0000 + u32::from(id);
            let frag6 = |offset: u16, more: bool, bytes: &[u8]| {
                let ext = Ext::Fragment {
                    offset,
                    more,
                    id: fid,
                    nh: None,
                };
                wire::ipv6(s6, d6, &[ext], 6, bytes)
            };
            lab.send("a", "b", &[], &frag6(0, true, &seg[..32]));
            lab.send("a", "b", &[], &frag6(4, false, &seg[32..]));
            batch.allowed.push((
                format!("{mode:?}: v6 fragmented SYN to :80 (marker in the second fragment)"),
                m,
            ));
        }
        batch.verify(&lab, "b");
    }
}

/// A first fragment to port 80, then a second "first" fragment (offset 0)
/// rewriting the TCP header to port 22, then the last fragment.
#[test]
fn overlapping_fragments_cannot_rewrite_the_port() {
    let Some(_turn) = privileged("overlapping_fragments_cannot_rewrite_the_port") else {
        return;
    };
    let mut lab = Lab::new("overlap", policy(Mode::Egress));
    let mut id = 0x4000u16;
    for mode in MODES {
        lab.set_policy(policy(mode));
        let enforcer = Lab::enforcer(mode);
        let before = lab.drops(enforcer);
        let mut batch = Batch::default();
        for v6 in [false, true] {
            let (src, dst) = addrs(v6);
            for rewrite_to in [DENIED, ALLOWED] {
                id += 1;
                let sp = sport();
                let (m_first, m_rewrite, m_last) = (marker(), marker(), marker());
                let body = |m: &[u8]| {
                    let mut p = m.to_vec();
                    p.resize(28, 0x66);
                    p
                };
                let good = wire::tcp(src, dst, sp, ALLOWED, TCP_SYN, 1, 0, &body(&m_first));
                let evil = wire::tcp(src, dst, sp, rewrite_to, TCP_SYN, 1, 0, &body(&m_rewrite));
                let mut last = m_last.clone();
                last.resize(16, 0x77);
                let frag = |off: u16, more: bool, bytes: &[u8]| {
                    wire::fragment(src, dst, 6, id, (off, more), bytes)
                };
                lab.send("a", "b", &[], &frag(0, true, &good[..48]));
                lab.send("a", "b", &[], &frag(0, true, &evil[..48]));
                lab.send("a", "b", &[], &frag(6, false, &last));
                let fam = if v6 { "v6" } else { "v4" };
                batch
                    .allowed
                    .push((format!("{mode:?}: {fam} first fragment to :80"), m_first));
                let what = format!("{mode:?}: {fam} overlapping offset-0 fragment rewriting the port to {rewrite_to}");
                if rewrite_to == DENIED {
                    batch.denied.push((what, m_rewrite));
                    // The last fragment then takes the rewritten ports (the
                    // fragment table keeps the latest first fragment's) and
                    // is dropped too: fail closed, no assertion either way.
                } else {
                    batch.allowed.push((what, m_rewrite));
                    batch.allowed.push((
                        format!("{mode:?}: {fam} last fragment of the :80 datagram"),
                        m_last,
                    ));
                }
            }
        }
        batch.verify(&lab, "b");
        assert!(
            lab.drops(enforcer) - before >= 2,
            "{mode:?}: drops not counted"
        );
    }
}

#[test]
fn tcp_without_syn_does_not_open_a_denied_port() {
    let Some(_turn) = privileged("tcp_without_syn_does_not_open_a_denied_port") else {
        return;
    };
    let mut lab = Lab::new("nosyn", policy(Mode::Egress));
    let shapes: [(&str, u8); 6] = [
        ("ACK", TCP_ACK),
        ("FIN", TCP_FIN),
        ("FIN+ACK", TCP_FIN | TCP_ACK),
        ("PSH+ACK with data", TCP_PSH | TCP_ACK),
        ("RST", TCP_RST),
        ("no flags", 0),
    ];
    for mode in MODES {
        lab.set_policy(policy(mode));
        let enforcer = Lab::enforcer(mode);
        let before = lab.drops(enforcer);
        let mut batch = Batch::default();
        for (name, flags) in shapes {
            for v6 in [false, true] {
                let (src, dst) = addrs(v6);
                for (port, allowed) in [(DENIED, false), (ALLOWED, true)] {
                    let m = marker();
                    lab.send(
                        "a",
                        "b",
                        &[],
                        &wire::ip(
                            src,
                            dst,
                            6,
                            &wire::tcp(src, dst, sport(), port, flags, 1000, 2000, &m),
                        ),
                    );
                    let what = format!("{mode:?}: {name} to {dst}:{port} with no flow");
                    if allowed {
                        batch.allowed.push((what, m));
                    } else {
                        batch.denied.push((what, m));
                    }
                }
            }
        }
        batch.verify(&lab, "b");
        let dropped = lab.drops(enforcer) - before;
        assert!(
            dropped >= 12,
            "{mode:?}: {dropped} drops counted for 12 denied segments"
        );
        let ev = lab.dp.dp().poll_events(10_000);
        assert!(
            ev.iter()
                .any(|e| e.verdict == EventVerdict::Denied && e.dport == DENIED && e.proto == 6),
            "{mode:?}: {ev:?}"
        );
    }
}

/// b forges a SYN-ACK "answering" a SYN that a's policy dropped: it must be
/// dropped by a's ingress policy and must not make a's later packets to b:22
/// pass as replies.
#[test]
fn forged_reply_does_not_open_the_reverse_direction() {
    let Some(_turn) = privileged("forged_reply_does_not_open_the_reverse_direction") else {
        return;
    };
    // a may open only b:80 and admits only TCP 8080.
    let pol = a_may_open_port_80_of(
        "b",
        r#"
  ingress:
  - fromEntities: [all]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#,
    );
    let mut lab = Lab::new("forged", &pol);
    let before = lab.drops("a");
    for v6 in [false, true] {
        let (a, b) = addrs(v6);
        for (port, allowed) in [(DENIED, false), (ALLOWED, true)] {
            let sp = sport();
            let (m_syn, m_synack, m_ack) = (marker(), marker(), marker());
            // 1. a's SYN.
            lab.send(
                "a",
                "b",
                &[],
                &wire::ip(a, b, 6, &wire::tcp(a, b, sp, port, TCP_SYN, 100, 0, &m_syn)),
            );
            assert_eq!(
                lab.sniff_b.seen(&m_syn, if allowed { SOON } else { NEVER }),
                allowed,
                "{a} SYN to :{port}"
            );
            // 2. b's (forged, for :22) SYN-ACK.
            lab.send(
                "b",
                "a",
                &[],
                &wire::ip(
                    b,
                    a,
                    6,
                    &wire::tcp(b, a, port, sp, TCP_SYN | TCP_ACK, 500, 101, &m_synack),
                ),
            );
            assert_eq!(
                lab.sniff_a
                    .seen(&m_synack, if allowed { SOON } else { NEVER }),
                allowed,
                "{b}:{port} SYN-ACK to a ({})",
                if allowed {
                    "a reply"
                } else {
                    "forged: a never got to send the SYN"
                }
            );
            // 3. a's ACK with data, "continuing" the connection.
            lab.send(
                "a",
                "b",
                &[],
                &wire::ip(
                    a,
                    b,
                    6,
                    &wire::tcp(a, b, sp, port, TCP_ACK | TCP_PSH, 101, 501, &m_ack),
                ),
            );
            assert_eq!(
                lab.sniff_b.seen(&m_ack, if allowed { SOON } else { NEVER }),
                allowed,
                "{a} ACK to :{port} after the SYN-ACK"
            );
        }
    }
    assert!(lab.drops("a") - before >= 6, "a counted the drops");
    // The forged SYN-ACKs were judged by a's ingress policy (default deny).
    let ev = lab.dp.dp().poll_events(10_000);
    assert!(
        ev.iter().any(|e| e.direction == Direction::Ingress
            && e.sport == DENIED
            && e.reason == EventReason::DefaultDeny),
        "{ev:?}"
    );
}

/// a sends with c's address (and an unregistered one) to b, whose policy
/// admits c: dropped at a's own interface; c itself gets through.
#[test]
fn spoofed_source_address_is_dropped_at_the_senders_interface() {
    let Some(_turn) = privileged("spoofed_source_address_is_dropped_at_the_senders_interface")
    else {
        return;
    };
    let pol = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: c}}]
"#;
    let mut lab = Lab::new("spoof", pol);
    let before = lab
        .dp
        .dp()
        .counters()
        .get(&slot(&lab.compiled, "a"))
        .map(|c| c.denied_spoof)
        .unwrap_or(0);
    let mut batch = Batch::default();
    for v6 in [false, true] {
        let (c, b) = if v6 {
            (ip(C6), ip(B6))
        } else {
            (ip(C4), ip(B4))
        };
        let other: IpAddr = if v6 {
            ip("fd01:207::99")
        } else {
            ip("10.207.0.99")
        };
        for (name, vlans) in [
            ("untagged", vec![]),
            ("802.1Q priority tag", vec![(TPID_8021Q, 0)]),
        ] {
            let m = marker();
            lab.syn("a", "b", &vlans, c, b, ALLOWED, &m);
            batch
                .denied
                .push((format!("{name} SYN from a with c's address {c}"), m));
            let m = marker();
            lab.send(
                "a",
                "b",
                &vlans,
                &wire::ip(c, b, 17, &wire::udp(c, b, sport(), 53, &m)),
            );
            batch
                .denied
                .push((format!("{name} UDP from a with c's address {c}"), m));
        }
        let m = marker();
        lab.syn("a", "b", &[], other, b, ALLOWED, &m);
        batch.denied.push((
            format!("SYN from a with the unregistered address {other}"),
            m,
        ));
        // Contrast: the very same frame from c passes.
        let m = marker();
        lab.syn("c", "b", &[], c, b, ALLOWED, &m);
        batch.allowed.push((format!("SYN from c itself ({c})"), m));
    }
    batch.verify(&lab, "b");
    let after = lab.dp.dp().counters()[&slot(&lab.compiled, "a")].denied_spoof;
    assert!(
        after - before >= 10,
        "a counted {} spoofed frames",
        after - before
    );
    let ev = lab.dp.dp().poll_events(10_000);
    assert!(
        ev.iter()
            .any(|e| e.reason == EventReason::Spoofed && e.src == ip(C4)),
        "{ev:?}"
    );
}

/// An ICMP error is "related" to the flow it quotes, but only on its way to
/// that flow's peer: a workload must not use a tracked flow's tuple to get
/// ICMP errors (with any payload) to a destination its policy denies.
#[test]
fn icmp_error_quoting_a_tracked_flow_reaches_only_that_flows_peer() {
    let Some(_turn) = privileged("icmp_error_quoting_a_tracked_flow_reaches_only_that_flows_peer")
    else {
        return;
    };
    // a may open only c:80; nothing at all to b.
    let lab = Lab::new("icmperr", &a_may_open_port_80_of("c", ""));
    let mut batch_b = Batch::default();
    let mut batch_c = Batch::default();
    for v6 in [false, true] {
        let (a, b, c) = if v6 {
            (ip(A6), ip(B6), ip(C6))
        } else {
            (ip(A4), ip(B4), ip(C4))
        };
        // An allowed flow a -> c:80 (tracked at a's interface).
        let sp = sport();
        let m = marker();
        lab.send(
            "a",
            "c",
            &[],
            &wire::ip(a, c, 6, &wire::tcp(a, c, sp, ALLOWED, TCP_SYN, 1, 0, &m)),
        );
        assert!(lab.sniff_c.seen(&m, SOON), "the allowed flow to c");
        // "c's reply", as an ICMP error would quote it: c:80 -> a:sp.
        let quoted = wire::ip(
            c,
            a,
            6,
            &wire::tcp(c, a, ALLOWED, sp, TCP_SYN | TCP_ACK, 7, 2, &[]),
        );
        let (ty, code, proto) = if v6 { (1u8, 4u8, 58u8) } else { (3, 3, 1) };
        let error = |dst: IpAddr, m: &[u8]| {
            let mut body = quoted[..if v6 { 48 } else { 28 }].to_vec();
            body.extend_from_slice(m);
            wire::ip(a, dst, proto, &wire::icmp(a, dst, ty, code, [0; 4], &body))
        };
        let m = marker();
        lab.send("a", "b", &[], &error(b, &m));
        batch_b.denied.push((
            format!("ICMP error from a to {b} quoting a's flow with c"),
            m,
        ));
        // Contrast: to c, the peer of the quoted flow, it is related.
        let m = marker();
        lab.send("a", "c", &[], &error(c, &m));
        batch_c.allowed.push((
            format!("ICMP error from a to {c} quoting a's flow with c"),
            m,
        ));
    }
    batch_c.verify(&lab, "c");
    batch_b.verify(&lab, "b");
}

/// The node's bridge as a host endpoint (10.207.0.1, fd01:207::1).
const HOST_REGISTRY: &str = r#"
apiVersion: netpol/v1
kind: HostEndpoint
metadata: {name: node, labels: {role: node}}
spec: {interface: npybr, addresses: [10.207.0.1, "fd01:207::1"]}
"#;

/// The host denies everything, both ways.
const HOST_LOCKDOWN: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host-lockdown}
spec:
  nodeSelector: {matchLabels: {role: node}}
  ingressDeny:
  - fromEntities: [all]
  egressDeny:
  - toEntities: [all]
"#;

/// A node whose bridge is addressed, and one client workload `cl` on it.
fn host_topo(tag: &str) -> Topo {
    Topo::new(
        PREFIX,
        tag,
        &["10.207.0.1/24", "fd01:207::1/64"],
        &[Workload {
            name: "cl",
            addrs: &["10.207.0.50/24", "fd01:207::50/64"],
        }],
    )
}

/// The documented failsafe defaults: in TCP 22, UDP 68; out UDP 53, UDP 67, TCP 53.
fn failsafe_defaults() -> Vec<(Direction, u8, u16)> {
    use Direction::{Egress, Ingress};
    vec![
        (Ingress, 6, 22),
        (Ingress, 17, 68),
        (Egress, 17, 53),
        (Egress, 17, 67),
        (Egress, 6, 53),
    ]
}

/// A datapath with these failsafe ports.
fn failsafe_dp(tag: &str, failsafe: Vec<(Direction, u8, u16)>) -> Dp {
    Dp::open(
        PREFIX,
        tag,
        &DatapathSettings {
            failsafe,
            ..settings()
        },
    )
}

/// Host endpoints: the failsafe ports pass whatever the host policy says;
/// with the failsafe list emptied they do not.
#[test]
fn host_failsafe_lets_ssh_through_a_deny_all_host_policy_and_an_empty_list_does_not() {
    let Some(_turn) = privileged(
        "host_failsafe_lets_ssh_through_a_deny_all_host_policy_and_an_empty_list_does_not",
    ) else {
        return;
    };
    let topo = host_topo("failsafe");
    let _listeners = Listeners::start(&topo.node, &[22, 2222]);
    let cl = topo.ns("cl");
    let node4 = ip("10.207.0.1");
    let node6 = ip("fd01:207::1");
    assert!(connects(&cl, node4, 22, SOON), "before enforcement");
    let compiled = compile_yaml(HOST_LOCKDOWN, HOST_REGISTRY);
    {
        let mut dp = failsafe_dp("failsafe", failsafe_defaults());
        enforce(&mut dp, &topo, &compiled);
        for node in [node4, node6] {
            assert!(
                connects(&cl, node, 22, SOON),
                "ssh to {node} through the failsafe"
            );
            assert!(
                !connects(&cl, node, 2222, NEVER),
                "{node}:2222 is denied by the host policy"
            );
        }
        let c = dp.dp().counters()[&slot(&compiled, "node")].clone();
        assert!(c.denied_policy >= 2, "{c:?}");
    }
    {
        let mut dp = failsafe_dp("nofailsafe", vec![]);
        enforce(&mut dp, &topo, &compiled);
        for node in [node4, node6] {
            assert!(
                !connects(&cl, node, 22, NEVER),
                "ssh to {node} with no failsafe ports"
            );
        }
        let ev = dp.dp().poll_events(1000);
        assert!(
            ev.iter().any(|e| e.verdict == EventVerdict::Denied
                && e.dport == 22
                && e.reason == EventReason::PolicyDeny),
            "{ev:?}"
        );
    }
}

/// What passes on purpose, measured rather than assumed: ICMPv4
/// "fragmentation needed" (Cilium's allow-icmp-frag-needed) and ICMPv6
/// neighbour discovery pass whatever the policy, so a workload can reach a
/// denied destination with those messages (a narrow covert channel to that
/// host's kernel or raw sockets). They create no conntrack entry and open
/// nothing: the denied port stays closed after them.
#[test]
fn frag_needed_and_neighbour_discovery_pass_by_design_and_open_nothing() {
    let Some(_turn) =
        privileged("frag_needed_and_neighbour_discovery_pass_by_design_and_open_nothing")
    else {
        return;
    };
    let lab = Lab::new("bydesign", policy(Mode::Egress));
    let mut batch = Batch::default();
    let sp = sport();
    // Frag-needed "about" a flow b:22 -> a:sp, then a's SYN on that very tuple.
    for v6 in [false, true] {
        let (a, b) = addrs(v6);
        let quoted = wire::ip(
            b,
            a,
            6,
            &wire::tcp(b, a, DENIED, sp, TCP_SYN | TCP_ACK, 7, 2, &[]),
        );
        let m = marker();
        let mut body = quoted[..if v6 { 48 } else { 28 }].to_vec();
        body.extend_from_slice(&m);
        if v6 {
            // A neighbour solicitation carrying extra bytes.
            let mut ns = wire::v6(b).octets().to_vec();
            ns.extend_from_slice(&m);
            let mut pkt = wire::ip(a, b, 58, &wire::icmp(a, b, 135, 0, [0; 4], &ns));
            pkt[7] = 255; // ND hop limit
            lab.send("a", "b", &[], &pkt);
            batch
                .allowed
                .push(("ICMPv6 neighbour solicitation from a to b".into(), m));
        } else {
            lab.send(
                "a",
                "b",
                &[],
                &wire::ip(a, b, 1, &wire::icmp(a, b, 3, 4, [0, 0, 5, 0xdc], &body)),
            );
            batch
                .allowed
                .push(("ICMPv4 fragmentation-needed from a to b".into(), m));
        }
        let m = marker();
        lab.send(
            "a",
            "b",
            &[],
            &wire::ip(a, b, 6, &wire::tcp(a, b, sp, DENIED, TCP_SYN, 1, 0, &m)),
        );
        batch
            .denied
            .push((format!("SYN to {b}:{DENIED} after the ICMP message"), m));
    }
    batch.verify(&lab, "b");
}

/// The failsafe opens exactly (direction, protocol, destination port):
/// source-port tricks, the other protocol or direction of a failsafe entry,
/// tags, fragments and extension headers do not reach another port of a
/// locked-down host. Detection is the host's own IP stack (raw sockets see
/// every TCP segment delivered locally, after reassembly).
#[test]
fn host_failsafe_cannot_be_abused_to_reach_other_host_ports() {
    let Some(_turn) = privileged("host_failsafe_cannot_be_abused_to_reach_other_host_ports") else {
        return;
    };
    let topo = host_topo("fsabuse");
    let _listeners = Listeners::start(&topo.node, &[22, 2222, 68, 53]);
    let compiled = compile_yaml(HOST_LOCKDOWN, HOST_REGISTRY);
    let mut dp = failsafe_dp("fsabuse", failsafe_defaults());
    enforce(&mut dp, &topo, &compiled);
    let stack = Sniffer::stack(&topo.node, libc::IPPROTO_TCP);
    let inject = Injector::open(&topo.ns("cl"), "eth0");
    let cl_mac = topo.mac("cl");
    let send = |vlans: &[(u16, u16)], pkt: &[u8]| {
        inject.send(&wire::ether(
            NODE_MAC,
            cl_mac,
            vlans,
            wire::ethertype_of(pkt),
            pkt,
        ))
    };
    let mut denied: Vec<(String, Vec<u8>)> = Vec::new();
    let mut allowed: Vec<(String, Vec<u8>)> = Vec::new();
    let mut id = 0x6000u16;
    for v6 in [false, true] {
        let (c, n): (IpAddr, IpAddr) = if v6 {
            (ip("fd01:207::50"), ip("fd01:207::1"))
        } else {
            (ip("10.207.0.50"), ip("10.207.0.1"))
        };
        let syn = |sp: u16, dp: u16, flags: u8, m: &[u8]| wire::tcp(c, n, sp, dp, flags, 1, 0, m);
        // (name, tags, source port, destination port, flags, reaches the stack)
        type Case = (&'static str, Vec<(u16, u16)>, u16, u16, u8, bool);
        let cases: [Case; 11] = [
            ("SYN to :22 (failsafe)", vec![], sport(), 22, TCP_SYN, true),
            (
                "priority-tagged SYN to :22",
                vec![(TPID_8021Q, 0)],
                sport(),
                22,
                TCP_SYN,
                true,
            ),
            ("SYN to :2222", vec![], sport(), 2222, TCP_SYN, false),
            (
                "SYN from source port 22 to :2222",
                vec![],
                22,
                2222,
                TCP_SYN,
                false,
            ),
            (
                "SYN from source port 53 to :2222",
                vec![],
                53,
                2222,
                TCP_SYN,
                false,
            ),
            (
                "SYN from source port 68 to :2222",
                vec![],
                68,
                2222,
                TCP_SYN,
                false,
            ),
            (
                "TCP SYN to :68 (the failsafe is UDP 68)",
                vec![],
                sport(),
                68,
                TCP_SYN,
                false,
            ),
            (
                "TCP SYN to :53 inbound (the failsafe is outbound)",
                vec![],
                sport(),
                53,
                TCP_SYN,
                false,
            ),
            (
                "priority-tagged SYN to :2222",
                vec![(TPID_8021Q, 0)],
                sport(),
                2222,
                TCP_SYN,
                false,
            ),
            (
                "QinQ priority-tagged SYN to :2222",
                vec![(TPID_8021AD, 0), (TPID_8021Q, 0)],
                sport(),
                2222,
                TCP_SYN,
                false,
            ),
            ("ACK to :2222", vec![], sport(), 2222, TCP_ACK, false),
        ];
        for (name, tags, sp, dport, flags, reaches) in cases {
            let m = marker();
            send(&tags, &wire::ip(c, n, 6, &syn(sp, dport, flags, &m)));
            let what = format!("{n}: {name}");
            if reaches {
                allowed.push((what, m));
            } else {
                denied.push((what, m));
            }
        }
        // Fragmented SYNs: the ports first, the rest (with the marker) after.
        for (dport, reaches) in [(22u16, true), (2222, false)] {
            let m = marker();
            let mut payload = vec![0x44; 32 - m.len()];
            payload.extend_from_slice(&m);
            let seg = syn(sport(), dport, TCP_SYN, &payload);
            id += 1;
            let frag = |off: u16, more: bool, bytes: &[u8]| {
                wire::fragment(c, n, 6, id, (off, more), bytes)
            };
            // IPv6 receivers discard a first fragment without the whole
            // upper-layer header (RFC 8200 section 4.5): 24 bytes there.
            let cut = if v6 { 24 } else { 8 };
            send(&[], &frag(0, true, &seg[..cut]));
            send(&[], &frag(cut as u16 / 8, false, &seg[cut..]));
            let what = format!("{n}: fragmented SYN to :{dport}");
            if reaches {
                allowed.push((what, m));
            } else {
                denied.push((what, m));
            }
        }
        if v6 {
            for (dport, reaches) in [(22u16, true), (2222, false)] {
                let m = marker();
                let chain = [Ext::HopByHop(1), Ext::DestOpts(2)];
                send(
                    &[],
                    &wire::ipv6(
                        wire::v6(c),
                        wire::v6(n),
                        &chain,
                        6,
                        &syn(sport(), dport, TCP_SYN, &m),
                    ),
                );
                let what = format!("{n}: SYN behind hop-by-hop + destination options to :{dport}");
                if reaches {
                    allowed.push((what, m));
                } else {
                    denied.push((what, m));
                }
            }
        }
    }
    for (what, m) in &allowed {
        assert!(
            stack.seen(m, SOON),
            "contrast: {what} did not reach the host's stack"
        );
    }
    std::thread::sleep(NEVER);
    let bypasses: Vec<&str> = denied
        .iter()
        .filter(|(_, m)| stack.seen(m, Duration::ZERO))
        .map(|(w, _)| w.as_str())
        .collect();
    assert!(
        bypasses.is_empty(),
        "BYPASS: reached the host's stack:\n  {}",
        bypasses.join("\n  ")
    );
    let c = dp.dp().counters()[&slot(&compiled, "node")].clone();
    assert!(
        c.denied_policy as usize >= denied.len(),
        "{} denied attempts, counters {c:?}",
        denied.len()
    );
}

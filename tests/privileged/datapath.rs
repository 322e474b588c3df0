//! Privileged datapath tests (root, a real kernel): BPF_PROG_TEST_RUN unit
//! tests named after behaviour, and end-to-end tests with network namespaces,
//! veth pairs and real sockets. Without root they skip with a message; under
//! CI=true they fail instead.
//!
//! Everything created here uses the prefix `npd`: netns `npd-<pid>-<test>-*`,
//! links `npd...`, addresses 10.201.0.0/16 and fd01:201::/64, pins under
//! /sys/fs/bpf/npd-test-*; guards remove them also on failure.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use netpol::api::model::EndpointKind;
use netpol::datapath::generation::Contents;
use netpol::datapath::packet::{PacketSpec, L4, TCP_ACK, TCP_SYN};
use netpol::datapath::{
    Attachment, Datapath, DatapathError, DatapathSettings, EventReason, EventVerdict, Hook,
    KernelDatapath, Stage,
};
use netpol::policy::types::{
    Compiled, CompiledEndpoint, Direction, EntryVerdict, IpcacheEntry, PolicyEntry,
};

// ---------------------------------------------------------------------------
// Harness

use crate::harness::cmd;
use crate::harness::dp::{
    apply_and_attach, attachments, entry, inner_map, ipcache_of_endpoints, push_world, settings, Dp,
};
use crate::harness::netns::in_ns;
use crate::harness::privileged;
use crate::harness::topo::{Topo, Workload};

/// Prefix of every name this file creates (pins, namespaces, links).
const PREFIX: &str = "npd";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const ID_A: u32 = 1000;
const ID_B: u32 = 1001;
const ID_C: u32 = 1002;
const A4: &str = "10.201.0.11";
const B4: &str = "10.201.0.21";
const C4: &str = "10.201.0.31";
const WORLD4: &str = "10.202.7.7";
const A6: &str = "fd01:201::11";
const B6: &str = "fd01:201::21";

fn endpoint(slot: u32, name: &str, identity: u32, addrs: &[&str]) -> CompiledEndpoint {
    CompiledEndpoint {
        slot,
        name: name.into(),
        namespace: Some("default".into()),
        kind: EndpointKind::Workload,
        identity,
        local: true,
        interface: None,
        addresses: addrs.iter().map(|a| ip(a)).collect(),
        default_deny_ingress: false,
        default_deny_egress: false,
        enforced_ingress: false,
        enforced_egress: false,
        audit: false,
    }
}

/// Three workloads a (slot 0), b (slot 1), c (slot 2); `a` is the one the
/// test runs judge (attached at ifindex 1, the device of BPF_PROG_TEST_RUN).
fn base() -> Compiled {
    let mut c = Compiled::default();
    c.endpoints.push(endpoint(0, "a", ID_A, &[A4, A6]));
    c.endpoints.push(endpoint(1, "b", ID_B, &[B4, B6]));
    c.endpoints.push(endpoint(2, "c", ID_C, &[C4]));
    ipcache_of_endpoints(&mut c);
    c.ipcache.sort();
    c
}

fn allow(dir: Direction, identity: u32, proto: u8, port: u16, rule: u32) -> PolicyEntry {
    entry(
        dir,
        identity,
        proto,
        port,
        if proto == 0 { 0 } else { 16 },
        Allow,
        rule,
    )
}

const A_ON_LO: [Attachment; 1] = [Attachment {
    slot: 0,
    ifindex: 1,
}];

fn apply(dp: &mut Dp, mut c: Compiled) -> u64 {
    c.entries.sort();
    dp.dp().apply(&c, &A_ON_LO).expect("apply")
}

use Direction::{Egress, Ingress};
use EntryVerdict::{Allow, Deny};
// Hook::Ingress on a's device = packets leaving a (a's egress policy);
// Hook::Egress = packets to a (a's ingress policy).
const FROM_A: Hook = Hook::Ingress;
const TO_A: Hook = Hook::Egress;

// ---------------------------------------------------------------------------
// BPF_PROG_TEST_RUN: behaviour of one packet

#[test]
fn deny_wins_over_a_narrower_allow() {
    let Some(_turn) = privileged("deny_wins_over_a_narrower_allow") else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "denywins", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    // Allow b on TCP 80 exactly; deny any identity on all of TCP.
    c.entries.push(allow(Egress, ID_B, 6, 80, 0));
    c.entries.push(entry(Egress, 0, 6, 0, 0, Deny, 1));
    // Allow c on all of UDP, deny c on UDP 53: the L1 deny wins on 53.
    c.entries.push(entry(Egress, ID_C, 17, 0, 0, Allow, 2));
    c.entries.push(entry(Egress, ID_C, 17, 53, 16, Deny, 3));
    apply(&mut dp, c);
    assert!(
        !dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40000, 80, TCP_SYN)),
        "L2 deny beats L1 allow"
    );
    assert!(
        !dp.run(FROM_A, &PacketSpec::udp(ip(A4), ip(C4), 40000, 53)),
        "L1 deny on the exact port"
    );
    assert!(
        dp.run(FROM_A, &PacketSpec::udp(ip(A4), ip(C4), 40000, 54)),
        "L1 allow on other UDP ports"
    );
    let ev = dp.dp().poll_events(100);
    let denies: Vec<_> = ev
        .iter()
        .filter(|e| e.verdict == EventVerdict::Denied)
        .collect();
    assert_eq!(denies.len(), 2, "{ev:?}");
    assert_eq!(denies[0].reason, EventReason::PolicyDeny);
    assert_eq!(
        denies[0].rule,
        Some(1),
        "L2's rule reported when only L2 denied"
    );
    assert_eq!(denies[1].rule, Some(3), "L1's rule reported when L1 denied");
    assert_eq!(denies[0].dst_identity, ID_B);
    assert_eq!(denies[0].src_identity, ID_A);
    assert_eq!(denies[0].direction, Egress);
}

#[test]
fn reply_passes_without_a_rule() {
    let Some(_turn) = privileged("reply_passes_without_a_rule") else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "reply", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    c.endpoints[0].default_deny_ingress = true;
    c.entries.push(allow(Egress, ID_B, 6, 80, 0));
    apply(&mut dp, c);
    // Replies before the flow exists are new flows and denied.
    assert!(!dp.run(
        TO_A,
        &PacketSpec::tcp(ip(B4), ip(A4), 80, 40000, TCP_SYN | TCP_ACK)
    ));
    assert!(dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40000, 80, TCP_SYN)));
    assert!(
        dp.run(
            TO_A,
            &PacketSpec::tcp(ip(B4), ip(A4), 80, 40000, TCP_SYN | TCP_ACK)
        ),
        "reply passes"
    );
    assert!(
        dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40000, 80, TCP_ACK)),
        "established passes"
    );
    // Not the reply tuple: a new flow from b to a is still denied.
    assert!(!dp.run(TO_A, &PacketSpec::tcp(ip(B4), ip(A4), 81, 40000, TCP_ACK)));
    assert!(!dp.run(TO_A, &PacketSpec::tcp(ip(B4), ip(A4), 80, 40001, TCP_ACK)));
    // A TCP non-SYN packet without an entry is judged like a new flow.
    assert!(!dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40002, 81, TCP_ACK)));
    assert!(dp.dp().conntrack_len() >= 1);
}

#[test]
fn related_icmp_error_passes_and_unrelated_does_not() {
    let Some(_turn) = privileged("related_icmp_error_passes_and_unrelated_does_not") else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "related", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    c.endpoints[0].default_deny_ingress = true;
    c.entries.push(allow(Egress, ID_B, 17, 53, 0));
    apply(&mut dp, c);
    let flow = PacketSpec::udp(ip(A4), ip(B4), 40000, 53);
    let unreach = |inner: PacketSpec| {
        PacketSpec::new(
            ip(B4),
            ip(A4),
            L4::IcmpError {
                ty: 3,
                code: 3,
                inner: Box::new(inner),
            },
        )
    };
    assert!(
        !dp.run(TO_A, &unreach(flow.clone())),
        "no flow yet: unrelated"
    );
    assert!(dp.run(FROM_A, &flow));
    assert!(
        dp.run(TO_A, &unreach(flow.clone())),
        "port unreachable about the flow"
    );
    let other = PacketSpec::udp(ip(A4), ip(B4), 40001, 53);
    assert!(!dp.run(TO_A, &unreach(other)), "about another flow");
    // Fragmentation needed always passes.
    let fragneeded = PacketSpec::new(
        ip(WORLD4),
        ip(A4),
        L4::IcmpError {
            ty: 3,
            code: 4,
            inner: Box::new(PacketSpec::udp(ip(A4), ip(WORLD4), 1, 2)),
        },
    );
    assert!(dp.run(TO_A, &fragneeded));
    // IPv6 packet too big about an allowed v6 flow.
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    c.endpoints[0].default_deny_ingress = true;
    c.entries.push(allow(Egress, ID_B, 6, 443, 0));
    apply(&mut dp, c);
    let flow6 = PacketSpec::tcp(ip(A6), ip(B6), 40000, 443, TCP_SYN);
    assert!(dp.run(FROM_A, &flow6));
    let ptb = PacketSpec::new(
        ip(B6),
        ip(A6),
        L4::IcmpError {
            ty: 2,
            code: 0,
            inner: Box::new(flow6),
        },
    );
    assert!(dp.run(TO_A, &ptb));
}

#[test]
fn non_first_fragment_does_not_bypass_a_port_rule() {
    let Some(_turn) = privileged("non_first_fragment_does_not_bypass_a_port_rule") else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "frag", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_ingress = true;
    c.entries.push(allow(Ingress, ID_B, 17, 53, 0));
    apply(&mut dp, c);
    for (src, dst) in [(B4, A4), (B6, A6)] {
        // Denied port: the first fragment is dropped and so are the rest.
        let mut first = PacketSpec::udp(ip(src), ip(dst), 5000, 9999);
        first.fragment = Some((0, true));
        first.frag_id = 77;
        let mut later = first.clone();
        later.fragment = Some((185, false));
        // The bytes where a header would be claim port 53: must not matter.
        later.l4 = L4::Udp {
            sport: 5000,
            dport: 53,
        };
        assert!(
            !dp.run(TO_A, &first),
            "{src}: first fragment to a denied port"
        );
        assert!(!dp.run(TO_A, &later), "{src}: its later fragment");
        // A later fragment of an unknown datagram is dropped.
        let mut orphan = later.clone();
        orphan.frag_id = 78;
        assert!(!dp.run(TO_A, &orphan), "{src}: orphan fragment");
        // Allowed port: all fragments pass.
        let mut ok_first = PacketSpec::udp(ip(src), ip(dst), 5001, 53);
        ok_first.fragment = Some((0, true));
        ok_first.frag_id = 79;
        let mut ok_later = ok_first.clone();
        ok_later.fragment = Some((185, false));
        assert!(dp.run(TO_A, &ok_first), "{src}: first fragment to 53");
        assert!(dp.run(TO_A, &ok_later), "{src}: its later fragment");
    }
    let ev = dp.dp().poll_events(100);
    assert!(
        ev.iter().any(|e| e.reason == EventReason::Fragment),
        "{ev:?}"
    );
}

#[test]
fn vlan_tagged_frame_does_not_bypass() {
    let Some(_turn) = privileged("vlan_tagged_frame_does_not_bypass") else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "vlan", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    c.entries.push(allow(Egress, ID_B, 6, 80, 0));
    apply(&mut dp, c);
    for tags in [
        vec![(0x8100, 10)],
        vec![(0x88a8, 10), (0x8100, 20)],
        vec![(0x8100, 1), (0x8100, 2), (0x8100, 3)],
    ] {
        let mut denied = PacketSpec::tcp(ip(A4), ip(B4), 40000, 22, TCP_SYN);
        denied.vlans = tags.clone();
        assert!(!dp.run(FROM_A, &denied), "tags {tags:?}: denied port");
        let mut allowed = PacketSpec::tcp(ip(A4), ip(B4), 40001, 80, TCP_SYN);
        allowed.vlans = tags.clone();
        // Up to two tags are parsed through; a third tag is dropped outright.
        assert_eq!(
            dp.run(FROM_A, &allowed),
            tags.len() <= 2,
            "tags {tags:?}: allowed port"
        );
    }
}

#[test]
fn ipv6_extension_headers_do_not_hide_the_port() {
    let Some(_turn) = privileged("ipv6_extension_headers_do_not_hide_the_port") else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "v6ext", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    c.entries.push(allow(Egress, ID_B, 6, 443, 0));
    apply(&mut dp, c);
    for chain in [
        vec![],
        vec![0],
        vec![0, 60, 43],
        vec![51],
        vec![0, 43, 60, 51],
    ] {
        let mut denied = PacketSpec::tcp(ip(A6), ip(B6), 40000, 22, TCP_SYN);
        denied.ext_headers = chain.clone();
        assert!(!dp.run(FROM_A, &denied), "chain {chain:?}: port 22");
        let mut allowed = PacketSpec::tcp(ip(A6), ip(B6), 40000, 443, TCP_SYN);
        allowed.ext_headers = chain.clone();
        assert!(dp.run(FROM_A, &allowed), "chain {chain:?}: port 443");
    }
    // Longer chains than the datapath walks are dropped, never passed.
    let mut long = PacketSpec::tcp(ip(A6), ip(B6), 40000, 443, TCP_SYN);
    long.ext_headers = vec![60; 9];
    assert!(!dp.run(FROM_A, &long));
    // IPv4 options are skipped.
    let mut opt = PacketSpec::tcp(ip(A4), ip(B4), 40000, 22, TCP_SYN);
    opt.ipv4_options = 12;
    assert!(!dp.run(FROM_A, &opt));
}

#[test]
fn icmp_types_are_the_port_and_neighbour_discovery_passes() {
    let Some(_turn) = privileged("icmp_types_are_the_port_and_neighbour_discovery_passes") else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "icmp", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    c.endpoints[0].default_deny_ingress = true;
    c.entries.push(allow(Egress, ID_B, 1, 8, 0));
    c.entries.push(allow(Egress, ID_B, 58, 128, 1));
    apply(&mut dp, c);
    assert!(
        dp.run(FROM_A, &PacketSpec::icmp(ip(A4), ip(B4), 8, 0, 4242)),
        "echo request allowed"
    );
    assert!(
        dp.run(TO_A, &PacketSpec::icmp(ip(B4), ip(A4), 0, 0, 4242)),
        "echo reply passes via conntrack"
    );
    assert!(
        !dp.run(TO_A, &PacketSpec::icmp(ip(B4), ip(A4), 0, 0, 4243)),
        "unsolicited echo reply"
    );
    assert!(
        !dp.run(FROM_A, &PacketSpec::icmp(ip(A4), ip(B4), 13, 0, 1)),
        "timestamp not allowed"
    );
    assert!(
        dp.run(FROM_A, &PacketSpec::icmp(ip(A6), ip(B6), 128, 0, 9)),
        "v6 echo request"
    );
    assert!(
        dp.run(TO_A, &PacketSpec::icmp(ip(B6), ip(A6), 129, 0, 9)),
        "v6 echo reply"
    );
    for ty in 133..=137u8 {
        assert!(
            dp.run(TO_A, &PacketSpec::icmp(ip("fe80::1"), ip(A6), ty, 0, 0)),
            "ND type {ty} in"
        );
        assert!(
            dp.run(
                FROM_A,
                &PacketSpec::icmp(ip("fe80::2"), ip("ff02::1"), ty, 0, 0)
            ),
            "ND type {ty} out"
        );
    }
    assert!(
        !dp.run(TO_A, &PacketSpec::icmp(ip(B6), ip(A6), 138, 0, 0)),
        "router renumbering is not ND"
    );
}

#[test]
fn multicast_listener_reports_to_link_scoped_groups_are_not_spoofing() {
    let Some(_turn) =
        privileged("multicast_listener_reports_to_link_scoped_groups_are_not_spoofing")
    else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "mld", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    apply(&mut dp, c);
    for ty in [130u8, 131, 132, 143] {
        assert!(
            dp.run(
                FROM_A,
                &PacketSpec::icmp(ip("fe80::2"), ip("ff02::16"), ty, 0, 0)
            ),
            "MLD type {ty}"
        );
        assert!(
            dp.run(
                FROM_A,
                &PacketSpec::icmp(ip("::"), ip("ff02::16"), ty, 0, 0)
            ),
            "MLD type {ty} from ::"
        );
    }
    // Only to link-scoped groups, and only MLD passes before policy: the same
    // link-local source elsewhere impersonates nobody and meets a's policy
    // (default deny egress here).
    assert!(
        !dp.run(
            FROM_A,
            &PacketSpec::icmp(ip("fe80::2"), ip("ff05::16"), 143, 0, 0)
        ),
        "site-scoped group"
    );
    assert!(
        !dp.run(FROM_A, &PacketSpec::icmp(ip("fe80::2"), ip(B6), 143, 0, 0)),
        "unicast"
    );
    assert!(
        !dp.run(
            FROM_A,
            &PacketSpec::udp(ip("fe80::2"), ip("ff02::16"), 1, 2)
        ),
        "not ICMPv6"
    );
    let counters = dp.dp().counters();
    assert_eq!(counters[&0].denied_spoof, 0, "{counters:?}");
    assert_eq!(counters[&0].denied_default, 3, "{counters:?}");
}

/// A workload that gets its address by DHCP sends from 0.0.0.0 (DHCPv6, and
/// other link-local traffic, from fe80::/10): such a source impersonates no
/// endpoint, so it passes anti-spoofing and policy decides (docs/policy.md,
/// "DHCP and link-local traffic"); an unspecified or link-local address that
/// IS an endpoint's stays protected.
#[test]
fn dhcp_and_link_local_sources_meet_policy_not_anti_spoofing() {
    let Some(_turn) = privileged("dhcp_and_link_local_sources_meet_policy_not_anti_spoofing")
    else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "dhcp", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    // b also has a registered link-local address.
    c.endpoints[1].addresses.push(ip("fe80::21"));
    c.ipcache.push(IpcacheEntry {
        net: ipnet::IpNet::from(ip("fe80::21")),
        identity: ID_B,
        endpoint: Some(1),
    });
    c.ipcache.sort();
    // The egress rules a DHCP client needs: the world on UDP 67 (the
    // broadcast 255.255.255.255 is world), DHCPv6 servers on UDP 547.
    let world = netpol::policy::identity::WORLD;
    c.entries.push(allow(Egress, world, 17, 67, 0));
    c.entries.push(allow(Egress, world, 17, 547, 1));
    apply(&mut dp, c);
    let discover = PacketSpec::udp(ip("0.0.0.0"), ip("255.255.255.255"), 68, 67);
    assert!(dp.run(FROM_A, &discover), "DHCPDISCOVER from 0.0.0.0");
    let solicit = PacketSpec::udp(ip("fe80::11"), ip("ff02::1:2"), 546, 547);
    assert!(
        dp.run(FROM_A, &solicit),
        "DHCPv6 SOLICIT from a link-local address"
    );
    assert!(
        dp.run(
            FROM_A,
            &PacketSpec::udp(ip("169.254.3.4"), ip("255.255.255.255"), 68, 67)
        ),
        "IPv4 link-local source"
    );
    // Policy still decides: another port is the default deny, not spoofing.
    assert!(!dp.run(
        FROM_A,
        &PacketSpec::udp(ip("0.0.0.0"), ip("10.202.7.7"), 68, 80)
    ));
    assert!(!dp.run(
        FROM_A,
        &PacketSpec::udp(ip("fe80::11"), ip("fe80::1"), 1, 2)
    ));
    // b's registered link-local address from a is spoofing, and a routable
    // unregistered address still is.
    assert!(!dp.run(
        FROM_A,
        &PacketSpec::udp(ip("fe80::21"), ip("ff02::1:2"), 546, 547)
    ));
    assert!(!dp.run(
        FROM_A,
        &PacketSpec::udp(ip(WORLD4), ip("255.255.255.255"), 68, 67)
    ));
    let counters = dp.dp().counters();
    assert_eq!(counters[&0].denied_default, 2, "{counters:?}");
    assert_eq!(counters[&0].denied_spoof, 2, "{counters:?}");
}

/// An IPv6 first fragment whose fragmentable part starts with an extension
/// header (fragment header, then destination options, then UDP): its later
/// fragments carry the extension header's number in their fragment header,
/// not UDP's, and are still judged with the first fragment's protocol and
/// ports.
#[test]
fn ipv6_fragments_with_an_extension_header_after_the_fragment_header_keep_their_ports() {
    let Some(_turn) = privileged(
        "ipv6_fragments_with_an_extension_header_after_the_fragment_header_keep_their_ports",
    ) else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "v6fragext", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    c.entries.push(allow(Egress, ID_B, 17, 53, 0));
    apply(&mut dp, c);
    for (port, id, allowed) in [(53u16, 77u32, true), (22, 78, false)] {
        let mut first = PacketSpec::udp(ip(A6), ip(B6), 40000, port);
        first.ext_headers = vec![44, 60];
        first.fragment = Some((0, true));
        first.frag_id = id;
        let mut later = first.clone();
        later.fragment = Some((8, false));
        assert_eq!(
            dp.run(FROM_A, &first),
            allowed,
            "port {port}: first fragment"
        );
        assert_eq!(
            dp.run(FROM_A, &later),
            allowed,
            "port {port}: later fragment"
        );
    }
    // A later fragment of a datagram never seen is still dropped.
    let mut stray = PacketSpec::udp(ip(A6), ip(B6), 40000, 53);
    stray.ext_headers = vec![44, 60];
    stray.fragment = Some((8, false));
    stray.frag_id = 79;
    assert!(!dp.run(FROM_A, &stray));
}

#[test]
fn spoofed_source_is_dropped() {
    let Some(_turn) = privileged("spoofed_source_is_dropped") else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "spoof", &settings());
    apply(&mut dp, base()); // no policy at all: everything else passes
    assert!(dp.run(FROM_A, &PacketSpec::udp(ip(A4), ip(B4), 1, 2)));
    assert!(dp.run(FROM_A, &PacketSpec::udp(ip(A6), ip(B6), 1, 2)));
    assert!(
        !dp.run(FROM_A, &PacketSpec::udp(ip(B4), ip(C4), 1, 2)),
        "b's address from a"
    );
    assert!(
        !dp.run(FROM_A, &PacketSpec::udp(ip(WORLD4), ip(B4), 1, 2)),
        "unregistered address from a"
    );
    assert!(
        !dp.run(FROM_A, &PacketSpec::udp(ip(B6), ip(A6), 1, 2)),
        "v6 spoof"
    );
    // Toward a, any source is fine (policy decides).
    assert!(dp.run(TO_A, &PacketSpec::udp(ip(WORLD4), ip(A4), 1, 2)));
    let counters = dp.dp().counters();
    assert_eq!(counters[&0].denied_spoof, 3, "{counters:?}");
    assert_eq!(counters[&0].allowed, 3, "{counters:?}");
    let ev = dp.dp().poll_events(10);
    assert_eq!(
        ev.iter()
            .filter(|e| e.reason == EventReason::Spoofed)
            .count(),
        3,
        "{ev:?}"
    );
    assert_eq!(ev[0].src, ip(B4));
}

/// `[datapath] stage`: every stage but full passes what full drops; the
/// stages from ipcache on include anti-spoofing.
#[test]
fn every_stage_but_full_passes_what_full_drops() {
    let Some(_turn) = privileged("every_stage_but_full_passes_what_full_drops") else {
        return;
    };
    for stage in Stage::ALL {
        let s = DatapathSettings {
            stage,
            ..settings()
        };
        let mut dp = Dp::open(PREFIX, &format!("stage-{stage}"), &s);
        assert_eq!(dp.dp().stage(), stage);
        let mut c = base();
        c.endpoints[0].default_deny_egress = true;
        apply(&mut dp, c);
        let denied = PacketSpec::tcp(ip(A4), ip(B4), 40000, 80, TCP_SYN);
        assert_eq!(dp.run(FROM_A, &denied), !stage.enforcing(), "stage {stage}");
        assert_eq!(
            dp.run(FROM_A, &denied),
            !stage.enforcing(),
            "stage {stage}, again"
        );
        let spoofed = PacketSpec::udp(ip(B4), ip(C4), 1, 2);
        let checks_spoofing = matches!(stage, Stage::Ipcache | Stage::Conntrack | Stage::Full);
        assert_eq!(dp.run(FROM_A, &spoofed), !checks_spoofing, "stage {stage}");
    }
}

#[test]
fn audit_endpoint_passes_and_reports_would_be_drops() {
    let Some(_turn) = privileged("audit_endpoint_passes_and_reports_would_be_drops") else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "audit", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_ingress = true;
    c.endpoints[0].audit = true;
    c.entries.push(entry(Ingress, ID_C, 0, 0, 0, Deny, 4));
    apply(&mut dp, c);
    assert!(
        dp.run(TO_A, &PacketSpec::tcp(ip(B4), ip(A4), 5, 80, TCP_SYN)),
        "default deny audited"
    );
    assert!(
        dp.run(TO_A, &PacketSpec::tcp(ip(C4), ip(A4), 5, 80, TCP_SYN)),
        "deny audited"
    );
    let ev = dp.dp().poll_events(10);
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert!(ev.iter().all(|e| e.verdict == EventVerdict::Audit));
    assert_eq!(ev[0].reason, EventReason::DefaultDeny);
    assert_eq!(
        (ev[1].reason, ev[1].rule),
        (EventReason::PolicyDeny, Some(4))
    );
    assert_eq!(dp.dp().counters()[&0].audit, 2);
}

/// The verdicts of staged policies (docs/policy.md, "Staged policies"): a
/// staged deny passes as audit, reported with its rule, where the enforced
/// entries let the flow through, and is a default-deny drop where they do
/// not; a staged default deny passes as audit what nothing else decides; an
/// enforced deny still denies.
#[test]
fn staged_entries_pass_as_audit_and_keep_the_enforced_verdict() {
    let Some(_turn) = privileged("staged_entries_pass_as_audit_and_keep_the_enforced_verdict")
    else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "staged", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_ingress = true;
    c.endpoints[0].enforced_ingress = true;
    c.entries.extend([
        entry(Ingress, ID_B, 6, 80, 16, EntryVerdict::AllowStagedDeny, 7),
        entry(Ingress, ID_B, 6, 25, 16, Deny, 13),
        entry(Ingress, ID_C, 0, 0, 0, EntryVerdict::StagedDeny, 8),
        allow(Ingress, 0, 6, 443, 9),
        entry(Egress, 0, 0, 0, 0, EntryVerdict::StagedDefaultDeny, 10),
        allow(Egress, ID_B, 6, 22, 11),
        entry(Egress, ID_C, 17, 53, 16, EntryVerdict::StagedDeny, 12),
    ]);
    apply(&mut dp, c);
    let _ = dp.dp().poll_events(100);
    type Event = Option<(EventVerdict, EventReason, Option<u32>)>;
    let cases: [(Hook, PacketSpec, bool, Event); 7] = [
        // Enforced allow, staged deny: audit.
        (
            TO_A,
            PacketSpec::tcp(ip(B4), ip(A4), 5, 80, TCP_SYN),
            true,
            Some((EventVerdict::Audit, EventReason::PolicyDeny, Some(7))),
        ),
        // The enforced deny denies.
        (
            TO_A,
            PacketSpec::tcp(ip(B4), ip(A4), 5, 25, TCP_SYN),
            false,
            Some((EventVerdict::Denied, EventReason::PolicyDeny, Some(13))),
        ),
        // A staged deny where the enforced default deny drops: dropped by it.
        (
            TO_A,
            PacketSpec::tcp(ip(C4), ip(A4), 5, 80, TCP_SYN),
            false,
            Some((EventVerdict::Denied, EventReason::DefaultDeny, None)),
        ),
        // A staged deny under an enforced allow of the other lookup: audit.
        (
            TO_A,
            PacketSpec::tcp(ip(C4), ip(A4), 5, 443, TCP_SYN),
            true,
            Some((EventVerdict::Audit, EventReason::PolicyDeny, Some(8))),
        ),
        // Egress is not default-deny: an allow passes silently ...
        (
            FROM_A,
            PacketSpec::tcp(ip(A4), ip(B4), 5, 22, TCP_SYN),
            true,
            None,
        ),
        // ... a staged deny passes as audit ...
        (
            FROM_A,
            PacketSpec::udp(ip(A4), ip(C4), 5, 53),
            true,
            Some((EventVerdict::Audit, EventReason::PolicyDeny, Some(12))),
        ),
        // ... and what nothing decides passes as audit of the staged default deny.
        (
            FROM_A,
            PacketSpec::tcp(ip(A4), ip(C4), 5, 80, TCP_SYN),
            true,
            Some((EventVerdict::Audit, EventReason::DefaultDeny, Some(10))),
        ),
    ];
    for (i, (hook, p, pass, event)) in cases.iter().enumerate() {
        dp.dp().clear_conntrack().unwrap();
        assert_eq!(dp.run(*hook, p), *pass, "case {i}: {p:?}");
        let ev = dp.dp().poll_events(10);
        let got = ev.first().map(|e| (e.verdict, e.reason, e.rule));
        assert_eq!(got, *event, "case {i}: {ev:?}");
    }
    assert_eq!(dp.dp().counters()[&0].audit, 4);
}

#[test]
fn host_endpoint_hooks_map_the_other_way_and_failsafe_ports_pass() {
    let Some(_turn) = privileged("host_endpoint_hooks_map_the_other_way_and_failsafe_ports_pass")
    else {
        return;
    };
    let s = DatapathSettings {
        failsafe: vec![(Ingress, 6, 22), (Egress, 17, 53)],
        ..settings()
    };
    let mut dp = Dp::open(PREFIX, "hostep", &s);
    let mut c = base();
    c.endpoints[0].kind = EndpointKind::Host;
    c.endpoints[0].default_deny_ingress = true;
    c.endpoints[0].default_deny_egress = true;
    c.entries.push(allow(Ingress, ID_B, 6, 443, 0));
    apply(&mut dp, c);
    // For a host endpoint the device's ingress is the host's ingress.
    assert!(dp.run(
        Hook::Ingress,
        &PacketSpec::tcp(ip(B4), ip(A4), 5, 443, TCP_SYN)
    ));
    assert!(!dp.run(
        Hook::Ingress,
        &PacketSpec::tcp(ip(C4), ip(A4), 5, 443, TCP_SYN)
    ));
    assert!(!dp.run(
        Hook::Egress,
        &PacketSpec::tcp(ip(A4), ip(B4), 5, 443, TCP_SYN)
    ));
    // Failsafe: ssh in and DNS out pass whatever the policy says.
    assert!(dp.run(
        Hook::Ingress,
        &PacketSpec::tcp(ip(WORLD4), ip(A4), 5, 22, TCP_SYN)
    ));
    assert!(dp.run(Hook::Egress, &PacketSpec::udp(ip(A4), ip(WORLD4), 5, 53)));
    assert!(!dp.run(
        Hook::Egress,
        &PacketSpec::tcp(ip(A4), ip(WORLD4), 5, 22, TCP_SYN)
    ));
    // No anti-spoofing on host endpoints: the host may route others' traffic.
    assert!(dp.run(Hook::Egress, &PacketSpec::udp(ip(WORLD4), ip(C4), 5, 53)));
}

#[test]
fn no_policy_passes_and_default_deny_drops() {
    let Some(_turn) = privileged("no_policy_passes_and_default_deny_drops") else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "defdeny", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_ingress = true;
    c.entries.push(allow(Ingress, 0, 6, 8080, 0)); // any identity, port 8080
    c.entries.push(entry(Ingress, ID_B, 6, 1024, 6, Allow, 1)); // b: 1024-2047
    apply(&mut dp, c);
    assert!(
        dp.run(TO_A, &PacketSpec::tcp(ip(WORLD4), ip(A4), 5, 8080, TCP_SYN)),
        "wildcard identity"
    );
    assert!(
        !dp.run(TO_A, &PacketSpec::tcp(ip(WORLD4), ip(A4), 5, 8081, TCP_SYN)),
        "default deny"
    );
    assert!(
        dp.run(TO_A, &PacketSpec::tcp(ip(B4), ip(A4), 5, 1024, TCP_SYN)),
        "range start"
    );
    assert!(
        dp.run(TO_A, &PacketSpec::tcp(ip(B4), ip(A4), 5, 2047, TCP_SYN)),
        "range end"
    );
    assert!(
        !dp.run(TO_A, &PacketSpec::tcp(ip(B4), ip(A4), 5, 2048, TCP_SYN)),
        "past the range"
    );
    assert!(
        !dp.run(TO_A, &PacketSpec::udp(ip(B4), ip(A4), 5, 1500)),
        "other protocol"
    );
    // Egress is not default deny: anything goes out.
    assert!(dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(WORLD4), 5, 9, TCP_SYN)));
    let c = dp.dp().counters();
    assert_eq!(c[&0].denied_default, 3, "{c:?}");
}

#[test]
fn established_flow_is_rechecked_under_recheck_and_kept_under_keep() {
    let Some(_turn) = privileged("established_flow_is_rechecked_under_recheck_and_kept_under_keep")
    else {
        return;
    };
    for recheck in [true, false] {
        let s = DatapathSettings {
            recheck_established: recheck,
            ..settings()
        };
        let mut dp = Dp::open(PREFIX, if recheck { "recheck" } else { "keep" }, &s);
        let mut c = base();
        c.endpoints[0].default_deny_egress = true;
        c.entries.push(allow(Egress, ID_B, 6, 80, 0));
        apply(&mut dp, c);
        assert!(dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40000, 80, TCP_SYN)));
        let mut c = base();
        c.endpoints[0].default_deny_egress = true;
        apply(&mut dp, c);
        let fwd = dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40000, 80, TCP_ACK));
        assert_eq!(
            fwd, !recheck,
            "recheck={recheck}: forward packet after the allow was removed"
        );
        // Replies pass either way.
        assert!(dp.run(TO_A, &PacketSpec::tcp(ip(B4), ip(A4), 80, 40000, TCP_ACK)));
        // A new flow is denied either way.
        assert!(!dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40001, 80, TCP_SYN)));
    }
}

/// Conntrack caches the verdict with the generation that decided it: while
/// that generation is active an established packet passes on the entry alone
/// (a policy entry taken out of the ACTIVE maps behind the datapath's back
/// changes nothing), the next packet after a flip is judged by the new
/// generation under recheck (dropped when it denies the flow, passed and
/// cached again when it allows it), and passes under keep.
#[test]
fn cached_verdict_holds_until_a_flip_and_recheck_judges_the_next_packet() {
    let Some(_turn) =
        privileged("cached_verdict_holds_until_a_flip_and_recheck_judges_the_next_packet")
    else {
        return;
    };
    use libbpf_rs::MapCore;
    for recheck in [true, false] {
        let s = DatapathSettings {
            recheck_established: recheck,
            ..settings()
        };
        let mut dp = Dp::open(PREFIX, if recheck { "cacher" } else { "cachek" }, &s);
        let allowing = || {
            let mut c = base();
            c.endpoints[0].default_deny_egress = true;
            c.entries.push(allow(Egress, ID_B, 17, 53, 0));
            c.entries.push(allow(Egress, ID_C, 17, 53, 1));
            c
        };
        apply(&mut dp, allowing());
        let to_b = PacketSpec::udp(ip(A4), ip(B4), 40000, 53);
        let to_c = PacketSpec::udp(ip(A4), ip(C4), 40000, 53);
        assert!(dp.run(FROM_A, &to_b), "first packet: allowed by policy");
        assert!(dp.run(FROM_A, &to_c));
        // Empty the active generation's policy maps in place (no flip).
        let active = dp.dp().active_slot().unwrap();
        for outer in ["netpol_policy_v1", "netpol_policy_exact_v1"] {
            let policy = inner_map(&dp.pin, outer, active);
            for k in policy.keys().collect::<Vec<_>>() {
                policy.delete(&k).unwrap();
            }
        }
        assert!(
            dp.run(FROM_A, &to_b),
            "recheck={recheck}: established, same generation: the cached verdict"
        );
        assert!(
            !dp.run(FROM_A, &PacketSpec::udp(ip(A4), ip(B4), 40001, 53)),
            "a new flow is judged by the (emptied) maps"
        );
        // The next generation denies b and still allows c.
        let mut c = base();
        c.endpoints[0].default_deny_egress = true;
        c.entries.push(allow(Egress, ID_C, 17, 53, 1));
        apply(&mut dp, c);
        let denied_before = dp.dp().counters()[&0].denied_default;
        assert_eq!(
            dp.run(FROM_A, &to_b),
            !recheck,
            "recheck={recheck}: the first packet after the flip"
        );
        assert_eq!(dp.run(FROM_A, &to_b), !recheck, "and the one after it");
        let denied = dp.dp().counters()[&0].denied_default - denied_before;
        assert_eq!(denied, if recheck { 2 } else { 0 });
        assert!(dp.run(FROM_A, &to_c), "still allowed: passes, cached again");
        assert!(dp.run(FROM_A, &to_c));
        // Replies pass either way (one lookup, whatever the generation).
        assert!(dp.run(TO_A, &PacketSpec::udp(ip(B4), ip(A4), 53, 40000)));
        assert!(dp.run(TO_A, &PacketSpec::udp(ip(C4), ip(A4), 53, 40000)));
    }
}

/// Under keep an established flow survives a flip, but not the loss of its
/// source address: the first packet after the flip is checked for spoofing.
#[test]
fn keep_checks_an_established_flow_for_spoofing_after_a_flip() {
    let Some(_turn) = privileged("keep_checks_an_established_flow_for_spoofing_after_a_flip")
    else {
        return;
    };
    let s = DatapathSettings {
        recheck_established: false,
        ..settings()
    };
    let mut dp = Dp::open(PREFIX, "keepspoof", &s);
    apply(&mut dp, base());
    let from_a6 = PacketSpec::udp(ip(A6), ip(B6), 40000, 53);
    assert!(dp.run(FROM_A, &from_a6));
    assert!(dp.run(FROM_A, &from_a6));
    // a loses its IPv6 address.
    let mut c = base();
    c.endpoints[0].addresses.retain(|a| a.is_ipv4());
    c.ipcache.retain(|e| e.net != ipnet::IpNet::from(ip(A6)));
    apply(&mut dp, c);
    assert!(!dp.run(FROM_A, &from_a6), "spoofed now");
    assert_eq!(dp.dp().counters()[&0].denied_spoof, 1);
    assert!(dp.run(FROM_A, &PacketSpec::udp(ip(A4), ip(B4), 40000, 53)));
}

/// A reply leaving the workload must come from one of its addresses: a flow
/// into a addressed to b's address (routed to a's device) gets no replies
/// from a claiming to be b.
#[test]
fn replies_leaving_a_workload_are_checked_for_spoofing() {
    let Some(_turn) = privileged("replies_leaving_a_workload_are_checked_for_spoofing") else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "replyspoof", &settings());
    apply(&mut dp, base());
    assert!(dp.run(TO_A, &PacketSpec::udp(ip(C4), ip(B4), 5000, 53)));
    assert!(
        !dp.run(FROM_A, &PacketSpec::udp(ip(B4), ip(C4), 53, 5000)),
        "a reply with b's source"
    );
    assert!(dp.run(TO_A, &PacketSpec::udp(ip(C4), ip(A4), 5000, 53)));
    assert!(dp.run(FROM_A, &PacketSpec::udp(ip(A4), ip(C4), 53, 5000)));
    assert!(dp.run(FROM_A, &PacketSpec::udp(ip(A4), ip(C4), 53, 5000)));
    assert_eq!(dp.dp().counters()[&0].denied_spoof, 1);
}

#[test]
fn conntrack_entries_expire_by_protocol_and_tcp_state() {
    let Some(_turn) = privileged("conntrack_entries_expire_by_protocol_and_tcp_state") else {
        return;
    };
    let s = DatapathSettings {
        ct_timeout_syn_secs: 1,
        ct_timeout_established_secs: 60,
        ct_timeout_close_secs: 1,
        ct_timeout_other_secs: 1,
        ..settings()
    };
    let mut dp = Dp::open(PREFIX, "cttimeout", &s);
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    c.endpoints[0].default_deny_ingress = true;
    c.entries.push(allow(Egress, ID_B, 17, 53, 0));
    c.entries.push(allow(Egress, ID_B, 6, 80, 1));
    apply(&mut dp, c);
    use netpol::datapath::packet::TCP_FIN;
    // UDP: the other-protocol timeout.
    assert!(dp.run(FROM_A, &PacketSpec::udp(ip(A4), ip(B4), 40000, 53)));
    // TCP answered: established timeout.
    assert!(dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40001, 80, TCP_SYN)));
    assert!(dp.run(
        TO_A,
        &PacketSpec::tcp(ip(B4), ip(A4), 80, 40001, TCP_SYN | TCP_ACK)
    ));
    // TCP never answered: SYN timeout.
    assert!(dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40002, 80, TCP_SYN)));
    // TCP closed: close timeout.
    assert!(dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40003, 80, TCP_SYN)));
    assert!(dp.run(
        TO_A,
        &PacketSpec::tcp(ip(B4), ip(A4), 80, 40003, TCP_SYN | TCP_ACK)
    ));
    assert!(dp.run(
        FROM_A,
        &PacketSpec::tcp(ip(A4), ip(B4), 40003, 80, TCP_FIN | TCP_ACK)
    ));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !dp.run(TO_A, &PacketSpec::udp(ip(B4), ip(A4), 53, 40000)),
        "udp entry expired"
    );
    assert!(
        dp.run(TO_A, &PacketSpec::tcp(ip(B4), ip(A4), 80, 40001, TCP_ACK)),
        "established entry lives"
    );
    assert!(
        !dp.run(
            TO_A,
            &PacketSpec::tcp(ip(B4), ip(A4), 80, 40002, TCP_SYN | TCP_ACK)
        ),
        "syn entry expired"
    );
    assert!(
        !dp.run(
            TO_A,
            &PacketSpec::tcp(ip(B4), ip(A4), 80, 40003, TCP_FIN | TCP_ACK)
        ),
        "closed entry expired"
    );
}

#[test]
fn generations_flip_and_a_capacity_error_leaves_state_untouched() {
    let Some(_turn) = privileged("generations_flip_and_a_capacity_error_leaves_state_untouched")
    else {
        return;
    };
    let s = DatapathSettings {
        policy_max_entries: 4,
        ..settings()
    };
    let mut dp = Dp::open(PREFIX, "capacity", &s);
    assert_eq!(dp.dp().generation(), 0);
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    c.entries.push(allow(Egress, ID_B, 6, 80, 0));
    assert_eq!(apply(&mut dp, c.clone()), 1);
    let probe = PacketSpec::tcp(ip(A4), ip(B4), 40000, 81, TCP_SYN);
    assert!(!dp.run(FROM_A, &probe));
    let mut big = c.clone();
    for p in 81..90 {
        big.entries.push(allow(Egress, ID_B, 6, p, 0));
    }
    big.entries.sort();
    let err = dp.dp().apply(&big, &A_ON_LO).unwrap_err();
    assert!(
        matches!(
            err,
            DatapathError::Capacity {
                needed: 10,
                max: 4,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "policy map (policy_max_entries) needs 10 entries but holds at most 4; the running state was kept"
    );
    assert_eq!(dp.dp().generation(), 1, "no flip");
    assert!(!dp.run(FROM_A, &probe), "old generation still enforced");
    let mut c2 = c.clone();
    c2.entries.push(allow(Egress, ID_B, 6, 81, 1));
    assert_eq!(apply(&mut dp, c2), 2);
    assert!(dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40002, 81, TCP_SYN)));
    assert_eq!(apply(&mut dp, c), 3);
    assert!(!dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40003, 81, TCP_SYN)));
}

#[test]
fn adopted_pins_keep_enforcing_and_accept_the_next_apply() {
    let Some(_turn) = privileged("adopted_pins_keep_enforcing_and_accept_the_next_apply") else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "adopt", &settings());
    assert!(!dp.dp().adopted());
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    c.entries.push(allow(Egress, ID_B, 6, 80, 0));
    apply(&mut dp, c.clone());
    apply(&mut dp, c.clone());
    dp.forget();
    // A changed conntrack size does not prevent adoption (the pinned size stays).
    dp.reopen(&DatapathSettings {
        ct_max_entries: 8192,
        ..settings()
    });
    assert!(dp.dp().adopted());
    assert_eq!(dp.dp().generation(), 2);
    assert!(
        !dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40000, 81, TCP_SYN)),
        "old state enforced"
    );
    assert!(dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40000, 80, TCP_SYN)));
    c.entries.push(allow(Egress, ID_B, 6, 81, 1));
    assert_eq!(apply(&mut dp, c), 3);
    assert!(dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 40001, 81, TCP_SYN)));
    // detach_all removes the pin dir.
    let pin = dp.pin.clone();
    dp.dp().detach_all().unwrap();
    assert!(!pin.exists());
}

/// `c` with a's egress default-deny and allows to b on `ports`, minus the
/// ipcache entries of c when `drop_c`.
fn egress_state(ports: &[u16], drop_c: bool) -> Compiled {
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    for (i, p) in ports.iter().enumerate() {
        c.entries.push(allow(Egress, ID_B, 6, *p, i as u32));
    }
    if drop_c {
        c.ipcache.retain(|e| e.identity != ID_C);
    }
    c.entries.sort();
    c
}

/// What a generation installed as number `generation` holds for `c`.
fn expected(c: &Compiled, generation: u64) -> Contents {
    let slots = netpol::datapath::layout::KernelSlots::assign(&Default::default(), &A_ON_LO);
    let mut want = Contents::build(c, &A_ON_LO, &slots).expect("build contents");
    want.stamp(generation);
    want
}

#[test]
fn diff_applies_leave_each_generation_exactly_equal_to_its_state() {
    let Some(_turn) = privileged("diff_applies_leave_each_generation_exactly_equal_to_its_state")
    else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "diffgen", &settings());
    let a = egress_state(&[80], false);
    let b = egress_state(&[80, 81, 8080], true);
    let c = egress_state(&[443], false);
    let mut prev: Option<Compiled> = None;
    for (i, state) in [a.clone(), b, a, c].into_iter().enumerate() {
        assert_eq!(apply(&mut dp, state.clone()), i as u64 + 1);
        let active = dp.dp().active_slot().unwrap();
        let got = dp
            .dp()
            .dump_generation(active)
            .unwrap()
            .expect("active generation installed");
        let n = i as u64 + 1;
        assert_eq!(got, expected(&state, n), "apply {i}: active generation");
        if let Some(p) = &prev {
            let other = dp
                .dp()
                .dump_generation(active ^ 1)
                .unwrap()
                .expect("inactive generation installed");
            assert_eq!(
                other,
                expected(p, n - 1),
                "apply {i}: inactive generation keeps the previous state"
            );
        }
        let port = state.entries[0].port;
        assert!(
            dp.run(
                FROM_A,
                &PacketSpec::tcp(ip(A4), ip(B4), 41000 + i as u16, port, TCP_SYN)
            ),
            "apply {i}: allowed port"
        );
        assert!(
            !dp.run(
                FROM_A,
                &PacketSpec::tcp(ip(A4), ip(B4), 41100 + i as u16, 9, TCP_SYN)
            ),
            "apply {i}: denied port"
        );
        prev = Some(state);
    }
}

#[test]
fn apply_after_adoption_converges_to_exactly_the_compiled_state() {
    let Some(_turn) = privileged("apply_after_adoption_converges_to_exactly_the_compiled_state")
    else {
        return;
    };
    use libbpf_rs::{MapCore, MapFlags};
    let mut dp = Dp::open(PREFIX, "adoptdiff", &settings());
    let a = egress_state(&[80], false);
    let b = egress_state(&[80, 81], true);
    apply(&mut dp, a);
    apply(&mut dp, b.clone());
    let inactive = dp.dp().active_slot().unwrap() ^ 1;
    dp.forget();
    // Tamper with the inactive generation behind the datapath's back: a stray
    // policy key and a missing ipcache entry. The adopting process knows
    // nothing of its content and must converge anyway.
    let inner = |outer: &str| inner_map(&dp.pin, outer, inactive);
    let stray = netpol::datapath::layout::policy_key(&allow(Egress, ID_B, 17, 53, 9));
    let value = netpol::datapath::layout::policy_value(&allow(Egress, ID_B, 17, 53, 9));
    inner("netpol_policy_v1")
        .update(
            netpol::datapath::layout::bytes_of(&stray),
            netpol::datapath::layout::bytes_of(&value),
            MapFlags::ANY,
        )
        .unwrap();
    let ipc = inner("netpol_ipcache_v1");
    let first = ipc.keys().next().expect("ipcache has entries");
    ipc.delete(&first).unwrap();

    dp.reopen(&settings());
    assert!(dp.dp().adopted());
    let c = egress_state(&[443], false);
    apply(&mut dp, c.clone());
    let active = dp.dp().active_slot().unwrap();
    assert_eq!(
        active, inactive,
        "the tampered generation was the one written"
    );
    assert_eq!(
        dp.dp().dump_generation(active).unwrap().unwrap(),
        expected(&c, 3)
    );
    assert_eq!(
        dp.dp().dump_generation(active ^ 1).unwrap().unwrap(),
        expected(&b, 2),
        "running state untouched"
    );
    assert!(
        !dp.run(FROM_A, &PacketSpec::tcp(ip(A4), ip(B4), 42000, 53, 0x02)),
        "stray entry gone"
    );
    assert!(dp.run(
        FROM_A,
        &PacketSpec::tcp(ip(A4), ip(B4), 42001, 443, TCP_SYN)
    ));
    // The other (adopted, never written by this process) generation converges too.
    let d = egress_state(&[22, 80], true);
    apply(&mut dp, d.clone());
    let active = dp.dp().active_slot().unwrap();
    assert_eq!(
        dp.dp().dump_generation(active).unwrap().unwrap(),
        expected(&d, 4)
    );
    assert_eq!(
        dp.dp().dump_generation(active ^ 1).unwrap().unwrap(),
        expected(&c, 3)
    );
}

#[test]
fn adoption_refuses_pins_of_another_layout_version() {
    let Some(_turn) = privileged("adoption_refuses_pins_of_another_layout_version") else {
        return;
    };
    use libbpf_rs::MapCore;
    let mut dp = Dp::open(PREFIX, "layout", &settings());
    apply(&mut dp, base());
    dp.forget();
    let state =
        libbpf_rs::MapHandle::from_pinned_path(dp.pin.join("maps/netpol_state_v1")).unwrap();
    let mut v = state
        .lookup(&0u32.to_ne_bytes(), libbpf_rs::MapFlags::ANY)
        .unwrap()
        .unwrap();
    let original = v.clone();
    v[4..8].copy_from_slice(&99u32.to_ne_bytes()); // layout_version
    state
        .update(&0u32.to_ne_bytes(), &v, libbpf_rs::MapFlags::ANY)
        .unwrap();
    let err = KernelDatapath::open(&dp.pin, &settings()).unwrap_err();
    assert!(err.to_string().contains("layout version 99"), "{err}");
    // Put it back so the guard can clean up through an adopting open.
    state
        .update(&0u32.to_ne_bytes(), &original, libbpf_rs::MapFlags::ANY)
        .unwrap();
}

/// The layout version in a pinned state word (`struct np_state`).
fn pinned_layout_version(state: &libbpf_rs::MapHandle) -> u32 {
    use libbpf_rs::{MapCore, MapFlags};
    let v = state
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .unwrap()
        .unwrap();
    u32::from_ne_bytes(v[4..8].try_into().unwrap())
}

/// Rewrites the layout version of a pinned state word (an older instance's pins).
fn set_pinned_layout_version(state: &libbpf_rs::MapHandle, version: u32) {
    use libbpf_rs::{MapCore, MapFlags};
    let mut v = state
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .unwrap()
        .unwrap();
    v[4..8].copy_from_slice(&version.to_ne_bytes());
    state
        .update(&0u32.to_ne_bytes(), &v, MapFlags::ANY)
        .unwrap();
}

/// An upgrade over a running layout-1 instance (conntrack in netpol_ct_v1,
/// keyed by the first packet's hook and tuple): the adopting datapath copies
/// its flows into netpol_ct_v2 before it switches the links, so a reply that
/// only the old table knew still passes; then the old map is unpinned and
/// the state says layout 2.
#[test]
fn adoption_of_a_layout_1_instance_migrates_its_flows() {
    let Some(_turn) = privileged("adoption_of_a_layout_1_instance_migrates_its_flows") else {
        return;
    };
    use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};
    use netpol::datapath::layout::{bytes_of, CtV1Key, CtV1Value};
    let mut dp = Dp::open(PREFIX, "fromv1", &settings());
    let mut c = base();
    c.endpoints[0].default_deny_ingress = true; // replies need their flow's entry
    apply(&mut dp, c.clone());
    dp.forget();
    // The pins of a layout-1 instance: its state word, its conntrack map with
    // one flow a:40000 -> b:53 first seen at a's ingress hook, no netpol_ct_v2.
    let maps = dp.pin.join("maps");
    let state = MapHandle::from_pinned_path(maps.join("netpol_state_v1")).unwrap();
    set_pinned_layout_version(&state, 1);
    std::fs::remove_file(maps.join("netpol_ct_v2")).unwrap();
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    let mut old =
        MapHandle::create(MapType::LruHash, Some("netpol_ct_v1"), 44, 16, 64, &opts).unwrap();
    let mut k = CtV1Key {
        sport: 40000,
        dport: 53,
        ifindex: 1,
        proto: 17,
        family: 4,
        hook: 0,
        ..CtV1Key::default()
    };
    k.saddr[..4].copy_from_slice(&A4.parse::<std::net::Ipv4Addr>().unwrap().octets());
    k.daddr[..4].copy_from_slice(&B4.parse::<std::net::Ipv4Addr>().unwrap().octets());
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write to.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(r, 0);
    let val = CtV1Value {
        expires_ns: (now.tv_sec as u64 + 60) * 1_000_000_000,
        rule: 0,
        ..CtV1Value::default()
    };
    old.update(bytes_of(&k), bytes_of(&val), MapFlags::ANY)
        .unwrap();
    old.pin(maps.join("netpol_ct_v1")).unwrap();
    drop(old);

    dp.reopen(&settings());
    assert!(dp.dp().adopted());
    assert!(
        dp.run(TO_A, &PacketSpec::udp(ip(B4), ip(A4), 53, 40000)),
        "the reply of a flow only layout 1 knew"
    );
    assert!(
        !dp.run(TO_A, &PacketSpec::udp(ip(B4), ip(A4), 53, 40001)),
        "no flow, no reply"
    );
    assert!(
        !maps.join("netpol_ct_v1").exists(),
        "the old map is unpinned"
    );
    assert!(maps.join("netpol_ct_v2").exists());
    assert_eq!(pinned_layout_version(&state), 3, "layout version 3 now");
    // The forward direction is judged again (its verdict has no generation):
    // a's egress has no policy, so it passes, and the next apply works.
    assert!(dp.run(FROM_A, &PacketSpec::udp(ip(A4), ip(B4), 40000, 53)));
    apply(&mut dp, c);
    assert!(dp.run(TO_A, &PacketSpec::udp(ip(B4), ip(A4), 53, 40000)));
}

/// One port inside a range with another verdict, for two identities: the
/// one-port entries sit in the exact-match hash (looked up first), the range
/// and the any-port entries in the trie; each packet gets the longest match.
#[test]
fn a_one_port_entry_in_the_exact_map_beats_the_range_around_it() {
    let Some(_turn) = privileged("a_one_port_entry_in_the_exact_map_beats_the_range_around_it")
    else {
        return;
    };
    let mut dp = Dp::open(PREFIX, "exactport", &settings());
    let c = exact_and_ranges();
    apply(&mut dp, c.clone());
    let active = dp.dp().active_slot().unwrap();
    let got = dp.dp().dump_generation(active).unwrap().unwrap();
    assert_eq!(got.policy_exact.len(), 3, "the one-port entries are hashed");
    assert_eq!(got.policy.len(), 3, "the ranges stay in the trie");
    check_exact_and_ranges(&mut dp, "fresh");
}

/// b: TCP 1024-2047 allowed, 1500 denied; c: UDP 53 allowed, any other UDP
/// denied; any identity: TCP 8080 allowed inside a denied 7680-8191.
fn exact_and_ranges() -> Compiled {
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    c.entries.push(entry(Egress, ID_B, 6, 1024, 6, Allow, 0));
    c.entries.push(entry(Egress, ID_B, 6, 1500, 16, Deny, 1));
    c.entries.push(entry(Egress, ID_C, 17, 0, 0, Deny, 2));
    c.entries.push(allow(Egress, ID_C, 17, 53, 3));
    c.entries.push(entry(Egress, 0, 6, 7680, 7, Deny, 4));
    c.entries.push(allow(Egress, 0, 6, 8080, 5));
    c
}

fn check_exact_and_ranges(dp: &mut Dp, when: &str) {
    let tcp = |dst: &str, port| PacketSpec::tcp(ip(A4), ip(dst), 40100, port, TCP_SYN);
    let udp = |dst: &str, port| PacketSpec::udp(ip(A4), ip(dst), 40100, port);
    for (spec, want, what) in [
        (tcp(B4, 1500), false, "the one port denied inside b's range"),
        (tcp(B4, 1501), true, "the rest of b's range"),
        (tcp(B4, 2048), false, "past b's range: default deny"),
        (udp(C4, 53), true, "the one port c may use"),
        (udp(C4, 54), false, "c's other UDP ports"),
        (tcp(C4, 8080), true, "any identity: the one port allowed"),
        (tcp(C4, 8081), false, "any identity: the range around it"),
    ] {
        assert_eq!(dp.run(FROM_A, &spec), want, "{when}: {what}");
        dp.dp().clear_conntrack().unwrap();
    }
}

/// An upgrade over a running layout-2 instance (every policy entry in the
/// trie, no netpol_policy_exact_v1): its generations keep their verdicts
/// while adopted, and the next apply splits them.
#[test]
fn adoption_of_a_layout_2_instance_keeps_its_verdicts_and_splits_at_the_next_apply() {
    let Some(_turn) = privileged(
        "adoption_of_a_layout_2_instance_keeps_its_verdicts_and_splits_at_the_next_apply",
    ) else {
        return;
    };
    use libbpf_rs::{MapCore, MapFlags, MapHandle};
    let mut dp = Dp::open(PREFIX, "fromv2", &settings());
    let c = exact_and_ranges();
    apply(&mut dp, c.clone());
    apply(&mut dp, c.clone());
    dp.forget();
    // What a layout-2 instance leaves: version 2 in the state word, each
    // slot's one-port entries in its trie, no exact map at all.
    let maps = dp.pin.join("maps");
    let state = MapHandle::from_pinned_path(maps.join("netpol_state_v1")).unwrap();
    set_pinned_layout_version(&state, 2);
    let exact_outer = MapHandle::from_pinned_path(maps.join("netpol_policy_exact_v1")).unwrap();
    for slot in 0..2u32 {
        let exact = inner_map(&dp.pin, "netpol_policy_exact_v1", slot);
        let trie = inner_map(&dp.pin, "netpol_policy_v1", slot);
        for k in exact.keys().collect::<Vec<_>>() {
            let val = exact.lookup(&k, MapFlags::ANY).unwrap().unwrap();
            trie.update(&k, &val, MapFlags::ANY).unwrap();
        }
        exact_outer.delete(&slot.to_ne_bytes()).unwrap();
    }
    drop(exact_outer);
    std::fs::remove_file(maps.join("netpol_policy_exact_v1")).unwrap();

    dp.reopen(&settings());
    assert!(dp.dp().adopted());
    let active = dp.dp().active_slot().unwrap();
    let adopted = dp.dp().dump_generation(active).unwrap().unwrap();
    assert_eq!(
        adopted.policy.len(),
        6,
        "the adopted trie holds every entry"
    );
    assert!(adopted.policy_exact.is_empty());
    check_exact_and_ranges(&mut dp, "adopted layout 2");
    // Both slots are written into the split, and keep the verdicts.
    for n in [3u64, 4] {
        assert_eq!(apply(&mut dp, c.clone()), n);
        let active = dp.dp().active_slot().unwrap();
        assert_eq!(
            dp.dp().dump_generation(active).unwrap().unwrap(),
            expected(&c, n),
            "apply {n}: split"
        );
        check_exact_and_ranges(&mut dp, &format!("apply {n}"));
    }
    assert_eq!(pinned_layout_version(&state), 3, "layout version 3 now");
}

#[test]
fn allow_events_are_sampled_and_drops_are_rate_limited() {
    let Some(_turn) = privileged("allow_events_are_sampled_and_drops_are_rate_limited") else {
        return;
    };
    let s = DatapathSettings {
        allow_sample_rate: 2,
        events_per_sec: 5,
        ..settings()
    };
    // Counters and budgets are per CPU: keep this thread on one CPU.
    let mut cpus = nix::sched::CpuSet::new();
    cpus.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).unwrap();
    let mut dp = Dp::open(PREFIX, "events", &s);
    let mut c = base();
    c.endpoints[0].default_deny_egress = true;
    c.entries.push(allow(Egress, ID_B, 6, 80, 7));
    apply(&mut dp, c);
    for i in 0..4 {
        assert!(dp.run(
            FROM_A,
            &PacketSpec::tcp(ip(A4), ip(B4), 41000 + i, 80, TCP_SYN)
        ));
    }
    let ev = dp.dp().poll_events(100);
    assert_eq!(ev.len(), 2, "1 in 2 allowed new flows: {ev:?}");
    assert!(ev
        .iter()
        .all(|e| e.verdict == EventVerdict::Allowed && e.rule == Some(7)));
    for i in 0..50 {
        assert!(!dp.run(
            FROM_A,
            &PacketSpec::tcp(ip(A4), ip(B4), 42000 + i, 22, TCP_SYN)
        ));
    }
    let ev = dp.dp().poll_events(100);
    // 5 per second on this CPU (2 may have gone to the allows in this
    // second): never more than the budget.
    assert!(ev.len() <= 5 && !ev.is_empty(), "{} events", ev.len());
    assert_eq!(dp.dp().counters()[&0].denied_default, 50);
}

// ---------------------------------------------------------------------------
// End to end: network namespaces, veth pairs on a bridge in a "node"
// namespace (nothing touches the host's network), real sockets.

mod e2e {
    use std::io::{Read, Write};
    use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::Sender;
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use nix::sys::socket::{
        setsockopt, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };

    use crate::harness::netns::{enter, in_ns};

    /// TCP and UDP echo servers on the given ports of a workload (all its
    /// addresses). Drop stops them.
    pub struct Servers {
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<()>>,
    }

    impl Servers {
        pub fn start(ns: &str, tcp: &[u16], udp: &[u16]) -> Servers {
            let mut s = Servers {
                stop: Arc::new(AtomicBool::new(false)),
                threads: Vec::new(),
            };
            for &port in tcp {
                s.spawn(ns, port, serve_tcp);
            }
            for &port in udp {
                s.spawn(ns, port, serve_udp);
            }
            s
        }

        /// On 0.0.0.0 and on ::, a thread in `ns` running `serve`; returns once
        /// each has bound its socket (and said so on its channel).
        fn spawn(
            &mut self,
            ns: &str,
            port: u16,
            serve: fn(SocketAddr, Sender<()>, Arc<AtomicBool>),
        ) {
            for any in ["0.0.0.0", "::"] {
                let (ns, stop) = (ns.to_string(), self.stop.clone());
                let addr: SocketAddr = SocketAddr::new(any.parse().unwrap(), port);
                let (tx, rx) = std::sync::mpsc::channel();
                self.threads.push(std::thread::spawn(move || {
                    enter(&ns);
                    serve(addr, tx, stop);
                }));
                rx.recv().unwrap();
            }
        }
    }

    fn serve_tcp(addr: SocketAddr, bound: Sender<()>, stop: Arc<AtomicBool>) {
        let l = TcpListener::from(socket(addr, SockType::Stream));
        l.set_nonblocking(true).unwrap();
        bound.send(()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => {
                    let stop = stop.clone();
                    std::thread::spawn(move || echo_tcp(s, stop));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn serve_udp(addr: SocketAddr, bound: Sender<()>, stop: Arc<AtomicBool>) {
        let s = UdpSocket::from(socket(addr, SockType::Datagram));
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        bound.send(()).unwrap();
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
    }

    /// A socket of `addr`'s family, bound to it (v6 sockets only for v6, so
    /// 0.0.0.0 and :: can share a port); a stream socket listens.
    fn socket(addr: SocketAddr, ty: SockType) -> OwnedFd {
        let fd = unbound(addr.ip(), ty).unwrap();
        if ty == SockType::Stream {
            setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
        }
        if addr.is_ipv6() {
            setsockopt(&fd, sockopt::Ipv6V6Only, &true).unwrap();
        }
        let sa = SockaddrStorage::from(addr);
        nix::sys::socket::bind(fd.as_raw_fd(), &sa).unwrap();
        if ty == SockType::Stream {
            nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(128).unwrap()).unwrap();
        }
        fd
    }

    /// A socket of `ip`'s family.
    fn unbound(ip: IpAddr, ty: SockType) -> nix::Result<OwnedFd> {
        let domain = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        nix::sys::socket::socket(domain, ty, SockFlag::empty(), None)
    }

    fn echo_tcp(mut s: TcpStream, stop: Arc<AtomicBool>) {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            match s.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    }

    impl Drop for Servers {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    /// Open a TCP connection from namespace `ns` (optionally from `bind`).
    pub fn tcp_connect(
        ns: &str,
        dst: IpAddr,
        port: u16,
        bind: Option<IpAddr>,
        timeout: Duration,
    ) -> Option<TcpStream> {
        in_ns(ns, || {
            let fd = unbound(dst, SockType::Stream).ok()?;
            if let Some(b) = bind {
                let sa = SockaddrStorage::from(SocketAddr::new(b, 0));
                nix::sys::socket::bind(fd.as_raw_fd(), &sa).ok()?;
            }
            // Connect with a timeout through std: hand the fd over once bound.
            let sock = socket_from_fd(fd);
            sock.connect_timeout(&SocketAddr::new(dst, port).into(), timeout)
                .ok()?;
            let s: TcpStream = sock.into();
            s.set_read_timeout(Some(timeout)).ok()?;
            Some(s)
        })
    }

    fn socket_from_fd(fd: OwnedFd) -> Sock {
        Sock(fd)
    }

    /// A minimal socket wrapper for connect-with-timeout on a pre-bound fd.
    pub struct Sock(OwnedFd);

    impl Sock {
        fn connect_timeout(
            &self,
            addr: &SockaddrStorage,
            timeout: Duration,
        ) -> std::io::Result<()> {
            use nix::sys::socket::{connect, setsockopt, sockopt};
            use std::os::fd::AsRawFd;
            // Linux bounds a blocking connect() by SO_SNDTIMEO.
            let tv =
                nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
            setsockopt(&self.0, sockopt::SendTimeout, &tv).map_err(std::io::Error::from)?;
            connect(self.0.as_raw_fd(), addr).map_err(std::io::Error::from)
        }
    }

    impl From<Sock> for TcpStream {
        fn from(s: Sock) -> TcpStream {
            TcpStream::from(s.0)
        }
    }

    /// Send a line and expect it echoed.
    pub fn echo(s: &mut TcpStream, msg: &[u8]) -> bool {
        if s.write_all(msg).is_err() {
            return false;
        }
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).is_ok() && got == msg
    }

    /// A TCP connection from `ns` that completes and echoes.
    pub fn tcp_ok(ns: &str, dst: IpAddr, port: u16) -> bool {
        match tcp_connect(ns, dst, port, None, Duration::from_millis(800)) {
            Some(mut s) => echo(&mut s, b"hello"),
            None => false,
        }
    }

    pub fn udp_ok(ns: &str, dst: IpAddr, port: u16) -> bool {
        in_ns(ns, || {
            let any: IpAddr = if dst.is_ipv4() {
                "0.0.0.0".parse().unwrap()
            } else {
                "::".parse().unwrap()
            };
            let s = UdpSocket::bind(SocketAddr::new(any, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            for _ in 0..3 {
                let _ = s.send_to(b"udp", SocketAddr::new(dst, port));
                let mut buf = [0u8; 16];
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    return &buf[..n] == b"udp";
                }
            }
            false
        })
    }

    pub fn ping_ok(ns: &str, dst: IpAddr) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                &dst.to_string(),
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

use e2e::{echo, ping_ok, tcp_connect, tcp_ok, udp_ok, Servers};
use std::time::Duration;

const FE1: &str = "10.201.0.11";
const FE2: &str = "10.201.0.12";
const BE: &str = "10.201.0.21";
const DB: &str = "10.201.0.31";
const FE1_6: &str = "fd01:201::11";
const BE_6: &str = "fd01:201::21";
const DB_6: &str = "fd01:201::31";
const ID_FE: u32 = 2000;
const ID_BE: u32 = 2001;
const ID_DB: u32 = 2002;

/// The seed scenario (etc/examples/seed) compiled by hand with our addresses:
/// frontend may open only TCP 80 on backend (egress default deny); only
/// frontend may reach backend, on TCP 80 (backend ingress default deny).
fn seed() -> Compiled {
    let mut c = Compiled::default();
    c.endpoints
        .push(endpoint(0, "frontend-1", ID_FE, &[FE1, FE1_6]));
    c.endpoints.push(endpoint(1, "frontend-2", ID_FE, &[FE2]));
    c.endpoints.push(endpoint(2, "backend", ID_BE, &[BE, BE_6]));
    c.endpoints
        .push(endpoint(3, "database", ID_DB, &[DB, DB_6]));
    ipcache_of_endpoints(&mut c);
    push_world(&mut c);
    c.ipcache.sort();
    for slot in [0, 1] {
        c.endpoints[slot].default_deny_egress = true;
        c.endpoints[slot].enforced_egress = true;
        c.entries.push(PolicyEntry {
            endpoint: slot as u32,
            ..allow(Egress, ID_BE, 6, 80, 0)
        });
    }
    c.endpoints[2].default_deny_ingress = true;
    c.endpoints[2].enforced_ingress = true;
    c.entries.push(PolicyEntry {
        endpoint: 2,
        ..allow(Ingress, ID_FE, 6, 80, 1)
    });
    c.entries.sort();
    c
}

const SEED_WORKLOADS: [Workload<'static>; 4] = [
    Workload {
        name: "fe1",
        addrs: &["10.201.0.11/24", "fd01:201::11/64"],
    },
    Workload {
        name: "fe2",
        addrs: &["10.201.0.12/24"],
    },
    Workload {
        name: "be",
        addrs: &["10.201.0.21/24", "fd01:201::21/64"],
    },
    Workload {
        name: "db",
        addrs: &["10.201.0.31/24", "fd01:201::31/64"],
    },
];

struct Seed {
    topo: Topo,
    attachments: Vec<Attachment>,
    _servers: Vec<Servers>,
}

fn seed_topo(tag: &str) -> Seed {
    let topo = Topo::new(PREFIX, tag, &[], &SEED_WORKLOADS);
    let attachments = ["fe1", "fe2", "be", "db"]
        .iter()
        .enumerate()
        .map(|(slot, w)| Attachment {
            slot: slot as u32,
            ifindex: topo.ifindex(w),
        })
        .collect();
    let servers = vec![
        Servers::start(&topo.ns("be"), &[80, 81], &[53]),
        Servers::start(&topo.ns("db"), &[5432], &[53]),
        Servers::start(&topo.ns("fe1"), &[8080], &[]),
    ];
    Seed {
        topo,
        attachments,
        _servers: servers,
    }
}

impl Seed {
    fn apply(&self, dp: &mut Dp, c: &Compiled) -> u64 {
        dp.dp().apply(c, &self.attachments).expect("apply")
    }
    fn sync(&self, dp: &mut Dp) {
        let node = self.topo.node.clone();
        let att = self.attachments.clone();
        let k = dp.dp();
        in_ns(&node, move || k.sync_attachments(&att)).expect("sync attachments");
    }
    fn ns(&self, w: &str) -> String {
        self.topo.ns(w)
    }
}

#[test]
fn seed_scenario_with_real_tcp_udp_icmp_and_ipv6() {
    let Some(_turn) = privileged("seed_scenario_with_real_tcp_udp_icmp_and_ipv6") else {
        return;
    };
    let s = seed_topo("seed");
    let (fe1, fe2, be, db) = (s.ns("fe1"), s.ns("fe2"), s.ns("be"), s.ns("db"));
    // Before enforcement everything is open.
    assert!(tcp_ok(&db, ip(BE), 80));
    let mut dp = Dp::open(PREFIX, "seed", &settings());
    s.apply(&mut dp, &seed());
    s.sync(&mut dp);
    assert_eq!(dp.dp().attached().len(), 4);
    assert!(tcp_ok(&fe1, ip(BE), 80), "frontend-1 -> backend:80");
    assert!(tcp_ok(&fe2, ip(BE), 80), "frontend-2 -> backend:80");
    assert!(!tcp_ok(&fe1, ip(BE), 81), "frontend-1 -> backend:81");
    assert!(!tcp_ok(&fe1, ip(DB), 5432), "frontend-1 -> database");
    assert!(!tcp_ok(&db, ip(BE), 80), "database -> backend:80");
    assert!(tcp_ok(&be, ip(DB), 5432), "backend egress stays open");
    assert!(tcp_ok(&db, ip(FE1), 8080), "frontend ingress stays open");
    // IPv6 alike.
    assert!(tcp_ok(&fe1, ip(BE_6), 80), "v6 frontend-1 -> backend:80");
    assert!(!tcp_ok(&fe1, ip(BE_6), 81), "v6 frontend-1 -> backend:81");
    assert!(!tcp_ok(&db, ip(BE_6), 80), "v6 database -> backend:80");
    assert!(tcp_ok(&be, ip(DB_6), 5432), "v6 backend -> database");
    // UDP and ICMP: not allowed by the seed, then allowed by added entries.
    assert!(!udp_ok(&fe1, ip(BE), 53));
    assert!(!ping_ok(&fe1, ip(BE)));
    assert!(
        ping_ok(&be, ip(DB)),
        "echo replies pass back to an open endpoint"
    );
    assert!(udp_ok(&be, ip(DB), 53));
    let mut c = seed();
    c.entries.push(allow(Egress, ID_BE, 17, 53, 2));
    c.entries.push(allow(Egress, ID_BE, 1, 8, 3));
    c.entries.push(PolicyEntry {
        endpoint: 2,
        ..allow(Ingress, ID_FE, 17, 53, 4)
    });
    c.entries.push(PolicyEntry {
        endpoint: 2,
        ..allow(Ingress, ID_FE, 1, 8, 5)
    });
    c.entries.sort();
    s.apply(&mut dp, &c);
    assert!(
        udp_ok(&fe1, ip(BE), 53),
        "udp allowed both ways, reply without a rule"
    );
    assert!(
        ping_ok(&fe1, ip(BE)),
        "echo request allowed, reply via conntrack"
    );
    assert!(!udp_ok(&fe1, ip(DB), 53));
    let ev = dp.dp().poll_events(1000);
    assert!(
        ev.iter()
            .any(|e| e.verdict == EventVerdict::Denied && e.dport == 81),
        "drop events reported"
    );
    let counters = dp.dp().counters();
    assert!(
        counters[&0].allowed > 0 && counters[&0].denied_default > 0,
        "{counters:?}"
    );
}

#[test]
fn removed_allow_cuts_an_established_connection_only_under_recheck() {
    let Some(_turn) = privileged("removed_allow_cuts_an_established_connection_only_under_recheck")
    else {
        return;
    };
    for recheck in [true, false] {
        let tag = if recheck { "rchk" } else { "keep" };
        let s = seed_topo(tag);
        let mut dp = Dp::open(
            PREFIX,
            tag,
            &DatapathSettings {
                recheck_established: recheck,
                ..settings()
            },
        );
        s.apply(&mut dp, &seed());
        s.sync(&mut dp);
        let mut conn =
            tcp_connect(&s.ns("fe1"), ip(BE), 80, None, Duration::from_secs(1)).expect("connect");
        assert!(echo(&mut conn, b"before"));
        let mut c = seed();
        c.entries.retain(|e| e.endpoint != 2); // backend no longer admits frontend
        s.apply(&mut dp, &c);
        assert_eq!(echo(&mut conn, b"after"), !recheck, "recheck={recheck}");
        assert!(
            !tcp_ok(&s.ns("fe1"), ip(BE), 80),
            "new connections are denied either way"
        );
    }
}

#[test]
fn spoofed_source_address_cannot_leave_a_workload() {
    let Some(_turn) = privileged("spoofed_source_address_cannot_leave_a_workload") else {
        return;
    };
    let s = seed_topo("spoof");
    let mut dp = Dp::open(PREFIX, "spoofe2e", &settings());
    s.apply(
        &mut dp,
        &Compiled {
            entries: vec![],
            ..seed()
        },
    ); // no policy: only anti-spoofing
    s.sync(&mut dp);
    let db = s.ns("db");
    cmd::ip(&["-n", &db, "addr", "add", "10.201.0.99/24", "dev", "eth0"]);
    // database -> frontend-1:8080 is open (frontend's ingress has no policy).
    assert!(
        tcp_connect(&db, ip(FE1), 8080, Some(ip(DB)), Duration::from_millis(800)).is_some(),
        "registered source"
    );
    assert!(
        tcp_connect(
            &db,
            ip(FE1),
            8080,
            Some(ip("10.201.0.99")),
            Duration::from_millis(800)
        )
        .is_none(),
        "unregistered source"
    );
    assert!(dp.dp().counters()[&3].denied_spoof > 0);
}

#[test]
fn pinned_links_keep_enforcing_after_the_process_object_is_dropped() {
    let Some(_turn) = privileged("pinned_links_keep_enforcing_after_the_process_object_is_dropped")
    else {
        return;
    };
    let s = seed_topo("adopt");
    let fe1 = s.ns("fe1");
    let mut dp = Dp::open(PREFIX, "adopte2e", &settings());
    s.apply(&mut dp, &seed());
    s.sync(&mut dp);
    assert!(!tcp_ok(&fe1, ip(BE), 81));
    dp.forget(); // the Rust object and its fds are gone; pins remain
    assert!(!tcp_ok(&fe1, ip(BE), 81), "still enforced with no process");
    assert!(tcp_ok(&fe1, ip(BE), 80), "and still allowing");
    dp.reopen(&settings());
    assert!(dp.dp().adopted());
    s.sync(&mut dp); // nothing to do: the adopted links are live
    assert_eq!(dp.dp().attached().len(), 4);
    let mut c = seed();
    c.entries.push(allow(Egress, ID_BE, 6, 81, 2));
    c.entries.push(PolicyEntry {
        endpoint: 2,
        ..allow(Ingress, ID_FE, 6, 81, 3)
    });
    c.entries.sort();
    assert_eq!(s.apply(&mut dp, &c), 2);
    assert!(
        tcp_ok(&fe1, ip(BE), 81),
        "the next apply after adoption works"
    );
    // Detaching an interface that is no longer listed.
    let keep: Vec<Attachment> = s
        .attachments
        .iter()
        .copied()
        .filter(|a| a.slot != 3)
        .collect();
    let node = s.topo.node.clone();
    let k = dp.dp();
    in_ns(&node, || k.sync_attachments(&keep)).unwrap();
    assert_eq!(dp.dp().attached().len(), 3);
    dp.dp().detach_all().unwrap();
    assert!(
        tcp_ok(&s.ns("db"), ip(BE), 80),
        "no enforcement after detach_all"
    );
}

#[test]
fn clsact_fallback_enforces_the_same_policy() {
    let Some(_turn) = privileged("clsact_fallback_enforces_the_same_policy") else {
        return;
    };
    let s = seed_topo("tc");
    let mut dp = Dp::open(PREFIX, "clsact", &settings());
    dp.dp().set_force_clsact(true);
    s.apply(&mut dp, &seed());
    s.sync(&mut dp);
    assert!(dp
        .dp()
        .attached()
        .values()
        .all(|m| *m == netpol::datapath::kernel::AttachMode::Clsact));
    assert!(tcp_ok(&s.ns("fe1"), ip(BE), 80));
    assert!(!tcp_ok(&s.ns("fe1"), ip(BE), 81));
    assert!(!tcp_ok(&s.ns("db"), ip(BE), 80));
    dp.dp().detach_all().unwrap();
    assert!(tcp_ok(&s.ns("db"), ip(BE), 80));
}

/// The tc filters on `dev`'s `hook` in namespace `ns` (`tc filter show`).
fn tc_filters(ns: &str, dev: &str, hook: &str) -> String {
    cmd::ip(&[
        "netns", "exec", ns, "tc", "filter", "show", "dev", dev, hook,
    ])
}

#[test]
fn many_devices_are_enforced_through_cls_bpf_at_once_and_moved_to_tcx() {
    let Some(_turn) =
        privileged("many_devices_are_enforced_through_cls_bpf_at_once_and_moved_to_tcx")
    else {
        return;
    };
    use netpol::datapath::kernel::AttachMode;
    let s = seed_topo("mv");
    let mut dp = Dp::open(PREFIX, "move", &settings());
    // Four devices are more than none: cls_bpf first, as a cold start among
    // hundreds does with the default.
    dp.dp().set_direct_tcx_max(0);
    s.apply(&mut dp, &seed());
    s.sync(&mut dp);
    let modes = |dp: &mut Dp| dp.dp().attached().values().copied().collect::<Vec<_>>();
    assert_eq!(modes(&mut dp), vec![AttachMode::Clsact; 4]);
    assert!(
        tcp_ok(&s.ns("fe1"), ip(BE), 80),
        "allowed flow refused on cls_bpf"
    );
    assert!(
        !tcp_ok(&s.ns("db"), ip(BE), 80),
        "denied flow admitted on cls_bpf"
    );

    // The worker moves them; the datapath's owner finishes each move.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut said = Vec::new();
    while dp
        .dp()
        .attached()
        .values()
        .any(|m| *m == AttachMode::Clsact)
    {
        let k = dp.dp();
        assert!(
            std::time::Instant::now() < deadline,
            "still on cls_bpf after 20 s: {:?}, failures {:?}",
            k.attached(),
            k.upgrade_failures()
        );
        said.extend(dp.dp().maintain());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(modes(&mut dp), vec![AttachMode::Tcx; 4]);
    assert_eq!(dp.dp().upgrading(), 0);
    assert!(
        said.iter().any(|m| m.contains("from cls_bpf to tcx")),
        "no report of the move: {said:?}"
    );
    let links: Vec<String> = std::fs::read_dir(dp.pin.join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        links.len(),
        8,
        "one tcx link per device and hook: {links:?}"
    );
    assert!(links.iter().all(|l| l.starts_with("tcx-")), "{links:?}");
    for w in ["fe1", "fe2", "be", "db"] {
        let dev = s.topo.dev(w);
        for hook in ["ingress", "egress"] {
            let f = tc_filters(&s.topo.node, &dev, hook);
            assert!(
                !f.contains("bpf"),
                "{dev} {hook} keeps a cls_bpf filter:\n{f}"
            );
        }
    }
    assert!(
        tcp_ok(&s.ns("fe1"), ip(BE), 80),
        "allowed flow refused on tcx"
    );
    assert!(
        !tcp_ok(&s.ns("fe1"), ip(BE), 81),
        "denied port admitted on tcx"
    );
    assert!(
        !tcp_ok(&s.ns("db"), ip(BE), 80),
        "denied flow admitted on tcx"
    );

    // A later process adopts them as tcx, and a sync changes nothing.
    dp.forget();
    dp.reopen(&settings());
    assert_eq!(modes(&mut dp), vec![AttachMode::Tcx; 4]);
    s.sync(&mut dp);
    assert_eq!(modes(&mut dp), vec![AttachMode::Tcx; 4]);
    assert!(!tcp_ok(&s.ns("db"), ip(BE), 80));
    dp.dp().detach_all().unwrap();
    assert!(
        tcp_ok(&s.ns("db"), ip(BE), 80),
        "enforcement left after detach_all"
    );
}

/// Between changes the datapath fills the spare generation as the active
/// one is (netpold calls `maintain` on its idle tick), so the first change
/// after a start writes what changed instead of a whole new generation; the
/// change then enforces exactly the new state, and so does a change back.
#[test]
fn the_spare_generation_is_filled_between_changes_and_the_next_change_enforces_exactly() {
    let Some(_turn) = privileged(
        "the_spare_generation_is_filled_between_changes_and_the_next_change_enforces_exactly",
    ) else {
        return;
    };
    let s = seed_topo("spare");
    let mut dp = Dp::open(PREFIX, "spare", &settings());
    s.apply(&mut dp, &seed());
    s.sync(&mut dp);
    assert!(!dp.dp().spare_ready(), "a spare before the idle step");
    let said = dp.dp().maintain();
    assert!(said.is_none(), "{said:?}");
    assert!(dp.dp().spare_ready(), "no spare after the idle step");
    assert!(tcp_ok(&s.ns("fe1"), ip(BE), 80), "allowed flow refused");
    assert!(!tcp_ok(&s.ns("db"), ip(BE), 80), "denied flow admitted");
    assert!(
        tcp_ok(&s.ns("be"), ip(DB), 5432),
        "database closed before its policy"
    );

    // The change goes into the spare: database gets a policy (backend only).
    let db_policy = |allowed: &[u32]| {
        let mut c = seed();
        c.endpoints[3].default_deny_ingress = true;
        c.endpoints[3].enforced_ingress = true;
        for id in allowed {
            c.entries.push(PolicyEntry {
                endpoint: 3,
                ..allow(Ingress, *id, 6, 5432, 2)
            });
        }
        c.entries.sort();
        c
    };
    s.apply(&mut dp, &db_policy(&[ID_BE]));
    assert!(tcp_ok(&s.ns("be"), ip(DB), 5432), "the new allow refused");
    assert!(tcp_ok(&s.ns("fe1"), ip(BE), 80), "an unchanged allow lost");
    assert!(!tcp_ok(&s.ns("db"), ip(BE), 80), "an unchanged deny lost");
    // Then into the generation that was active at first, and back.
    s.apply(&mut dp, &db_policy(&[]));
    assert!(
        !tcp_ok(&s.ns("be"), ip(DB), 5432),
        "the new default deny not enforced"
    );
    s.apply(&mut dp, &seed());
    assert!(
        tcp_ok(&s.ns("be"), ip(DB), 5432),
        "the removed policy still enforced"
    );
    assert!(!tcp_ok(&s.ns("db"), ip(BE), 80), "an unchanged deny lost");
    dp.dp().detach_all().unwrap();
}

#[test]
fn generation_swaps_under_load_never_drop_allowed_or_admit_denied() {
    let Some(_turn) = privileged("generation_swaps_under_load_never_drop_allowed_or_admit_denied")
    else {
        return;
    };
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;
    let flips: u64 = std::env::var("NETPOL_SWAP_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let s = seed_topo("swap");
    let mut dp = Dp::open(PREFIX, "swap", &settings());
    // Two states that agree on frontend -> backend (80 allowed, 81 denied)
    // and differ elsewhere (database's policy, an extra CIDR identity).
    let a = seed();
    let mut b = seed();
    b.endpoints[3].default_deny_ingress = true;
    b.entries.push(PolicyEntry {
        endpoint: 3,
        ..allow(Ingress, ID_BE, 6, 5432, 2)
    });
    b.ipcache.push(IpcacheEntry {
        net: "10.203.0.0/16".parse().unwrap(),
        identity: 16_777_300,
        endpoint: None,
    });
    b.entries.sort();
    b.ipcache.sort();
    s.apply(&mut dp, &a);
    s.sync(&mut dp);

    let stop = Arc::new(AtomicBool::new(false));
    let echoes = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));
    let attempts = Arc::new(AtomicU64::new(0));
    let mut conn =
        tcp_connect(&s.ns("fe1"), ip(BE), 80, None, Duration::from_secs(1)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let allowed = {
        let (stop, echoes, failures) = (stop.clone(), echoes.clone(), failures.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let msg = format!("message {i:012}\n");
                if echo(&mut conn, msg.as_bytes()) {
                    echoes.fetch_add(1, Ordering::Relaxed);
                    // Continuous but paced: the machine is shared.
                    std::thread::sleep(Duration::from_micros(500));
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        })
    };
    let denied = {
        let (stop, admitted, attempts) = (stop.clone(), admitted.clone(), attempts.clone());
        let (fe2, db) = (s.ns("fe2"), s.ns("db"));
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // frontend-2 -> backend:81 (denied by frontend's egress and
                // backend's ingress), database -> backend:80 (backend's ingress).
                let (ns, port) = if n.is_multiple_of(2) {
                    (&fe2, 81)
                } else {
                    (&db, 80)
                };
                attempts.fetch_add(1, Ordering::Relaxed);
                if tcp_connect(ns, ip(BE), port, None, Duration::from_millis(150)).is_some() {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let started = std::time::Instant::now();
    for i in 0..flips {
        s.apply(&mut dp, if i % 2 == 0 { &b } else { &a });
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    allowed.join().unwrap();
    denied.join().unwrap();
    let ev = dp.dp().poll_events(1_000_000);
    let allowed_flow_drops = ev
        .iter()
        .filter(|e| {
            e.verdict == EventVerdict::Denied
                && (e.dport == 80 && e.src == ip(FE1) || e.sport == 80 && e.dst == ip(FE1))
        })
        .count();
    eprintln!(
        "{flips} flips in {elapsed:?}; {} echoes, {} denied attempts, {} drop events",
        echoes.load(Ordering::Relaxed),
        attempts.load(Ordering::Relaxed),
        ev.len()
    );
    assert_eq!(dp.dp().generation(), flips + 1);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "the allowed connection stalled"
    );
    assert!(echoes.load(Ordering::Relaxed) > 0);
    assert_eq!(
        allowed_flow_drops, 0,
        "packets of the allowed flow were dropped by policy"
    );
    assert_eq!(
        admitted.load(Ordering::Relaxed),
        0,
        "a denied connection was established"
    );
    assert!(attempts.load(Ordering::Relaxed) > 0);
    let counters = dp.dp().counters();
    assert!(
        counters[&2].denied_default > 0,
        "backend dropped the denied attempts: {counters:?}"
    );
}

#[test]
fn seed_files_compiled_by_the_core_enforce_on_real_traffic() {
    let Some(_turn) = privileged("seed_files_compiled_by_the_core_enforce_on_real_traffic") else {
        return;
    };
    let root = cmd::repo().join("etc/examples/seed");
    let policies =
        netpol::api::load_policy_dir(&root.join("netpol.d")).expect("seed policies parse");
    // The seed registry with this test's addresses and interface names.
    let reg_file = root.join("endpoints.d/seed.yaml");
    let text = std::fs::read_to_string(&reg_file)
        .unwrap()
        .replace("10.0.1.", "10.201.0.")
        .replace("fd00:1::", "fd01:201::")
        .replace("veth-", "npd-");
    let registry = netpol::api::parse_registry(&reg_file, &text).expect("seed registry parses");
    let opts = netpol::policy::compile::CompileOptions {
        node_name: "npd-node".into(),
        ..Default::default()
    };
    let mut compiled = netpol::policy::compile::compile(&policies, &registry, &opts);
    compiled.retain_local_entries();

    let s = seed_topo("core");
    let attachments = attachments(&s.topo, &compiled);
    assert_eq!(attachments.len(), 4, "{:?}", compiled.endpoints);
    let mut dp = Dp::open(PREFIX, "core", &settings());
    apply_and_attach(&mut dp, &s.topo, &compiled, &attachments);
    let (fe1, fe2, be, db) = (s.ns("fe1"), s.ns("fe2"), s.ns("be"), s.ns("db"));
    assert!(tcp_ok(&fe1, ip(BE), 80), "frontend-1 -> backend:80");
    assert!(tcp_ok(&fe2, ip(BE), 80), "frontend-2 -> backend:80");
    assert!(tcp_ok(&fe1, ip(BE_6), 80), "v6 frontend-1 -> backend:80");
    assert!(!tcp_ok(&fe1, ip(BE), 81), "frontend-1 -> backend:81");
    assert!(!tcp_ok(&fe1, ip(DB), 5432), "frontend-1 -> database");
    assert!(!tcp_ok(&db, ip(BE), 80), "database -> backend:80");
    assert!(tcp_ok(&be, ip(DB), 5432), "backend -> database");
    assert!(tcp_ok(&db, ip(FE1), 8080), "database -> frontend-1");
    assert!(!ping_ok(&fe1, ip(BE)), "no ICMP from frontend");
    assert!(ping_ok(&be, ip(DB)));
    // Drops name the rule behind them, or default deny.
    let ev = dp.dp().poll_events(1000);
    let drop81 = ev
        .iter()
        .find(|e| e.verdict == EventVerdict::Denied && e.dport == 81)
        .expect("a drop event for :81");
    assert_eq!(drop81.reason, EventReason::DefaultDeny);
}

#[test]
fn a_recreated_interface_is_attached_again_under_its_new_ifindex() {
    let Some(_turn) = privileged("a_recreated_interface_is_attached_again_under_its_new_ifindex")
    else {
        return;
    };
    let s = seed_topo("reif");
    let mut dp = Dp::open(PREFIX, "reif", &settings());
    s.apply(&mut dp, &seed());
    s.sync(&mut dp);
    let fe2 = s.ns("fe2");
    // Only frontend-2's own egress policy stops this one (database is open).
    assert!(!tcp_ok(&fe2, ip(DB), 5432));
    // Recreate frontend-2's veth: same name, new ifindex.
    let old = s.topo.ifindex("fe2");
    cmd::ip(&["-n", &s.topo.node, "link", "del", "npd-fe2"]);
    s.topo.plug("fe2");
    let new = s.topo.ifindex("fe2");
    assert_ne!(old, new);
    let attachments: Vec<Attachment> = s
        .attachments
        .iter()
        .map(|a| {
            if a.ifindex == old {
                Attachment {
                    slot: a.slot,
                    ifindex: new,
                }
            } else {
                *a
            }
        })
        .collect();
    apply_and_attach(&mut dp, &s.topo, &seed(), &attachments);
    assert!(dp.dp().attached().contains_key(&new));
    assert!(!dp.dp().attached().contains_key(&old));
    std::thread::sleep(Duration::from_millis(200));
    assert!(tcp_ok(&fe2, ip(BE), 80));
    assert!(!tcp_ok(&fe2, ip(DB), 5432), "enforced on the new device");
}

/// Not a test on its own: the child process of
/// `enforcement_survives_the_exit_of_the_process_that_attached`, run with
/// `--ignored --exact`; it attaches the seed scenario and exits.
#[test]
#[ignore = "helper process of enforcement_survives_the_exit_of_the_process_that_attached"]
fn child_attaches_and_exits() {
    let pin = PathBuf::from(std::env::var("NPD_CHILD_PIN").expect("NPD_CHILD_PIN"));
    let node = std::env::var("NPD_CHILD_NODE").expect("NPD_CHILD_NODE");
    let att: Vec<Attachment> = std::env::var("NPD_CHILD_ATT")
        .expect("NPD_CHILD_ATT")
        .split(',')
        .map(|p| {
            let (slot, ifindex) = p.split_once(':').unwrap();
            Attachment {
                slot: slot.parse().unwrap(),
                ifindex: ifindex.parse().unwrap(),
            }
        })
        .collect();
    let mut dp = KernelDatapath::open(&pin, &settings()).expect("open");
    dp.apply(&seed(), &att).expect("apply");
    in_ns(&node, || dp.sync_attachments(&att)).expect("attach");
    // Exit without detaching: the pins hold everything.
    std::process::exit(0);
}

#[test]
fn enforcement_survives_the_exit_of_the_process_that_attached() {
    let Some(_turn) = privileged("enforcement_survives_the_exit_of_the_process_that_attached")
    else {
        return;
    };
    let s = seed_topo("exit");
    let fe1 = s.ns("fe1");
    // The guard owns the pin dir; the child process fills it.
    let mut dp = Dp::open(PREFIX, "exit", &settings());
    dp.dp().detach_all().unwrap();
    dp.forget();
    let att = s
        .attachments
        .iter()
        .map(|a| format!("{}:{}", a.slot, a.ifindex))
        .collect::<Vec<_>>()
        .join(",");
    // The child test's name as libtest knows it: the module path without the crate.
    let child = format!(
        "{}::child_attaches_and_exits",
        module_path!().split_once("::").unwrap().1
    );
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", &child, "--nocapture"])
        .env("NPD_CHILD_PIN", &dp.pin)
        .env("NPD_CHILD_NODE", &s.topo.node)
        .env("NPD_CHILD_ATT", &att)
        .output()
        .expect("run the child process");
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dp.pin.join("links").read_dir().unwrap().count() == 8,
        "4 devices x 2 tcx links pinned"
    );
    assert!(
        !tcp_ok(&fe1, ip(BE), 81),
        "enforced after the attaching process exited"
    );
    assert!(tcp_ok(&fe1, ip(BE), 80));
    assert!(!tcp_ok(&s.ns("db"), ip(BE), 80));
    dp.reopen(&settings());
    assert!(dp.dp().adopted());
    assert_eq!(dp.dp().generation(), 1);
    assert_eq!(dp.dp().attached().len(), 4);
    let mut c = seed();
    c.endpoints[2].default_deny_ingress = false;
    assert_eq!(s.apply(&mut dp, &c), 2);
    assert!(
        tcp_ok(&s.ns("db"), ip(BE), 80),
        "the adopting process's apply takes effect"
    );
}

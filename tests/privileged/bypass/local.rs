//! One program's work when both ends are local (bpf/lib/bypass.h, bpf/README.md
//! "Both ends local"): the receiver's egress hook passes a flow it passed in
//! full on one lookup in its per-CPU cache, and nothing else grants that:
//! marks and tc_index set by the workload (SO_MARK, its own iptables, its own
//! tc program) or by the host (nftables, a tc program before ours), spoofed
//! replays of another workload's flow, a rewritten port ("DNAT") or a
//! rewritten destination ("reroute") all meet the full program.
//!
//! Every frame is sent from a thread pinned to one CPU: the cache is per CPU,
//! and the veth delivers a frame on the sender's CPU.

use std::net::IpAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use libbpf_rs::{MapCore, MapFlags, MapHandle};
use netpol::datapath::{Datapath, DatapathSettings};

use super::frames::{marker, Sniffer};
use super::wire::{self, TCP_ACK};
use super::{ip, slot, sport, Lab, A4, B4, C4, NEVER, SOON};
use crate::harness::dp::settings;
use crate::harness::netns::in_ns;
use crate::harness::require::Needs;

/// b admits `ports` (YAML port entries) from a and c; c admits only b; a has
/// no policy.
fn policy(ports: &str) -> String {
    format!(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: b, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: b}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: a}}}}, {{matchLabels: {{app: c}}}}]
    toPorts: [{{ports: [{ports}]}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: c, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: c}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: b}}}}]
"#
    )
}

/// b admits UDP and TCP 80.
fn udp_and_tcp_80() -> String {
    policy(r#"{port: "80", protocol: UDP}, {port: "80", protocol: TCP}"#)
}

/// Pins the calling thread to its current first CPU until dropped.
struct OneCpu(nix::sched::CpuSet);

impl OneCpu {
    fn pin() -> OneCpu {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        use nix::unistd::Pid;
        let before = sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
        let cpu = (0..CpuSet::count())
            .find(|&c| before.is_set(c).unwrap_or(false))
            .expect("a CPU");
        let mut one = CpuSet::new();
        one.set(cpu).unwrap();
        sched_setaffinity(Pid::from_raw(0), &one).expect("sched_setaffinity");
        OneCpu(before)
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.0);
    }
}

/// A cache entry as the kernel holds it (netpol_abi.h, struct np_bypass_entry).
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    proto: u8,
    in_ifindex: u32,
    out_ifindex: u32,
    generation: u32,
    slot: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

fn addr_at(b: &[u8], family: u8) -> IpAddr {
    if family == 4 {
        IpAddr::from(<[u8; 4]>::try_from(&b[..4]).unwrap())
    } else {
        IpAddr::from(<[u8; 16]>::try_from(&b[..16]).unwrap())
    }
}

/// Every non-empty entry of every CPU's cache.
fn cache(lab: &Lab) -> Vec<Entry> {
    let m = MapHandle::from_pinned_path(lab.dp.pin.join("maps/netpol_bypass_v1"))
        .expect("the pinned netpol_bypass_v1");
    let mut out = Vec::new();
    for k in 0..m.max_entries() {
        let Some(cpus) = m
            .lookup_percpu(&k.to_ne_bytes(), MapFlags::ANY)
            .expect("read netpol_bypass_v1")
        else {
            continue;
        };
        for v in cpus {
            let family = v[37];
            if family == 0 {
                continue;
            }
            out.push(Entry {
                src: addr_at(&v[0..16], family),
                dst: addr_at(&v[16..32], family),
                sport: u16_at(&v, 32),
                dport: u16_at(&v, 34),
                proto: v[36],
                in_ifindex: u32_at(&v, 40),
                out_ifindex: u32_at(&v, 44),
                generation: u32_at(&v, 48),
                slot: u32_at(&v, 52),
            });
        }
    }
    out
}

/// Conntrack keys at device `ifindex` of the flow with source port `sp`
/// (netpol_abi.h, struct np_ct_key: ports at 32 and 34, ifindex at 36).
fn ct_keys(lab: &Lab, ifindex: u32, sp: u16) -> Vec<Vec<u8>> {
    let m = MapHandle::from_pinned_path(lab.dp.pin.join("maps/netpol_ct_v2"))
        .expect("the pinned netpol_ct_v2");
    m.keys()
        .filter(|k| u32_at(k, 36) == ifindex && (u16_at(k, 32) == sp || u16_at(k, 34) == sp))
        .collect()
}

fn delete_ct(lab: &Lab, ifindex: u32, sp: u16) -> usize {
    let m = MapHandle::from_pinned_path(lab.dp.pin.join("maps/netpol_ct_v2"))
        .expect("the pinned netpol_ct_v2");
    let keys = ct_keys(lab, ifindex, sp);
    for k in &keys {
        m.delete(k).expect("delete a conntrack entry");
    }
    keys.len()
}

/// A UDP datagram `src:sp -> dst:dport` from workload `from` to `to`'s MAC,
/// carrying a fresh marker (returned).
fn udp(lab: &Lab, from: &str, to: &str, src: IpAddr, dst: IpAddr, sp: u16, dport: u16) -> Vec<u8> {
    let m = marker();
    let d = wire::udp(src, dst, sp, dport, &m);
    lab.send(from, to, &[], &wire::ip(src, dst, 17, &d));
    m
}

/// A TCP segment with ACK only (no SYN, FIN or RST: a cache candidate).
fn ack(lab: &Lab, from: &str, to: &str, src: IpAddr, dst: IpAddr, sp: u16, dport: u16) -> Vec<u8> {
    let m = marker();
    let seg = wire::tcp(src, dst, sp, dport, TCP_ACK, 7, 7, &m);
    lab.send(from, to, &[], &wire::ip(src, dst, 6, &seg));
    m
}

fn arrives(s: &Sniffer, m: &[u8]) -> bool {
    s.seen(m, SOON)
}

fn never(s: &Sniffer, m: &[u8]) -> bool {
    !s.seen(m, NEVER)
}

/// Run a command; panic with its stderr if it fails.
fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `nft -f -` in namespace `ns`.
fn nft(ns: &str, script: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -f - in {ns}:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Send a flow `a:sp -> b:80` until b's egress hook has it in its cache.
fn cached_flow(lab: &Lab, src: IpAddr, from: &str) -> u16 {
    let sp = sport();
    for _ in 0..3 {
        let m = udp(lab, from, "b", src, ip(B4), sp, 80);
        assert!(
            arrives(&lab.sniff_b, &m),
            "contrast: {from} -> b:80 arrives"
        );
    }
    assert!(
        cache(lab)
            .iter()
            .any(|e| e.src == src && e.sport == sp && e.dport == 80),
        "the flow {src}:{sp} -> b:80 is in the cache: {:?}",
        cache(lab)
    );
    sp
}

#[test]
fn both_ends_local_the_second_hook_passes_an_approved_flow_on_one_lookup() {
    let Some(_turn) = crate::harness::privileged(
        "both_ends_local_the_second_hook_passes_an_approved_flow_on_one_lookup",
    ) else {
        return;
    };
    let _cpu = OneCpu::pin();
    let mut lab = Lab::new("local", &udp_and_tcp_80());
    let (ia, ib) = (lab.topo.ifindex("a"), lab.topo.ifindex("b"));
    let sb = slot(&lab.compiled, "b");

    let sp = sport();
    for _ in 0..3 {
        let m = udp(&lab, "a", "b", ip(A4), ip(B4), sp, 80);
        assert!(arrives(&lab.sniff_b, &m), "a -> b:80 (allowed) arrives");
    }
    let generation = lab.dp.dp().generation() as u32;
    let mine: Vec<Entry> = cache(&lab).into_iter().filter(|e| e.sport == sp).collect();
    assert_eq!(
        mine,
        vec![Entry {
            src: ip(A4),
            dst: ip(B4),
            sport: sp,
            dport: 80,
            proto: 17,
            in_ifindex: ia,
            out_ifindex: ib,
            generation,
            slot: sb,
        }],
        "b's egress hook recorded the flow once, with both devices and the generation"
    );

    // While the entry holds, b's hook does not look conntrack up: with its
    // entry gone, the next packet passes (counted for b) and none comes back.
    assert_eq!(
        delete_ct(&lab, ib, sp),
        1,
        "b's conntrack entry of the flow"
    );
    let allowed = |lab: &mut Lab| {
        lab.dp
            .dp()
            .counters()
            .get(&sb)
            .map(|c| c.allowed)
            .unwrap_or(0)
    };
    let before = allowed(&mut lab);
    for _ in 0..5 {
        let m = udp(&lab, "a", "b", ip(A4), ip(B4), sp, 80);
        assert!(arrives(&lab.sniff_b, &m), "the cached flow passes");
    }
    // (b's own neighbour traffic may count too)
    let after = allowed(&mut lab);
    assert!(
        after >= before + 5,
        "counted as allowed for b: {before} -> {after}"
    );
    assert!(
        ct_keys(&lab, ib, sp).is_empty(),
        "passed on the cache alone: b's hook made no conntrack entry"
    );
    // A packet of the reverse tuple is no packet of the cached flow.
    let m = udp(&lab, "a", "b", ip(A4), ip(B4), 80, sp);
    assert!(
        never(&lab.sniff_b, &m),
        "a:80 -> b:{sp} is judged in full (b admits only port 80)"
    );

    // After a second the next packet is judged in full again: conntrack back.
    std::thread::sleep(Duration::from_millis(1100));
    let m = udp(&lab, "a", "b", ip(A4), ip(B4), sp, 80);
    assert!(arrives(&lab.sniff_b, &m), "allowed in full");
    assert_eq!(
        ct_keys(&lab, ib, sp).len(),
        1,
        "judged in full after the deadline: b's conntrack entry is back"
    );
    let m = udp(&lab, "a", "b", ip(A4), ip(B4), sp, 80);
    assert!(arrives(&lab.sniff_b, &m), "cached again");

    // A flip to a generation that denies the flow: the next packet is dropped
    // at b (recheck), the cache of the old generation is stale.
    lab.set_policy(&policy(r#"{port: "80", protocol: TCP}"#));
    let drops = lab.drops("b");
    let m = udp(&lab, "a", "b", ip(A4), ip(B4), sp, 80);
    assert!(
        never(&lab.sniff_b, &m),
        "a flow the new generation denies is dropped at its next packet"
    );
    assert!(lab.drops("b") > drops, "dropped by b's hook");
}

#[test]
fn local_bypass_off_the_second_hook_judges_every_packet() {
    let Some(_turn) =
        crate::harness::privileged("local_bypass_off_the_second_hook_judges_every_packet")
    else {
        return;
    };
    let _cpu = OneCpu::pin();
    let off = DatapathSettings {
        local_bypass: false,
        ..settings()
    };
    let lab = Lab::with_settings("localoff", &udp_and_tcp_80(), &off);
    let ib = lab.topo.ifindex("b");
    let sp = sport();
    for _ in 0..3 {
        let m = udp(&lab, "a", "b", ip(A4), ip(B4), sp, 80);
        assert!(arrives(&lab.sniff_b, &m), "a -> b:80 arrives");
    }
    assert!(cache(&lab).is_empty(), "nothing cached: {:?}", cache(&lab));
    assert_eq!(
        delete_ct(&lab, ib, sp),
        1,
        "b's conntrack entry of the flow"
    );
    let m = udp(&lab, "a", "b", ip(A4), ip(B4), sp, 80);
    assert!(arrives(&lab.sniff_b, &m), "allowed in full");
    assert_eq!(
        ct_keys(&lab, ib, sp).len(),
        1,
        "judged in full: b's hook made its conntrack entry again"
    );
}

/// A tcx program of 5 instructions that sets skb->mark and skb->tc_index to
/// all ones and passes (TCX_NEXT), attached to `dev` in `ns` at `egress` or
/// ingress, first (BPF_F_BEFORE) or last; detached when dropped.
struct MarkProg {
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl MarkProg {
    fn attach(ns: &str, dev: &str, egress: bool, first: bool) -> MarkProg {
        use libbpf_sys as sys;
        // struct __sk_buff: mark at 8, tc_index at 44.
        let insn = |code: u32, dst: u8, src: u8, off: i16, imm: i32| sys::bpf_insn {
            code: code as u8,
            _bitfield_align_1: [],
            _bitfield_1: sys::bpf_insn::new_bitfield_1(dst, src),
            off,
            imm,
        };
        let prog = [
            insn(sys::BPF_ALU64 | sys::BPF_MOV | sys::BPF_K, 2, 0, 0, -1),
            insn(sys::BPF_STX | sys::BPF_MEM | sys::BPF_W, 1, 2, 8, 0),
            insn(sys::BPF_STX | sys::BPF_MEM | sys::BPF_W, 1, 2, 44, 0),
            insn(sys::BPF_ALU64 | sys::BPF_MOV | sys::BPF_K, 0, 0, 0, -1),
            insn(sys::BPF_JMP | sys::BPF_EXIT, 0, 0, 0, 0),
        ];
        let attach_type = if egress {
            sys::BPF_TCX_EGRESS
        } else {
            sys::BPF_TCX_INGRESS
        };
        let dev = dev.to_string();
        in_ns(ns, move || {
            let mut opts = sys::bpf_prog_load_opts {
                sz: size_of::<sys::bpf_prog_load_opts>() as _,
                expected_attach_type: attach_type,
                ..Default::default()
            };
            // SAFETY: valid instructions, name and license for the call.
            let pfd = unsafe {
                sys::bpf_prog_load(
                    sys::BPF_PROG_TYPE_SCHED_CLS,
                    c"npy_mark".as_ptr(),
                    c"GPL".as_ptr(),
                    prog.as_ptr(),
                    prog.len() as _,
                    &mut opts,
                )
            };
            assert!(
                pfd >= 0,
                "load the mark program: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a new descriptor we own.
            let prog_fd = unsafe { OwnedFd::from_raw_fd(pfd) };
            let ifindex = nix::net::if_::if_nametoindex(dev.as_str()).expect("the device");
            let mut lopts = sys::bpf_link_create_opts {
                sz: size_of::<sys::bpf_link_create_opts>() as _,
                ..Default::default()
            };
            if first {
                lopts.flags = sys::BPF_F_BEFORE;
            }
            // SAFETY: a loaded program and a device of this namespace.
            let lfd = unsafe { sys::bpf_link_create(pfd, ifindex as _, attach_type, &lopts) };
            assert!(
                lfd >= 0,
                "attach the mark program to {dev}: {}",
                std::io::Error::last_os_error()
            );
            MarkProg {
                // SAFETY: a new descriptor we own.
                _link: unsafe { OwnedFd::from_raw_fd(lfd) },
                _prog: prog_fd,
            }
        })
    }
}

#[test]
fn marks_set_by_a_workload_or_the_host_grant_nothing_at_the_second_hook() {
    let Some(_turn) = Needs::privileged()
        .tools(&["iptables", "nft"])
        .check("marks_set_by_a_workload_or_the_host_grant_nothing_at_the_second_hook")
    else {
        return;
    };
    let _cpu = OneCpu::pin();
    let lab = Lab::new("localmark", &udp_and_tcp_80());
    let (na, node) = (lab.topo.ns("a"), lab.topo.node.clone());
    // Flows b's hook passes on its cache: a's and c's to b:80.
    let sp_a = cached_flow(&lab, ip(A4), "a");
    let sp_c = cached_flow(&lab, ip(C4), "c");

    // Everything that sets a mark or tc_index: in a's namespace (its own
    // iptables, its own tc program on eth0, SO_MARK below) and on the host
    // (nftables on the bridge, a tc program after ours on a's device and
    // one before ours on b's).
    run(&[
        "ip",
        "netns",
        "exec",
        &na,
        "iptables",
        "-t",
        "mangle",
        "-A",
        "OUTPUT",
        "-j",
        "MARK",
        "--set-mark",
        "0xffffffff",
    ]);
    let _workload_tc = MarkProg::attach(&na, "eth0", true, false);
    nft(
        &node,
        "table bridge npymark {\n chain npyfwd { type filter hook forward priority 0; meta mark set 0xffffffff; }\n}\n",
    );
    let _host_after_a = MarkProg::attach(&node, &lab.topo.dev("a"), false, false);
    let _host_before_b = MarkProg::attach(&node, &lab.topo.dev("b"), true, true);

    let mut denied = vec![
        // Crafted: a to b's denied ports, as cache candidates (UDP, a bare ACK).
        (
            "a -> b:22 udp",
            udp(&lab, "a", "b", ip(A4), ip(B4), sp_a, 22),
        ),
        (
            "a -> b:22 ack",
            ack(&lab, "a", "b", ip(A4), ip(B4), sp_a, 22),
        ),
        (
            "a -> b:81 udp",
            udp(&lab, "a", "b", ip(A4), ip(B4), sport(), 81),
        ),
        // A spoofed replay of c's cached flow, from a (a's hook drops it).
        (
            "a as c -> b:80 udp",
            udp(&lab, "a", "b", ip(C4), ip(B4), sp_c, 80),
        ),
    ];
    // Through a's stack with SO_MARK (and the mangle rule).
    let m = marker();
    let pa = sport();
    in_ns(&na, || {
        use nix::sys::socket::{setsockopt, sockopt};
        let s = std::net::UdpSocket::bind(("0.0.0.0", pa)).expect("bind");
        setsockopt(&s, sockopt::Mark, &0xffff_ffff).expect("SO_MARK");
        s.send_to(&m, (B4, 22)).expect("send");
    });
    denied.push(("a -> b:22 udp with SO_MARK", m));
    // Contrast: the same marks on the allowed flow change nothing either.
    let ok = udp(&lab, "a", "b", ip(A4), ip(B4), sp_a, 80);
    assert!(
        arrives(&lab.sniff_b, &ok),
        "contrast: a -> b:80 still arrives"
    );
    let passed: Vec<&str> = denied
        .iter()
        .filter(|(_, m)| !never(&lab.sniff_b, m))
        .map(|(w, _)| *w)
        .collect();
    assert!(passed.is_empty(), "BYPASS at b: {passed:?}");
}

#[test]
fn a_rewritten_port_or_destination_does_not_inherit_the_flows_approval() {
    let Some(_turn) = Needs::privileged()
        .tools(&["nft"])
        .check("a_rewritten_port_or_destination_does_not_inherit_the_flows_approval")
    else {
        return;
    };
    let _cpu = OneCpu::pin();
    let mut lab = Lab::new("localnat", &udp_and_tcp_80());
    let node = lab.topo.node.clone();
    let sp = cached_flow(&lab, ip(A4), "a");
    let mac_c = lab
        .topo
        .mac("c")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");

    // "DNAT" of the cached flow's packets after a's hook, before b's:
    // destination port 80 becomes 22, which b denies.
    nft(
        &node,
        &format!("table bridge npynat {{\n chain npypre {{ type filter hook prerouting priority -300; udp sport {sp} udp dport 80 udp dport set 22; }}\n}}\n"),
    );
    let drops_b = lab.drops("b");
    let m = udp(&lab, "a", "b", ip(A4), ip(B4), sp, 80);
    assert!(
        never(&lab.sniff_b, &m),
        "the flow's packet rewritten to b:22 is judged as what it now is"
    );
    assert!(lab.drops("b") > drops_b, "dropped by b's hook");
    // "Reroute": the same packets now go to c (its MAC and address), whose
    // hook has never passed this flow and denies a.
    nft(
        &node,
        &format!("flush table bridge npynat\ntable bridge npynat {{\n chain npypre {{ type filter hook prerouting priority -300; udp sport {sp} udp dport 80 ether daddr set {mac_c} ip daddr set {C4}; }}\n}}\n"),
    );
    let drops_c = lab.drops("c");
    let m = udp(&lab, "a", "b", ip(A4), ip(B4), sp, 80);
    assert!(
        never(&lab.sniff_c, &m) && never(&lab.sniff_b, &m),
        "the flow's packet sent to c is judged by c's hook, which denies a"
    );
    assert!(lab.drops("c") > drops_c, "dropped by c's hook");
    // Contrast: without the rewrite the flow passes again.
    nft(&node, "delete table bridge npynat\n");
    let m = udp(&lab, "a", "b", ip(A4), ip(B4), sp, 80);
    assert!(
        arrives(&lab.sniff_b, &m),
        "contrast: the flow passes unrewritten"
    );
}

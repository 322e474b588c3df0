//! Egress by DNS name end to end (issue 16): netpold enforcing a `toFQDNs`
//! policy with DNS rules, its transparent proxy fed by the datapath redirect
//! (socket assignment at the workload's device), against a real dnsmasq the
//! test runs in a namespace of its own, on several names with short TTLs.
//!
//! Lab (`npq` prefix, 10.209.7.0/24 on the node's bridge): `client` (DNS rules
//! `*.example.com`, toFQDNs `*.example.com` on TCP 80 and 9000), `client2`
//! (DNS rule `*`, toFQDNs `evil.example.org` only), `dns` (dnsmasq on .53,
//! an endpoint no policy selects) and `srv`, no endpoint (world), holding
//! every address the names answer, listening on 80 (accept and close) and
//! 9000 (accept and echo, kept open). Everything goes with the lab and the
//! dnsmasq guard, also on failure.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use netpol::dns::message;

use crate::harness::cmd::ip;
use crate::harness::lab::{Lab, Net};
use crate::harness::monitor::Monitor;
use crate::harness::netns::in_ns;
use crate::harness::probe::{connect_here, Probe};
use crate::harness::prom;
use crate::harness::Needs;

const NET: Net = Net {
    prefix: "npq",
    subnet: [10, 209, 7],
};
const NAMES: usize = 50;
/// netpold's metrics, in the lab's node namespace.
const METRICS: &str = "127.0.0.1:9953";

fn addr(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 209, 7, last)
}

/// dnsmasq in `ns`, killed on drop.
struct Dnsmasq(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hosts() -> String {
    let mut h = String::new();
    for i in 0..NAMES {
        h.push_str(&format!("{} n{i}.example.com\n", addr(100 + i as u8)));
    }
    for (last, name) in [
        (150, "example.com"),
        (151, "a.b.example.com"),
        (152, "evil.example.org"),
        (153, "late.example.com"),
        (154, "ttl.example.com"),
        (155, "keep.example.com"),
    ] {
        h.push_str(&format!("{} {name}\n", addr(last)));
    }
    h
}

fn start_dnsmasq(ns: &str) -> Dnsmasq {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = dir.path().join("hosts");
    std::fs::write(&file, hosts()).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "dnsmasq"])
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--log-facility=-",
            "--pid-file=",
            "--user=root",
            "--local-ttl=1",
            &format!("--listen-address={}", addr(53)),
            "--port=53",
            &format!("--addn-hosts={}", file.display()),
            // Outlives a restart of netpold.
            &format!("--host-record=restart.example.com,{},60", addr(156)),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq starts");
    Dnsmasq(child, dir)
}

/// One query from the calling thread's namespace to the lab's server:
/// (rcode, A addresses), or None without an answer within 2 s.
fn query(name: &str, tcp: bool) -> Option<(ResponseCode, Vec<Ipv4Addr>)> {
    let id = (Instant::now().elapsed().subsec_nanos() & 0xffff) as u16 ^ 0x5a5a;
    let q = message::build_query(id, &format!("{name}."), RecordType::A).unwrap();
    let server = SocketAddr::new(IpAddr::V4(addr(53)), 53);
    let raw = if tcp {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = (q.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&q);
        s.write_all(&out).ok()?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).ok()?;
        let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut m).ok()?;
        m
    } else {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.send_to(&q, server).ok()?;
        let mut buf = [0u8; 1500];
        let (n, from) = s.recv_from(&mut buf).ok()?;
        // The workload's resolver sees the server it asked answer.
        assert_eq!(
            from, server,
            "answer from {from}, not from the server asked"
        );
        buf[..n].to_vec()
    };
    let m = Message::from_vec(&raw).ok()?;
    assert_eq!(m.id(), id);
    let addrs = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    Some((m.response_code(), addrs))
}

/// A connect from the calling thread's namespace: the first SYN only (a
/// timeout below the first retransmission).
fn first_syn(ip: Ipv4Addr, port: u16) -> bool {
    connect_here(
        SocketAddr::new(IpAddr::V4(ip), port),
        Duration::from_millis(800),
    ) == Probe::Connected
}

/// Accept on 9000 in `ns` and echo, each connection on its own thread.
fn echo_server(ns: &str) -> std::net::TcpListener {
    let l = in_ns(ns, || std::net::TcpListener::bind("0.0.0.0:9000").unwrap());
    let c = l.try_clone().unwrap();
    std::thread::spawn(move || {
        for s in c.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    l
}

fn echoes(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut b = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping"
}

/// Wait (5 s at most) until each of netpold's metrics is at least its value.
fn metrics_reach(node: &str, want: &[(&str, f64)]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = in_ns(node, || prom::scrape(METRICS.parse().unwrap()));
        let fams = text.as_deref().map(prom::parse_exposition);
        let got: Vec<(&str, f64, f64)> = want
            .iter()
            .map(|(name, min)| {
                let v = match &fams {
                    Ok(Ok(f)) => prom::value(f, name, &[]).unwrap_or(0.0),
                    _ => 0.0,
                };
                (*name, v, *min)
            })
            .collect();
        if got.iter().all(|(_, v, min)| v >= min) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "metrics (name, got, want at least): {got:?}\n{text:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: fqdn-client
spec:
  endpointSelector:
    matchLabels: {app: client}
  egress:
  - toEndpoints:
    - matchLabels: {app: dns}
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns:
        - matchPattern: "*.example.com"
  - toFQDNs:
    - matchPattern: "*.example.com"
    toPorts:
    - ports: [{port: "80", protocol: TCP}, {port: "9000", protocol: TCP}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: fqdn-client2
spec:
  endpointSelector:
    matchLabels: {app: client2}
  egress:
  - toEndpoints:
    - matchLabels: {app: dns}
    toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules:
        dns:
        - matchPattern: "*"
  - toFQDNs:
    - matchName: evil.example.org
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#;

#[test]
fn fqdn_policy_learns_before_release_refuses_expires_and_survives_a_restart() {
    let Some(_turn) = Needs::privileged()
        .tools(&["dnsmasq"])
        .check("fqdn_policy_learns_before_release_refuses_expires_and_survives_a_restart")
    else {
        return;
    };
    let t0 = Instant::now();
    let mut lab = Lab::on(
        &NET,
        "dns",
        &[
            ("cl", "client", "client", 11),
            ("cl2", "client2", "client2", 12),
            ("dns", "dns", "dns", 53),
            ("srv", "srv", "srv", 99),
        ],
    );
    let srv = lab.w("srv").ns.clone();
    for last in 100..=156u8 {
        ip(&[
            "-n",
            &srv,
            "addr",
            "add",
            &format!("{}/24", addr(last)),
            "dev",
            "eth0",
        ]);
    }
    let _echo = echo_server(&srv);
    let _dnsmasq = start_dnsmasq(&lab.w("dns").ns);
    // srv is no endpoint: its addresses are world.
    let reg: String = lab
        .registry_yaml(&|_| String::new(), "")
        .split("---\n")
        .filter(|d| !d.contains("name: srv"))
        .map(|d| format!("{d}---\n"))
        .collect();
    crate::harness::daemon::write_atomic(&lab.path("endpoints.d/lab.yaml"), &reg);
    lab.write_config(&format!(
        "metrics_listen = \"{METRICS}\"\n[dns]\nmin_ttl_s = 1\n[conntrack]\ntcp_close_timeout_s = 1\n"
    ));
    lab.write_policy("fqdn.yaml", POLICY);
    lab.daemon.start();
    lab.daemon.wait_ready(3, Duration::from_secs(20));
    let (cl, cl2) = (lab.w("cl").ns.clone(), lab.w("cl2").ns.clone());
    let log = |lab: &Lab| lab.daemon.log_tail(80);

    // The server answers (the redirect is in place once a query is answered at all).
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_ns(&cl, || query("n0.example.com", false)).is_none() {
        assert!(
            Instant::now() < deadline,
            "no DNS answer through the proxy\n{}",
            log(&lab)
        );
    }

    // 1. Lookup, then at once a connect to the answer: the first SYN passes,
    // every time. 50 names (each first answer is new to learn), over UDP and,
    // every 10th, TCP; the TTL (1 s) and the short close timeout make later
    // rounds learn again.
    let mut latencies = Vec::new();
    let failures: Vec<String> = in_ns(&cl, || {
        let mut failures = Vec::new();
        for i in 0..200 {
            let name = format!("n{}.example.com", (i * 7) % NAMES);
            let t = Instant::now();
            let Some((rcode, addrs)) = query(&name, i % 10 == 9) else {
                failures.push(format!("{i}: {name}: no answer"));
                continue;
            };
            latencies.push(t.elapsed());
            if rcode != ResponseCode::NoError || addrs.len() != 1 {
                failures.push(format!("{i}: {name}: {rcode:?} {addrs:?}"));
                continue;
            }
            if !first_syn(addrs[0], 80) {
                failures.push(format!("{i}: {name} -> {}: first SYN dropped", addrs[0]));
            }
        }
        failures
    });
    latencies.sort();
    eprintln!(
        "dns: 200 lookups through the proxy, p50 {:?}, p99 {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
        latencies.last().unwrap()
    );
    assert!(failures.is_empty(), "{failures:?}\n{}", log(&lab));

    let monitor = Monitor::start(&lab);

    // 2. and 3. matchPattern as Cilium documents it: `*.example.com` is one
    // label before example.com, never example.com itself nor two labels; a
    // query no DNS rule allows is REFUSED and teaches nothing; `*` allows
    // every name.
    in_ns(&cl, || {
        for name in ["example.com", "a.b.example.com", "evil.example.org"] {
            let got = query(name, false).map(|a| a.0);
            assert_eq!(got, Some(ResponseCode::Refused), "{name}");
        }
        let got = query("evil.example.org", true).map(|a| a.0);
        assert_eq!(
            got,
            Some(ResponseCode::Refused),
            "evil.example.org over TCP"
        );
        // Addresses of names not allowed, or never looked up: denied.
        for (last, what) in [
            (150, "example.com"),
            (151, "a.b.example.com"),
            (152, "evil.example.org"),
            (153, "late.example.com"),
        ] {
            assert!(
                !first_syn(addr(last), 80),
                "{what} ({}) connected",
                addr(last)
            );
        }
    });
    in_ns(&cl2, || {
        let (rcode, addrs) = query("evil.example.org", false).expect("an answer");
        assert_eq!(
            (rcode, addrs.clone()),
            (ResponseCode::NoError, vec![addr(152)])
        );
        assert!(first_syn(addr(152), 80), "client2 -> evil.example.org");
        // `*` lets it look up n1.example.com, but no toFQDNs of client2 names it.
        let (rcode, addrs) = query("n1.example.com", false).expect("an answer");
        assert_eq!(rcode, ResponseCode::NoError);
        assert!(!first_syn(addrs[0], 9000), "client2 -> n1.example.com:9000");
    });

    // `monitor` shows the proxy's verdicts: a refusal with its reason, an
    // allowed answer with its addresses, TTL, endpoint and selectors.
    let dns_event = |what: &str, f: &dyn Fn(&serde_json::Value) -> bool| {
        monitor.wait(&lab, what, |v| !v["dns"].is_null() && f(&v["dns"]))["dns"].clone()
    };
    let refused = dns_event("refused evil.example.org.", &|d| {
        d["verdict"] == "refused" && d["name"] == "evil.example.org."
    });
    assert_eq!(
        refused["reason"], "no DNS rule of the endpoint allows this name",
        "{refused}"
    );
    assert!(
        refused["endpoint"]
            .as_str()
            .is_some_and(|e| e.ends_with("client")),
        "{refused}"
    );
    let allowed = dns_event("allowed evil.example.org.", &|d| {
        d["verdict"] == "allowed" && d["name"] == "evil.example.org."
    });
    assert_eq!(
        allowed["answers"],
        serde_json::json!([addr(152).to_string()]),
        "{allowed}"
    );
    assert_eq!(
        allowed["selectors"],
        serde_json::json!(["matchPattern: *"]),
        "{allowed}"
    );
    assert_eq!(allowed["server"], format!("{}:53", addr(53)), "{allowed}");
    assert!(allowed["ttl"].as_u64().is_some(), "{allowed}");
    drop(monitor);

    // Metrics count proxied queries, refusals and the datapath's redirects
    // (recorded each second): at least the probe, the 200 lookups, 4
    // refused and client2's 2 queries.
    let node = lab.node.clone();
    metrics_reach(
        &node,
        &[
            ("netpol_dns_queries_total", 207.0),
            ("netpol_dns_forwarded_total", 203.0),
            ("netpol_dns_refused_total", 4.0),
            ("netpol_dns_learn_addresses_total", 203.0),
            ("netpol_dns_answers_total", 203.0),
            ("netpol_dns_redirected_packets_total", 207.0),
        ],
    );

    // 4. TTL expiry: without a connection the address is denied again; an
    // open connection keeps it.
    let mut kept = in_ns(&cl, || {
        let (_, a) = query("ttl.example.com", false).expect("an answer");
        assert_eq!(a, vec![addr(154)]);
        let (_, a) = query("keep.example.com", false).expect("an answer");
        assert_eq!(a, vec![addr(155)]);
        TcpStream::connect_timeout(
            &SocketAddr::new(IpAddr::V4(addr(155)), 9000),
            Duration::from_secs(1),
        )
        .expect("keep.example.com:9000 connects")
    });
    assert!(echoes(&mut kept));
    std::thread::sleep(Duration::from_secs(5));
    in_ns(&cl, || {
        assert!(
            !first_syn(addr(154), 80),
            "ttl.example.com still allowed after its TTL"
        );
        assert!(
            first_syn(addr(155), 80),
            "keep.example.com expired under an open connection"
        );
    });
    assert!(echoes(&mut kept), "the open connection was cut");

    // 5. A restart keeps what was learned.
    in_ns(&cl, || {
        let (_, a) = query("restart.example.com", false).expect("an answer");
        assert_eq!(a, vec![addr(156)]);
    });
    lab.daemon.stop();
    lab.daemon.start();
    in_ns(&cl, || {
        assert!(
            first_syn(addr(156), 80),
            "restart.example.com denied after a restart"
        );
        assert!(
            !first_syn(addr(154), 80),
            "ttl.example.com allowed after a restart"
        );
    });
    assert!(
        echoes(&mut kept),
        "the open connection was cut by the restart"
    );
    // And the proxy of the new process answers.
    in_ns(&cl, || {
        let (rcode, a) = query("n3.example.com", false).expect("an answer after the restart");
        assert_eq!(rcode, ResponseCode::NoError);
        assert!(first_syn(a[0], 80));
    });

    // 6. Fail closed: netpold gone, its proxy socket with it: DNS of the
    // endpoint is dropped (never answered by the server directly), and
    // addresses never learned stay denied.
    lab.daemon.stop();
    in_ns(&cl, || {
        assert_eq!(
            query("n4.example.com", false),
            None,
            "DNS answered without the proxy"
        );
        assert!(!first_syn(addr(153), 80), "an unlearned address connected");
    });
    eprintln!("dns: test took {:?}", t0.elapsed());
}

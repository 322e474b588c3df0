//! The DNS proxy's offline tools through the real `netpolctl`: `fqdn list`
//! on a learned set saved as netpold saves it, `trace --to NAME` with that
//! file, and `monitor` printing a DNS verdict line from a stand-in daemon
//! socket. Unprivileged.
//!
//! The policies use `toCIDR`, not `toFQDNs`: this version still refuses
//! toFQDNs in files (docs/policy.md, "DNS names"); how a toFQDNs rule
//! decides is `policy::fqdn`'s unit tests'.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output};

use netpol::api::model::FqdnSelector;
use netpol::dns::event::{wire, DnsEvent, DnsVerdict};
use netpol::dns::learned::{LearnedConfig, LearnedSet};
use netpol::dns::message::Addr;

fn netpolctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netpolctl"))
        .args(args)
        .output()
        .expect("run netpolctl")
}

fn text(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: checkout}}
  egress:
    - toCIDR: [192.0.2.0/24]
      toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#;

const REGISTRY: &str = r#"
apiVersion: netpol/v1
kind: Endpoint
metadata: {name: checkout-1, namespace: shop, labels: {app: checkout}}
spec: {interface: veth-fq1, addresses: [10.0.1.1]}
"#;

/// A config, policy and registry directory, and a state_dir holding a
/// learned set: api.stripe.com → 192.0.2.1 (an hour), 198.51.100.5 (an hour).
fn setup(dir: &Path) {
    let state = dir.join("state");
    for d in ["pol", "eps", "state"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(dir.join("pol/p.yaml"), POLICY).unwrap();
    std::fs::write(dir.join("eps/e.yaml"), REGISTRY).unwrap();
    std::fs::write(
        dir.join("netpold.toml"),
        format!(
            "node_name = \"host-a\"\nstate_dir = \"{}\"\n",
            state.display()
        ),
    )
    .unwrap();
    let mut set = LearnedSet::new(LearnedConfig::default());
    let a = |ip: &str| Addr {
        ip: ip.parse().unwrap(),
        ttl: 3600,
    };
    set.learn(
        "shop/checkout-1",
        "api.stripe.com.",
        &[FqdnSelector::Name("api.stripe.com.".into())],
        &[a("192.0.2.1"), a("198.51.100.5")],
        now(),
    )
    .unwrap();
    set.save(&state).unwrap();
}

#[test]
fn fqdn_list_shows_what_the_proxy_learned() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let cfg = dir.path().join("netpold.toml");
    let (code, out, err) = text(&netpolctl(&[
        "fqdn",
        "list",
        "--config",
        cfg.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "NAME             ENDPOINT         ADDRESS       TTL    SELECTORS"
    );
    assert!(
        lines[1].starts_with("api.stripe.com.  shop/checkout-1  192.0.2.1     3")
            && lines[1].ends_with("s  matchName: api.stripe.com."),
        "{out}"
    );
    assert_eq!(lines[3], "2 addresses learned for 1 name");
    // --state-dir wins over the config; --json.
    let state = dir.path().join("state");
    let (code, out, _) = text(&netpolctl(&[
        "fqdn",
        "list",
        "--config",
        "/nonexistent.toml",
        "--state-dir",
        state.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(code, 0);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["names"][0]["addresses"][1]["address"], "198.51.100.5");
    assert_eq!(
        j["names"][0]["selectors"][0]["matchName"],
        "api.stripe.com."
    );
    // A broken file: an error naming it, exit 2.
    std::fs::write(state.join("dns-learned.json"), "{").unwrap();
    let (code, _, err) = text(&netpolctl(&[
        "fqdn",
        "list",
        "--state-dir",
        state.to_str().unwrap(),
    ]));
    assert_eq!(code, 2);
    assert!(
        err.contains("dns-learned.json is not a learned set of version 1"),
        "{err}"
    );
}

#[test]
fn trace_to_a_name_follows_each_learned_address() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let base = [
        "trace",
        "--config",
        &p("netpold.toml"),
        "--policy-dir",
        &p("pol"),
        "--endpoint-dir",
        &p("eps"),
        "--from",
        "shop/checkout-1",
        "--port",
        "443",
    ];
    let run =
        |to: &str, extra: &[&str]| text(&netpolctl(&[&base[..], &["--to", to], extra].concat()));
    // 192.0.2.1 is inside the toCIDR, 198.51.100.5 is not: denied as a whole.
    let (code, out, err) = run("API.Stripe.com", &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with("api.stripe.com. (192.0.2.1, 198.51.100.5): DENIED\n"),
        "{out}"
    );
    assert!(
        out.contains("-> 192.0.2.1 (cidr:192.0.2.0/24) tcp/443: ALLOWED"),
        "{out}"
    );
    assert!(out.contains("198.51.100.5"), "{out}");
    // No toFQDNs rule decided: no fqdn line.
    assert!(!out.contains("  fqdn "), "{out}");
    let (code, out, _) = run("api.stripe.com", &["--json"]);
    assert_eq!(code, 1);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["name"], "api.stripe.com.");
    assert_eq!(j["addresses"][0]["trace"]["verdict"], "allowed");
    assert_eq!(j["addresses"][1]["trace"]["verdict"], "denied");
    // A name nothing was learned for.
    let (code, out, _) = run("www.example.com", &[]);
    assert_eq!(code, 1);
    assert!(out.contains("no address is learned for this name"), "{out}");
    // An explicit --state-dir without the file: nothing learned.
    let empty = tempfile::tempdir().unwrap();
    let (code, out, _) = run(
        "api.stripe.com",
        &["--state-dir", empty.path().to_str().unwrap()],
    );
    assert_eq!(code, 1);
    assert!(out.contains("no address is learned"), "{out}");
    // Not a name at all: the usual error.
    let (code, _, err) = run("no_such*", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown endpoint \"no_such*\""), "{err}");
}

#[test]
fn monitor_prints_dns_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("netpold.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let ev = DnsEvent {
        time: "2026-12-06T22:40:00Z".into(),
        verdict: DnsVerdict::Refused,
        endpoint: Some("shop/checkout-1".into()),
        client: "10.0.1.1:40000".parse().unwrap(),
        server: "10.0.9.53:53".parse().unwrap(),
        transport: "udp".into(),
        name: Some("evil.example.".into()),
        qtype: Some("A".into()),
        answers: vec![],
        ttl: None,
        selectors: vec![],
        reason: Some("no DNS rule of the endpoint allows this name".into()),
    };
    let line = wire(&ev);
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut req = String::new();
        BufReader::new(conn.try_clone().unwrap())
            .read_line(&mut req)
            .unwrap();
        writeln!(conn, "{line}").unwrap();
        req
    });
    let (code, out, err) = text(&netpolctl(&["monitor", "--socket", sock.to_str().unwrap()]));
    let req = server.join().unwrap();
    assert!(req.contains("\"monitor\""), "{req}");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "2026-12-06T22:40:00Z refused  10.0.1.1:40000 -> 10.0.9.53:53 udp/53 shop/checkout-1 dns evil.example. A: no DNS rule of the endpoint allows this name\n"
    );
}

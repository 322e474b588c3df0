//! Two simulated nodes, one set of files: every workload pair, across and within
//! nodes, connects over real TCP exactly when `netpolctl matrix --json` (computed
//! offline from the same files) says it may.
//!
//! Topology (privileged; everything named `npn*`, addresses in 10.206.0.0/16 and
//! fd01:206::/64: workloads also have fd01:206::a:N / fd01:206::b:N, the link
//! fd01:206::ff:1-2, and every probe runs over IPv4 and IPv6):
//!
//! ```text
//!  npn-a00 … (10.206.1.10+)            npn-b00 … (10.206.2.10+)
//!     eth0                                eth0
//!      │ veth npnaNN                       │ veth npnbNN
//!  ┌───┴─ npn-nodeA ─────────┐        ┌───┴─ npn-nodeB ─────────┐
//!  │ bridge npn-br 10.206.1.1│        │ bridge npn-br 10.206.2.1│
//!  │ netpold (node-a)        │        │ netpold (node-b)        │
//!  │ npn-lab 10.206.255.1/30 ├────────┤ npn-lba 10.206.255.2/30 │
//!  └─────────────────────────┘        └─────────────────────────┘
//! ```
//!
//! Each node routes the other's workload subnet over the link. Each netpold runs
//! in its node's network namespace (`nsenter --net`, so it keeps the host's
//! /sys/fs/bpf) with its own pin_dir, runtime_dir, state_dir and node_name, and
//! reads its own copy of the same policy and registry files (Endpoints with
//! `spec.node`, Node documents for both nodes).
//!
//! Skips with a message without root/bpffs/iproute2, fails under `CI=true`
//! (`harness::privileged`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::harness::cmd::{ip, repo, NETPOLCTL};
use crate::harness::daemon::Daemon;
use crate::harness::netns::{sysctl, Netns};
use crate::harness::nodegen::{
    self, addresses, full_name, offline_matrix, GenEndpoint, Scenario, LETTER,
};
use crate::harness::privileged;
use crate::harness::probe::{self, Listeners, Probe};

/// The tests share the node namespace names: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const NODES: [(&str, &str, &str); 2] = [
    ("node-a", "npn-nodeA", "10.206.255.1"),
    ("node-b", "npn-nodeB", "10.206.255.2"),
];
fn workload_ns(e: &GenEndpoint) -> String {
    format!("npn-{}{:02}", LETTER[e.node_index], e.index)
}

/// Everything one scenario runs on. Field order is drop order: daemons stop
/// (and their pins go) before their namespaces, the temp dir last.
struct Cluster {
    daemons: Vec<Daemon>,
    _listeners: Vec<Listeners>,
    _net: Netns,
    tmp: tempfile::TempDir,
}

impl Cluster {
    fn build(sc: &Scenario) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut net = Netns::default();
        let mut listeners = Vec::new();
        for (n, (_, ns, link_addr)) in NODES.iter().enumerate() {
            net.add(ns);
            // No multicast snooping: IPv6 neighbour solicitations must not wait
            // for MLD reports to reach the bridge.
            ip(&[
                "-n",
                ns,
                "link",
                "add",
                "npn-br",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.206.{}.1/24", n + 1),
                "dev",
                "npn-br",
            ]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("fd01:206::{}:1/112", LETTER[n]),
                "dev",
                "npn-br",
                "nodad",
            ]);
            ip(&["-n", ns, "link", "set", "npn-br", "up"]);
            sysctl(ns, "net/ipv4/ip_forward", "1");
            sysctl(ns, "net/ipv6/conf/all/forwarding", "1");
            let _ = link_addr;
        }
        // The link between the nodes and the routes over it.
        ip(&[
            "-n", NODES[0].1, "link", "add", "npn-lab", "type", "veth", "peer", "name", "npn-lba",
            "netns", NODES[1].1,
        ]);
        ip(&[
            "-n",
            NODES[0].1,
            "addr",
            "add",
            "10.206.255.1/30",
            "dev",
            "npn-lab",
        ]);
        ip(&[
            "-n",
            NODES[1].1,
            "addr",
            "add",
            "10.206.255.2/30",
            "dev",
            "npn-lba",
        ]);
        ip(&[
            "-n",
            NODES[0].1,
            "addr",
            "add",
            "fd01:206::ff:1/126",
            "dev",
            "npn-lab",
            "nodad",
        ]);
        ip(&[
            "-n",
            NODES[1].1,
            "addr",
            "add",
            "fd01:206::ff:2/126",
            "dev",
            "npn-lba",
            "nodad",
        ]);
        ip(&["-n", NODES[0].1, "link", "set", "npn-lab", "up"]);
        ip(&["-n", NODES[1].1, "link", "set", "npn-lba", "up"]);
        ip(&[
            "-n",
            NODES[0].1,
            "route",
            "add",
            "10.206.2.0/24",
            "via",
            "10.206.255.2",
        ]);
        ip(&[
            "-n",
            NODES[1].1,
            "route",
            "add",
            "10.206.1.0/24",
            "via",
            "10.206.255.1",
        ]);
        ip(&[
            "-n",
            NODES[0].1,
            "-6",
            "route",
            "add",
            "fd01:206::b:0/112",
            "via",
            "fd01:206::ff:2",
        ]);
        ip(&[
            "-n",
            NODES[1].1,
            "-6",
            "route",
            "add",
            "fd01:206::a:0/112",
            "via",
            "fd01:206::ff:1",
        ]);
        // Workloads behind veths on their node's bridge.
        for e in &sc.endpoints {
            let (node_ns, wl) = (NODES[e.node_index].1, workload_ns(e));
            net.add(&wl);
            ip(&[
                "-n",
                node_ns,
                "link",
                "add",
                &e.interface,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &wl,
            ]);
            ip(&[
                "-n",
                node_ns,
                "link",
                "set",
                &e.interface,
                "master",
                "npn-br",
                "up",
            ]);
            ip(&[
                "-n",
                &wl,
                "addr",
                "add",
                &format!("{}/24", e.address),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &wl, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &wl,
                "route",
                "add",
                "default",
                "via",
                &format!("10.206.{}.1", e.node_index + 1),
            ]);
            if let Some(v6) = &e.address6 {
                ip(&[
                    "-n",
                    &wl,
                    "addr",
                    "add",
                    &format!("{v6}/112"),
                    "dev",
                    "eth0",
                    "nodad",
                ]);
                ip(&[
                    "-n",
                    &wl,
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("fd01:206::{}:1", LETTER[e.node_index]),
                ]);
            }
            listeners.push(Listeners::accepting(&wl, &nodegen::PROBE_PORTS));
        }
        // node-b itself listens too: traffic from and to a Node's own address.
        listeners.push(Listeners::accepting(NODES[1].1, &nodegen::PROBE_PORTS));
        // The harness itself: with nothing enforced yet, every pair connects.
        let jobs: Vec<(String, IpAddr, u16)> = sc
            .endpoints
            .iter()
            .flat_map(|s| {
                sc.endpoints
                    .iter()
                    .filter(move |d| d.name != s.name)
                    .map(move |d| (s, d))
            })
            .flat_map(|(s, d)| {
                addresses(d)
                    .into_iter()
                    .map(move |a| (workload_ns(s), a, 80))
            })
            .collect();
        let mut got = probe::probe_all(&jobs, Duration::from_secs(2), 96);
        // A first packet may wait for neighbour discovery on three links: once more.
        let again: Vec<usize> = (0..jobs.len())
            .filter(|&i| got[i] != Probe::Connected)
            .collect();
        let retry: Vec<(String, IpAddr, u16)> = again.iter().map(|&i| jobs[i].clone()).collect();
        if !retry.is_empty() {
            eprintln!(
                "network check: {} of {} first connects were slow, trying again: {:?}",
                retry.len(),
                jobs.len(),
                again.iter().map(|&i| got[i]).collect::<Vec<_>>()
            );
        }
        for (k, r) in probe::probe_all(&retry, Duration::from_secs(3), 96)
            .into_iter()
            .enumerate()
        {
            got[again[k]] = r;
        }
        let broken: Vec<String> = jobs
            .iter()
            .zip(&got)
            .filter(|(_, g)| **g != Probe::Connected)
            .map(|(j, g)| format!("{j:?}: {g:?}"))
            .collect();
        assert!(
            broken.is_empty(),
            "the test network is broken before any policy:\n{}",
            broken.join("\n")
        );
        // ONE set of files, copied unchanged to both nodes.
        let shared = tmp.path().join("shared");
        nodegen::write(sc, &shared.join("netpol.d"), &shared.join("endpoints.d"));
        let mut daemons = Vec::new();
        for (node, ns, _) in NODES {
            let root = tmp.path().join(node);
            let pin = Path::new("/sys/fs/bpf").join(format!("npn-{node}"));
            let mut d = Daemon::new(node, ns, &root, &pin);
            d.write_config(node, "resync_interval_s = 0\n");
            for sub in ["netpol.d", "endpoints.d"] {
                for f in std::fs::read_dir(shared.join(sub)).unwrap() {
                    let f = f.unwrap().path();
                    std::fs::copy(&f, root.join(sub).join(f.file_name().unwrap())).unwrap();
                }
            }
            d.spawn(&[]);
            daemons.push(d);
        }
        let mut c = Cluster {
            daemons,
            _listeners: listeners,
            _net: net,
            tmp,
        };
        for (n, d) in c.daemons.iter_mut().enumerate() {
            let local = sc.endpoints.iter().filter(|e| e.node_index == n).count();
            d.wait_ready(local, Duration::from_secs(30));
        }
        c
    }

    fn config(&self, n: usize) -> PathBuf {
        self.tmp.path().join(NODES[n].0).join("netpold.toml")
    }

    fn logs(&self) -> String {
        self.daemons
            .iter()
            .map(|d| format!("--- {} log:\n{}", d.name, d.log()))
            .collect()
    }
}

/// Real TCP for every ordered pair × probe port against the offline matrix.
fn check_against_matrix(c: &Cluster, sc: &Scenario) -> usize {
    let mut expected: BTreeMap<u16, BTreeMap<(String, String), bool>> = BTreeMap::new();
    for &port in &nodegen::PROBE_PORTS {
        let a = offline_matrix(&c.config(0), port);
        let b = offline_matrix(&c.config(1), port);
        assert_eq!(
            a, b,
            "the offline matrix for tcp/{port} differs between the nodes' configs"
        );
        expected.insert(port, a);
    }
    let (jobs, want, labels) = nodegen::matrix_probes(&sc.endpoints, &expected, &workload_ns);
    let t0 = Instant::now();
    let diffs = probe::mismatches(&jobs, &want, &labels, 96);
    let allowed = want.iter().filter(|w| **w).count();
    let cross = labels
        .iter()
        .filter(|l| l.contains("(node-a) →") && l.contains("(node-b) "))
        .count();
    eprintln!(
        "{} probes ({allowed} allowed, {cross} a→b) in {:?}",
        jobs.len(),
        t0.elapsed()
    );
    assert!(
        diffs.is_empty(),
        "{} of {} flows differ from the offline matrix:\n{}\n{}",
        diffs.len(),
        jobs.len(),
        diffs.join("\n"),
        c.logs()
    );
    assert!(
        allowed > 0 && allowed < jobs.len(),
        "a scenario with nothing allowed or nothing denied proves little"
    );
    jobs.len()
}

/// `netpolctl endpoints --json` on both nodes: the same identity for the same
/// endpoint, one identity per label set, local exactly on the endpoint's node.
fn check_endpoint_identities(c: &Cluster, sc: &Scenario) {
    let mut per_node: Vec<BTreeMap<String, (u64, bool)>> = Vec::new();
    for d in &c.daemons {
        let (code, out) = d.ctl(&["endpoints", "--json"]);
        assert_eq!(code, 0, "{}: netpolctl endpoints: {out}", d.name);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let list = v
            .as_array()
            .or_else(|| v["endpoints"].as_array())
            .unwrap_or_else(|| panic!("no endpoint list: {out}"));
        per_node.push(
            list.iter()
                .map(|e| {
                    let name = format!(
                        "{}/{}",
                        e["namespace"].as_str().unwrap_or("default"),
                        e["name"].as_str().unwrap()
                    );
                    (
                        name,
                        (
                            e["identity"].as_u64().unwrap(),
                            e["local"].as_bool().unwrap(),
                        ),
                    )
                })
                .collect(),
        );
    }
    assert_eq!(per_node[0].len(), sc.endpoints.len());
    let mut by_labels: BTreeMap<String, u64> = BTreeMap::new();
    for e in &sc.endpoints {
        let n = full_name(e);
        let (ia, la) = per_node[0][&n];
        let (ib, lb) = per_node[1][&n];
        assert_eq!(ia, ib, "{n}: identity differs between the nodes");
        assert_eq!(
            (la, lb),
            (e.node_index == 0, e.node_index == 1),
            "{n}: local flags"
        );
        let mut ls = e.labels.clone();
        ls.sort();
        let key = format!("{}:{ls:?}", e.namespace);
        let prev = by_labels.insert(key.clone(), ia);
        assert!(
            prev.is_none() || prev == Some(ia),
            "{key}: two identities for one label set"
        );
    }
    let distinct: std::collections::BTreeSet<u64> = by_labels.values().copied().collect();
    assert_eq!(
        distinct.len(),
        by_labels.len(),
        "different label sets share an identity"
    );
}

fn run(test: &str, sc: &Scenario) {
    let Some(_turn) = privileged(test) else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let c = Cluster::build(sc);
    eprintln!(
        "{test}: {} endpoints on two nodes ready in {:?}",
        sc.endpoints.len(),
        t0.elapsed()
    );
    check_endpoint_identities(&c, sc);
    check_against_matrix(&c, sc);
    check_node_peers(&c, sc);
}

/// `netpolctl trace` with node `n`'s config: allowed?
fn offline_trace(cfg: &Path, from: &str, to: &str, port: u16) -> bool {
    let o = std::process::Command::new(NETPOLCTL)
        .args([
            "trace",
            "--from",
            from,
            "--to",
            to,
            "--port",
            &port.to_string(),
            "--config",
        ])
        .arg(cfg)
        .output()
        .unwrap();
    match o.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "netpolctl trace {from} {to} {port}: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
    }
}

/// The Node documents at work in the kernel: node-b's own address (10.206.255.2,
/// the source of what node-b itself sends over the link) is `remote-node` on
/// node-a. Connections from node-b's host to node-a's workloads (judged by their
/// ingress on node-a) and from node-a's workloads to node-b's host (their egress)
/// follow `netpolctl trace` with node-a's config.
fn check_node_peers(c: &Cluster, sc: &Scenario) {
    let node_b = NODES[1].2;
    let cfg = c.config(0);
    let (mut jobs, mut want, mut what) = (Vec::new(), Vec::new(), Vec::new());
    for e in sc.endpoints.iter().filter(|e| e.node_index == 0) {
        for &port in &nodegen::PROBE_PORTS {
            jobs.push((
                NODES[1].1.to_string(),
                e.address.parse::<IpAddr>().unwrap(),
                port,
            ));
            want.push(offline_trace(&cfg, node_b, &e.address, port));
            what.push(format!("node-b ({node_b}) → {} tcp/{port}", full_name(e)));
            jobs.push((workload_ns(e), node_b.parse::<IpAddr>().unwrap(), port));
            want.push(offline_trace(&cfg, &e.address, node_b, port));
            what.push(format!("{} → node-b ({node_b}) tcp/{port}", full_name(e)));
        }
    }
    let diffs = probe::mismatches(&jobs, &want, &what, 96);
    eprintln!(
        "{} flows between node-a's workloads and node-b's own address ({} allowed)",
        jobs.len(),
        want.iter().filter(|w| **w).count()
    );
    assert!(
        diffs.is_empty(),
        "{} of {} flows differ from netpolctl trace:\n{}\n{}",
        diffs.len(),
        jobs.len(),
        diffs.join("\n"),
        c.logs()
    );
}

#[test]
fn seed_scenario_over_two_nodes_matches_the_offline_matrix() {
    let sc = nodegen::seed_spread(&nodegen::layout(true), &repo());
    run(
        "seed_scenario_over_two_nodes_matches_the_offline_matrix",
        &sc,
    );
}

#[test]
fn generated_scenario_over_two_nodes_matches_the_offline_matrix() {
    let sc = nodegen::generate(20261126, &nodegen::layout(true), 22, 24);
    assert!(sc.endpoints.len() >= 20 && sc.policies.len() >= 20);
    run(
        "generated_scenario_over_two_nodes_matches_the_offline_matrix",
        &sc,
    );
}

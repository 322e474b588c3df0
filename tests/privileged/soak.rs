//! Churn soak: random policy and registry changes every 100 ms while netpold
//! (real binary, kernel datapath) enforces on four workloads, with
//!
//! - continuous traffic: a TCP client loop frontend → backend:80, a flow every
//!   generated state allows (a constant policy file allows it on both ends and
//!   the generator never denies port 80): zero failures expected;
//! - sampled probes every ~2 s: changes pause, a marker endpoint in the
//!   registry tells when the daemon has applied the files, then random
//!   (source, destination, port) triples are probed with real TCP and compared
//!   with `netpolctl trace` on the same files: zero mismatches expected;
//! - the daemon's RSS and open descriptors after warm-up vs at the end: less
//!   than 20% growth (RSS: 20% or 2 MiB, whichever is more).
//!
//! Duration: `NETPOL_SOAK_SECS` (3600 for the one-hour run on demand); default
//! 300 s under `CI=true`, 30 s otherwise to keep local runs short. The
//! generator is deterministic: `NETPOL_SOAK_SEED` replays a run (the seed is
//! printed at start and in every failure).
//!
//! Privileged like the fault tests (skips without root unless CI=true), alone in
//! its binary; names use the `npf` prefix.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::daemon::write_atomic;
use crate::harness::lab::{Lab, PORTS};
use crate::harness::netns::enter;
use crate::harness::require::ci;
use crate::harness::rng::{clock_seed, env_seed, Rng};
use crate::harness::Needs;

const WORKLOADS: [(&str, &str, &str, u8); 4] = [
    ("fe", "frontend", "frontend", 11),
    ("be", "backend", "backend", 21),
    ("db", "database", "database", 31),
    ("ca", "cache", "cache", 41),
];
const APPS: [&str; 4] = ["frontend", "backend", "database", "cache"];
const TIERS: [&str; 2] = ["web", "data"];
const POLICY_FILES: u64 = 6;

/// Always present: frontend → backend:80 is allowed at both ends.
const ALWAYS: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: always
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: backend
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: frontend
      toPorts:
        - ports:
            - port: \"80\"
              protocol: TCP
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: always-egress
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: frontend
  egress:
    - toEndpoints:
        - matchLabels:
            app: backend
      toPorts:
        - ports:
            - port: \"80\"
              protocol: TCP
";

fn soak_secs() -> u64 {
    if let Some(s) = std::env::var("NETPOL_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return s;
    }
    if ci() {
        300
    } else {
        30
    }
}

/// A selector on an app or tier label.
fn selector(rng: &mut Rng, indent: &str) -> String {
    if rng.chance(70) {
        format!("{indent}matchLabels:\n{indent}  app: {}\n", rng.pick(&APPS))
    } else {
        format!(
            "{indent}matchLabels:\n{indent}  tier: {}\n",
            rng.pick(&TIERS)
        )
    }
}

/// A label a peer selector matches on.
fn label(rng: &mut Rng) -> (&'static str, &'static str) {
    if rng.chance(70) {
        ("app", *rng.pick(&APPS))
    } else {
        ("tier", *rng.pick(&TIERS))
    }
}

fn ports(rng: &mut Rng, allowed: &[u16], indent: &str) -> String {
    let mut s = format!("{indent}toPorts:\n{indent}  - ports:\n");
    let n = 1 + rng.below(allowed.len() as u64);
    let mut chosen: Vec<u16> = Vec::new();
    for _ in 0..n {
        let p = *rng.pick(allowed);
        if !chosen.contains(&p) {
            chosen.push(p);
        }
    }
    for p in chosen {
        let _ = write!(
            s,
            "{indent}      - port: \"{p}\"\n{indent}        protocol: TCP\n"
        );
    }
    s
}

/// A random policy: ingress or egress allows (any port, from endpoints, a tier,
/// or a CIDR), sometimes a deny on a port other than 80.
fn random_policy(rng: &mut Rng, name: &str) -> String {
    let mut y = format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  endpointSelector:\n");
    y.push_str(&selector(rng, "    "));
    let ingress = rng.chance(60);
    let (section, peers, cidr) = if ingress {
        ("ingress", "fromEndpoints", "fromCIDR")
    } else {
        ("egress", "toEndpoints", "toCIDR")
    };
    let _ = writeln!(y, "  {section}:");
    for _ in 0..1 + rng.below(2) {
        if rng.chance(15) {
            let _ = writeln!(
                y,
                "    - {cidr}:\n        - 10.209.1.{}/32",
                rng.pick(&[11u8, 21, 31, 41, 1])
            );
        } else {
            let (k, v) = label(rng);
            let _ = writeln!(
                y,
                "    - {peers}:\n        - matchLabels:\n            {k}: {v}"
            );
        }
        if rng.chance(75) {
            y.push_str(&ports(rng, &PORTS, "      "));
        }
    }
    if rng.chance(25) {
        let (deny, dpeers) = if ingress {
            ("ingressDeny", "fromEndpoints")
        } else {
            ("egressDeny", "toEndpoints")
        };
        let (k, v) = label(rng);
        let _ = writeln!(
            y,
            "  {deny}:\n    - {dpeers}:\n        - matchLabels:\n            {k}: {v}"
        );
        y.push_str(&ports(rng, &[5432, 8080], "      "));
    }
    y
}

/// The registry: the four workloads (random tier labels), 0-4 remote endpoints,
/// and the marker endpoint whose address tells which write the daemon applied.
fn registry(lab: &Lab, rng: &mut Rng, marker: u32) -> String {
    let tiers: Vec<Option<&str>> = (0..4)
        .map(|_| {
            if rng.chance(60) {
                Some(*rng.pick(&TIERS))
            } else {
                None
            }
        })
        .collect();
    let mut more = String::new();
    for i in 0..rng.below(5) {
        let _ = write!(
            more,
            "apiVersion: netpol/v1\nkind: Endpoint\nmetadata:\n  name: remote-{i}\n  labels:\n    app: {}\n    tier: {}\nspec:\n  node: node-b\n  addresses: [10.209.2.{}]\n---\n",
            rng.pick(&APPS),
            rng.pick(&TIERS),
            10 + i * 50 + rng.below(50)
        );
    }
    let _ = write!(
        more,
        "apiVersion: netpol/v1\nkind: Endpoint\nmetadata:\n  name: marker\n  labels:\n    app: marker\nspec:\n  node: node-b\n  addresses: [\"{}\"]\n",
        marker_addr(marker)
    );
    let names: Vec<String> = lab.workloads.iter().map(|w| w.name.clone()).collect();
    lab.registry_yaml(
        &|w| {
            let k = names.iter().position(|n| *n == w.name).unwrap();
            tiers[k]
                .map(|t| format!("    tier: {t}\n"))
                .unwrap_or_default()
        },
        &more,
    )
}

fn marker_addr(n: u32) -> String {
    format!("fd00:209::{:x}:{:x}", n >> 16, n & 0xffff)
}

#[test]
fn churn_soak() {
    // Alone: the soak counts every failed connection and measures growth.
    let Some(_turn) = Needs::privileged().alone().check("churn_soak") else {
        return;
    };
    let secs = soak_secs();
    let seed = env_seed("NETPOL_SOAK_SEED").unwrap_or_else(|| clock_seed() & 0xffff_ffff);
    eprintln!("churn soak: {secs} s, seed {seed} (NETPOL_SOAK_SEED={seed} to replay)");
    let mut rng = Rng::new(seed);
    let mut lab = Lab::new("soak", &WORKLOADS);
    lab.write_config("[events]\nallow_sample_rate = 0\n");
    lab.write_policy("always.yaml", ALWAYS);
    let mut marker = 1u32;
    write_atomic(
        &lab.path("endpoints.d/lab.yaml"),
        &registry(&lab, &mut rng, marker),
    );
    lab.daemon.start();

    // Continuous traffic on the always-allowed flow.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let ns = lab.w("fe").ns.clone();
        let dst = std::net::SocketAddr::from((lab.w("be").addr, 80));
        std::thread::spawn(move || {
            enter(&ns);
            let mut first_failure = None;
            while !stop.load(Ordering::Relaxed) {
                match std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(1)) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_failure.get_or_insert_with(|| {
                            format!("{:?}: {e}", std::time::SystemTime::now())
                        });
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(Duration::from_millis(20));
            }
            first_failure
        })
    };

    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let warmup = start + Duration::from_secs((secs / 10).clamp(5, 30));
    let mut baseline: Option<(u64, usize)> = None;
    let mut changes = 0u64;
    let mut probes = 0u64;
    let mut mismatches: Vec<String> = Vec::new();
    let mut next_probe = Instant::now() + Duration::from_secs(2);
    let mut wait_worst = Duration::ZERO;
    while Instant::now() < end && mismatches.is_empty() {
        // One random change.
        match rng.below(10) {
            0..=4 => {
                let k = rng.below(POLICY_FILES);
                let name = format!("gen-{k}");
                lab.write_policy(&format!("{name}.yaml"), &random_policy(&mut rng, &name));
            }
            5..=6 => {
                let k = rng.below(POLICY_FILES);
                let _ = std::fs::remove_file(lab.path(&format!("netpol.d/gen-{k}.yaml")));
            }
            _ => {
                marker += 1;
                write_atomic(
                    &lab.path("endpoints.d/lab.yaml"),
                    &registry(&lab, &mut rng, marker),
                );
            }
        }
        changes += 1;
        if baseline.is_none() && Instant::now() > warmup {
            baseline = Some(lab.daemon.rss_fds());
        }
        if Instant::now() >= next_probe {
            // Pause, mark the registry, wait for the daemon to apply exactly these files.
            marker += 1;
            changes += 1;
            write_atomic(
                &lab.path("endpoints.d/lab.yaml"),
                &registry(&lab, &mut rng, marker),
            );
            let t = Instant::now();
            let want = marker_addr(marker)
                .parse::<std::net::IpAddr>()
                .unwrap()
                .to_string();
            let deadline = t + Duration::from_secs(20);
            loop {
                let applied = lab
                    .daemon
                    .endpoints()
                    .iter()
                    .any(|e| e.name == "marker" && e.addresses.contains(&want));
                if applied {
                    break;
                }
                if let Some(s) = lab.daemon.status() {
                    if !s.errors.is_empty() {
                        panic!("seed {seed}: the generator wrote invalid files: {s:?}");
                    }
                    if let Some(e) = &s.datapath_error {
                        panic!(
                            "seed {seed}: the datapath refused a generated state: {e}\n{}",
                            lab.daemon.log_tail(40)
                        );
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "seed {seed}: marker {want} never applied\n{}",
                    lab.daemon.log_tail(40)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            // Quiet: the generation stays put for 300 ms.
            let mut g = lab.daemon.status().map(|s| s.generation);
            loop {
                std::thread::sleep(Duration::from_millis(300));
                let g2 = lab.daemon.status().map(|s| s.generation);
                if g2 == g {
                    break;
                }
                g = g2;
            }
            wait_worst = wait_worst.max(t.elapsed());
            let triples: Vec<(usize, usize, u16)> = (0..4)
                .map(|_| {
                    let a = rng.below(4) as usize;
                    let b = (a + 1 + rng.below(3) as usize) % 4;
                    (a, b, *rng.pick(&PORTS))
                })
                .collect();
            let lab_ref = &lab;
            let results: Vec<(String, bool, bool)> = std::thread::scope(|s| {
                let hs: Vec<_> = triples
                    .iter()
                    .map(|&(a, b, port)| {
                        s.spawn(move || {
                            let (src, dst) = (&lab_ref.workloads[a], &lab_ref.workloads[b]);
                            let tcp = lab_ref.connects_within(
                                &src.short,
                                &dst.short,
                                port,
                                Duration::from_millis(800),
                            );
                            let (code, out) = lab_ref.daemon.ctl(&[
                                "trace",
                                "--from",
                                &format!("default/{}", src.name),
                                "--to",
                                &format!("default/{}", dst.name),
                                "--port",
                                &port.to_string(),
                            ]);
                            assert!(
                                code == 0 || code == 1,
                                "netpolctl trace failed ({code}): {out}"
                            );
                            (
                                format!("{} -> {}:{port}", src.name, dst.name),
                                tcp,
                                code == 0,
                            )
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (what, tcp, trace) in results {
                probes += 1;
                if tcp != trace {
                    let mut files = String::new();
                    for e in std::fs::read_dir(lab.path("netpol.d")).unwrap().flatten() {
                        let _ = write!(
                            files,
                            "--- {}\n{}\n",
                            e.path().display(),
                            std::fs::read_to_string(e.path()).unwrap_or_default()
                        );
                    }
                    mismatches.push(format!(
                        "{what}: tcp {} but trace says {}\n{files}",
                        if tcp { "connects" } else { "refused" },
                        if trace { "allowed" } else { "denied" }
                    ));
                }
            }
            next_probe = Instant::now() + Duration::from_secs(2);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Final figures once quiet.
    std::thread::sleep(Duration::from_millis(1000));
    let after = lab.daemon.rss_fds();
    stop.store(true, Ordering::Relaxed);
    let first_failure = traffic.join().unwrap();
    let status = lab.daemon.status().unwrap_or_default();
    let (rss0, fds0) = baseline.unwrap_or(after);
    let (rss1, fds1) = after;
    eprintln!(
        "churn soak (seed {seed}): {:.0} s, {changes} changes written, generation {}, {probes} probes, {} mismatches, \
         traffic {} ok / {} failed, RSS {rss0} -> {rss1} KiB, fds {fds0} -> {fds1}, longest wait for an apply {wait_worst:?}",
        start.elapsed().as_secs_f64(),
        status.generation,
        mismatches.len(),
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert!(
        mismatches.is_empty(),
        "seed {seed}: kernel and netpolctl trace disagree:\n{}",
        mismatches.join("\n")
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "seed {seed}: the always-allowed flow failed (first: {first_failure:?})\n{}",
        lab.daemon.log_tail(40)
    );
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert!(probes > 0);
    assert!(
        rss1 * 100 <= rss0 * 120 || rss1 <= rss0 + 2048,
        "seed {seed}: RSS grew: {rss0} -> {rss1} KiB"
    );
    assert!(
        fds1 * 100 <= fds0 * 120,
        "seed {seed}: open fds grew: {fds0} -> {fds1}"
    );
    assert!(lab.daemon.exited().is_none(), "netpold exited");
}

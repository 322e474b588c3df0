//! Privileged end-to-end tests of netpold's kernel-facing parts: real netlink in a
//! private network namespace, and (once the kernel datapath is built in) the
//! daemon enforcing the seed scenario on real TCP between network namespaces.
//!
//! Needs root and bpffs. Without them the tests skip with a message, unless
//! `CI=true`, where they fail (`harness::privileged`). Every namespace, link and
//! pin is named with the `npe` prefix and removed by a guard, also on failure.

use std::collections::BTreeMap;
use std::time::Duration;

use netpol::daemon::netlink::{Links, NetlinkLinks};

use crate::harness::cmd::{ip, repo};
use crate::harness::lab::{Lab, Net};
use crate::harness::monitor::Monitor;
use crate::harness::privileged;

/// Run `f` on a thread of its own in a fresh, private network namespace (gone when
/// the thread ends), with a current-thread tokio runtime.
fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

#[test]
fn netlink_follows_links_appearing_going_and_coming_back() {
    let Some(_turn) = privileged("netlink_follows_links_appearing_going_and_coming_back") else {
        return;
    };
    in_private_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let log = netpol::logging::discard();
            let mut links = NetlinkLinks;
            let mut rx = links.subscribe(&log).await.unwrap();
            assert_eq!(
                rx.borrow().links.keys().cloned().collect::<Vec<_>>(),
                ["lo"]
            );
            let (conn, handle, _) = rtnetlink::new_connection().unwrap();
            tokio::spawn(conn);
            let add_veth = || {
                handle
                    .link()
                    .add()
                    .veth("npe-d0".into(), "npe-d0p".into())
                    .execute()
            };

            async fn wait_until(
                rx: &mut tokio::sync::watch::Receiver<netpol::daemon::netlink::LinkTable>,
                what: &str,
                f: impl Fn(&BTreeMap<String, u32>) -> bool,
            ) -> BTreeMap<String, u32> {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                loop {
                    let cur = rx.borrow_and_update().links.clone();
                    if f(&cur) {
                        return cur;
                    }
                    if tokio::time::timeout_at(deadline, rx.changed())
                        .await
                        .is_err()
                    {
                        panic!("timed out waiting for {what}; links: {cur:?}");
                    }
                }
            }

            add_veth().await.unwrap();
            let t = wait_until(&mut rx, "npe-d0 to appear", |l| l.contains_key("npe-d0")).await;
            let first = t["npe-d0"];
            handle.link().del(first).execute().await.unwrap();
            wait_until(&mut rx, "npe-d0 to go", |l| !l.contains_key("npe-d0")).await;
            add_veth().await.unwrap();
            let t = wait_until(&mut rx, "npe-d0 to come back", |l| l.contains_key("npe-d0")).await;
            assert_ne!(t["npe-d0"], first, "a recreated link has a new ifindex");

            // Addresses and routes follow too (interface: auto, host addresses).
            let idx = t["npe-d0"];
            handle.link().set(idx).up().execute().await.unwrap();
            handle
                .address()
                .add(idx, "10.202.9.1".parse().unwrap(), 24)
                .execute()
                .await
                .unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                {
                    let cur = rx.borrow_and_update();
                    if cur.addresses.contains(&"10.202.9.1".parse().unwrap())
                        && cur.route_device("10.202.9.7".parse().unwrap()) == Some(idx)
                    {
                        break;
                    }
                }
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    panic!(
                        "timed out waiting for the address and route: {:?}",
                        rx.borrow()
                    );
                }
            }
        });
    });
}

// ------------------------------------------------------------------ the daemon e2e

/// The seed scenario's workloads, 10.202.1.0/24, names `npe-*`.
const NET: Net = Net {
    prefix: "npe",
    subnet: [10, 202, 1],
};
const SEED: [(&str, &str, &str, u8); 3] = [
    ("fe1", "frontend-1", "frontend", 11),
    ("be", "backend", "backend", 21),
    ("db", "database", "database", 31),
];

/// A seed policy file, written beside and renamed in as a package manager would.
fn add_policy(lab: &Lab, name: &str) {
    let src = repo().join("etc/examples/seed/netpol.d").join(name);
    lab.write_policy(name, &std::fs::read_to_string(src).unwrap());
}

/// The ifindex the daemon enforces `name` on.
fn ifindex(lab: &Lab, name: &str) -> Option<u32> {
    lab.daemon
        .endpoints()
        .into_iter()
        .find(|e| e.name == name)
        .and_then(|e| e.ifindex)
}

#[test]
fn daemon_enforces_the_seed_scenario_across_restarts_and_broken_files() {
    let Some(_turn) =
        privileged("daemon_enforces_the_seed_scenario_across_restarts_and_broken_files")
    else {
        return;
    };
    let mut lab = Lab::on(&NET, "e2e", &SEED);
    lab.daemon.start();
    let open = [
        ("frontend-1", "backend", 80, true),
        ("database", "backend", 80, true),
        ("frontend-1", "database", 5432, true),
    ];
    lab.expect("no policy: everything connects", &open);
    let (code, table) = lab.daemon.ctl(&["endpoints"]);
    assert_eq!(code, 0);
    assert_eq!(
        table.lines().filter(|l| l.contains("attached")).count(),
        3,
        "{table}"
    );

    let g = lab.daemon.status().unwrap().generation;
    add_policy(&lab, "frontend-to-backend.yaml");
    lab.daemon.wait_status("frontend-to-backend applied", |s| {
        s.generation > g && s.policies == 1
    });
    let seed1 = [
        ("database", "backend", 80, false),
        ("frontend-1", "backend", 80, true),
        ("frontend-1", "database", 5432, true),
    ];
    lab.expect("frontend-to-backend", &seed1);

    // netpolctl monitor shows the drop, at backend, by default deny.
    let mon = Monitor::start(&lab);
    assert!(!lab.connects("database", "backend", 80));
    let event = mon.wait(&lab, "denied", |v| {
        v["verdict"] == "denied" && v["dst"] == "10.202.1.21"
    });
    drop(mon);
    assert_eq!(event["endpoint"], "default/backend", "{event}");
    assert_eq!(event["reason"], "default-deny", "{event}");
    assert_eq!(event["src"], "10.202.1.31", "{event}");
    assert_eq!(
        (event["proto"].as_str(), event["dport"].as_u64()),
        (Some("tcp"), Some(80)),
        "{event}"
    );

    add_policy(&lab, "frontend-egress-control.yaml");
    lab.daemon
        .wait_status("frontend-egress-control applied", |s| s.policies == 2);
    let seed2 = [
        ("database", "backend", 80, false),
        ("frontend-1", "backend", 80, true),
        ("frontend-1", "database", 5432, false),
    ];
    lab.expect("frontend-egress-control", &seed2);

    let broken = lab.path("netpol.d/broken.yaml");
    std::fs::write(&broken, "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: broken}\nspec:\n  endpointSelector: {}\n  ingres: []\n").unwrap();
    lab.daemon.wait_status("the broken file reported", |s| {
        s.degraded && !s.errors.is_empty()
    });
    let (code, json) = lab.daemon.ctl(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["errors"][0]["file"],
        broken.display().to_string(),
        "{json}"
    );
    assert_eq!(v["degraded"], true);
    lab.expect("a broken file changes nothing", &seed2);

    lab.daemon.kill9();
    lab.expect("kill -9 leaves enforcement in place", &seed2);

    lab.daemon.start();
    let s = lab.daemon.wait_status("restarted", |s| s.ready);
    assert!(s.degraded && s.policies_from_last_good, "{s:?}");
    lab.expect("restarted with a broken file: the last valid set", &seed2);

    // backend's interface goes away and comes back with a new ifindex: released,
    // then enforced again on the new device.
    let old_ifindex = ifindex(&lab, "backend");
    ip(&["-n", &lab.node, "link", "del", "veth-be"]);
    lab.daemon
        .wait_status("backend pending", |s| s.pending == 1 && s.attached == 2);
    lab.plug("be");
    lab.daemon.wait_status("backend attached again", |s| {
        s.pending == 0 && s.attached == 3
    });
    assert_ne!(ifindex(&lab, "backend"), old_ifindex);
    lab.expect("the recreated interface is enforced", &seed2);

    for f in [
        "broken.yaml",
        "frontend-to-backend.yaml",
        "frontend-egress-control.yaml",
    ] {
        std::fs::remove_file(lab.path("netpol.d").join(f)).unwrap();
    }
    lab.daemon
        .wait_status("policies removed", |s| s.policies == 0 && !s.degraded);
    lab.expect("policies removed: everything connects", &open);
}

/// A staged deny-all on backend (docs/policy.md, "Staged policies"): traffic to
/// backend passes, each would-be drop is an audit event attributed to the
/// staged policy; with the annotation removed the same flows are denied.
#[test]
fn staged_deny_all_passes_and_reports_then_denies_once_enforced() {
    let Some(_turn) = privileged("staged_deny_all_passes_and_reports_then_denies_once_enforced")
    else {
        return;
    };
    let mut lab = Lab::on(&NET, "staged", &SEED);
    lab.daemon.start();
    let policy = |annotations: &str| {
        format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: backend-lockdown\n{annotations}spec:\n  endpointSelector:\n    matchLabels: {{app: backend}}\n  ingress:\n    - {{}}\n")
    };
    let file = lab.path("netpol.d/lockdown.yaml");
    let g = lab.daemon.status().unwrap().generation;
    lab.write_policy(
        "lockdown.yaml",
        &policy("  annotations:\n    netpol.io/audit: \"true\"\n"),
    );
    lab.daemon.wait_status("the staged policy applied", |s| {
        s.generation > g && s.policies == 1
    });
    let flows = [
        ("frontend-1", "backend", 80u16),
        ("database", "backend", 5432),
    ];
    let staged: Vec<_> = flows.iter().map(|(f, t, p)| (*f, *t, *p, true)).collect();

    let monitor = Monitor::start(&lab);
    lab.expect("staged: everything still connects", &staged);
    for (from, _, port) in flows {
        let src = lab.w(from).addr.to_string();
        let ev = monitor.wait(&lab, "audit", |v| {
            v["verdict"] == "audit" && v["src"] == src.as_str() && v["dport"] == port
        });
        assert_eq!(ev["endpoint"], "default/backend", "{ev}");
        assert_eq!(ev["dst"], lab.w("backend").addr.to_string(), "{ev}");
        assert_eq!(ev["reason"], "default-deny", "{ev}");
        assert_eq!(ev["direction"], "ingress", "{ev}");
        assert_eq!(ev["rule"]["policy"], "default/backend-lockdown", "{ev}");
        assert_eq!(ev["rule"]["file"], file.display().to_string(), "{ev}");
        assert_eq!(ev["rule"]["path"], "spec", "{ev}");
        assert_eq!(
            (&ev["rule"]["staged"], &ev["rule"]["default_deny"]),
            (&serde_json::json!(true), &serde_json::json!(true)),
            "{ev}"
        );
    }
    drop(monitor);
    let backend = lab
        .daemon
        .endpoints()
        .into_iter()
        .find(|e| e.name == "backend")
        .unwrap();
    assert!(!backend.ingress_default_deny, "{backend:?}");
    assert!(backend.counters.audit >= 2, "{backend:?}");
    assert_eq!(backend.counters.denied_default, 0, "{backend:?}");

    // Enforced: the same flows are refused, and reported as drops.
    let g = lab.daemon.status().unwrap().generation;
    lab.write_policy("lockdown.yaml", &policy(""));
    lab.daemon.wait_status("the policy enforced", |s| {
        s.generation > g && s.policies == 1
    });
    let monitor = Monitor::start(&lab);
    let enforced: Vec<_> = flows.iter().map(|(f, t, p)| (*f, *t, *p, false)).collect();
    lab.expect("enforced: backend refuses them", &enforced);
    let src = lab.w("frontend-1").addr.to_string();
    let ev = monitor.wait(&lab, "denied", |v| {
        v["verdict"] == "denied" && v["src"] == src.as_str()
    });
    assert_eq!(
        (ev["reason"].as_str(), ev["rule"].is_null()),
        (Some("default-deny"), true),
        "{ev}"
    );
    drop(monitor);
    lab.expect(
        "backend's own egress is not touched",
        &[("backend", "database", 5432, true)],
    );
}

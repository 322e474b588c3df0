//! Fleet mode with real nodes: one etcd the test starts, three netpold, each in
//! its own node namespace with its own workloads and only its own endpoint
//! files, one set of policy files copied to all three. Every node learns the
//! others' endpoints through etcd and enforces them by label; etcd faults,
//! restarts, lease expiry, compaction, bad entries and churn are handled as
//! DESIGN §5a says, seen through real TCP, `netpolctl status --json` and etcd.
//!
//! ```text
//!        etcd 10.207.0.1 (bridge npg-hub in npg-<pid>-hub)
//!     ┌──────────────┬───────────────┬──────────────┐
//!  10.207.0.10    10.207.0.11     10.207.0.12          (veth npgl<N> ↔ npgh<N>)
//!  node-a         node-b          node-c               (npg-<pid>-n<N>, bridge npgbr)
//!  10.207.1.0/24  10.207.2.0/24   10.207.3.0/24        workloads npg-<pid>-<letter><NN>
//! ```
//!
//! The nodes route each other's workload subnets over the hub. The whole test
//! is one scenario (a cluster takes a while to build): the seed scenario's
//! endpoints and policies plus a generated set (≥ 30 endpoints, ≥ 30
//! policies), spread over the three nodes. Skips with a message without
//! root/bpffs/iproute2/etcd, fails under `CI=true`.

#![cfg(feature = "etcd")]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::cmd::{ip, repo, NETPOLCTL};
use crate::harness::daemon::{write_atomic, Daemon};
use crate::harness::etcd::Etcd;
use crate::harness::netns::{in_ns, sysctl, Netns};
use crate::harness::nodegen::{self, offline_matrix, GenEndpoint, Layout, LETTER};
use crate::harness::probe::{self, Listeners};
use crate::harness::topo::{Names, Topo};
use crate::harness::Needs;

const P: &str = "/netpol/v1";
const NODES: [(&str, &str); 3] = [
    ("node-a", "10.207.0.10"),
    ("node-b", "10.207.0.11"),
    ("node-c", "10.207.0.12"),
];
/// Ports the matrix is probed on (named by policies, in the range, by nothing).
const PORTS: [u16; 4] = [80, 5432, 9005, 7777];
const LEASE_TTL_S: u64 = 8;
const HOLD_S: u64 = 3;

fn address(n: usize, i: usize) -> String {
    format!("10.207.{}.{}", n + 1, i + 10)
}

fn interface(n: usize, i: usize) -> String {
    format!("npg{}{i:02}", LETTER[n])
}

fn scope() -> String {
    format!("npg-{}", std::process::id())
}

/// The namespaces both tests build, named by `tag` (`<tag>-<pid>-…`, devices
/// `<tag>…`) in 10.`net`.0.0/16: a hub namespace with a bridge
/// (10.`net`.0.1/24, where etcd listens) and, per node, a node namespace on it
/// (its link address given) with its workloads (10.`net`.`N+1`.0/24 behind the
/// node, each accepting on the ports given) and routes to the other nodes'
/// workload subnets over the hub. Field order is drop order: listeners, the
/// nodes' namespaces, the hub.
struct Fabric {
    listeners: Vec<Listeners>,
    topos: Vec<Topo>,
    _hub: Netns,
    hub_name: String,
    scope: String,
    tag: &'static str,
    net: u8,
}

impl Fabric {
    /// The hub alone (etcd can start in it).
    fn hub(tag: &'static str, net: u8) -> Fabric {
        let scope = format!("{tag}-{}", std::process::id());
        let hub_name = format!("{scope}-hub");
        let mut hub = Netns::default();
        hub.add(&hub_name);
        let bridge = format!("{tag}-hub");
        ip(&["-n", &hub_name, "link", "add", &bridge, "type", "bridge"]);
        ip(&[
            "-n",
            &hub_name,
            "addr",
            "add",
            &format!("10.{net}.0.1/24"),
            "dev",
            &bridge,
        ]);
        ip(&["-n", &hub_name, "link", "set", &bridge, "up"]);
        Fabric {
            listeners: Vec::new(),
            topos: Vec::new(),
            _hub: hub,
            hub_name,
            scope,
            tag,
            net,
        }
    }

    /// The nodes: `links[n]` is node n's address on the hub, `workloads[n]`
    /// its workloads (name, addresses with prefix length).
    fn nodes(&mut self, links: &[&str], workloads: Vec<Vec<(String, Vec<String>)>>, ports: &[u16]) {
        let (tag, net, hub) = (self.tag, self.net, self.hub_name.clone());
        for (n, (link, mine)) in links.iter().zip(workloads).enumerate() {
            let node_ns = format!("{}-n{n}", self.scope);
            let gw = format!("10.{net}.{}.1", n + 1);
            let topo = Topo::build(
                Names {
                    node: node_ns.clone(),
                    bridge: format!("{tag}br"),
                    ns_prefix: format!("{}-", self.scope),
                    dev_prefix: tag.into(),
                },
                &[&format!("{gw}/24")],
                mine.clone(),
            );
            sysctl(&node_ns, "net/ipv4/ip_forward", "1");
            for (w, _) in &mine {
                ip(&["-n", &topo.ns(w), "route", "add", "default", "via", &gw]);
                self.listeners
                    .push(Listeners::accepting(&topo.ns(w), ports));
            }
            // The node's leg on the hub.
            let (l, h) = (format!("{tag}l{n}"), format!("{tag}h{n}"));
            ip(&[
                "-n", &hub, "link", "add", &h, "type", "veth", "peer", "name", &l, "netns",
                &node_ns,
            ]);
            ip(&[
                "-n",
                &hub,
                "link",
                "set",
                &h,
                "master",
                &format!("{tag}-hub"),
                "up",
            ]);
            ip(&[
                "-n",
                &node_ns,
                "addr",
                "add",
                &format!("{link}/24"),
                "dev",
                &l,
            ]);
            ip(&["-n", &node_ns, "link", "set", &l, "up"]);
            for (m, other) in links.iter().enumerate() {
                if m != n {
                    let subnet = format!("10.{net}.{}.0/24", m + 1);
                    ip(&["-n", &node_ns, "route", "add", &subnet, "via", other]);
                }
            }
            self.topos.push(topo);
        }
    }
}

/// Field order is drop order: the daemons stop (their pins go) before the
/// namespaces, etcd and its data after them, the files last.
struct Cluster {
    daemons: Vec<Daemon>,
    fabric: Fabric,
    etcd: Etcd,
    eps: Vec<GenEndpoint>,
    union: PathBuf,
    _tmp: tempfile::TempDir,
}

/// An endpoint of the scenario beyond the generated ones.
fn extra(name: &str, app: &str, n: usize, index: usize) -> GenEndpoint {
    GenEndpoint {
        name: name.into(),
        namespace: "default".into(),
        node: NODES[n].0.into(),
        node_index: n,
        index,
        address: address(n, index),
        address6: None,
        interface: interface(n, index),
        labels: vec![("app".into(), app.into())],
    }
}

/// A CNP letting app=latecomer (and nothing else) reach app=guard on 80.
const GUARD: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: fleet-guard\nspec:\n  endpointSelector:\n    matchLabels:\n      app: guard\n  ingress:\n    - fromEndpoints:\n        - matchLabels:\n            app: latecomer\n      toPorts:\n        - ports:\n            - {port: \"80\", protocol: TCP}\n";

impl Cluster {
    fn build(test: &str) -> Option<Cluster> {
        let mut fabric = Fabric::hub("npg", 207);
        let etcd = Etcd::start_at(test, "10.207.0.1", Some(&fabric.hub_name))?;

        // The scenario: generated endpoints over three nodes, the seed's four,
        // and the guard and the latecomer (whose file comes later).
        let layout = Layout {
            nodes: &NODES,
            address: &address,
            address6: None,
            interface: &interface,
        };
        let sc = nodegen::generate(20261204, &layout, 30, 30);
        let mut eps = sc.endpoints.clone();
        let next = |eps: &[GenEndpoint], n: usize| eps.iter().filter(|e| e.node_index == n).count();
        for (name, app, n) in [
            ("frontend-1", "frontend", 0),
            ("backend", "backend", 1),
            ("frontend-2", "frontend", 2),
            ("database", "database", 2),
            ("guard", "guard", 0),
            ("late", "latecomer", 2),
        ] {
            let i = next(&eps, n);
            eps.push(extra(name, app, n, i));
        }
        let mut policies = sc.policies.clone();
        let seed = repo().join("etc/examples/seed/netpol.d");
        for f in std::fs::read_dir(&seed).unwrap() {
            let p = f.unwrap().path();
            policies.push((
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            ));
        }
        policies.push(("fleet-guard.yaml".into(), GUARD.into()));
        assert!(eps.len() >= 30 && policies.len() >= 30);

        let workloads = (0..NODES.len())
            .map(|n| {
                eps.iter()
                    .filter(|e| e.node_index == n)
                    .map(|e| {
                        (
                            format!("{}{:02}", LETTER[n], e.index),
                            vec![format!("{}/24", e.address)],
                        )
                    })
                    .collect()
            })
            .collect();
        let links: Vec<&str> = NODES.iter().map(|(_, l)| *l).collect();
        fabric.nodes(&links, workloads, &PORTS);

        // The files: each node its own endpoints and Node, the namespaces and
        // the policies everywhere; the union for the offline matrix.
        let tmp = tempfile::Builder::new().prefix("npg-").tempdir().unwrap();
        let union = tmp.path().join("union");
        for d in ["netpol.d", "endpoints.d"] {
            std::fs::create_dir_all(union.join(d)).unwrap();
        }
        let mut daemons = Vec::new();
        for (n, (node, _)) in NODES.iter().enumerate() {
            let root = tmp.path().join(node);
            let pin = PathBuf::from(format!("/sys/fs/bpf/{}-{node}", scope()));
            let d = Daemon::new(node, &format!("{}-n{n}", scope()), &root, &pin);
            d.write_config(
                node,
                &format!(
                    "log_level = \"info\"\nstrict_file_modes = false\nresync_interval_s = 0\nmetrics_listen = \"127.0.0.1:9962\"\n\
                     [etcd]\nendpoints = [\"{}\"]\nlease_ttl_s = {LEASE_TTL_S}\nbatch_ms = 50\nstatus_interval_s = 1\n\
                     mass_removal_hold_s = {HOLD_S}\nconnect_timeout_ms = 500\nrequest_timeout_ms = 1000\n\
                     progress_interval_ms = 1000\nrelist_min_interval_s = 1\n",
                    etcd.url()
                ),
            );
            for (f, text) in &policies {
                std::fs::write(d.path("netpol.d").join(f), text).unwrap();
            }
            std::fs::write(
                d.path("endpoints.d/namespaces.yaml"),
                nodegen::namespaces_text(),
            )
            .unwrap();
            let mine: Vec<GenEndpoint> = eps
                .iter()
                .filter(|e| e.node_index == n && e.name != "late")
                .cloned()
                .collect();
            let own = nodegen::node_text(&layout, n) + &nodegen::endpoints_text(&mine);
            std::fs::write(d.path("endpoints.d/own.yaml"), own).unwrap();
            daemons.push(d);
        }
        for (f, text) in &policies {
            std::fs::write(union.join("netpol.d").join(f), text).unwrap();
        }
        let mut all = nodegen::namespaces_text();
        for n in 0..NODES.len() {
            all.push_str(&nodegen::node_text(&layout, n));
        }
        all.push_str(&nodegen::endpoints_text(&eps));
        std::fs::write(union.join("endpoints.d/registry.yaml"), all).unwrap();
        std::fs::write(
            union.join("netpold.toml"),
            format!(
                "policy_dir = \"{}\"\nendpoint_dirs = [\"{}\"]\nstrict_file_modes = false\n",
                union.join("netpol.d").display(),
                union.join("endpoints.d").display()
            ),
        )
        .unwrap();
        let mut c = Cluster {
            daemons,
            fabric,
            etcd,
            eps,
            union,
            _tmp: tmp,
        };
        for d in &mut c.daemons {
            d.spawn(&[]);
        }
        for n in 0..NODES.len() {
            let local = c
                .eps
                .iter()
                .filter(|e| e.node_index == n && e.name != "late")
                .count();
            c.daemons[n].wait_ready(local, Duration::from_secs(30));
        }
        Some(c)
    }

    fn ns_of(&self, e: &GenEndpoint) -> String {
        self.fabric.topos[e.node_index].ns(&format!("{}{:02}", LETTER[e.node_index], e.index))
    }

    fn ep(&self, name: &str) -> &GenEndpoint {
        self.eps.iter().find(|e| e.name == name).unwrap()
    }

    fn logs(&self) -> String {
        let mut s: String = self
            .daemons
            .iter()
            .map(|d| format!("--- {} log (tail):\n{}\n", d.name, d.log_tail(12)))
            .collect();
        s.push_str(&format!("--- etcd log:\n{}", self.etcd.log()));
        s
    }

    /// `netpolctl ARGS --config <node n's>` inside node n's namespace (etcd is
    /// reachable from there only): exit code and stdout.
    fn ctl_in(&self, n: usize, args: &[&str]) -> (i32, String, String) {
        let o = Command::new("ip")
            .args(["netns", "exec", &format!("{}-n{n}", scope()), NETPOLCTL])
            .args(args)
            .arg("--config")
            .arg(self.daemons[n].config())
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// Node n's `status --json`.
    fn status(&self, n: usize) -> serde_json::Value {
        let (code, out) = self.daemons[n].ctl(&["status", "--json"]);
        assert_eq!(code, 0, "{}: status: {out}", NODES[n].0);
        serde_json::from_str(&out).unwrap()
    }

    fn wait(&self, what: &str, within: Duration, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            if t0.elapsed() > within {
                let st: Vec<String> = (0..3).map(|n| self.status(n).to_string()).collect();
                panic!("timed out: {what}\n{}\n{}", st.join("\n"), self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The newest revision of the watched range (`<prefix>/registry/`): what a
    /// write into the registry returns, and what `fleet wait` is given. (The
    /// nodes' status writes, outside it, move etcd's head but not this.)
    fn head(&self) -> i64 {
        self.on_etcd(|s| {
            Box::pin(async move {
                let r = netpol::fleet::store::Range::prefix(&format!("{P}/registry/"));
                let page = netpol::fleet::store::get_all(s.as_ref(), &r, 500)
                    .await
                    .unwrap();
                page.kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or(0)
            })
        })
    }

    /// etcd's head revision (the nodes' status writes move it).
    fn etcd_head(&self) -> i64 {
        self.on_etcd(|s| {
            Box::pin(async move {
                let r = netpol::fleet::store::Range::prefix(&format!("{P}/status/"));
                s.get_range(&r, 0, 1).await.unwrap().header.revision
            })
        })
    }

    /// `netpolctl fleet wait` for the newest revision of the registry.
    fn fleet_wait(&self) -> i64 {
        let r = self.head();
        self.fleet_wait_for(r);
        r
    }

    fn fleet_wait_for(&self, r: i64) {
        let (code, out, err) = self.ctl_in(
            0,
            &[
                "fleet",
                "wait",
                "--revision",
                &r.to_string(),
                "--timeout",
                "20",
            ],
        );
        assert_eq!(code, 0, "fleet wait {r}: {out}{err}\n{}", self.logs());
    }

    /// Every node's generation (one more per apply).
    fn generations(&self) -> Vec<u64> {
        (0..3)
            .map(|n| self.status(n)["generation"].as_u64().unwrap())
            .collect()
    }

    fn etcd_field(&self, n: usize, key: &str) -> i64 {
        self.status(n)["etcd"][key].as_i64().unwrap_or(-1)
    }

    /// A flow from `from` to `to`:port connects.
    fn connects(&self, from: &str, to: &str, port: u16) -> bool {
        let dst: IpAddr = self.ep(to).address.parse().unwrap();
        probe::connects(
            &self.ns_of(self.ep(from)),
            dst,
            port,
            Duration::from_millis(500),
        )
    }

    /// Every ordered pair × [`PORTS`] over real TCP against the offline matrix
    /// of the union of every node's files. Returns the number of probes.
    fn check_matrix(&self, when: &str) -> usize {
        let cfg = self.union.join("netpold.toml");
        let expected: BTreeMap<u16, BTreeMap<(String, String), bool>> = PORTS
            .iter()
            .map(|&p| (p, offline_matrix(&cfg, p)))
            .collect();
        let (jobs, want, what) = nodegen::matrix_probes(&self.eps, &expected, &|e| self.ns_of(e));
        let t0 = Instant::now();
        let diffs = probe::mismatches(&jobs, &want, &what, 96);
        let allowed = want.iter().filter(|w| **w).count();
        eprintln!(
            "{when}: {} probes ({allowed} allowed) in {:?}",
            jobs.len(),
            t0.elapsed()
        );
        assert!(
            diffs.is_empty(),
            "{when}: {} of {} flows differ from the offline matrix of the union:\n{}\n{}",
            diffs.len(),
            jobs.len(),
            diffs.join("\n"),
            self.logs()
        );
        assert!(allowed > 0 && allowed < jobs.len());
        jobs.len()
    }

    /// Run `f` against etcd from the hub namespace (a runtime of its own).
    fn on_etcd<T: Send>(
        &self,
        f: impl FnOnce(
                std::sync::Arc<dyn netpol::fleet::Store>,
            ) -> futures::future::BoxFuture<'static, T>
            + Send,
    ) -> T {
        let ns = self.etcd.netns.clone().unwrap();
        let store = &self.etcd;
        in_ns(&ns, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async { f(store.store()).await })
        })
    }

    fn put(&self, key: &str, value: &str) -> i64 {
        let (key, value) = (format!("{P}/{key}"), value.to_string());
        self.on_etcd(move |s| {
            Box::pin(async move { crate::harness::etcd::put(s.as_ref(), &key, &value).await })
        })
    }

    fn compact(&self, rev: i64) {
        let url = self.etcd.url();
        in_ns(self.etcd.netns.as_ref().unwrap(), || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut c = etcd_client::Client::connect([url], None).await.unwrap();
                c.compact(rev, None).await.unwrap();
            })
        });
    }
}

fn static_ep(name: &str, node: &str, addr: &str, app: &str) -> String {
    format!(
        r#"{{"apiVersion":"netpol/v1","kind":"Endpoint","metadata":{{"name":"{name}","namespace":"default","labels":{{"app":"{app}"}}}},"spec":{{"node":"{node}","addresses":["{addr}"]}}}}"#
    )
}

fn late_file(app: &str, e: &GenEndpoint) -> String {
    format!(
        "apiVersion: netpol/v1\nkind: Endpoint\nmetadata:\n  name: late\n  namespace: default\n  labels:\n    app: {app}\nspec:\n  node: node-c\n  interface: {}\n  addresses: [{}]\n",
        e.interface, e.address
    )
}

#[test]
fn three_nodes_share_one_registry_through_etcd() {
    const TEST: &str = "three_nodes_share_one_registry_through_etcd";
    let Some(_turn) = Needs::privileged().alone().check(TEST) else {
        return;
    };
    let t_start = Instant::now();
    let Some(mut c) = Cluster::build(TEST) else {
        return;
    };
    eprintln!(
        "{} endpoints on three nodes ready in {:?}",
        c.eps.len(),
        t_start.elapsed()
    );

    // 1. An endpoint file dropped on node-c is enforced by label on node-a:
    // before it, the latecomer's address is `world` there.
    assert!(
        !c.connects("late", "guard", 80),
        "late → guard before its file"
    );
    let late = c.ep("late").clone();
    let gen_a = c.generations()[0];
    let t0 = Instant::now();
    write_atomic(
        &c.daemons[2].path("endpoints.d/late.yaml"),
        &late_file("latecomer", &late),
    );
    // Node-a's next generation, then the first connection it lets through
    // (probes of 100 ms: a dropped SYN is not retried within one).
    let mut applied_a = None;
    c.wait(
        "node-a lets the latecomer in by label",
        Duration::from_secs(10),
        || {
            if applied_a.is_none() && c.status(0)["generation"].as_u64() > Some(gen_a) {
                applied_a = Some(t0.elapsed());
            }
            let dst: IpAddr = c.ep("guard").address.parse().unwrap();
            probe::connects(&c.ns_of(&late), dst, 80, Duration::from_millis(100))
        },
    );
    eprintln!(
        "file on node-c → node-a's next generation: {:?}, first connection allowed there: {:?}",
        applied_a,
        t0.elapsed()
    );

    // 2. After `fleet wait`, every node enforces the offline matrix of the union.
    let r = c.fleet_wait();
    for n in 0..3 {
        let e = &c.status(n)["etcd"];
        assert!(e["applied_revision"].as_i64().unwrap() >= r, "{e}");
        assert_eq!(e["rejected"].as_array().unwrap().len(), 0, "{e}");
    }
    c.check_matrix("after fleet wait");
    // etcd's head, ahead of the registry by the nodes' status writes, is a
    // barrier too: every node enforces the registry as of it.
    let head = c.etcd_head();
    assert!(head > r, "status writes moved the head: {head} vs {r}");
    c.fleet_wait_for(head);

    // 3. A relabel on node-c changes the verdict on node-a, and back.
    write_atomic(
        &c.daemons[2].path("endpoints.d/late.yaml"),
        &late_file("stranger", &late),
    );
    c.wait(
        "the relabel reaches node-a",
        Duration::from_secs(10),
        || !c.connects("late", "guard", 80),
    );
    write_atomic(
        &c.daemons[2].path("endpoints.d/late.yaml"),
        &late_file("latecomer", &late),
    );
    c.wait(
        "the relabel back reaches node-a",
        Duration::from_secs(10),
        || c.connects("late", "guard", 80),
    );
    c.fleet_wait();

    // 4. etcd frozen, then killed and restarted: nothing changes in enforcement
    // while it is away, no relist on a plain reconnect, one watcher per node.
    let relists: Vec<i64> = (0..3).map(|n| c.etcd_field(n, "relists")).collect();
    let reconnects: Vec<i64> = (0..3).map(|n| c.etcd_field(n, "reconnects")).collect();
    let gens = c.generations();
    c.etcd.signal(libc::SIGSTOP);
    c.wait(
        "every node notices the frozen etcd",
        Duration::from_secs(10),
        || (0..3).all(|n| c.status(n)["etcd"]["connected"] == false),
    );
    assert!(c.connects("late", "guard", 80) && !c.connects("backend", "guard", 80));
    assert_eq!(c.generations(), gens, "an apply while etcd was frozen");
    c.etcd.signal(libc::SIGCONT);
    c.etcd.kill();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.generations(), gens, "an apply while etcd was dead");
    // 5. A node restarted while etcd is down enforces its cached view.
    c.daemons[1].stop();
    c.daemons[1].spawn(&[]);
    let s = c.daemons[1].wait_status("ready (degraded, cached view)", |s| {
        s.ready && s.etcd.as_ref().is_some_and(|e| e.from_cache)
    });
    assert!(s.degraded, "{s:?}");
    c.check_matrix("etcd down, node-b restarted from its cache");
    c.etcd.spawn();
    c.wait("every node back in sync", Duration::from_secs(20), || {
        (0..3).all(|n| {
            let s = c.status(n);
            s["etcd"]["connected"] == true && s["degraded"] == false
        })
    });
    for n in [0, 2] {
        assert_eq!(
            c.etcd_field(n, "relists"),
            relists[n],
            "{}: relisted after a plain reconnect",
            NODES[n].0
        );
        assert!(
            c.etcd_field(n, "reconnects") >= reconnects[n] + 2,
            "{}: {}",
            NODES[n].0,
            c.status(n)
        );
    }
    assert_eq!(
        c.etcd_field(1, "relists"),
        1,
        "node-b: one list after its start"
    );
    c.wait("one watcher per node", Duration::from_secs(5), || {
        c.etcd.watchers() == 3
    });
    assert_eq!(
        c.generations()[0],
        gens[0],
        "node-a applied around the outage"
    );

    // 6. netpold killed -9 on node-b and back within the lease TTL: the others
    // see no delete and add (no apply).
    let gens = c.generations();
    c.daemons[1].kill9();
    c.daemons[1].spawn(&[]);
    c.daemons[1].wait_status("node-b ready again", |s| s.ready && !s.degraded);
    std::thread::sleep(Duration::from_secs(2));
    let now = c.generations();
    assert_eq!(
        (now[0], now[2]),
        (gens[0], gens[2]),
        "node-b's restart flapped its endpoints"
    );

    // 7. netpold killed -9 on node-c for good: after its lease TTL the others
    // drop its endpoints — a mass removal, held and reported first.
    let remote_a = c.etcd_field(0, "remote_endpoints");
    let on_c = c.eps.iter().filter(|e| e.node_index == 2).count() as i64;
    let t0 = Instant::now();
    c.daemons[2].kill9();
    c.wait(
        "node-a holds the mass removal",
        Duration::from_secs(LEASE_TTL_S + 10),
        || {
            let s = c.status(0);
            s["etcd"]["held_removals"].as_i64() == Some(on_c) && s["degraded"] == true
        },
    );
    let held_at = t0.elapsed();
    c.wait(
        "node-a drops node-c's endpoints",
        Duration::from_secs(HOLD_S + 5),
        || {
            c.etcd_field(0, "remote_endpoints") == remote_a - on_c
                && c.etcd_field(0, "held_removals") == 0
        },
    );
    eprintln!("node-c killed: removal held after {held_at:?} (lease TTL {LEASE_TTL_S} s), applied after {:?}", t0.elapsed());
    // The lease was last kept alive up to a third of its TTL before the kill.
    let earliest = Duration::from_secs(LEASE_TTL_S) * 2 / 3 - Duration::from_millis(300);
    assert!(
        held_at >= earliest,
        "removed before the lease expired: {held_at:?}"
    );
    c.daemons[2].spawn(&[]);
    let local_c = c.eps.iter().filter(|e| e.node_index == 2).count();
    c.daemons[2].wait_ready(local_c, Duration::from_secs(20));
    c.wait(
        "node-a has node-c's endpoints again",
        Duration::from_secs(10),
        || c.etcd_field(0, "remote_endpoints") == remote_a,
    );

    // 8. A compaction past a cut-off node's revision: it relists and converges.
    let relists_b = c.etcd_field(1, "relists");
    let node_b = format!("{}-n1", scope());
    ip(&["-n", &node_b, "link", "set", "npgl1", "down"]);
    c.wait("node-b notices the cut", Duration::from_secs(10), || {
        c.status(1)["etcd"]["connected"] == false
    });
    let rev = c.put(
        "registry/static/endpoints/default/ghost",
        &static_ep("ghost", "appliance-1", "10.207.99.1", "ghost"),
    );
    c.compact(rev);
    ip(&["-n", &node_b, "link", "set", "npgl1", "up"]);
    c.wait(
        "node-b relists and converges",
        Duration::from_secs(20),
        || {
            let s = c.status(1);
            s["etcd"]["relists"].as_i64() == Some(relists_b + 1)
                && s["etcd"]["applied_revision"].as_i64() >= Some(rev)
                && s["degraded"] == false
        },
    );

    // 9. Bad entries: each rejected with its key, the rest applies, nothing
    // enforced changes.
    let gens = c.generations();
    let bad = [
        (
            "registry/static/endpoints/default/broken",
            "{\"apiVersion\":".to_string(),
        ),
        (
            "registry/static/endpoints/default/x",
            static_ep("y", "appliance-1", "10.207.99.2", "x"),
        ),
        (
            "registry/static/endpoints/default/thief",
            static_ep("thief", "appliance-2", "10.207.99.1", "x"),
        ),
    ];
    for (k, v) in &bad {
        c.put(k, v);
    }
    c.wait(
        "every node rejects the three entries",
        Duration::from_secs(10),
        || {
            (0..3).all(|n| {
                let rej = c.status(n)["etcd"]["rejected"].to_string();
                bad.iter()
                    .all(|(k, _)| rej.contains(&format!("etcd:{P}/{k}@")))
            })
        },
    );
    let rej = c.status(0)["etcd"]["rejected"].to_string();
    assert!(rej.contains("does not match the name in the key"), "{rej}");
    assert!(
        rej.contains("address 10.207.99.1 is already claimed by Endpoint default/ghost"),
        "{rej}"
    );
    assert_eq!(
        c.generations(),
        gens,
        "a rejected entry changed what is enforced"
    );

    // 10. Steady churn (5 writes/s for 30 s, then none): at most one apply per
    // tick on every node, and after it nothing applies or writes status again.
    let gens = c.generations();
    let t0 = Instant::now();
    let mut writes = 0;
    while t0.elapsed() < Duration::from_secs(30) {
        let app = format!("churn-{writes}");
        c.put(
            "registry/static/endpoints/default/churn",
            &static_ep("churn", "appliance-3", "10.207.99.3", &app),
        );
        writes += 1;
        let next = Duration::from_millis(200) * writes;
        if let Some(d) = next.checked_sub(t0.elapsed()) {
            std::thread::sleep(d);
        }
    }
    let churn = t0.elapsed();
    let ticks = (churn.as_millis() / 50) as u64 + 1;
    std::thread::sleep(Duration::from_secs(3));
    let after = c.generations();
    let status_writes: Vec<i64> = (0..3).map(|n| c.etcd_field(n, "status_writes")).collect();
    for n in 0..3 {
        let applies = after[n] - gens[n];
        eprintln!(
            "{}: {writes} writes in {churn:?} → {applies} applies ({ticks} ticks)",
            NODES[n].0
        );
        assert!(
            applies >= 1 && applies <= ticks.min(writes as u64 + 1),
            "{}: {applies} applies",
            NODES[n].0
        );
    }
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(c.generations(), after, "an apply after the churn stopped");
    let again: Vec<i64> = (0..3).map(|n| c.etcd_field(n, "status_writes")).collect();
    assert_eq!(
        again, status_writes,
        "a status write after the churn stopped"
    );
    eprintln!("{TEST}: {:?} in all", t_start.elapsed());
}

/// mTLS and per-node roles through netpold itself: etcd with
/// `--client-cert-auth` and the users and roles `scripts/etcd-tls-roles` sets up
/// (the script docs/fleet.md gives operators), two netpold each on its own
/// node's certificate. Node-b learns node-a's client over TLS and lets it in by
/// label; node-a's certificate — the files its netpold uses — cannot write or
/// delete under node-b's prefix, and node-b keeps enforcing.
#[test]
fn over_mtls_each_netpold_uses_its_own_certificate_and_cannot_write_another_nodes_prefix() {
    const TEST: &str =
        "over_mtls_each_netpold_uses_its_own_certificate_and_cannot_write_another_nodes_prefix";
    let Some(_turn) = Needs::privileged()
        .tools(&["openssl", "etcdctl"])
        .alone()
        .check(TEST)
    else {
        return;
    };
    let t0 = Instant::now();
    let mut fabric = Fabric::hub("npt", 217);
    let (scope, hub) = (fabric.scope.clone(), fabric.hub_name.clone());
    let pki = tempfile::Builder::new()
        .prefix("npt-pki-")
        .tempdir()
        .unwrap();
    let dir = pki.path().to_str().unwrap().to_string();
    let script = repo().join("scripts/etcd-tls-roles");
    let run = |args: &[&str]| {
        let o = Command::new("ip")
            .args(["netns", "exec", &hub])
            .arg(&script)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "etcd-tls-roles {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&["pki", &dir, "10.217.0.1", "node-a", "node-b"]);
    let Some(etcd) = Etcd::start_tls_at(TEST, "10.217.0.1", &hub, pki.path()) else {
        return;
    };
    run(&["roles", &dir, &etcd.url(), P, "node-a", "node-b"]);

    // Two nodes, one workload each: node-a's client, node-b's server.
    let nodes = [
        ("node-a", "10.217.0.10", "a00"),
        ("node-b", "10.217.0.11", "b00"),
    ];
    let workloads = (0..nodes.len())
        .map(|n| {
            vec![(
                nodes[n].2.to_string(),
                vec![format!("10.217.{}.10/24", n + 1)],
            )]
        })
        .collect();
    fabric.nodes(&[nodes[0].1, nodes[1].1], workloads, &[80]);
    let topos = &fabric.topos;
    let tmp = tempfile::Builder::new().prefix("npt-").tempdir().unwrap();
    let policy = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: server-in\nspec:\n  endpointSelector:\n    matchLabels:\n      app: server\n  ingress:\n    - fromEndpoints:\n        - matchLabels:\n            app: client\n      toPorts:\n        - ports:\n            - {port: \"80\", protocol: TCP}\n";
    let mut daemons = Vec::new();
    for (n, (node, _, w)) in nodes.iter().enumerate() {
        let root = tmp.path().join(node);
        let pin = PathBuf::from(format!("/sys/fs/bpf/{scope}-{node}"));
        let d = Daemon::new(node, &format!("{scope}-n{n}"), &root, &pin);
        d.write_config(
            node,
            &format!(
                "log_level = \"info\"\nstrict_file_modes = false\nresync_interval_s = 0\n\
                 [etcd]\nendpoints = [\"{}\"]\nca_file = \"{dir}/ca.pem\"\ncert_file = \"{dir}/{node}.pem\"\n\
                 key_file = \"{dir}/{node}-key.pem\"\nlease_ttl_s = {LEASE_TTL_S}\nstatus_interval_s = 1\n\
                 connect_timeout_ms = 500\nrequest_timeout_ms = 1000\nprogress_interval_ms = 1000\n",
                etcd.url()
            ),
        );
        std::fs::write(d.path("netpol.d/server-in.yaml"), policy).unwrap();
        let app = if n == 0 { "client" } else { "server" };
        std::fs::write(
            d.path("endpoints.d/own.yaml"),
            format!(
                "apiVersion: netpol/v1\nkind: Endpoint\nmetadata:\n  name: {app}\n  labels:\n    app: {app}\nspec:\n  interface: {}\n  addresses: [10.217.{}.10]\n",
                topos[n].dev(w),
                n + 1
            ),
        )
        .unwrap();
        daemons.push(d);
    }
    for d in &mut daemons {
        d.spawn(&[]);
    }
    for d in &mut daemons {
        d.wait_ready(1, Duration::from_secs(30));
    }
    let logs = |daemons: &[Daemon]| -> String {
        let mut s: String = daemons
            .iter()
            .map(|d| format!("--- {} log (tail):\n{}\n", d.name, d.log_tail(15)))
            .collect();
        s.push_str(&format!("--- etcd log:\n{}", etcd.log()));
        s
    };
    let server: IpAddr = "10.217.2.10".parse().unwrap();
    let client_ns = topos[0].ns("a00");
    let t = Instant::now();
    while !probe::connects(&client_ns, server, 80, Duration::from_millis(200)) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "node-b never let node-a's client in by label over mTLS\n{}",
            logs(&daemons)
        );
    }
    // By label only: node-a itself (its own address, no such label) is refused.
    assert!(
        !probe::connects(
            &format!("{scope}-n0"),
            server,
            80,
            Duration::from_millis(300)
        ),
        "node-b lets node-a's host address in: the policy is not enforced"
    );
    // Both nodes connected over TLS with their own certificates: each sees the
    // other's endpoint and wrote its own status key (its role allows it).
    for d in &daemons {
        let s = d.wait_status_for(
            "connected, a remote endpoint, a status write",
            Duration::from_secs(15),
            |s| {
                s.etcd.as_ref().is_some_and(|e| {
                    e.connected
                        && e.in_sync
                        && e.remote_endpoints == 1
                        && e.status_writes >= 1
                        && e.last_error.is_none()
                })
            },
        );
        assert!(s.ready && !s.degraded, "{}: {s:?}", d.name);
    }

    // node-a's certificate, the very files its netpold uses: no write or delete
    // under node-b's prefix or on node-b's status (its own it wrote above).
    let url = etcd.url();
    let results = in_ns(&hub, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use netpol::fleet::store::{Op, Store, StoreError, Txn};
            let cfg = netpol::config::EtcdConfig {
                endpoints: vec![url],
                ca_file: pki.path().join("ca.pem"),
                cert_file: pki.path().join("node-a.pem"),
                key_file: pki.path().join("node-a-key.pem"),
                request_timeout_ms: 2000,
                ..Default::default()
            };
            let s = netpol::fleet::etcd::EtcdStore::new(
                netpol::fleet::etcd::ConnectSettings::from_config(&cfg).unwrap(),
            );
            let put = |key: String| Txn {
                success: vec![Op::Put {
                    key,
                    value: b"{}".to_vec(),
                    lease: 0,
                }],
                ..Txn::default()
            };
            let denied = |r: Result<netpol::fleet::store::TxnResult, StoreError>| {
                matches!(r, Err(StoreError::PermissionDenied(_)))
            };
            let other = denied(
                s.txn(put(format!(
                    "{P}/registry/nodes/node-b/endpoints/default/evil"
                )))
                .await,
            );
            let delete = denied(
                s.txn(Txn {
                    success: vec![Op::Delete {
                        key: format!("{P}/registry/nodes/node-b/endpoints/default/server"),
                    }],
                    ..Txn::default()
                })
                .await,
            );
            let status = denied(s.txn(put(format!("{P}/status/node-b"))).await);
            (other, delete, status)
        })
    });
    assert_eq!(
        results,
        (true, true, true),
        "node-a's certificate: (write node-b's prefix denied, delete there denied, write node-b's status denied)"
    );
    assert!(
        probe::connects(&client_ns, server, 80, Duration::from_millis(500)),
        "node-b stopped letting node-a's client in"
    );
    assert_eq!(
        daemons[1].status().unwrap().etcd.unwrap().remote_endpoints,
        1,
        "node-b's view changed"
    );
    eprintln!("{TEST}: {:?} in all", t0.elapsed());
}

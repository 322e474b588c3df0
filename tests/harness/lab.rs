//! The lab of the daemon's end-to-end, fault and soak tests: a [`Topo`] (a node
//! namespace with a bridge `br0` at `<subnet>.1/24`, workloads behind veth pairs
//! `veth-<short>`), TCP listeners (accepting) in every workload, and the real
//! `netpold` enforcing on the node ([`Daemon`]), optionally wrapped (`unshare
//! --mount ...`) for faults that need a private mount namespace.
//!
//! Names: netns `<prefix>-<pid>-<tag>-<short>` and `<prefix>-<pid>-<tag>-node`,
//! pins `/sys/fs/bpf/<prefix>-<pid>-<tag>`. Drop stops the daemon, detaches its
//! pins and deletes every namespace, also when a test fails.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::daemon::{write_atomic, Daemon};
use super::probe::{connects, Listeners};
use super::topo::{Names, Topo};

/// The TCP ports every workload listens on.
pub const PORTS: [u16; 3] = [80, 5432, 8080];

/// The keys of every lab's netpold.toml after the directories.
const KEYS: &str = "log_level = \"debug\"\nlog_format = \"json\"\nstrict_file_modes = false\n";

/// A lab's name prefix and IPv4 /24.
pub struct Net {
    pub prefix: &'static str,
    pub subnet: [u8; 3],
}

/// The fault and soak tests' (docs/reliability.md).
pub const FAULTS: Net = Net {
    prefix: "npf",
    subnet: [10, 209, 1],
};

pub struct Workload {
    pub short: String,
    pub name: String,
    pub app: String,
    pub ns: String,
    pub addr: Ipv4Addr,
}

/// Field order is drop order: the daemon before the network it enforces on, the
/// files last.
pub struct Lab {
    pub daemon: Daemon,
    _listeners: Vec<Listeners>,
    pub topo: Topo,
    pub node: String,
    pub workloads: Vec<Workload>,
    pub tmp: tempfile::TempDir,
}

impl Lab {
    /// A lab of [`FAULTS`] with these workloads `(short, endpoint name, app
    /// label, last octet)`.
    pub fn new(tag: &str, workloads: &[(&str, &str, &str, u8)]) -> Lab {
        Lab::on(&FAULTS, tag, workloads)
    }

    pub fn on(net: &Net, tag: &str, workloads: &[(&str, &str, &str, u8)]) -> Lab {
        let scope = format!("{}-{}-{tag}", net.prefix, std::process::id());
        let [a, b, c] = net.subnet;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}-", net.prefix))
            .tempdir()
            .unwrap();
        let topo = Topo::build(
            Names {
                node: format!("{scope}-node"),
                bridge: "br0".into(),
                ns_prefix: format!("{scope}-"),
                dev_prefix: "veth-".into(),
            },
            &[&format!("{a}.{b}.{c}.1/24")],
            workloads
                .iter()
                .map(|w| {
                    let addr = format!("{}/24", Ipv4Addr::new(a, b, c, w.3));
                    (w.0.to_string(), vec![addr])
                })
                .collect(),
        );
        let workloads: Vec<Workload> = workloads
            .iter()
            .map(|&(short, name, app, last)| Workload {
                short: short.into(),
                name: name.into(),
                app: app.into(),
                ns: topo.ns(short),
                addr: Ipv4Addr::new(a, b, c, last),
            })
            .collect();
        let listeners = workloads
            .iter()
            .map(|w| Listeners::accepting(&w.ns, &PORTS))
            .collect();
        let daemon = Daemon::new(
            "netpold",
            &topo.node,
            tmp.path(),
            &PathBuf::from(format!("/sys/fs/bpf/{scope}")),
        );
        let lab = Lab {
            daemon,
            _listeners: listeners,
            node: topo.node.clone(),
            topo,
            workloads,
            tmp,
        };
        lab.write_registry("");
        lab.write_config("");
        lab
    }

    /// Workload by short name or endpoint name.
    pub fn w(&self, key: &str) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.short == key || w.name == key)
            .unwrap_or_else(|| panic!("no workload {key}"))
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// netpold.toml with the lab's paths, then `extra` (more keys, or sections).
    pub fn write_config(&self, extra: &str) {
        self.write_config_with(&self.path("state"), extra);
    }

    pub fn write_config_with(&self, state_dir: &Path, extra: &str) {
        self.daemon
            .write_config_with(state_dir, "node-a", &format!("{KEYS}{extra}"));
    }

    /// The registry: every workload (labels app=<app> and `labels` of each
    /// workload), then `more` (raw YAML documents).
    pub fn registry_yaml(&self, labels: &dyn Fn(&Workload) -> String, more: &str) -> String {
        let mut reg = String::new();
        for w in &self.workloads {
            reg.push_str(&format!(
                "apiVersion: netpol/v1\nkind: Endpoint\nmetadata:\n  name: {}\n  labels:\n    app: {}\n{}spec:\n  interface: veth-{}\n  addresses: [{}]\n---\n",
                w.name,
                w.app,
                labels(w),
                w.short,
                w.addr
            ));
        }
        reg.push_str(more);
        reg
    }

    pub fn write_registry(&self, more: &str) {
        let reg = self.registry_yaml(&|_| String::new(), more);
        write_atomic(&self.path("endpoints.d/lab.yaml"), &reg);
    }

    pub fn write_policy(&self, name: &str, yaml: &str) {
        write_atomic(&self.path("netpol.d").join(name), yaml);
    }

    /// (Re)create workload `short`'s veth pair.
    pub fn plug(&self, short: &str) {
        self.topo.plug(&self.w(short).short);
    }

    /// Whether a TCP connection from workload `from` to `to:port` is established within `timeout`.
    pub fn connects_within(&self, from: &str, to: &str, port: u16, timeout: Duration) -> bool {
        connects(&self.w(from).ns, IpAddr::V4(self.w(to).addr), port, timeout)
    }

    pub fn connects(&self, from: &str, to: &str, port: u16) -> bool {
        self.connects_within(from, to, port, Duration::from_millis(700))
    }

    /// Wait (10 s at most) until every expectation holds; panic naming the ones that do not.
    pub fn expect(&self, what: &str, flows: &[(&str, &str, u16, bool)]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let wrong: Vec<String> = flows
                .iter()
                .filter(|(f, t, p, want)| self.connects(f, t, *p) != *want)
                .map(|(f, t, p, want)| {
                    format!(
                        "{f} -> {t}:{p} should {}",
                        if *want { "connect" } else { "be refused" }
                    )
                })
                .collect();
            if wrong.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: {wrong:?}\ndaemon log (tail):\n{}",
                    self.daemon.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A failed test may leave a read-only or mounted path behind; best effort.
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(self.tmp.path())
            .status();
    }
}

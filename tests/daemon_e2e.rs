//! Privileged end-to-end tests of netpold's kernel-facing parts: real netlink in a
//! private network namespace, and (once the kernel datapath is built in) the
//! daemon enforcing the seed scenario on real TCP between network namespaces.
//!
//! Needs root and bpffs. Without them the tests skip with a message, unless
//! `CI=true`, where they fail (`common::privileged`). Every namespace, link and
//! pin is named with the `npe` prefix and removed by a guard, also on failure.

use std::collections::BTreeMap;
use std::time::Duration;

use netpol::daemon::netlink::{Links, NetlinkLinks};

mod common;
use common::{enter, in_ns, privileged};

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
    if !privileged("netlink_follows_links_appearing_going_and_coming_back") {
        return;
    }
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

            handle
                .link()
                .add()
                .veth("npe-d0".into(), "npe-d0p".into())
                .execute()
                .await
                .unwrap();
            let t = wait_until(&mut rx, "npe-d0 to appear", |l| l.contains_key("npe-d0")).await;
            let first = t["npe-d0"];
            handle.link().del(first).execute().await.unwrap();
            wait_until(&mut rx, "npe-d0 to go", |l| !l.contains_key("npe-d0")).await;
            handle
                .link()
                .add()
                .veth("npe-d0".into(), "npe-d0p".into())
                .execute()
                .await
                .unwrap();
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

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use netpol::daemon::status::Status;

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything one e2e run creates; Drop removes it in reverse order.
struct Lab {
    tag: String,
    node: String,
    workloads: Vec<(String, String, Ipv4Addr)>, // (netns, endpoint name, address)
    tmp: tempfile::TempDir,
    pin_dir: PathBuf,
    daemon: Option<Child>,
    stop_listeners: Arc<AtomicBool>,
}

/// Tells apart the labs of one process (tests run in parallel).
static LAB_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Lab {
    fn new() -> Lab {
        let n = LAB_SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id());
        let node = format!("npe-node-{tag}");
        let tmp = tempfile::tempdir().unwrap();
        let mut lab = Lab {
            node: node.clone(),
            workloads: Vec::new(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/npe-test-{tag}")),
            tag,
            tmp,
            daemon: None,
            stop_listeners: Arc::new(AtomicBool::new(false)),
        };
        sh(&["ip", "netns", "add", &node]);
        sh(&["ip", "-n", &node, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &node, "link", "add", "br0", "type", "bridge"]);
        sh(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            "10.202.1.1/24",
            "dev",
            "br0",
        ]);
        sh(&["ip", "-n", &node, "link", "set", "br0", "up"]);
        for (short, name, last) in [
            ("fe1", "frontend-1", 11u8),
            ("be", "backend", 21),
            ("db", "database", 31),
        ] {
            let ns = format!("npe-{short}-{}", lab.tag);
            let addr = Ipv4Addr::new(10, 202, 1, last);
            lab.workloads.push((ns.clone(), name.to_string(), addr));
            sh(&["ip", "netns", "add", &ns]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            let host = format!("veth-{short}");
            sh(&[
                "ip", "-n", &node, "link", "add", &host, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            sh(&[
                "ip", "-n", &node, "link", "set", &host, "master", "br0", "up",
            ]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            for port in [80u16, 5432] {
                lab.listen(&ns, port);
            }
        }
        for d in ["netpol.d", "endpoints.d", "run", "state"] {
            std::fs::create_dir(lab.tmp.path().join(d)).unwrap();
        }
        let mut reg = String::new();
        for (ns, name, addr) in &lab.workloads {
            let short = ns.trim_start_matches("npe-").split('-').next().unwrap();
            let app = name.split('-').next().unwrap();
            reg.push_str(&format!(
                "apiVersion: netpol/v1\nkind: Endpoint\nmetadata:\n  name: {name}\n  labels:\n    app: {app}\nspec:\n  interface: veth-{short}\n  addresses: [{addr}]\n---\n"
            ));
        }
        std::fs::write(lab.tmp.path().join("endpoints.d/lab.yaml"), reg).unwrap();
        let t = lab.tmp.path();
        std::fs::write(
            lab.config(),
            format!(
                "policy_dir = \"{}\"\nendpoint_dirs = [\"{}\"]\npin_dir = \"{}\"\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\nnode_name = \"node-a\"\nlog_level = \"debug\"\nstrict_file_modes = false\n",
                t.join("netpol.d").display(),
                t.join("endpoints.d").display(),
                lab.pin_dir.display(),
                t.join("run").display(),
                t.join("state").display()
            ),
        )
        .unwrap();
        lab
    }

    fn config(&self) -> PathBuf {
        self.tmp.path().join("netpold.toml")
    }

    /// A TCP server in `ns` that accepts and closes, until the lab goes.
    fn listen(&self, ns: &str, port: u16) {
        let ns = ns.to_string();
        let stop = self.stop_listeners.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            enter(&ns);
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        rx.recv().unwrap();
    }

    fn addr(&self, name: &str) -> Ipv4Addr {
        self.workloads.iter().find(|w| w.1 == name).unwrap().2
    }

    /// Whether a TCP connection from `from` to `to:port` is established within 1 s.
    fn connects(&self, from: &str, to: &str, port: u16) -> bool {
        let ns = self
            .workloads
            .iter()
            .find(|w| w.1 == from)
            .unwrap()
            .0
            .clone();
        let dst = SocketAddr::from((self.addr(to), port));
        in_ns(&ns, || {
            TcpStream::connect_timeout(&dst, Duration::from_secs(1)).is_ok()
        })
    }

    /// Wait (10 s at most) until every expectation holds; panic naming the ones that do not.
    fn expect(&self, what: &str, flows: &[(&str, &str, u16, bool)]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
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
            if std::time::Instant::now() > deadline {
                panic!("{what}: {wrong:?}\ndaemon log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("netpold.log")).unwrap_or_default()
    }

    fn start_daemon(&mut self) {
        let netns = std::fs::File::open(format!("/run/netns/{}", self.node)).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("netpold.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_netpold"));
        cmd.arg("--config")
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Only the network namespace changes: `ip netns exec` would also remount
        // /sys, hiding /sys/fs/bpf and with it the pins that must outlive the daemon.
        let fd = netns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.daemon = Some(cmd.spawn().unwrap());
        drop(netns);
        self.wait_status("ready", |s| s.ready);
    }

    fn status(&self) -> Option<Status> {
        let sock = self.tmp.path().join("run/netpold.sock");
        netpol::cli::daemonctl::query::<Status>(&sock, "status")
            .ok()
            .map(|(s, _)| s)
    }

    fn wait_status(&self, what: &str, f: impl Fn(&Status) -> bool) -> Status {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.status() {
                if f(&s) {
                    return s;
                }
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}: {:?}\ndaemon log:\n{}",
                    self.status(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The ifindex the daemon enforces `name` on.
    fn ifindex(&self, name: &str) -> Option<u32> {
        let sock = self.tmp.path().join("run/netpold.sock");
        let (eps, _) = netpol::cli::daemonctl::query::<Vec<netpol::daemon::status::EndpointView>>(
            &sock,
            "endpoints",
        )
        .unwrap();
        eps.into_iter()
            .find(|e| e.name == name)
            .and_then(|e| e.ifindex)
    }

    fn netpolctl(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_netpolctl"))
            .args(args)
            .arg("--config")
            .arg(self.config())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn add_policy(&self, name: &str) {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("etc/examples/seed/netpol.d")
            .join(name);
        // Written beside, then renamed in, as a package manager would.
        let tmp = self.tmp.path().join(format!("netpol.d/.{name}.new"));
        std::fs::copy(src, &tmp).unwrap();
        std::fs::rename(&tmp, self.tmp.path().join("netpol.d").join(name)).unwrap();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
        let _ = Command::new(env!("CARGO_BIN_EXE_netpold"))
            .arg("--config")
            .arg(self.config())
            .arg("--detach")
            .stderr(Stdio::null())
            .status();
        self.stop_listeners.store(true, Ordering::Relaxed);
        for (ns, _, _) in &self.workloads {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node])
            .status();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

#[test]
fn daemon_enforces_the_seed_scenario_across_restarts_and_broken_files() {
    if !privileged("daemon_enforces_the_seed_scenario_across_restarts_and_broken_files") {
        return;
    }
    let mut lab = Lab::new();
    lab.start_daemon();
    let open = [
        ("frontend-1", "backend", 80, true),
        ("database", "backend", 80, true),
        ("frontend-1", "database", 5432, true),
    ];
    lab.expect("no policy: everything connects", &open);
    let (code, table) = lab.netpolctl(&["endpoints"]);
    assert_eq!(code, 0);
    assert_eq!(
        table.lines().filter(|l| l.contains("attached")).count(),
        3,
        "{table}"
    );

    let g = lab.status().unwrap().generation;
    lab.add_policy("frontend-to-backend.yaml");
    lab.wait_status("frontend-to-backend applied", |s| {
        s.generation > g && s.policies == 1
    });
    let seed1 = [
        ("database", "backend", 80, false),
        ("frontend-1", "backend", 80, true),
        ("frontend-1", "database", 5432, true),
    ];
    lab.expect("frontend-to-backend", &seed1);

    // netpolctl monitor shows the drop, at backend, by default deny.
    let mut mon = Command::new(env!("CARGO_BIN_EXE_netpolctl"))
        .args(["monitor", "--json", "--config"])
        .arg(lab.config())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = mon.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!lab.connects("database", "backend", 80));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let event = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no denied event from netpolctl monitor\n{}", lab.log()));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["verdict"] == "denied" && v["dst"] == "10.202.1.21" {
            break v;
        }
    };
    let _ = mon.kill();
    let _ = mon.wait();
    assert_eq!(event["endpoint"], "default/backend", "{event}");
    assert_eq!(event["reason"], "default-deny", "{event}");
    assert_eq!(event["src"], "10.202.1.31", "{event}");
    assert_eq!(
        (event["proto"].as_str(), event["dport"].as_u64()),
        (Some("tcp"), Some(80)),
        "{event}"
    );

    lab.add_policy("frontend-egress-control.yaml");
    lab.wait_status("frontend-egress-control applied", |s| s.policies == 2);
    let seed2 = [
        ("database", "backend", 80, false),
        ("frontend-1", "backend", 80, true),
        ("frontend-1", "database", 5432, false),
    ];
    lab.expect("frontend-egress-control", &seed2);

    let broken = lab.tmp.path().join("netpol.d/broken.yaml");
    std::fs::write(&broken, "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: broken}\nspec:\n  endpointSelector: {}\n  ingres: []\n").unwrap();
    lab.wait_status("the broken file reported", |s| {
        s.degraded && !s.errors.is_empty()
    });
    let (code, json) = lab.netpolctl(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["errors"][0]["file"],
        broken.display().to_string(),
        "{json}"
    );
    assert_eq!(v["degraded"], true);
    lab.expect("a broken file changes nothing", &seed2);

    lab.kill9();
    lab.expect("kill -9 leaves enforcement in place", &seed2);

    lab.start_daemon();
    let s = lab.wait_status("restarted", |s| s.ready);
    assert!(s.degraded && s.policies_from_last_good, "{s:?}");
    lab.expect("restarted with a broken file: the last valid set", &seed2);

    // backend's interface goes away and comes back with a new ifindex: released,
    // then enforced again on the new device.
    let old_ifindex = lab.ifindex("backend");
    let be_ns = lab
        .workloads
        .iter()
        .find(|w| w.1 == "backend")
        .unwrap()
        .0
        .clone();
    sh(&["ip", "-n", &lab.node, "link", "del", "veth-be"]);
    lab.wait_status("backend pending", |s| s.pending == 1 && s.attached == 2);
    sh(&[
        "ip", "-n", &lab.node, "link", "add", "veth-be", "type", "veth", "peer", "name", "eth0",
        "netns", &be_ns,
    ]);
    sh(&[
        "ip", "-n", &lab.node, "link", "set", "veth-be", "master", "br0", "up",
    ]);
    sh(&[
        "ip",
        "-n",
        &be_ns,
        "addr",
        "add",
        "10.202.1.21/24",
        "dev",
        "eth0",
    ]);
    sh(&["ip", "-n", &be_ns, "link", "set", "eth0", "up"]);
    // The peers' ARP caches still hold the old device's MAC address.
    for (ns, _, _) in &lab.workloads {
        sh(&["ip", "-n", ns, "neigh", "flush", "all"]);
    }
    lab.wait_status("backend attached again", |s| {
        s.pending == 0 && s.attached == 3
    });
    assert_ne!(lab.ifindex("backend"), old_ifindex);
    lab.expect("the recreated interface is enforced", &seed2);

    for f in [
        "broken.yaml",
        "frontend-to-backend.yaml",
        "frontend-egress-control.yaml",
    ] {
        std::fs::remove_file(lab.tmp.path().join("netpol.d").join(f)).unwrap();
    }
    lab.wait_status("policies removed", |s| s.policies == 0 && !s.degraded);
    lab.expect("policies removed: everything connects", &open);
}

/// `netpolctl monitor --json` of a lab, as a channel of parsed lines; killed
/// when dropped.
struct Monitor {
    child: Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl Monitor {
    fn start(lab: &Lab) -> Monitor {
        let mut child = Command::new(env!("CARGO_BIN_EXE_netpolctl"))
            .args(["monitor", "--json", "--config"])
            .arg(lab.config())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str(&line) else {
                    continue;
                };
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        // The daemon serves the client before events go out to it.
        std::thread::sleep(Duration::from_millis(300));
        Monitor { child, lines }
    }

    /// The first event for which `f` holds, within 5 s.
    fn wait(
        &self,
        lab: &Lab,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if f(&v) => return v,
                Ok(_) => {}
                Err(_) => panic!("no {what} event from netpolctl monitor\n{}", lab.log()),
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A staged deny-all on backend (docs/policy.md, "Staged policies"): traffic to
/// backend passes, each would-be drop is an audit event attributed to the
/// staged policy; with the annotation removed the same flows are denied.
#[test]
fn staged_deny_all_passes_and_reports_then_denies_once_enforced() {
    if !privileged("staged_deny_all_passes_and_reports_then_denies_once_enforced") {
        return;
    }
    let mut lab = Lab::new();
    lab.start_daemon();
    let policy = |annotations: &str| {
        format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: backend-lockdown\n{annotations}spec:\n  endpointSelector:\n    matchLabels: {{app: backend}}\n  ingress:\n    - {{}}\n")
    };
    let file = lab.tmp.path().join("netpol.d/lockdown.yaml");
    let install = |text: &str| {
        let tmp = lab.tmp.path().join("netpol.d/.lockdown.yaml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    let g = lab.status().unwrap().generation;
    install(&policy("  annotations:\n    netpol.io/audit: \"true\"\n"));
    lab.wait_status("the staged policy applied", |s| {
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
        let src = lab.addr(from).to_string();
        let ev = monitor.wait(&lab, "audit", |v| {
            v["verdict"] == "audit" && v["src"] == src.as_str() && v["dport"] == port
        });
        assert_eq!(ev["endpoint"], "default/backend", "{ev}");
        assert_eq!(ev["dst"], "10.202.1.21", "{ev}");
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
    let (code, table) = lab.netpolctl(&["endpoints", "--json"]);
    assert_eq!(code, 0);
    let eps: Vec<serde_json::Value> = serde_json::from_str(&table).unwrap();
    let backend = eps.iter().find(|e| e["name"] == "backend").unwrap();
    assert_eq!(backend["ingress_default_deny"], false, "{backend}");
    assert!(
        backend["counters"]["audit"].as_u64().unwrap() >= 2,
        "{backend}"
    );
    assert_eq!(backend["counters"]["denied_default"], 0, "{backend}");

    // Enforced: the same flows are refused, and reported as drops.
    let g = lab.status().unwrap().generation;
    install(&policy(""));
    lab.wait_status("the policy enforced", |s| {
        s.generation > g && s.policies == 1
    });
    let monitor = Monitor::start(&lab);
    let enforced: Vec<_> = flows.iter().map(|(f, t, p)| (*f, *t, *p, false)).collect();
    lab.expect("enforced: backend refuses them", &enforced);
    let src = lab.addr("frontend-1").to_string();
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

//! Benchmark: how long from a policy file renamed into the policy directory until
//! the kernel enforces it, with 1,000 endpoints and 1,000 policies; and netpold's
//! memory at that scale.
//!
//! Needs root, bpffs and the kernel datapath. Builds a node network namespace with
//! a bridge, one client and one server workload in their own namespaces, and
//! `--endpoints - 2` more local endpoints on veth pairs inside the node namespace;
//! writes one policy per endpoint; runs the real netpold there. Then flips a
//! toggle policy `--changes` times (allow client → server TCP 80, then not) by
//! renaming a file in, and measures until a fresh TCP connection shows the new
//! verdict. Everything is named `npl-bench-*` and removed at the end.
//!
//! cargo build --bins --examples && sudo target/debug/examples/bench_apply [--endpoints N] [--policies N] [--changes N]

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netpol::daemon::status::Status;

const NODE: &str = "npl-bench-node";
const CLIENT: &str = "npl-bench-cli";
const SERVER: &str = "npl-bench-srv";
const PIN: &str = "/sys/fs/bpf/npl-bench";

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

fn enter(netns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

struct Cleanup {
    daemon: Option<Child>,
    netpold: PathBuf,
    config: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(&self.netpold)
            .arg("--config")
            .arg(&self.config)
            .arg("--detach")
            .stderr(Stdio::null())
            .status();
        self.stop.store(true, Ordering::Relaxed);
        for ns in [CLIENT, SERVER, NODE] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(PIN);
    }
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn connects(dst: SocketAddr, timeout: Duration) -> bool {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(CLIENT);
            TcpStream::connect_timeout(&dst, timeout).is_ok()
        })
        .join()
        .unwrap()
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let endpoints = arg(&args, "--endpoints", 1000).max(2);
    let policies = arg(&args, "--policies", 1000).max(1);
    let changes = arg(&args, "--changes", 100);
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let netpold = bin.join("netpold");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mut guard = Cleanup {
        daemon: None,
        netpold: netpold.clone(),
        config: t.join("netpold.toml"),
        stop: Arc::new(AtomicBool::new(false)),
    };

    // Network: node with br0; client and server behind it; the other endpoints on
    // veth pairs that stay inside the node namespace.
    let t0 = Instant::now();
    sh(&["ip", "netns", "add", NODE]);
    let mut batch = String::from("link set lo up\nlink add br0 type bridge\naddr add 10.208.0.1/16 dev br0\nlink set br0 up\n");
    for i in 0..endpoints - 2 {
        batch.push_str(&format!(
            "link add vb{i} type veth peer name vp{i}\nlink set vb{i} up\nlink set vp{i} up\n"
        ));
    }
    std::fs::write(t.join("batch"), batch).unwrap();
    sh(&[
        "ip",
        "-n",
        NODE,
        "-batch",
        t.join("batch").to_str().unwrap(),
    ]);
    let server_ip = Ipv4Addr::new(10, 208, 255, 2);
    for (ns, host, ip) in [
        (CLIENT, "veth-cli", Ipv4Addr::new(10, 208, 255, 1)),
        (SERVER, "veth-srv", server_ip),
    ] {
        sh(&["ip", "netns", "add", ns]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        sh(&[
            "ip", "-n", NODE, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ]);
        sh(&["ip", "-n", NODE, "link", "set", host, "master", "br0", "up"]);
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{ip}/16"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
    }
    let stop = guard.stop.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter(SERVER);
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 80)).unwrap();
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => drop(s),
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    });
    rx.recv().unwrap();
    let net_s = t0.elapsed().as_secs_f64();

    // Registry and policies.
    for d in ["netpol.d", "endpoints.d", "run", "state"] {
        std::fs::create_dir(t.join(d)).unwrap();
    }
    let mut reg = String::new();
    let ep = |name: &str, app: &str, iface: &str, ip: Ipv4Addr| {
        format!("apiVersion: netpol/v1\nkind: Endpoint\nmetadata:\n  name: {name}\n  labels: {{app: {app}}}\nspec:\n  interface: {iface}\n  addresses: [{ip}]\n---\n")
    };
    reg.push_str(&ep(
        "client",
        "client",
        "veth-cli",
        Ipv4Addr::new(10, 208, 255, 1),
    ));
    reg.push_str(&ep("server", "server", "veth-srv", server_ip));
    for i in 0..endpoints - 2 {
        let ip = Ipv4Addr::new(10, 208, (i / 250) as u8, (i % 250 + 2) as u8);
        reg.push_str(&ep(
            &format!("ep-{i}"),
            &format!("ep-{i}"),
            &format!("vb{i}"),
            ip,
        ));
    }
    std::fs::write(t.join("endpoints.d/bench.yaml"), reg).unwrap();
    let n_eps = endpoints - 2;
    for i in 0..policies - 1 {
        let (a, b) = (i % n_eps.max(1), (i + 1) % n_eps.max(1));
        std::fs::write(
            t.join(format!("netpol.d/p{i:04}.yaml")),
            format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{i}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: ep-{a}}}}}\n  ingress:\n    - fromEndpoints: [{{matchLabels: {{app: ep-{b}}}}}]\n      toPorts: [{{ports: [{{port: \"{}\", protocol: TCP}}]}}]\n", 1000 + i % 50),
        )
        .unwrap();
    }
    // The toggle: selects the server (default-deny ingress) and allows the client or nobody.
    let toggle = |allow: bool| {
        let from = if allow { "client" } else { "nobody" };
        format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: toggle}}\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n    - fromEndpoints: [{{matchLabels: {{app: {from}}}}}]\n      toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]\n")
    };
    std::fs::write(t.join("netpol.d/toggle.yaml"), toggle(false)).unwrap();
    std::fs::write(
        &guard.config,
        format!(
            "policy_dir = \"{}\"\nendpoint_dirs = [\"{}\"]\npin_dir = \"{PIN}\"\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\nnode_name = \"bench\"\nlog_level = \"{}\"\nstrict_file_modes = false\n[maps]\npolicy_max_entries = 1048576\nendpoint_max_entries = 4096\n",
            t.join("netpol.d").display(),
            t.join("endpoints.d").display(),
            t.join("run").display(),
            t.join("state").display(),
            if std::env::var("NETPOL_BENCH_LOG").is_ok() { "info" } else { "warn" },
        ),
    )
    .unwrap();

    // netpold in the node namespace (network only: pins stay on the host's bpffs).
    let node = std::fs::File::open(format!("/run/netns/{NODE}")).unwrap();
    let fd = node.as_raw_fd();
    let mut cmd = Command::new(&netpold);
    cmd.arg("--config")
        .arg(&guard.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // NETPOL_BENCH_LOG=FILE keeps netpold's log (at info level) for a closer look.
    if let Ok(path) = std::env::var("NETPOL_BENCH_LOG") {
        cmd.stderr(std::fs::File::create(path).unwrap());
    }
    // SAFETY: setns is async-signal-safe and `node` outlives spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    let started = Instant::now();
    guard.daemon = Some(cmd.spawn().unwrap());
    let sock = t.join("run/netpold.sock");
    let status = || {
        netpol::cli::daemonctl::query::<Status>(&sock, "status")
            .ok()
            .map(|(s, _)| s)
    };
    let s = loop {
        if let Some(s) = status().filter(|s| s.ready) {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "netpold did not become ready: {:?}",
            status()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let ready_s = started.elapsed().as_secs_f64();
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let dst = SocketAddr::from((server_ip, 80));
    assert!(
        !connects(dst, Duration::from_millis(200)),
        "the toggle starts closed"
    );

    let mut lat = Vec::new();
    let mut allow = false;
    for i in 0..changes {
        allow = !allow;
        let staged = t.join(format!("netpol.d/.toggle.{i}.new"));
        std::fs::write(&staged, toggle(allow)).unwrap();
        let t0 = Instant::now();
        std::fs::rename(&staged, t.join("netpol.d/toggle.yaml")).unwrap();
        // Fresh connections until the verdict flips; a drop shows as no answer within 3 ms
        // (the veth round trip is tens of microseconds).
        loop {
            if connects(dst, Duration::from_millis(3)) == allow {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "change {i} not enforced after 30 s"
            );
        }
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = guard.daemon.as_ref().unwrap().id();
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        proc_status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
            .unwrap_or_default()
    };
    let s = status().unwrap();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "bench_apply: {endpoints} endpoints ({} attached), {policies} policies, {changes} changes",
        s.attached
    );
    println!(
        "  setup: network {net_s:.1} s, netpold ready after {ready_s:.1} s, last apply {:.1} ms",
        s.last_apply_ms.unwrap_or(0.0)
    );
    if !lat.is_empty() {
        println!(
            "  rename -> enforced: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 < 50 ms)",
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99),
            lat[lat.len() - 1]
        );
    }
    let rss: f64 = field("VmRSS:").parse::<f64>().unwrap_or(0.0) / 1024.0;
    let hwm: f64 = field("VmHWM:").parse::<f64>().unwrap_or(0.0) / 1024.0;
    println!("  netpold memory: RSS {rss:.1} MiB, peak {hwm:.1} MiB (target < 128 MiB)");
    drop(guard);
}

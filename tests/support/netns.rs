//! Helpers for the privileged multi-node and kind-node tests: the privilege
//! check, `ip` commands, guards that remove namespaces, pins and daemons also on
//! failure, real TCP probes from inside a workload's network namespace, and
//! netpold instances run inside a node's network namespace.
//!
//! Everything created here is named with the `npn` prefix.

#![allow(dead_code)]

use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether privileged tests can run here; under `CI=true` they must.
pub fn privileged(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let bpffs = std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines().any(|l| {
                l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.starts_with("bpf ")
            })
        })
        .unwrap_or(false);
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let nsenter = Command::new("nsenter")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if root && bpffs && ip && nsenter {
        return true;
    }
    let why = if !root {
        "not root"
    } else if !bpffs {
        "no bpffs at /sys/fs/bpf"
    } else if !ip {
        "no `ip` (iproute2)"
    } else {
        "no `nsenter` (util-linux)"
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: cannot run under CI: {why}");
    }
    eprintln!("{test}: skipped: {why}");
    false
}

/// Run `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Run a command inside a named network namespace (`ip netns exec`).
pub fn netns_exec(ns: &str, args: &[&str]) {
    let o = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("run ip netns exec");
    assert!(
        o.status.success(),
        "ip netns exec {ns} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Network namespaces and pin directories this test made; all removed on drop.
#[derive(Default)]
pub struct Netns {
    pub names: Vec<String>,
    pub pins: Vec<PathBuf>,
}

impl Netns {
    /// Create (after removing a leftover of the same name from a crashed run).
    pub fn add(&mut self, name: &str) {
        assert!(
            name.starts_with("npn"),
            "{name}: namespaces of this test start with npn"
        );
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        self.names.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
        // No duplicate address detection on links made later: a tentative
        // link-local address delays IPv6 neighbour discovery by seconds.
        netns_exec(
            name,
            &[
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        );
    }

    /// A pin directory under /sys/fs/bpf that is removed on drop (and now, if left over).
    pub fn pin_dir(&mut self, name: &str) -> PathBuf {
        assert!(name.starts_with("npn"));
        let p = Path::new("/sys/fs/bpf").join(name);
        let _ = std::fs::remove_dir_all(&p);
        self.pins.push(p.clone());
        p
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Workloads first (their veth peers go with them), then the nodes.
        for n in self.names.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
        for p in &self.pins {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Run `f` on a new thread that has entered network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

/// TCP listeners (IPv4 and IPv6) on every `port` of every address in namespace `ns` (kept open
/// while the returned sockets live; connections wait in the backlog).
pub fn listen(ns: &str, ports: &[u16]) -> Vec<TcpListener> {
    let ports = ports.to_vec();
    let ns2 = ns.to_string();
    in_netns(ns, move || {
        ports
            .iter()
            // [::] with the kernel's default bindv6only=0: IPv4 and IPv6 alike
            .map(|p| {
                TcpListener::bind(("::", *p))
                    .unwrap_or_else(|e| panic!("{ns2}: listen on {p}: {e}"))
            })
            .collect()
    })
}

/// Accept and close connections on `ls` in the background so no backlog fills.
pub fn drain(ls: Vec<TcpListener>) {
    for l in ls {
        std::thread::spawn(move || {
            for c in l.incoming() {
                drop(c);
            }
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Connected,
    TimedOut,
    /// Refused or another error: the SYN got through but nothing listens, or the
    /// network is broken. Never expected in these tests.
    Error,
}

/// One TCP connect from inside `ns` to `dst:port`.
pub fn connect_from(ns_path: &str, dst: IpAddr, port: u16, timeout: Duration) -> Probe {
    enter(ns_path);
    match TcpStream::connect_timeout(&SocketAddr::new(dst, port), timeout) {
        Ok(_) => Probe::Connected,
        Err(e)
            if e.kind() == std::io::ErrorKind::TimedOut
                || e.kind() == std::io::ErrorKind::WouldBlock =>
        {
            Probe::TimedOut
        }
        Err(_) => Probe::Error,
    }
}

/// Probe every `(source netns, destination, port)` in parallel (`threads` at a
/// time, each probe on a thread of its own because a thread stays in the
/// namespace it entered).
pub fn probe_all(jobs: &[(String, IpAddr, u16)], timeout: Duration, threads: usize) -> Vec<Probe> {
    let mut out = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(threads) {
        let results: Vec<Probe> = std::thread::scope(|s| {
            let hs: Vec<_> = chunk
                .iter()
                .map(|(ns, dst, port)| {
                    let path = format!("/run/netns/{ns}");
                    s.spawn(move || connect_from(&path, *dst, *port, timeout))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("probe thread"))
                .collect()
        });
        out.extend(results);
    }
    out
}

/// Probe `jobs`; a probe whose answer differs from `expect(i)` (true = connects)
/// is repeated once with `retry` so a slow first packet is not read as a drop.
/// A drop stays a drop: the retry can only turn a timeout into a connect.
pub fn probe_checked(
    jobs: &[(String, IpAddr, u16)],
    expect: &[bool],
    timeout: Duration,
    retry: Duration,
    threads: usize,
) -> Vec<Probe> {
    let mut out = probe_all(jobs, timeout, threads);
    let again: Vec<usize> = (0..jobs.len())
        .filter(|&i| out[i] == Probe::TimedOut && expect[i])
        .collect();
    let sub: Vec<(String, IpAddr, u16)> = again.iter().map(|&i| jobs[i].clone()).collect();
    for (k, r) in probe_all(&sub, retry, threads).into_iter().enumerate() {
        out[again[k]] = r;
    }
    out
}

/// A netpold instance running inside a node's network namespace. Stopped with
/// SIGTERM (SIGKILL after 5 s) on drop; its log is kept for failure messages.
pub struct Daemon {
    pub name: String,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Start `netpold --config config` in network namespace `ns` (only the network
    /// namespace is entered, so the daemon sees the host's /sys/fs/bpf).
    pub fn start(name: &str, ns: &str, config: &Path, log: &Path) -> Daemon {
        let out = File::create(log).expect("daemon log");
        let err = out.try_clone().unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_netpold"))
            .arg("--config")
            .arg(config)
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start netpold");
        Daemon {
            name: name.to_string(),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
            child: Some(child),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `netpolctl ARGS --config <this daemon's config>`: (exit code, stdout).
    pub fn ctl(&self, args: &[&str]) -> (Option<i32>, String) {
        let o = Command::new(env!("CARGO_BIN_EXE_netpolctl"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run netpolctl");
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        )
    }

    /// Wait until `netpolctl status --json` says ready with `attached` endpoints
    /// attached and nothing pending or degraded.
    pub fn wait_ready(&mut self, attached: usize, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        let mut last;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "{}: netpold exited with {st}; log:\n{}",
                        self.name,
                        self.log_text()
                    );
                }
            }
            let (code, out) = self.ctl(&["status", "--json"]);
            if code == Some(0) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) {
                    if v["ready"] == true
                        && v["degraded"] == false
                        && v["attached"].as_u64() == Some(attached as u64)
                        && v["pending"].as_u64() == Some(0)
                    {
                        return v;
                    }
                }
            }
            last = out;
            if Instant::now() > deadline {
                panic!("{}: not ready with {attached} attached endpoints in {within:?}; last status: {last}\nlog:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A netpold.toml for an isolated instance.
pub fn write_config(path: &Path, node: &str, root: &Path, pin_dir: &Path, extra: &str) {
    let text = format!(
        "policy_dir = \"{pol}\"\nendpoint_dirs = [\"{eps}\"]\npin_dir = \"{pin}\"\nruntime_dir = \"{run}\"\nstate_dir = \"{state}\"\nnode_name = \"{node}\"\nresync_interval_s = 0\n{extra}",
        pol = root.join("netpol.d").display(),
        eps = root.join("endpoints.d").display(),
        pin = pin_dir.display(),
        run = root.join("run").display(),
        state = root.join("state").display(),
    );
    std::fs::create_dir_all(root.join("netpol.d")).unwrap();
    std::fs::create_dir_all(root.join("endpoints.d")).unwrap();
    std::fs::write(path, text).unwrap();
}

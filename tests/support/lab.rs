//! The lab of the fault and soak tests (tests/faults.rs, tests/soak.rs): a node
//! network namespace with a bridge and workloads behind veth pairs, TCP
//! listeners in every workload, and the real `netpold` binary enforcing on the
//! node (it enters only the node's network namespace, so its pins live on the
//! host's bpffs), optionally wrapped (`unshare --mount ...`) for faults that
//! need a private mount namespace.
//!
//! Names: netns `npf-<pid>-<tag>-<workload>` and `npf-<pid>-<tag>-n`, pins
//! `/sys/fs/bpf/npf-<pid>-<tag>`, addresses 10.209.1.0/24. Drop kills the
//! daemon, detaches its pins and deletes every namespace, also when a test fails.

#![allow(dead_code)]

use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netpol::daemon::status::{EndpointView, Status};

pub const PORTS: [u16; 3] = [80, 5432, 8080];

/// True if privileged tests can run; otherwise skip with a message, or fail
/// under CI=true.
pub fn privileged(test: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not running as root")
    } else if !Path::new("/sys/fs/bpf").is_dir() {
        Some("/sys/fs/bpf does not exist")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("the `ip` command (iproute2) is missing")
    } else if Command::new("unshare").arg("--version").output().is_err() {
        Some("the `unshare` command (util-linux) is missing")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: privileged test cannot run under CI=true: {why}");
            }
            eprintln!("skipping {test}: {why}");
            false
        }
    }
}

pub fn sh(args: &[&str]) {
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

/// Run `ip -n NS -batch -` with these lines (-force: go on after an error).
pub fn ip_batch(ns: &str, lines: &str) {
    let mut child = Command::new("ip")
        .args(["-force", "-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ip -batch");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let _ = child.wait();
}

/// Move the calling thread into network namespace `ns`.
pub fn enter(ns: &str) {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .expect("namespace thread panicked")
    })
}

pub struct Workload {
    pub short: String,
    pub name: String,
    pub app: String,
    pub ns: String,
    pub addr: Ipv4Addr,
}

pub struct Lab {
    pub tag: String,
    pub node: String,
    pub workloads: Vec<Workload>,
    pub tmp: tempfile::TempDir,
    pub pin_dir: PathBuf,
    pub daemon: Option<Child>,
    stop_listeners: Arc<AtomicBool>,
    extra_config: String,
}

impl Lab {
    /// A lab with these workloads `(short, endpoint name, app label, last octet)`.
    pub fn new(tag: &str, workloads: &[(&str, &str, &str, u8)]) -> Lab {
        let tag = format!("{}-{tag}", std::process::id());
        let node = format!("npf-{tag}-n");
        let tmp = tempfile::Builder::new().prefix("npf-").tempdir().unwrap();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/npf-{tag}"));
        let _ = Command::new("ip").args(["netns", "del", &node]).output();
        let _ = std::fs::remove_dir_all(&pin_dir);
        let mut lab = Lab {
            node: node.clone(),
            workloads: Vec::new(),
            pin_dir,
            tag,
            tmp,
            daemon: None,
            stop_listeners: Arc::new(AtomicBool::new(false)),
            extra_config: String::new(),
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
            "10.209.1.1/24",
            "dev",
            "br0",
        ]);
        sh(&["ip", "-n", &node, "link", "set", "br0", "up"]);
        for &(short, name, app, last) in workloads {
            let ns = format!("npf-{}-{short}", lab.tag);
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            sh(&["ip", "netns", "add", &ns]);
            let addr = Ipv4Addr::new(10, 209, 1, last);
            lab.workloads.push(Workload {
                short: short.into(),
                name: name.into(),
                app: app.into(),
                ns: ns.clone(),
                addr,
            });
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            lab.plug(short);
            for port in PORTS {
                lab.listen(&ns, port);
            }
        }
        for d in ["netpol.d", "endpoints.d", "run", "state"] {
            std::fs::create_dir(lab.tmp.path().join(d)).unwrap();
        }
        lab.write_registry("");
        lab.write_config("");
        lab
    }

    /// (Re)create workload `short`'s veth pair: `veth-<short>` on the bridge,
    /// `eth0` with its address in the workload's namespace.
    pub fn plug(&self, short: &str) {
        let w = self.w(short);
        let host = format!("veth-{short}");
        sh(&[
            "ip", "-n", &self.node, "link", "add", &host, "type", "veth", "peer", "name", "eth0",
            "netns", &w.ns,
        ]);
        sh(&[
            "ip", "-n", &self.node, "link", "set", &host, "master", "br0", "up",
        ]);
        sh(&[
            "ip",
            "-n",
            &w.ns,
            "addr",
            "add",
            &format!("{}/24", w.addr),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &w.ns, "link", "set", "eth0", "up"]);
        // Peers may still hold an older device's MAC address.
        for o in &self.workloads {
            let _ = Command::new("ip")
                .args(["-n", &o.ns, "neigh", "flush", "all"])
                .output();
        }
    }

    pub fn w(&self, short: &str) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.short == short)
            .unwrap_or_else(|| panic!("no workload {short}"))
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    pub fn config(&self) -> PathBuf {
        self.path("netpold.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.path("run/netpold.sock")
    }

    /// netpold.toml with the lab's paths, then `extra` (more keys, or sections).
    pub fn write_config(&mut self, extra: &str) {
        self.extra_config = extra.to_string();
        self.write_config_with(&self.path("state"), extra);
    }

    pub fn write_config_with(&self, state_dir: &Path, extra: &str) {
        let t = self.tmp.path();
        let top = format!(
            "policy_dir = \"{}\"\nendpoint_dirs = [\"{}\"]\npin_dir = \"{}\"\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\nnode_name = \"node-a\"\nlog_level = \"debug\"\nlog_format = \"json\"\nstrict_file_modes = false\n",
            t.join("netpol.d").display(),
            t.join("endpoints.d").display(),
            self.pin_dir.display(),
            t.join("run").display(),
            state_dir.display()
        );
        std::fs::write(self.config(), format!("{top}{extra}")).unwrap();
    }

    /// The registry: every workload (labels app=<app> and `extra_labels` of
    /// each workload), then `more` (raw YAML documents).
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
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv().unwrap();
    }

    /// Whether a TCP connection from workload `from` to `to:port` is established within `timeout`.
    pub fn connects_within(&self, from: &str, to: &str, port: u16, timeout: Duration) -> bool {
        let dst = SocketAddr::from((self.w(to).addr, port));
        in_ns(&self.w(from).ns, || {
            TcpStream::connect_timeout(&dst, timeout).is_ok()
        })
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
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("netpold.log")).unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Start netpold in the node's network namespace, as `wrapper... netpold
    /// --config FILE` (`wrapper` may be empty). Does not wait.
    pub fn spawn_daemon(&mut self, wrapper: &[&str]) {
        let netns = std::fs::File::open(format!("/run/netns/{}", self.node)).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("netpold.log"))
            .unwrap();
        let netpold = env!("CARGO_BIN_EXE_netpold");
        let mut cmd = if wrapper.is_empty() {
            let mut c = Command::new(netpold);
            c.arg("--config").arg(self.config());
            c
        } else {
            let mut c = Command::new(wrapper[0]);
            c.args(&wrapper[1..])
                .env("NETPOLD", netpold)
                .env("NETPOLD_CONFIG", self.config());
            c
        };
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
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
    }

    pub fn start_daemon(&mut self) {
        self.spawn_daemon(&[]);
        self.wait_status("ready", |s| s.ready);
    }

    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().expect("daemon running").id()
    }

    /// The daemon's exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.daemon
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn status(&self) -> Option<Status> {
        netpol::cli::daemonctl::query::<Status>(&self.socket(), "status")
            .ok()
            .map(|(s, _)| s)
    }

    pub fn endpoints(&self) -> Vec<EndpointView> {
        netpol::cli::daemonctl::query::<Vec<EndpointView>>(&self.socket(), "endpoints")
            .map(|(e, _)| e)
            .unwrap_or_default()
    }

    pub fn wait_status(&self, what: &str, f: impl Fn(&Status) -> bool) -> Status {
        self.wait_status_for(what, Duration::from_secs(30), f)
    }

    pub fn wait_status_for(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&Status) -> bool,
    ) -> Status {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status() {
                if f(&s) {
                    return s;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}: {:?}\ndaemon log (tail):\n{}",
                    self.status(),
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn term(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    /// `netpolctl ARGS --config FILE`: exit code and stdout.
    pub fn netpolctl(&self, args: &[&str]) -> (i32, String) {
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

    /// Resident memory (KiB) and open descriptors of the daemon.
    pub fn rss_fds(&self) -> (u64, usize) {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        (rss, fds)
    }

    /// What the daemon's open descriptors point at, for messages.
    pub fn fd_targets(&self) -> Vec<String> {
        let pid = self.pid();
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|p| p.display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// ifindexes of the node's devices now.
    pub fn node_ifindexes(&self) -> Vec<u32> {
        in_ns(&self.node, || {
            nix::net::if_::if_nameindex()
                .map(|l| l.iter().map(|i| i.index()).collect())
                .unwrap_or_default()
        })
    }

    /// ifindexes named by the daemon's pinned links (`links/tcx-<ifindex>-<hook>`,
    /// `links/tc-<ifindex>-<hook>`).
    pub fn pinned_link_ifindexes(&self) -> Vec<u32> {
        let mut out: Vec<u32> = std::fs::read_dir(self.pin_dir.join("links"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.split('-').nth(1))
                            .and_then(|n| n.parse().ok())
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out.dedup();
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new(env!("CARGO_BIN_EXE_netpold"))
            .arg("--config")
            .arg(self.config())
            .arg("--detach")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.stop_listeners.store(true, Ordering::Relaxed);
        for w in &self.workloads {
            let _ = Command::new("ip").args(["netns", "del", &w.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node])
            .status();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        // A failed test may leave a read-only or mounted path behind; best effort.
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(self.tmp.path())
            .status();
    }
}

/// Write beside, then rename in, as a package manager would.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.new",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// One request line on the runtime socket and the answer line, with a timeout.
pub fn raw_request(socket: &Path, request: &[u8], timeout: Duration) -> std::io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(request)?;
    let mut line = String::new();
    std::io::BufReader::new(&mut s).read_line(&mut line)?;
    Ok(line)
}

/// Read everything until EOF or timeout (what a client sees after a refused request).
pub fn read_all(s: &mut std::os::unix::net::UnixStream, timeout: Duration) -> String {
    s.set_read_timeout(Some(timeout)).ok();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// A small deterministic generator (xorshift64*), seeded.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

//! The real `netpold` in a node's network namespace: its files (one directory:
//! `netpol.d/`, `endpoints.d/`, `run/`, `state/`, `netpold.toml`, `netpold.log`),
//! its start (only the network namespace is entered, so it keeps the host's
//! /sys/fs/bpf and with it pins that outlive it), its runtime socket, what it
//! holds (RSS, fds, pinned links) and its end. [`Daemon`]'s drop stops it,
//! detaches what it attached and removes its pins, also when a test fails.
//! For the daemon's loop run in-process against the in-memory datapath: its
//! config ([`in_process_config`]) and the seed registry's links ([`seed_links`]).

use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use netpol::daemon::status::{EndpointView, Status};

use super::cmd::{NETPOLCTL, NETPOLD};

pub struct Daemon {
    /// For messages.
    pub name: String,
    /// The network namespace it runs in.
    pub netns: String,
    pub root: PathBuf,
    pub pin_dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// A daemon of namespace `netns` whose files live under `root` (made now)
    /// and whose pins go to `pin_dir` (removed now if left over). Not started.
    pub fn new(name: &str, netns: &str, root: &Path, pin_dir: &Path) -> Daemon {
        for d in ["netpol.d", "endpoints.d", "run", "state"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let _ = std::fs::remove_dir_all(pin_dir);
        Daemon {
            name: name.to_string(),
            netns: netns.to_string(),
            root: root.to_path_buf(),
            pin_dir: pin_dir.to_path_buf(),
            child: None,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn config(&self) -> PathBuf {
        self.path("netpold.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.path("run/netpold.sock")
    }

    /// netpold.toml: this daemon's directories and `node`, then `extra` (more
    /// keys, or sections).
    pub fn write_config(&self, node: &str, extra: &str) {
        self.write_config_with(&self.path("state"), node, extra);
    }

    /// The same with another state_dir.
    pub fn write_config_with(&self, state_dir: &Path, node: &str, extra: &str) {
        let text = format!(
            "policy_dir = \"{}\"\nendpoint_dirs = [\"{}\"]\npin_dir = \"{}\"\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\nnode_name = \"{node}\"\n{extra}",
            self.path("netpol.d").display(),
            self.path("endpoints.d").display(),
            self.pin_dir.display(),
            self.path("run").display(),
            state_dir.display()
        );
        std::fs::write(self.config(), text).unwrap();
    }

    /// Start `wrapper... netpold --config FILE` (`wrapper` may be empty; it gets
    /// `$NETPOLD` and `$NETPOLD_CONFIG`) in the namespace, output appended to
    /// netpold.log. Does not wait.
    pub fn spawn(&mut self, wrapper: &[&str]) {
        let netns = std::fs::File::open(format!("/run/netns/{}", self.netns)).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("netpold.log"))
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            None => {
                let mut c = Command::new(NETPOLD);
                c.arg("--config").arg(self.config());
                c
            }
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args)
                    .env("NETPOLD", NETPOLD)
                    .env("NETPOLD_CONFIG", self.config());
                c
            }
        };
        cmd.env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
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
        self.child = Some(cmd.spawn().unwrap());
        drop(netns);
    }

    /// Spawn and wait until ready.
    pub fn start(&mut self) {
        self.spawn(&[]);
        self.wait_status("ready", |s| s.ready);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Send `sig` to the running daemon (SIGSTOP/SIGCONT to hold it still).
    pub fn signal(&self, sig: i32) {
        super::cmd::signal(self.child.as_ref().expect("daemon running"), sig);
    }

    /// The exit status, once it has exited (then it is no longer running).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten();
        if st.is_some() {
            self.child = None;
        }
        st
    }

    /// Wait up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; SIGKILL after 5 s.
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("netpold.log")).unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
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
                    "{}: timed out waiting for {what}: {:?}\ndaemon log (tail):\n{}",
                    self.name,
                    self.status(),
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// Wait until `netpolctl status --json` says ready with `attached` endpoints
    /// attached and nothing pending or degraded.
    pub fn wait_ready(&mut self, attached: usize, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.exited() {
                panic!(
                    "{}: netpold exited with {st}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            let (code, out) = self.ctl(&["status", "--json"]);
            if code == 0 {
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
            if Instant::now() > deadline {
                panic!("{}: not ready with {attached} attached endpoints in {within:?}; last status: {out}\nlog:\n{}", self.name, self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `netpolctl ARGS --config <this daemon's config>`: exit code and stdout.
    pub fn ctl(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(NETPOLCTL)
            .args(args)
            .arg("--config")
            .arg(self.config())
            .output()
            .expect("run netpolctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Resident memory (KiB) and open descriptors.
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

    /// What the open descriptors point at, for messages.
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

    /// ifindexes named by the pinned links (`links/tcx-<ifindex>-<hook>`,
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

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if self.config().exists() {
            let _ = Command::new(NETPOLD)
                .arg("--config")
                .arg(self.config())
                .arg("--detach")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
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

/// One request line on a runtime socket and the answer line, with a timeout.
pub fn raw_request(socket: &Path, request: &[u8], timeout: Duration) -> std::io::Result<String> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(request)?;
    let mut line = String::new();
    std::io::BufReader::new(&mut s).read_line(&mut line)?;
    Ok(line)
}

/// Read everything until EOF or timeout (what a client sees after a refused request).
pub fn read_all(s: &mut UnixStream, timeout: Duration) -> String {
    s.set_read_timeout(Some(timeout)).ok();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// A config for the daemon's loop run in-process against the in-memory
/// datapath (`netpol::daemon::run_with`): these directories, its runtime and
/// state under `tmp`, node `host-a`, no resync timer, no file-mode checks.
pub fn in_process_config(tmp: &Path, pol: &Path, eps: &Path) -> netpol::config::Config {
    netpol::config::Config {
        policy_dir: pol.to_path_buf(),
        endpoint_dirs: vec![eps.to_path_buf()],
        pin_dir: "/sys/fs/bpf/npn-unused".into(),
        runtime_dir: tmp.join("run"),
        state_dir: tmp.join("state"),
        node_name: "host-a".into(),
        resync_interval_s: 0,
        strict_file_modes: false,
        ..netpol::config::Config::default()
    }
}

/// The seed registry's interfaces (etc/examples/seed), as netlink would list them.
pub fn seed_links() -> netpol::daemon::netlink::LinkTable {
    let mut links = netpol::daemon::netlink::LinkTable::default();
    for (i, n) in ["veth-fe1", "veth-fe2", "veth-be", "veth-db"]
        .iter()
        .enumerate()
    {
        links.links.insert(n.to_string(), 11 + i as u32);
    }
    links
}

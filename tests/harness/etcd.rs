//! A real etcd (Debian's `etcd-server`) for fleet-mode tests: one member, a
//! temporary data directory, ports chosen free at run time (never 2379/2380),
//! on loopback or on an address inside a network namespace the test made.
//! [`Etcd`]'s drop continues and kills it (SIGCONT, SIGKILL) and removes its
//! data, also when a test panics. Under CI=true a test that finds no etcd binary
//! fails ([`super::require`]).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::netns::in_ns;
use super::Needs;

/// A free loopback port (bound and released; etcd binds it right after),
/// below the kernel's ephemeral range (32768 and up), so no outgoing
/// connection of a test running beside can take it between the check and a
/// restart of etcd on the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = 20000 + ((seed + n * 104_729) % 12_000) as u16;
        if p != 2379 && p != 2380 && TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

pub fn etcd_binary() -> Option<PathBuf> {
    super::require::first_existing(&["/usr/bin/etcd", "/usr/local/bin/etcd"])
}

/// One etcd member.
pub struct Etcd {
    child: Option<Child>,
    bin: PathBuf,
    pub dir: tempfile::TempDir,
    /// The address it listens on, and the network namespace (`None`: the test's own).
    pub host: String,
    pub netns: Option<String>,
    pub client_port: u16,
    pub peer_port: u16,
    /// Plain HTTP /health and /metrics (the client port may be TLS).
    pub metrics_port: u16,
    /// mTLS: the directory `scripts/etcd-tls-roles pki` filled (`None`: plain).
    pub tls: Option<PathBuf>,
}

impl Etcd {
    /// On loopback. `None` (skipped, said on stderr) without an etcd binary;
    /// under CI=true that is a failure.
    pub fn start(test: &str) -> Option<Etcd> {
        Etcd::start_at(test, "127.0.0.1", None)
    }

    /// On `host` inside network namespace `netns` (made by the test).
    pub fn start_at(test: &str, host: &str, netns: Option<&str>) -> Option<Etcd> {
        Etcd::start_with(test, host, netns, None)
    }

    /// On loopback with mTLS from the certificates in `pki` (server.pem,
    /// server-key.pem, ca.pem): every client must show one the CA signed.
    pub fn start_tls(test: &str, pki: &std::path::Path) -> Option<Etcd> {
        Etcd::start_with(test, "127.0.0.1", None, Some(pki.to_path_buf()))
    }

    /// With mTLS (as [`Etcd::start_tls`]) on `host` inside network namespace `netns`.
    pub fn start_tls_at(
        test: &str,
        host: &str,
        netns: &str,
        pki: &std::path::Path,
    ) -> Option<Etcd> {
        Etcd::start_with(test, host, Some(netns), Some(pki.to_path_buf()))
    }

    fn start_with(
        test: &str,
        host: &str,
        netns: Option<&str>,
        tls: Option<PathBuf>,
    ) -> Option<Etcd> {
        let bin = etcd_binary();
        let missing = bin.is_none();
        Needs::nothing()
            .unless(move || {
                missing.then(|| "no etcd binary (scripts/deps.sh installs etcd-server)".into())
            })
            .check(test)?;
        let mut e = Etcd {
            child: None,
            bin: bin?,
            dir: tempfile::Builder::new()
                .prefix("netpol-etcd-")
                .tempdir()
                .unwrap(),
            host: host.to_string(),
            netns: netns.map(str::to_string),
            client_port: free_port(),
            peer_port: free_port(),
            metrics_port: free_port(),
            tls,
        };
        e.spawn();
        Some(e)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.client_port)
    }

    /// Start it (again, on the same data).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let client = self.url();
        let peer = format!("http://{}:{}", self.host, self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args([
                "--listen-metrics-urls",
                &format!("http://{}:{}", self.host, self.metrics_port),
            ])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(d) = &self.tls {
            cmd.arg("--cert-file")
                .arg(d.join("server.pem"))
                .arg("--key-file")
                .arg(d.join("server-key.pem"))
                .arg("--trusted-ca-file")
                .arg(d.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let ns = self
            .netns
            .as_ref()
            .map(|n| std::fs::File::open(format!("/run/netns/{n}")).unwrap());
        if let Some(f) = &ns {
            let fd = f.as_raw_fd();
            // SAFETY: setns is async-signal-safe; the fd stays open until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(cmd.spawn().expect("start etcd"));
        drop(ns);
        self.wait_ready();
    }

    pub fn wait_ready(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(body) = self.http_get("/health") {
                if body.contains("true") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd did not become ready: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        super::cmd::signal(self.child.as_ref().unwrap(), sig);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    #[cfg(feature = "etcd")]
    pub fn store(&self) -> std::sync::Arc<dyn netpol::fleet::Store> {
        use netpol::fleet::etcd::{ConnectSettings, EtcdStore};
        let mut s = ConnectSettings::plain(vec![self.url()]);
        s.request_timeout = Duration::from_millis(1000);
        s.connect_timeout = Duration::from_millis(500);
        std::sync::Arc::new(EtcdStore::new(s))
    }

    /// GET `path` from its metrics port (HTTP/1.0), from its namespace.
    pub fn http_get(&self, path: &str) -> std::io::Result<String> {
        let get = || {
            let mut s = TcpStream::connect((self.host.as_str(), self.metrics_port))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.host)?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        };
        match &self.netns {
            Some(ns) => in_ns(ns, get),
            None => get(),
        }
    }

    /// etcd's own gauge of open watchers (Prometheus text on /metrics).
    pub fn watchers(&self) -> i64 {
        let body = self.http_get("/metrics").unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
            .map(|v| v.trim().parse::<f64>().unwrap() as i64)
            .expect("etcd_debugging_mvcc_watcher_total in /metrics")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped etcd is continued first, so nothing is left half-stopped.
            // SAFETY: as in `signal`.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
        self.kill();
    }
}

/// Put `key` = `value` (no lease) in one transaction; the revision.
#[cfg(feature = "etcd")]
pub async fn put(store: &dyn netpol::fleet::Store, key: &str, value: &str) -> i64 {
    store
        .txn(netpol::fleet::store::Txn {
            success: vec![netpol::fleet::store::Op::Put {
                key: key.into(),
                value: value.as_bytes().to_vec(),
                lease: 0,
            }],
            ..netpol::fleet::store::Txn::default()
        })
        .await
        .unwrap()
        .header
        .revision
}

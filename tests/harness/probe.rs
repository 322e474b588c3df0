//! TCP from inside network namespaces: listeners that hold a port open (and,
//! if asked, accept and close), and connection probes, one or many at once.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::netns::{enter, in_ns};

/// TCP listeners on `[::]:port` (dual stack: the kernel's default
/// bindv6only=0) in a namespace. The kernel completes handshakes into the
/// backlog, so a SYN that reaches the stack is answered with a SYN-ACK;
/// [`Listeners::accepting`] also accepts and closes, so no backlog fills.
/// Dropping the value closes them.
pub struct Listeners {
    listeners: Arc<Vec<TcpListener>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listeners {
    pub fn start(ns: &str, ports: &[u16]) -> Listeners {
        let listeners = in_ns(ns, || {
            ports
                .iter()
                .map(|p| {
                    TcpListener::bind(SocketAddr::new("::".parse().unwrap(), *p))
                        .unwrap_or_else(|e| panic!("{ns}: listen on {p}: {e}"))
                })
                .collect()
        });
        Listeners {
            listeners: Arc::new(listeners),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        }
    }

    pub fn accepting(ns: &str, ports: &[u16]) -> Listeners {
        let mut l = Listeners::start(ns, ports);
        let (listeners, stop) = (l.listeners.clone(), l.stop.clone());
        l.thread = Some(std::thread::spawn(move || {
            for s in listeners.iter() {
                s.set_nonblocking(true).unwrap();
            }
            while !stop.load(Ordering::Relaxed) {
                let mut fds: Vec<libc::pollfd> = listeners
                    .iter()
                    .map(|s| libc::pollfd {
                        fd: s.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: a valid array of pollfds and its length.
                if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) } <= 0 {
                    continue;
                }
                for s in listeners.iter() {
                    while let Ok((c, _)) = s.accept() {
                        drop(c);
                    }
                }
            }
        }));
        l
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Connected,
    TimedOut,
    /// Refused or another error: the SYN got through but nothing listens, or the
    /// network is broken.
    Error,
}

/// One TCP connect to `dst` from the calling thread's namespace.
pub fn connect_here(dst: SocketAddr, timeout: Duration) -> Probe {
    match TcpStream::connect_timeout(&dst, timeout) {
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

/// One TCP connect from inside `ns` to `dst:port`.
pub fn connect(ns: &str, dst: IpAddr, port: u16, timeout: Duration) -> Probe {
    in_ns(ns, || connect_here(SocketAddr::new(dst, port), timeout))
}

/// A TCP connection from namespace `ns` that completes within `timeout`.
pub fn connects(ns: &str, dst: IpAddr, port: u16, timeout: Duration) -> bool {
    connect(ns, dst, port, timeout) == Probe::Connected
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
                    s.spawn(move || {
                        enter(ns);
                        connect_here(SocketAddr::new(*dst, *port), timeout)
                    })
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

/// Probe `jobs` (300 ms each; an expected connect that timed out once more for
/// 1.5 s) and return the probes whose answer is not `want` (a connect where a
/// drop was expected, a timeout where a connect was, any error), as lines
/// naming `what` each was.
pub fn mismatches(
    jobs: &[(String, IpAddr, u16)],
    want: &[bool],
    what: &[String],
    threads: usize,
) -> Vec<String> {
    let got = probe_checked(
        jobs,
        want,
        Duration::from_millis(300),
        Duration::from_millis(1500),
        threads,
    );
    (0..jobs.len())
        .filter(|&i| {
            !matches!(
                (got[i], want[i]),
                (Probe::Connected, true) | (Probe::TimedOut, false)
            )
        })
        .map(|i| {
            format!(
                "  {}: expected {}, got {:?}",
                what[i],
                if want[i] { "connect" } else { "drop" },
                got[i]
            )
        })
        .collect()
}

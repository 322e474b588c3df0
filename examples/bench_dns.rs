//! The DNS proxy's share of bench/bench.py's "dns" section: the proxy
//! (`netpol::dns::proxy`, UDP) in front of a real DNS server, and the load
//! generators that query it or the server directly.
//!
//! ```text
//! bench_dns proxy LISTEN UPSTREAM         # serve until stdin closes; prints "ready"
//! bench_dns latency SERVER COUNT          # one query at a time; JSON p50/p99 in µs
//! bench_dns load SERVER SECS WINDOW       # WINDOW queries in flight; JSON queries/s
//! ```
//!
//! The proxy is the forwarding loop netpold runs: parse the query, decide it
//! by the endpoint's DNS rules (`matchName: n0.bench.test.` and
//! `matchPattern: "*.bench.test."`), forward it to UPSTREAM (standing for the
//! address the workload asked), check the answer against the query, learn its
//! addresses into a `LearnedSet` (caps, TTL minimum) before releasing it. Not
//! in it: netpold's recompile and apply after a learn, the socket-assign
//! redirect and the save of the learned set file. It runs on a current-thread
//! tokio runtime: one core, as the bench pins it. Queries cycle over
//! `n0..n15.bench.test.`, which the bench's dnsmasq answers from a hosts file.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use netpol::api::model::FqdnSelector;
use netpol::dns::learned::{LearnedConfig, LearnedSet};
use netpol::dns::message::{self, Answer, Query};
use netpol::dns::proxy::{Endpoints, Learning, Proxy};

const NAMES: usize = 16;

fn name(i: usize) -> String {
    format!("n{}.bench.test.", i % NAMES)
}

struct Bench {
    upstream: SocketAddr,
    rules: Vec<FqdnSelector>,
    learned: Mutex<LearnedSet>,
}

impl Endpoints for Bench {
    fn dns_rules(&self, _client: IpAddr) -> Option<Vec<FqdnSelector>> {
        Some(self.rules.clone())
    }
    fn destination(&self, _client: SocketAddr, _local: SocketAddr) -> SocketAddr {
        self.upstream
    }
    fn learn(&self, client: IpAddr, answer: &Answer) -> Learning {
        let r = self.learn_now(client, answer);
        Box::pin(async move { r })
    }
}

impl Bench {
    fn learn_now(&self, _client: IpAddr, answer: &Answer) -> Result<(), String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let sels: Vec<FqdnSelector> = self
            .rules
            .iter()
            .filter(|s| netpol::dns::matcher::matches(s, &answer.name))
            .cloned()
            .collect();
        let mut set = self.learned.lock().map_err(|e| e.to_string())?;
        set.expire(now);
        set.learn("bench/client", &answer.name, &sels, &answer.addrs, now)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn proxy(listen: SocketAddr, upstream: SocketAddr) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let ep = Arc::new(Bench {
            upstream,
            rules: vec![
                FqdnSelector::Name("n0.bench.test.".into()),
                FqdnSelector::Pattern("*.bench.test.".into()),
            ],
            learned: Mutex::new(LearnedSet::new(LearnedConfig::default())),
        });
        let p = Arc::new(Proxy::new(ep, Duration::from_secs(2)));
        let sock = tokio::net::UdpSocket::bind(listen).await.expect("bind");
        println!("ready");
        // Stop when stdin closes (the bench holds it open).
        let stop = async {
            let _ = tokio::task::spawn_blocking(|| {
                let mut s = String::new();
                while std::io::stdin().read_line(&mut s).map(|n| n > 0).unwrap_or(false) {}
            })
            .await;
        };
        let stats = p.stats.clone();
        p.serve_udp(sock, stop).await.expect("serve");
        eprintln!(
            "proxy: {} queries, {} answered, {} refused, {} upstream failures, {} learn failures, {} dropped",
            stats.queries.load(std::sync::atomic::Ordering::Relaxed),
            stats.answered.load(std::sync::atomic::Ordering::Relaxed),
            stats.refused.load(std::sync::atomic::Ordering::Relaxed),
            stats.upstream_failed.load(std::sync::atomic::Ordering::Relaxed),
            stats.learn_failed.load(std::sync::atomic::Ordering::Relaxed),
            stats.drops.total(),
        );
    });
}

/// One query's bytes and its parsed form (to check the answer).
fn query(id: u16, i: usize) -> (Vec<u8>, Query) {
    let bytes = message::build_query(id, &name(i), RecordType::A).expect("query");
    let q = message::parse_query(&bytes).expect("own query parses");
    (bytes, q)
}

fn ok_answer(buf: &[u8], q: &Query) -> bool {
    matches!(message::parse_answer(buf, q), Ok(a) if a.rcode == ResponseCode::NoError && !a.addrs.is_empty())
}

fn latency(server: SocketAddr, count: usize) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.connect(server).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 4096];
    let mut us: Vec<f64> = Vec::with_capacity(count);
    let mut errors = 0usize;
    for i in 0..count {
        let (bytes, q) = query(i as u16, i);
        let t0 = Instant::now();
        sock.send(&bytes).expect("send");
        let good = loop {
            match sock.recv(&mut buf) {
                // A late answer to an earlier query: not this one's.
                Ok(n) if n >= 2 && buf[..2] != bytes[..2] => continue,
                Ok(n) => break ok_answer(&buf[..n], &q),
                Err(_) => break false,
            }
        };
        if good {
            us.push(t0.elapsed().as_secs_f64() * 1e6);
        } else {
            errors += 1;
        }
    }
    us.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        us.get(((us.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
    };
    println!(
        "{}",
        serde_json::json!({"n": us.len(), "errors": errors, "p50_us": pct(0.5), "p99_us": pct(0.99)})
    );
}

fn load(server: SocketAddr, secs: f64, window: usize) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.connect(server).expect("connect");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut next = 0usize;
    let mut outstanding = 0usize;
    let (mut answered, mut lost, mut bad) = (0u64, 0u64, 0u64);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut queries: std::collections::HashMap<u16, Query> = Default::default();
    while Instant::now() < end {
        while outstanding < window {
            let id = (next % 65536) as u16;
            let (bytes, q) = query(id, next);
            next += 1;
            sock.send(&bytes).expect("send");
            queries.insert(id, q);
            outstanding += 1;
        }
        match sock.recv(&mut buf) {
            Ok(n) if n >= 2 => {
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                if let Some(q) = queries.remove(&id) {
                    outstanding -= 1;
                    if ok_answer(&buf[..n], &q) {
                        answered += 1;
                    } else {
                        bad += 1;
                    }
                }
            }
            Ok(_) => {}
            // Nothing for 200 ms: what is in flight is lost.
            Err(_) => {
                lost += outstanding as u64;
                outstanding = 0;
                queries.clear();
            }
        }
    }
    let el = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"answered": answered, "lost": lost, "bad": bad, "secs": el, "qps": answered as f64 / el})
    );
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let addr = |i: usize| -> SocketAddr { a[i].parse().expect("address:port") };
    match a.get(1).map(String::as_str) {
        Some("proxy") if a.len() == 4 => proxy(addr(2), addr(3)),
        Some("latency") if a.len() == 4 => latency(addr(2), a[3].parse().expect("count")),
        Some("load") if a.len() == 5 => load(
            addr(2),
            a[3].parse().expect("seconds"),
            a[4].parse().expect("window"),
        ),
        _ => {
            eprintln!("usage: bench_dns proxy LISTEN UPSTREAM | latency SERVER COUNT | load SERVER SECS WINDOW");
            std::process::exit(2);
        }
    }
}

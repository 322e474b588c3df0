//! The fleet benchmark's etcd load tool (bench/bench.py runs it; release build).
//! One process, plain http, only the etcd endpoint it is given (an etcd the
//! benchmark started in a namespace of its own). Each mode prints one JSON line.
//!
//! ```text
//! fleet_load floor  --endpoint URL --prefix P [--n 300]
//!     one watch on P, then N puts one after another: put → watch event latency
//!     (the floor under netpol's propagation, measured beside it).
//! fleet_load fanout --endpoint URL --prefix P --watchers W --rate R --secs S
//!                   [--value-bytes 450] [--etcd-pid PID]
//!     W clients (one connection and one watch each) on P, one writer putting R
//!     values/s for S s, each value carrying its send time: watch lag p50/p99/max,
//!     events delivered, and etcd's CPU time over the writing window
//!     (/proc/PID/stat) per delivered event.
//! fleet_load churn  --endpoint URL --prefix P --rate R [--secs S]
//!     R registry writes/s (static endpoints of a host without netpold, labels
//!     cycling among five) until S s or SIGTERM.
//! fleet_load fill   --endpoint URL --prefix P --n N
//!     N static endpoints (txns of 100 puts): the revision of the last.
//! fleet_load put    --endpoint URL --key K --value V
//!     one put: its revision.
//! fleet_load watch  --endpoint URL --prefix P
//!     one watch on P until SIGTERM: a line `<unix ns> <key>` per put as it
//!     arrives (the bench's split of a propagation into the publishing node's
//!     part, up to etcd, and the receiving node's), then the JSON line.
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use etcd_client::{Client, GetOptions, Txn, TxnOp, WatchOptions};
use serde_json::json;
use tokio::sync::Mutex;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Floor {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        prefix: String,
        #[arg(long, default_value_t = 300)]
        n: usize,
    },
    Fanout {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        watchers: usize,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 450)]
        value_bytes: usize,
        #[arg(long)]
        etcd_pid: Option<u32>,
    },
    Churn {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 3600.0)]
        secs: f64,
    },
    Fill {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        n: usize,
    },
    Put {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        key: String,
        #[arg(long)]
        value: String,
    },
    Watch {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        prefix: String,
    },
}

fn pct(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

/// utime + stime of a process, in seconds.
fn cpu_s(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th fields of the line.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux
    Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / tick)
}

async fn connect(endpoint: &str) -> Client {
    Client::connect([endpoint], None)
        .await
        .unwrap_or_else(|e| panic!("connect {endpoint}: {e}"))
}

/// A static endpoint document (a host without netpold).
fn static_endpoint(name: &str, app: &str, addr: &str) -> String {
    json!({
        "apiVersion": "netpol/v1", "kind": "Endpoint",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"node": "bench-appliance", "addresses": [addr]},
    })
    .to_string()
}

async fn floor(endpoint: &str, prefix: &str, n: usize) -> serde_json::Value {
    let mut w = connect(endpoint).await;
    let mut c = connect(endpoint).await;
    let key = format!("{prefix}floor");
    let mut stream = w
        .watch(key.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    // The `created` answer.
    stream.message().await.expect("watch created");
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        c.put(key.as_str(), format!("v{i}"), None)
            .await
            .expect("put");
        loop {
            let m = stream.message().await.expect("watch").expect("stream open");
            if !m.events().is_empty() {
                break;
            }
        }
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    json!({"n": n, "p50_ms": pct(&mut lat, 0.5), "p99_ms": pct(&mut lat, 0.99),
           "max_ms": pct(&mut lat, 1.0)})
}

async fn fanout(
    endpoint: &str,
    prefix: &str,
    watchers: usize,
    rate: f64,
    secs: f64,
    value_bytes: usize,
    etcd_pid: Option<u32>,
) -> serde_json::Value {
    let start = Instant::now();
    let key_prefix = format!("{prefix}fanout/");
    let delivered = Arc::new(AtomicU64::new(0));
    let lags: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let mut c = connect(endpoint).await;
        let mut stream = c
            .watch(key_prefix.as_str(), Some(WatchOptions::new().with_prefix()))
            .await
            .expect("watch");
        stream.message().await.expect("watch created");
        let (delivered, lags) = (delivered.clone(), lags.clone());
        tasks.push(tokio::spawn(async move {
            let _keep = c;
            let mut mine = Vec::new();
            while let Ok(Some(m)) = stream.message().await {
                let now = start.elapsed().as_nanos() as u64;
                for e in m.events() {
                    let Some(kv) = e.kv() else { continue };
                    let v = kv.value_str().unwrap_or("");
                    if v == "stop" {
                        lags.lock().await.extend(mine);
                        return;
                    }
                    if let Some(sent) = v.split(' ').next().and_then(|t| t.parse::<u64>().ok()) {
                        mine.push(now.saturating_sub(sent) as f64 / 1e6);
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lags.lock().await.extend(mine);
        }));
    }
    let mut c = connect(endpoint).await;
    let n = (rate * secs).round() as u64;
    let pad = "x".repeat(value_bytes.saturating_sub(24));
    let cpu0 = etcd_pid.and_then(cpu_s);
    let t0 = Instant::now();
    let every = Duration::from_secs_f64(1.0 / rate);
    for i in 0..n {
        let at = t0 + every * i as u32;
        tokio::time::sleep_until(at.into()).await;
        let v = format!("{} {pad}", start.elapsed().as_nanos() as u64);
        c.put(format!("{key_prefix}k{}", i % 100), v, None)
            .await
            .expect("put");
    }
    // Until every watcher has every event (or 10 s more).
    let want = n * watchers as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while delivered.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = etcd_pid.and_then(cpu_s);
    c.put(format!("{key_prefix}stop"), "stop", None)
        .await
        .expect("put stop");
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let got = delivered.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *lags.lock().await);
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    json!({
        "watchers": watchers, "rate": rate, "secs": secs, "puts": n,
        "expected_events": want, "delivered_events": got, "wall_s": wall,
        "lag_p50_ms": pct(&mut lat, 0.5), "lag_p99_ms": pct(&mut lat, 0.99),
        "lag_max_ms": pct(&mut lat, 1.0),
        "etcd_cpu_s": cpu,
        "etcd_cpu_share": cpu.map(|c| c / wall),
        "etcd_cpu_us_per_event": cpu.filter(|_| got > 0).map(|c| c * 1e6 / got as f64),
        "value_bytes": value_bytes,
    })
}

async fn churn(endpoint: &str, prefix: &str, rate: f64, secs: f64) -> serde_json::Value {
    let mut c = connect(endpoint).await;
    let every = Duration::from_secs_f64(1.0 / rate);
    let t0 = Instant::now();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let mut n: u64 = 0;
    let mut errors = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        let at = t0 + every * n as u32;
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = term.recv() => break,
        }
        // Twenty keys in turn, each write a real change: the key's label
        // moves on by one of five at every round, so no write repeats the
        // value it replaces (an identical put would be a new revision but no
        // new registry, and churn that cheap would flatter the figure).
        let i = n % 20;
        let name = format!("churn-{i}");
        let v = static_endpoint(
            &name,
            &format!("churn-{}", (i + n / 20) % 5),
            &format!("10.204.120.{}", i + 1),
        );
        let key = format!("{prefix}registry/static/endpoints/default/{name}");
        if c.put(key, v, None).await.is_err() {
            errors += 1;
        }
        n += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    json!({"writes": n, "secs": secs, "rate": n as f64 / secs, "errors": errors})
}

async fn fill(endpoint: &str, prefix: &str, n: usize) -> serde_json::Value {
    let mut c = connect(endpoint).await;
    let t0 = Instant::now();
    let mut rev = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|i| {
                let name = format!("fill-{i}");
                let addr = format!("100.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256);
                TxnOp::put(
                    format!("{prefix}registry/static/endpoints/default/{name}"),
                    static_endpoint(&name, &format!("fill-{}", i / 10), &addr),
                    None,
                )
            })
            .collect();
        let r = c.txn(Txn::new().and_then(ops)).await.expect("txn");
        rev = r.header().map_or(0, |h| h.revision());
    }
    let count = c
        .get(
            format!("{prefix}registry/static/"),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("count")
        .count();
    json!({"n": n, "revision": rev, "static_keys": count, "secs": t0.elapsed().as_secs_f64()})
}

async fn watch(endpoint: &str, prefix: &str) -> serde_json::Value {
    use std::io::Write;
    let mut c = connect(endpoint).await;
    let mut stream = c
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    stream.message().await.expect("watch created");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let mut out = std::io::stdout().lock();
    let mut puts = 0u64;
    loop {
        let m = tokio::select! {
            m = stream.message() => m,
            _ = term.recv() => break,
        };
        let Ok(Some(m)) = m else { break };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for e in m.events() {
            if !matches!(e.event_type(), etcd_client::EventType::Put) {
                continue;
            }
            if let Some(kv) = e.kv() {
                puts += 1;
                let _ = writeln!(out, "{now} {}", kv.key_str().unwrap_or(""));
            }
        }
        let _ = out.flush();
    }
    json!({"puts": puts})
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let out = rt.block_on(async {
        match args.mode {
            Mode::Floor {
                endpoint,
                prefix,
                n,
            } => floor(&endpoint, &prefix, n).await,
            Mode::Fanout {
                endpoint,
                prefix,
                watchers,
                rate,
                secs,
                value_bytes,
                etcd_pid,
            } => {
                fanout(
                    &endpoint,
                    &prefix,
                    watchers,
                    rate,
                    secs,
                    value_bytes,
                    etcd_pid,
                )
                .await
            }
            Mode::Churn {
                endpoint,
                prefix,
                rate,
                secs,
            } => churn(&endpoint, &prefix, rate, secs).await,
            Mode::Fill {
                endpoint,
                prefix,
                n,
            } => fill(&endpoint, &prefix, n).await,
            Mode::Put {
                endpoint,
                key,
                value,
            } => {
                let mut c = connect(&endpoint).await;
                let r = c.put(key, value, None).await.expect("put");
                json!({"revision": r.header().map_or(0, |h| h.revision())})
            }
            Mode::Watch { endpoint, prefix } => watch(&endpoint, &prefix).await,
        }
    });
    println!("{out}");
}

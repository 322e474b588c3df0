//! The DNS proxy's forwarding loop (`netpol::dns::proxy`) on loopback, against
//! a real DNS server: dnsmasq (Debian's dnsmasq-base, installed by
//! scripts/deps.sh), started by the test on 127.0.0.x with a free port and a
//! hosts file of several names with short TTLs, killed when the test ends
//! (also on failure). Unprivileged. Under CI a missing dnsmasq fails. And the
//! daemon's refusal of the FQDN policies it cannot enforce yet.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use netpol::api::model::FqdnSelector;
use netpol::dns::learned::{LearnedConfig, LearnedSet};
use netpol::dns::matcher;
use netpol::dns::message::{self, Answer, DropReason};
use netpol::dns::proxy::{Endpoints, Learning, Proxy, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::harness::require::Needs;

/// The workload's address (loopback: the proxy sees queries from it).
const CLIENT: &str = "127.0.0.1";
const HOSTS: &str = "192.0.2.10 api.example.com\n192.0.2.11 www.example.com\n2001:db8::12 www.example.com\n198.51.100.7 evil.example.net\n";

fn dnsmasq_path() -> Option<PathBuf> {
    crate::harness::require::first_existing(&["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"])
}

/// A dnsmasq on `addr`, killed on drop.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on `ip` for both UDP and TCP (as far as binding both tells).
fn free_port(ip: IpAddr) -> u16 {
    loop {
        let u = std::net::UdpSocket::bind((ip, 0)).unwrap();
        let port = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

fn start_dnsmasq(bin: &PathBuf) -> Dnsmasq {
    let dir = tempfile::tempdir().unwrap();
    // dnsmasq may drop to `nobody` before reading the hosts file.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, HOSTS).unwrap();
    std::fs::set_permissions(&hosts, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ip: IpAddr = "127.0.83.1".parse().unwrap();
    let port = free_port(ip);
    let child = Command::new(bin)
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--log-facility=-",
            "--pid-file=",
            "--local-ttl=2",
            &format!("--listen-address={ip}"),
            &format!("--port={port}"),
            &format!("--addn-hosts={}", hosts.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq starts");
    let d = Dnsmasq {
        child,
        addr: SocketAddr::new(ip, port),
        _dir: dir,
    };
    // Ready when it answers.
    let q = message::build_query(1, "api.example.com.", RecordType::A).unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    loop {
        let _ = sock.send_to(&q, d.addr);
        if sock.recv_from(&mut buf).is_ok() {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "dnsmasq did not answer on {}",
            d.addr
        );
    }
}

/// The endpoint of the test: DNS rules, the server it asks, a learned set
/// behind the learn callback, which records when it learned.
struct Workload {
    rules: Vec<FqdnSelector>,
    fqdns: Vec<FqdnSelector>,
    upstream: SocketAddr,
    learned: Mutex<LearnedSet>,
    learned_at: Mutex<Vec<(String, Instant)>>,
    fail_learn: bool,
}

impl Endpoints for Workload {
    fn dns_rules(&self, client: IpAddr) -> Option<Vec<FqdnSelector>> {
        (client == CLIENT.parse::<IpAddr>().unwrap()).then(|| self.rules.clone())
    }
    fn destination(&self, _client: SocketAddr, _local: SocketAddr) -> SocketAddr {
        self.upstream
    }
    fn learn(&self, client: IpAddr, answer: &Answer) -> Learning {
        let r = self.learn_now(client, answer);
        Box::pin(async move { r })
    }
}

impl Workload {
    fn learn_now(&self, client: IpAddr, answer: &Answer) -> Result<(), String> {
        if self.fail_learn {
            return Err("cap reached".into());
        }
        // Slow on purpose: the answer must still wait for it.
        std::thread::sleep(Duration::from_millis(30));
        let selectors: Vec<FqdnSelector> = self
            .fqdns
            .iter()
            .filter(|s| matcher::matches(s, &answer.name))
            .cloned()
            .collect();
        self.learned
            .lock()
            .unwrap()
            .learn(
                &client.to_string(),
                &answer.name,
                &selectors,
                &answer.addrs,
                1000,
            )
            .map_err(|e| e.to_string())?;
        self.learned_at
            .lock()
            .unwrap()
            .push((answer.name.clone(), Instant::now()));
        Ok(())
    }
}

fn workload(upstream: SocketAddr, fail_learn: bool) -> Arc<Workload> {
    Arc::new(Workload {
        rules: vec![
            FqdnSelector::Name("api.example.com.".into()),
            FqdnSelector::Pattern("*.example.com.".into()),
        ],
        fqdns: vec![FqdnSelector::Name("api.example.com.".into())],
        upstream,
        learned: Mutex::new(LearnedSet::new(LearnedConfig::default())),
        learned_at: Mutex::default(),
        fail_learn,
    })
}

/// The proxy on 127.0.0.1, UDP and TCP on one port; stops when dropped.
struct Running {
    addr: SocketAddr,
    stats: Arc<Stats>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_proxy(w: Arc<Workload>) -> Running {
    let ip: IpAddr = CLIENT.parse().unwrap();
    let port = free_port(ip);
    let udp = UdpSocket::bind((ip, port)).await.unwrap();
    let tcp = TcpListener::bind((ip, port)).await.unwrap();
    let proxy = Arc::new(Proxy::new(w, Duration::from_secs(2)));
    let stats = proxy.stats.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = rx.await;
    };
    let (stop_udp, stop_tcp) = {
        let shared = futures::future::FutureExt::shared(stop);
        (shared.clone(), shared)
    };
    tokio::spawn(proxy.clone().serve_udp(udp, stop_udp));
    tokio::spawn(proxy.serve_tcp(tcp, stop_tcp));
    Running {
        addr: SocketAddr::new(ip, port),
        stats,
        _stop: tx,
    }
}

async fn ask_udp(proxy: SocketAddr, id: u16, name: &str, qtype: RecordType) -> (Message, Instant) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&message::build_query(id, name, qtype).unwrap(), proxy)
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("the proxy answers")
        .unwrap();
    (Message::from_vec(&buf[..n]).unwrap(), Instant::now())
}

async fn ask_tcp(proxy: SocketAddr, id: u16, name: &str) -> Message {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let q = message::build_query(id, name, RecordType::A).unwrap();
    s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    s.write_all(&q).await.unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn needs_dnsmasq(test: &str) -> Option<(crate::harness::require::Turn, PathBuf)> {
    let turn = Needs::nothing()
        .unless(|| {
            dnsmasq_path()
                .is_none()
                .then(|| "missing dnsmasq (scripts/deps.sh installs dnsmasq-base)".to_string())
        })
        .check(test)?;
    Some((turn, dnsmasq_path()?))
}

#[tokio::test]
async fn proxy_forwards_allowed_learns_before_release_and_refuses_the_rest() {
    let Some((_turn, bin)) =
        needs_dnsmasq("proxy_forwards_allowed_learns_before_release_and_refuses_the_rest")
    else {
        return;
    };
    let server = start_dnsmasq(&bin);
    let w = workload(server.addr, false);
    let p = start_proxy(w.clone()).await;

    // Allowed, over UDP: dnsmasq's answer, learned before it was released.
    let (m, received) = ask_udp(p.addr, 41, "API.example.com", RecordType::A).await;
    assert_eq!((m.id(), m.response_code()), (41, ResponseCode::NoError));
    assert_eq!(addrs(&m), vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
    let at = w.learned_at.lock().unwrap().clone();
    assert_eq!(at.len(), 1);
    assert_eq!(at[0].0, "api.example.com.");
    assert!(at[0].1 <= received, "learned after the answer was released");
    {
        let set = w.learned.lock().unwrap();
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        // dnsmasq's TTL (2 s) is raised to the minimum (5 s); the name
        // matches the endpoint's toFQDNs selector.
        assert_eq!(
            set.selectors_for(CLIENT, ip, 1004),
            [FqdnSelector::Name("api.example.com.".into())].into()
        );
        assert!(set.selectors_for(CLIENT, ip, 1005).is_empty());
    }

    // Allowed by the pattern, IPv6 too, over TCP and over UDP.
    let m = ask_tcp(p.addr, 42, "www.example.com.").await;
    assert_eq!(addrs(&m), vec!["192.0.2.11".parse::<IpAddr>().unwrap()]);
    let (m, _) = ask_udp(p.addr, 43, "www.example.com.", RecordType::AAAA).await;
    assert_eq!(addrs(&m), vec!["2001:db8::12".parse::<IpAddr>().unwrap()]);

    // Not allowed: REFUSED, never forwarded, nothing learned.
    let (m, _) = ask_udp(p.addr, 44, "evil.example.net.", RecordType::A).await;
    assert_eq!((m.id(), m.response_code()), (44, ResponseCode::Refused));
    assert!(m.answers().is_empty());
    let m = ask_tcp(p.addr, 45, "example.com.").await;
    assert_eq!(m.response_code(), ResponseCode::Refused);

    assert_eq!(Stats::get(&p.stats.refused), 2);
    assert_eq!(Stats::get(&p.stats.forwarded), 3);
    assert_eq!(Stats::get(&p.stats.answered), 3);
    assert_eq!(w.learned.lock().unwrap().len(), 3);
    assert_eq!(p.stats.drops.total(), 0);
    drop(server);
}

#[tokio::test]
async fn an_answer_that_cannot_be_learned_is_servfail() {
    let Some((_turn, bin)) = needs_dnsmasq("an_answer_that_cannot_be_learned_is_servfail") else {
        return;
    };
    let server = start_dnsmasq(&bin);
    let p = start_proxy(workload(server.addr, true)).await;
    let (m, _) = ask_udp(p.addr, 9, "api.example.com.", RecordType::A).await;
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert!(m.answers().is_empty());
    assert_eq!(Stats::get(&p.stats.learn_failed), 1);
}

/// A hostile upstream (a socket of the test): a forged answer with another ID
/// and garbage arrive first; the proxy drops and counts them and releases
/// the real answer that follows.
#[tokio::test]
async fn forged_and_malformed_answers_are_dropped_and_counted() {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let p = start_proxy(workload(upstream.local_addr().unwrap(), false)).await;
    let server = tokio::spawn(async move {
        let mut buf = vec![0u8; 512];
        let (n, from) = upstream.recv_from(&mut buf).await.unwrap();
        let q = message::parse_query(&buf[..n]).unwrap();
        let answer = |id: u16| {
            let mut m = Message::from_vec(&buf[..n]).unwrap();
            m.set_id(id)
                .set_message_type(hickory_proto::op::MessageType::Response);
            m.add_answer(hickory_proto::rr::Record::from_rdata(
                hickory_proto::rr::Name::from_ascii("api.example.com.").unwrap(),
                30,
                RData::A(hickory_proto::rr::rdata::A::new(192, 0, 2, 10)),
            ));
            m.to_vec().unwrap()
        };
        upstream
            .send_to(&answer(q.id ^ 0x5555), from)
            .await
            .unwrap();
        upstream.send_to(&[0xde, 0xad], from).await.unwrap();
        let mut garbage = answer(q.id);
        garbage.truncate(garbage.len() - 3);
        upstream.send_to(&garbage, from).await.unwrap();
        upstream.send_to(&answer(q.id), from).await.unwrap();
    });
    let (m, _) = ask_udp(p.addr, 77, "api.example.com.", RecordType::A).await;
    server.await.unwrap();
    assert_eq!((m.id(), m.response_code()), (77, ResponseCode::NoError));
    assert_eq!(addrs(&m), vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(p.stats.drops.get(DropReason::IdMismatch), 1);
    assert_eq!(p.stats.drops.get(DropReason::BadLength), 1);
    assert_eq!(p.stats.drops.get(DropReason::Malformed), 1);
}

/// The daemon (its real loop, the in-memory datapath) takes a valid FQDN
/// policy as `netpolctl check` does: both of its policies in force, no
/// problem reported.
#[tokio::test]
async fn daemon_enforces_a_valid_fqdn_policy() {
    let root = crate::harness::cmd::repo().join("etc/examples/seed");
    let tmp = tempfile::tempdir().unwrap();
    let (pol, eps) = (tmp.path().join("pol"), tmp.path().join("ep"));
    for (from, to) in [
        (root.join("netpol.d"), &pol),
        (root.join("endpoints.d"), &eps),
    ] {
        std::fs::create_dir_all(to).unwrap();
        for f in std::fs::read_dir(from).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
    let config = crate::harness::daemon::in_process_config(tmp.path(), &pol, &eps);
    let socket = config.runtime_dir.join("netpold.sock");
    let links = crate::harness::daemon::seed_links();
    let (_links_tx, fake) = netpol::daemon::netlink::fake_links(links);
    let (_reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    let opts = netpol::daemon::Options::new(
        netpol::logging::discard(),
        netpol::daemon::sdnotify::Notifier::recorder().0,
        reload_rx,
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(netpol::daemon::run_with(
        config,
        netpol::datapath::fake::FakeDatapath::new(),
        fake,
        opts,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let status = |want: &'static str,
                  f: Box<dyn Fn(&netpol::daemon::status::Status) -> bool + Send>| {
        let socket = socket.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let s = socket.clone();
                if let Ok(Ok((st, _))) = tokio::task::spawn_blocking(move || {
                    netpol::cli::daemonctl::query::<netpol::daemon::status::Status>(&s, "status")
                })
                .await
                {
                    if f(&st) {
                        return st;
                    }
                }
                assert!(Instant::now() < deadline, "timed out waiting for {want}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let first = status(
        "the first apply",
        Box::new(|s| s.ready && s.generation == 1 && !s.degraded),
    )
    .await;
    let fixture = crate::harness::cmd::fixtures("parse").join("valid/policies/fqdn.yaml");
    std::fs::copy(&fixture, pol.join("fqdn.yaml")).unwrap();
    let before = first.policies;
    let st = status(
        "the FQDN policies in force",
        Box::new(move |s| s.policies == before + 2),
    )
    .await;
    assert!(!st.degraded && st.errors.is_empty(), "{st:#?}");
    let _ = stop_tx.send(());
    daemon.await.unwrap().unwrap();
}

//! The forwarding loop of the DNS proxy, over UDP and TCP (tokio).
//!
//! A workload's query is parsed and decided by its endpoint's DNS rules
//! ([`Endpoints::dns_rules`]); a name no rule allows is answered REFUSED and
//! never forwarded. An allowed query goes to the address the workload asked
//! ([`Endpoints::destination`]); the answer is checked against the query (an
//! answer with another ID or question is dropped, counted, and the proxy
//! keeps waiting for the real one until its timeout), and its addresses are
//! handed to [`Endpoints::learn`] **before** the answer is released, so the
//! connection that follows the lookup finds them learned. A failed learn (a
//! cap reached) or a silent upstream gets SERVFAIL: the proxy never releases
//! an answer it did not learn.
//!
//! Not in this version: the datapath redirect (socket assignment) that would
//! steer an endpoint's DNS traffic here and make the socket's local address
//! the workload's original destination; until then `destination` says where
//! a query goes.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::message::{self, Answer, DropCounts, Query, Verdict, MAX_MESSAGE};
use crate::api::model::FqdnSelector;

/// What the proxy asks of the daemon about the endpoint behind a query.
pub trait Endpoints: Send + Sync + 'static {
    /// The DNS rules of the endpoint with this source address; `None` when the
    /// address is no endpoint with DNS rules (its queries are REFUSED).
    fn dns_rules(&self, client: IpAddr) -> Option<Vec<FqdnSelector>>;
    /// Where the workload sent the query (`local`: the proxy socket's address).
    fn destination(&self, client: SocketAddr, local: SocketAddr) -> SocketAddr;
    /// Learn an allowed answer's addresses before it is released; an error
    /// (a cap reached) makes the reply SERVFAIL.
    fn learn(&self, client: IpAddr, answer: &Answer) -> Result<(), String>;
}

/// Counters of the proxy.
#[derive(Debug, Default)]
pub struct Stats {
    pub queries: AtomicU64,
    pub forwarded: AtomicU64,
    pub refused: AtomicU64,
    /// Answers released to workloads.
    pub answered: AtomicU64,
    /// SERVFAIL sent: upstream silent or unreachable.
    pub upstream_failed: AtomicU64,
    /// SERVFAIL sent: the answer could not be learned.
    pub learn_failed: AtomicU64,
    /// Addresses handed to `learn`.
    pub learned_addrs: AtomicU64,
    /// Queries and answers dropped, by reason.
    pub drops: DropCounts,
}

impl Stats {
    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The proxy: one per daemon, shared by its UDP and TCP loops.
pub struct Proxy {
    endpoints: Arc<dyn Endpoints>,
    pub stats: Arc<Stats>,
    /// How long an upstream may take to answer.
    pub timeout: Duration,
}

#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

impl Proxy {
    pub fn new(endpoints: Arc<dyn Endpoints>, timeout: Duration) -> Proxy {
        Proxy {
            endpoints,
            stats: Arc::default(),
            timeout,
        }
    }

    /// The reply to one query from `client`, or `None` to stay silent (a
    /// malformed query).
    async fn handle(
        &self,
        bytes: &[u8],
        client: SocketAddr,
        local: SocketAddr,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        Stats::inc(&self.stats.queries);
        let query = match message::parse_query(bytes) {
            Ok(q) => q,
            Err(d) => {
                self.stats.drops.count(d);
                return None;
            }
        };
        let rules = self.endpoints.dns_rules(client.ip()).unwrap_or_default();
        if message::decide(&query, &rules) == Verdict::Refuse {
            Stats::inc(&self.stats.refused);
            return Some(message::refused(&query));
        }
        Stats::inc(&self.stats.forwarded);
        let dest = self.endpoints.destination(client, local);
        let upstream = match transport {
            Transport::Udp => self.forward_udp(bytes, &query, dest).await,
            Transport::Tcp => self.forward_tcp(bytes, &query, dest).await,
        };
        let Some((raw, answer)) = upstream else {
            Stats::inc(&self.stats.upstream_failed);
            return Some(message::reply(&query, ResponseCode::ServFail));
        };
        if !answer.addrs.is_empty() {
            if let Err(_why) = self.endpoints.learn(client.ip(), &answer) {
                Stats::inc(&self.stats.learn_failed);
                return Some(message::reply(&query, ResponseCode::ServFail));
            }
            self.stats
                .learned_addrs
                .fetch_add(answer.addrs.len() as u64, Ordering::Relaxed);
        }
        Stats::inc(&self.stats.answered);
        Some(raw)
    }

    /// Send over UDP and wait for the answer: datagrams from elsewhere, and
    /// answers that do not match the query, are dropped (counted) and the
    /// wait goes on until the timeout.
    async fn forward_udp(
        &self,
        bytes: &[u8],
        query: &Query,
        dest: SocketAddr,
    ) -> Option<(Vec<u8>, Answer)> {
        let bind: SocketAddr = match dest {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().ok()?,
            SocketAddr::V6(_) => "[::]:0".parse().ok()?,
        };
        let sock = UdpSocket::bind(bind).await.ok()?;
        sock.connect(dest).await.ok()?;
        sock.send(bytes).await.ok()?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let wait = async {
            loop {
                let n = sock.recv(&mut buf).await.ok()?;
                match message::parse_answer(&buf[..n], query) {
                    Ok(a) => return Some((buf[..n].to_vec(), a)),
                    Err(d) => self.stats.drops.count(d),
                }
            }
        };
        tokio::time::timeout(self.timeout, wait).await.ok()?
    }

    /// Send over TCP (two-byte length, then the message) and read one answer.
    async fn forward_tcp(
        &self,
        bytes: &[u8],
        query: &Query,
        dest: SocketAddr,
    ) -> Option<(Vec<u8>, Answer)> {
        let exchange = async {
            let mut s = TcpStream::connect(dest).await.ok()?;
            write_framed(&mut s, bytes).await.ok()?;
            let raw = read_framed(&mut s).await.ok()??;
            match message::parse_answer(&raw, query) {
                Ok(a) => Some((raw, a)),
                Err(d) => {
                    self.stats.drops.count(d);
                    None
                }
            }
        };
        tokio::time::timeout(self.timeout, exchange).await.ok()?
    }

    /// Serve queries on `sock` until `shutdown` completes.
    pub async fn serve_udp(
        self: Arc<Self>,
        sock: UdpSocket,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let sock = Arc::new(sock);
        let local = sock.local_addr()?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        tokio::pin!(shutdown);
        loop {
            let (n, client) = tokio::select! {
                r = sock.recv_from(&mut buf) => r?,
                () = &mut shutdown => return Ok(()),
            };
            let bytes = buf[..n].to_vec();
            let (me, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                if let Some(reply) = me.handle(&bytes, client, local, Transport::Udp).await {
                    let _ = sock.send_to(&reply, client).await;
                }
            });
        }
    }

    /// Serve TCP connections on `listener` until `shutdown` completes: each
    /// carries queries one after another, and is closed after
    /// [`TCP_IDLE`] without one.
    pub async fn serve_tcp(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let local = listener.local_addr()?;
        tokio::pin!(shutdown);
        loop {
            let (mut conn, client) = tokio::select! {
                r = listener.accept() => r?,
                () = &mut shutdown => return Ok(()),
            };
            let me = self.clone();
            tokio::spawn(async move {
                while let Ok(Ok(Some(q))) =
                    tokio::time::timeout(TCP_IDLE, read_framed(&mut conn)).await
                {
                    let Some(reply) = me.handle(&q, client, local, Transport::Tcp).await else {
                        return;
                    };
                    if write_framed(&mut conn, &reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
}

/// How long a TCP connection may wait for its next query.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

async fn write_framed(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await
}

/// One length-prefixed message; `None` at a clean end of the stream.
async fn read_framed(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

/// The proxy's handling of one message without a network, for the fuzz
/// target: parse it as a query, decide it against `rules`, build the
/// REFUSED reply, and parse the same bytes as an answer to the query.
pub fn handle_offline(bytes: &[u8], rules: &[FqdnSelector]) {
    if let Ok(q) = message::parse_query(bytes) {
        let _ = message::decide(&q, rules);
        let _ = message::refused(&q);
        let _ = message::parse_answer(bytes, &q);
    }
    if let Some(q) = message::build_query(
        u16::from_be_bytes([*bytes.first().unwrap_or(&0), *bytes.get(1).unwrap_or(&0)]),
        "www.example.com.",
        hickory_proto::rr::RecordType::A,
    )
    .and_then(|b| message::parse_query(&b).ok())
    {
        let _ = message::parse_answer(bytes, &q);
    }
}

//! The forwarding loop of the DNS proxy, over UDP and TCP (tokio).
//!
//! A workload's query is parsed and decided by its endpoint's DNS rules
//! ([`Endpoints::dns_rules`]); a name no rule allows is answered REFUSED and
//! never forwarded. An allowed query goes to the address the workload asked
//! ([`Endpoints::destination`]); the answer is checked against the query (an
//! answer with another ID or question is dropped, counted, and the proxy
//! keeps waiting for the real one until its timeout), and its addresses are
//! handed to [`Endpoints::learn`], whose future completes once they are
//! enforced, **before** the answer is released, so the connection that
//! follows the lookup finds them learned. A failed learn (a cap reached) or a
//! silent upstream gets SERVFAIL: the proxy never releases an answer it did
//! not learn.
//!
//! Transparent: the datapath hands a workload's DNS to the proxy's sockets by
//! socket assignment (bpf/lib/dnsredirect.h), so a packet reaches them with
//! its original destination. UDP reads it from `IP_RECVORIGDSTADDR` /
//! `IPV6_RECVORIGDSTADDR` and answers from that address and port (a socket
//! with `IP_TRANSPARENT` bound to it), so the workload's resolver sees the
//! server it asked answer; an accepted TCP connection's local address is the
//! original destination. Queries sent to the proxy's own address are answered
//! from it.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::event::{DnsEvent, DnsVerdict};
use super::message::{self, Answer, DropCounts, Query, Verdict, MAX_MESSAGE};
use crate::api::model::FqdnSelector;

/// What [`Endpoints::learn`] returns: done once the addresses are enforced.
pub type Learning = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// What the proxy asks of the daemon about the endpoint behind a query.
pub trait Endpoints: Send + Sync + 'static {
    /// The DNS rules of the endpoint with this source address; `None` when the
    /// address is no endpoint with DNS rules (its queries are REFUSED).
    fn dns_rules(&self, client: IpAddr) -> Option<Vec<FqdnSelector>>;
    /// Where to forward a query (`local`: its original destination, which is
    /// the proxy socket's own address when it was sent there directly).
    fn destination(&self, client: SocketAddr, local: SocketAddr) -> SocketAddr;
    /// Learn an allowed answer's addresses; the answer is released when the
    /// future completes. An error (a cap reached) makes the reply SERVFAIL.
    fn learn(&self, client: IpAddr, answer: &Answer) -> Learning;
    /// What the proxy decided about one query, for `netpolctl monitor`
    /// (`time`, `endpoint` and `selectors` are left for the daemon to fill).
    fn verdict(&self, _ev: DnsEvent) {}
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
    /// UDP replies that could not be sent from the original destination.
    pub reply_failed: AtomicU64,
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

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
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
        let dest = self.endpoints.destination(client, local);
        let report =
            |verdict, query: Option<&Query>, answer: Option<&Answer>, reason: Option<String>| {
                self.endpoints.verdict(DnsEvent {
                    time: String::new(),
                    verdict,
                    endpoint: None,
                    client,
                    server: dest,
                    transport: transport.name().into(),
                    name: query.map(|q| q.name.clone()),
                    qtype: query.map(|q| q.qtype.to_string()),
                    answers: answer
                        .map_or_else(Vec::new, |a| a.addrs.iter().map(|a| a.ip).collect()),
                    ttl: answer.and_then(|a| a.addrs.iter().map(|a| a.ttl).min()),
                    selectors: Vec::new(),
                    reason,
                })
            };
        let query = match message::parse_query(bytes) {
            Ok(q) => q,
            Err(d) => {
                self.stats.drops.count(d);
                report(DnsVerdict::Dropped, None, None, Some(d.name().into()));
                return None;
            }
        };
        let rules = self.endpoints.dns_rules(client.ip()).unwrap_or_default();
        if message::decide(&query, &rules) == Verdict::Refuse {
            Stats::inc(&self.stats.refused);
            let why = if rules.is_empty() {
                "the client is no endpoint with DNS rules"
            } else {
                "no DNS rule of the endpoint allows this name"
            };
            report(DnsVerdict::Refused, Some(&query), None, Some(why.into()));
            return Some(message::refused(&query));
        }
        Stats::inc(&self.stats.forwarded);
        let upstream = match transport {
            Transport::Udp => self.forward_udp(bytes, &query, dest).await,
            Transport::Tcp => self.forward_tcp(bytes, &query, dest).await,
        };
        let Some((raw, answer)) = upstream else {
            Stats::inc(&self.stats.upstream_failed);
            let why = "the server was silent, unreachable or its answer was dropped";
            report(DnsVerdict::Servfail, Some(&query), None, Some(why.into()));
            return Some(message::reply(&query, ResponseCode::ServFail));
        };
        if !answer.addrs.is_empty() {
            if let Err(why) = self.endpoints.learn(client.ip(), &answer).await {
                Stats::inc(&self.stats.learn_failed);
                report(DnsVerdict::Servfail, Some(&query), Some(&answer), Some(why));
                return Some(message::reply(&query, ResponseCode::ServFail));
            }
            self.stats
                .learned_addrs
                .fetch_add(answer.addrs.len() as u64, Ordering::Relaxed);
        }
        Stats::inc(&self.stats.answered);
        report(DnsVerdict::Allowed, Some(&query), Some(&answer), None);
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

    /// Serve queries on `sock` until `shutdown` completes. Each query's
    /// original destination comes with it (`IP_RECVORIGDSTADDR`, turned on
    /// here); the reply goes out from there.
    pub async fn serve_udp(
        self: Arc<Self>,
        sock: UdpSocket,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let sock = Arc::new(sock);
        let local = sock.local_addr()?;
        recv_original_destination(&sock, local)?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        tokio::pin!(shutdown);
        loop {
            let (n, client, orig) = tokio::select! {
                r = sock.async_io(Interest::READABLE, || recv_with_destination(&sock, &mut buf)) => match r {
                    Ok(got) => got,
                    // A datagram that could not be read whole: skip it.
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => continue,
                    Err(e) => return Err(e),
                },
                () = &mut shutdown => return Ok(()),
            };
            let orig = orig.unwrap_or(local);
            let bytes = buf[..n].to_vec();
            let (me, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                if let Some(reply) = me.handle(&bytes, client, orig, Transport::Udp).await {
                    if orig == local {
                        let _ = sock.send_to(&reply, client).await;
                    } else if send_from(orig, client, &reply).is_err() {
                        Stats::inc(&me.stats.reply_failed);
                    }
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
        tokio::pin!(shutdown);
        loop {
            let (mut conn, client) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    // Out of fds, a connection reset before accept: go on.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return Ok(()),
            };
            // Its local address is the workload's original destination.
            let Ok(local) = conn.local_addr() else {
                continue;
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

/// Turn on the original destination of each datagram (`IP_RECVORIGDSTADDR`
/// or `IPV6_RECVORIGDSTADDR`).
fn recv_original_destination(sock: &UdpSocket, local: SocketAddr) -> io::Result<()> {
    let (level, name) = match local {
        SocketAddr::V4(_) => (libc::SOL_IP, libc::IP_RECVORIGDSTADDR),
        SocketAddr::V6(_) => (libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR),
    };
    set_int(sock.as_raw_fd(), level, name, 1)
}

fn set_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: setsockopt reads one int we own.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One datagram: its length, its sender and its original destination.
fn recv_with_destination(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!(libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_TRUNC,
    )
    .map_err(io::Error::from)?;
    let n = msg.bytes;
    if n > MAX_MESSAGE {
        return Err(io::ErrorKind::InvalidData.into());
    }
    let client = msg
        .address
        .as_ref()
        .and_then(storage_addr)
        .ok_or(io::ErrorKind::InvalidData)?;
    let mut orig = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            match c {
                ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                    orig = Some(SocketAddr::V4(SocketAddrV4::new(
                        Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                        u16::from_be(a.sin_port),
                    )));
                }
                ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                    orig = Some(SocketAddr::V6(SocketAddrV6::new(
                        Ipv6Addr::from(a.sin6_addr.s6_addr),
                        u16::from_be(a.sin6_port),
                        0,
                        a.sin6_scope_id,
                    )));
                }
                _ => {}
            }
        }
    }
    Ok((n, client, orig))
}

fn storage_addr(s: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(a.ip(), a.port())));
    }
    s.as_sockaddr_in6().map(|a| {
        SocketAddr::V6(SocketAddrV6::new(
            a.ip(),
            a.port(),
            a.flowinfo(),
            a.scope_id(),
        ))
    })
}

/// A socket of `family` (`AF_INET`/`AF_INET6`), `ty` (`SOCK_DGRAM`/`SOCK_STREAM`)
/// that may use an address that is not this host's (`IP_TRANSPARENT`: the
/// workload's original destination) and share it (`SO_REUSEADDR`).
pub fn transparent_socket(v6: bool, ty: i32) -> io::Result<OwnedFd> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: socket() returns a new descriptor or -1.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if v6 {
        set_int(fd.as_raw_fd(), libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)?;
        set_int(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    } else {
        set_int(fd.as_raw_fd(), libc::SOL_IP, libc::IP_TRANSPARENT, 1)?;
    }
    Ok(fd)
}

/// Bind `fd` to `addr`.
pub fn bind_fd(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    use nix::sys::socket::{bind, SockaddrIn, SockaddrIn6};
    match addr {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    }
    .map_err(io::Error::from)
}

/// Send one datagram to `to` from `from` (an address that need not be this
/// host's: the original destination of the query it answers).
fn send_from(from: SocketAddr, to: SocketAddr, data: &[u8]) -> io::Result<()> {
    let fd = transparent_socket(from.is_ipv6(), libc::SOCK_DGRAM)?;
    bind_fd(&fd, from)?;
    std::net::UdpSocket::from(fd).send_to(data, to)?;
    Ok(())
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

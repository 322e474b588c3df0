//! netpold's DNS proxy (docs/policy.md, "DNS names"): its sockets, the
//! routing that lets the datapath hand it a workload's DNS, and its view of
//! the endpoints.
//!
//! Started by the reconcile loop once a compiled state has DNS rules, never
//! stopped while netpold runs. It listens on 127.0.0.1 and ::1 (TCP and UDP,
//! one port, `IP_TRANSPARENT`, so a socket may use the workload's original
//! destination as its own address); bpf/lib/dnsredirect.h assigns a
//! redirected packet to these sockets and marks it, and the `ip rule` added
//! here (`fwmark MARK/MARK lookup TABLE`, a `local` default route in TABLE, v4
//! and v6) makes the stack deliver marked packets locally, as it must for an
//! assigned socket. The rule and routes stay when netpold stops: they only
//! concern marked packets, and a restarted netpold finds them in place.
//!
//! The proxy asks [`ProxyEndpoints`] which DNS rules the sender has (the
//! [`View`] the loop updates after each apply) and hands an allowed answer's
//! addresses to the loop as a [`LearnRequest`]: the loop learns them,
//! compiles and applies, and only then answers the request, so the answer
//! reaches the workload after its addresses are enforced.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::TryStreamExt;
use netlink_packet_route::route::{RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute};
use slog::Logger;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::netlink::LinkTable;
use super::status::display_name;
use crate::api::model::FqdnSelector;
use crate::config::DnsConfig;
use crate::datapath::{Attachment, DnsProxyTarget, DnsRedirect};
use crate::dns::event::{wire, DnsEvent, DnsVerdict};
use crate::dns::learned::{LearnedSet, STATE_FILE};
use crate::dns::matcher;
use crate::dns::message::{Addr, Answer};
use crate::dns::proxy::{bind_fd, transparent_socket, Endpoints, Learning, Proxy, Stats};
use crate::policy::fqdn::FqdnAddrs;
use crate::policy::types::Compiled;

/// What the proxy knows of one endpoint with DNS rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointDns {
    /// Its name in the learned set (`namespace/name`).
    pub key: String,
    /// The names its DNS rules allow it to look up.
    pub rules: Vec<FqdnSelector>,
}

/// The endpoints with DNS rules, by address.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct View {
    pub by_ip: HashMap<IpAddr, Arc<EndpointDns>>,
}

/// An allowed answer's addresses, to learn and enforce before `reply`.
#[derive(Debug)]
pub struct LearnRequest {
    pub endpoint: String,
    pub name: String,
    pub selectors: Vec<FqdnSelector>,
    pub addrs: Vec<Addr>,
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// The proxy's questions, answered from the loop's [`View`] and its learn channel.
pub struct ProxyEndpoints {
    view: Arc<RwLock<View>>,
    learn: mpsc::UnboundedSender<LearnRequest>,
    /// The monitor stream (`netpolctl monitor`).
    events: broadcast::Sender<Arc<str>>,
}

impl Endpoints for ProxyEndpoints {
    fn dns_rules(&self, client: IpAddr) -> Option<Vec<FqdnSelector>> {
        let view = self.view.read().ok()?;
        view.by_ip.get(&client).map(|e| e.rules.clone())
    }

    /// The original destination (a query sent to the proxy's own address comes
    /// from no endpoint with DNS rules and is refused before this).
    fn destination(&self, _client: SocketAddr, local: SocketAddr) -> SocketAddr {
        local
    }

    fn learn(&self, client: IpAddr, answer: &Answer) -> Learning {
        let ep = self
            .view
            .read()
            .ok()
            .and_then(|v| v.by_ip.get(&client).cloned());
        let Some(ep) = ep else {
            return Box::pin(async { Err("the client is no endpoint with DNS rules".into()) });
        };
        // Learned under the DNS-rule selectors that allowed the query; compile
        // gives the addresses to every toFQDNs selector matching the name
        // (policy::fqdn, as Cilium's selector cache does).
        let selectors: Vec<FqdnSelector> = ep
            .rules
            .iter()
            .filter(|s| matcher::matches(s, &answer.name))
            .cloned()
            .collect();
        let (reply, done) = oneshot::channel();
        let req = LearnRequest {
            endpoint: ep.key.clone(),
            name: answer.name.clone(),
            selectors,
            addrs: answer.addrs.clone(),
            reply,
        };
        if self.learn.send(req).is_err() {
            return Box::pin(async { Err("netpold is stopping".into()) });
        }
        Box::pin(async move {
            done.await
                .unwrap_or_else(|_| Err("netpold is stopping".into()))
        })
    }

    /// A DNS verdict on the monitor stream, with its time, the endpoint and
    /// the endpoint's selectors that allowed the name.
    fn verdict(&self, mut ev: DnsEvent) {
        if self.events.receiver_count() == 0 {
            return;
        }
        ev.time = super::status::rfc3339(std::time::SystemTime::now());
        let ep = self
            .view
            .read()
            .ok()
            .and_then(|v| v.by_ip.get(&ev.client.ip()).cloned());
        if let Some(ep) = ep {
            ev.endpoint = Some(ep.key.clone());
            if ev.verdict == DnsVerdict::Allowed {
                if let Some(name) = &ev.name {
                    ev.selectors = ep
                        .rules
                        .iter()
                        .filter(|s| matcher::matches(s, name))
                        .map(crate::policy::fqdn::selector_text)
                        .collect();
                }
            }
        }
        let _ = self.events.send(wire(&ev).into());
    }
}

/// The running proxy; its tasks end when it is dropped.
pub struct DnsProxy {
    /// The port on 127.0.0.1 and ::1.
    pub port: u16,
    pub stats: Arc<Stats>,
    pub view: Arc<RwLock<View>>,
    _stop: watch::Sender<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsProxyError {
    #[error("DNS proxy: cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("DNS proxy: no port free on 127.0.0.1 for both TCP and UDP")]
    NoPort,
    #[error("DNS proxy: cannot route redirected DNS locally ({what})")]
    Route {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("DNS proxy: netlink socket")]
    Netlink(#[source] io::Error),
}

/// One listening pair (TCP, UDP) on `ip:port`.
fn listen_pair(ip: IpAddr, port: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let addr = SocketAddr::new(ip, port);
    let tcp = transparent_socket(ip.is_ipv6(), libc::SOCK_STREAM | libc::SOCK_NONBLOCK)?;
    bind_fd(&tcp, addr)?;
    // SAFETY: listen on a descriptor we own.
    if unsafe { libc::listen(tcp.as_raw_fd(), 1024) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let port = std::net::TcpListener::from(tcp.try_clone()?)
        .local_addr()?
        .port();
    let udp = transparent_socket(ip.is_ipv6(), libc::SOCK_DGRAM | libc::SOCK_NONBLOCK)?;
    bind_fd(&udp, SocketAddr::new(ip, port))?;
    Ok((tcp, udp))
}

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Bind the proxy's sockets: 127.0.0.1 always, ::1 when the host has it.
fn bind_all(
    config: &DnsConfig,
    log: &Logger,
) -> Result<(u16, Vec<(OwnedFd, OwnedFd)>), DnsProxyError> {
    for _ in 0..16 {
        let (tcp, udp) = match listen_pair(V4, config.proxy_port) {
            Ok(p) => p,
            // The kernel's free TCP port is taken for UDP: try another.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && config.proxy_port == 0 => continue,
            Err(source) => {
                return Err(DnsProxyError::Listen {
                    addr: SocketAddr::new(V4, config.proxy_port),
                    source,
                })
            }
        };
        let port =
            std::net::UdpSocket::from(udp.try_clone().map_err(|source| DnsProxyError::Listen {
                addr: SocketAddr::new(V4, config.proxy_port),
                source,
            })?)
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(0);
        let mut pairs = vec![(tcp, udp)];
        match listen_pair(V6, port) {
            Ok(p) => pairs.push(p),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && config.proxy_port == 0 => continue,
            Err(e) => {
                slog::warn!(log, "DNS proxy: no IPv6 loopback; IPv6 DNS of endpoints with DNS rules fails closed";
                    "error" => %e);
            }
        }
        return Ok((port, pairs));
    }
    Err(DnsProxyError::NoPort)
}

impl DnsProxy {
    /// Bind the sockets, route marked packets locally and serve. Answers
    /// are learned through `learn`; each verdict goes to `events`.
    pub async fn start(
        config: &DnsConfig,
        learn: mpsc::UnboundedSender<LearnRequest>,
        events: broadcast::Sender<Arc<str>>,
        log: &Logger,
    ) -> Result<DnsProxy, DnsProxyError> {
        install_routes(config).await?;
        let (port, pairs) = bind_all(config, log)?;
        let view = Arc::new(RwLock::new(View::default()));
        let proxy = Arc::new(Proxy::new(
            Arc::new(ProxyEndpoints {
                view: view.clone(),
                learn,
                events,
            }),
            Duration::from_millis(config.upstream_timeout_ms),
        ));
        let (stop, stopped) = watch::channel(());
        for (tcp, udp) in pairs {
            let listen = |source| DnsProxyError::Listen {
                addr: SocketAddr::new(V4, port),
                source,
            };
            let tcp = tokio::net::TcpListener::from_std(std::net::TcpListener::from(tcp))
                .map_err(listen)?;
            let udp =
                tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(udp)).map_err(listen)?;
            let (p, l, mut rx) = (proxy.clone(), log.clone(), stopped.clone());
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = rx.changed().await;
                };
                if let Err(e) = p.serve_tcp(tcp, shutdown).await {
                    slog::error!(l, "DNS proxy: TCP listener failed; TCP DNS of endpoints with DNS rules fails closed"; "error" => %e);
                }
            });
            let (p, l, mut rx) = (proxy.clone(), log.clone(), stopped.clone());
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = rx.changed().await;
                };
                if let Err(e) = p.serve_udp(udp, shutdown).await {
                    slog::error!(l, "DNS proxy: UDP socket failed; UDP DNS of endpoints with DNS rules fails closed"; "error" => %e);
                }
            });
        }
        slog::info!(log, "DNS proxy listening"; "port" => port, "mark" => format!("{:#x}", config.redirect_mark),
            "table" => config.route_table);
        Ok(DnsProxy {
            port,
            stats: proxy.stats.clone(),
            view,
            _stop: stop,
        })
    }

    /// Replace the endpoints the proxy serves.
    pub fn set_view(&self, view: View) {
        if let Ok(mut v) = self.view.write() {
            if *v != view {
                *v = view;
            }
        }
    }
}

fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

/// `ip rule add fwmark MARK/MARK lookup TABLE pref PRIO` and `ip route add
/// local default dev lo table TABLE`, v4 and v6 (IPv6 only when the host
/// has it); what is already there is kept.
async fn install_routes(config: &DnsConfig) -> Result<(), DnsProxyError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(DnsProxyError::Netlink)?;
    let conn = tokio::spawn(conn);
    let result = async {
        let mut lo = handle.link().get().match_name("lo".into()).execute();
        let lo = match lo.try_next().await {
            Ok(Some(m)) => m.header.index,
            Ok(None) => 1,
            Err(source) => {
                return Err(DnsProxyError::Route {
                    what: "find lo".into(),
                    source,
                })
            }
        };
        for v6 in [false, true] {
            let family = if v6 { "IPv6" } else { "IPv4" };
            let rule = handle
                .rule()
                .add()
                .fw_mark(config.redirect_mark)
                .table_id(config.route_table)
                .priority(config.rule_priority)
                .action(RuleAction::ToTable);
            let r = if v6 {
                let mut r = rule.v6();
                r.message_mut()
                    .attributes
                    .push(RuleAttribute::FwMask(config.redirect_mark));
                r.execute().await
            } else {
                let mut r = rule.v4();
                r.message_mut()
                    .attributes
                    .push(RuleAttribute::FwMask(config.redirect_mark));
                r.execute().await
            };
            match r {
                Ok(()) => {}
                Err(e) if exists(&e) => {}
                // A host without IPv6: its DNS of endpoints fails closed.
                Err(_) if v6 => continue,
                Err(source) => {
                    return Err(DnsProxyError::Route {
                        what: format!(
                            "{family} rule fwmark {:#x} lookup {}",
                            config.redirect_mark, config.route_table
                        ),
                        source,
                    })
                }
            }
            let route = handle
                .route()
                .add()
                .table_id(config.route_table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .output_interface(lo)
                .replace();
            let r = if v6 {
                route
                    .v6()
                    .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                    .execute()
                    .await
            } else {
                route
                    .v4()
                    .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                    .execute()
                    .await
            };
            match r {
                Ok(()) => {}
                Err(e) if exists(&e) => {}
                Err(_) if v6 => {}
                Err(source) => {
                    return Err(DnsProxyError::Route {
                        what: format!(
                            "{family} local default route in table {}",
                            config.route_table
                        ),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
    .await;
    conn.abort();
    result
}

/// The DNS side of the reconcile loop: the learned set, the proxy, what the
/// datapath's redirect holds.
pub struct Dns {
    pub config: DnsConfig,
    pub state_dir: PathBuf,
    pub learned: LearnedSet,
    pub proxy: Option<DnsProxy>,
    pub learn_tx: mpsc::UnboundedSender<LearnRequest>,
    /// The redirect as last written to the datapath.
    pub redirect: Option<(DnsProxyTarget, Vec<DnsRedirect>)>,
    /// Why the proxy is not running, or the learned set not saved.
    pub error: Option<String>,
    /// The learned set changed since it was saved.
    pub dirty: bool,
    /// Learned-set key → the device its endpoint is attached to (for the
    /// conntrack check before expiry).
    pub devices: HashMap<String, u32>,
    /// The installed state has DNS rules: the proxy should run.
    pub wanted: bool,
    /// (endpoint, address) pairs held in the learned set for a live
    /// connection (conntrack), as last checked.
    pub held: std::collections::BTreeSet<(String, IpAddr)>,
    /// Answers not learned, by cap (`metrics::cap_key`).
    pub cap_reached: std::collections::BTreeMap<&'static str, u64>,
    /// The learned addresses the installed state was compiled with: what
    /// the datapath enforces. Whether a learn or an expiry needs a compile,
    /// and whether an answer may be released, is decided against this, never
    /// against an earlier copy of the learned set (an address held, renewed
    /// or ended since the last compile may differ from what is in force).
    pub installed: Arc<FqdnAddrs>,
}

impl Dns {
    /// The learned set saved in `state_dir` (empty, reported, when it cannot
    /// be read: a damaged file must not stop enforcement).
    pub fn new(
        config: DnsConfig,
        state_dir: PathBuf,
        learn_tx: mpsc::UnboundedSender<LearnRequest>,
        log: &Logger,
    ) -> Dns {
        let (learned, error) = match LearnedSet::load(&state_dir, config.learned()) {
            Ok(s) => {
                if !s.is_empty() {
                    slog::info!(log, "learned DNS addresses reloaded"; "addresses" => s.len(),
                        "file" => %state_dir.join(STATE_FILE).display());
                }
                (s, None)
            }
            Err(e) => {
                let msg = crate::error::chain(&e);
                slog::error!(log, "cannot reload the learned DNS addresses; starting with none"; "error" => &msg);
                (LearnedSet::new(config.learned()), Some(msg))
            }
        };
        Dns {
            config,
            state_dir,
            learned,
            proxy: None,
            learn_tx,
            redirect: None,
            error,
            dirty: false,
            devices: HashMap::new(),
            wanted: false,
            held: Default::default(),
            cap_reached: Default::default(),
            installed: Arc::default(),
        }
    }

    /// Save the learned set if it changed.
    pub fn save(&mut self, log: &Logger) {
        if !self.dirty {
            return;
        }
        match self.learned.save(&self.state_dir) {
            Ok(()) => {
                self.dirty = false;
                if self
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains(STATE_FILE))
                {
                    self.error = None;
                }
            }
            Err(e) => {
                let msg = crate::error::chain(&e);
                slog::error!(log, "cannot save the learned DNS addresses"; "error" => &msg);
                self.error = Some(msg);
            }
        }
    }

    /// The datapath redirect, the proxy's view and the devices for an
    /// installed state with these attachments and links.
    pub fn plan(
        &self,
        compiled: &Compiled,
        attachments: &[Attachment],
        links: &LinkTable,
    ) -> (Vec<DnsRedirect>, View, HashMap<String, u32>) {
        let mut redirects = Vec::new();
        let mut view = View::default();
        let mut devices = HashMap::new();
        for de in &compiled.dns {
            let Some(ep) = compiled.endpoints.get(de.endpoint as usize) else {
                continue;
            };
            let key = display_name(ep.namespace.as_deref(), &ep.name);
            if let Some(a) = attachments.iter().find(|a| a.slot == de.endpoint) {
                devices.insert(key.clone(), a.ifindex);
                for p in &de.ports {
                    redirects.push(DnsRedirect {
                        ifindex: a.ifindex,
                        proto: p.proto,
                        port: p.port,
                        bridge_mac: links.bridge_ports.get(&a.ifindex).copied(),
                    });
                }
            }
            let e = Arc::new(EndpointDns {
                key,
                rules: de.selectors(),
            });
            for ip in &ep.addresses {
                view.by_ip.insert(*ip, e.clone());
            }
        }
        redirects.sort();
        redirects.dedup();
        (redirects, view, devices)
    }

    /// What the datapath's redirect sends to now.
    pub fn target(&self) -> DnsProxyTarget {
        DnsProxyTarget {
            port: self.proxy.as_ref().map_or(0, |p| p.port),
            mark: self.config.redirect_mark,
        }
    }
}

/// Seconds since the Unix epoch (the learned set's clock), rounded down:
/// an address is alive while its expiry is later than this.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The clock an answer is learned at, rounded up: an answer with TTL 1
/// learned at 99.9 s lives until 101, not until 100 (0.1 s, too short for
/// the connection that follows the lookup). Every address lives at least
/// its TTL, at most one second more.
pub fn unix_now_ceil() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

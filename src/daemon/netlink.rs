//! Interfaces through rtnetlink: name → ifindex and this host's addresses, kept
//! current from link and address events (RTMGRP_LINK, RTMGRP_IPV4_IFADDR,
//! RTMGRP_IPV6_IFADDR).
//!
//! Level-triggered like the rest of the daemon: any event (or a buffer overrun,
//! ENOBUFS) makes the table be listed again in full, and the new [`LinkTable`] is
//! published on a watch channel; the reconcile loop only reads the latest one.
//! Behind the [`Links`] trait so the loop is tested with `FakeLinks` (feature
//! `test-support`). Reads kernel state only; changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteType};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{AsyncSocket, SocketAddr};
use slog::Logger;
use tokio::sync::watch;

/// The interfaces and addresses of this host (of the network namespace netpold runs in).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkTable {
    /// Interface name → ifindex.
    pub links: BTreeMap<String, u32>,
    /// Every address configured on any interface.
    pub addresses: BTreeSet<IpAddr>,
    /// Unicast routes of the main table: destination → output ifindex.
    pub routes: Vec<(IpNet, u32)>,
    /// Ports of a bridge (devices with a controller): ifindex → their own MAC
    /// address, a local entry of the bridge (the DNS redirect makes a frame
    /// addressed to it go up the stack instead of being forwarded).
    pub bridge_ports: BTreeMap<u32, [u8; 6]>,
}

impl LinkTable {
    pub fn resolve(&self, name: &str) -> Option<u32> {
        self.links.get(name).copied()
    }

    /// The interface this host routes `ip` through (longest prefix), for
    /// `interface: auto`.
    pub fn route_device(&self, ip: IpAddr) -> Option<u32> {
        self.routes
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, i)| *i)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink {op}")]
    Request {
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

/// Source of the interface table.
pub trait Links {
    /// Start following the kernel; the receiver always holds the latest table
    /// (the first one already listed). Called once, inside the tokio runtime.
    fn subscribe(
        &mut self,
        log: &Logger,
    ) -> impl std::future::Future<Output = Result<watch::Receiver<LinkTable>, NetlinkError>>;
}

/// The real thing: rtnetlink in the current network namespace.
#[derive(Debug, Default)]
pub struct NetlinkLinks;

impl Links for NetlinkLinks {
    async fn subscribe(
        &mut self,
        log: &Logger,
    ) -> Result<watch::Receiver<LinkTable>, NetlinkError> {
        // Two sockets: one bound to the multicast groups that only receives (an
        // overrun there must not be taken for the answer to a request), one for
        // the dumps.
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        let mut events = subscribe_events()?;
        let first = list(&handle).await?;
        let (tx, rx) = watch::channel(first);
        let log = log.new(slog::o!("component" => "netlink"));
        tokio::spawn(async move {
            loop {
                let Some((msg, _)) = events.next().await else {
                    slog::warn!(log, "netlink event socket closed; reopening");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match subscribe_events() {
                        Ok(e) => events = e,
                        Err(e) => {
                            slog::error!(log, "cannot reopen the netlink event socket"; "error" => %e)
                        }
                    }
                    relist(&handle, &tx, &log).await;
                    continue;
                };
                if matches!(msg.payload, NetlinkPayload::Overrun(_)) {
                    slog::warn!(log, "netlink buffer overrun; listing every interface again");
                }
                // Coalesce whatever else is already queued, then list once.
                while let Some(Some(_)) = events.next().now_or_never() {}
                relist(&handle, &tx, &log).await;
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

use futures::FutureExt as _;

type EventStream = futures::channel::mpsc::UnboundedReceiver<(
    netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>,
    SocketAddr,
)>;

fn subscribe_events() -> Result<EventStream, NetlinkError> {
    use rtnetlink::constants::{
        RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
    };
    let (mut conn, _handle, messages) =
        rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    let groups = RTMGRP_LINK
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV6_ROUTE;
    let addr = SocketAddr::new(0, groups);
    conn.socket_mut()
        .socket_mut()
        .bind(&addr)
        .map_err(NetlinkError::Socket)?;
    tokio::spawn(conn);
    Ok(messages)
}

async fn relist(handle: &rtnetlink::Handle, tx: &watch::Sender<LinkTable>, log: &Logger) {
    match list(handle).await {
        Ok(t) => {
            tx.send_if_modified(|cur| {
                if *cur != t {
                    *cur = t;
                    true
                } else {
                    false
                }
            });
        }
        Err(e) => slog::warn!(log, "cannot list interfaces"; "error" => %e),
    }
}

/// Dump every link and address.
pub async fn list(handle: &rtnetlink::Handle) -> Result<LinkTable, NetlinkError> {
    let mut table = LinkTable::default();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links
        .try_next()
        .await
        .map_err(|source| NetlinkError::Request {
            op: "link dump",
            source,
        })?
    {
        let mut mac = None;
        let mut controlled = false;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => {
                    table.links.insert(name.clone(), msg.header.index);
                }
                LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::Controller(_) => controlled = true,
                _ => {}
            }
        }
        if let (true, Some(mac)) = (controlled, mac) {
            table.bridge_ports.insert(msg.header.index, mac);
        }
    }
    let mut addrs = handle.address().get().execute();
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(|source| NetlinkError::Request {
            op: "address dump",
            source,
        })?
    {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = attr {
                table.addresses.insert(*ip);
            }
        }
    }
    for v6 in [false, true] {
        let version = if v6 {
            rtnetlink::IpVersion::V6
        } else {
            rtnetlink::IpVersion::V4
        };
        let mut routes = handle.route().get(version).execute();
        while let Some(msg) = routes
            .try_next()
            .await
            .map_err(|source| NetlinkError::Request {
                op: "route dump",
                source,
            })?
        {
            let mut table_id = u32::from(msg.header.table);
            let (mut dst, mut oif) = (None, None);
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Table(t) => table_id = *t,
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                        dst = Some(IpAddr::V4(*a))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                        dst = Some(IpAddr::V6(*a))
                    }
                    _ => {}
                }
            }
            const RT_TABLE_MAIN: u32 = 254;
            if table_id != RT_TABLE_MAIN || msg.header.kind != RouteType::Unicast {
                continue;
            }
            let dst = dst.unwrap_or(if v6 {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            });
            if let (Some(oif), Ok(net)) =
                (oif, IpNet::new(dst, msg.header.destination_prefix_length))
            {
                table.routes.push((net, oif));
            }
        }
    }
    table.routes.sort();
    Ok(table)
}

/// A [`Links`] driven by the test through the sender [`fake_links`] returns.
#[cfg(any(test, feature = "test-support"))]
#[derive(Debug)]
pub struct FakeLinks {
    rx: Option<watch::Receiver<LinkTable>>,
}

/// A fake and its control: send a new table to announce links appearing, going
/// away or coming back with another ifindex.
#[cfg(any(test, feature = "test-support"))]
pub fn fake_links(initial: LinkTable) -> (watch::Sender<LinkTable>, FakeLinks) {
    let (tx, rx) = watch::channel(initial);
    (tx, FakeLinks { rx: Some(rx) })
}

#[cfg(any(test, feature = "test-support"))]
impl Links for FakeLinks {
    async fn subscribe(
        &mut self,
        _log: &Logger,
    ) -> Result<watch::Receiver<LinkTable>, NetlinkError> {
        Ok(self.rx.take().expect("FakeLinks::subscribe called twice"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs no privilege: every process may dump its own namespace's links.
    #[tokio::test]
    async fn lists_loopback() {
        let (conn, handle, _) = rtnetlink::new_connection().unwrap();
        tokio::spawn(conn);
        let t = list(&handle).await.unwrap();
        assert_eq!(t.resolve("lo"), Some(1));
        assert!(t
            .addresses
            .contains(&"127.0.0.1".parse::<IpAddr>().unwrap()));
    }

    #[test]
    fn route_device_takes_the_longest_prefix() {
        let t = LinkTable {
            routes: vec![
                ("0.0.0.0/0".parse().unwrap(), 2),
                ("10.0.1.0/24".parse().unwrap(), 5),
                ("10.0.1.11/32".parse().unwrap(), 9),
            ],
            ..LinkTable::default()
        };
        assert_eq!(t.route_device("10.0.1.11".parse().unwrap()), Some(9));
        assert_eq!(t.route_device("10.0.1.12".parse().unwrap()), Some(5));
        assert_eq!(t.route_device("192.0.2.1".parse().unwrap()), Some(2));
        assert_eq!(t.route_device("fd00::1".parse().unwrap()), None);
    }
}

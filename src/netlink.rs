//! Interfaces through rtnetlink: name → ifindex and this host's addresses, kept
//! current from link and address events (RTMGRP_LINK, RTMGRP_IPV4_IFADDR,
//! RTMGRP_IPV6_IFADDR).
//!
//! Level-triggered like the rest of the daemon: any event (or a buffer overrun,
//! ENOBUFS) makes the table be listed again in full, and the new [`LinkTable`] is
//! published on a watch channel; the reconcile loop only reads the latest one.
//! Behind the [`Links`] trait so the loop is tested with [`FakeLinks`]. Reads
//! kernel state only; changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
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
}

impl LinkTable {
    pub fn resolve(&self, name: &str) -> Option<u32> {
        self.links.get(name).copied()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("netlink {op}: {source}")]
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
    fn subscribe(&mut self, log: &Logger) -> impl std::future::Future<Output = Result<watch::Receiver<LinkTable>, NetlinkError>>;
}

/// The real thing: rtnetlink in the current network namespace.
#[derive(Debug, Default)]
pub struct NetlinkLinks;

impl Links for NetlinkLinks {
    async fn subscribe(&mut self, log: &Logger) -> Result<watch::Receiver<LinkTable>, NetlinkError> {
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
                        Err(e) => slog::error!(log, "cannot reopen the netlink event socket"; "error" => %e),
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

type EventStream = futures::channel::mpsc::UnboundedReceiver<(netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

fn subscribe_events() -> Result<EventStream, NetlinkError> {
    use rtnetlink::constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK};
    let (mut conn, _handle, messages) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    let addr = SocketAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR);
    conn.socket_mut().socket_mut().bind(&addr).map_err(NetlinkError::Socket)?;
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
    while let Some(msg) = links.try_next().await.map_err(|source| NetlinkError::Request { op: "link dump", source })? {
        for attr in &msg.attributes {
            if let LinkAttribute::IfName(name) = attr {
                table.links.insert(name.clone(), msg.header.index);
            }
        }
    }
    let mut addrs = handle.address().get().execute();
    while let Some(msg) = addrs.try_next().await.map_err(|source| NetlinkError::Request { op: "address dump", source })? {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = attr {
                table.addresses.insert(*ip);
            }
        }
    }
    Ok(table)
}

/// A [`Links`] driven by the test through the sender [`fake_links`] returns.
#[derive(Debug)]
pub struct FakeLinks {
    rx: Option<watch::Receiver<LinkTable>>,
}

/// A fake and its control: send a new table to announce links appearing, going
/// away or coming back with another ifindex.
pub fn fake_links(initial: LinkTable) -> (watch::Sender<LinkTable>, FakeLinks) {
    let (tx, rx) = watch::channel(initial);
    (tx, FakeLinks { rx: Some(rx) })
}

impl Links for FakeLinks {
    async fn subscribe(&mut self, _log: &Logger) -> Result<watch::Receiver<LinkTable>, NetlinkError> {
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
        assert!(t.addresses.contains(&"127.0.0.1".parse::<IpAddr>().unwrap()));
    }
}

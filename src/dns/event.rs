//! DNS verdicts on the monitor stream (`netpolctl monitor`): one event per
//! query the proxy decides, its wire form beside the datapath's verdict
//! events (`{"dns": {...}}`, one JSON object per line) and its one-line text.
//!
//! Owns the event type and its text only; the daemon fills it from what the
//! proxy decided (`dns::proxy`) and sends it, the CLI prints it.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// What the proxy did with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsVerdict {
    /// Forwarded, and the answer (its addresses learned) released.
    Allowed,
    /// No DNS rule of the endpoint allows the name: answered REFUSED.
    Refused,
    /// Allowed, but the upstream was silent or the answer could not be
    /// learned (a cap): answered SERVFAIL.
    Servfail,
    /// A malformed or hostile query or answer: dropped, nothing released.
    Dropped,
}

impl DnsVerdict {
    pub fn name(self) -> &'static str {
        match self {
            DnsVerdict::Allowed => "allowed",
            DnsVerdict::Refused => "refused",
            DnsVerdict::Servfail => "servfail",
            DnsVerdict::Dropped => "dropped",
        }
    }
}

/// One DNS verdict (the `dns` member of a monitor stream line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsEvent {
    /// RFC 3339, UTC, as the datapath's events.
    pub time: String,
    pub verdict: DnsVerdict,
    /// `namespace/name` of the endpoint that asked, if known.
    pub endpoint: Option<String>,
    /// The workload's address and port.
    pub client: SocketAddr,
    /// The DNS server the workload asked.
    pub server: SocketAddr,
    /// `udp` or `tcp`.
    pub transport: String,
    /// The name asked (normal form); `None` when the query did not parse.
    pub name: Option<String>,
    /// `A`, `AAAA`, …
    pub qtype: Option<String>,
    /// The addresses of an allowed answer (learned before release).
    #[serde(default)]
    pub answers: Vec<IpAddr>,
    /// The smallest TTL of the answer's addresses, as answered.
    pub ttl: Option<u32>,
    /// The endpoint's selectors that allowed the name (`matchName: …`).
    #[serde(default)]
    pub selectors: Vec<String>,
    /// Why it was refused, failed or dropped (a cap's message, a drop
    /// reason such as `id_mismatch`).
    pub reason: Option<String>,
}

/// The monitor stream line for `ev`: `{"dns": {...}}`.
pub fn wire(ev: &DnsEvent) -> String {
    serde_json::json!({ "dns": ev }).to_string()
}

/// `TIME VERDICT CLIENT -> SERVER PROTO/PORT ENDPOINT dns NAME QTYPE …`: the
/// datapath events' columns, then what the proxy decided —
/// `=> ADDRESSES (ttl N) by SELECTORS` when allowed, `: REASON` otherwise.
pub fn format_dns_event(ev: &DnsEvent) -> String {
    let addr = |a: &SocketAddr| match a {
        SocketAddr::V4(_) => a.to_string(),
        SocketAddr::V6(v) => format!("[{}]:{}", v.ip(), v.port()),
    };
    let mut o = format!(
        "{} {:<8} {} -> {} {}/{} {} dns {} {}",
        ev.time,
        ev.verdict.name(),
        addr(&ev.client),
        addr(&ev.server),
        ev.transport,
        ev.server.port(),
        ev.endpoint.as_deref().unwrap_or("-"),
        ev.name.as_deref().unwrap_or("-"),
        ev.qtype.as_deref().unwrap_or("-"),
    );
    if ev.verdict == DnsVerdict::Allowed {
        if ev.answers.is_empty() {
            o.push_str(" => no address");
        } else {
            let list: Vec<String> = ev.answers.iter().map(IpAddr::to_string).collect();
            let _ = write!(o, " => {}", list.join(", "));
            if let Some(t) = ev.ttl {
                let _ = write!(o, " (ttl {t}s)");
            }
        }
        if !ev.selectors.is_empty() {
            let _ = write!(o, " by {}", ev.selectors.join(", "));
        }
    }
    if let Some(r) = &ev.reason {
        let _ = write!(o, ": {r}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(verdict: DnsVerdict) -> DnsEvent {
        DnsEvent {
            time: "2026-12-06T22:40:00Z".into(),
            verdict,
            endpoint: Some("shop/checkout-1".into()),
            client: "10.0.1.1:40000".parse().unwrap(),
            server: "10.0.9.53:53".parse().unwrap(),
            transport: "udp".into(),
            name: Some("api.stripe.com.".into()),
            qtype: Some("A".into()),
            answers: vec![],
            ttl: None,
            selectors: vec![],
            reason: None,
        }
    }

    #[test]
    fn lines_say_what_the_proxy_decided() {
        let mut a = ev(DnsVerdict::Allowed);
        a.answers = vec!["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()];
        a.ttl = Some(30);
        a.selectors = vec!["matchName: api.stripe.com.".into()];
        assert_eq!(
            format_dns_event(&a),
            "2026-12-06T22:40:00Z allowed  10.0.1.1:40000 -> 10.0.9.53:53 udp/53 shop/checkout-1 dns api.stripe.com. A => 192.0.2.1, 192.0.2.2 (ttl 30s) by matchName: api.stripe.com."
        );
        let mut r = ev(DnsVerdict::Refused);
        r.name = Some("evil.example.".into());
        r.reason = Some("no DNS rule of the endpoint allows this name".into());
        assert_eq!(
            format_dns_event(&r),
            "2026-12-06T22:40:00Z refused  10.0.1.1:40000 -> 10.0.9.53:53 udp/53 shop/checkout-1 dns evil.example. A: no DNS rule of the endpoint allows this name"
        );
        let mut d = ev(DnsVerdict::Dropped);
        d.client = "[fd00::1]:5353".parse().unwrap();
        d.server = "[fd00::53]:53".parse().unwrap();
        d.transport = "tcp".into();
        d.endpoint = None;
        (d.name, d.qtype) = (None, None);
        d.reason = Some("id_mismatch".into());
        assert_eq!(
            format_dns_event(&d),
            "2026-12-06T22:40:00Z dropped  [fd00::1]:5353 -> [fd00::53]:53 tcp/53 - dns - -: id_mismatch"
        );
        // The wire form reads back.
        let line = wire(&a);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["dns"]["verdict"], "allowed");
        let back: DnsEvent = serde_json::from_value(v["dns"].clone()).unwrap();
        assert_eq!(back, a);
    }
}

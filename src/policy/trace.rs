//! The offline verdict engine: decide a new connection between two endpoints (or
//! addresses) exactly as the datapath would, from the compiled entries only, and
//! explain which rule decided each direction.
//!
//! A flow is allowed when the sender's egress allows it (if the sender is a
//! registry endpoint) and the receiver's ingress allows it (if the receiver is
//! one); each direction is decided by [`super::lookup::decide`], never by
//! re-reading the rules. Traffic from an endpoint to itself is allowed (it never
//! reaches the datapath). An endpoint in audit mode passes a flow its policy would
//! deny and the direction is reported as `audit`; so is a direction the enforced
//! policies allow and a staged one would deny ("would deny once enforced").
//!
//! Pure; no I/O.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use super::lookup::{self, Outcome};
use super::types::{proto, Compiled, Direction, Identity, PolicyEntry, RuleRef};
use crate::api::model::EndpointKind;
use crate::policy::identity;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceError {
    #[error("unknown endpoint {0:?}: not an address and no registry endpoint has that name")]
    UnknownEndpoint(String),
    #[error("endpoint name {name:?} is ambiguous: {candidates}; use namespace/name")]
    Ambiguous { name: String, candidates: String },
}

/// One side of a flow, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Side {
    /// What the user wrote.
    pub input: String,
    /// The registry endpoint's slot, if the side is one.
    pub slot: Option<u32>,
    /// `namespace/name` or `name` of the endpoint.
    pub endpoint: Option<String>,
    pub namespace: Option<String>,
    pub kind: Option<EndpointKind>,
    /// The address given, if an address was given.
    pub address: Option<IpAddr>,
    pub identity: Identity,
    /// Human description of the identity (`reserved:world-ipv4`, `cidr 10.0.0.0/8`, ...).
    pub identity_name: String,
}

/// Why a direction was decided as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// An allow entry matched.
    Rule,
    /// A deny entry matched.
    DenyRule,
    DefaultDeny,
    /// No policy selects the endpoint in this direction.
    NoPolicy,
    /// Policies select it but none enables default deny and nothing denied.
    NoDefaultDeny,
    /// This side is not a registry endpoint: nothing is enforced for it.
    NotAnEndpoint,
    /// Source and destination are the same endpoint.
    SelfTraffic,
    /// Allowed; a staged policy's deny rule would deny it once enforced.
    StagedDenyRule,
    /// Allowed; a staged policy's default deny would deny it once enforced.
    StagedDefaultDeny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DirVerdict {
    Allowed,
    Denied,
    /// Would be denied, passes: the endpoint is in audit mode, or only a staged
    /// policy would deny it.
    Audit,
}

/// The decision of one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectionResult {
    pub direction: Direction,
    /// The endpoint whose policy was consulted (`namespace/name`), if any.
    pub endpoint: Option<String>,
    pub verdict: DirVerdict,
    pub reason: Reason,
    /// The rule behind the deciding entry.
    pub rule: Option<RuleRef>,
    pub entry: Option<PolicyEntry>,
    /// One-line explanation.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Denied,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TraceResult {
    pub verdict: Verdict,
    /// True when the flow passes only because of audit mode.
    pub audit: bool,
    pub from: Side,
    pub to: Side,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`.
    pub proto: String,
    pub proto_number: u8,
    /// Destination port, or the ICMP type.
    pub port: u16,
    pub egress: DirectionResult,
    pub ingress: DirectionResult,
}

/// Protocol name for messages.
pub fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::SCTP => "sctp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "icmpv6".into(),
        n => format!("proto{n}"),
    }
}

/// A human name for an identity.
pub fn identity_name(c: &Compiled, id: Identity) -> String {
    if let Some(n) = identity::reserved_name(id) {
        return format!("reserved:{n}");
    }
    if identity::is_cidr(id) {
        if let Some(e) = c.ipcache.iter().find(|e| e.identity == id) {
            return format!("cidr:{}", e.net);
        }
    }
    format!("identity {id}")
}

fn endpoint_display(c: &Compiled, slot: u32) -> String {
    let ep = &c.endpoints[slot as usize];
    match (&ep.kind, &ep.namespace) {
        (EndpointKind::Workload, Some(ns)) => format!("{ns}/{}", ep.name),
        _ => ep.name.to_string(),
    }
}

/// Resolve `namespace/name`, `name` or an IP address.
pub fn resolve_side(c: &Compiled, input: &str) -> Result<Side, TraceError> {
    if let Ok(addr) = input.parse::<IpAddr>() {
        if let Some(slot) = c.endpoint_by_ip(addr) {
            let mut s = endpoint_side(c, input, slot);
            s.address = Some(addr);
            return Ok(s);
        }
        let id = c.lookup_ip(addr);
        return Ok(Side {
            input: input.to_string(),
            slot: None,
            endpoint: None,
            namespace: None,
            kind: None,
            address: Some(addr),
            identity: id,
            identity_name: identity_name(c, id),
        });
    }
    let matches: Vec<u32> = match input.split_once('/') {
        Some((ns, name)) => c
            .endpoints
            .iter()
            .filter(|e| e.name == name && e.namespace.as_deref() == Some(ns))
            .map(|e| e.slot)
            .collect(),
        None => c
            .endpoints
            .iter()
            .filter(|e| e.name == input)
            .map(|e| e.slot)
            .collect(),
    };
    match matches.len() {
        0 => Err(TraceError::UnknownEndpoint(input.to_string())),
        1 => Ok(endpoint_side(c, input, matches[0])),
        _ => Err(TraceError::Ambiguous {
            name: input.to_string(),
            candidates: matches
                .iter()
                .map(|s| endpoint_display(c, *s))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The side for the endpoint in `slot` (`input` is what the user wrote).
pub fn endpoint_side(c: &Compiled, input: &str, slot: u32) -> Side {
    let ep = &c.endpoints[slot as usize];
    Side {
        input: input.to_string(),
        slot: Some(slot),
        endpoint: Some(endpoint_display(c, slot)),
        namespace: ep.namespace.as_deref().map(str::to_string),
        kind: Some(ep.kind),
        address: None,
        identity: ep.identity,
        identity_name: identity_name(c, ep.identity),
    }
}

fn rule_text(r: &RuleRef) -> String {
    if &*r.kind == "config" {
        return format!("the daemon config ({})", r.path);
    }
    format!(
        "{}{}{} {} ({}) {}",
        if r.default_deny {
            "the default deny of "
        } else {
            ""
        },
        if r.staged { "staged " } else { "" },
        r.kind,
        r.policy,
        r.file.display(),
        r.path
    )
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

fn judge(
    c: &Compiled,
    dir: Direction,
    at: Option<u32>,
    remote: Identity,
    proto_: u8,
    port: u16,
) -> DirectionResult {
    let Some(slot) = at else {
        return DirectionResult {
            direction: dir,
            endpoint: None,
            verdict: DirVerdict::Allowed,
            reason: Reason::NotAnEndpoint,
            rule: None,
            entry: None,
            message: format!(
                "allowed — not a registry endpoint, no {} policy applies",
                dir_name(dir)
            ),
        };
    };
    let name = endpoint_display(c, slot);
    let d = lookup::decide(c, slot, dir, remote, proto_, port);
    let rule = d.entry.and_then(|e| c.rules.get(e.rule as usize)).cloned();
    let rule_or_unknown = || {
        rule.as_ref()
            .map(rule_text)
            .unwrap_or_else(|| "an unknown rule".into())
    };
    let (reason, mut message) = match d.outcome {
        Outcome::AllowedByEntry => (
            Reason::Rule,
            format!("allowed by {}", rule_or_unknown()),
        ),
        Outcome::DeniedByEntry => (
            Reason::DenyRule,
            format!("denied by {}", rule_or_unknown()),
        ),
        Outcome::DefaultDeny => (
            Reason::DefaultDeny,
            format!("denied — default deny: a policy selects {name} for {} and no rule allows this", dir_name(dir)),
        ),
        Outcome::NotEnforced => {
            (Reason::NoPolicy, format!("allowed — no policy selects {name} for {}", dir_name(dir)))
        }
        Outcome::NoDefaultDeny => (
            Reason::NoDefaultDeny,
            format!(
                "allowed — no rule matched and the policies selecting {name} disable default deny for {}",
                dir_name(dir)
            ),
        ),
        Outcome::StagedDeny => (
            Reason::StagedDenyRule,
            format!("audit (passes): would deny once enforced — {}", rule_or_unknown()),
        ),
        Outcome::StagedDefaultDeny => (
            Reason::StagedDefaultDeny,
            format!(
                "audit (passes): would deny once enforced — {}: it selects {name} for {} and no rule allows this",
                rule_or_unknown(),
                dir_name(dir)
            ),
        ),
    };
    let mut verdict = if d.outcome.staged() {
        DirVerdict::Audit
    } else if d.allowed() {
        DirVerdict::Allowed
    } else {
        DirVerdict::Denied
    };
    if verdict == DirVerdict::Denied && c.endpoints[slot as usize].audit {
        verdict = DirVerdict::Audit;
        message = format!("audit (passes): {message}");
    }
    DirectionResult {
        direction: dir,
        endpoint: Some(name),
        verdict,
        reason,
        rule,
        entry: d.entry.cloned(),
        message,
    }
}

/// Decide a new connection `src → dst` on `proto_` / `port` (ICMP type for ICMP).
pub fn trace(c: &Compiled, src: &Side, dst: &Side, proto_: u8, port: u16) -> TraceResult {
    let (egress, ingress) = if src.slot.is_some() && src.slot == dst.slot {
        let mk = |dir: Direction| DirectionResult {
            direction: dir,
            endpoint: src.endpoint.clone(),
            verdict: DirVerdict::Allowed,
            reason: Reason::SelfTraffic,
            rule: None,
            entry: None,
            message: "allowed — traffic from an endpoint to itself".into(),
        };
        (mk(Direction::Egress), mk(Direction::Ingress))
    } else {
        (
            judge(c, Direction::Egress, src.slot, dst.identity, proto_, port),
            judge(c, Direction::Ingress, dst.slot, src.identity, proto_, port),
        )
    };
    let denied = egress.verdict == DirVerdict::Denied || ingress.verdict == DirVerdict::Denied;
    let audit =
        !denied && (egress.verdict == DirVerdict::Audit || ingress.verdict == DirVerdict::Audit);
    TraceResult {
        verdict: if denied {
            Verdict::Denied
        } else {
            Verdict::Allowed
        },
        audit,
        from: src.clone(),
        to: dst.clone(),
        proto: proto_name(proto_),
        proto_number: proto_,
        port,
        egress,
        ingress,
    }
}

impl TraceResult {
    /// The flow passes, and a staged policy would deny it once enforced (in
    /// some direction).
    pub fn staged(&self) -> bool {
        self.verdict == Verdict::Allowed
            && [&self.egress, &self.ingress]
                .iter()
                .any(|d| matches!(d.reason, Reason::StagedDenyRule | Reason::StagedDefaultDeny))
    }
}

/// Resolve both sides by text and trace.
pub fn trace_str(
    c: &Compiled,
    src: &str,
    dst: &str,
    proto_: u8,
    port: u16,
) -> Result<TraceResult, TraceError> {
    let s = resolve_side(c, src)?;
    let d = resolve_side(c, dst)?;
    Ok(trace(c, &s, &d, proto_, port))
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.slot, &self.kind) {
            (Some(_), Some(EndpointKind::Workload)) => {
                let name = self.endpoint.as_deref().unwrap_or("?");
                let short = name.rsplit_once('/').map(|(_, n)| n).unwrap_or(name);
                write!(
                    f,
                    "{short} ({})",
                    self.namespace.as_deref().unwrap_or("default")
                )
            }
            (Some(_), _) => write!(
                f,
                "{} (host endpoint)",
                self.endpoint.as_deref().unwrap_or("?")
            ),
            (None, _) => write!(f, "{} ({})", self.input, self.identity_name),
        }
    }
}

impl fmt::Display for TraceResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = match (self.verdict, self.audit) {
            (Verdict::Allowed, false) => "ALLOWED",
            (Verdict::Allowed, true) if self.staged() => {
                "ALLOWED (audit: would deny once the staged policy is enforced)"
            }
            (Verdict::Allowed, true) => "ALLOWED (audit)",
            (Verdict::Denied, _) => "DENIED",
        };
        writeln!(
            f,
            "{} -> {} {}/{}: {v}",
            self.from, self.to, self.proto, self.port
        )?;
        for d in [&self.egress, &self.ingress] {
            let who = d
                .endpoint
                .as_deref()
                .map(|n| n.rsplit_once('/').map(|(_, s)| s).unwrap_or(n).to_string());
            let who = who.unwrap_or_else(|| match d.direction {
                Direction::Egress => self.from.input.clone(),
                Direction::Ingress => self.to.input.clone(),
            });
            writeln!(f, "  {:<7} {}: {}", dir_name(d.direction), who, d.message)?;
        }
        Ok(())
    }
}

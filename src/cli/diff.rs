//! `netpolctl diff NEWDIR`: the flows whose verdict would change if the policies
//! in NEWDIR replaced the current policy directory, with the same registry and the
//! same node name.
//!
//! Flows are every ordered pair of registry endpoints × a port set that is
//! complete for the ports that matter: for each protocol, the policy entries of
//! both sets cut the port space into intervals on which every lookup is constant
//! ([`crate::policy::lookup`] is a longest-prefix match over port blocks), so one
//! port per interval that some entry covers, plus one port no entry covers (the
//! "other" port), decides every port. ICMP echo request (and ICMPv6 echo when
//! an endpoint has an IPv6 address) is always included. Verdicts come from
//! [`crate::policy::trace`], the same engine as `trace` and `matrix`.
//!
//! Owns only the flow enumeration and the report; no I/O beyond loading files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::common::{load_compiled, FileArgs};
use crate::api::model::EndpointKind;
use crate::policy::trace::{
    endpoint_side, proto_name, trace, DirVerdict, DirectionResult, Reason, Side, TraceResult,
    Verdict,
};
use crate::policy::types::{proto, Compiled, PolicyEntry};
use crate::text::count;

const DIFF_EXAMPLES: &str = "\
Examples:
  netpolctl diff ./netpol.d.new                  # against /etc/netpol.d
  netpolctl diff --policy-dir ./old ./new --endpoint-dir ./endpoints.d
  netpolctl diff ./new --json

Every ordered pair of registry endpoints is checked on every port that some
policy of either set names (one port per port range), one port no policy names
(\"other\"), and ICMP echo. A flow that passes now and that a staged policy
(netpol.io/audit: \"true\") would deny once enforced shows as \"allowed, would
deny once enforced\". Exit status: 0 nothing changes, 1 some verdict changes, 2
error (invalid files: every problem is printed).";

#[derive(Debug, Args)]
#[command(after_help = DIFF_EXAMPLES)]
pub struct DiffArgs {
    #[command(flatten)]
    pub files: FileArgs,
    /// The candidate policy directory to compare against the current one
    #[arg(value_name = "NEWDIR")]
    pub new_dir: PathBuf,
}

/// One protocol/port probe of the flow set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Probe {
    pub proto: u8,
    pub port: u16,
    /// True for the representative of the ports no entry names.
    pub other: bool,
}

/// The effective verdict of a flow, as the datapath reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Effective {
    Allowed,
    /// Passes only because of audit mode.
    Audit,
    /// Passes; a staged policy would deny it once enforced.
    Staged,
    Denied,
}

impl Effective {
    fn of(r: &TraceResult) -> Effective {
        match (r.verdict, r.audit) {
            (Verdict::Denied, _) => Effective::Denied,
            (Verdict::Allowed, true) if r.staged() => Effective::Staged,
            (Verdict::Allowed, true) => Effective::Audit,
            (Verdict::Allowed, false) => Effective::Allowed,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Effective::Allowed => "allowed",
            Effective::Audit => "audit",
            Effective::Staged => "allowed, would deny once enforced",
            Effective::Denied => "denied",
        }
    }
}

/// One flow whose verdict changes.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub from: String,
    pub to: String,
    pub proto: String,
    pub port: u16,
    /// The port stands for every port no policy names.
    pub other_port: bool,
    pub before: Effective,
    pub after: Effective,
    /// What decides the flow under the new policies.
    pub rule_after: String,
    /// What decided it under the current ones.
    pub rule_before: String,
}

#[derive(Debug, Serialize)]
struct DiffJson<'a> {
    current: String,
    new: String,
    endpoints: usize,
    probes: Vec<String>,
    flows_checked: usize,
    changed: usize,
    changes: &'a [Change],
}

/// The inclusive port range of an entry's block.
fn entry_range(e: &PolicyEntry) -> (u32, u32) {
    let size = 1u32 << (16 - u32::from(e.port_prefix.min(16)));
    let base = u32::from(e.port) & !(size - 1);
    (base, base + size - 1)
}

/// (endpoint, direction, identity, proto, verdict, rule) of an entry.
type GroupKey = (u32, u8, u32, u8, u8, u32);

/// The probes that decide every flow for both compiled states (see the module doc).
pub fn probes(states: &[&Compiled]) -> Vec<Probe> {
    // Per protocol: the port blocks named by entries, merged per (endpoint,
    // direction, identity, verdict, rule) so a range split into aligned blocks does
    // not add breakpoints inside it.
    let mut blocks: BTreeMap<u8, BTreeSet<(u32, u32)>> = BTreeMap::new();
    for c in states {
        let mut groups: BTreeMap<GroupKey, Vec<(u32, u32)>> = BTreeMap::new();
        for e in &c.entries {
            if e.proto == proto::ANY || e.port_prefix == 0 {
                continue; // covers every port of the protocol: no breakpoint
            }
            groups
                .entry((
                    e.endpoint,
                    e.direction as u8,
                    e.identity,
                    e.proto,
                    e.verdict as u8,
                    e.rule,
                ))
                .or_default()
                .push(entry_range(e));
        }
        for ((_, _, _, p, _, _), mut rs) in groups {
            rs.sort_unstable();
            let mut merged: Vec<(u32, u32)> = Vec::new();
            for (lo, hi) in rs {
                match merged.last_mut() {
                    Some(last) if lo <= last.1 + 1 => last.1 = last.1.max(hi),
                    _ => merged.push((lo, hi)),
                }
            }
            blocks.entry(p).or_default().extend(merged);
        }
    }
    let mut out: BTreeSet<Probe> = BTreeSet::new();
    let is_icmp = |p: u8| p == proto::ICMP || p == proto::ICMPV6;
    for (p, ranges) in &blocks {
        let covered = |port: u32| ranges.iter().any(|(lo, hi)| *lo <= port && port <= *hi);
        let mut points: BTreeSet<u32> = BTreeSet::new();
        for (lo, hi) in ranges {
            points.insert(*lo);
            points.insert(hi + 1);
        }
        for pt in points {
            if pt <= 65535 && covered(pt) && (pt != 0 || is_icmp(*p)) {
                out.insert(Probe {
                    proto: *p,
                    port: pt as u16,
                    other: false,
                });
            }
        }
        if !is_icmp(*p) {
            if let Some(o) = other_port(&|port| covered(u32::from(port))) {
                out.insert(Probe {
                    proto: *p,
                    port: o,
                    other: true,
                });
            }
        }
    }
    if !blocks.contains_key(&proto::TCP) {
        out.insert(Probe {
            proto: proto::TCP,
            port: other_port(&|_| false).unwrap_or(1),
            other: true,
        });
    }
    out.insert(Probe {
        proto: proto::ICMP,
        port: 8,
        other: false,
    });
    let v6 = states.iter().any(|c| {
        c.endpoints
            .iter()
            .any(|e| e.addresses.iter().any(|a| a.is_ipv6()))
    });
    if v6 {
        out.insert(Probe {
            proto: proto::ICMPV6,
            port: 128,
            other: false,
        });
    }
    out.into_iter().collect()
}

/// A port no entry names: a high port first (what a stray service would use),
/// then any.
fn other_port(covered: &dyn Fn(u16) -> bool) -> Option<u16> {
    (40000u16..=65535).chain(1..40000).find(|p| !covered(*p))
}

fn display_name(c: &Compiled, slot: u32) -> String {
    let e = &c.endpoints[slot as usize];
    match &e.namespace {
        Some(ns) if e.kind == EndpointKind::Workload => format!("{ns}/{}", e.name),
        _ => e.name.to_string(),
    }
}

fn sides(c: &Compiled) -> BTreeMap<String, Side> {
    c.endpoints
        .iter()
        .map(|e| {
            let n = display_name(c, e.slot);
            (n.clone(), endpoint_side(c, &n, e.slot))
        })
        .collect()
}

fn describe(d: &DirectionResult) -> String {
    let who = d.endpoint.as_deref().unwrap_or("?");
    let dir = match d.direction {
        crate::policy::types::Direction::Ingress => "ingress",
        crate::policy::types::Direction::Egress => "egress",
    };
    match (d.reason, &d.rule) {
        (Reason::Rule | Reason::DenyRule, Some(r)) => {
            let what = if d.reason == Reason::Rule {
                "allow"
            } else {
                "deny"
            };
            format!(
                "{dir} of {who}: {what} {} {} {}",
                r.policy,
                r.file.display(),
                r.path
            )
        }
        (Reason::StagedDenyRule, Some(r)) => format!(
            "{dir} of {who}: would deny once enforced: staged {} {} {}",
            r.policy,
            r.file.display(),
            r.path
        ),
        (Reason::StagedDefaultDeny, Some(r)) => format!(
            "{dir} of {who}: would deny once enforced: default deny of staged {} {}",
            r.policy,
            r.file.display()
        ),
        (Reason::DefaultDeny, _) => format!("{dir} of {who}: default deny"),
        (Reason::NoPolicy, _) => format!("{dir} of {who}: no policy"),
        (Reason::NoDefaultDeny, _) => format!("{dir} of {who}: default deny disabled"),
        (Reason::SelfTraffic, _) => "self".into(),
        _ => format!("{dir} of {who}: {}", d.message),
    }
}

/// What decides a flow: for a denial the denying direction(s), for an allowed flow
/// the directions allowed by a rule (or, failing that, by having no policy).
pub fn deciding_rule(r: &TraceResult) -> String {
    let dirs = [&r.egress, &r.ingress];
    let pick: Vec<&DirectionResult> = match r.verdict {
        Verdict::Denied => dirs
            .iter()
            .copied()
            .filter(|d| d.verdict == DirVerdict::Denied)
            .collect(),
        Verdict::Allowed => {
            let ruled: Vec<_> = dirs
                .iter()
                .copied()
                .filter(|d| d.reason == Reason::Rule || d.verdict == DirVerdict::Audit)
                .collect();
            if ruled.is_empty() {
                dirs.iter()
                    .copied()
                    .filter(|d| d.reason != Reason::NotAnEndpoint)
                    .take(1)
                    .collect()
            } else {
                ruled
            }
        }
    };
    pick.iter()
        .map(|d| describe(d))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every flow whose effective verdict differs between `before` and `after`, and
/// the number of flows checked. Endpoints are matched by name (same registry).
pub fn changes(before: &Compiled, after: &Compiled, probes: &[Probe]) -> (Vec<Change>, usize) {
    let b = sides(before);
    let a = sides(after);
    let mut out = Vec::new();
    let mut checked = 0;
    for (sname, s_after) in &a {
        let Some(s_before) = b.get(sname) else {
            continue;
        };
        for (dname, d_after) in &a {
            if sname == dname {
                continue;
            }
            let Some(d_before) = b.get(dname) else {
                continue;
            };
            for p in probes {
                checked += 1;
                let rb = trace(before, s_before, d_before, p.proto, p.port);
                let ra = trace(after, s_after, d_after, p.proto, p.port);
                let (eb, ea) = (Effective::of(&rb), Effective::of(&ra));
                if eb != ea {
                    out.push(Change {
                        from: sname.clone(),
                        to: dname.clone(),
                        proto: proto_name(p.proto),
                        port: p.port,
                        other_port: p.other,
                        before: eb,
                        after: ea,
                        rule_after: deciding_rule(&ra),
                        rule_before: deciding_rule(&rb),
                    });
                }
            }
        }
    }
    (out, checked)
}

fn probe_text(p: &Probe) -> String {
    format!(
        "{}/{}{}",
        proto_name(p.proto),
        p.port,
        if p.other { " (other)" } else { "" }
    )
}

pub fn run(args: &DiffArgs) -> anyhow::Result<i32> {
    let cfg = args.files.resolve()?;
    let Some(before) = load_compiled(&args.files)? else {
        eprintln!(
            "netpolctl diff: the current files ({}) are invalid",
            cfg.policy_dir.display()
        );
        return Ok(2);
    };
    if !args.new_dir.is_dir() {
        eprintln!(
            "netpolctl diff: {}: not a directory",
            args.new_dir.display()
        );
        return Ok(2);
    }
    let mut new_files = args.files.clone();
    new_files.policy_dir = Some(args.new_dir.clone());
    let Some(after) = load_compiled(&new_files)? else {
        eprintln!(
            "netpolctl diff: the new policies ({}) are invalid",
            args.new_dir.display()
        );
        return Ok(2);
    };
    let probes = probes(&[&before, &after]);
    let (changes, checked) = changes(&before, &after, &probes);
    if args.files.json {
        let out = DiffJson {
            current: cfg.policy_dir.display().to_string(),
            new: args.new_dir.display().to_string(),
            endpoints: after.endpoints.len(),
            probes: probes.iter().map(probe_text).collect(),
            flows_checked: checked,
            changed: changes.len(),
            changes: &changes,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if changes.is_empty() {
        println!(
            "no verdict changes: {} checked ({}; {})",
            count(checked, "flow", "flows"),
            count(after.endpoints.len(), "endpoint", "endpoints"),
            probes.iter().map(probe_text).collect::<Vec<_>>().join(", ")
        );
    } else {
        let rows: Vec<[String; 5]> = changes
            .iter()
            .map(|c| {
                [
                    c.from.clone(),
                    c.to.clone(),
                    format!(
                        "{}/{}{}",
                        c.proto,
                        c.port,
                        if c.other_port { "*" } else { "" }
                    ),
                    format!("{} → {}", c.before.as_str(), c.after.as_str()),
                    c.rule_after.clone(),
                ]
            })
            .collect();
        let head = [
            "SOURCE",
            "DESTINATION",
            "PROTO/PORT",
            "BEFORE → AFTER",
            "DECIDED BY (AFTER)",
        ];
        let mut w = [0usize; 4];
        for (i, wi) in w.iter_mut().enumerate() {
            *wi = rows
                .iter()
                .map(|r| r[i].chars().count())
                .chain([head[i].chars().count()])
                .max()
                .unwrap_or(0);
        }
        let line = |r: [&str; 5]| {
            let mut s = String::new();
            for i in 0..4 {
                s.push_str(r[i]);
                s.push_str(&" ".repeat(w[i] - r[i].chars().count() + 2));
            }
            s.push_str(r[4]);
            s
        };
        println!("{}", line(head));
        for r in &rows {
            println!("{}", line([&r[0], &r[1], &r[2], &r[3], &r[4]]));
        }
        println!(
            "{} of {checked} flows change{}",
            changes.len(),
            if changes.iter().any(|c| c.other_port) {
                " (* = stands for every port no policy names)"
            } else {
                ""
            }
        );
    }
    Ok(if changes.is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::types::{Direction, EntryVerdict};

    fn entry(proto_: u8, port: u16, prefix: u8) -> PolicyEntry {
        PolicyEntry {
            endpoint: 0,
            direction: Direction::Ingress,
            identity: 5,
            proto: proto_,
            port,
            port_prefix: prefix,
            verdict: EntryVerdict::Allow,
            rule: 0,
        }
    }

    #[test]
    fn a_range_split_into_blocks_gives_one_probe_and_other() {
        let mut c = Compiled::default();
        for (base, prefix) in crate::policy::compile::port_range_blocks(80, 444) {
            c.entries.push(entry(proto::TCP, base, prefix));
        }
        c.entries.push(entry(proto::UDP, 53, 16));
        let ps = probes(&[&c]);
        let tcp: Vec<_> = ps.iter().filter(|p| p.proto == proto::TCP).collect();
        assert_eq!(tcp.len(), 2, "{ps:?}");
        assert_eq!((tcp[0].port, tcp[0].other), (80, false));
        assert!(tcp[1].other && !(80..=444).contains(&tcp[1].port));
        assert!(ps
            .iter()
            .any(|p| p.proto == proto::UDP && p.port == 53 && !p.other));
        assert!(ps.iter().any(|p| p.proto == proto::UDP && p.other));
        assert!(ps.iter().any(|p| p.proto == proto::ICMP && p.port == 8));
    }

    #[test]
    fn overlapping_ranges_give_every_interval() {
        let mut a = Compiled::default();
        a.entries.push(entry(proto::TCP, 0, 0));
        for (base, prefix) in crate::policy::compile::port_range_blocks(1000, 2000) {
            a.entries.push(entry(proto::TCP, base, prefix));
        }
        let mut b = Compiled::default();
        b.entries.push(entry(proto::TCP, 1500, 16));
        let ps = probes(&[&a, &b]);
        let ports: Vec<u16> = ps
            .iter()
            .filter(|p| p.proto == proto::TCP && !p.other)
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, vec![1000, 1500, 1501]);
    }
}

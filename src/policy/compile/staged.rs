//! Staged policies in compile (docs/policy.md, "Staged policies"): a policy
//! annotated `netpol.io/audit: "true"` is compiled with the others, and its
//! entries are folded into one set of entries that the lookup contract
//! (`crate::policy::lookup`) reads so that
//! - every flow gets the verdict the enforced policies alone give it: a staged
//!   policy never denies, and never allows what the enforced ones deny;
//! - a flow the enforced policies allow and the staged ones would deny (by a
//!   deny rule, or by the default deny a staged rule brings) passes as audit,
//!   reported with the staged rule.
//!
//! Decided here, in one place: which staged allows count (only where a staged
//! default deny applies and the enforced policies bring none, as exceptions to
//! it), and the verdict of every key of a group from the entries that cover
//! it. Owns nothing else; the parent expands items as for any policy.

use std::collections::BTreeMap;

use super::{PolicySet, PortKey, RuleInfo, RuleRef, TEntry, ANY_KEY};
use crate::api::model::Rule;
use crate::policy::identity;
use crate::policy::types::{Direction, EntryVerdict};

/// Whether a rule brings default deny in each direction (ingress, egress), as
/// Cilium decides it: a rule in that direction, unless enableDefaultDeny turns
/// it off.
fn default_deny_of(r: &Rule) -> [bool; 2] {
    let has_in = !r.ingress.is_empty() || !r.ingress_deny.is_empty() || r.isolate_ingress;
    let has_eg = !r.egress.is_empty() || !r.egress_deny.is_empty() || r.isolate_egress;
    [
        has_in && r.default_deny_ingress.unwrap_or(true),
        has_eg && r.default_deny_egress.unwrap_or(true),
    ]
}

/// A rule ref for the default deny of each staged rule that brings one, in
/// rule order, appended to `refs`; its index goes to the rule's
/// `default_deny_refs`. `rules` are those of `policies`, in order.
pub(super) fn default_deny_refs(
    policies: &PolicySet,
    rules: &mut [RuleInfo<'_>],
    refs: &mut Vec<RuleRef>,
) {
    let all = policies
        .policies
        .iter()
        .flat_map(|p| p.rules.iter().map(move |r| (p, r)));
    for ((pol, rule), info) in all.zip(rules.iter_mut()) {
        if !pol.staged {
            continue;
        }
        for (dir, dd) in default_deny_of(rule).into_iter().enumerate() {
            if dd {
                info.default_deny_refs[dir] = Some(refs.len() as u32);
                refs.push(RuleRef {
                    file: pol.origin.file.clone(),
                    kind: pol.origin.kind.as_str().into(),
                    policy: super::policy_name(&pol.origin).into(),
                    path: rule.path.as_str().into(),
                    staged: true,
                    default_deny: true,
                });
            }
        }
    }
}

/// The staged rules selecting one group of endpoints.
#[derive(Debug, Default)]
pub(super) struct Staged {
    /// The default deny of the first staged rule that brings one, per
    /// direction (ingress, egress).
    default_deny: [Option<u32>; 2],
}

/// What the entries with one key say, before they are folded (lowest rule of
/// each part).
#[derive(Debug, Default, Clone, Copy)]
struct At {
    deny: Option<u32>,
    /// Enforced allows, and the staged allows that count.
    allow: Option<u32>,
    staged_deny: Option<u32>,
    staged_default: Option<u32>,
}

impl Staged {
    /// A staged rule of the group, with its default deny refs.
    pub(super) fn note(&mut self, refs: [Option<u32>; 2]) {
        for (mine, r) in self.default_deny.iter_mut().zip(refs) {
            if mine.is_none() {
                *mine = r;
            }
        }
    }

    /// Some staged rule of the group brings default deny.
    pub(super) fn any(&self) -> bool {
        self.default_deny.iter().any(Option::is_some)
    }

    /// Fold the raw entries of a group (enforced and staged, deduplicated or
    /// not) into the entries the lookup reads. `enforced_default_deny` is the
    /// group's default deny under the enforced rules (ingress, egress).
    pub(super) fn finish(&self, raw: &mut Vec<TEntry>, enforced_default_deny: [bool; 2]) {
        let staged_default = |d: Direction| {
            let i = d as usize;
            self.default_deny[i].filter(|_| !enforced_default_deny[i])
        };
        // A staged allow counts only as an exception to a staged default deny
        // that the enforced rules do not bring: there every flow no enforced
        // deny drops passes anyway, so it opens nothing. Elsewhere it would
        // open what the enforced default deny drops, or change nothing.
        raw.retain(|e| {
            !(e.staged && e.verdict == EntryVerdict::Allow) || staged_default(e.dir).is_some()
        });
        for dir in [Direction::Ingress, Direction::Egress] {
            if let Some(rule) = staged_default(dir) {
                raw.push(TEntry {
                    dir,
                    id: identity::ANY,
                    key: ANY_KEY,
                    verdict: EntryVerdict::StagedDefaultDeny,
                    rule,
                    staged: true,
                });
            }
        }
        raw.sort_unstable_by_key(|e| (e.dir, e.id));
        let mut out = Vec::with_capacity(raw.len());
        for group in raw.chunk_by(|a, b| (a.dir, a.id) == (b.dir, b.id)) {
            fold_group(group, &mut out);
        }
        *raw = out;
    }
}

/// The keys that cover `k` under the lookup's longest-prefix match, longest
/// first: `k`, the blocks of its protocol with shorter prefixes, any protocol.
fn covering(k: PortKey) -> impl Iterator<Item = PortKey> {
    let shorter = (0..k.prefix)
        .rev()
        .filter(move |_| k.proto != 0)
        .map(move |p| PortKey {
            proto: k.proto,
            port: if p == 0 {
                0
            } else {
                k.port & !(0xFFFFu16 >> p)
            },
            prefix: p,
        });
    let any = Some(ANY_KEY).filter(|_| k != ANY_KEY);
    std::iter::once(k).chain(shorter).chain(any)
}

/// One (direction, identity) group: each key gets the verdict of everything
/// that covers it, so the longest match alone answers for every packet it
/// covers (every entry covering a packet covers the longest key covering it).
/// An enforced deny decides wherever it covers: the keys it covers go, as
/// [`super::finish_entries`] drops the allows it covers.
fn fold_group(group: &[TEntry], out: &mut Vec<TEntry>) {
    let (dir, id) = (group[0].dir, group[0].id);
    let mut at: BTreeMap<PortKey, At> = BTreeMap::new();
    for e in group {
        let a = at.entry(e.key).or_default();
        let part = match (e.verdict, e.staged) {
            (EntryVerdict::Deny, false) => &mut a.deny,
            (EntryVerdict::Allow, _) => &mut a.allow,
            (EntryVerdict::Deny, true) => &mut a.staged_deny,
            (EntryVerdict::StagedDefaultDeny, _) => &mut a.staged_default,
            // Never raw: these are what this function writes.
            (EntryVerdict::StagedDeny | EntryVerdict::AllowStagedDeny, _) => continue,
        };
        *part = Some(part.map_or(e.rule, |r| r.min(e.rule)));
    }
    for (&key, own) in &at {
        let first =
            |part: fn(&At) -> Option<u32>| covering(key).find_map(|k| at.get(&k).and_then(part));
        if let Some(rule) = own.deny {
            out.push(TEntry {
                dir,
                id,
                key,
                verdict: EntryVerdict::Deny,
                rule,
                staged: false,
            });
            continue;
        }
        if first(|a| a.deny).is_some() {
            continue;
        }
        let (verdict, rule) = match (first(|a| a.allow), first(|a| a.staged_deny)) {
            (Some(_), Some(s)) => (EntryVerdict::AllowStagedDeny, s),
            (None, Some(s)) => (EntryVerdict::StagedDeny, s),
            (Some(a), None) => (EntryVerdict::Allow, own.allow.unwrap_or(a)),
            (None, None) => match first(|a| a.staged_default) {
                Some(r) => (EntryVerdict::StagedDefaultDeny, r),
                None => continue,
            },
        };
        out.push(TEntry {
            dir,
            id,
            key,
            verdict,
            rule,
            staged: false,
        });
    }
}

/// Deduplicate raw entries that may be staged (the same key, verdict and
/// origin keep the lowest rule) without folding them; the number of distinct
/// keys, which bounds what [`Staged::finish`] makes of them (but for its one
/// default deny entry per direction).
pub(super) fn compact(raw: &mut Vec<TEntry>) -> usize {
    raw.sort_unstable_by_key(|e| (e.dir, e.id, e.key, e.verdict, e.staged, e.rule));
    raw.dedup_by_key(|e| (e.dir, e.id, e.key, e.verdict, e.staged));
    raw.chunk_by(|a, b| (a.dir, a.id, a.key) == (b.dir, b.id, b.key))
        .count()
}

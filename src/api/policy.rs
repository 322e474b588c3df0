//! Policy documents → [`model::Rule`]s: Cilium's validation (`rule_validation.go`)
//! and Kubernetes' translation (`ParseToCiliumRule`, `ParseNetworkPolicy`),
//! including the implicit namespace scoping of selectors (docs/policy.md,
//! "Semantics").
//!
//! Errors are collected in a [`Ctx`] as (field path, message) pairs; a document
//! keeps being validated after its first error so the user sees all of them.
//! Warnings (accepted, but a Cilium cluster would refuse or read it otherwise;
//! see `api::warn`) go beside them.
//!
//! What is accepted follows a Cilium cluster: the CRD schema
//! (cilium/cilium pkg/k8s/apis/cilium.io/client/crds/v2/ciliumnetworkpolicies.yaml),
//! the agent's `Validate` (pkg/policy/api/rule_validation.go) and, for
//! NetworkPolicy, Kubernetes (kubernetes/kubernetes
//! pkg/apis/networking/validation/validation.go). Each rule names its source;
//! docs/policy.md lists where netpol deliberately differs.

use super::de::{IntOrString, Present};
use super::model::{
    DnsRule, FqdnSelector, IcmpType, ItemSource, LabelKey, Op, Peer, Peers, PortProto, PortSpec,
    Proto, Requirement, Rule, RuleItem, Selector, Subject, Values, L4,
};
use super::raw::{
    RawCidrRule, RawFqdnSelector, RawIcmpRule, RawL7Rules, RawNpPeer, RawNpPort, RawNpSpec,
    RawPortRule, RawRule, RawSelector,
};
use super::validate::{self as v, NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_LABEL};
use super::warn::WarningCode;
use super::yaml::{join_index, join_key};

/// Problems of one document: (field path, message), and its warnings.
#[derive(Debug, Default)]
pub struct Ctx {
    pub errors: Vec<(String, String)>,
    /// (code, field path, message).
    pub warnings: Vec<(WarningCode, String, String)>,
    /// Where the parts of each valid rule item were written, by item path.
    pub sources: Vec<(String, ItemSource)>,
}

impl Ctx {
    pub fn err(&mut self, path: impl Into<String>, msg: impl Into<String>) {
        self.errors.push((path.into(), msg.into()));
    }
    pub fn warn(&mut self, code: WarningCode, path: impl Into<String>, msg: impl Into<String>) {
        self.warnings.push((code, path.into(), msg.into()));
    }
}

/// `metadata.name` of a policy: a DNS subdomain, as the API server requires of
/// every custom resource (k8s.io/apiextensions-apiserver
/// pkg/registry/customresource/validator.go: `NameIsDNSSubdomain`) and of a
/// NetworkPolicy (pkg/apis/networking/validation/validation.go:
/// `ValidateNetworkPolicyName`). An empty name, and one the registry rule
/// refuses too ('/', whitespace), is reported by the caller.
pub fn object_name(ctx: &mut Ctx, name: &str) {
    if v::object_name(name).is_ok() {
        if let Err(e) = v::dns_subdomain_name(name) {
            ctx.err("metadata.name", e);
        }
    }
}

const MAX_PORTS: usize = 40;
const MAX_ICMP_FIELDS: usize = 40;

/// Why a field netpol parses is rejected. Every one of these would, if ignored,
/// enforce something other than what the user wrote.
pub fn rejected_message(field: &str) -> String {
    match field {
        "http" | "kafka" | "l7proto" | "l7" => format!("{field} rules need Cilium's L7 proxy (Envoy), which netpol does not have; enforcing only the ports would allow every request on them, so the rule is rejected — remove `rules` to allow the whole port (netpol's L7 rules are dns only)"),
        "toServices" => "toServices needs Kubernetes Services, which netpol does not have; select the backends with toEndpoints or toCIDR instead".into(),
        "toGroups" | "fromGroups" => format!("{field} needs a cloud provider integration, which netpol does not have; list the addresses with {} instead", if field == "toGroups" { "toCIDR or toCIDRSet" } else { "fromCIDR or fromCIDRSet" }),
        "toNodes" | "fromNodes" => format!("{field} needs Cilium's node label selection, which netpol does not have; use {} instead", if field == "toNodes" { "toEntities [remote-node, host] or toCIDR" } else { "fromEntities [remote-node, host] or fromCIDR" }),
        "toRequires" | "fromRequires" => format!("{field} was removed from Cilium (1.19) and is not supported; add the requirements to each {} selector instead", if field == "toRequires" { "toEndpoints" } else { "fromEndpoints" }),
        "authentication" => "authentication needs Cilium's mutual authentication (SPIFFE), which netpol does not have; ignoring it would allow unauthenticated peers".into(),
        "serverNames" => "serverNames (TLS SNI matching) needs Cilium's L7 proxy, which netpol does not have; enforcing only the ports would allow every server name".into(),
        "terminatingTLS" | "originatingTLS" => format!("{field} needs Cilium's L7 proxy, which netpol does not have"),
        "listener" => "listener needs Cilium's Envoy proxy (CiliumEnvoyConfig), which netpol does not have".into(),
        "cidrGroupRef" | "cidrGroupSelector" => format!("{field} needs CiliumCIDRGroup objects, which netpol does not read; write the prefixes in cidr instead"),
        "log" => "log needs Hubble, which netpol does not have; remove it".into(),
        other => format!("{other} is not supported by netpol"),
    }
}

fn reject(ctx: &mut Ctx, path: &str, field: &str, present: Option<Present>) {
    if present.is_some() {
        ctx.err(join_key(path, field), rejected_message(field));
    }
}

// ---------------------------------------------------------------- selectors

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyMode {
    /// CiliumNetworkPolicy selectors: `source:key` prefixes allowed, plain = any source.
    Cilium,
    /// Kubernetes podSelector: plain keys, source `k8s`.
    K8sPod,
    /// Kubernetes namespaceSelector: plain keys, mapped to Cilium's namespace labels.
    K8sNamespace,
}

/// Convert and validate a selector. Returns the selector and the keys written in
/// matchLabels (Cilium overwrites some of those).
fn selector(ctx: &mut Ctx, path: &str, raw: &RawSelector, mode: KeyMode) -> Selector {
    let mut reqs = Vec::new();
    let key_of = |ctx: &mut Ctx, kpath: &str, raw_key: &str| -> Option<LabelKey> {
        match mode {
            KeyMode::Cilium => match v::cilium_selector_key(raw_key) {
                Ok(k) => Some(k),
                Err(e) => {
                    ctx.err(kpath, e);
                    None
                }
            },
            KeyMode::K8sPod | KeyMode::K8sNamespace => match v::qualified_name(raw_key) {
                Ok(()) => Some(if mode == KeyMode::K8sPod {
                    LabelKey {
                        source: Some("k8s".into()),
                        key: raw_key.into(),
                    }
                } else {
                    LabelKey {
                        source: Some("k8s".into()),
                        key: format!("{NAMESPACE_LABELS_PREFIX}{raw_key}").into(),
                    }
                }),
                Err(e) => {
                    ctx.err(kpath, e);
                    None
                }
            },
        }
    };
    if let Some(ml) = &raw.match_labels {
        let mpath = join_key(path, "matchLabels");
        for (k, val) in ml {
            let kpath = join_key(&mpath, k);
            let key = key_of(ctx, &kpath, k);
            if let Err(e) = v::label_value(val) {
                ctx.err(&kpath, e);
                continue;
            }
            if let Some(key) = key {
                reqs.push(Requirement {
                    key,
                    op: Op::In,
                    values: Values::from([val.clone()]),
                });
            }
        }
    }
    if let Some(exprs) = &raw.match_expressions {
        let epath = join_key(path, "matchExpressions");
        for (i, e) in exprs.iter().enumerate() {
            let p = join_index(&epath, i);
            let key = key_of(ctx, &join_key(&p, "key"), &e.key);
            let op = match e.operator.as_str() {
                "In" => Some(Op::In),
                "NotIn" => Some(Op::NotIn),
                "Exists" => Some(Op::Exists),
                "DoesNotExist" => Some(Op::DoesNotExist),
                other => {
                    let hint = match other.to_ascii_lowercase().as_str() {
                        "in" => " (did you mean \"In\"? operators are case-sensitive)".to_string(),
                        "notin" => {
                            " (did you mean \"NotIn\"? operators are case-sensitive)".to_string()
                        }
                        "exists" => {
                            " (did you mean \"Exists\"? operators are case-sensitive)".to_string()
                        }
                        "doesnotexist" => {
                            " (did you mean \"DoesNotExist\"? operators are case-sensitive)"
                                .to_string()
                        }
                        _ => String::new(),
                    };
                    ctx.err(
                        join_key(&p, "operator"),
                        format!("{other:?} is not a valid operator{hint}; use In, NotIn, Exists or DoesNotExist"),
                    );
                    None
                }
            };
            let values = e.values.clone().unwrap_or_default();
            let vpath = join_key(&p, "values");
            let mut ok = true;
            for (j, val) in values.iter().enumerate() {
                if let Err(msg) = v::label_value(val) {
                    ctx.err(join_index(&vpath, j), msg);
                    ok = false;
                }
            }
            match op {
                Some(o @ (Op::In | Op::NotIn)) if values.is_empty() => {
                    ctx.err(&vpath, format!("operator {o:?} needs at least one value"));
                    ok = false;
                }
                Some(o @ (Op::Exists | Op::DoesNotExist)) if !values.is_empty() => {
                    ctx.err(
                        &vpath,
                        format!("operator {o:?} takes no values; remove values or use In/NotIn"),
                    );
                    ok = false;
                }
                _ => {}
            }
            if let (Some(key), Some(op), true) = (key, op, ok) {
                reqs.push(Requirement {
                    key,
                    op,
                    values: values.into_iter().collect(),
                });
            }
        }
    }
    Selector { requirements: reqs }
}

fn is_k8s_or_any(k: &LabelKey) -> bool {
    matches!(k.source.as_deref(), None | Some("k8s"))
}

fn ns_in(ns: &str) -> Requirement {
    Requirement {
        key: LabelKey {
            source: Some("k8s".into()),
            key: POD_NAMESPACE_LABEL.into(),
        },
        op: Op::In,
        values: Values::from([ns.to_string()]),
    }
}

fn ns_exists() -> Requirement {
    Requirement {
        key: LabelKey {
            source: Some("k8s".into()),
            key: POD_NAMESPACE_LABEL.into(),
        },
        op: Op::Exists,
        values: Values::default(),
    }
}

/// `getEndpointSelector` of Cilium's `ParseToCiliumRule` for fromEndpoints/toEndpoints.
fn scope_peer(sel: &mut Selector, ns: Option<&str>, matches_init: bool) {
    let reqs = &sel.requirements;
    if reqs
        .iter()
        .any(|r| r.key.source.as_deref() == Some("reserved"))
    {
        return;
    }
    if reqs
        .iter()
        .any(|r| is_k8s_or_any(&r.key) && r.key.key == POD_NAMESPACE_LABEL)
    {
        return;
    }
    match ns {
        None => {
            if !matches_init {
                sel.requirements.push(ns_exists());
            }
        }
        Some(ns) => {
            if !reqs
                .iter()
                .any(|r| is_k8s_or_any(&r.key) && r.key.key.starts_with(NAMESPACE_LABELS_PREFIX))
            {
                sel.requirements.push(ns_in(ns));
            }
        }
    }
}

/// A namespaced subject selector: the policy's namespace replaces any
/// `k8s:io.kubernetes.pod.namespace` written in matchLabels (as Cilium does).
fn scope_subject(sel: &mut Selector, ns: &str) {
    sel.requirements.retain(|r| {
        !(r.key.source.as_deref() == Some("k8s")
            && r.key.key == POD_NAMESPACE_LABEL
            && r.op == Op::In
            && r.values.len() == 1)
    });
    sel.requirements.push(ns_in(ns));
}

// ---------------------------------------------------------------- Cilium rules

/// Translate one CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy rule.
/// `ns` is the policy's namespace (`None` for clusterwide).
pub fn cilium_rule(ctx: &mut Ctx, path: &str, raw: &RawRule, ns: Option<&str>) -> Option<Rule> {
    let before = ctx.errors.len();
    let subject = match (&raw.endpoint_selector, &raw.node_selector) {
        (Some(_), Some(_)) => {
            ctx.err(
                path,
                "a rule must have exactly one of endpointSelector or nodeSelector, not both",
            );
            None
        }
        (None, None) => {
            ctx.err(
                path,
                if ns.is_some() {
                    "a rule needs an endpointSelector (use {} to select every endpoint of the namespace)"
                } else {
                    "a rule needs an endpointSelector or a nodeSelector (use {} to select everything)"
                },
            );
            None
        }
        (Some(es), None) => {
            let mut sel = selector(
                ctx,
                &join_key(path, "endpointSelector"),
                es,
                KeyMode::Cilium,
            );
            if let Some(ns) = ns {
                scope_subject(&mut sel, ns);
            }
            Some(Subject::Endpoints(sel))
        }
        (None, Some(nsel)) => {
            if ns.is_some() {
                ctx.err(
                    join_key(path, "nodeSelector"),
                    "nodeSelector is only allowed in a CiliumClusterwideNetworkPolicy (host policies are clusterwide)",
                );
                None
            } else {
                Some(Subject::Nodes(selector(
                    ctx,
                    &join_key(path, "nodeSelector"),
                    nsel,
                    KeyMode::Cilium,
                )))
            }
        }
    };
    // Cilium: peer selectors of a clusterwide rule whose subject selects
    // `reserved:init` endpoints get no namespace requirement.
    let matches_init = raw.endpoint_selector.as_ref().is_some_and(|es| {
        let has = |k: &str| {
            let lk = v::selector_key(k);
            lk.source.as_deref() == Some("reserved") && lk.key == "init"
        };
        es.match_labels
            .as_ref()
            .is_some_and(|m| m.keys().any(|k| has(k)))
            || es
                .match_expressions
                .as_ref()
                .is_some_and(|m| m.iter().any(|e| has(&e.key)))
    });

    let mut ingress = Vec::new();
    let mut ingress_deny = Vec::new();
    let mut egress = Vec::new();
    let mut egress_deny = Vec::new();
    for (field, deny) in [("ingress", false), ("ingressDeny", true)] {
        let list = if deny {
            &raw.ingress_deny
        } else {
            &raw.ingress
        };
        let out = if deny {
            &mut ingress_deny
        } else {
            &mut ingress
        };
        for (i, item) in list.iter().flatten().enumerate() {
            let p = join_index(&join_key(path, field), i);
            let view = ItemView {
                endpoints: ("fromEndpoints", item.from_endpoints.as_ref()),
                cidr: ("fromCIDR", item.from_cidr.as_ref()),
                cidr_set: ("fromCIDRSet", item.from_cidr_set.as_ref()),
                entities: ("fromEntities", item.from_entities.as_ref()),
                rejected: vec![
                    ("fromRequires", item.from_requires),
                    ("fromNodes", item.from_nodes),
                    ("fromGroups", item.from_groups),
                ],
                authentication: item.authentication,
                fqdns: None,
                to_ports: item.to_ports.as_ref(),
                icmps: item.icmps.as_ref(),
                deny,
                ingress: true,
            };
            if let Some(ri) = rule_item(ctx, &p, view, ns, matches_init) {
                out.push(ri);
            }
        }
    }
    for (field, deny) in [("egress", false), ("egressDeny", true)] {
        let list = if deny { &raw.egress_deny } else { &raw.egress };
        let out = if deny { &mut egress_deny } else { &mut egress };
        for (i, item) in list.iter().flatten().enumerate() {
            let p = join_index(&join_key(path, field), i);
            let view = ItemView {
                endpoints: ("toEndpoints", item.to_endpoints.as_ref()),
                cidr: ("toCIDR", item.to_cidr.as_ref()),
                cidr_set: ("toCIDRSet", item.to_cidr_set.as_ref()),
                entities: ("toEntities", item.to_entities.as_ref()),
                rejected: vec![
                    ("toRequires", item.to_requires),
                    ("toNodes", item.to_nodes),
                    ("toGroups", item.to_groups),
                    ("toServices", item.to_services),
                ],
                authentication: item.authentication,
                fqdns: item.to_fqdns.as_ref(),
                to_ports: item.to_ports.as_ref(),
                icmps: item.icmps.as_ref(),
                deny,
                ingress: false,
            };
            if let Some(ri) = rule_item(ctx, &p, view, ns, matches_init) {
                out.push(ri);
            }
        }
    }
    // Cilium >= 1.17 `Rule.Validate` (pkg/policy/api/rule_validation.go): "rule
    // must have at least one of Ingress, IngressDeny, Egress, EgressDeny"; the
    // CRD's `anyOf` only asks for one of the keys, so `ingress: []` gets past it
    // and the agent drops the whole policy.
    let entries = [
        raw.ingress.as_ref().map_or(0, Vec::len),
        raw.ingress_deny.as_ref().map_or(0, Vec::len),
        raw.egress.as_ref().map_or(0, Vec::len),
        raw.egress_deny.as_ref().map_or(0, Vec::len),
    ];
    if entries.iter().all(|n| *n == 0) {
        ctx.err(
            path,
            "a rule needs at least one entry in ingress, ingressDeny, egress or egressDeny, or a Cilium cluster refuses the policy; to deny all ingress to the selected endpoints write ingress: [{}]",
        );
    }
    reject(ctx, path, "log", raw.log);
    for (i, l) in raw.labels.iter().flatten().enumerate() {
        if l.key.is_empty() {
            ctx.err(
                join_key(&join_index(&join_key(path, "labels"), i), "key"),
                "a rule label needs a non-empty key",
            );
        }
    }
    let (default_deny_ingress, default_deny_egress) = match &raw.enable_default_deny {
        Some(d) => (d.ingress, d.egress),
        None => (None, None),
    };
    if ctx.errors.len() != before {
        return None;
    }
    Some(Rule {
        path: path.to_string(),
        subject: subject?,
        ingress,
        ingress_deny,
        egress,
        egress_deny,
        default_deny_ingress,
        default_deny_egress,
        isolate_ingress: false,
        isolate_egress: false,
    })
}

struct ItemView<'a> {
    endpoints: (&'static str, Option<&'a Vec<RawSelector>>),
    cidr: (&'static str, Option<&'a Vec<String>>),
    cidr_set: (&'static str, Option<&'a Vec<RawCidrRule>>),
    entities: (&'static str, Option<&'a Vec<String>>),
    rejected: Vec<(&'static str, Option<Present>)>,
    authentication: Option<Present>,
    /// `toFQDNs` (egress only).
    fqdns: Option<&'a Vec<RawFqdnSelector>>,
    to_ports: Option<&'a Vec<RawPortRule>>,
    icmps: Option<&'a Vec<RawIcmpRule>>,
    deny: bool,
    ingress: bool,
}

fn rule_item(
    ctx: &mut Ctx,
    path: &str,
    it: ItemView<'_>,
    ns: Option<&str>,
    matches_init: bool,
) -> Option<RuleItem> {
    let before = ctx.errors.len();
    for (f, present) in &it.rejected {
        reject(ctx, path, f, *present);
    }
    if it.authentication.is_some() {
        if it.deny {
            ctx.err(
                join_key(path, "authentication"),
                "authentication is not allowed in a deny rule",
            );
        } else {
            reject(ctx, path, "authentication", it.authentication);
        }
    }
    // At most one peer kind per item (Cilium's "Combining X and Y is not supported yet").
    let non_empty: Vec<&str> = [
        (it.endpoints.0, it.endpoints.1.map_or(0, Vec::len)),
        (it.cidr.0, it.cidr.1.map_or(0, Vec::len)),
        (it.cidr_set.0, it.cidr_set.1.map_or(0, Vec::len)),
        (it.entities.0, it.entities.1.map_or(0, Vec::len)),
        ("toFQDNs", it.fqdns.map_or(0, Vec::len)),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(f, _)| f)
    .collect();
    if non_empty.len() > 1 {
        let names = match non_empty.len() {
            2 => format!("{} and {}", non_empty[0], non_empty[1]),
            n => format!("{} and {}", non_empty[..n - 1].join(", "), non_empty[n - 1]),
        };
        ctx.err(path, format!("combining {names} in one rule is not supported; write each peer kind as its own rule item"));
    }

    let any_peer_field = it.endpoints.1.is_some()
        || it.cidr.1.is_some()
        || it.cidr_set.1.is_some()
        || it.entities.1.is_some()
        || it.fqdns.is_some();
    let mut peers = Vec::new();
    let mut source = ItemSource::default();
    if let Some(list) = it.endpoints.1 {
        let base = join_key(path, it.endpoints.0);
        for (i, s) in list.iter().enumerate() {
            let mut sel = selector(ctx, &join_index(&base, i), s, KeyMode::Cilium);
            scope_peer(&mut sel, ns, matches_init);
            peers.push(Peer::Endpoints(sel));
            source.peers.push(join_index(&base, i));
        }
    }
    if let Some(list) = it.cidr.1 {
        let base = join_key(path, it.cidr.0);
        for (i, c) in list.iter().enumerate() {
            // The CRD's `format: cidr` needs a prefix length (the agent alone
            // would take a bare address).
            match v::prefix(c) {
                Ok(net) => {
                    peers.push(Peer::Cidr {
                        net,
                        except: Vec::new(),
                        match_endpoints: false,
                    });
                    source.peers.push(join_index(&base, i));
                }
                Err(e) => ctx.err(join_index(&base, i), e),
            }
        }
    }
    if let Some(list) = it.cidr_set.1 {
        let base = join_key(path, it.cidr_set.0);
        for (i, c) in list.iter().enumerate() {
            let p = join_index(&base, i);
            reject(ctx, &p, "cidrGroupRef", c.cidr_group_ref);
            reject(ctx, &p, "cidrGroupSelector", c.cidr_group_selector);
            let Some(text) = &c.cidr else {
                if c.cidr_group_ref.is_none() && c.cidr_group_selector.is_none() {
                    ctx.err(
                        join_key(&p, "cidr"),
                        "cidr is required (a prefix such as 10.0.0.0/8)",
                    );
                }
                continue;
            };
            match v::prefix(text) {
                Ok(net) => {
                    let mut except = Vec::new();
                    for (j, e) in c.except.iter().flatten().enumerate() {
                        match v::except_of(&net, e) {
                            Ok(x) => except.push(x),
                            Err(msg) => ctx.err(join_index(&join_key(&p, "except"), j), msg),
                        }
                    }
                    peers.push(Peer::Cidr {
                        net,
                        except,
                        match_endpoints: false,
                    });
                    source.peers.push(join_key(&p, "cidr"));
                }
                Err(e) => ctx.err(join_key(&p, "cidr"), e),
            }
        }
    }
    if let Some(list) = it.entities.1 {
        let base = join_key(path, it.entities.0);
        for (i, e) in list.iter().enumerate() {
            match v::entity(e) {
                Ok(ent) => {
                    if let Some(msg) = v::entity_not_in_crd(ent) {
                        ctx.warn(WarningCode::EntityNotInCrd, join_index(&base, i), msg);
                    }
                    peers.push(Peer::Entity(ent));
                    source.peers.push(join_index(&base, i));
                }
                Err(msg) => ctx.err(join_index(&base, i), msg),
            }
        }
    }

    if let Some(list) = it.fqdns {
        let base = join_key(path, "toFQDNs");
        if it.deny {
            ctx.err(
                &base,
                "toFQDNs is not allowed in a deny rule (Cilium's egressDeny has no toFQDNs); deny the addresses with toCIDR or toCIDRSet",
            );
        } else {
            for (i, f) in list.iter().enumerate() {
                let p = join_index(&base, i);
                if let Some(sel) = fqdn_selector(ctx, &p, f) {
                    peers.push(Peer::Fqdn(sel));
                    source.peers.push(p);
                }
            }
        }
    }

    let ports_n = it.to_ports.map_or(0, Vec::len);
    let icmps_n = it.icmps.map_or(0, Vec::len);
    if ports_n > 0 && icmps_n > 0 {
        ctx.err(
            path,
            "toPorts and icmps cannot be used in the same rule item; write them as two rule items",
        );
    }
    let mut dns = Vec::new();
    let l4 = if ports_n > 0 || (icmps_n == 0 && it.to_ports.is_some()) {
        L4::Ports(port_rules(
            ctx,
            &join_key(path, "toPorts"),
            it.to_ports.map(Vec::as_slice).unwrap_or_default(),
            &mut source.ports,
            PortRuleSide {
                ingress: it.ingress,
                deny: it.deny,
            },
            &mut dns,
        ))
    } else if let Some(icmps) = it.icmps {
        L4::Icmps(icmp_rules(ctx, &join_key(path, "icmps"), icmps))
    } else {
        L4::Any
    };
    let has_l4 = it.to_ports.is_some() || it.icmps.is_some();
    let peers = if !any_peer_field && has_l4 {
        Peers::All
    } else {
        Peers::List(peers)
    };
    if ctx.errors.len() != before {
        return None;
    }
    ctx.sources.push((path.to_string(), source));
    Some(RuleItem {
        path: path.to_string(),
        pos: None,
        peers,
        l4,
        dns,
    })
}

/// One `toFQDNs` or `rules.dns` entry: exactly one of matchName and
/// matchPattern (the CRD's `oneOf`), valid, normalised.
fn fqdn_selector(ctx: &mut Ctx, path: &str, raw: &RawFqdnSelector) -> Option<FqdnSelector> {
    match (&raw.match_name, &raw.match_pattern) {
        (Some(_), Some(_)) => {
            ctx.err(
                path,
                "matchName and matchPattern cannot both be given in one entry; write them as two entries",
            );
            None
        }
        (None, None) => {
            ctx.err(
                path,
                "an entry needs matchName (one name, such as api.example.com) or matchPattern (such as *.example.com)",
            );
            None
        }
        (Some(n), None) => match v::fqdn_name(n) {
            Ok(n) => Some(FqdnSelector::Name(n)),
            Err(e) => {
                ctx.err(join_key(path, "matchName"), e);
                None
            }
        },
        (None, Some(pat)) => match v::fqdn_pattern(pat) {
            Ok(pat) => Some(FqdnSelector::Pattern(pat)),
            Err(e) => {
                ctx.err(join_key(path, "matchPattern"), e);
                None
            }
        },
    }
}

/// Where a `toPorts` list is: L7 rules depend on it.
#[derive(Clone, Copy)]
struct PortRuleSide {
    ingress: bool,
    deny: bool,
}

/// `toPorts[i].rules`: Cilium's `PortRule.Validate` and `L7Rules.Validate`,
/// and the CRD's `oneOf` (exactly one rule type). Only `dns` is read; http,
/// kafka and l7proto are refused by name. Returns the DNS selectors.
fn l7_rules(
    ctx: &mut Ctx,
    path: &str,
    rules: &RawL7Rules,
    ports: &[RawPortProtoView],
    side: PortRuleSide,
) -> Option<Vec<FqdnSelector>> {
    let before = ctx.errors.len();
    if side.deny {
        ctx.err(
            path,
            "rules are not allowed in a deny rule (Cilium's deny port rules have only ports)",
        );
        return None;
    }
    let kinds = [
        ("http", rules.http.is_some()),
        ("kafka", rules.kafka.is_some()),
        ("dns", rules.dns.is_some()),
        ("l7proto", rules.l7proto.is_some()),
    ];
    let given: Vec<&str> = kinds.iter().filter(|k| k.1).map(|k| k.0).collect();
    match given.len() {
        0 if rules.l7.is_none() => ctx.err(
            path,
            "rules needs one rule type (netpol reads dns); remove `rules` to allow the whole port",
        ),
        0 | 1 => {}
        _ => ctx.err(
            path,
            format!(
                "rules gives {}; one port rule takes one type of L7 rules: write a port rule for each",
                given.join(" and ")
            ),
        ),
    }
    for (f, present) in [
        ("http", rules.http),
        ("kafka", rules.kafka),
        ("l7proto", rules.l7proto),
        ("l7", rules.l7),
    ] {
        reject(ctx, path, f, present);
    }
    let dns = rules.dns.as_ref()?;
    let dpath = join_key(path, "dns");
    if side.ingress {
        ctx.err(
            &dpath,
            "DNS rules are not allowed on ingress (they filter the lookups an endpoint makes, so they go in egress)",
        );
        return None;
    }
    if dns.is_empty() {
        ctx.err(
            &dpath,
            "dns lists no rule; Cilium reads an empty list as no DNS rule at all and allows every query on these ports — remove `rules` to allow the whole port, or list the names allowed",
        );
    }
    if ports.is_empty() {
        ctx.err(
            path,
            "DNS rules need the ports they apply to: add ports, such as [{port: \"53\", protocol: ANY}]",
        );
    }
    for pv in ports {
        if pv.zero {
            ctx.err(
                &pv.path,
                "L7 rules cannot be used with port 0 (every port); name the DNS port, such as \"53\"",
            );
        }
        if pv.range {
            ctx.err(
                &pv.path,
                "DNS rules do not support port ranges; remove endPort",
            );
        }
    }
    let mut out = Vec::new();
    for (i, f) in dns.iter().enumerate() {
        if let Some(sel) = fqdn_selector(ctx, &join_index(&dpath, i), f) {
            out.push(sel);
        }
    }
    if ctx.errors.len() != before {
        return None;
    }
    Some(out)
}

/// What L7 validation needs of a written port.
struct RawPortProtoView {
    path: String,
    zero: bool,
    range: bool,
}

/// The ports of `toPorts`; the field path of each goes to `paths`, the DNS
/// rules of each port rule to `dns`.
fn port_rules(
    ctx: &mut Ctx,
    path: &str,
    list: &[RawPortRule],
    paths: &mut Vec<String>,
    side: PortRuleSide,
    dns: &mut Vec<DnsRule>,
) -> Vec<PortProto> {
    let mut out = Vec::new();
    for (i, pr) in list.iter().enumerate() {
        let p = join_index(path, i);
        let first = out.len();
        let views: Vec<RawPortProtoView> = pr
            .ports
            .iter()
            .flatten()
            .enumerate()
            .map(|(j, pp)| RawPortProtoView {
                path: join_key(&join_index(&join_key(&p, "ports"), j), "port"),
                zero: matches!(&pp.port, Some(IntOrString::Int(0)))
                    || matches!(&pp.port, Some(IntOrString::Str(s)) if matches!(v::cilium_port(s), Ok(v::PortText::Number(0)))),
                range: match (&pp.port, pp.end_port) {
                    (Some(IntOrString::Int(n)), Some(e)) => e > *n,
                    (Some(IntOrString::Str(s)), Some(e)) => {
                        matches!(v::cilium_port(s), Ok(v::PortText::Number(n)) if e > i64::from(n))
                    }
                    _ => false,
                },
            })
            .collect();
        let selectors = pr
            .rules
            .as_ref()
            .and_then(|r| l7_rules(ctx, &join_key(&p, "rules"), r, &views, side));
        reject(ctx, &p, "terminatingTLS", pr.terminating_tls);
        reject(ctx, &p, "originatingTLS", pr.originating_tls);
        reject(ctx, &p, "serverNames", pr.server_names);
        reject(ctx, &p, "listener", pr.listener);
        let ports = pr.ports.as_deref().unwrap_or_default();
        let ppath = join_key(&p, "ports");
        if ports.len() > MAX_PORTS {
            ctx.err(
                &ppath,
                format!(
                    "too many ports ({}); at most {MAX_PORTS} are allowed in one toPorts entry",
                    ports.len()
                ),
            );
            continue;
        }
        for (j, pp) in ports.iter().enumerate() {
            let pj = join_index(&ppath, j);
            let port = match &pp.port {
                None => {
                    ctx.err(
                        join_key(&pj, "port"),
                        "port is required (write \"0\" for every port of the protocol)",
                    );
                    None
                }
                Some(IntOrString::Int(n)) => {
                    if (0..=65535).contains(n) {
                        // The CRD types `port` as a string (its pattern applies to text).
                        ctx.warn(
                            WarningCode::IntPort,
                            join_key(&pj, "port"),
                            format!("port {n} is written as a number; a Cilium cluster refuses it (its CRD wants a string); write \"{n}\""),
                        );
                        Some(PortSpec::Number(*n as u16))
                    } else {
                        ctx.err(
                            join_key(&pj, "port"),
                            format!("{n} is out of range; a port is 0-65535"),
                        );
                        None
                    }
                }
                Some(IntOrString::Str(s)) => match v::cilium_port(s) {
                    Ok(v::PortText::Number(n)) => Some(PortSpec::Number(n)),
                    Ok(v::PortText::Name(n)) => Some(PortSpec::Named(n)),
                    Err(e) => {
                        ctx.err(join_key(&pj, "port"), e);
                        None
                    }
                },
            };
            let end = match pp.end_port {
                None => None,
                Some(e) if (0..=65535).contains(&e) => Some(e as u16),
                Some(e) => {
                    ctx.err(
                        join_key(&pj, "endPort"),
                        format!("{e} is out of range; endPort is 0-65535"),
                    );
                    None
                }
            };
            let proto = match v::cilium_protocol(pp.protocol.as_deref()) {
                Ok(p) => Some(p),
                Err(e) => {
                    ctx.err(join_key(&pj, "protocol"), e);
                    None
                }
            };
            if let (Some(port), Some(proto)) = (port, proto) {
                let end_port = match (&port, end) {
                    (PortSpec::Number(p), Some(e)) if e > *p => Some(e),
                    _ => None,
                };
                out.push(PortProto {
                    port,
                    end_port,
                    proto,
                });
                paths.push(join_key(&pj, "port"));
            }
        }
        if let Some(selectors) = selectors {
            dns.push(DnsRule {
                path: join_key(&join_key(&p, "rules"), "dns"),
                ports: out[first..].to_vec(),
                selectors,
            });
        }
    }
    out
}

fn icmp_rules(ctx: &mut Ctx, path: &str, list: &[RawIcmpRule]) -> Vec<IcmpType> {
    let mut out = Vec::new();
    for (i, r) in list.iter().enumerate() {
        let p = join_index(path, i);
        let fields = r.fields.as_deref().unwrap_or_default();
        let fpath = join_key(&p, "fields");
        if fields.len() > MAX_ICMP_FIELDS {
            ctx.err(&fpath, format!("too many ICMP types ({}); at most {MAX_ICMP_FIELDS} are allowed in one icmps entry", fields.len()));
            continue;
        }
        for (j, f) in fields.iter().enumerate() {
            let pj = join_index(&fpath, j);
            let family = match v::icmp_family(f.family.as_deref()) {
                Ok(fam) => fam,
                Err(e) => {
                    ctx.err(join_key(&pj, "family"), e);
                    continue;
                }
            };
            let ty = match &f.ty {
                None => Err(
                    "type is required (a number 0-255 or a name such as EchoRequest)".to_string(),
                ),
                Some(IntOrString::Int(n)) => u8::try_from(*n)
                    .map_err(|_| format!("ICMP type {n} is out of range; it must be 0-255")),
                Some(IntOrString::Str(s)) => v::icmp_type_text(family, s),
            };
            match ty {
                Ok(ty) => out.push(IcmpType { family, ty }),
                Err(e) => ctx.err(join_key(&pj, "type"), e),
            }
        }
    }
    out
}

// ---------------------------------------------------------------- Kubernetes

/// Translate a Kubernetes NetworkPolicy spec (Cilium's `ParseNetworkPolicy`).
pub fn network_policy_rule(ctx: &mut Ctx, spec: &RawNpSpec, ns: &str) -> Option<Rule> {
    let before = ctx.errors.len();
    let path = "spec";
    let subject = match &spec.pod_selector {
        Some(ps) => {
            let mut sel = selector(ctx, &join_key(path, "podSelector"), ps, KeyMode::K8sPod);
            sel.requirements
                .retain(|r| r.key.key != POD_NAMESPACE_LABEL);
            sel.requirements.push(ns_in(ns));
            Some(Subject::Endpoints(sel))
        }
        // Optional in Kubernetes (`NetworkPolicySpec.PodSelector` is a value, so
        // a missing one is the empty selector): every pod of the namespace.
        None => Some(Subject::Endpoints(Selector {
            requirements: vec![ns_in(ns)],
        })),
    };
    let mut types_ingress = false;
    let mut types_egress = false;
    if let Some(types) = &spec.policy_types {
        // pkg/apis/networking/validation/validation.go `ValidateNetworkPolicySpec`:
        // "may not specify more than two policyTypes" (a repeat within two is allowed).
        if types.len() > 2 {
            ctx.err(
                join_key(path, "policyTypes"),
                format!("policyTypes lists {} entries; Kubernetes allows at most two, each of Ingress and Egress once: write [Ingress, Egress]", types.len()),
            );
        }
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => types_ingress = true,
                "Egress" => types_egress = true,
                other => ctx.err(
                    join_index(&join_key(path, "policyTypes"), i),
                    format!(
                        "{other:?} is not a policy type; use Ingress or Egress (case-sensitive)"
                    ),
                ),
            }
        }
    }
    let has_ingress = spec.ingress.as_ref().is_some_and(|l| !l.is_empty());
    let has_egress = spec.egress.as_ref().is_some_and(|l| !l.is_empty());
    let (isolate_ingress, isolate_egress) = match &spec.policy_types {
        None => (true, has_egress),
        Some(_) => (types_ingress, types_egress),
    };
    if spec.policy_types.is_some() {
        if has_ingress && !types_ingress {
            ctx.err(
                join_key(path, "ingress"),
                "ingress rules are given but policyTypes does not list Ingress; Kubernetes would ignore them and Cilium would enforce them — add Ingress to policyTypes or remove the rules",
            );
        }
        if has_egress && !types_egress {
            ctx.err(
                join_key(path, "egress"),
                "egress rules are given but policyTypes does not list Egress; Kubernetes would ignore them and Cilium would enforce them — add Egress to policyTypes or remove the rules",
            );
        }
    }
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let p = join_index(&join_key(path, "ingress"), i);
        if let Some(item) = np_item(ctx, &p, "from", r.from.as_deref(), r.ports.as_deref(), ns) {
            ingress.push(item);
        }
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let p = join_index(&join_key(path, "egress"), i);
        if let Some(item) = np_item(ctx, &p, "to", r.to.as_deref(), r.ports.as_deref(), ns) {
            egress.push(item);
        }
    }
    if ctx.errors.len() != before {
        return None;
    }
    Some(Rule {
        path: path.into(),
        subject: subject?,
        ingress,
        ingress_deny: Vec::new(),
        egress,
        egress_deny: Vec::new(),
        default_deny_ingress: None,
        default_deny_egress: None,
        isolate_ingress,
        isolate_egress,
    })
}

fn np_item(
    ctx: &mut Ctx,
    path: &str,
    peer_field: &str,
    peers: Option<&[RawNpPeer]>,
    ports: Option<&[RawNpPort]>,
    ns: &str,
) -> Option<RuleItem> {
    let before = ctx.errors.len();
    let mut source = ItemSource::default();
    let peers = match peers {
        None | Some([]) => Peers::All,
        Some(list) => {
            let base = join_key(path, peer_field);
            let mut out = Vec::new();
            for (j, peer) in list.iter().enumerate() {
                let p = join_index(&base, j);
                if let Some(peer) = np_peer(ctx, &p, peer, ns) {
                    source.peers.push(match &peer {
                        Peer::Cidr { .. } => join_key(&join_key(&p, "ipBlock"), "cidr"),
                        _ => p,
                    });
                    out.push(peer);
                }
            }
            Peers::List(out)
        }
    };
    let l4 = match ports {
        None | Some([]) => L4::Any,
        Some(list) => {
            let base = join_key(path, "ports");
            let mut out = Vec::new();
            for (k, port) in list.iter().enumerate() {
                let p = join_index(&base, k);
                if let Some(pp) = np_port(ctx, &p, port) {
                    source.ports.push(join_key(&p, "port"));
                    out.push(pp);
                }
            }
            L4::Ports(out)
        }
    };
    if ctx.errors.len() != before {
        return None;
    }
    ctx.sources.push((path.to_string(), source));
    Some(RuleItem {
        path: path.to_string(),
        pos: None,
        peers,
        l4,
        dns: Vec::new(),
    })
}

fn np_peer(ctx: &mut Ctx, path: &str, peer: &RawNpPeer, ns: &str) -> Option<Peer> {
    if let Some(ib) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            ctx.err(
                path,
                "ipBlock cannot be combined with podSelector or namespaceSelector in one peer; write them as separate peers",
            );
            return None;
        }
        let ipath = join_key(path, "ipBlock");
        let net = match v::prefix(&ib.cidr) {
            Ok(n) => n,
            Err(e) => {
                ctx.err(join_key(&ipath, "cidr"), e);
                return None;
            }
        };
        let mut except = Vec::new();
        for (i, e) in ib.except.iter().flatten().enumerate() {
            let epath = join_index(&join_key(&ipath, "except"), i);
            match v::except_of(&net, e) {
                // `ValidateIPBlock`: "must be a strict subset of `cidr`".
                Ok(x) if x == net => ctx.err(
                    epath,
                    format!("except {e:?} is all of cidr {net}; Kubernetes wants an except strictly inside cidr (a longer prefix) — remove the peer to allow none of it"),
                ),
                Ok(x) => except.push(x),
                Err(msg) => ctx.err(epath, msg),
            }
        }
        return Some(Peer::Cidr {
            net,
            except,
            match_endpoints: true,
        });
    }
    match (&peer.namespace_selector, &peer.pod_selector) {
        (None, None) => {
            ctx.err(
                path,
                "a peer needs podSelector, namespaceSelector or ipBlock",
            );
            None
        }
        (Some(nsel), pod) => {
            let mut sel = selector(
                ctx,
                &join_key(path, "namespaceSelector"),
                nsel,
                KeyMode::K8sNamespace,
            );
            if sel.requirements.is_empty()
                && nsel.match_labels.as_ref().is_none_or(|m| m.is_empty())
                && nsel.match_expressions.as_ref().is_none_or(|m| m.is_empty())
            {
                sel.requirements.push(ns_exists());
            }
            if let Some(pod) = pod {
                let ps = selector(ctx, &join_key(path, "podSelector"), pod, KeyMode::K8sPod);
                sel.requirements.extend(ps.requirements);
            }
            Some(Peer::Endpoints(sel))
        }
        (None, Some(pod)) => {
            let mut sel = selector(ctx, &join_key(path, "podSelector"), pod, KeyMode::K8sPod);
            sel.requirements
                .retain(|r| r.key.key != POD_NAMESPACE_LABEL);
            sel.requirements.push(ns_in(ns));
            Some(Peer::Endpoints(sel))
        }
    }
}

/// Kubernetes `IsValidPortName`: lower-case IANA service name.
fn k8s_port_name(s: &str) -> bool {
    v::is_svc_name(s) && !s.bytes().any(|b| b.is_ascii_uppercase())
}

fn np_port(ctx: &mut Ctx, path: &str, port: &RawNpPort) -> Option<PortProto> {
    let before = ctx.errors.len();
    let proto = match port.protocol.as_deref() {
        None | Some("TCP") => Proto::Tcp,
        Some("UDP") => Proto::Udp,
        Some("SCTP") => Proto::Sctp,
        Some(other) => {
            ctx.err(
                join_key(path, "protocol"),
                format!("{other:?} is not a valid protocol; use TCP, UDP or SCTP (upper case, as Kubernetes requires)"),
            );
            Proto::Tcp
        }
    };
    let spec = match &port.port {
        None => PortSpec::Number(0),
        Some(IntOrString::Int(n)) => {
            if (1..=65535).contains(n) {
                PortSpec::Number(*n as u16)
            } else {
                ctx.err(
                    join_key(path, "port"),
                    format!("{n} is not a valid port; a port is 1-65535"),
                );
                PortSpec::Number(0)
            }
        }
        Some(IntOrString::Str(s)) => {
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                ctx.err(
                    join_key(path, "port"),
                    format!(
                        "{s:?} is a string; write the port number without quotes, or a port name"
                    ),
                );
            } else if !k8s_port_name(s) {
                ctx.err(
                    join_key(path, "port"),
                    format!("{s:?} is not a port number or name (a name is at most 15 lower-case letters, digits and '-', with at least one letter)"),
                );
            }
            PortSpec::Named(s.clone())
        }
    };
    let end_port = match port.end_port {
        None => None,
        Some(e) => match &spec {
            PortSpec::Number(p) if *p > 0 => {
                if !(0..=65535).contains(&e) {
                    ctx.err(
                        join_key(path, "endPort"),
                        format!("{e} is out of range; endPort is 1-65535"),
                    );
                    None
                } else if e < i64::from(*p) {
                    ctx.err(
                        join_key(path, "endPort"),
                        format!("endPort {e} is smaller than port {p}"),
                    );
                    None
                } else if e == i64::from(*p) {
                    None
                } else {
                    Some(e as u16)
                }
            }
            _ => {
                ctx.err(join_key(path, "endPort"), "endPort needs a numeric port");
                None
            }
        },
    };
    if ctx.errors.len() != before {
        return None;
    }
    Some(PortProto {
        port: spec,
        end_port,
        proto,
    })
}

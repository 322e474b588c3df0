//! Registry documents (`netpol/v1` Endpoint, HostEndpoint, Node, Namespace) →
//! [`model::EndpointDef`], [`model::NodeDef`], [`model::NamespaceDef`].
//!
//! Label sources: a plain key is a `k8s` label (as a pod label is in Cilium);
//! `k8s:`, `container:` and `unspec:` prefixes are kept; `any:` is read as `k8s`
//! (`any` is a selector wildcard, not a source a label can have); `reserved:` is
//! refused (netpol assigns reserved labels). Labels netpol derives itself
//! (`io.kubernetes.pod.namespace`, `io.cilium.k8s.namespace.labels.*`) are refused
//! so an endpoint cannot pretend to live in another namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::model::{Interface, Label, NamedPort, Proto};
use super::policy::Ctx;
use super::raw::{RawEndpointSpec, RawNamedPort};
use super::validate::{self as v, NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_LABEL};
use super::yaml::{join_index, join_key};

/// Registry labels → model labels. `allow_sources` is false for Namespace labels,
/// which are Kubernetes labels only.
pub fn labels(
    ctx: &mut Ctx,
    path: &str,
    raw: Option<&BTreeMap<String, String>>,
    allow_sources: bool,
) -> Vec<Label> {
    let mut out = Vec::new();
    let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
    for (k, val) in raw.into_iter().flatten() {
        let kpath = join_key(path, k);
        let (source, key) = match k.split_once(':') {
            None => ("k8s", k.as_str()),
            Some((src, key)) => {
                match src {
                    "k8s" | "any" => ("k8s", key),
                    "container" | "unspec" if allow_sources => (src, key),
                    "reserved" => {
                        ctx.err(&kpath, format!("{k:?}: reserved labels are assigned by netpol and cannot be written"));
                        continue;
                    }
                    other => {
                        let allowed = if allow_sources {
                            "k8s:, container: or unspec: (or no prefix, meaning k8s)"
                        } else {
                            "k8s: (or no prefix)"
                        };
                        ctx.err(
                            &kpath,
                            format!("{k:?} has the unknown label source {other:?}; use {allowed}"),
                        );
                        continue;
                    }
                }
            }
        };
        if let Err(e) = v::qualified_name(key) {
            ctx.err(&kpath, e);
            continue;
        }
        if let Err(e) = v::label_value(val) {
            ctx.err(&kpath, e);
            continue;
        }
        if key == POD_NAMESPACE_LABEL {
            ctx.err(
                &kpath,
                format!("{POD_NAMESPACE_LABEL} is set from metadata.namespace; remove this label"),
            );
            continue;
        }
        if key.starts_with(NAMESPACE_LABELS_PREFIX) {
            ctx.err(&kpath, "namespace labels come from the Namespace object of the endpoint's namespace; remove this label");
            continue;
        }
        if let Some(first) = seen.get(&(source.to_string(), key.to_string())) {
            ctx.err(
                &kpath,
                format!("label {source}:{key} is written twice (as {first:?} and {k:?})"),
            );
            continue;
        }
        seen.insert((source.to_string(), key.to_string()), k.clone());
        out.push(Label {
            source: source.into(),
            key: key.into(),
            value: val.into(),
        });
    }
    out
}

pub fn addresses(
    ctx: &mut Ctx,
    path: &str,
    raw: Option<&Vec<String>>,
    required: &str,
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    let list = raw.map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() && !required.is_empty() {
        ctx.err(path, required.to_string());
    }
    for (i, a) in list.iter().enumerate() {
        let p = join_index(path, i);
        match a.parse::<IpAddr>() {
            Ok(ip) => {
                if out.contains(&ip) {
                    ctx.err(p, format!("address {ip} is listed twice"));
                } else {
                    out.push(ip);
                }
            }
            Err(_) if a.contains('/') => {
                ctx.err(p, format!("{a:?} is a prefix; list single addresses here"));
            }
            Err(_) => ctx.err(p, format!("{a:?} is not an IP address")),
        }
    }
    out
}

pub fn interface(ctx: &mut Ctx, path: &str, raw: Option<&str>) -> Option<Interface> {
    match raw {
        None => None,
        Some("auto") => Some(Interface::Auto),
        Some(name) => match v::interface_name(name) {
            Ok(()) => Some(Interface::Name(name.to_string())),
            Err(e) => {
                ctx.err(path, e);
                None
            }
        },
    }
}

pub fn named_ports(ctx: &mut Ctx, path: &str, raw: Option<&Vec<RawNamedPort>>) -> Vec<NamedPort> {
    let mut out: Vec<NamedPort> = Vec::new();
    let mut names = BTreeSet::new();
    for (i, p) in raw.into_iter().flatten().enumerate() {
        let pp = join_index(path, i);
        let mut ok = true;
        if !v::is_svc_name(&p.name) || p.name.bytes().any(|b| b.is_ascii_uppercase()) {
            ctx.err(
                join_key(&pp, "name"),
                format!("{:?} is not a valid port name (at most 15 lower-case letters, digits and '-', with at least one letter)", p.name),
            );
            ok = false;
        } else if !names.insert(p.name.clone()) {
            ctx.err(
                join_key(&pp, "name"),
                format!("port name {:?} is used twice", p.name),
            );
            ok = false;
        }
        if !(1..=65535).contains(&p.port) {
            ctx.err(
                join_key(&pp, "port"),
                format!("{} is not a valid port; a port is 1-65535", p.port),
            );
            ok = false;
        }
        let proto = match p
            .protocol
            .as_deref()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            None | Some("TCP") => Proto::Tcp,
            Some("UDP") => Proto::Udp,
            Some("SCTP") => Proto::Sctp,
            Some(_) => {
                ctx.err(
                    join_key(&pp, "protocol"),
                    format!(
                        "{:?} is not a valid protocol; use TCP, UDP or SCTP",
                        p.protocol.as_deref().unwrap_or_default()
                    ),
                );
                ok = false;
                Proto::Tcp
            }
        };
        if ok {
            out.push(NamedPort {
                name: p.name.clone(),
                port: p.port as u16,
                proto,
            });
        }
    }
    out
}

/// The validated parts of an Endpoint/HostEndpoint spec.
pub struct EndpointSpec {
    pub node: Option<String>,
    pub interface: Option<Interface>,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<NamedPort>,
    pub audit: bool,
}

pub fn endpoint_spec(ctx: &mut Ctx, spec: &RawEndpointSpec, host: bool) -> EndpointSpec {
    let node = match &spec.node {
        Some(n) if n.is_empty() || n.chars().any(char::is_whitespace) => {
            ctx.err("spec.node", format!("{n:?} is not a valid node name"));
            None
        }
        other => other.clone(),
    };
    let iface = interface(ctx, "spec.interface", spec.interface.as_deref());
    if host && spec.interface.is_none() {
        ctx.err(
            "spec.interface",
            "a HostEndpoint needs the interface it stands for (e.g. eth0)",
        );
    }
    let required = if host {
        ""
    } else {
        "an Endpoint needs at least one address"
    };
    let addrs = addresses(ctx, "spec.addresses", spec.addresses.as_ref(), required);
    if matches!(iface, Some(Interface::Auto)) && addrs.is_empty() && host {
        ctx.err(
            "spec.interface",
            "interface \"auto\" needs at least one address to route",
        );
    }
    let ports = named_ports(ctx, "spec.ports", spec.ports.as_ref());
    EndpointSpec {
        node,
        interface: iface,
        addresses: addrs,
        ports,
        audit: spec.audit.unwrap_or(false),
    }
}

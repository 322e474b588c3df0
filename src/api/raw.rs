//! `Raw*` serde types: the accepted kinds exactly as written in files.
//!
//! Every struct denies unknown fields. Fields netpol cannot enforce (they need a
//! proxy, a cluster or a cloud API) are still declared, as [`Present`], so that
//! validation can reject them with a message naming them instead of "unknown
//! field". Nothing here is validated; see `api::policy` and `api::registry`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::de::{IntOrString, Present};

/// `metadata` of every kind. Fields Kubernetes adds on export are accepted and
/// ignored, so `kubectl get -o yaml` output can be used as is.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
    pub uid: Option<Present>,
    #[serde(rename = "resourceVersion")]
    pub resource_version: Option<Present>,
    pub generation: Option<Present>,
    #[serde(rename = "creationTimestamp")]
    pub creation_timestamp: Option<Present>,
    #[serde(rename = "managedFields")]
    pub managed_fields: Option<Present>,
}

// ---------------------------------------------------------------- Cilium

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCnp {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: Option<RawMeta>,
    pub spec: Option<RawRule>,
    pub specs: Option<Vec<RawRule>>,
    pub status: Option<Present>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSelector {
    #[serde(rename = "matchLabels")]
    pub match_labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "matchExpressions")]
    pub match_expressions: Option<Vec<RawRequirement>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequirement {
    pub key: String,
    pub operator: String,
    pub values: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuleLabel {
    pub key: String,
    pub value: Option<String>,
    pub source: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaultDeny {
    pub ingress: Option<bool>,
    pub egress: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(rename = "endpointSelector")]
    pub endpoint_selector: Option<RawSelector>,
    #[serde(rename = "nodeSelector")]
    pub node_selector: Option<RawSelector>,
    pub ingress: Option<Vec<RawIngress>>,
    #[serde(rename = "ingressDeny")]
    pub ingress_deny: Option<Vec<RawIngress>>,
    pub egress: Option<Vec<RawEgress>>,
    #[serde(rename = "egressDeny")]
    pub egress_deny: Option<Vec<RawEgress>>,
    pub labels: Option<Vec<RawRuleLabel>>,
    #[serde(rename = "enableDefaultDeny")]
    pub enable_default_deny: Option<RawDefaultDeny>,
    pub description: Option<String>,
    pub log: Option<Present>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIngress {
    #[serde(rename = "fromEndpoints")]
    pub from_endpoints: Option<Vec<RawSelector>>,
    #[serde(rename = "fromCIDR")]
    pub from_cidr: Option<Vec<String>>,
    #[serde(rename = "fromCIDRSet")]
    pub from_cidr_set: Option<Vec<RawCidrRule>>,
    #[serde(rename = "fromEntities")]
    pub from_entities: Option<Vec<String>>,
    #[serde(rename = "fromRequires")]
    pub from_requires: Option<Present>,
    #[serde(rename = "fromNodes")]
    pub from_nodes: Option<Present>,
    #[serde(rename = "fromGroups")]
    pub from_groups: Option<Present>,
    #[serde(rename = "toPorts")]
    pub to_ports: Option<Vec<RawPortRule>>,
    pub icmps: Option<Vec<RawIcmpRule>>,
    pub authentication: Option<Present>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEgress {
    #[serde(rename = "toEndpoints")]
    pub to_endpoints: Option<Vec<RawSelector>>,
    #[serde(rename = "toCIDR")]
    pub to_cidr: Option<Vec<String>>,
    #[serde(rename = "toCIDRSet")]
    pub to_cidr_set: Option<Vec<RawCidrRule>>,
    #[serde(rename = "toEntities")]
    pub to_entities: Option<Vec<String>>,
    #[serde(rename = "toRequires")]
    pub to_requires: Option<Present>,
    #[serde(rename = "toNodes")]
    pub to_nodes: Option<Present>,
    #[serde(rename = "toGroups")]
    pub to_groups: Option<Present>,
    #[serde(rename = "toServices")]
    pub to_services: Option<Present>,
    #[serde(rename = "toFQDNs")]
    pub to_fqdns: Option<Vec<RawFqdnSelector>>,
    #[serde(rename = "toPorts")]
    pub to_ports: Option<Vec<RawPortRule>>,
    pub icmps: Option<Vec<RawIcmpRule>>,
    pub authentication: Option<Present>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCidrRule {
    pub cidr: Option<String>,
    pub except: Option<Vec<String>>,
    #[serde(rename = "cidrGroupRef")]
    pub cidr_group_ref: Option<Present>,
    #[serde(rename = "cidrGroupSelector")]
    pub cidr_group_selector: Option<Present>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPortRule {
    pub ports: Option<Vec<RawPortProtocol>>,
    pub rules: Option<RawL7Rules>,
    #[serde(rename = "terminatingTLS")]
    pub terminating_tls: Option<Present>,
    #[serde(rename = "originatingTLS")]
    pub originating_tls: Option<Present>,
    #[serde(rename = "serverNames")]
    pub server_names: Option<Present>,
    pub listener: Option<Present>,
}

/// `toFQDNs[i]` and `rules.dns[i]` (Cilium's FQDNSelector / PortRuleDNS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFqdnSelector {
    #[serde(rename = "matchName")]
    pub match_name: Option<String>,
    #[serde(rename = "matchPattern")]
    pub match_pattern: Option<String>,
}

/// `toPorts[i].rules` (Cilium's L7Rules): only `dns` is read; the others are
/// declared so validation can refuse them by name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawL7Rules {
    pub http: Option<Present>,
    pub kafka: Option<Present>,
    pub dns: Option<Vec<RawFqdnSelector>>,
    pub l7proto: Option<Present>,
    pub l7: Option<Present>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPortProtocol {
    pub port: Option<IntOrString>,
    #[serde(rename = "endPort")]
    pub end_port: Option<i64>,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIcmpRule {
    pub fields: Option<Vec<RawIcmpField>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIcmpField {
    pub family: Option<String>,
    #[serde(rename = "type")]
    pub ty: Option<IntOrString>,
}

// ---------------------------------------------------------------- Kubernetes

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetworkPolicy {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: Option<RawMeta>,
    pub spec: Option<RawNpSpec>,
    pub status: Option<Present>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNpSpec {
    #[serde(rename = "podSelector")]
    pub pod_selector: Option<RawSelector>,
    #[serde(rename = "policyTypes")]
    pub policy_types: Option<Vec<String>>,
    pub ingress: Option<Vec<RawNpIngress>>,
    pub egress: Option<Vec<RawNpEgress>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNpIngress {
    pub from: Option<Vec<RawNpPeer>>,
    pub ports: Option<Vec<RawNpPort>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNpEgress {
    pub to: Option<Vec<RawNpPeer>>,
    pub ports: Option<Vec<RawNpPort>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNpPeer {
    #[serde(rename = "podSelector")]
    pub pod_selector: Option<RawSelector>,
    #[serde(rename = "namespaceSelector")]
    pub namespace_selector: Option<RawSelector>,
    #[serde(rename = "ipBlock")]
    pub ip_block: Option<RawIpBlock>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIpBlock {
    pub cidr: String,
    pub except: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNpPort {
    pub protocol: Option<String>,
    pub port: Option<IntOrString>,
    #[serde(rename = "endPort")]
    pub end_port: Option<i64>,
}

// ---------------------------------------------------------------- registry

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: Option<RawMeta>,
    pub spec: Option<RawEndpointSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpointSpec {
    pub node: Option<String>,
    pub interface: Option<String>,
    pub addresses: Option<Vec<String>>,
    pub ports: Option<Vec<RawNamedPort>>,
    pub audit: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNamedPort {
    pub name: String,
    pub port: i64,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: Option<RawMeta>,
    pub spec: Option<RawNodeSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodeSpec {
    pub addresses: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNamespace {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: Option<RawMeta>,
}

//! Warnings: things netpol accepts and enforces, but that deserve a second look.
//! A warning never refuses a set (the daemon applies it as usual);
//! `netpolctl check` prints warnings beside the errors, and `check --strict`
//! fails on them.
//!
//! Every warning has a [`WarningCode`]: one value per kind of warning, named in
//! the printed line (`... [int-port]`), in `check --json`, and in the table of
//! docs/policy.md ("Deliberate differences"), which a test keeps equal to
//! [`WarningCode::ALL`]. The codes of [`WarningCode::POLICY_EFFECT`] are about
//! what a valid policy does against the registry (`policy::lint`, and the
//! duplicate name found at load); docs/policy.md lists them in "Warnings about
//! what a policy does".

use std::fmt;

use serde::Serialize;

use super::Problem;

/// What a warning is about. Serialized (and printed) as its [`code`](Self::code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WarningCode {
    /// A CiliumNetworkPolicy port written as an unquoted number (`port: 80`):
    /// the CRD types `toPorts[].ports[].port` as a string.
    IntPort,
    /// A string field (label value, `description`, name, ...) written as an
    /// unquoted number or boolean (`version: 5`): Kubernetes wants a string there.
    NonString,
    /// A plain scalar that YAML 1.1, which Kubernetes clients read files with,
    /// reads as a boolean (`yes`, `no`, `on`, `off`, `y`, `n`).
    Yaml11Bool,
    /// A plain scalar that YAML 1.1 reads as another number than netpol does, or
    /// as a number where netpol reads text (`010` is 8 there, `0x1f` is 31).
    Yaml11Number,
    /// The entities `world-ipv4` / `world-ipv6`: Cilium's agent knows them, its
    /// CRD's entity enum does not.
    EntityNotInCrd,
    /// Two policies of different kinds with one namespace and name.
    DuplicateName,
    /// A rule's endpointSelector (nodeSelector, podSelector) selects no
    /// endpoint of the registry: the rule enforces nothing.
    SelectsNothing,
    /// A peer selector matches no endpoint of the registry (nor a reserved
    /// identity): that peer allows or denies nothing.
    PeerMatchesNothing,
    /// A named port that no endpoint it could apply to declares: it matches
    /// nothing.
    NamedPortUndeclared,
    /// An allow rule item every flow of which a deny rule denies.
    ShadowedAllow,
    /// A CiliumNetworkPolicy CIDR rule whose range covers registry endpoints,
    /// which such a rule never matches.
    CidrCoversEndpoints,
}

impl WarningCode {
    /// Every code, in the order of the docs tables: how a file is written,
    /// then [`POLICY_EFFECT`](Self::POLICY_EFFECT).
    pub const ALL: &'static [WarningCode] = &[
        WarningCode::IntPort,
        WarningCode::NonString,
        WarningCode::Yaml11Bool,
        WarningCode::Yaml11Number,
        WarningCode::EntityNotInCrd,
        WarningCode::DuplicateName,
        WarningCode::SelectsNothing,
        WarningCode::PeerMatchesNothing,
        WarningCode::NamedPortUndeclared,
        WarningCode::ShadowedAllow,
        WarningCode::CidrCoversEndpoints,
    ];

    /// The codes about what a valid policy does (the others are about how a
    /// file is written), in the order of their docs table: the last of [`ALL`](Self::ALL).
    pub const POLICY_EFFECT: &'static [WarningCode] = Self::ALL.split_at(5).1;

    /// The code as printed and documented.
    pub fn code(self) -> &'static str {
        match self {
            WarningCode::IntPort => "int-port",
            WarningCode::NonString => "non-string",
            WarningCode::Yaml11Bool => "yaml11-bool",
            WarningCode::Yaml11Number => "yaml11-number",
            WarningCode::EntityNotInCrd => "entity-not-in-crd",
            WarningCode::DuplicateName => "duplicate-name",
            WarningCode::SelectsNothing => "selects-nothing",
            WarningCode::PeerMatchesNothing => "peer-matches-nothing",
            WarningCode::NamedPortUndeclared => "named-port-undeclared",
            WarningCode::ShadowedAllow => "shadowed-allow",
            WarningCode::CidrCoversEndpoints => "cidr-covers-endpoints",
        }
    }
}

impl fmt::Display for WarningCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// One warning: where (the same shape as a [`Problem`]: file, line, column,
/// document, object, field), what, and its code. Displayed as
/// `FILE:LINE:COL: warning: document N (KIND NAMESPACE/NAME): FIELD.PATH: message [code]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Warning {
    #[serde(flatten)]
    pub at: Problem,
    pub code: WarningCode,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.at.fmt_location(f)?;
        write!(f, " warning:")?;
        self.at.fmt_detail(f)?;
        write!(f, " [{}]", self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_effect_codes_are_those_issue_17_added() {
        assert_eq!(
            WarningCode::POLICY_EFFECT.first(),
            Some(&WarningCode::DuplicateName)
        );
        assert_eq!(WarningCode::POLICY_EFFECT.len(), 6);
        assert!(!WarningCode::POLICY_EFFECT.contains(&WarningCode::EntityNotInCrd));
    }

    #[test]
    fn codes_are_unique_and_serialize_as_printed() {
        let mut seen = std::collections::BTreeSet::new();
        for c in WarningCode::ALL {
            assert!(seen.insert(c.code()), "{c} twice");
            assert_eq!(
                serde_json::to_value(c).unwrap(),
                serde_json::Value::String(c.code().into())
            );
        }
    }

    #[test]
    fn display() {
        let w = Warning {
            at: Problem {
                file: "/etc/netpol.d/web.yaml".into(),
                line: Some(9),
                column: Some(21),
                document: Some(1),
                object: Some("CiliumNetworkPolicy default/web".into()),
                field: Some("spec.ingress[0].toPorts[0].ports[0].port".into()),
                message: "m".into(),
            },
            code: WarningCode::IntPort,
        };
        assert_eq!(
            w.to_string(),
            "/etc/netpol.d/web.yaml:9:21: warning: document 1 (CiliumNetworkPolicy default/web): spec.ingress[0].toPorts[0].ports[0].port: m [int-port]"
        );
    }
}

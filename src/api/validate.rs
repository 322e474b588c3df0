//! Small validators shared by the policy and registry translation: label keys and
//! values (Kubernetes rules), selector keys with Cilium's `source:` prefix,
//! ports and IANA service names, CIDRs, entities and ICMP type names.
//!
//! Each returns `Err(message)` with a message a user can act on; the caller adds
//! the file, document and field path.

use std::net::IpAddr;

use ipnet::IpNet;

use super::model::{Entity, Family, LabelKey};

pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

fn is_alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

/// Kubernetes qualified name (label key): `[prefix/]name`.
pub fn qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if name.contains('/') {
        return Err(format!(
            "{key:?} is not a valid label key: it may contain at most one '/'"
        ));
    }
    if let Some(p) = prefix {
        if p.is_empty() {
            return Err(format!(
                "{key:?} is not a valid label key: the prefix before '/' must not be empty"
            ));
        }
        if p.len() > 253 || !is_dns_subdomain(p) {
            return Err(format!(
                "{key:?} is not a valid label key: the prefix {p:?} must be a DNS subdomain (lower-case letters, digits, '-' and '.', at most 253 characters)"
            ));
        }
    }
    if name.is_empty() {
        return Err(format!(
            "{key:?} is not a valid label key: the name part must not be empty"
        ));
    }
    if name.len() > 63 {
        return Err(format!(
            "{key:?} is not a valid label key: the name part must be at most 63 characters"
        ));
    }
    if !label_word(name) {
        return Err(format!(
            "{key:?} is not a valid label key: it must consist of letters, digits, '-', '_' or '.', and start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`
fn label_word(s: &str) -> bool {
    let first = s.chars().next();
    let last = s.chars().last();
    matches!(first, Some(c) if is_alnum(c))
        && matches!(last, Some(c) if is_alnum(c))
        && s.chars()
            .all(|c| is_alnum(c) || matches!(c, '-' | '_' | '.'))
}

pub fn label_value(v: &str) -> Result<(), String> {
    if v.len() > 63 {
        return Err(format!(
            "{v:?} is not a valid label value: it must be at most 63 characters"
        ));
    }
    if !v.is_empty() && !label_word(v) {
        return Err(format!(
            "{v:?} is not a valid label value: it must be empty or consist of letters, digits, '-', '_' or '.', and start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// RFC 1123 label: what a namespace name must be.
pub fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.split('.').all(dns_label)
}

/// A selector key as Cilium reads it (`labels.GetExtendedKeyFrom`): `source:key`,
/// `$key` for `reserved:key`, or a plain key matching any source.
pub fn selector_key(raw: &str) -> LabelKey {
    if let Some(rest) = raw.strip_prefix('$') {
        return LabelKey {
            source: Some("reserved".into()),
            key: rest.to_string(),
        };
    }
    match raw.split_once(':') {
        Some((src, key)) if !src.is_empty() && src != "any" => LabelKey {
            source: Some(src.to_string()),
            key: key.to_string(),
        },
        Some((_, key)) => LabelKey {
            source: None,
            key: key.to_string(),
        },
        None => LabelKey {
            source: None,
            key: raw.to_string(),
        },
    }
}

/// Validate a Cilium selector key the way Cilium does: the extended key
/// `source.key` (`any.key` without a source) must be a qualified name.
pub fn cilium_selector_key(raw: &str) -> Result<LabelKey, String> {
    let lk = selector_key(raw);
    if lk.key.is_empty() {
        return Err(format!(
            "{raw:?} is not a valid label key: the key after the source prefix is empty"
        ));
    }
    let ext = format!("{}.{}", lk.source.as_deref().unwrap_or("any"), lk.key);
    if qualified_name(&ext).is_err() {
        // Say it in terms of what the user wrote.
        if let Err(e) = qualified_name(&lk.key) {
            return Err(e.replacen(&format!("{:?}", lk.key), &format!("{raw:?}"), 1));
        }
        return Err(format!(
            "{raw:?} is not a valid label key: Cilium stores it as {ext:?}, whose name part must be at most 63 characters"
        ));
    }
    Ok(lk)
}

/// Cilium's IANA service name check (`pkg/iana`): 1..15 characters, letters,
/// digits and non-consecutive inner hyphens, at least one letter.
pub fn is_svc_name(s: &str) -> bool {
    if s.is_empty() || s.len() > 15 {
        return false;
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return false;
    }
    if s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        return false;
    }
    s.bytes().any(|b| b.is_ascii_alphabetic())
}

/// A port written as a string in a Cilium rule: a named port (returned
/// lower-cased) or a decimal number.
pub enum PortText {
    Number(u16),
    Name(String),
}

pub fn cilium_port(text: &str) -> Result<PortText, String> {
    if text.is_empty() {
        return Err("port must not be empty; write a number 0-65535 or a port name".into());
    }
    if is_svc_name(text) {
        return Ok(PortText::Name(text.to_ascii_lowercase()));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        if text.len() > 1 && text.starts_with('0') {
            return Err(format!(
                "{text:?} has a leading zero, which Cilium reads as an octal number; write the port without leading zeros"
            ));
        }
        return match text.parse::<u32>() {
            Ok(n) if n <= 65535 => Ok(PortText::Number(n as u16)),
            _ => Err(format!("{text:?} is out of range; a port is 0-65535")),
        };
    }
    let has_letter = text.bytes().any(|b| b.is_ascii_alphabetic());
    let name_chars = text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if has_letter && name_chars && text.len() > 15 {
        return Err(format!(
            "{text:?} is not a port number or name: a port name is at most 15 characters"
        ));
    }
    if has_letter && name_chars {
        return Err(format!("{text:?} is not a port number or name: a port name cannot start or end with '-' or contain \"--\""));
    }
    if has_letter {
        return Err(format!("{text:?} is not a port number or name: a port name may contain only letters, digits and '-'"));
    }
    Err(format!("{text:?} is not a port number or name"))
}

/// `fromCIDR`/`toCIDR`: a prefix, or a bare address meaning /32 or /128.
pub fn cidr_or_ip(text: &str) -> Result<IpNet, String> {
    if text.contains('/') {
        prefix(text)
    } else {
        match text.parse::<IpAddr>() {
            Ok(ip) => Ok(IpNet::from(ip)),
            Err(_) => Err(format!("{text:?} is not an IP address or CIDR prefix")),
        }
    }
}

/// A prefix in `address/length` notation (host bits are cleared, as Cilium does).
pub fn prefix(text: &str) -> Result<IpNet, String> {
    if text.is_empty() {
        return Err("a CIDR prefix is required here".into());
    }
    if !text.contains('/') {
        return Err(format!(
            "{text:?} needs a prefix length here (e.g. {text}/{})",
            if text.contains(':') { 128 } else { 32 }
        ));
    }
    match text.parse::<IpNet>() {
        Ok(n) => Ok(n.trunc()),
        Err(_) => Err(format!("{text:?} is not a valid CIDR prefix")),
    }
}

/// An `except` entry of a CIDR set: a prefix inside `cidr` of the same family.
pub fn except_of(cidr: &IpNet, text: &str) -> Result<IpNet, String> {
    let ex = prefix(text)?;
    let same_family = matches!(
        (cidr, &ex),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    );
    if !same_family {
        return Err(format!(
            "except {text:?} is not the same address family as cidr {cidr}"
        ));
    }
    if !cidr.contains(&ex) {
        return Err(format!("except {text:?} is not inside cidr {cidr}"));
    }
    Ok(ex)
}

pub const ENTITIES: &[(&str, Entity)] = &[
    ("all", Entity::All),
    ("world", Entity::World),
    ("world-ipv4", Entity::WorldIpv4),
    ("world-ipv6", Entity::WorldIpv6),
    ("host", Entity::Host),
    ("remote-node", Entity::RemoteNode),
    ("cluster", Entity::Cluster),
    ("init", Entity::Init),
    ("health", Entity::Health),
    ("unmanaged", Entity::Unmanaged),
    ("ingress", Entity::Ingress),
    ("kube-apiserver", Entity::KubeApiserver),
    ("none", Entity::None),
];

pub fn entity(text: &str) -> Result<Entity, String> {
    if let Some((_, e)) = ENTITIES.iter().find(|(n, _)| *n == text) {
        return Ok(*e);
    }
    let names: Vec<&str> = ENTITIES.iter().map(|(n, _)| *n).collect();
    let hint = match super::de::suggest(text, &names) {
        Some(s) => format!(" (did you mean {s:?}?)"),
        None => String::new(),
    };
    Err(format!(
        "unknown entity {text:?}{hint}; known entities: {}",
        names.join(", ")
    ))
}

/// Cilium's ICMP type names (`pkg/policy/api/icmp.go`).
const ICMP4_NAMES: &[(&str, u8)] = &[
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];

const ICMP6_NAMES: &[(&str, u8)] = &[
    ("DestinationUnreachable", 1),
    ("PacketTooBig", 2),
    ("TimeExceeded", 3),
    ("ParameterProblem", 4),
    ("EchoRequest", 128),
    ("EchoReply", 129),
    ("MulticastListenerQuery", 130),
    ("MulticastListenerReport", 131),
    ("MulticastListenerDone", 132),
    ("RouterSolicitation", 133),
    ("RouterAdvertisement", 134),
    ("NeighborSolicitation", 135),
    ("NeighborAdvertisement", 136),
    ("RedirectMessage", 137),
    ("RouterRenumbering", 138),
    ("ICMPNodeInformationQuery", 139),
    ("ICMPNodeInformationResponse", 140),
    ("InverseNeighborDiscoverySolicitation", 141),
    ("InverseNeighborDiscoveryAdvertisement", 142),
    ("HomeAgentAddressDiscoveryRequest", 144),
    ("HomeAgentAddressDiscoveryReply", 145),
    ("MobilePrefixSolicitation", 146),
    ("MobilePrefixAdvertisement", 147),
    ("DuplicateAddressRequestCodeSuffix", 157),
    ("DuplicateAddressConfirmationCodeSuffix", 158),
    ("ExtendedEchoRequest", 160),
    ("ExtendedEchoReply", 161),
];

pub fn icmp_type_name(family: Family, name: &str) -> Result<u8, String> {
    let table = match family {
        Family::V4 => ICMP4_NAMES,
        Family::V6 => ICMP6_NAMES,
    };
    if let Some((_, t)) = table.iter().find(|(n, _)| *n == name) {
        return Ok(*t);
    }
    let fam = match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    };
    let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
    let hint = match super::de::suggest(name, &names) {
        Some(s) => format!(" (did you mean {s:?}?)"),
        None => String::new(),
    };
    Err(format!(
        "{name:?} is not an {fam} ICMP type{hint}; write a number 0-255 or one of: {}",
        names.join(", ")
    ))
}

/// Linux interface name rules (`dev_valid_name`).
pub fn interface_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("interface name must not be empty".into());
    }
    if s.len() > 15 {
        return Err(format!("interface name {s:?} is longer than 15 characters"));
    }
    if s == "." || s == ".." || s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(format!(
            "{s:?} is not a valid interface name (no '/', ':' or whitespace; not \".\" or \"..\")"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svc_names() {
        assert!(is_svc_name("http"));
        assert!(is_svc_name("0x10"));
        assert!(is_svc_name("h2-c"));
        assert!(!is_svc_name("80"));
        assert!(!is_svc_name("-http"));
        assert!(!is_svc_name("a--b"));
        assert!(!is_svc_name("sixteen-chars-xx"));
        assert!(!is_svc_name("8o!"));
    }

    #[test]
    fn ports() {
        assert!(matches!(cilium_port("80"), Ok(PortText::Number(80))));
        assert!(matches!(cilium_port("0"), Ok(PortText::Number(0))));
        assert!(matches!(cilium_port("HTTP"), Ok(PortText::Name(n)) if n == "http"));
        assert!(matches!(cilium_port("8o"), Ok(PortText::Name(_))));
        assert!(cilium_port("65536").is_err());
        assert!(cilium_port("080").is_err());
        assert_eq!(
            cilium_port("8.0").err().unwrap(),
            "\"8.0\" is not a port number or name"
        );
    }

    #[test]
    fn keys() {
        assert_eq!(
            selector_key("k8s:app"),
            LabelKey {
                source: Some("k8s".into()),
                key: "app".into()
            }
        );
        assert_eq!(
            selector_key("app"),
            LabelKey {
                source: None,
                key: "app".into()
            }
        );
        assert_eq!(
            selector_key("any:app"),
            LabelKey {
                source: None,
                key: "app".into()
            }
        );
        assert_eq!(
            selector_key("$host"),
            LabelKey {
                source: Some("reserved".into()),
                key: "host".into()
            }
        );
        assert!(cilium_selector_key("app.kubernetes.io/name").is_ok());
        assert!(cilium_selector_key("k8s:io.kubernetes.pod.namespace").is_ok());
        assert!(cilium_selector_key("bad key").is_err());
        assert!(qualified_name("a/b/c").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(cidr_or_ip("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert_eq!(cidr_or_ip("fd00::1").unwrap().to_string(), "fd00::1/128");
        assert_eq!(prefix("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(prefix("10.0.0.1").is_err());
        let c = prefix("10.0.0.0/8").unwrap();
        assert!(except_of(&c, "10.96.0.0/12").is_ok());
        assert!(except_of(&c, "11.0.0.0/12").is_err());
        assert!(except_of(&c, "fd00::/64").is_err());
        assert!(except_of(&c, "0.0.0.0/4").is_err());
    }
}

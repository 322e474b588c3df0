//! Small validators shared by the policy and registry translation: label keys and
//! values (Kubernetes rules), selector keys with Cilium's `source:` prefix,
//! ports and IANA service names, CIDRs, entities and ICMP type names.
//!
//! Each returns `Err(message)` with a message a user can act on; the caller adds
//! the file, document and field path.

use std::net::IpAddr;

use ipnet::IpNet;

use super::model::{Entity, Family, LabelKey, Proto};

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

/// An object name as Kubernetes wants it (k8s.io/apimachinery
/// pkg/util/validation/validation.go `IsDNS1123Subdomain`): at most 253
/// characters of `[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*`
/// (a part between dots is not limited to 63 characters, unlike a label prefix).
pub fn dns_subdomain_name(name: &str) -> Result<(), String> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !p.starts_with('-')
            && !p.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(part_ok) {
        return Ok(());
    }
    let mut msg = format!(
        "{name:?} is not a valid name: Kubernetes wants lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"
    );
    // The nearest valid name, when there is an obvious one.
    let lower: String = name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.') => c,
            _ => '-',
        })
        .collect();
    let fixed: Vec<&str> = lower
        .split('.')
        .map(|p| p.trim_matches('-'))
        .filter(|p| !p.is_empty())
        .collect();
    let fixed = fixed.join(".");
    if !fixed.is_empty() && fixed.len() <= 253 {
        msg.push_str(&format!(", e.g. {fixed:?}"));
    }
    Err(msg)
}

/// A selector key as Cilium reads it (`labels.GetExtendedKeyFrom`): `source:key`,
/// `$key` for `reserved:key`, or a plain key matching any source.
pub fn selector_key(raw: &str) -> LabelKey {
    if let Some(rest) = raw.strip_prefix('$') {
        return LabelKey {
            source: Some("reserved".into()),
            key: rest.into(),
        };
    }
    match raw.split_once(':') {
        Some((src, key)) if !src.is_empty() && src != "any" => LabelKey {
            source: Some(src.into()),
            key: key.into(),
        },
        Some((_, key)) => LabelKey {
            source: None,
            key: key.into(),
        },
        None => LabelKey {
            source: None,
            key: raw.into(),
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
            // Cilium's agent: strconv.ParseUint(port, 0, 16) (rule_validation.go
            // `PortProtocol.Validate`), so a leading zero means octal there.
            let decimal = text.trim_start_matches('0');
            let decimal = if decimal.is_empty() { "0" } else { decimal };
            let octal = u32::from_str_radix(&text[1..], 8)
                .ok()
                .filter(|n| *n <= 65535);
            return Err(match octal {
                Some(o) if o.to_string() != decimal => format!(
                    "{text:?} has a leading zero, which Cilium reads as the octal number {o}; write \"{decimal}\" (or \"{o}\")"
                ),
                _ => format!(
                    "{text:?} has a leading zero, which Cilium reads as an octal number; write \"{decimal}\""
                ),
            });
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

/// `text` without leading zeros in its IPv4 octets and its prefix length, if it
/// has any (`010.0.0.0/08` → `10.0.0.0/8`), and which of them had one.
fn without_leading_zeros(text: &str) -> Option<(String, &'static str)> {
    let trim = |d: &str| -> Option<String> {
        (d.len() > 1 && d.starts_with('0') && d.bytes().all(|b| b.is_ascii_digit()))
            .then(|| d.trim_start_matches('0').to_string())
            .map(|t| if t.is_empty() { "0".into() } else { t })
    };
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let octets: Vec<&str> = addr.split('.').collect();
    let mut what = None;
    let addr = if octets.len() == 4 && octets.iter().any(|o| trim(o).is_some()) {
        what = Some("an IPv4 octet");
        let fixed: Vec<String> = octets
            .iter()
            .map(|o| trim(o).unwrap_or_else(|| o.to_string()))
            .collect();
        fixed.join(".")
    } else {
        addr.to_string()
    };
    let len = match len {
        Some(l) => match trim(l) {
            Some(t) => {
                what = what.or(Some("a prefix length"));
                Some(t)
            }
            None => Some(l.to_string()),
        },
        None => None,
    };
    let what = what?;
    Some((
        match len {
            Some(l) => format!("{addr}/{l}"),
            None => addr,
        },
        what,
    ))
}

/// A prefix in `address/length` notation (host bits are cleared, as Cilium
/// does): every CIDR field of every kind. The CRD's `format: cidr` needs the
/// length (so `fromCIDR: [10.0.0.1]`, which Cilium's agent alone would take,
/// is refused); Go's `netip.ParsePrefix` (Cilium's agent,
/// pkg/policy/api/rule_validation.go `CIDR.Validate`/`CIDRRule.Validate`, and
/// Kubernetes' strict CIDR validation) refuses leading zeros, which some readers
/// take for octal.
pub fn prefix(text: &str) -> Result<IpNet, String> {
    if text.is_empty() {
        return Err("a CIDR prefix is required here".into());
    }
    let full = |a: &str| if a.contains(':') { 128 } else { 32 };
    if let Some((fixed, what)) = without_leading_zeros(text) {
        let fixed = if fixed.contains('/') {
            fixed
        } else {
            format!("{fixed}/{}", full(&fixed))
        };
        if fixed.parse::<IpNet>().is_ok() {
            return Err(format!(
                "{text:?} has {what} with a leading zero, which Cilium refuses (and some tools read as octal); write {fixed}"
            ));
        }
    }
    if !text.contains('/') {
        return Err(match text.parse::<IpAddr>() {
            Ok(_) => format!(
                "{text:?} needs a prefix length: write {text}/{}",
                full(text)
            ),
            Err(_) => format!(
                "{text:?} is not a CIDR prefix (an address and a prefix length, such as 10.0.0.0/8)"
            ),
        });
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

/// Why a Cilium cluster refuses an entity its agent knows, if it does: the CRD's
/// `Entity` enum leaves out `world-ipv4` and `world-ipv6` (cilium/cilium
/// pkg/policy/api/entity.go `EntitySelectorMapping` has them).
pub fn entity_not_in_crd(e: Entity) -> Option<String> {
    let (name, cidr) = match e {
        Entity::WorldIpv4 => ("world-ipv4", "0.0.0.0/0"),
        Entity::WorldIpv6 => ("world-ipv6", "::/0"),
        _ => return None,
    };
    Some(format!(
        "{name} is not in the entity list of Cilium's CRD, so a Cilium cluster refuses it (its agent alone knows it); write world, or a CIDR rule for {cidr}, to be portable"
    ))
}

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

/// The name the CRD's `type` pattern misspells as `ExtendedEcho Reply`
/// (ciliumnetworkpolicies.yaml, from pkg/policy/api/icmp.go's kubebuilder
/// marker): the pattern refuses the real name and the agent the misspelt one.
const UNUSABLE_ICMP_NAME: &str = "ExtendedEchoReply";

pub fn icmp_type_name(family: Family, name: &str) -> Result<u8, String> {
    let table = match family {
        Family::V4 => ICMP4_NAMES,
        Family::V6 => ICMP6_NAMES,
    };
    if let Some((_, t)) = table.iter().find(|(n, _)| *n == name) {
        if name == UNUSABLE_ICMP_NAME {
            return Err(format!("a Cilium cluster refuses the name {name} (its CRD spells it \"ExtendedEcho Reply\", which its agent does not know); write the number {t}"));
        }
        return Ok(*t);
    }
    let fam = match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    };
    let names: Vec<&str> = table
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| *n != UNUSABLE_ICMP_NAME)
        .collect();
    let hint = match super::de::suggest(name, &names) {
        Some(s) => format!(" (did you mean {s:?}?)"),
        None => String::new(),
    };
    Err(format!(
        "{name:?} is not an {fam} ICMP type{hint}; write a number 0-255 or one of: {}",
        names.join(", ")
    ))
}

/// An ICMP `type` written as a string: a number as the CRD's pattern has it
/// (`0`-`255`, no leading zero), or a name.
pub fn icmp_type_text(family: Family, s: &str) -> Result<u8, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return icmp_type_name(family, s);
    }
    let n = s
        .parse::<u8>()
        .map_err(|_| format!("ICMP type {s} is out of range; it must be 0-255"))?;
    if s.len() > 1 && s.starts_with('0') {
        return Err(format!(
            "ICMP type {s:?} has a leading zero, which a Cilium cluster refuses; write {n}"
        ));
    }
    Ok(n)
}

/// An ICMP `family`: the CRD's enum (`IPv4`, `IPv6`, case-sensitive); absent
/// means IPv4 (its default). An empty string passes Cilium's agent
/// (`ICMPRule.Validate`) but not the CRD.
pub fn icmp_family(family: Option<&str>) -> Result<Family, String> {
    match family {
        None | Some("IPv4") => Ok(Family::V4),
        Some("IPv6") => Ok(Family::V6),
        Some("") => Err("family \"\" is refused by a Cilium cluster (its CRD lists IPv4 and IPv6); write IPv4, or leave family out for IPv4".into()),
        Some(other) => Err(format!(
            "{other:?} is not a valid family; use IPv4 or IPv6 (case-sensitive)"
        )),
    }
}

/// `toPorts[].ports[].protocol` of a Cilium rule: the CRD's enum, which is
/// case-sensitive and has no empty string (TCP, UDP, SCTP, VRRP, IGMP, ANY;
/// absent means ANY). netpol enforces no VRRP or IGMP.
pub fn cilium_protocol(protocol: Option<&str>) -> Result<Proto, String> {
    let p = match protocol {
        None | Some("ANY") => return Ok(Proto::Any),
        Some("TCP") => return Ok(Proto::Tcp),
        Some("UDP") => return Ok(Proto::Udp),
        Some("SCTP") => return Ok(Proto::Sctp),
        Some(p) => p,
    };
    let up = p.to_ascii_uppercase();
    Err(match up.as_str() {
        "" => "protocol \"\" is refused by a Cilium cluster (its CRD lists TCP, UDP, SCTP, VRRP, IGMP and ANY); write ANY, or leave protocol out, for every protocol".into(),
        "TCP" | "UDP" | "SCTP" | "ANY" => {
            format!("{p:?} is not a valid protocol (protocol names are upper case): write {up}")
        }
        "VRRP" | "IGMP" => format!(
            "{p:?} is not supported by netpol (it enforces TCP, UDP, SCTP and ICMP); use TCP, UDP, SCTP or ANY"
        ),
        _ if up.starts_with("ICMP") => format!(
            "{p:?} is not a valid protocol (for ICMP write an icmps rule); use TCP, UDP, SCTP or ANY"
        ),
        _ => format!("{p:?} is not a valid protocol; use TCP, UDP, SCTP or ANY"),
    })
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

/// A registry object name: non-empty, no '/', no whitespace.
pub fn object_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("metadata.name must not be empty".into());
    }
    if name.len() > 253 {
        return Err(format!("name {name:?} is longer than 253 characters"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("name {name:?} must not contain '/' or whitespace"));
    }
    Ok(())
}

/// Longest `matchName` / `matchPattern` (Cilium's CRD `maxLength`, and
/// `matchpattern.MaxFQDNLength`).
pub const MAX_FQDN_LENGTH: usize = 255;

fn fqdn_text(field: &str, text: &str, star: bool) -> Result<(), String> {
    let what = if star {
        "letters, digits, '-', '_' and '*'"
    } else {
        "letters, digits, '-' and '_'"
    };
    if text.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if text.len() > MAX_FQDN_LENGTH {
        return Err(format!(
            "{field} is {} characters long; at most {MAX_FQDN_LENGTH} are allowed",
            text.len()
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || (star && c == '*');
    if let Some(c) = text.chars().find(|c| !allowed(*c) && *c != '.') {
        return Err(format!(
            "{text:?} has {c:?}; a {field} takes {what}, in labels separated by '.'"
        ));
    }
    // The CRD's pattern `^([-a-zA-Z0-9_]+[.]?)+$` (with `*` for matchPattern):
    // no empty label, so no leading '.' and no "..", a trailing '.' allowed.
    if text.starts_with('.') || text.contains("..") {
        return Err(format!(
            "{text:?} has an empty label; a {field} is labels separated by single dots (a trailing '.' is allowed)"
        ));
    }
    Ok(())
}

/// The name with Cilium's normalisation (`dns.FQDN`, then lower case): a
/// trailing dot, lower case.
fn fqdn(text: &str) -> String {
    let mut s = text.to_ascii_lowercase();
    if !s.ends_with('.') {
        s.push('.');
    }
    s
}

/// `matchName` (Cilium's CRD pattern and `allowedMatchNameChars`), normalised.
pub fn fqdn_name(text: &str) -> Result<String, String> {
    fqdn_text("matchName", text, false)?;
    Ok(fqdn(text))
}

/// `matchPattern` (Cilium's CRD pattern and `matchpattern.Validate`),
/// normalised as `matchpattern.Sanitize` does: a pattern of stars alone
/// (`*`, `**.`) stays as written, anything else gets its trailing dot.
pub fn fqdn_pattern(text: &str) -> Result<String, String> {
    fqdn_text("matchPattern", text, true)?;
    let body = text.strip_suffix('.').unwrap_or(text);
    if !body.is_empty() && body.bytes().all(|b| b == b'*') {
        return Ok(text.to_string());
    }
    Ok(fqdn(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomain_names() {
        assert!(dns_subdomain_name("web").is_ok());
        assert!(dns_subdomain_name("a.b-c.0").is_ok());
        assert!(dns_subdomain_name(&"a".repeat(100)).is_ok());
        assert!(dns_subdomain_name(&"a".repeat(254)).is_err());
        for (bad, hint) in [
            ("Bad_Name", Some("bad-name")),
            ("-web", Some("web")),
            ("web-", Some("web")),
            ("a..b", Some("a.b")),
            ("___", None),
        ] {
            let e = dns_subdomain_name(bad).unwrap_err();
            match hint {
                Some(h) => assert!(e.ends_with(&format!(", e.g. {h:?}")), "{e}"),
                None => assert!(e.ends_with("at most 253 characters"), "{e}"),
            }
        }
    }

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
        assert_eq!(prefix("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(prefix("fd00::1/128").unwrap().to_string(), "fd00::1/128");
        let zero = "with a leading zero, which Cilium refuses (and some tools read as octal)";
        for (text, err) in [
            (
                "10.0.0.1",
                "needs a prefix length: write 10.0.0.1/32".to_string(),
            ),
            ("fd00::1", "needs a prefix length: write fd00::1/128".into()),
            (
                "010.0.0.0/8",
                format!("has an IPv4 octet {zero}; write 10.0.0.0/8"),
            ),
            (
                "10.0.0.0/08",
                format!("has a prefix length {zero}; write 10.0.0.0/8"),
            ),
            (
                "fd00::/064",
                format!("has a prefix length {zero}; write fd00::/64"),
            ),
        ] {
            assert_eq!(prefix(text).unwrap_err(), format!("{text:?} {err}"));
        }
        assert!(prefix("0.0.0.0/0").is_ok());
        assert!(prefix("fd00:0000::/16").is_ok());
        assert_eq!(
            prefix("010.0.0.256/8").unwrap_err(),
            "\"010.0.0.256/8\" is not a valid CIDR prefix"
        );
        let c = prefix("10.0.0.0/8").unwrap();
        assert!(except_of(&c, "10.96.0.0/12").is_ok());
        assert!(except_of(&c, "11.0.0.0/12").is_err());
        assert!(except_of(&c, "fd00::/64").is_err());
        assert!(except_of(&c, "0.0.0.0/4").is_err());
    }
}

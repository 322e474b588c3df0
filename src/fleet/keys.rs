//! The etcd key layout of fleet mode (DESIGN §5a), defined once.
//!
//! ```text
//! <prefix>/registry/nodes/<node>/node                     Node           lease(node)
//! <prefix>/registry/nodes/<node>/endpoints/<ns>/<name>    Endpoint       lease(node)
//! <prefix>/registry/nodes/<node>/hostendpoints/<name>     HostEndpoint   lease(node)
//! <prefix>/registry/static/endpoints/<ns>/<name>          Endpoint       admin, no lease
//! <prefix>/registry/namespaces/<name>                     Namespace      admin, no lease
//! <prefix>/policysets/<id>/<file>                         one policy document
//! <prefix>/policyset-current                              the current set's id
//! <prefix>/status/<node>                                  status         lease(node)
//! ```
//!
//! The node comes first so that one etcd role grants one node exactly its own
//! prefix. Every host watches one key range, `[<prefix>/policyset,
//! <prefix>/registry0)`: it holds `policyset-current`, `policysets/` and
//! `registry/` and nothing else netpol writes. `status/` sorts after it, so a
//! host's status write is never an event for the other hosts (inside the watched
//! range every apply would cause a write that causes an apply on every peer).
//!
//! Pure: no I/O.

/// The key layout under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// Without a trailing '/'.
    prefix: String,
}

/// What a key under the prefix stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    Node {
        node: String,
    },
    Endpoint {
        node: String,
        namespace: String,
        name: String,
    },
    HostEndpoint {
        node: String,
        name: String,
    },
    StaticEndpoint {
        namespace: String,
        name: String,
    },
    Namespace {
        name: String,
    },
    PolicyFile {
        id: String,
        file: String,
    },
    PolicySetCurrent,
    Status {
        node: String,
    },
}

impl KeyKind {
    /// The node whose prefix holds the key (its lease owns it).
    pub fn node(&self) -> Option<&str> {
        match self {
            KeyKind::Node { node }
            | KeyKind::Endpoint { node, .. }
            | KeyKind::HostEndpoint { node, .. } => Some(node),
            _ => None,
        }
    }

    /// An endpoint key (Endpoint, HostEndpoint, static Endpoint): what the
    /// mass-removal guard counts.
    pub fn is_endpoint(&self) -> bool {
        matches!(
            self,
            KeyKind::Endpoint { .. }
                | KeyKind::HostEndpoint { .. }
                | KeyKind::StaticEndpoint { .. }
        )
    }
}

/// A key segment: non-empty, no '/', no whitespace or control characters.
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && !s
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
}

/// The end of the key range of every key starting with `prefix` (etcd's
/// `WithPrefix`): the prefix with its last byte incremented.
pub fn prefix_end(prefix: &str) -> String {
    let mut b = prefix.as_bytes().to_vec();
    while let Some(last) = b.pop() {
        if last < 0x7f {
            b.push(last + 1);
            // Incrementing an ASCII byte keeps UTF-8 valid.
            return String::from_utf8(b).expect("ASCII increment");
        }
    }
    // No byte can be incremented within ASCII: every key from here on.
    "\u{7f}".repeat(prefix.len() + 1)
}

impl Keys {
    /// `prefix` as configured (`/netpol/v1`); a trailing '/' is dropped.
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/registry/`.
    pub fn registry(&self) -> String {
        format!("{}/registry/", self.prefix)
    }

    /// `<prefix>/registry/nodes/<node>/`: one node's write scope.
    pub fn node_prefix(&self, node: &str) -> String {
        format!("{}/registry/nodes/{node}/", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}node", self.node_prefix(node))
    }

    pub fn endpoint(&self, node: &str, namespace: &str, name: &str) -> String {
        format!("{}endpoints/{namespace}/{name}", self.node_prefix(node))
    }

    pub fn host_endpoint(&self, node: &str, name: &str) -> String {
        format!("{}hostendpoints/{name}", self.node_prefix(node))
    }

    /// `<prefix>/registry/static/`.
    pub fn static_prefix(&self) -> String {
        format!("{}/registry/static/", self.prefix)
    }

    pub fn static_endpoint(&self, namespace: &str, name: &str) -> String {
        format!("{}endpoints/{namespace}/{name}", self.static_prefix())
    }

    /// `<prefix>/registry/namespaces/`.
    pub fn namespaces_prefix(&self) -> String {
        format!("{}/registry/namespaces/", self.prefix)
    }

    pub fn namespace(&self, name: &str) -> String {
        format!("{}{name}", self.namespaces_prefix())
    }

    /// `<prefix>/policysets/`.
    pub fn policysets(&self) -> String {
        format!("{}/policysets/", self.prefix)
    }

    /// `<prefix>/policysets/<id>/`.
    pub fn policyset(&self, id: &str) -> String {
        format!("{}{id}/", self.policysets())
    }

    pub fn policy_file(&self, id: &str, file: &str) -> String {
        format!("{}{file}", self.policyset(id))
    }

    pub fn policyset_current(&self) -> String {
        format!("{}/policyset-current", self.prefix)
    }

    /// `<prefix>/status/`.
    pub fn status_prefix(&self) -> String {
        format!("{}/status/", self.prefix)
    }

    pub fn status(&self, node: &str) -> String {
        format!("{}{node}", self.status_prefix())
    }

    /// The one key range every host lists and watches: `[start, end)`.
    pub fn watched(&self) -> (String, String) {
        (
            format!("{}/policyset", self.prefix),
            format!("{}/registry0", self.prefix),
        )
    }

    /// What `key` stands for. `Ok(None)`: a key netpol does not read (outside
    /// the layout but not under `registry/` or `policysets/`). `Err`: under
    /// `registry/` or `policysets/` but not of the layout — a writer's mistake
    /// worth reporting.
    pub fn parse(&self, key: &str) -> Result<Option<KeyKind>, String> {
        let Some(rest) = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Ok(None);
        };
        if rest == "policyset-current" {
            return Ok(Some(KeyKind::PolicySetCurrent));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let bad = |what: &str| -> Result<Option<KeyKind>, String> {
            Err(format!("key is not of netpol's layout: {what}"))
        };
        let seg = |i: usize| parts.get(i).copied().filter(|s| valid_segment(s));
        let s = |x: &str| x.to_string();
        match parts.first().copied() {
            Some("registry") => {}
            Some("policysets") => {
                return match (parts.len(), seg(1), seg(2)) {
                    (3, Some(id), Some(file)) => Ok(Some(KeyKind::PolicyFile {
                        id: s(id),
                        file: s(file),
                    })),
                    _ => bad("expected policysets/<id>/<file>"),
                };
            }
            Some("status") => {
                return match (parts.len(), seg(1)) {
                    (2, Some(node)) => Ok(Some(KeyKind::Status { node: s(node) })),
                    _ => Ok(None),
                };
            }
            _ => return Ok(None),
        }
        match parts.get(1).copied() {
            Some("nodes") => {
                let Some(node) = seg(2) else {
                    return bad("expected registry/nodes/<node>/...");
                };
                match (parts.get(3).copied(), parts.len()) {
                    (Some("node"), 4) => Ok(Some(KeyKind::Node { node: s(node) })),
                    (Some("endpoints"), 6) => match (seg(4), seg(5)) {
                        (Some(ns), Some(name)) => Ok(Some(KeyKind::Endpoint {
                            node: s(node),
                            namespace: s(ns),
                            name: s(name),
                        })),
                        _ => bad("expected registry/nodes/<node>/endpoints/<namespace>/<name>"),
                    },
                    (Some("hostendpoints"), 5) => match seg(4) {
                        Some(name) => Ok(Some(KeyKind::HostEndpoint {
                            node: s(node),
                            name: s(name),
                        })),
                        None => bad("expected registry/nodes/<node>/hostendpoints/<name>"),
                    },
                    _ => bad("expected registry/nodes/<node>/node, .../endpoints/<namespace>/<name> or .../hostendpoints/<name>"),
                }
            }
            Some("static") => match (parts.get(2).copied(), parts.len(), seg(3), seg(4)) {
                (Some("endpoints"), 5, Some(ns), Some(name)) => Ok(Some(KeyKind::StaticEndpoint {
                    namespace: s(ns),
                    name: s(name),
                })),
                _ => bad("expected registry/static/endpoints/<namespace>/<name>"),
            },
            Some("namespaces") => match (parts.len(), seg(2)) {
                (3, Some(name)) => Ok(Some(KeyKind::Namespace { name: s(name) })),
                _ => bad("expected registry/namespaces/<name>"),
            },
            _ => bad("expected registry/nodes/, registry/static/ or registry/namespaces/"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_design_5a() {
        let k = Keys::new("/netpol/v1/");
        assert_eq!(k.node("a"), "/netpol/v1/registry/nodes/a/node");
        assert_eq!(
            k.endpoint("a", "prod", "web"),
            "/netpol/v1/registry/nodes/a/endpoints/prod/web"
        );
        assert_eq!(
            k.host_endpoint("a", "eth0"),
            "/netpol/v1/registry/nodes/a/hostendpoints/eth0"
        );
        assert_eq!(
            k.static_endpoint("default", "vm1"),
            "/netpol/v1/registry/static/endpoints/default/vm1"
        );
        assert_eq!(k.namespace("prod"), "/netpol/v1/registry/namespaces/prod");
        assert_eq!(
            k.policy_file("s1", "web.yaml"),
            "/netpol/v1/policysets/s1/web.yaml"
        );
        assert_eq!(k.policyset_current(), "/netpol/v1/policyset-current");
        assert_eq!(k.status("a"), "/netpol/v1/status/a");
    }

    #[test]
    fn every_key_parses_back() {
        let k = Keys::new("/netpol/v1");
        let cases = [
            (k.node("a"), KeyKind::Node { node: "a".into() }),
            (
                k.endpoint("a", "prod", "web"),
                KeyKind::Endpoint {
                    node: "a".into(),
                    namespace: "prod".into(),
                    name: "web".into(),
                },
            ),
            (
                k.host_endpoint("a", "eth0"),
                KeyKind::HostEndpoint {
                    node: "a".into(),
                    name: "eth0".into(),
                },
            ),
            (
                k.static_endpoint("default", "vm1"),
                KeyKind::StaticEndpoint {
                    namespace: "default".into(),
                    name: "vm1".into(),
                },
            ),
            (
                k.namespace("prod"),
                KeyKind::Namespace {
                    name: "prod".into(),
                },
            ),
            (
                k.policy_file("s1", "web.yaml#2"),
                KeyKind::PolicyFile {
                    id: "s1".into(),
                    file: "web.yaml#2".into(),
                },
            ),
            (k.policyset_current(), KeyKind::PolicySetCurrent),
            (k.status("a"), KeyKind::Status { node: "a".into() }),
        ];
        for (key, want) in cases {
            assert_eq!(k.parse(&key), Ok(Some(want)), "{key}");
        }
        assert_eq!(k.parse("/other/x"), Ok(None));
        assert_eq!(k.parse("/netpol/v1/heartbeat"), Ok(None));
        assert!(k
            .parse("/netpol/v1/registry/nodes/a/endpoints/web")
            .is_err());
        assert!(k.parse("/netpol/v1/registry/nodes//node").is_err());
        assert!(k.parse("/netpol/v1/registry/pods/x").is_err());
        assert!(k.parse("/netpol/v1/policysets/s1").is_err());
    }

    /// Everything netpol reads sorts inside the watched range; status after it.
    #[test]
    fn watched_range_holds_registry_and_policies_but_not_status() {
        let k = Keys::new("/netpol/v1");
        let (start, end) = k.watched();
        let inside = |key: &str| key >= start.as_str() && key < end.as_str();
        for key in [
            k.node("zzzz"),
            k.endpoint("a", "b", "c"),
            k.static_endpoint("x", "y"),
            k.namespace("zz"),
            k.policy_file("id", "f.yaml"),
            k.policyset_current(),
        ] {
            assert!(inside(&key), "{key}");
        }
        assert!(!inside(&k.status("a")));
        assert!(!inside(&k.status("")));
        assert_eq!(prefix_end("/netpol/v1/"), "/netpol/v10");
    }
}

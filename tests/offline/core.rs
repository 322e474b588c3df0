//! The pure core against hand-built model values: selection, default deny, deny
//! precedence, ports, ICMP, CIDRs, entities, namespaces, NetworkPolicy semantics,
//! named ports, identities, ipcache and trace. Every verdict goes through
//! `policy::trace`, i.e. through the compiled entries and the lookup contract.

use std::net::IpAddr;
use std::sync::Arc;

use netpol::api::build::{k8s, origin, req};
use netpol::api::model::*;
use netpol::policy::compile::{compile, CompileOptions};
use netpol::policy::identity as ids;
use netpol::policy::lookup;
use netpol::policy::trace::{trace_str, DirVerdict, Reason, Verdict};
use netpol::policy::types::{proto, Compiled, Direction, EntryVerdict};

// ---------------------------------------------------------------- builders

fn ep(ns: &str, name: &str, labels: &[(&str, &str)], addrs: &[&str]) -> EndpointDef {
    EndpointDef {
        origin: origin("Endpoint", Some(ns), name),
        kind: EndpointKind::Workload,
        name: name.into(),
        namespace: Some(ns.into()),
        labels: labels.iter().map(|(k, v)| k8s(k, v)).collect(),
        node: None,
        interface: Some(Interface::Name(format!("veth-{name}"))),
        addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        ports: vec![],
        audit: false,
    }
}

fn with_ports(mut e: EndpointDef, ports: &[(&str, u16, Proto)]) -> EndpointDef {
    e.ports = ports
        .iter()
        .map(|(n, p, pr)| NamedPort {
            name: n.to_string(),
            port: *p,
            proto: *pr,
        })
        .collect();
    e
}

fn hep(name: &str, labels: &[(&str, &str)], addrs: &[&str]) -> EndpointDef {
    EndpointDef {
        origin: origin("HostEndpoint", None, name),
        kind: EndpointKind::Host,
        name: name.into(),
        namespace: None,
        labels: labels.iter().map(|(k, v)| k8s(k, v)).collect(),
        node: None,
        interface: Some(Interface::Name("eth0".into())),
        addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        ports: vec![],
        audit: false,
    }
}

/// matchLabels (source any).
fn sel(pairs: &[(&str, &str)]) -> Selector {
    Selector {
        requirements: pairs
            .iter()
            .map(|(k, v)| req(None, k, Op::In, &[v]))
            .collect(),
    }
}

/// A selector scoped to a namespace, as the parser scopes CNP selectors.
fn nsel(ns: &str, pairs: &[(&str, &str)]) -> Selector {
    let mut s = sel(pairs);
    s.requirements.push(req(
        Some("k8s"),
        "io.kubernetes.pod.namespace",
        Op::In,
        &[ns],
    ));
    s
}

/// A CCNP peer selector: any pod (namespace label exists).
fn csel(pairs: &[(&str, &str)]) -> Selector {
    let mut s = sel(pairs);
    s.requirements.push(req(
        Some("k8s"),
        "io.kubernetes.pod.namespace",
        Op::Exists,
        &[],
    ));
    s
}

fn item(peers: Peers, l4: L4) -> RuleItem {
    RuleItem {
        path: String::new(),
        pos: None,
        peers,
        l4,
        dns: Vec::new(),
    }
}
fn from_eps(s: Vec<Selector>) -> Peers {
    Peers::List(s.into_iter().map(Peer::Endpoints).collect())
}
fn entities(e: &[Entity]) -> Peers {
    Peers::List(e.iter().map(|e| Peer::Entity(*e)).collect())
}
fn cidr(net: &str, except: &[&str]) -> Peer {
    Peer::Cidr {
        net: net.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
        match_endpoints: false,
    }
}
fn ipblock(net: &str, except: &[&str]) -> Peer {
    Peer::Cidr {
        net: net.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
        match_endpoints: true,
    }
}
fn port(p: u16, pr: Proto) -> PortProto {
    PortProto {
        port: PortSpec::Number(p),
        end_port: None,
        proto: pr,
    }
}
fn range(p: u16, e: u16, pr: Proto) -> PortProto {
    PortProto {
        port: PortSpec::Number(p),
        end_port: Some(e),
        proto: pr,
    }
}
fn named(n: &str, pr: Proto) -> PortProto {
    PortProto {
        port: PortSpec::Named(n.into()),
        end_port: None,
        proto: pr,
    }
}
fn tcp(p: u16) -> L4 {
    L4::Ports(vec![port(p, Proto::Tcp)])
}

struct R(Rule);

impl R {
    fn eps(s: Selector) -> R {
        R(Rule {
            path: "spec".into(),
            subject: Subject::Endpoints(s),
            ingress: vec![],
            ingress_deny: vec![],
            egress: vec![],
            egress_deny: vec![],
            default_deny_ingress: None,
            default_deny_egress: None,
            isolate_ingress: false,
            isolate_egress: false,
        })
    }
    fn nodes(s: Selector) -> R {
        let mut r = R::eps(s);
        r.0.subject = Subject::Nodes(r.0.subject_selector());
        r
    }
    fn push(mut self, which: &str, mut it: RuleItem) -> R {
        let list = match which {
            "ingress" => &mut self.0.ingress,
            "ingressDeny" => &mut self.0.ingress_deny,
            "egress" => &mut self.0.egress,
            _ => &mut self.0.egress_deny,
        };
        it.path = format!("spec.{which}[{}]", list.len());
        list.push(it);
        self
    }
    fn ingress(self, it: RuleItem) -> R {
        self.push("ingress", it)
    }
    fn ingress_deny(self, it: RuleItem) -> R {
        self.push("ingressDeny", it)
    }
    fn egress(self, it: RuleItem) -> R {
        self.push("egress", it)
    }
    fn egress_deny(self, it: RuleItem) -> R {
        self.push("egressDeny", it)
    }
}

trait SubjectSel {
    fn subject_selector(&self) -> Selector;
}
impl SubjectSel for Rule {
    fn subject_selector(&self) -> Selector {
        match &self.subject {
            Subject::Endpoints(s) | Subject::Nodes(s) => s.clone(),
        }
    }
}

fn cnp(ns: &str, name: &str, rules: Vec<R>) -> Policy {
    Policy {
        origin: origin("CiliumNetworkPolicy", Some(ns), name),
        kind: PolicyKind::CiliumNetworkPolicy,
        rules: rules.into_iter().map(|r| r.0).collect(),
        staged: false,
        source: Default::default(),
    }
}
fn ccnp(name: &str, rules: Vec<R>) -> Policy {
    Policy {
        origin: origin("CiliumClusterwideNetworkPolicy", None, name),
        kind: PolicyKind::CiliumClusterwideNetworkPolicy,
        rules: rules.into_iter().map(|r| r.0).collect(),
        staged: false,
        source: Default::default(),
    }
}
fn knp(ns: &str, name: &str, rule: R) -> Policy {
    Policy {
        origin: origin("NetworkPolicy", Some(ns), name),
        kind: PolicyKind::NetworkPolicy,
        rules: vec![rule.0].into(),
        staged: false,
        source: Default::default(),
    }
}

/// One CiliumNetworkPolicy, `default/p`, with these rules, over `endpoints`.
fn build_cnp(rules: Vec<R>, endpoints: Vec<EndpointDef>) -> Compiled {
    build(vec![cnp("default", "p", rules)], endpoints)
}

fn build(policies: Vec<Policy>, endpoints: Vec<EndpointDef>) -> Compiled {
    build_opts(
        policies,
        endpoints,
        vec![],
        vec![],
        CompileOptions {
            node_name: "host-a".into(),
            ..Default::default()
        },
    )
}

fn build_opts(
    policies: Vec<Policy>,
    endpoints: Vec<EndpointDef>,
    nodes: Vec<NodeDef>,
    namespaces: Vec<NamespaceDef>,
    opts: CompileOptions,
) -> Compiled {
    let c = compile(
        &PolicySet {
            policies: policies.into_iter().map(Arc::new).collect(),
        },
        &RegistrySet {
            endpoints: endpoints.into_iter().map(Arc::new).collect(),
            nodes,
            namespaces,
        },
        &opts,
    );
    check_invariants(&c);
    c
}

fn check_invariants(c: &Compiled) {
    for w in c.entries.windows(2) {
        let k = |e: &netpol::policy::types::PolicyEntry| {
            (
                e.endpoint,
                e.direction,
                e.identity,
                e.proto,
                e.port,
                e.port_prefix,
            )
        };
        assert!(
            k(&w[0]) < k(&w[1]),
            "entries sorted without duplicate keys: {:?} {:?}",
            w[0],
            w[1]
        );
    }
    for e in &c.entries {
        assert!((e.rule as usize) < c.rules.len());
        if e.proto == 0 {
            assert_eq!((e.port, e.port_prefix), (0, 0));
        }
        if e.port_prefix < 16 && e.port_prefix > 0 {
            assert_eq!(e.port & (0xFFFFu16 >> e.port_prefix), 0, "port masked");
        }
    }
}

fn allowed(c: &Compiled, from: &str, to: &str, p: u8, port: u16) -> bool {
    match trace_str(c, from, to, p, port).unwrap().verdict {
        Verdict::Allowed => true,
        Verdict::Denied => false,
    }
}

const TCP: u8 = proto::TCP;
const UDP: u8 = proto::UDP;
const SCTP: u8 = proto::SCTP;
const ICMP: u8 = proto::ICMP;
const ICMP6: u8 = proto::ICMPV6;

fn seed_endpoints() -> Vec<EndpointDef> {
    vec![
        ep(
            "default",
            "frontend-1",
            &[("app", "frontend")],
            &["10.0.1.11", "fd00:1::11"],
        ),
        ep(
            "default",
            "frontend-2",
            &[("app", "frontend")],
            &["10.0.1.12", "fd00:1::12"],
        ),
        with_ports(
            ep(
                "default",
                "backend",
                &[("app", "backend")],
                &["10.0.1.21", "fd00:1::21"],
            ),
            &[("http", 80, Proto::Tcp)],
        ),
        with_ports(
            ep(
                "default",
                "database",
                &[("app", "database")],
                &["10.0.1.31", "fd00:1::31"],
            ),
            &[("postgres", 5432, Proto::Tcp)],
        ),
    ]
}

fn frontend_to_backend() -> Policy {
    cnp(
        "default",
        "frontend-to-backend",
        vec![R::eps(nsel("default", &[("app", "backend")])).ingress(item(
            from_eps(vec![nsel("default", &[("app", "frontend")])]),
            tcp(80),
        ))],
    )
}

fn frontend_egress_control() -> Policy {
    cnp(
        "default",
        "frontend-egress-control",
        vec![R::eps(nsel("default", &[("app", "frontend")])).egress(item(
            from_eps(vec![nsel("default", &[("app", "backend")])]),
            tcp(80),
        ))],
    )
}

// ---------------------------------------------------------------- seed scenario

#[test]
fn seed_frontend_to_backend_only() {
    let c = build(vec![frontend_to_backend()], seed_endpoints());
    assert!(allowed(&c, "frontend-1", "backend", TCP, 80));
    assert!(allowed(&c, "default/frontend-2", "backend", TCP, 80));
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 81));
    assert!(!allowed(&c, "database", "backend", TCP, 80));
    let r = trace_str(&c, "database", "backend", TCP, 80).unwrap();
    assert_eq!(r.ingress.reason, Reason::DefaultDeny);
    assert!(allowed(&c, "backend", "database", TCP, 5432));
    assert!(allowed(&c, "backend", "frontend-1", UDP, 53));
    assert!(allowed(&c, "backend", "203.0.113.9", TCP, 443));
    assert!(allowed(&c, "frontend-1", "database", TCP, 5432));
    // Trace explains the allowing rule.
    let r = trace_str(&c, "frontend-1", "backend", TCP, 80).unwrap();
    assert_eq!(r.egress.reason, Reason::NoPolicy);
    let rule = r.ingress.rule.unwrap();
    assert_eq!(&*rule.policy, "default/frontend-to-backend");
    assert_eq!(&*rule.path, "spec.ingress[0]");
    let text = format!(
        "{}",
        trace_str(&c, "frontend-1", "backend", TCP, 80).unwrap()
    );
    assert!(
        text.starts_with("frontend-1 (default) -> backend (default) tcp/80: ALLOWED"),
        "{text}"
    );
    assert!(
        text.contains(
            "ingress backend: allowed by CiliumNetworkPolicy default/frontend-to-backend"
        ),
        "{text}"
    );
}

#[test]
fn seed_with_egress_control() {
    let c = build(
        vec![frontend_to_backend(), frontend_egress_control()],
        seed_endpoints(),
    );
    assert!(!allowed(&c, "frontend-1", "database", TCP, 5432));
    assert!(allowed(&c, "frontend-1", "backend", TCP, 80));
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 81));
    assert!(!allowed(&c, "frontend-1", "backend", ICMP, 8));
    assert!(allowed(&c, "backend", "database", TCP, 5432));
    // By address too, IPv4 and IPv6.
    assert!(allowed(&c, "10.0.1.11", "10.0.1.21", TCP, 80));
    assert!(allowed(&c, "fd00:1::11", "fd00:1::21", TCP, 80));
    assert!(!allowed(&c, "fd00:1::11", "fd00:1::31", TCP, 5432));
    let r = trace_str(&c, "frontend-1", "database", TCP, 5432).unwrap();
    assert_eq!(r.egress.verdict, DirVerdict::Denied);
    assert_eq!(r.egress.reason, Reason::DefaultDeny);
}

// ---------------------------------------------------------------- reference §9.3

#[test]
fn ingress_empty_item_denies_all_empty_list_changes_nothing() {
    let eps = seed_endpoints();
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "backend")]))
            .ingress(item(Peers::List(vec![]), L4::Any))],
        eps.clone(),
    );
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 80));
    assert!(!allowed(&c, "203.0.113.1", "backend", ICMP, 8));
    // ingress: [] – the rule has no ingress item at all.
    let c = build_cnp(vec![R::eps(nsel("default", &[("app", "backend")]))], eps);
    assert!(allowed(&c, "frontend-1", "backend", TCP, 80));
    assert!(!c.endpoints.iter().any(|e| e.enforced_ingress));
}

#[test]
fn to_ports_only_allows_port_from_anywhere_including_world() {
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "backend")])).ingress(item(Peers::All, tcp(80)))],
        seed_endpoints(),
    );
    assert!(allowed(&c, "203.0.113.1", "backend", TCP, 80));
    assert!(allowed(&c, "2001:db8::1", "backend", TCP, 80));
    assert!(allowed(&c, "database", "backend", TCP, 80));
    assert!(!allowed(&c, "database", "backend", TCP, 81));
    assert!(!allowed(&c, "203.0.113.1", "backend", ICMP, 8));
}

#[test]
fn empty_from_endpoints_with_ports_allows_nothing() {
    let c = build_cnp(
        vec![
            R::eps(nsel("default", &[("app", "backend")])).ingress(item(from_eps(vec![]), tcp(80)))
        ],
        seed_endpoints(),
    );
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 80));
    assert!(!allowed(&c, "203.0.113.1", "backend", TCP, 80));
}

#[test]
fn protocol_omitted_means_tcp_udp_sctp_not_icmp() {
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "backend")]))
            .ingress(item(Peers::All, L4::Ports(vec![port(53, Proto::Any)])))],
        seed_endpoints(),
    );
    for p in [TCP, UDP, SCTP] {
        assert!(allowed(&c, "frontend-1", "backend", p, 53));
    }
    assert!(!allowed(&c, "frontend-1", "backend", ICMP, 53));
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 54));
    assert_eq!(c.entries.iter().filter(|e| e.port == 53).count(), 3);
}

#[test]
fn l3_allow_with_l4_deny_and_l3_deny() {
    let be = || nsel("default", &[("app", "backend")]);
    let fe = || nsel("default", &[("app", "frontend")]);
    let c = build_cnp(
        vec![R::eps(be())
            .ingress(item(from_eps(vec![fe()]), L4::Any))
            .ingress_deny(item(Peers::All, tcp(80)))],
        seed_endpoints(),
    );
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 80));
    assert!(allowed(&c, "frontend-1", "backend", TCP, 81));
    assert!(allowed(&c, "frontend-1", "backend", UDP, 80));
    assert!(
        allowed(&c, "frontend-1", "backend", ICMP, 8),
        "ping still allowed"
    );
    let r = trace_str(&c, "frontend-1", "backend", TCP, 80).unwrap();
    assert_eq!(r.ingress.reason, Reason::DenyRule);
    assert_eq!(&*r.ingress.rule.unwrap().path, "spec.ingressDeny[0]");
    // L3 deny: nothing, ICMP included.
    let c = build_cnp(
        vec![R::eps(be())
            .ingress(item(from_eps(vec![fe()]), L4::Any))
            .ingress_deny(item(from_eps(vec![fe()]), L4::Any))],
        seed_endpoints(),
    );
    for (p, port) in [(TCP, 80), (UDP, 53), (ICMP, 8)] {
        assert!(!allowed(&c, "frontend-1", "backend", p, port));
    }
}

#[test]
fn broad_deny_over_narrow_allow_same_identity() {
    let be = || nsel("default", &[("app", "backend")]);
    let fe = || nsel("default", &[("app", "frontend")]);
    // allow frontend TCP 80 and 8080-8090; deny frontend all TCP.
    let c = build(
        vec![
            cnp(
                "default",
                "allow",
                vec![R::eps(be()).ingress(item(
                    from_eps(vec![fe()]),
                    L4::Ports(vec![port(80, Proto::Tcp), range(8080, 8090, Proto::Tcp)]),
                ))],
            ),
            cnp(
                "default",
                "deny",
                vec![R::eps(be()).ingress_deny(item(
                    from_eps(vec![fe()]),
                    L4::Ports(vec![port(0, Proto::Tcp)]),
                ))],
            ),
        ],
        seed_endpoints(),
    );
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 80));
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 8085));
    let r = trace_str(&c, "frontend-1", "backend", TCP, 80).unwrap();
    assert_eq!(&*r.ingress.rule.unwrap().policy, "default/deny");
    // No allow entry survives inside the deny for that identity.
    let fe_id = c
        .endpoints
        .iter()
        .find(|e| e.name == "frontend-1")
        .unwrap()
        .identity;
    assert!(!c
        .entries
        .iter()
        .any(|e| e.identity == fe_id && e.verdict == EntryVerdict::Allow && e.proto == TCP));
    // Wildcard deny over an identity allow.
    let c = build_cnp(
        vec![R::eps(be())
            .ingress(item(from_eps(vec![fe()]), tcp(80)))
            .ingress_deny(item(
                Peers::All,
                L4::Ports(vec![range(1, 1023, Proto::Tcp)]),
            ))],
        seed_endpoints(),
    );
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 80));
    // Narrow deny inside broad allow.
    let c = build_cnp(
        vec![R::eps(be())
            .ingress(item(
                from_eps(vec![fe()]),
                L4::Ports(vec![range(8000, 9000, Proto::Tcp)]),
            ))
            .ingress_deny(item(from_eps(vec![fe()]), tcp(8443)))],
        seed_endpoints(),
    );
    assert!(allowed(&c, "frontend-1", "backend", TCP, 8442));
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 8443));
    assert!(allowed(&c, "frontend-1", "backend", TCP, 8444));
}

#[test]
fn cidr_deny_overrides_narrower_cidr_allow() {
    let fe = || nsel("default", &[("app", "frontend")]);
    let c = build_cnp(
        vec![R::eps(fe())
            .egress(item(Peers::List(vec![cidr("10.1.0.0/16", &[])]), tcp(443)))
            .egress_deny(item(Peers::List(vec![cidr("10.0.0.0/8", &[])]), L4::Any))],
        seed_endpoints(),
    );
    assert!(!allowed(&c, "frontend-1", "10.1.2.3", TCP, 443));
    assert!(!allowed(&c, "frontend-1", "10.200.0.1", TCP, 443));
    assert!(
        !allowed(&c, "frontend-1", "192.0.2.1", TCP, 443),
        "egress default deny"
    );
}

#[test]
fn to_cidr_covering_a_workload_does_not_match_it() {
    let fe = || nsel("default", &[("app", "frontend")]);
    let c = build_cnp(
        vec![R::eps(fe()).egress(item(Peers::List(vec![cidr("10.0.0.0/8", &[])]), L4::Any))],
        seed_endpoints(),
    );
    assert!(allowed(&c, "frontend-1", "10.9.9.9", TCP, 80));
    assert!(
        !allowed(&c, "frontend-1", "10.0.1.21", TCP, 80),
        "backend's identity wins over the CIDR"
    );
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 80));
}

#[test]
fn cidr_except_carves_out() {
    let fe = || nsel("default", &[("app", "frontend")]);
    let c = build_cnp(
        vec![R::eps(fe()).egress(item(
            Peers::List(vec![cidr("10.0.0.0/8", &["10.96.0.0/12"])]),
            L4::Any,
        ))],
        seed_endpoints(),
    );
    assert!(allowed(&c, "frontend-1", "10.1.1.1", TCP, 80));
    assert!(!allowed(&c, "frontend-1", "10.100.0.1", TCP, 80));
    assert!(allowed(&c, "frontend-1", "10.112.0.1", TCP, 80));
    // 0.0.0.0/0 except a block: world minus the block.
    let c = build_cnp(
        vec![R::eps(fe()).egress(item(
            Peers::List(vec![cidr("0.0.0.0/0", &["192.168.0.0/16"])]),
            L4::Any,
        ))],
        seed_endpoints(),
    );
    assert!(allowed(&c, "frontend-1", "8.8.8.8", UDP, 53));
    assert!(!allowed(&c, "frontend-1", "192.168.1.1", UDP, 53));
    assert!(
        !allowed(&c, "frontend-1", "2001:db8::1", UDP, 53),
        "an IPv4 /0 is not IPv6 world"
    );
}

/// A policy `default/c` that names 198.51.100.0/24, so that CIDR has an identity.
fn database_to_198_51_100() -> Policy {
    cnp(
        "default",
        "c",
        vec![R::eps(nsel("default", &[("app", "database")])).egress(item(
            Peers::List(vec![cidr("198.51.100.0/24", &[])]),
            L4::Any,
        ))],
    )
}

#[test]
fn world_entity_admits_cidr_identities_all_admits_host() {
    let be = || nsel("default", &[("app", "backend")]);
    // Another policy names a CIDR so it has its own identity.
    let cidr_pol = database_to_198_51_100();
    let c = build(
        vec![
            cidr_pol.clone(),
            cnp(
                "default",
                "p",
                vec![R::eps(be()).ingress(item(entities(&[Entity::World]), L4::Any))],
            ),
        ],
        seed_endpoints(),
    );
    let cid = c.lookup_ip("198.51.100.7".parse().unwrap());
    assert!(ids::is_cidr(cid));
    assert!(allowed(&c, "198.51.100.7", "backend", TCP, 80));
    assert!(allowed(&c, "203.0.113.1", "backend", TCP, 80));
    assert!(allowed(&c, "2001:db8::1", "backend", TCP, 80));
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 80));
    let c = build(
        vec![
            cidr_pol,
            cnp(
                "default",
                "p",
                vec![R::eps(be()).ingress(item(entities(&[Entity::All]), L4::Any))],
            ),
        ],
        [seed_endpoints(), vec![hep("me", &[], &["192.0.2.10"])]].concat(),
    );
    assert!(allowed(&c, "192.0.2.10", "backend", TCP, 80), "host");
    assert!(
        allowed(&c, "me", "backend", TCP, 80),
        "host endpoint by name"
    );
    assert!(allowed(&c, "frontend-1", "backend", TCP, 80));
}

#[test]
fn world_ipv4_and_ipv6_entities() {
    let be = || nsel("default", &[("app", "backend")]);
    let c = build_cnp(
        vec![R::eps(be()).ingress(item(entities(&[Entity::WorldIpv6]), L4::Any))],
        seed_endpoints(),
    );
    assert!(allowed(&c, "2001:db8::1", "backend", TCP, 80));
    assert!(!allowed(&c, "203.0.113.1", "backend", TCP, 80));
    assert_eq!(c.lookup_ip("203.0.113.1".parse().unwrap()), ids::WORLD_IPV4);
    assert_eq!(c.lookup_ip("2001:db8::1".parse().unwrap()), ids::WORLD_IPV6);
    let c = build_cnp(
        vec![R::eps(be()).ingress(item(entities(&[Entity::WorldIpv4]), L4::Any))],
        seed_endpoints(),
    );
    assert!(!allowed(&c, "2001:db8::1", "backend", TCP, 80));
    assert!(allowed(&c, "203.0.113.1", "backend", TCP, 80));
}

#[test]
fn port_range_yields_nine_keys_and_end_below_start_is_single() {
    let be = || nsel("default", &[("app", "backend")]);
    let c = build_cnp(
        vec![R::eps(be()).ingress(item(
            Peers::All,
            L4::Ports(vec![range(80, 444, Proto::Tcp)]),
        ))],
        seed_endpoints(),
    );
    assert_eq!(c.entries.len(), 9);
    for p in [80, 95, 96, 200, 300, 443, 444] {
        assert!(allowed(&c, "frontend-1", "backend", TCP, p), "{p}");
    }
    for p in [79, 445, 8080] {
        assert!(!allowed(&c, "frontend-1", "backend", TCP, p), "{p}");
    }
    let c = build_cnp(
        vec![R::eps(be()).ingress(item(
            Peers::All,
            L4::Ports(vec![range(443, 80, Proto::Tcp)]),
        ))],
        seed_endpoints(),
    );
    assert_eq!(c.entries.len(), 1);
    assert!(allowed(&c, "frontend-1", "backend", TCP, 443));
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 444));
    // port 0 = every port of the protocol.
    let c = build_cnp(
        vec![R::eps(be()).ingress(item(Peers::All, L4::Ports(vec![port(0, Proto::Udp)])))],
        seed_endpoints(),
    );
    assert!(allowed(&c, "frontend-1", "backend", UDP, 12345));
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 12345));
}

#[test]
fn icmp_types_v4_and_v6() {
    let be = || nsel("default", &[("app", "backend")]);
    let c = build_cnp(
        vec![R::eps(be()).ingress(item(
            Peers::All,
            L4::Icmps(vec![
                IcmpType {
                    family: Family::V4,
                    ty: 8,
                },
                IcmpType {
                    family: Family::V6,
                    ty: 128,
                },
            ]),
        ))],
        seed_endpoints(),
    );
    assert!(allowed(&c, "frontend-1", "backend", ICMP, 8));
    assert!(!allowed(&c, "frontend-1", "backend", ICMP, 13));
    assert!(allowed(&c, "fd00:1::11", "fd00:1::21", ICMP6, 128));
    assert!(
        !allowed(&c, "fd00:1::11", "fd00:1::21", ICMP6, 8),
        "v4 type number under ICMPv6"
    );
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 8));
    assert!(c
        .entries
        .iter()
        .any(|e| e.proto == ICMP6 && e.port == 128 && e.port_prefix == 16));
}

#[test]
fn ingress_only_policy_leaves_frontend_egress_open() {
    let c = build(vec![frontend_to_backend()], seed_endpoints());
    let fe = c.endpoints.iter().find(|e| e.name == "frontend-1").unwrap();
    assert!(!fe.enforced_egress && !fe.enforced_ingress);
    assert!(allowed(&c, "frontend-1", "203.0.113.1", TCP, 443));
    assert!(allowed(&c, "frontend-1", "database", UDP, 9999));
}

// ---------------------------------------------------------------- reference §2.5 table

fn two_namespaces() -> Vec<EndpointDef> {
    vec![
        ep("default", "web", &[("app", "web")], &["10.0.1.1"]),
        ep("default", "client", &[("app", "client")], &["10.0.1.2"]),
        ep("other", "client", &[("app", "client")], &["10.0.2.2"]),
        ep("other", "web", &[("app", "web")], &["10.0.2.1"]),
        hep("me", &[("role", "gw")], &["192.0.2.10"]),
    ]
}

#[test]
fn cnp_empty_endpoint_selector_selects_its_namespace_only() {
    let c = build_cnp(
        vec![R::eps(nsel("default", &[])).ingress(item(Peers::List(vec![]), L4::Any))],
        two_namespaces(),
    );
    assert!(!allowed(&c, "other/client", "default/web", TCP, 80));
    assert!(!allowed(&c, "other/client", "default/client", TCP, 80));
    assert!(allowed(&c, "default/client", "other/web", TCP, 80));
    assert!(
        allowed(&c, "default/client", "me", TCP, 22),
        "never the host"
    );
}

#[test]
fn ccnp_empty_endpoint_selector_selects_all_endpoints_never_host() {
    let c = build(
        vec![ccnp(
            "p",
            vec![R::eps(Selector::default()).ingress(item(Peers::List(vec![]), L4::Any))],
        )],
        two_namespaces(),
    );
    assert!(!allowed(&c, "other/client", "default/web", TCP, 80));
    assert!(!allowed(&c, "default/client", "other/web", TCP, 80));
    assert!(allowed(&c, "default/client", "me", TCP, 22));
}

#[test]
fn node_selector_empty_selects_host_endpoints() {
    let c = build(
        vec![ccnp(
            "p",
            vec![R::nodes(Selector::default()).ingress(item(Peers::All, tcp(22)))],
        )],
        two_namespaces(),
    );
    assert!(allowed(&c, "default/client", "me", TCP, 22));
    assert!(!allowed(&c, "default/client", "me", TCP, 80));
    assert!(
        !allowed(&c, "203.0.113.1", "192.0.2.10", TCP, 80),
        "flow to the host endpoint's address"
    );
    assert!(allowed(&c, "203.0.113.1", "192.0.2.10", TCP, 22));
    assert!(
        allowed(&c, "default/client", "default/web", TCP, 80),
        "workloads untouched"
    );
    // nodeSelector matches the host endpoint's own labels.
    let c = build(
        vec![ccnp(
            "p",
            vec![R::nodes(sel(&[("role", "db")])).ingress(item(Peers::All, tcp(22)))],
        )],
        two_namespaces(),
    );
    assert!(allowed(&c, "default/client", "me", TCP, 80));
    let c = build(
        vec![ccnp(
            "p",
            vec![R::nodes(sel(&[("role", "gw")])).ingress(item(Peers::All, tcp(22)))],
        )],
        two_namespaces(),
    );
    assert!(!allowed(&c, "default/client", "me", TCP, 80));
    assert_eq!(
        c.endpoints
            .iter()
            .find(|e| e.name == "me")
            .unwrap()
            .identity,
        ids::HOST
    );
}

#[test]
fn cnp_from_endpoints_empty_means_same_namespace() {
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "web")]))
            .ingress(item(from_eps(vec![nsel("default", &[])]), L4::Any))],
        two_namespaces(),
    );
    assert!(allowed(&c, "default/client", "default/web", TCP, 80));
    assert!(!allowed(&c, "other/client", "default/web", TCP, 80));
    assert!(
        !allowed(&c, "203.0.113.1", "default/web", TCP, 80),
        "not world"
    );
    assert!(!allowed(&c, "me", "default/web", TCP, 80), "not host");
}

#[test]
fn ccnp_from_endpoints_empty_means_all_pods() {
    let c = build(
        vec![ccnp(
            "p",
            vec![R::eps(sel(&[("app", "web")])).ingress(item(from_eps(vec![csel(&[])]), L4::Any))],
        )],
        two_namespaces(),
    );
    assert!(allowed(&c, "default/client", "default/web", TCP, 80));
    assert!(allowed(&c, "other/client", "default/web", TCP, 80));
    assert!(!allowed(&c, "203.0.113.1", "default/web", TCP, 80));
    assert!(!allowed(&c, "me", "other/web", TCP, 80));
}

#[test]
fn raw_wildcard_selector_matches_reserved_identities_too() {
    // A truly empty peer selector (no scoping) matches every identity: world, host.
    let c = build(
        vec![ccnp(
            "p",
            vec![R::eps(sel(&[("app", "web")]))
                .ingress(item(from_eps(vec![Selector::default()]), L4::Any))],
        )],
        two_namespaces(),
    );
    assert!(allowed(&c, "203.0.113.1", "default/web", TCP, 80));
    assert!(allowed(&c, "me", "default/web", TCP, 80));
}

#[test]
fn from_entities_all_allows_everything() {
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "web")]))
            .ingress(item(entities(&[Entity::All]), L4::Any))],
        two_namespaces(),
    );
    for src in ["other/client", "203.0.113.1", "me", "2001:db8::5"] {
        assert!(allowed(&c, src, "default/web", TCP, 80), "{src}");
    }
    assert!(c.entries.iter().all(|e| e.identity == 0));
}

// ---------------------------------------------------------------- namespaces

#[test]
fn cross_namespace_by_pod_namespace_label_and_namespace_labels() {
    let namespaces = vec![NamespaceDef {
        origin: origin("Namespace", None, "other"),
        name: "other".into(),
        labels: vec![k8s("team", "blue")],
    }];
    // fromEndpoints naming the namespace explicitly: not re-scoped.
    let explicit = Selector {
        requirements: vec![
            req(None, "app", Op::In, &["client"]),
            req(None, "io.kubernetes.pod.namespace", Op::In, &["other"]),
        ],
    };
    let c = build_opts(
        vec![cnp(
            "default",
            "p",
            vec![R::eps(nsel("default", &[("app", "web")]))
                .ingress(item(from_eps(vec![explicit]), L4::Any))],
        )],
        two_namespaces(),
        vec![],
        namespaces.clone(),
        CompileOptions::default(),
    );
    assert!(allowed(&c, "other/client", "default/web", TCP, 80));
    assert!(!allowed(&c, "default/client", "default/web", TCP, 80));
    // Namespace label selector.
    let by_ns_label = Selector {
        requirements: vec![req(
            None,
            "io.cilium.k8s.namespace.labels.team",
            Op::In,
            &["blue"],
        )],
    };
    let c = build_opts(
        vec![cnp(
            "default",
            "p",
            vec![R::eps(nsel("default", &[("app", "web")]))
                .ingress(item(from_eps(vec![by_ns_label]), L4::Any))],
        )],
        two_namespaces(),
        vec![],
        namespaces,
        CompileOptions::default(),
    );
    assert!(allowed(&c, "other/client", "default/web", TCP, 80));
    assert!(allowed(&c, "other/web", "default/web", TCP, 80));
    assert!(!allowed(&c, "default/client", "default/web", TCP, 80));
    // kubernetes.io/metadata.name works without a Namespace document.
    let by_name = Selector {
        requirements: vec![req(
            None,
            "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
            Op::In,
            &["default"],
        )],
    };
    let c = build(
        vec![cnp(
            "other",
            "p",
            vec![R::eps(nsel("other", &[("app", "web")]))
                .ingress(item(from_eps(vec![by_name]), L4::Any))],
        )],
        two_namespaces(),
    );
    assert!(allowed(&c, "default/client", "other/web", TCP, 80));
    assert!(!allowed(&c, "other/client", "other/web", TCP, 80));
}

#[test]
fn ambiguous_and_unknown_names() {
    let c = build(vec![], two_namespaces());
    assert!(trace_str(&c, "client", "default/web", TCP, 80).is_err());
    assert!(trace_str(&c, "nosuch", "default/web", TCP, 80).is_err());
    assert!(trace_str(&c, "default/client", "default/web", TCP, 80).is_ok());
}

// ---------------------------------------------------------------- default deny controls

#[test]
fn ingress_deny_only_policy_enables_default_deny_unless_disabled() {
    let web = || nsel("default", &[("app", "web")]);
    let deny = || {
        item(
            from_eps(vec![nsel("default", &[("app", "client")])]),
            L4::Any,
        )
    };
    let c = build_cnp(vec![R::eps(web()).ingress_deny(deny())], two_namespaces());
    assert!(!allowed(&c, "default/client", "default/web", TCP, 80));
    assert!(
        !allowed(&c, "other/client", "default/web", TCP, 80),
        "default deny"
    );
    let mut r = R::eps(web()).ingress_deny(deny());
    r.0.default_deny_ingress = Some(false);
    let c = build_cnp(vec![r], two_namespaces());
    assert!(!allowed(&c, "default/client", "default/web", TCP, 80));
    assert!(allowed(&c, "other/client", "default/web", TCP, 80));
    let t = trace_str(&c, "other/client", "default/web", TCP, 80).unwrap();
    assert_eq!(t.ingress.reason, Reason::NoDefaultDeny);
    // Another selecting policy with default deny on turns it back on.
    let mut r = R::eps(web()).ingress_deny(deny());
    r.0.default_deny_ingress = Some(false);
    let c = build(
        vec![
            cnp("default", "p", vec![r]),
            cnp(
                "default",
                "q",
                vec![R::eps(web()).ingress(item(from_eps(vec![]), L4::Any))],
            ),
        ],
        two_namespaces(),
    );
    assert!(!allowed(&c, "other/client", "default/web", TCP, 80));
}

#[test]
fn external_lockdown_deny_world_with_allow_all() {
    let c = build(
        vec![ccnp(
            "external-lockdown",
            vec![R::eps(Selector::default())
                .ingress_deny(item(entities(&[Entity::World]), L4::Any))
                .ingress(item(entities(&[Entity::All]), L4::Any))],
        )],
        two_namespaces(),
    );
    assert!(!allowed(&c, "203.0.113.1", "default/web", TCP, 80));
    assert!(!allowed(&c, "2001:db8::1", "default/web", TCP, 80));
    assert!(allowed(&c, "other/client", "default/web", TCP, 80));
    assert!(allowed(&c, "me", "default/web", TCP, 80));
}

// ---------------------------------------------------------------- NetworkPolicy

#[test]
fn network_policy_semantics() {
    // policyTypes: [Ingress] with no rules: deny all ingress.
    let mut r = R::eps(nsel("default", &[("app", "web")]));
    r.0.isolate_ingress = true;
    let c = build(vec![knp("default", "deny-all", r)], two_namespaces());
    assert!(!allowed(&c, "default/client", "default/web", TCP, 80));
    assert!(
        allowed(&c, "default/web", "default/client", TCP, 80),
        "egress not isolated"
    );
    // Rule without from = all sources on the ports.
    let mut r = R::eps(nsel("default", &[("app", "web")])).ingress(item(Peers::All, tcp(80)));
    r.0.isolate_ingress = true;
    let c = build(vec![knp("default", "p", r)], two_namespaces());
    assert!(allowed(&c, "203.0.113.1", "default/web", TCP, 80));
    assert!(!allowed(&c, "203.0.113.1", "default/web", TCP, 81));
    // ipBlock matches endpoints too (10.0.2.0/24 = other/*), unlike a CNP CIDR.
    let mut r = R::eps(nsel("default", &[("app", "web")])).ingress(item(
        Peers::List(vec![ipblock("10.0.2.0/24", &["10.0.2.1/32"])]),
        L4::Any,
    ));
    r.0.isolate_ingress = true;
    let c = build(vec![knp("default", "p", r)], two_namespaces());
    assert!(allowed(&c, "other/client", "default/web", TCP, 80));
    assert!(
        !allowed(&c, "other/web", "default/web", TCP, 80),
        "except excludes it"
    );
    assert!(allowed(&c, "10.0.2.77", "default/web", TCP, 80));
    assert!(!allowed(&c, "default/client", "default/web", TCP, 80));
    // Egress isolation with an empty egress list: deny all egress.
    let mut r = R::eps(nsel("default", &[("app", "client")]));
    r.0.isolate_egress = true;
    let c = build(vec![knp("default", "p", r)], two_namespaces());
    assert!(!allowed(&c, "default/client", "default/web", TCP, 80));
    assert!(!allowed(&c, "default/client", "8.8.8.8", UDP, 53));
    // podSelector + namespaceSelector in one peer (AND).
    let peer = Selector {
        requirements: vec![
            req(None, "app", Op::In, &["client"]),
            req(
                None,
                "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
                Op::In,
                &["other"],
            ),
        ],
    };
    let mut r =
        R::eps(nsel("default", &[("app", "web")])).ingress(item(from_eps(vec![peer]), tcp(80)));
    r.0.isolate_ingress = true;
    let c = build(vec![knp("default", "p", r)], two_namespaces());
    assert!(allowed(&c, "other/client", "default/web", TCP, 80));
    assert!(!allowed(&c, "other/web", "default/web", TCP, 80));
    assert!(!allowed(&c, "default/client", "default/web", TCP, 80));
}

#[test]
fn network_policy_and_cnp_deny_combine() {
    let mut r = R::eps(nsel("default", &[("app", "web")])).ingress(item(Peers::All, tcp(80)));
    r.0.isolate_ingress = true;
    let c = build(
        vec![
            knp("default", "allow-80", r),
            cnp(
                "default",
                "deny-other",
                vec![
                    R::eps(nsel("default", &[("app", "web")])).ingress_deny(item(
                        from_eps(vec![Selector {
                            requirements: vec![req(
                                None,
                                "io.kubernetes.pod.namespace",
                                Op::In,
                                &["other"],
                            )],
                        }]),
                        L4::Any,
                    )),
                ],
            ),
        ],
        two_namespaces(),
    );
    assert!(allowed(&c, "default/client", "default/web", TCP, 80));
    assert!(
        !allowed(&c, "other/client", "default/web", TCP, 80),
        "deny wins across kinds"
    );
}

// ---------------------------------------------------------------- named ports

/// Two web endpoints naming port `http` differently: 8080 on web-a, 9090 on web-b.
fn web_a_and_b() -> Vec<EndpointDef> {
    vec![
        with_ports(
            ep("default", "web-a", &[("app", "web")], &["10.0.1.1"]),
            &[("http", 8080, Proto::Tcp)],
        ),
        with_ports(
            ep(
                "default",
                "web-b",
                &[("app", "web"), ("v", "2")],
                &["10.0.1.3"],
            ),
            &[("http", 9090, Proto::Tcp)],
        ),
    ]
}

#[test]
fn named_ports_ingress_resolve_against_the_subject() {
    let mut eps = web_a_and_b();
    eps.push(ep("default", "client", &[("app", "client")], &["10.0.1.2"]));
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "web")]))
            .ingress(item(Peers::All, L4::Ports(vec![named("http", Proto::Any)])))],
        eps,
    );
    assert!(allowed(&c, "client", "web-a", TCP, 8080));
    assert!(!allowed(&c, "client", "web-a", TCP, 9090));
    assert!(allowed(&c, "client", "web-b", TCP, 9090));
    assert!(!allowed(&c, "client", "web-b", TCP, 8080));
    assert!(
        !allowed(&c, "client", "web-b", UDP, 9090),
        "named port's protocol"
    );
}

#[test]
fn named_ports_egress_resolve_against_each_peer() {
    let mut eps = web_a_and_b();
    eps.extend([
        with_ports(
            ep("default", "db", &[("app", "db")], &["10.0.1.4"]),
            &[("http", 7070, Proto::Tcp)],
        ),
        ep("default", "client", &[("app", "client")], &["10.0.1.2"]),
    ]);
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "client")])).egress(item(
            from_eps(vec![nsel("default", &[("app", "web")])]),
            L4::Ports(vec![named("http", Proto::Tcp)]),
        ))],
        eps.clone(),
    );
    assert!(allowed(&c, "client", "web-a", TCP, 8080));
    assert!(!allowed(&c, "client", "web-a", TCP, 9090));
    assert!(allowed(&c, "client", "web-b", TCP, 9090));
    assert!(!allowed(&c, "client", "db", TCP, 7070));
    // Wildcard peer: every declared port of that name, for identity 0.
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "client")]))
            .egress(item(Peers::All, L4::Ports(vec![named("http", Proto::Any)])))],
        eps,
    );
    assert!(allowed(&c, "client", "db", TCP, 7070));
    assert!(allowed(&c, "client", "web-a", TCP, 9090));
    assert!(!allowed(&c, "client", "web-a", TCP, 80));
}

#[test]
fn unresolved_named_port_allows_nothing() {
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "backend")]))
            .ingress(item(Peers::All, L4::Ports(vec![named("grpc", Proto::Any)])))],
        seed_endpoints(),
    );
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 80));
    assert!(c.entries.is_empty());
    assert!(
        c.endpoints
            .iter()
            .find(|e| e.name == "backend")
            .unwrap()
            .default_deny_ingress
    );
}

// ---------------------------------------------------------------- identities, ipcache

#[test]
fn identities_are_stable_and_order_independent() {
    let a = build(vec![frontend_to_backend()], seed_endpoints());
    let mut eps = seed_endpoints();
    eps.reverse();
    eps.push(ep("default", "extra", &[("app", "extra")], &["10.0.1.99"]));
    let b = build(vec![frontend_to_backend()], eps);
    for e in &a.endpoints {
        let other = b.endpoints.iter().find(|x| x.name == e.name).unwrap();
        assert_eq!(e.identity, other.identity, "{}", e.name);
    }
    let fe1 = a
        .endpoints
        .iter()
        .find(|e| e.name == "frontend-1")
        .unwrap()
        .identity;
    let fe2 = a
        .endpoints
        .iter()
        .find(|e| e.name == "frontend-2")
        .unwrap()
        .identity;
    assert_eq!(fe1, fe2, "same labels, same identity");
    assert!((256..1 << 24).contains(&fe1));
    // Fully deterministic output.
    assert_eq!(
        a.dump(),
        build(vec![frontend_to_backend()], seed_endpoints()).dump()
    );
    // Same labels in another namespace: another identity.
    let c = build(vec![], two_namespaces());
    let w: Vec<_> = c
        .endpoints
        .iter()
        .filter(|e| e.name == "web")
        .map(|e| e.identity)
        .collect();
    assert_ne!(w[0], w[1]);
}

#[test]
fn ipcache_longest_prefix_and_sources() {
    let nodes = vec![
        NodeDef {
            origin: origin("Node", None, "host-b"),
            name: "host-b".into(),
            labels: vec![],
            addresses: vec!["192.0.2.11".parse().unwrap()],
        },
        NodeDef {
            origin: origin("Node", None, "host-a"),
            name: "host-a".into(),
            labels: vec![],
            addresses: vec!["192.0.2.12".parse().unwrap()],
        },
    ];
    let mut eps = seed_endpoints();
    let mut remote = ep(
        "default",
        "remote-web",
        &[("app", "frontend")],
        &["10.0.9.1"],
    );
    remote.node = Some("host-b".into());
    eps.push(remote);
    let pol = cnp(
        "default",
        "p",
        vec![R::eps(nsel("default", &[("app", "database")])).egress(item(
            Peers::List(vec![cidr("10.0.0.0/8", &[]), cidr("10.0.9.0/24", &[])]),
            L4::Any,
        ))],
    );
    let c = build_opts(
        vec![pol],
        eps,
        nodes,
        vec![],
        CompileOptions {
            node_name: "host-a".into(),
            host_addresses: vec!["172.16.0.1".parse().unwrap()],
            ..Default::default()
        },
    );
    let ip = |s: &str| c.lookup_ip(s.parse::<IpAddr>().unwrap());
    assert_eq!(ip("192.0.2.11"), ids::REMOTE_NODE);
    assert_eq!(
        ip("192.0.2.12"),
        ids::HOST,
        "a Node named like this host is the host"
    );
    assert_eq!(ip("172.16.0.1"), ids::HOST);
    let fe = c
        .endpoints
        .iter()
        .find(|e| e.name == "frontend-1")
        .unwrap()
        .identity;
    assert_eq!(ip("10.0.9.1"), fe, "remote endpoint has its identity");
    assert!(
        !c.endpoints
            .iter()
            .find(|e| e.name == "remote-web")
            .unwrap()
            .local
    );
    assert!(ids::is_cidr(ip("10.0.9.2")));
    assert_ne!(ip("10.0.9.2"), ip("10.1.0.1"));
    assert!(ids::is_cidr(ip("10.1.0.1")));
    assert_eq!(ip("11.0.0.1"), ids::WORLD_IPV4);
    // The /8 rule covers the /24's identity (CIDR containment).
    assert!(allowed(&c, "database", "10.0.9.2", TCP, 1));
    assert!(
        !allowed(&c, "database", "10.0.9.1", TCP, 1),
        "remote endpoint is not CIDR"
    );
    assert!(allowed(&c, "remote-web", "backend", TCP, 1));
    assert!(!c.identities.is_empty());
}

#[test]
fn entities_host_remote_node_cluster() {
    let nodes = vec![NodeDef {
        origin: origin("Node", None, "host-b"),
        name: "host-b".into(),
        labels: vec![],
        addresses: vec!["192.0.2.11".parse().unwrap()],
    }];
    let mk = |e: Entity| {
        build_opts(
            vec![cnp(
                "default",
                "p",
                vec![R::eps(nsel("default", &[("app", "web")]))
                    .ingress(item(entities(&[e]), L4::Any))],
            )],
            two_namespaces(),
            nodes.clone(),
            vec![],
            CompileOptions {
                node_name: "host-a".into(),
                ..Default::default()
            },
        )
    };
    let c = mk(Entity::Host);
    assert!(allowed(&c, "me", "default/web", TCP, 1));
    assert!(!allowed(&c, "192.0.2.11", "default/web", TCP, 1));
    let c = mk(Entity::RemoteNode);
    assert!(!allowed(&c, "me", "default/web", TCP, 1));
    assert!(allowed(&c, "192.0.2.11", "default/web", TCP, 1));
    let c = mk(Entity::Cluster);
    for s in ["me", "192.0.2.11", "other/client", "default/client"] {
        assert!(allowed(&c, s, "default/web", TCP, 1), "{s}");
    }
    assert!(!allowed(&c, "203.0.113.1", "default/web", TCP, 1));
}

#[test]
fn self_traffic_allowed() {
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "web")]))
            .ingress(item(from_eps(vec![]), L4::Any))
            .egress(item(from_eps(vec![]), L4::Any))],
        two_namespaces(),
    );
    let r = trace_str(&c, "default/web", "10.0.1.1", TCP, 80).unwrap();
    assert_eq!(r.verdict, Verdict::Allowed);
    assert_eq!(r.ingress.reason, Reason::SelfTraffic);
}

#[test]
fn audit_mode_passes_and_reports() {
    let mut eps = seed_endpoints();
    eps[2].audit = true; // backend
    let c = build(vec![frontend_to_backend()], eps);
    let r = trace_str(&c, "database", "backend", TCP, 80).unwrap();
    assert_eq!(r.verdict, Verdict::Allowed);
    assert!(r.audit);
    assert_eq!(r.ingress.verdict, DirVerdict::Audit);
    let c = build_opts(
        vec![frontend_to_backend()],
        seed_endpoints(),
        vec![],
        vec![],
        CompileOptions {
            audit: true,
            ..Default::default()
        },
    );
    assert!(c.endpoints.iter().all(|e| e.audit));
}

#[test]
fn allow_localhost_option() {
    let eps = [seed_endpoints(), vec![hep("me", &[], &["192.0.2.10"])]].concat();
    let c = build(vec![frontend_to_backend()], eps.clone());
    assert!(!allowed(&c, "me", "backend", TCP, 80));
    let opts = CompileOptions {
        allow_localhost: true,
        ..Default::default()
    };
    let c = build_opts(
        vec![frontend_to_backend()],
        eps.clone(),
        vec![],
        vec![],
        opts.clone(),
    );
    assert!(allowed(&c, "me", "backend", TCP, 9999));
    let r = trace_str(&c, "me", "backend", TCP, 9999).unwrap();
    assert_eq!(&*r.ingress.rule.unwrap().policy, "allow_localhost");
    // A deny of host still wins.
    let deny = cnp(
        "default",
        "d",
        vec![R::eps(nsel("default", &[("app", "backend")]))
            .ingress_deny(item(entities(&[Entity::Host]), tcp(22)))],
    );
    let c = build_opts(vec![frontend_to_backend(), deny], eps, vec![], vec![], opts);
    assert!(!allowed(&c, "me", "backend", TCP, 22));
    assert!(allowed(&c, "me", "backend", TCP, 23));
}

#[test]
fn host_endpoint_egress_policy() {
    let c = build(
        vec![ccnp(
            "host-egress",
            vec![R::nodes(Selector::default()).egress(item(
                Peers::List(vec![cidr("8.8.0.0/16", &[])]),
                L4::Ports(vec![port(53, Proto::Udp)]),
            ))],
        )],
        two_namespaces(),
    );
    assert!(allowed(&c, "me", "8.8.8.8", UDP, 53));
    assert!(!allowed(&c, "me", "8.8.8.8", TCP, 53));
    assert!(!allowed(&c, "me", "1.1.1.1", UDP, 53));
    assert!(!allowed(&c, "me", "default/web", TCP, 80));
}

#[test]
fn ipv6_cidr_rules() {
    let fe = || nsel("default", &[("app", "frontend")]);
    let c = build_cnp(
        vec![R::eps(fe()).egress(item(
            Peers::List(vec![cidr("2001:db8::/32", &["2001:db8:bad::/48"])]),
            tcp(443),
        ))],
        seed_endpoints(),
    );
    assert!(allowed(&c, "frontend-1", "2001:db8:1::1", TCP, 443));
    assert!(!allowed(&c, "frontend-1", "2001:db8:bad::1", TCP, 443));
    assert!(!allowed(&c, "frontend-1", "2001:db9::1", TCP, 443));
    assert!(!allowed(&c, "frontend-1", "192.0.2.1", TCP, 443));
    let l = c.identities.iter().find(|i| ids::is_cidr(i.id)).unwrap();
    assert!(
        l.labels
            .iter()
            .any(|l| l.source == "cidr" && l.key.contains("2001-db8")),
        "{:?}",
        l.labels
    );
}

#[test]
fn reserved_selector_in_from_endpoints() {
    // fromEndpoints with reserved:host is not namespace-scoped by the parser.
    let s = Selector {
        requirements: vec![req(Some("reserved"), "host", Op::Exists, &[])],
    };
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "web")])).ingress(item(from_eps(vec![s]), L4::Any))],
        two_namespaces(),
    );
    assert!(allowed(&c, "me", "default/web", TCP, 80));
    assert!(!allowed(&c, "default/client", "default/web", TCP, 80));
}

#[test]
fn match_expressions_not_in_and_does_not_exist() {
    let eps = vec![
        ep("default", "web", &[("app", "web")], &["10.0.1.1"]),
        ep(
            "default",
            "a",
            &[("app", "a"), ("env", "prod")],
            &["10.0.1.2"],
        ),
        ep(
            "default",
            "b",
            &[("app", "b"), ("env", "dev")],
            &["10.0.1.3"],
        ),
        ep("default", "c", &[("app", "c")], &["10.0.1.4"]),
    ];
    let mut s = nsel("default", &[]);
    s.requirements.push(req(None, "env", Op::NotIn, &["dev"]));
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "web")])).ingress(item(from_eps(vec![s]), L4::Any))],
        eps.clone(),
    );
    assert!(allowed(&c, "a", "web", TCP, 1));
    assert!(!allowed(&c, "b", "web", TCP, 1));
    assert!(allowed(&c, "c", "web", TCP, 1), "NotIn true when absent");
    let mut s = nsel("default", &[]);
    s.requirements.push(req(None, "env", Op::DoesNotExist, &[]));
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "web")])).ingress(item(from_eps(vec![s]), L4::Any))],
        eps,
    );
    assert!(!allowed(&c, "a", "web", TCP, 1));
    assert!(allowed(&c, "c", "web", TCP, 1));
}

#[test]
fn lookup_contract_reports_l1_and_l2() {
    let c = build(vec![frontend_to_backend()], seed_endpoints());
    let be = c.endpoints.iter().find(|e| e.name == "backend").unwrap();
    let fe = c.endpoints.iter().find(|e| e.name == "frontend-1").unwrap();
    let d = lookup::decide(&c, be.slot, Direction::Ingress, fe.identity, TCP, 80);
    assert!(d.allowed());
    assert!(d.l1.is_some() && d.l2.is_none());
    let d = lookup::decide(&c, be.slot, Direction::Ingress, ids::WORLD_IPV4, TCP, 80);
    assert_eq!(d.outcome, lookup::Outcome::DefaultDeny);
}

#[test]
fn json_shape() {
    let c = build(vec![frontend_to_backend()], seed_endpoints());
    let r = trace_str(&c, "frontend-1", "backend", TCP, 80).unwrap();
    let v: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(v["verdict"], "allowed");
    assert_eq!(v["ingress"]["verdict"], "allowed");
    assert_eq!(
        v["ingress"]["rule"]["policy"],
        "default/frontend-to-backend"
    );
    assert_eq!(v["egress"]["reason"], "no-policy");
}

// ---------------------------------------------------------------- oracle property test

/// Workloads a, b, c (app=a|b|c) at 10.0.0.1-3, for the property tests.
fn abc_endpoints() -> Vec<EndpointDef> {
    vec![
        ep("default", "a", &[("app", "a")], &["10.0.0.1"]),
        ep("default", "b", &[("app", "b")], &["10.0.0.2"]),
        ep("default", "c", &[("app", "c")], &["10.0.0.3"]),
    ]
}

mod oracle {
    //! A direct, rule-reading evaluation of the semantics, compared with the
    //! compiled entries + lookup contract on random policies and flows.
    use super::*;
    use proptest::prelude::*;

    const APPS: &[&str] = &["a", "b", "c"];

    #[derive(Debug, Clone)]
    enum P {
        All,
        App(usize),
        World,
    }

    #[derive(Debug, Clone)]
    enum K {
        Any,
        Port(u8, u16, Option<u16>),
    }

    #[derive(Debug, Clone)]
    struct It {
        deny: bool,
        peer: P,
        l4: K,
    }

    fn arb_item() -> impl Strategy<Value = It> {
        let peer = prop_oneof![Just(P::All), (0..3usize).prop_map(P::App), Just(P::World)];
        let l4 = prop_oneof![
            Just(K::Any),
            (
                prop_oneof![Just(6u8), Just(17u8), Just(0u8)],
                0u16..40,
                proptest::option::of(0u16..40)
            )
                .prop_map(|(p, s, e)| K::Port(p, s, e)),
        ];
        (any::<bool>(), peer, l4).prop_map(|(deny, peer, l4)| It { deny, peer, l4 })
    }

    fn to_model(subject: usize, items: &[It]) -> R {
        let mut r = R::eps(nsel("default", &[("app", APPS[subject])]));
        for it in items {
            let peers = match it.peer {
                P::All => Peers::All,
                P::App(i) => from_eps(vec![nsel("default", &[("app", APPS[i])])]),
                P::World => entities(&[Entity::World]),
            };
            let l4 = match it.l4 {
                K::Any => L4::Any,
                K::Port(p, s, e) => {
                    let pr = match p {
                        6 => Proto::Tcp,
                        17 => Proto::Udp,
                        _ => Proto::Any,
                    };
                    L4::Ports(vec![PortProto {
                        port: PortSpec::Number(s),
                        end_port: e,
                        proto: pr,
                    }])
                }
            };
            r = if it.deny {
                r.ingress_deny(item(peers, l4))
            } else {
                r.ingress(item(peers, l4))
            };
        }
        r
    }

    fn peer_matches(p: &P, src: Option<usize>) -> bool {
        match (p, src) {
            (P::All, _) => true,
            (P::App(i), Some(s)) => *i == s,
            (P::World, None) => true,
            _ => false,
        }
    }

    fn l4_matches(k: &K, proto: u8, port: u16) -> bool {
        match k {
            K::Any => true,
            K::Port(p, s, e) => {
                let protos: &[u8] = if *p == 0 {
                    &[6, 17, 132]
                } else {
                    std::slice::from_ref(p)
                };
                if !protos.contains(&proto) {
                    return false;
                }
                let end = e.filter(|e| e > s).unwrap_or(*s);
                if *s == 0 && e.filter(|e| *e > 0).is_none() {
                    return true;
                }
                (*s..=end).contains(&port)
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        #[test]
        fn compiled_lookup_equals_rule_semantics(
            rules in proptest::collection::vec((0..3usize, proptest::collection::vec(arb_item(), 0..5)), 1..4),
            flows in proptest::collection::vec((proptest::option::of(0..3usize), 0..3usize, prop_oneof![Just(6u8), Just(17u8), Just(1u8)], 0u16..45), 20),
        ) {
            let pols: Vec<Policy> = rules.iter().enumerate().map(|(i, (s, its))| cnp("default", &format!("p{i}"), vec![to_model(*s, its)])).collect();
            let c = build(pols, abc_endpoints());
            for (src, dst, proto_, port) in flows {
                let selecting: Vec<&Vec<It>> = rules.iter().filter(|(s, _)| *s == dst).map(|(_, i)| i).collect();
                let items: Vec<&It> = selecting.iter().flat_map(|v| v.iter()).collect();
                let enforced = !items.is_empty();
                let denied = items.iter().any(|it| it.deny && peer_matches(&it.peer, src) && l4_matches(&it.l4, proto_, port));
                let allowed_ = items.iter().any(|it| !it.deny && peer_matches(&it.peer, src) && l4_matches(&it.l4, proto_, port));
                let expect = !denied && (allowed_ || !enforced);
                let from = match src { Some(s) => APPS[s].to_string(), None => "203.0.113.9".to_string() };
                if src == Some(dst) { continue; }
                let got = allowed(&c, &from, APPS[dst], proto_, port);
                prop_assert_eq!(got, expect, "flow {} -> {} proto {} port {}\n{}", from, APPS[dst], proto_, port, c.dump());
            }
        }
    }
}

mod oracle_cidr {
    //! Egress with nested CIDRs, excepts, world and endpoint peers, allow and deny,
    //! against a direct reading of the semantics (CIDR peers never match registry
    //! endpoints; CIDR containment; deny wins).
    use super::*;
    use ipnet::IpNet;
    use proptest::prelude::*;

    const NETS: &[&str] = &[
        "0.0.0.0/0",
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.1.2.3/32",
        "192.168.0.0/16",
        "10.0.0.0/30",
    ];
    const DSTS: &[&str] = &[
        "10.1.2.3",
        "10.1.2.4",
        "10.1.3.1",
        "10.2.0.1",
        "192.168.1.1",
        "8.8.8.8",
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
    ];

    #[derive(Debug, Clone)]
    enum P {
        Cidr(usize, Option<usize>),
        World,
        App(usize),
        All,
    }

    #[derive(Debug, Clone)]
    struct It {
        deny: bool,
        peer: P,
        port: Option<u16>,
    }

    fn arb_item() -> impl Strategy<Value = It> {
        let peer = prop_oneof![
            4 => (0..NETS.len(), proptest::option::of(0..NETS.len())).prop_map(|(n, e)| P::Cidr(n, e)),
            1 => Just(P::World),
            1 => (1..3usize).prop_map(P::App),
            1 => Just(P::All),
        ];
        (
            any::<bool>(),
            peer,
            proptest::option::of(prop_oneof![Just(80u16), Just(443u16)]),
        )
            .prop_map(|(deny, peer, port)| It { deny, peer, port })
    }

    fn net(i: usize) -> IpNet {
        NETS[i].parse().unwrap()
    }

    /// The except is kept only when it lies inside the CIDR (the parser rejects others).
    fn except_of(n: usize, e: Option<usize>) -> Option<IpNet> {
        e.map(net).filter(|x| net(n).contains(x) && *x != net(n))
    }

    fn peer_matches(p: &P, dst: &str) -> bool {
        let ip: IpAddr = dst.parse().unwrap();
        let endpoint = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .iter()
            .position(|a| *a == dst);
        match p {
            P::All => true,
            P::World => endpoint.is_none(),
            P::App(i) => endpoint == Some(*i),
            P::Cidr(n, e) => {
                endpoint.is_none()
                    && net(*n).contains(&ip)
                    && !except_of(*n, *e).is_some_and(|x| x.contains(&ip))
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        #[test]
        fn egress_cidr_semantics(
            items in proptest::collection::vec(arb_item(), 1..6),
            flows in proptest::collection::vec((0..DSTS.len(), prop_oneof![Just(80u16), Just(443u16), Just(22u16)]), 20),
        ) {
            let mut r = R::eps(nsel("default", &[("app", "a")]));
            for it in &items {
                let peers = match &it.peer {
                    P::All => Peers::All,
                    P::World => entities(&[Entity::World]),
                    P::App(i) => from_eps(vec![nsel("default", &[("app", ["a", "b", "c"][*i])])]),
                    P::Cidr(n, e) => Peers::List(vec![Peer::Cidr { net: net(*n), except: except_of(*n, *e).into_iter().collect(), match_endpoints: false }]),
                };
                let l4 = match it.port { None => L4::Any, Some(p) => tcp(p) };
                r = if it.deny { r.egress_deny(item(peers, l4)) } else { r.egress(item(peers, l4)) };
            }
            let c = build_cnp(vec![r], abc_endpoints());
            for (d, port) in flows {
                let dst = DSTS[d];
                if dst == "10.0.0.1" { continue; }
                let m = |it: &It| peer_matches(&it.peer, dst) && it.port.is_none_or(|p| p == port);
                let denied = items.iter().any(|it| it.deny && m(it));
                let allowed_ = items.iter().any(|it| !it.deny && m(it));
                let expect = !denied && allowed_;
                let got = allowed(&c, "a", dst, TCP, port);
                prop_assert_eq!(got, expect, "a -> {} tcp/{}\n{}", dst, port, c.dump());
            }
        }
    }
}

#[test]
fn reserved_world_selector_matches_family_worlds_and_cidrs() {
    let s = Selector {
        requirements: vec![req(Some("reserved"), "world", Op::Exists, &[])],
    };
    let extra = database_to_198_51_100();
    let c = build(
        vec![
            extra,
            cnp(
                "default",
                "p",
                vec![R::eps(nsel("default", &[("app", "backend")]))
                    .ingress(item(from_eps(vec![s]), L4::Any))],
            ),
        ],
        seed_endpoints(),
    );
    assert!(allowed(&c, "203.0.113.1", "backend", TCP, 80));
    assert!(allowed(&c, "2001:db8::1", "backend", TCP, 80));
    assert!(allowed(&c, "198.51.100.1", "backend", TCP, 80));
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 80));
    let s6 = Selector {
        requirements: vec![req(Some("reserved"), "world-ipv6", Op::Exists, &[])],
    };
    let c = build_cnp(
        vec![R::eps(nsel("default", &[("app", "backend")]))
            .ingress(item(from_eps(vec![s6]), L4::Any))],
        seed_endpoints(),
    );
    assert!(!allowed(&c, "203.0.113.1", "backend", TCP, 80));
    assert!(allowed(&c, "2001:db8::1", "backend", TCP, 80));
}

#[test]
fn retain_local_entries_keeps_slots() {
    let mut eps = seed_endpoints();
    eps[2].node = Some("host-b".into()); // backend is remote
    let mut c = build(vec![frontend_to_backend(), frontend_egress_control()], eps);
    let be = c
        .endpoints
        .iter()
        .find(|e| e.name == "backend")
        .unwrap()
        .slot;
    assert!(c.entries.iter().any(|e| e.endpoint == be));
    let n = c.endpoints.len();
    c.retain_local_entries();
    assert_eq!(c.endpoints.len(), n);
    assert!(!c.entries.iter().any(|e| e.endpoint == be));
    assert!(!c.entries.is_empty());
}

// ---------------------------------------------------------------- staged policies

fn staged(mut p: Policy) -> Policy {
    p.staged = true;
    p
}

/// A staged deny-all on backend: every flow to it passes, those the enforced
/// policies allow are reported as audit by the staged policy (its default
/// deny), and enforcing it denies them.
#[test]
fn staged_deny_all_passes_and_reports_what_it_would_deny() {
    let lock = || {
        cnp(
            "default",
            "lockdown",
            vec![R::eps(nsel("default", &[("app", "backend")]))
                .ingress(item(Peers::List(vec![]), L4::Any))],
        )
    };
    let c = build(vec![staged(lock())], seed_endpoints());
    let r = trace_str(&c, "frontend-1", "backend", TCP, 80).unwrap();
    assert_eq!((r.verdict, r.audit), (Verdict::Allowed, true));
    assert_eq!(r.ingress.verdict, DirVerdict::Audit);
    assert_eq!(r.ingress.reason, Reason::StagedDefaultDeny);
    let rule = r.ingress.rule.as_ref().expect("attributed");
    assert_eq!(
        (&*rule.policy, rule.staged, rule.default_deny),
        ("default/lockdown", true, true)
    );
    assert_eq!(
        r.ingress.message,
        "audit (passes): would deny once enforced — the default deny of staged CiliumNetworkPolicy default/lockdown (lockdown.yaml) spec: it selects default/backend for ingress and no rule allows this"
    );
    // Not selected by it: untouched.
    let r = trace_str(&c, "backend", "database", TCP, 5432).unwrap();
    assert_eq!((r.verdict, r.audit), (Verdict::Allowed, false));
    // Enforced, the same flows are denied.
    let c = build(vec![lock()], seed_endpoints());
    assert!(!allowed(&c, "frontend-1", "backend", TCP, 80));
}

/// A staged deny under an enforced allow: audit; a staged allow never opens
/// what the enforced default deny drops; an enforced deny stays a deny.
#[test]
fn staged_rules_change_no_enforced_verdict() {
    let be = || nsel("default", &[("app", "backend")]);
    let fe = || nsel("default", &[("app", "frontend")]);
    let db = || nsel("default", &[("app", "database")]);
    let enforced = cnp(
        "default",
        "fe-to-be",
        vec![R::eps(be())
            .ingress(item(from_eps(vec![fe()]), tcp(80)))
            .ingress_deny(item(from_eps(vec![db()]), tcp(443)))],
    );
    let stage = staged(cnp(
        "default",
        "tighten",
        vec![R::eps(be())
            .ingress_deny(item(from_eps(vec![fe()]), tcp(80)))
            .ingress(item(from_eps(vec![db()]), L4::Any))],
    ));
    let c = build(vec![enforced, stage], seed_endpoints());
    let r = trace_str(&c, "frontend-1", "backend", TCP, 80).unwrap();
    assert_eq!(
        (r.verdict, r.audit, r.ingress.reason),
        (Verdict::Allowed, true, Reason::StagedDenyRule)
    );
    assert_eq!(
        &*r.ingress.rule.as_ref().unwrap().path,
        "spec.ingressDeny[0]"
    );
    assert!(
        r.ingress.message.starts_with(
            "audit (passes): would deny once enforced — staged CiliumNetworkPolicy default/tighten"
        ),
        "{}",
        r.ingress.message
    );
    // The staged allow of database opens nothing: default deny as before.
    let r = trace_str(&c, "database", "backend", TCP, 80).unwrap();
    assert_eq!(
        (r.verdict, r.ingress.reason),
        (Verdict::Denied, Reason::DefaultDeny)
    );
    // The enforced deny denies.
    let r = trace_str(&c, "database", "backend", TCP, 443).unwrap();
    assert_eq!(
        (r.verdict, r.ingress.reason),
        (Verdict::Denied, Reason::DenyRule)
    );
    check_invariants(&c);
}

/// Where only a staged policy brings default deny, its allows are the
/// exceptions: what they allow passes silently, the rest passes as audit.
#[test]
fn staged_allows_are_exceptions_to_a_staged_default_deny() {
    let stage = staged(cnp(
        "default",
        "be-in",
        vec![R::eps(nsel("default", &[("app", "backend")])).ingress(item(
            from_eps(vec![nsel("default", &[("app", "frontend")])]),
            tcp(80),
        ))],
    ));
    let c = build(vec![stage], seed_endpoints());
    let r = trace_str(&c, "frontend-1", "backend", TCP, 80).unwrap();
    assert_eq!((r.verdict, r.audit), (Verdict::Allowed, false));
    let r = trace_str(&c, "frontend-1", "backend", TCP, 81).unwrap();
    assert_eq!(
        (r.verdict, r.audit, r.ingress.reason),
        (Verdict::Allowed, true, Reason::StagedDefaultDeny)
    );
    let r = trace_str(&c, "database", "backend", TCP, 80).unwrap();
    assert_eq!((r.verdict, r.audit), (Verdict::Allowed, true));
    // The endpoint is not default-deny under the enforced policies.
    let be = c.endpoints.iter().find(|e| e.name == "backend").unwrap();
    assert!(!be.default_deny_ingress && !be.enforced_ingress);
}

mod staged_oracle {
    //! Random enforced and staged policies in both directions: the staged ones
    //! change no verdict, and a direction is reported as a staged audit exactly
    //! when the enforced policies allow it and enforcing the staged ones too
    //! would deny it.
    use super::*;
    use netpol::policy::trace::TraceResult;
    use proptest::prelude::*;

    const APPS: &[&str] = &["frontend", "backend", "database"];

    #[derive(Debug, Clone)]
    struct It {
        egress: bool,
        deny: bool,
        peer: Option<usize>, // None: every peer
        port: Option<u16>,
    }

    #[derive(Debug, Clone)]
    struct Pol {
        subject: usize,
        staged: bool,
        no_default_deny: bool,
        items: Vec<It>,
    }

    fn arb_pol() -> impl Strategy<Value = Pol> {
        let it = (
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(0..3usize),
            proptest::option::of(prop_oneof![Just(80u16), Just(443u16)]),
        )
            .prop_map(|(egress, deny, peer, port)| It {
                egress,
                deny,
                peer,
                port,
            });
        (
            0..3usize,
            any::<bool>(),
            proptest::bool::weighted(0.2),
            proptest::collection::vec(it, 1..4),
        )
            .prop_map(|(subject, staged, no_default_deny, items)| Pol {
                subject,
                staged,
                no_default_deny,
                items,
            })
    }

    fn model(i: usize, p: &Pol, staged: bool) -> Policy {
        let mut r = R::eps(nsel("default", &[("app", APPS[p.subject])]));
        for it in &p.items {
            let peers = match it.peer {
                None => entities(&[Entity::All]),
                Some(a) => from_eps(vec![nsel("default", &[("app", APPS[a])])]),
            };
            let l4 = it.port.map_or(L4::Any, tcp);
            r = match (it.egress, it.deny) {
                (false, false) => r.ingress(item(peers, l4)),
                (false, true) => r.ingress_deny(item(peers, l4)),
                (true, false) => r.egress(item(peers, l4)),
                (true, true) => r.egress_deny(item(peers, l4)),
            };
        }
        if p.no_default_deny {
            r.0.default_deny_ingress = Some(false);
            r.0.default_deny_egress = Some(false);
        }
        let mut pol = cnp("default", &format!("p{i}"), vec![r]);
        pol.staged = staged;
        pol
    }

    fn dirs(r: &TraceResult) -> [&netpol::policy::trace::DirectionResult; 2] {
        [&r.egress, &r.ingress]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
        #[test]
        fn staged_policies_change_no_verdict_and_report_what_they_would_deny(
            pols in proptest::collection::vec(arb_pol(), 1..5),
            flows in proptest::collection::vec((0..4usize, 0..3usize, prop_oneof![Just(80u16), Just(443u16), Just(22u16)]), 12),
        ) {
            let set = |f: &dyn Fn(&Pol) -> Option<bool>| -> Vec<Policy> {
                pols.iter().enumerate().filter_map(|(i, p)| f(p).map(|s| model(i, p, s))).collect()
            };
            let enforced = build(set(&|p| (!p.staged).then_some(false)), seed_endpoints());
            let with_staged = build(set(&|p| Some(p.staged)), seed_endpoints());
            let all_enforced = build(set(&|_| Some(false)), seed_endpoints());
            let names = ["frontend-1", "backend", "database", "203.0.113.9"];
            for (s, d, port) in flows {
                let (from, to) = (names[s], names[d]);
                if from == to { continue; }
                let a = trace_str(&enforced, from, to, TCP, port).unwrap();
                let b = trace_str(&with_staged, from, to, TCP, port).unwrap();
                let c = trace_str(&all_enforced, from, to, TCP, port).unwrap();
                prop_assert_eq!(b.verdict, a.verdict, "{} -> {} tcp/{}\n{}", from, to, port, with_staged.dump());
                for ((da, db), dc) in dirs(&a).into_iter().zip(dirs(&b)).zip(dirs(&c)) {
                    let would = da.verdict == DirVerdict::Allowed && dc.verdict == DirVerdict::Denied;
                    let reported = matches!(db.reason, Reason::StagedDenyRule | Reason::StagedDefaultDeny);
                    prop_assert_eq!(reported, would, "{:?} {} -> {} tcp/{}: enforced {:?}, with staged {:?}, all enforced {:?}\n{}", da.direction, from, to, port, da.message, db.message, dc.message, with_staged.dump());
                    prop_assert_eq!(db.verdict == DirVerdict::Audit, would);
                    if reported {
                        prop_assert!(db.rule.as_ref().is_some_and(|r| r.staged), "{:?}", db.rule);
                    }
                }
            }
        }
    }
}

mod incremental {
    //! A [`Compiler`] that keeps what it computed between compiles answers
    //! every compile as a fresh compile does, over random sequences of
    //! changes: policies added, edited, replaced by an equal copy and removed;
    //! registry endpoints added, relabelled, moved between hosts, given other
    //! addresses or ports and removed; the options and map budget changed, so
    //! refusals (a policy or ipcache map that would overflow) come and go;
    //! addresses the DNS proxy learned for toFQDNs selectors come and go.
    use super::*;
    use netpol::policy::compile::{try_compile, Compiler, Limits};
    use netpol::policy::fqdn::FqdnAddrs;
    use proptest::prelude::*;

    const APPS: [&str; 3] = ["a", "b", "c"];

    #[derive(Debug, Clone)]
    enum PeerKind {
        App(usize),
        Cidr(usize),
        IpBlock,
        World,
        All,
        Fqdn(usize),
    }

    #[derive(Debug, Clone)]
    struct ItemSpec {
        peer: PeerKind,
        /// None: any port; Some(None): the named port `http`.
        port: Option<Option<u16>>,
        deny: bool,
        egress: bool,
    }

    #[derive(Debug, Clone)]
    struct PolSpec {
        /// None: a clusterwide nodeSelector rule for the host endpoints.
        subject: Option<usize>,
        items: Vec<ItemSpec>,
        staged: bool,
    }

    #[derive(Debug, Clone)]
    struct EpSpec {
        app: usize,
        remote: bool,
        addr: u8,
        ports: bool,
        host: bool,
    }

    #[derive(Debug, Clone)]
    enum Change {
        Policy(usize, Option<PolSpec>),
        /// The policy replaced by an equal one (new shared rules).
        Touch(usize),
        Endpoint(usize, Option<EpSpec>),
        /// The DNS proxy learned (true) or forgot name `.0`'s address `.1`.
        Learn(usize, usize, bool),
        Options {
            tight: bool,
            local_only: bool,
            localhost: bool,
            host_addr: bool,
        },
    }

    const CIDRS: [&str; 3] = ["192.0.2.0/24", "10.0.0.0/8", "198.51.100.0/25"];
    const NAMES: [&str; 3] = ["a.example.com.", "b.example.com.", "b.other.org."];
    /// Learned addresses: world ones, one inside a policy CIDR, one that is
    /// also a registry endpoint's.
    const LEARNED: [&str; 4] = ["203.0.113.1", "203.0.113.2", "192.0.2.5", "10.0.0.1"];

    fn fqdn_selector(i: usize) -> FqdnSelector {
        match i {
            0 => FqdnSelector::Name(NAMES[0].into()),
            1 => FqdnSelector::Pattern("*.example.com.".into()),
            _ => FqdnSelector::Pattern("*".into()),
        }
    }

    fn arb_item() -> impl Strategy<Value = ItemSpec> {
        let peer = prop_oneof![
            4 => (0..APPS.len()).prop_map(PeerKind::App),
            2 => (0..CIDRS.len()).prop_map(PeerKind::Cidr),
            1 => Just(PeerKind::IpBlock),
            1 => Just(PeerKind::World),
            1 => Just(PeerKind::All),
            2 => (0..3usize).prop_map(PeerKind::Fqdn),
        ];
        let port = prop_oneof![
            Just(None),
            Just(Some(Some(80u16))),
            Just(Some(Some(443u16))),
            Just(Some(None))
        ];
        (peer, port, prop::bool::weighted(0.25), any::<bool>()).prop_map(
            |(peer, port, deny, egress)| ItemSpec {
                peer,
                port,
                deny,
                egress,
            },
        )
    }

    fn arb_policy() -> impl Strategy<Value = PolSpec> {
        (
            prop::option::weighted(0.85, 0..APPS.len()),
            prop::collection::vec(arb_item(), 0..4),
            prop::bool::weighted(0.2),
        )
            .prop_map(|(subject, items, staged)| PolSpec {
                subject,
                items,
                staged,
            })
    }

    fn arb_endpoint() -> impl Strategy<Value = EpSpec> {
        (
            0..APPS.len(),
            prop::bool::weighted(0.4),
            0u8..3,
            prop::bool::weighted(0.3),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(app, remote, addr, ports, host)| EpSpec {
                app,
                remote,
                addr,
                ports,
                host,
            })
    }

    fn arb_change() -> impl Strategy<Value = Change> {
        prop_oneof![
            4 => (0..5usize, prop::option::weighted(0.75, arb_policy())).prop_map(|(k, p)| Change::Policy(k, p)),
            1 => (0..5usize).prop_map(Change::Touch),
            3 => (0..NAMES.len(), 0..LEARNED.len(), prop::bool::weighted(0.7)).prop_map(|(n, a, on)| Change::Learn(n, a, on)),
            4 => (0..7usize, prop::option::weighted(0.75, arb_endpoint())).prop_map(|(k, e)| Change::Endpoint(k, e)),
            1 => (prop::bool::weighted(0.3), any::<bool>(), any::<bool>(), any::<bool>())
                .prop_map(|(tight, local_only, localhost, host_addr)| Change::Options { tight, local_only, localhost, host_addr }),
        ]
    }

    fn policy(k: usize, spec: &PolSpec) -> Policy {
        let app = |i: usize| nsel("default", &[("app", APPS[i])]);
        let mut r = match spec.subject {
            Some(i) => R::eps(app(i)),
            None => R::nodes(sel(&[])),
        };
        for it in &spec.items {
            let peers = match &it.peer {
                PeerKind::App(i) => from_eps(vec![app(*i)]),
                PeerKind::Cidr(i) => Peers::List(vec![cidr(CIDRS[*i], &[])]),
                PeerKind::IpBlock => Peers::List(vec![ipblock("10.0.0.0/16", &["10.0.1.0/24"])]),
                PeerKind::World => entities(&[Entity::World]),
                PeerKind::All => Peers::All,
                PeerKind::Fqdn(i) => Peers::List(vec![Peer::Fqdn(fqdn_selector(*i))]),
            };
            let l4 = match it.port {
                None => L4::Any,
                Some(Some(p)) => tcp(p),
                Some(None) => L4::Ports(vec![named("http", Proto::Tcp)]),
            };
            let it_ = item(peers, l4);
            r = match (it.egress, it.deny) {
                (false, false) => r.ingress(it_),
                (false, true) => r.ingress_deny(it_),
                (true, false) => r.egress(it_),
                (true, true) => r.egress_deny(it_),
            };
        }
        let mut p = match spec.subject {
            Some(_) => cnp("default", &format!("p{k}"), vec![r]),
            None => ccnp(&format!("p{k}"), vec![r]),
        };
        p.origin.file = std::path::PathBuf::from(format!("{k}.yaml")).into();
        p.staged = spec.staged;
        p
    }

    fn endpoint(k: usize, spec: &EpSpec) -> EndpointDef {
        let addr = format!("10.0.{}.{}", spec.addr, k + 1);
        let mut e = if spec.host {
            hep(&format!("h{k}"), &[("app", APPS[spec.app])], &[&addr])
        } else {
            ep(
                "default",
                &format!("e{k}"),
                &[("app", APPS[spec.app])],
                &[&addr],
            )
        };
        if spec.remote {
            e.node = Some("host-b".into());
        }
        if spec.ports {
            e = with_ports(e, &[("http", 8080, Proto::Tcp)]);
        }
        e
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn incremental_compile_equals_full_compile(
            start_pols in prop::collection::vec(prop::option::of(arb_policy()), 5),
            start_eps in prop::collection::vec(prop::option::of(arb_endpoint()), 7),
            changes in prop::collection::vec(arb_change(), 1..12),
        ) {
            let mut pols: Vec<Option<Policy>> = start_pols.iter().enumerate().map(|(k, p)| p.as_ref().map(|p| policy(k, p))).collect();
            // Shared, as the loader shares an unchanged file's endpoints: the
            // compiler tells the ones a change replaced by their address.
            let mut eps: Vec<Option<Arc<EndpointDef>>> = start_eps.iter().enumerate().map(|(k, e)| e.as_ref().map(|e| Arc::new(endpoint(k, e)))).collect();
            let mut opts = CompileOptions { node_name: "host-a".into(), ..Default::default() };
            let mut compiler = Compiler::new();
            let mut learned: std::collections::BTreeSet<(usize, usize)> = Default::default();
            let mut last_registry: Option<RegistrySet> = None;
            for (step, change) in std::iter::once(None).chain(changes.iter().map(Some)).enumerate() {
                match change {
                    None => {}
                    Some(Change::Policy(k, p)) => pols[*k] = p.as_ref().map(|p| policy(*k, p)),
                    Some(Change::Touch(k)) => {
                        if let Some(p) = &mut pols[*k] {
                            p.rules = p.rules.iter().cloned().collect();
                        }
                    }
                    Some(Change::Endpoint(k, e)) => eps[*k] = e.as_ref().map(|e| Arc::new(endpoint(*k, e))),
                    Some(Change::Learn(n, a, on)) => {
                        if *on {
                            learned.insert((*n, *a));
                        } else {
                            learned.remove(&(*n, *a));
                        }
                        let mut f = FqdnAddrs::new();
                        for (n, a) in &learned {
                            f.insert(NAMES[*n], LEARNED[*a].parse().unwrap());
                        }
                        opts.fqdn = Arc::new(f);
                    }
                    Some(Change::Options { tight, local_only, localhost, host_addr }) => {
                        opts.limits = if *tight {
                            Limits { policy_entries: 6, ipcache_entries: 9 }
                        } else {
                            Limits::default()
                        };
                        opts.local_entries_only = *local_only;
                        opts.allow_localhost = *localhost;
                        opts.host_addresses = if *host_addr { vec!["10.0.9.9".parse().unwrap()] } else { vec![] };
                    }
                }
                let set = PolicySet { policies: pols.iter().flatten().cloned().map(Arc::new).collect() };
                let reg = RegistrySet { endpoints: eps.iter().flatten().cloned().collect(), ..Default::default() };
                let incremental = compiler.compile(&set, &reg, &opts);
                let full = try_compile(&set, &reg, &opts);
                prop_assert_eq!(
                    &incremental, &full,
                    "step {} ({:?})\nincremental:\n{}\nfull:\n{}",
                    step, change,
                    incremental.as_ref().map(|c| c.dump()).unwrap_or_else(|e| e.to_string()),
                    full.as_ref().map(|c| c.dump()).unwrap_or_else(|e| e.to_string()),
                );
                // Only the endpoints new since the registry last changed are
                // resolved (the others are known by their address and
                // reused); an equal registry resolves none.
                let resolved = compiler.stats().endpoints_resolved;
                let expected = match &last_registry {
                    Some(last) if *last == reg => 0,
                    Some(last) => reg
                        .endpoints
                        .iter()
                        .filter(|e| !last.endpoints.iter().any(|l| Arc::ptr_eq(e, l)))
                        .count(),
                    None => reg.endpoints.len(),
                };
                prop_assert_eq!(resolved, expected, "step {} ({:?}): endpoints resolved", step, change);
                if last_registry.as_ref() != Some(&reg) {
                    last_registry = Some(reg.clone());
                }
            }
        }
    }
}

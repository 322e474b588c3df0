//! Compile benchmark: 10,000 endpoints and 1,000 policies with a realistic mix of
//! selectors, ports, ranges, named ports, CIDRs, entities and denies; prints the
//! wall time of `compile`, the entry count and the peak RSS (VmHWM).
//!
//! `cargo run --release --example bench_compile [-- ENDPOINTS POLICIES]`

use std::time::Instant;

use netpol::api::build::{k8s, origin, req};
use netpol::api::model::*;
use netpol::policy::compile::{compile, CompileOptions};

/// A namespaced selector, as the parser scopes CNP selectors.
fn nsel(ns: &str, pairs: &[(&str, &str)]) -> Selector {
    let mut r: Vec<Requirement> = pairs
        .iter()
        .map(|(k, v)| req(None, k, Op::In, &[v]))
        .collect();
    r.push(req(
        Some("k8s"),
        "io.kubernetes.pod.namespace",
        Op::In,
        &[ns],
    ));
    Selector { requirements: r }
}

fn item(path: String, peers: Peers, l4: L4) -> RuleItem {
    RuleItem {
        path,
        pos: None,
        peers,
        l4,
        dns: Vec::new(),
    }
}

fn ports(list: &[(u16, Option<u16>, Proto)]) -> L4 {
    L4::Ports(
        list.iter()
            .map(|(p, e, pr)| PortProto {
                port: PortSpec::Number(*p),
                end_port: *e,
                proto: *pr,
            })
            .collect(),
    )
}

fn rule(subject: Selector) -> Rule {
    Rule {
        path: "spec".into(),
        subject: Subject::Endpoints(subject),
        ingress: vec![],
        ingress_deny: vec![],
        egress: vec![],
        egress_deny: vec![],
        default_deny_ingress: None,
        default_deny_egress: None,
        isolate_ingress: false,
        isolate_egress: false,
    }
}

const TIERS: [&str; 3] = ["frontend", "backend", "db"];

fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n_endpoints = args.first().copied().unwrap_or(10_000);
    let n_policies = args.get(1).copied().unwrap_or(1_000);
    let apps_per_ns = 20usize;
    let replicas = 5usize;
    let n_ns = n_endpoints.div_ceil(apps_per_ns * replicas).max(1);

    // ---- registry: namespaces × apps × replicas, two versions per app.
    let mut endpoints = Vec::with_capacity(n_endpoints);
    let mut namespaces = Vec::new();
    'outer: for n in 0..n_ns {
        let ns = format!("ns-{n}");
        namespaces.push(NamespaceDef {
            origin: origin("Namespace", None, &ns),
            name: ns.clone(),
            labels: vec![k8s("team", &format!("team-{}", n % 10))],
        });
        for a in 0..apps_per_ns {
            for r in 0..replicas {
                if endpoints.len() == n_endpoints {
                    break 'outer;
                }
                let i = endpoints.len();
                let name = format!("app-{a}-{r}");
                let addr4: std::net::IpAddr =
                    format!("10.{}.{}.{}", n / 250, n % 250, a * replicas + r + 1)
                        .parse()
                        .unwrap();
                let addr6: std::net::IpAddr = format!("fd00:{n:x}::{:x}", a * replicas + r + 1)
                    .parse()
                    .unwrap();
                endpoints.push(EndpointDef {
                    origin: origin("Endpoint", Some(&ns), &name),
                    kind: EndpointKind::Workload,
                    name: name.into(),
                    namespace: Some(ns.clone().into()),
                    labels: vec![
                        k8s("app", &format!("app-{a}")),
                        k8s("tier", TIERS[a % 3]),
                        k8s("version", if r % 2 == 0 { "v1" } else { "v2" }),
                    ],
                    node: if i % 4 == 0 {
                        None
                    } else {
                        Some(format!("host-{}", i % 4).into())
                    },
                    interface: Some(Interface::Name(format!("veth{i}"))),
                    addresses: vec![addr4, addr6],
                    ports: vec![
                        NamedPort {
                            name: "http".into(),
                            port: 8080 + (a % 3) as u16,
                            proto: Proto::Tcp,
                        },
                        NamedPort {
                            name: "metrics".into(),
                            port: 9100,
                            proto: Proto::Tcp,
                        },
                    ],
                    audit: false,
                });
            }
        }
    }
    endpoints.push(EndpointDef {
        origin: origin("HostEndpoint", None, "host-eth0"),
        kind: EndpointKind::Host,
        name: "host-eth0".into(),
        namespace: None,
        labels: vec![k8s("role", "worker")],
        node: None,
        interface: Some(Interface::Name("eth0".into())),
        addresses: vec!["192.0.2.10".parse().unwrap()],
        ports: vec![],
        audit: false,
    });
    let nodes: Vec<NodeDef> = (1..4)
        .map(|h| NodeDef {
            origin: origin("Node", None, &format!("host-{h}")),
            name: format!("host-{h}"),
            labels: vec![],
            addresses: vec![format!("192.0.2.{}", 10 + h).parse().unwrap()],
        })
        .collect();

    // ---- policies: ten kinds, round-robin over namespaces.
    let mut policies = Vec::with_capacity(n_policies);
    for p in 0..n_policies {
        let n = p % n_ns;
        let ns = format!("ns-{n}");
        let kind = (p / n_ns) % 10;
        let a = (p * 7) % apps_per_ns;
        let app = format!("app-{a}");
        let next = format!("app-{}", (a + 1) % apps_per_ns);
        let name = format!("pol-{p}");
        let mut r = rule(nsel(&ns, &[("app", &app)]));
        match kind {
            0 => {
                r.subject = Subject::Endpoints(nsel(&ns, &[("tier", "backend")]));
                r.ingress.push(item(
                    "spec.ingress[0]".into(),
                    Peers::List(vec![Peer::Endpoints(nsel(&ns, &[("tier", "frontend")]))]),
                    ports(&[(8080, None, Proto::Tcp)]),
                ));
            }
            1 => {
                r.subject = Subject::Endpoints(nsel(&ns, &[("tier", "db")]));
                r.ingress.push(item(
                    "spec.ingress[0]".into(),
                    Peers::List(vec![Peer::Endpoints(nsel(&ns, &[("tier", "backend")]))]),
                    ports(&[(5432, None, Proto::Tcp), (6379, None, Proto::Tcp)]),
                ));
            }
            2 => {
                r.ingress.push(item(
                    "spec.ingress[0]".into(),
                    Peers::List(vec![Peer::Endpoints(nsel(&ns, &[("app", &next)]))]),
                    ports(&[(8000, Some(8100), Proto::Tcp)]),
                ));
            }
            3 => {
                let dns = Selector {
                    requirements: vec![
                        req(None, "app", Op::In, &["app-0"]),
                        req(
                            Some("k8s"),
                            "io.kubernetes.pod.namespace",
                            Op::In,
                            &["ns-0"],
                        ),
                    ],
                };
                r.egress.push(item(
                    "spec.egress[0]".into(),
                    Peers::List(vec![Peer::Endpoints(nsel(&ns, &[("tier", "backend")]))]),
                    ports(&[(8080, None, Proto::Tcp)]),
                ));
                r.egress.push(item(
                    "spec.egress[1]".into(),
                    Peers::List(vec![Peer::Endpoints(dns)]),
                    ports(&[(53, None, Proto::Any)]),
                ));
            }
            4 => {
                let net = format!("172.{}.0.0/16", 16 + n % 16).parse().unwrap();
                let ex = format!("172.{}.{}.0/24", 16 + n % 16, p % 256)
                    .parse()
                    .unwrap();
                r.egress.push(item(
                    "spec.egress[0]".into(),
                    Peers::List(vec![Peer::Cidr {
                        net,
                        except: vec![ex],
                        match_endpoints: false,
                    }]),
                    ports(&[(443, None, Proto::Tcp)]),
                ));
            }
            5 => {
                r.ingress_deny.push(item(
                    "spec.ingressDeny[0]".into(),
                    Peers::List(vec![Peer::Entity(Entity::World)]),
                    ports(&[(22, None, Proto::Tcp)]),
                ));
                r.ingress.push(item(
                    "spec.ingress[0]".into(),
                    Peers::List(vec![Peer::Entity(Entity::Cluster)]),
                    L4::Any,
                ));
            }
            6 => {
                r.ingress.push(item(
                    "spec.ingress[0]".into(),
                    Peers::List(vec![
                        Peer::Entity(Entity::Host),
                        Peer::Entity(Entity::RemoteNode),
                    ]),
                    L4::Any,
                ));
            }
            7 => {
                let net = format!("192.168.{}.0/24", p % 256).parse().unwrap();
                r.egress_deny.push(item(
                    "spec.egressDeny[0]".into(),
                    Peers::List(vec![Peer::Cidr {
                        net,
                        except: vec![],
                        match_endpoints: false,
                    }]),
                    L4::Any,
                ));
                r.default_deny_egress = Some(false);
            }
            8 => {
                r.ingress.push(item(
                    "spec.ingress[0]".into(),
                    Peers::List(vec![Peer::Endpoints(nsel(&ns, &[]))]),
                    L4::Ports(vec![
                        PortProto {
                            port: PortSpec::Named("http".into()),
                            end_port: None,
                            proto: Proto::Tcp,
                        },
                        PortProto {
                            port: PortSpec::Named("metrics".into()),
                            end_port: None,
                            proto: Proto::Any,
                        },
                    ]),
                ));
            }
            _ => {
                r.subject = Subject::Endpoints(nsel(&ns, &[]));
                r.ingress.push(item(
                    "spec.ingress[0]".into(),
                    Peers::List(vec![Peer::Endpoints(nsel(&ns, &[("version", "v1")]))]),
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
                ));
                r.ingress_deny.push(item(
                    "spec.ingressDeny[0]".into(),
                    Peers::List(vec![Peer::Endpoints(nsel(&ns, &[("version", "v2")]))]),
                    ports(&[(0, None, Proto::Udp)]),
                ));
            }
        }
        policies.push(Policy {
            origin: origin("CiliumNetworkPolicy", Some(&ns), &name),
            kind: PolicyKind::CiliumNetworkPolicy,
            rules: vec![r].into(),
            staged: false,
            source: Default::default(),
        });
    }
    policies.push(Policy {
        origin: origin("CiliumClusterwideNetworkPolicy", None, "host-fw"),
        kind: PolicyKind::CiliumClusterwideNetworkPolicy,
        rules: vec![Rule {
            subject: Subject::Nodes(Selector::default()),
            ingress: vec![item(
                "spec.ingress[0]".into(),
                Peers::All,
                ports(&[(22, None, Proto::Tcp), (6443, None, Proto::Tcp)]),
            )],
            ..rule(Selector::default())
        }]
        .into(),
        staged: false,
        source: Default::default(),
    });

    let policies = PolicySet {
        policies: policies.into_iter().map(std::sync::Arc::new).collect(),
    };
    let registry = RegistrySet {
        endpoints: endpoints.into_iter().map(std::sync::Arc::new).collect(),
        nodes,
        namespaces,
    };
    let opts = CompileOptions {
        node_name: "host-0".into(),
        ..Default::default()
    };
    let rss_before = peak_rss_kib().unwrap_or(0);
    let t = Instant::now();
    let compiled = compile(&policies, &registry, &opts);
    let elapsed = t.elapsed();
    let rss_after = peak_rss_kib().unwrap_or(0);
    println!("endpoints:      {}", compiled.endpoints.len());
    println!("policies:       {}", policies.policies.len());
    println!("identities:     {}", compiled.identities.len());
    println!("ipcache:        {}", compiled.ipcache.len());
    println!("entries:        {}", compiled.entries.len());
    let mut per_ep = vec![0usize; compiled.endpoints.len()];
    for e in &compiled.entries {
        per_ep[e.endpoint as usize] += 1;
    }
    let local: usize = compiled
        .endpoints
        .iter()
        .filter(|e| e.local)
        .map(|e| per_ep[e.slot as usize])
        .sum();
    println!("local entries:  {local} (endpoints enforced on this host)");
    println!(
        "max/endpoint:   {}",
        per_ep.iter().max().copied().unwrap_or(0)
    );
    println!("compile time:   {:.3} s", elapsed.as_secs_f64());
    println!(
        "peak RSS:       {:.1} MiB (before compile {:.1} MiB)",
        rss_after as f64 / 1024.0,
        rss_before as f64 / 1024.0
    );
}

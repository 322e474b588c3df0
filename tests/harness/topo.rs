//! A node network namespace with a bridge (optionally addressed: the node's own
//! interface) and one namespace per workload, linked by a veth pair: the host
//! side on the bridge in the node, `eth0` inside with MAC 02:07:00:00:00:<k+1>
//! and the workload's addresses. Nothing touches the host's own network
//! namespace; [`Topo`]'s drop deletes the namespaces and with them every link.

use super::cmd::{ip, ip_quiet};
use super::netns::{in_ns, Netns};

/// One workload: name and addresses with prefix length.
pub struct Workload<'a> {
    pub name: &'a str,
    pub addrs: &'a [&'a str],
}

/// How a topology names what it makes.
pub struct Names {
    /// The node's namespace.
    pub node: String,
    /// The bridge, in the node.
    pub bridge: String,
    /// A workload's namespace is this and its name.
    pub ns_prefix: String,
    /// A workload's host-side device (in the node) is this and its name.
    pub dev_prefix: String,
}

impl Names {
    /// Netns `<prefix>-<pid>-<tag>-node` and `<prefix>-<pid>-<tag>-<workload>`
    /// (the pid: several people or agents may run the same test binary at once),
    /// bridge `<prefix>br`, host-side devices `<prefix>-<workload>`.
    pub fn scoped(prefix: &str, tag: &str) -> Names {
        let scope = format!("{prefix}-{}-{tag}", std::process::id());
        Names {
            node: format!("{scope}-node"),
            bridge: format!("{prefix}br"),
            ns_prefix: format!("{scope}-"),
            dev_prefix: format!("{prefix}-"),
        }
    }
}

pub const NODE_MAC: [u8; 6] = [0x02, 0x07, 0, 0, 0, 0xfe];

pub struct Topo {
    pub node: String,
    pub bridge: String,
    names: Names,
    workloads: Vec<(String, Vec<String>)>,
    _net: Netns,
}

impl Topo {
    /// Named by [`Names::scoped`].
    pub fn new(prefix: &str, tag: &str, node_addrs: &[&str], workloads: &[Workload<'_>]) -> Topo {
        Topo::with_names(Names::scoped(prefix, tag), node_addrs, workloads)
    }

    pub fn with_names(names: Names, node_addrs: &[&str], workloads: &[Workload<'_>]) -> Topo {
        let workloads = workloads
            .iter()
            .map(|w| {
                (
                    w.name.to_string(),
                    w.addrs.iter().map(|a| a.to_string()).collect(),
                )
            })
            .collect();
        Topo::build(names, node_addrs, workloads)
    }

    /// From the workloads' owned `(name, addresses)`.
    pub fn build(names: Names, node_addrs: &[&str], workloads: Vec<(String, Vec<String>)>) -> Topo {
        let mut net = Netns::default();
        net.add(&names.node);
        let node = names.node.clone();
        // With br_netfilter loaded the bridge validates and trims IP packets
        // itself (and drops malformed ones), which would hide what the
        // datapath let through: the node bridges frames untouched instead.
        for key in [
            "bridge-nf-call-iptables",
            "bridge-nf-call-ip6tables",
            "bridge-nf-call-arptables",
        ] {
            let path = format!("/proc/sys/net/bridge/{key}");
            let _ = in_ns(&node, || std::fs::write(&path, "0"));
        }
        let bridge = names.bridge.clone();
        ip(&[
            "-n",
            &node,
            "link",
            "add",
            &bridge,
            "address",
            &mac_str(NODE_MAC),
            "type",
            "bridge",
        ]);
        for a in node_addrs {
            add_addr(&node, &bridge, a);
        }
        ip(&["-n", &node, "link", "set", &bridge, "up"]);
        for (name, _) in &workloads {
            net.add(&format!("{}{name}", names.ns_prefix));
        }
        let topo = Topo {
            node,
            bridge,
            names,
            workloads,
            _net: net,
        };
        for k in 0..topo.workloads.len() {
            topo.link(k);
        }
        topo
    }

    fn index(&self, w: &str) -> usize {
        self.workloads
            .iter()
            .position(|(n, _)| n == w)
            .unwrap_or_else(|| panic!("no workload {w}"))
    }

    /// Workload `k`'s veth pair, on the bridge, up, addressed.
    fn link(&self, k: usize) {
        let (name, addrs) = &self.workloads[k];
        let (ns, dev) = (self.ns(name), self.dev(name));
        ip(&[
            "-n",
            &self.node,
            "link",
            "add",
            &dev,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            &mac_str(mac_of(k)),
            "netns",
            &ns,
        ]);
        ip(&[
            "-n",
            &self.node,
            "link",
            "set",
            &dev,
            "master",
            &self.bridge,
            "up",
        ]);
        for a in addrs {
            add_addr(&ns, "eth0", a);
        }
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
    }

    /// Create workload `w`'s veth pair again (after its host side was deleted):
    /// the same name and addresses, a new ifindex.
    pub fn plug(&self, w: &str) {
        self.link(self.index(w));
        // Peers may still hold an older device's MAC address.
        for (n, _) in &self.workloads {
            ip_quiet(&["-n", &self.ns(n), "neigh", "flush", "all"]);
        }
    }

    /// Workload `w`'s namespace.
    pub fn ns(&self, w: &str) -> String {
        format!("{}{w}", self.names.ns_prefix)
    }

    /// Workload `w`'s host-side device, in the node.
    pub fn dev(&self, w: &str) -> String {
        format!("{}{w}", self.names.dev_prefix)
    }

    /// MAC of workload `w`'s eth0.
    pub fn mac(&self, w: &str) -> [u8; 6] {
        mac_of(self.index(w))
    }

    /// ifindex of a device in the node namespace.
    pub fn node_ifindex(&self, dev: &str) -> u32 {
        in_ns(&self.node, || {
            nix::net::if_::if_nametoindex(dev)
                .unwrap_or_else(|e| panic!("if_nametoindex {dev}: {e}"))
        })
    }

    /// ifindex of workload `w`'s host-side device.
    pub fn ifindex(&self, w: &str) -> u32 {
        self.node_ifindex(&self.dev(w))
    }

    /// ifindexes of every device of the node now.
    pub fn node_ifindexes(&self) -> Vec<u32> {
        in_ns(&self.node, || {
            nix::net::if_::if_nameindex()
                .map(|l| l.iter().map(|i| i.index()).collect())
                .unwrap_or_default()
        })
    }
}

fn mac_of(k: usize) -> [u8; 6] {
    [0x02, 0x07, 0, 0, 0, k as u8 + 1]
}

fn add_addr(ns: &str, dev: &str, a: &str) {
    if a.contains(':') {
        ip(&["-n", ns, "addr", "add", a, "dev", dev, "nodad"]);
    } else {
        ip(&["-n", ns, "addr", "add", a, "dev", dev]);
    }
}

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

//! Network namespaces: entering one (only the calling thread moves), sysctls in
//! one, and [`Netns`], the guard that deletes the namespaces it made.

use std::fs::File;

use super::cmd::{ip, ip_quiet};

/// Move the calling thread into network namespace `ns`.
pub fn enter(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

/// Run `f` on a thread that joined network namespace `ns`.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .expect("namespace thread panicked")
    })
}

/// Set `key` (a path under /proc/sys, `net/ipv4/ip_forward`) in namespace `ns`:
/// /proc/sys/net is the namespace of the thread that opens it.
pub fn sysctl(ns: &str, key: &str, value: &str) {
    let path = format!("/proc/sys/{key}");
    in_ns(ns, || std::fs::write(&path, value)).unwrap_or_else(|e| panic!("{ns}: {path}: {e}"));
}

/// Network namespaces a test made; deleted (last made first) on drop.
#[derive(Default)]
pub struct Netns {
    names: Vec<String>,
}

impl Netns {
    /// Create `name` (after removing a leftover of a crashed run) with its
    /// loopback up and no duplicate address detection on links made later: a
    /// tentative address delays IPv6 neighbour discovery by seconds.
    pub fn add(&mut self, name: &str) {
        assert!(
            name.starts_with("np"),
            "{name}: test namespaces start with np"
        );
        ip_quiet(&["netns", "del", name]);
        ip(&["netns", "add", name]);
        self.names.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
        for conf in ["all", "default"] {
            sysctl(name, &format!("net/ipv6/conf/{conf}/accept_dad"), "0");
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Workloads first (their veth peers go with them), then the nodes.
        for n in self.names.iter().rev() {
            ip_quiet(&["netns", "del", n]);
        }
    }
}

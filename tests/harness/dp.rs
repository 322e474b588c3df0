//! A `KernelDatapath` under a pin directory of its own ([`Dp`]: its drop
//! detaches and unpins everything, also after the Rust object was forgotten),
//! settings sized for tests, compiled states written by hand, and enforcing a
//! compiled state on a [`Topo`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use netpol::api::model::Interface;
use netpol::datapath::packet::PacketSpec;
use netpol::datapath::{Attachment, Datapath, DatapathSettings, Hook, KernelDatapath};
use netpol::policy::types::{Compiled, Direction, EntryVerdict, IpcacheEntry, PolicyEntry};

use super::netns::in_ns;
use super::topo::Topo;

static PIN_SEQ: AtomicU32 = AtomicU32::new(0);

/// Settings sized for tests, with a generous event budget so every drop is
/// reported.
pub fn settings() -> DatapathSettings {
    DatapathSettings {
        ct_max_entries: 4096,
        ipcache_max_entries: 1024,
        policy_max_entries: 4096,
        endpoint_max_entries: 64,
        events_per_sec: 100_000,
        ..DatapathSettings::default()
    }
}

/// A KernelDatapath pinned under `/sys/fs/bpf/<prefix>-test-<tag>-<pid>-<n>`.
pub struct Dp {
    dp: Option<KernelDatapath>,
    pub pin: PathBuf,
}

impl Dp {
    pub fn open(prefix: &str, tag: &str, settings: &DatapathSettings) -> Dp {
        let n = PIN_SEQ.fetch_add(1, Ordering::SeqCst);
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/{prefix}-test-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pin);
        let dp = KernelDatapath::open(&pin, settings).expect("open the kernel datapath");
        Dp { dp: Some(dp), pin }
    }

    pub fn dp(&mut self) -> &mut KernelDatapath {
        self.dp.as_mut().expect("datapath open")
    }

    /// Drop the Rust object but keep pins (and links) in place.
    pub fn forget(&mut self) {
        self.dp = None;
    }

    /// Adopt the pins again.
    pub fn reopen(&mut self, settings: &DatapathSettings) {
        self.dp =
            Some(KernelDatapath::open(&self.pin, settings).expect("adopt the pinned datapath"));
    }

    /// Whether one packet passes `hook` (BPF_PROG_TEST_RUN).
    pub fn run(&mut self, hook: Hook, p: &PacketSpec) -> bool {
        self.dp()
            .test_run(hook, &p.build(), 1)
            .expect("test run")
            .passed()
    }
}

impl Drop for Dp {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.as_mut() {
            let _ = dp.detach_all();
        }
        if self.pin.exists() {
            if let Ok(mut dp) = KernelDatapath::open(&self.pin, &settings()) {
                let _ = dp.detach_all();
            }
            let _ = std::fs::remove_dir_all(&self.pin);
        }
    }
}

/// The inner map in `slot` of the pinned outer map `outer` (one generation's
/// ipcache, endpoint table or policy) of the datapath pinned at `pin`.
pub fn inner_map(pin: &std::path::Path, outer: &str, slot: u32) -> libbpf_rs::MapHandle {
    use libbpf_rs::{MapCore, MapFlags, MapHandle};
    let o = MapHandle::from_pinned_path(pin.join("maps").join(outer)).expect("the outer map");
    let id = o
        .lookup(&slot.to_ne_bytes(), MapFlags::ANY)
        .expect("read the outer map")
        .expect("the slot holds a map");
    MapHandle::from_map_id(u32::from_ne_bytes(id[..4].try_into().unwrap())).expect("the inner map")
}

/// Attachments of every local endpoint of `c`, its interface resolved in the
/// topology's node namespace.
pub fn attachments(topo: &Topo, c: &Compiled) -> Vec<Attachment> {
    c.endpoints
        .iter()
        .filter(|e| e.local)
        .map(|e| match &e.interface {
            Some(Interface::Name(n)) => Attachment {
                slot: e.slot,
                ifindex: topo.node_ifindex(n),
            },
            other => panic!("endpoint {} has interface {other:?}", e.name),
        })
        .collect()
}

/// Apply `c` with these attachments and attach them (in the node namespace).
pub fn apply_and_attach(dp: &mut Dp, topo: &Topo, c: &Compiled, att: &[Attachment]) -> u64 {
    let generation = dp.dp().apply(c, att).expect("apply");
    let k = dp.dp();
    in_ns(&topo.node, move || k.sync_attachments(att)).expect("attach");
    generation
}

/// Apply `c` and attach its local endpoints.
pub fn enforce(dp: &mut Dp, topo: &Topo, c: &Compiled) -> Vec<Attachment> {
    let att = attachments(topo, c);
    apply_and_attach(dp, topo, c, &att);
    att
}

/// Every address of every endpoint of `c` in its ipcache (unsorted), as compile
/// puts them.
pub fn ipcache_of_endpoints(c: &mut Compiled) {
    for ep in c.endpoints.clone() {
        for a in &ep.addresses {
            c.ipcache.push(IpcacheEntry {
                net: ipnet::IpNet::from(*a),
                identity: ep.identity,
                endpoint: Some(ep.slot),
            });
        }
    }
}

/// The explicit /0 entries compile emits for the world: 0.0.0.0/0 (identity 9)
/// and ::/0 (identity 10), unsorted.
pub fn push_world(c: &mut Compiled) {
    c.ipcache.push(IpcacheEntry {
        net: "0.0.0.0/0".parse().unwrap(),
        identity: 9,
        endpoint: None,
    });
    c.ipcache.push(IpcacheEntry {
        net: "::/0".parse().unwrap(),
        identity: 10,
        endpoint: None,
    });
}

/// A policy entry of the endpoint in slot 0.
pub fn entry(
    dir: Direction,
    identity: u32,
    proto: u8,
    port: u16,
    prefix: u8,
    verdict: EntryVerdict,
    rule: u32,
) -> PolicyEntry {
    PolicyEntry {
        endpoint: 0,
        direction: dir,
        identity,
        proto,
        port,
        port_prefix: prefix,
        verdict,
        rule,
    }
}

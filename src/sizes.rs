//! How many entries each sized BPF map holds: the one definition of every
//! map-size default, and the netpold.toml key that changes each.
//!
//! Read by `config` (the defaults of `[maps]` and `conntrack.max_entries`),
//! `datapath` (`DatapathSettings::default`, the sizes the maps are created
//! with: the C header's `max_entries` are placeholders the loader overrides) and
//! `policy::compile` (the budget a compiled state must fit, and how a refusal
//! names the key to raise). Plain data: no I/O, nothing that depends on another
//! module of this crate.

use std::fmt;

/// The file whose keys [`MapKind::key`] names, as messages print it.
pub const SETTINGS_FILE: &str = "netpold.toml";

/// A map whose size is a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MapKind {
    /// Prefix → identity (LPM trie, IPv4 and IPv6).
    Ipcache,
    /// Per-endpoint policy entries: one host's policy map.
    Policy,
    /// ifindex → endpoint slot (and the per-slot counters).
    Endpoints,
    /// Connection tracking (LRU).
    Conntrack,
}

impl MapKind {
    pub const ALL: [MapKind; 4] = [
        MapKind::Ipcache,
        MapKind::Policy,
        MapKind::Endpoints,
        MapKind::Conntrack,
    ];

    /// The netpold.toml key that sets its size.
    pub const fn key(self) -> &'static str {
        match self {
            MapKind::Ipcache => "maps.ipcache_max_entries",
            MapKind::Policy => "maps.policy_max_entries",
            MapKind::Endpoints => "maps.endpoint_max_entries",
            MapKind::Conntrack => "conntrack.max_entries",
        }
    }
}

impl fmt::Display for MapKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// The size of every sized map, in entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    pub ipcache: u32,
    pub policy: u32,
    pub endpoints: u32,
    pub conntrack: u32,
}

impl MapSizes {
    /// The defaults: what netpold uses when netpold.toml does not say.
    /// The ipcache holds a fleet registry: 100,000 remote endpoints with a v4
    /// and a v6 address each, and room for the policies' CIDRs. It is an LPM
    /// trie, allocated per entry, so the size costs nothing until used. The
    /// policy size bounds both policy maps of a generation: the trie (ranges)
    /// and the hash of one-port entries, whose entries are allocated per entry
    /// too but whose bucket array (about 16 bytes a slot, 4 MiB at the
    /// default) exists from creation, once per generation. The endpoint table
    /// (and the counters) number attached endpoints only.
    pub const DEFAULT: MapSizes = MapSizes {
        ipcache: 262144,
        policy: 262144,
        endpoints: 4096,
        conntrack: 65536,
    };

    pub const fn get(&self, map: MapKind) -> u32 {
        match map {
            MapKind::Ipcache => self.ipcache,
            MapKind::Policy => self.policy,
            MapKind::Endpoints => self.endpoints,
            MapKind::Conntrack => self.conntrack,
        }
    }
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes::DEFAULT
    }
}

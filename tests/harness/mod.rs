//! The one test harness, shared by the three test binaries (`tests/offline.rs`,
//! `tests/privileged.rs`, `tests/packaging.rs`; each says `mod harness;`). It owns
//! what more than one test needs and nothing a single test needs alone:
//!
//! | module | what it owns |
//! | --- | --- |
//! | [`require`] | the one rule for a test that needs root, bpffs or tools: run, or skip with a message, or fail under `CI=true`; the lock a test takes to run alone |
//! | [`cmd`] | the repository's paths, the binaries, the one `ip` runner |
//! | [`netns`] | entering a network namespace, sysctls in one, the [`netns::Netns`] guard |
//! | [`topo`] | a node namespace with a bridge and one namespace per workload behind a veth pair |
//! | [`probe`] | TCP listeners and connection probes from inside a namespace |
//! | [`dp`] | a `KernelDatapath` under its own pin directory, and enforcing a compiled state on a [`topo::Topo`] |
//! | [`events`] | the verdict events a fake datapath hands the daemon |
//! | [`daemon`] | the real `netpold` in a node's network namespace, its files, its socket, its end |
//! | [`etcd`] | a real etcd for fleet mode, on loopback or inside a test's namespace, killed also on failure |
//! | [`lab`] | a topology, listeners and a daemon together (daemon end to end, faults, soak) |
//! | [`monitor`] | `netpolctl monitor --json` of a lab's daemon, as parsed lines |
//! | [`rng`] | the one deterministic generator |
//! | [`nodegen`] | the generated multi-node scenario (offline operator tests, privileged multi-node and fleet tests) |
//! | [`prom`] | the Prometheus exposition validator and scraper |
//!
//! Everything that creates something in the kernel or on disk is a guard whose
//! `Drop` removes it, also when a test fails. Names start with `np` and a
//! suite's letter (`npd` datapath, `npy` bypass, `npe` daemon end to end, `npf`
//! faults and soak, `npn` nodes, `npg` fleet, `npq` DNS, `npk` packaging) and carry the process id and a
//! per-test tag, so tests of one binary can run side by side; the few with fixed
//! names (the two multi-node tests, the packaging tests) take turns.

// Each binary uses part of the harness.
#![allow(dead_code)]

pub mod cmd;
pub mod daemon;
pub mod dp;
pub mod etcd;
pub mod events;
pub mod lab;
pub mod monitor;
pub mod netns;
pub mod nodegen;
pub mod probe;
pub mod prom;
pub mod require;
pub mod rng;
pub mod topo;

// Not every binary calls both.
#[allow(unused_imports)]
pub use require::{privileged, Needs};

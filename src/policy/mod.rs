//! The pure core: resolve rules against endpoints into per-endpoint L3/L4 entries
//! (`compile`) and decide flows exactly as the datapath does (`lookup`, `trace`).
//! Owns everything that decides a verdict from valid inputs (labels,
//! identities, the registry's resolution, compile, lookup, trace); no I/O, no
//! root, no configuration (its options are given), no hidden state.

pub mod compile;
pub mod fqdn;
pub mod identity;
pub mod labels;
pub mod lint;
pub mod lookup;
pub mod registry;
pub mod trace;
pub mod types;

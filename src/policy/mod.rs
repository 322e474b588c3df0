//! The pure core: resolve rules against endpoints into per-endpoint L3/L4 entries
//! (`compile`) and decide flows exactly as the datapath does (`lookup`, `trace`).
//! No I/O, no root.

pub mod compile;
pub mod identity;
pub mod labels;
pub mod lookup;
pub mod registry;
pub mod trace;
pub mod types;

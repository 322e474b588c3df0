//! netpol: label-based network policy (CiliumNetworkPolicy, Kubernetes
//! NetworkPolicy) enforced with eBPF on Linux hosts without a Kubernetes API server.
//!
//! Data flows one way: files → [`api`] (parse, validate) → [`policy`] (compile,
//! pure) → [`datapath`] (fill the inactive generation, flip). [`pipeline`] is
//! that flow up to the compiled state, once for every reader: [`cli`] runs it
//! once, [`daemon`] on every trigger before it applies. [`config`] reads
//! netpold.toml and builds the options of the others; [`sizes`] holds the map
//! sizes every layer reads. See README.md, "Layout".

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod error;
pub mod fleet;
pub mod hash;
pub mod logging;
pub mod pipeline;
pub mod policy;
pub mod sizes;
pub mod text;

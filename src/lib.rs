//! netpol: label-based network policy (CiliumNetworkPolicy, Kubernetes
//! NetworkPolicy) enforced with eBPF on Linux hosts without a Kubernetes API server.
//!
//! Data flows one way: files → [`api`] (parse, validate) → [`policy`] (compile,
//! pure) → [`datapath`] (fill the inactive generation, flip).

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod fleet;
pub mod logging;
pub mod policy;

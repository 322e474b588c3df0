//! `netpolctl` subcommands, one module each. The binary only dispatches.
//!
//! Exit codes: `check` 0 valid / 1 invalid; `trace` 0 allowed / 1 denied / 2 error;
//! everything else 0 success / 1 failure / 2 usage or I/O error.

pub mod check;
pub mod common;
pub mod daemonctl;
pub mod diff;
pub mod fleet;
pub mod fqdn;
pub mod matrix;
pub mod registry;
pub mod trace;

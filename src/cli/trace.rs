//! `netpolctl trace`: the offline verdict for a new connection, explained.
//! Also the loading helper `matrix` shares: read the files, report every
//! problem, compile with the config's node name and map sizes (a set that would
//! not fit them is a problem like any other).

use std::io::Write as _;

use clap::{Args, ValueEnum};

use super::common::FileArgs;
use crate::policy::compile::try_compile;
use crate::policy::trace::{resolve_side, trace, Verdict};
use crate::policy::types::{proto, Compiled};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
}

impl ProtoArg {
    pub fn number(self) -> u8 {
        match self {
            ProtoArg::Tcp => proto::TCP,
            ProtoArg::Udp => proto::UDP,
            ProtoArg::Sctp => proto::SCTP,
            ProtoArg::Icmp => proto::ICMP,
            ProtoArg::Icmpv6 => proto::ICMPV6,
        }
    }

    /// The port to use when `--port` is not given: echo request for ICMP.
    pub fn default_port(self) -> Option<u16> {
        match self {
            ProtoArg::Icmp => Some(8),
            ProtoArg::Icmpv6 => Some(128),
            _ => None,
        }
    }
}

const TRACE_EXAMPLES: &str = "\
Examples:
  netpolctl trace --from default/frontend-1 --to backend --port 80
  netpolctl trace --from 10.0.1.11 --to 10.0.1.21 --port 5432 --proto tcp
  netpolctl trace --from frontend-1 --to 203.0.113.7 --port 53 --proto udp --json
  netpolctl trace --from frontend-1 --to backend --proto icmp        # echo request (type 8)
  netpolctl trace --policy-dir ./netpol.d --endpoint-dir ./endpoints.d --from a --to b --port 443

SRC and DST are an endpoint (namespace/name, or name when unique) or an IP address;
an address of a registry endpoint is that endpoint, any other address gets its
identity from the ipcache (CIDR identities from policies, world otherwise).
The flow is allowed when the sender's egress policy and the receiver's ingress
policy both allow it. Exit status: 0 allowed, 1 denied, 2 error.";

#[derive(Debug, Args)]
#[command(after_help = TRACE_EXAMPLES)]
pub struct TraceArgs {
    #[command(flatten)]
    pub files: FileArgs,
    /// Source: endpoint (namespace/name or name) or IP address
    #[arg(long, value_name = "SRC")]
    pub from: String,
    /// Destination: endpoint (namespace/name or name) or IP address
    #[arg(long, value_name = "DST")]
    pub to: String,
    /// Destination port (for icmp/icmpv6: the ICMP type, default echo request 8/128)
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// Protocol
    #[arg(long, value_enum, default_value = "tcp")]
    pub proto: ProtoArg,
}

/// Load, validate and compile the files named by `files`. On invalid files, the
/// problems are printed to stderr and `Ok(None)` returned (exit 2 for callers).
pub fn load_compiled(files: &FileArgs) -> anyhow::Result<Option<Compiled>> {
    let cfg = files.resolve()?;
    let mut problems: Vec<String> = Vec::new();
    let policies = match crate::api::load_policy_dir_with(&cfg.policy_dir, &cfg.load_options()) {
        Ok(p) => Some(p),
        Err(ps) => {
            problems.extend(ps.iter().map(ToString::to_string));
            None
        }
    };
    let registry =
        match crate::api::load_endpoint_dirs_with(&cfg.endpoint_dirs, &cfg.load_options()) {
            Ok(r) => {
                problems.extend(
                    crate::policy::registry::validate(&r)
                        .iter()
                        .map(ToString::to_string),
                );
                Some(r)
            }
            Err(ps) => {
                problems.extend(ps.iter().map(ToString::to_string));
                None
            }
        };
    let (Some(policies), Some(registry), true) = (policies, registry, problems.is_empty()) else {
        let mut err = std::io::stderr().lock();
        for p in &problems {
            let _ = writeln!(err, "{p}");
        }
        let _ = writeln!(
            err,
            "netpolctl: {} problem(s) in the policy or registry files",
            problems.len()
        );
        return Ok(None);
    };
    // As netpold compiles (node name, audit, allow_localhost, map sizes); only the
    // host's own addresses, which netpold learns from netlink, are not known here.
    let opts = cfg.compile_options();
    match try_compile(&policies, &registry, &opts) {
        Ok(c) => Ok(Some(c)),
        Err(e) => {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{e}");
            let _ = writeln!(
                err,
                "netpolctl: 1 problem(s) in the policy or registry files"
            );
            Ok(None)
        }
    }
}

pub fn run(args: &TraceArgs) -> anyhow::Result<i32> {
    let port = match (args.port, args.proto.default_port()) {
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => {
            eprintln!(
                "netpolctl trace: --port is required for --proto {:?}",
                args.proto
            );
            return Ok(2);
        }
    };
    if matches!(args.proto, ProtoArg::Icmp | ProtoArg::Icmpv6) && port > 255 {
        eprintln!("netpolctl trace: ICMP type {port} is out of range 0..255");
        return Ok(2);
    }
    let Some(compiled) = load_compiled(&args.files)? else {
        return Ok(2);
    };
    let (src, dst) = match (
        resolve_side(&compiled, &args.from),
        resolve_side(&compiled, &args.to),
    ) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("netpolctl trace: {e}");
            return Ok(2);
        }
    };
    let result = trace(&compiled, &src, &dst, args.proto.number(), port);
    if args.files.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{result}");
    }
    Ok(match result.verdict {
        Verdict::Allowed => 0,
        Verdict::Denied => 1,
    })
}

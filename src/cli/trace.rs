//! `netpolctl trace`: the offline verdict for a new connection, explained, on
//! the state [`super::common::load_compiled`] reads and compiles as netpold
//! would. Also the protocol argument `matrix` shares.
//!
//! Owns the arguments and the output; decides nothing itself (`policy::trace`
//! does, and `policy::fqdn::trace_name` for a DNS name as DST) and never
//! contacts the daemon: what the DNS proxy learned comes from the file netpold
//! keeps in its state_dir.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use super::common::{compile_with_learned, load_in_force, FileArgs};
use super::fqdn::{learned_file, learned_view};
use crate::api::validate::fqdn_name;
use crate::policy::fqdn::trace_name;
use crate::policy::trace::{resolve_side, trace, TraceError, Verdict};
use crate::policy::types::proto;

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
  netpolctl trace --from shop/checkout-1 --to api.stripe.com --port 443    # a DNS name
  netpolctl trace --from checkout-1 --to 192.0.2.1 --port 443 --state-dir /var/lib/netpol

SRC and DST are an endpoint (namespace/name, or name when unique) or an IP address;
an address of a registry endpoint is that endpoint, any other address gets its
identity from the ipcache (CIDR identities from policies, world otherwise).
DST may also be a DNS name: the flow is traced to every address netpold's DNS proxy
learned for it (state_dir/dns-learned.json; --state-dir picks another directory), and
a toFQDNs rule that decides is shown with its selector, the name and the address;
a name nothing was learned for is denied (toFQDNs allows only learned addresses).
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
    /// Destination: endpoint (namespace/name or name), IP address, or a DNS
    /// name (traced to each address the DNS proxy learned for it)
    #[arg(long, value_name = "DST")]
    pub to: String,
    /// Destination port (for icmp/icmpv6: the ICMP type, default echo request 8/128)
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// Protocol
    #[arg(long, value_enum, default_value = "tcp")]
    pub proto: ProtoArg,
    /// Judge with the addresses the DNS proxy learned, from DIR/dns-learned.json
    /// (toFQDNs rules); a DNS name as DST reads the config's state_dir without it
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
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
    let Some((cfg, held, mut compiled)) = load_in_force(&args.files)? else {
        return Ok(2);
    };
    // With --state-dir, every verdict is judged with what the proxy learned.
    let mut learned = None;
    if let Some(dir) = &args.state_dir {
        let view = learned_view(dir)?;
        compiled = compile_with_learned(&cfg, &held, view.clone())?;
        learned = Some(view);
    }
    let src = match resolve_side(&compiled, &args.from) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("netpolctl trace: {e}");
            return Ok(2);
        }
    };
    let dst = match resolve_side(&compiled, &args.to) {
        Ok(d) => d,
        // No endpoint and no address: a DNS name, traced to what was learned for it.
        Err(TraceError::UnknownEndpoint(_)) if fqdn_name(&args.to).is_ok() => {
            let learned = match learned {
                Some(l) => l,
                None => {
                    let dir = &cfg.state_dir;
                    let view = learned_view(dir).with_context(|| {
                        format!("--to {}: the DNS proxy's learned names ({}; --state-dir picks another)", args.to, learned_file(dir).display())
                    })?;
                    compiled = compile_with_learned(&cfg, &held, view.clone())?;
                    view
                }
            };
            let policies = held
                .policies
                .as_ref()
                .map(|p| &p.set)
                .context("no policy set in force")?;
            let t = trace_name(
                &compiled,
                policies,
                &learned,
                &src,
                &args.to,
                args.proto.number(),
                port,
            );
            if args.files.json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print!("{t}");
            }
            return Ok(match t.verdict {
                Verdict::Allowed => 0,
                Verdict::Denied => 1,
            });
        }
        Err(e) => {
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

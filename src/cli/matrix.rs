//! `netpolctl matrix`: the connectivity table of every registry endpoint to every
//! other, for one protocol and port, decided by the same engine as `trace`.

use clap::Args;
use serde::Serialize;

use super::common::FileArgs;
use super::trace::{load_compiled, ProtoArg};
use crate::policy::trace::{endpoint_side, trace, Side, Verdict};
use crate::policy::types::Compiled;

const MATRIX_EXAMPLES: &str = "\
Examples:
  netpolctl matrix                       # tcp/80
  netpolctl matrix --port 5432
  netpolctl matrix --proto icmp          # echo request
  netpolctl matrix --port 53 --proto udp --json

Rows are sources, columns destinations (numbered as in the legend); ✓ allowed,
✗ denied, A allowed only because of audit mode, · the endpoint itself.";

#[derive(Debug, Args)]
#[command(after_help = MATRIX_EXAMPLES)]
pub struct MatrixArgs {
    #[command(flatten)]
    pub files: FileArgs,
    /// Destination port (ICMP type for icmp/icmpv6); default 80, or echo request
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// Protocol
    #[arg(long, value_enum, default_value = "tcp")]
    pub proto: ProtoArg,
}

#[derive(Debug, Serialize)]
struct Cell {
    from: String,
    to: String,
    verdict: Verdict,
    audit: bool,
}

#[derive(Debug, Serialize)]
struct MatrixJson {
    proto: String,
    port: u16,
    endpoints: Vec<String>,
    flows: Vec<Cell>,
}

fn sides(c: &Compiled) -> Vec<Side> {
    c.endpoints
        .iter()
        .map(|e| {
            let name = match &e.namespace {
                Some(ns) if e.kind == crate::api::model::EndpointKind::Workload => format!("{ns}/{}", e.name),
                _ => e.name.clone(),
            };
            endpoint_side(c, &name, e.slot)
        })
        .collect()
}

pub fn run(args: &MatrixArgs) -> anyhow::Result<i32> {
    let port = args.port.or(args.proto.default_port()).unwrap_or(80);
    let Some(compiled) = load_compiled(&args.files)? else {
        return Ok(2);
    };
    let p = args.proto.number();
    let eps = sides(&compiled);
    let names: Vec<String> = eps.iter().map(|s| s.endpoint.clone().unwrap_or_default()).collect();
    let mut grid: Vec<Vec<(Verdict, bool)>> = Vec::new();
    for s in &eps {
        grid.push(eps.iter().map(|d| {
            let r = trace(&compiled, s, d, p, port);
            (r.verdict, r.audit)
        }).collect());
    }
    let pname = crate::policy::trace::proto_name(p);
    if args.files.json {
        let mut flows = Vec::new();
        for (i, row) in grid.iter().enumerate() {
            for (j, (v, a)) in row.iter().enumerate() {
                flows.push(Cell { from: names[i].clone(), to: names[j].clone(), verdict: *v, audit: *a });
            }
        }
        let out = MatrixJson { proto: pname, port, endpoints: names, flows };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!("{pname}/{port}: rows = source, columns = destination");
    for (i, n) in names.iter().enumerate() {
        println!("  [{}] {n}", i + 1);
    }
    let w = names.iter().map(|n| n.chars().count()).max().unwrap_or(4).max(4);
    let cw = (names.len().to_string().len() + 1).max(2);
    let mut header = format!("{:w$} ", "");
    for j in 0..names.len() {
        header.push_str(&format!("{:>cw$}", j + 1));
    }
    println!("{header}");
    for (i, row) in grid.iter().enumerate() {
        let mut line = format!("{:<w$} ", names[i]);
        for (j, (v, a)) in row.iter().enumerate() {
            let ch = if i == j {
                "·"
            } else {
                match (v, a) {
                    (Verdict::Allowed, false) => "✓",
                    (Verdict::Allowed, true) => "A",
                    (Verdict::Denied, _) => "✗",
                }
            };
            line.push_str(&format!("{:>cw$}", ch));
        }
        println!("{line}");
    }
    Ok(0)
}

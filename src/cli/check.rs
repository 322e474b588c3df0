//! `netpolctl check`: validate the policy directory and the endpoint registry
//! exactly as the daemon would (the same [`pipeline`] pass, compiling them
//! within the config's map sizes), and report every problem.
//!
//! Output goes to stdout (it is the command's result, and scripts capture it):
//! `ok: ...` and exit 0 when everything is valid; otherwise one
//! `file:line:column: ...` line per problem and exit 1 (a count goes to stderr). `--json` prints one
//! object: `{"valid", "problems": [...], "policies", "rules", "endpoints", ...}`.
//!
//! Owns the report only; reads and compiles through the pipeline, like every
//! command, and never contacts the daemon.

use clap::Args;
use serde::Serialize;

use super::common::FileArgs;
use crate::api::model::EndpointKind;
use crate::api::Problem;
use crate::config::Config;
use crate::pipeline;

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub files: FileArgs,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub policies: usize,
    pub rules: usize,
    pub endpoints: usize,
    pub host_endpoints: usize,
    pub nodes: usize,
    pub namespaces: usize,
}

#[derive(Debug, Serialize)]
struct JsonProblem<'a> {
    file: String,
    line: Option<usize>,
    column: Option<usize>,
    document: Option<usize>,
    object: Option<&'a str>,
    field: Option<&'a str>,
    message: &'a str,
    /// The problem as one line, as printed without `--json`.
    text: String,
}

#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    valid: bool,
    problems: Vec<JsonProblem<'a>>,
    #[serde(flatten)]
    summary: &'a Summary,
}

/// Validate everything as the daemon would: the files of `cfg` (with its
/// `strict_file_modes`), compiled with its node name and map sizes when both
/// sets are valid (a set that would not fit the maps is a problem too). Returns
/// the summary of what was valid and every problem.
pub fn check(cfg: &Config) -> (Summary, Vec<Problem>) {
    let (held, pass) = pipeline::load_files(cfg);
    let mut summary = Summary::default();
    if let Some(p) = &held.policies {
        summary.policies = p.set.policies.len();
        summary.rules = p.set.policies.iter().map(|p| p.rules.len()).sum();
    }
    if let Some(r) = &held.registry {
        let reg = &r.set;
        summary.host_endpoints = reg
            .endpoints
            .iter()
            .filter(|e| e.kind == EndpointKind::Host)
            .count();
        summary.endpoints = reg.endpoints.len() - summary.host_endpoints;
        summary.nodes = reg.nodes.len();
        summary.namespaces = reg.namespaces.len();
    }
    (summary, pass.problems)
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub fn run(args: &CheckArgs) -> anyhow::Result<i32> {
    let cfg = args.files.resolve()?;
    let (summary, problems) = check(&cfg);
    let valid = problems.is_empty();
    if args.files.json {
        let report = JsonReport {
            valid,
            problems: problems
                .iter()
                .map(|p| JsonProblem {
                    file: p.file.display().to_string(),
                    line: p.line,
                    column: p.column,
                    document: p.document,
                    object: p.object.as_deref(),
                    field: p.field.as_deref(),
                    message: &p.message,
                    text: p.to_string(),
                })
                .collect(),
            summary: &summary,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if valid {
        println!(
            "ok: {} ({}), {}, {}, {}, {}",
            plural(summary.policies, "policy", "policies"),
            plural(summary.rules, "rule", "rules"),
            plural(summary.endpoints, "endpoint", "endpoints"),
            plural(summary.host_endpoints, "host endpoint", "host endpoints"),
            plural(summary.nodes, "node", "nodes"),
            plural(summary.namespaces, "namespace", "namespaces"),
        );
    } else {
        for p in &problems {
            println!("{p}");
        }
        eprintln!(
            "netpolctl check: {} found; nothing would be applied",
            plural(problems.len(), "problem", "problems")
        );
    }
    Ok(if valid { 0 } else { 1 })
}

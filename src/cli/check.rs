//! `netpolctl check`: validate the policy directory and the endpoint registry
//! exactly as the daemon would (the same [`pipeline`] pass, compiling them
//! within the config's map sizes), and report every problem.
//!
//! Output goes to stdout (it is the command's result, and scripts capture it):
//! `ok: ...` and exit 0 when everything is valid; otherwise one
//! `file:line:column: ...` line per problem and exit 1 (a count goes to stderr).
//! Warnings (`api::warn`: accepted, but worth a look; those about what the
//! policies do against the registry come from `policy::lint` through the
//! pipeline) follow as
//! `file:line:column: warning: ... [code]` lines and do not change the exit
//! status, unless `--strict` makes them fail too. `--json` prints one object:
//! `{"valid", "problems": [...], "warnings": [...], "policies", "rules", "endpoints", ...}`,
//! where `valid` is what the exit status says.
//!
//! Owns the report only; reads and compiles through the pipeline, like every
//! command, and never contacts the daemon.

use clap::Args;
use serde::Serialize;

use super::common::FileArgs;
use crate::api::model::EndpointKind;
use crate::api::{Problem, Warning, WarningCode};
use crate::config::Config;
use crate::pipeline;
use crate::text::count;

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub files: FileArgs,
    /// Fail (exit 1) on warnings too: lenient spellings a Cilium cluster would
    /// refuse or read differently, and policies that do nothing or not what
    /// they say against the registry
    #[arg(long)]
    pub strict: bool,
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
struct JsonWarning<'a> {
    #[serde(flatten)]
    at: JsonProblem<'a>,
    code: WarningCode,
}

#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    valid: bool,
    problems: Vec<JsonProblem<'a>>,
    warnings: Vec<JsonWarning<'a>>,
    #[serde(flatten)]
    summary: &'a Summary,
}

/// Validate everything as the daemon would: the files of `cfg` (with its
/// `strict_file_modes`), compiled with its node name and map sizes when both
/// sets are valid (a set that would not fit the maps is a problem too).
/// Returns the summary of what was valid, every problem and every warning.
pub fn check(cfg: &Config) -> (Summary, Vec<Problem>, Vec<Warning>) {
    let (held, pass) = pipeline::load_files(cfg);
    summarize(&held, pass)
}

/// The summary of what `held` has, with the pass's problems and warnings.
fn summarize(held: &pipeline::Held, pass: pipeline::Pass) -> (Summary, Vec<Problem>, Vec<Warning>) {
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
    (summary, pass.problems, pass.warnings)
}

fn json_problem(p: &Problem, text: String) -> JsonProblem<'_> {
    JsonProblem {
        file: p.file.display().to_string(),
        line: p.line,
        column: p.column,
        document: p.document,
        object: p.object.as_deref(),
        field: p.field.as_deref(),
        message: &p.message,
        text,
    }
}

pub fn run(args: &CheckArgs) -> anyhow::Result<i32> {
    // With --from-etcd the remote entries netpold would leave out count as
    // problems here: check is where they are looked for.
    let (_, held, pass, rejected) = super::common::load(&args.files)?;
    let (summary, mut problems, warnings) = summarize(&held, pass);
    problems.extend(rejected);
    let valid = problems.is_empty() && (warnings.is_empty() || !args.strict);
    if args.files.json {
        let report = JsonReport {
            valid,
            problems: problems
                .iter()
                .map(|p| json_problem(p, p.to_string()))
                .collect(),
            warnings: warnings
                .iter()
                .map(|w| JsonWarning {
                    at: json_problem(&w.at, w.to_string()),
                    code: w.code,
                })
                .collect(),
            summary: &summary,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(if valid { 0 } else { 1 });
    }
    for p in &problems {
        println!("{p}");
    }
    for w in &warnings {
        println!("{w}");
    }
    if valid {
        println!(
            "ok: {} ({}), {}, {}, {}, {}",
            count(summary.policies, "policy", "policies"),
            count(summary.rules, "rule", "rules"),
            count(summary.endpoints, "endpoint", "endpoints"),
            count(summary.host_endpoints, "host endpoint", "host endpoints"),
            count(summary.nodes, "node", "nodes"),
            count(summary.namespaces, "namespace", "namespaces"),
        );
    }
    let n_warnings = count(warnings.len(), "warning", "warnings");
    if !problems.is_empty() {
        eprintln!(
            "netpolctl check: {} found; nothing would be applied",
            count(problems.len(), "problem", "problems")
        );
        if !warnings.is_empty() {
            eprintln!("netpolctl check: and {n_warnings}");
        }
    } else if !valid {
        eprintln!("netpolctl check: {n_warnings} found, which --strict makes fail (the daemon would apply the files)");
    } else if !warnings.is_empty() {
        eprintln!("netpolctl check: {n_warnings} found (--strict makes them fail)");
    }
    Ok(if valid { 0 } else { 1 })
}

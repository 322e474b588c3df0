//! `netpolctl check`: validate the policy directory and the endpoint registry
//! exactly as the daemon would (including compiling them within the config's map
//! sizes), and report every problem.
//!
//! Output goes to stdout (it is the command's result, and scripts capture it):
//! `ok: ...` and exit 0 when everything is valid; otherwise one
//! `file:line:column: ...` line per problem and exit 1 (a count goes to stderr).
//! Warnings (`api::warn`: accepted, but worth a look) follow as
//! `file:line:column: warning: ... [code]` lines and do not change the exit
//! status, unless `--strict` makes them fail too. `--json` prints one object:
//! `{"valid", "problems": [...], "warnings": [...], "policies", "rules", "endpoints", ...}`,
//! where `valid` is what the exit status says.

use clap::Args;
use serde::Serialize;

use super::common::FileArgs;
use crate::api::{self, Problem, Warning};
use crate::policy::compile::{try_compile, CompileOptions};

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub files: FileArgs,
    /// Fail (exit 1) on warnings too: lenient spellings a Cilium cluster would
    /// refuse or read differently
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
    code: api::WarningCode,
}

#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    valid: bool,
    problems: Vec<JsonProblem<'a>>,
    warnings: Vec<JsonWarning<'a>>,
    #[serde(flatten)]
    summary: &'a Summary,
}

/// Validate everything; returns the summary of what was valid, all problems and
/// all warnings.
/// `opts` carries the config's `strict_file_modes` and `copts` its node name and
/// map sizes, so `check` agrees with the daemon: when both sets are valid they
/// are compiled, and a set that would not fit the maps is a problem too.
pub fn check(
    policy_dir: &std::path::Path,
    endpoint_dirs: &[std::path::PathBuf],
    opts: &api::LoadOptions,
    copts: &CompileOptions,
) -> (Summary, Vec<Problem>, Vec<Warning>) {
    let mut summary = Summary::default();
    let mut problems = Vec::new();
    let loaded = api::load_policy_dir_warned(policy_dir, opts);
    let warnings = loaded.warnings;
    let policies = match loaded.result {
        Ok(set) => {
            summary.policies = set.policies.len();
            summary.rules = set.policies.iter().map(|p| p.rules.len()).sum();
            Some(set)
        }
        Err(p) => {
            problems.extend(p);
            None
        }
    };
    let registry = match api::load_endpoint_dirs_with(endpoint_dirs, opts) {
        Ok(reg) => {
            summary.host_endpoints = reg
                .endpoints
                .iter()
                .filter(|e| e.kind == api::model::EndpointKind::Host)
                .count();
            summary.endpoints = reg.endpoints.len() - summary.host_endpoints;
            summary.nodes = reg.nodes.len();
            summary.namespaces = reg.namespaces.len();
            Some(reg)
        }
        Err(p) => {
            problems.extend(p);
            None
        }
    };
    if let (Some(p), Some(r)) = (&policies, &registry) {
        if let Err(e) = try_compile(p, r, copts) {
            problems.push(e.into());
        }
    }
    (summary, problems, warnings)
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

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub fn run(args: &CheckArgs) -> anyhow::Result<i32> {
    let cfg = args.files.resolve()?;
    let (summary, problems, warnings) = check(
        &cfg.policy_dir,
        &cfg.endpoint_dirs,
        &cfg.load_options(),
        &cfg.compile_options(),
    );
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
            plural(summary.policies, "policy", "policies"),
            plural(summary.rules, "rule", "rules"),
            plural(summary.endpoints, "endpoint", "endpoints"),
            plural(summary.host_endpoints, "host endpoint", "host endpoints"),
            plural(summary.nodes, "node", "nodes"),
            plural(summary.namespaces, "namespace", "namespaces"),
        );
    }
    let n_warnings = plural(warnings.len(), "warning", "warnings");
    if !problems.is_empty() {
        eprintln!(
            "netpolctl check: {} found; nothing would be applied",
            plural(problems.len(), "problem", "problems")
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

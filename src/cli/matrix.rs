//! `netpolctl matrix`: the connectivity table of every registry endpoint to every
//! other, for one protocol and port, decided by the same engine as `trace`; as a
//! text table, JSON, or a self-contained picture (`--svg`, `--html`: a grid of
//! green/red cells whose tooltips name the deciding rule).
//!
//! Owns the table and its pictures; the state comes from
//! [`super::common::load_compiled`], the verdicts from `policy::trace`. Writes
//! only the files it is asked to.

use clap::Args;
use serde::Serialize;

use super::common::{load_compiled, FileArgs};
use super::trace::ProtoArg;
use crate::policy::trace::{endpoint_side, trace, Side, Verdict};
use crate::policy::types::Compiled;

const MATRIX_EXAMPLES: &str = "\
Examples:
  netpolctl matrix                       # tcp/80
  netpolctl matrix --port 5432
  netpolctl matrix --proto icmp          # echo request
  netpolctl matrix --port 53 --proto udp --json
  netpolctl matrix --port 5432 --svg matrix.svg --html matrix.html

Rows are sources, columns destinations (numbered as in the legend); ✓ allowed,
✗ denied, A allowed only because of audit mode, S allowed now and denied once a
staged policy (netpol.io/audit) is enforced, · the endpoint itself.";

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
    /// Also write the matrix as an SVG picture to FILE (hover a cell for the rule)
    #[arg(long, value_name = "FILE")]
    pub svg: Option<std::path::PathBuf>,
    /// Also write the matrix as a self-contained HTML page to FILE
    #[arg(long, value_name = "FILE")]
    pub html: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct Cell {
    from: String,
    to: String,
    verdict: Verdict,
    audit: bool,
    /// Allowed now; a staged policy would deny it once enforced.
    staged: bool,
    /// What decided the flow (the rule, default deny, no policy).
    rule: String,
}

/// How a cell is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Allowed,
    Denied,
    /// Allowed only because of audit mode.
    Audit,
    /// Allowed; a staged policy would deny it once enforced.
    Staged,
}

impl Mark {
    fn of(r: &crate::policy::trace::TraceResult) -> Mark {
        match (r.verdict, r.audit) {
            (Verdict::Denied, _) => Mark::Denied,
            (Verdict::Allowed, false) => Mark::Allowed,
            (Verdict::Allowed, true) if r.staged() => Mark::Staged,
            (Verdict::Allowed, true) => Mark::Audit,
        }
    }
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
                Some(ns) if e.kind == crate::api::model::EndpointKind::Workload => {
                    format!("{ns}/{}", e.name)
                }
                _ => e.name.to_string(),
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
    let names: Vec<String> = eps
        .iter()
        .map(|s| s.endpoint.clone().unwrap_or_default())
        .collect();
    let mut grid: Vec<Vec<Mark>> = Vec::new();
    let mut rules: Vec<Vec<String>> = Vec::new();
    for s in &eps {
        let results: Vec<_> = eps
            .iter()
            .map(|d| trace(&compiled, s, d, p, port))
            .collect();
        grid.push(results.iter().map(Mark::of).collect());
        rules.push(results.iter().map(super::diff::deciding_rule).collect());
    }
    let pname = crate::policy::trace::proto_name(p);
    let pic = Picture {
        proto: &pname,
        port,
        names: &names,
        grid: &grid,
        rules: &rules,
    };
    if let Some(path) = &args.svg {
        std::fs::write(path, pic.svg()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        eprintln!("netpolctl: wrote {}", path.display());
    }
    if let Some(path) = &args.html {
        std::fs::write(path, pic.html()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        eprintln!("netpolctl: wrote {}", path.display());
    }
    if args.files.json {
        let mut flows = Vec::new();
        for (i, row) in grid.iter().enumerate() {
            for (j, m) in row.iter().enumerate() {
                flows.push(Cell {
                    from: names[i].clone(),
                    to: names[j].clone(),
                    verdict: if *m == Mark::Denied {
                        Verdict::Denied
                    } else {
                        Verdict::Allowed
                    },
                    audit: matches!(m, Mark::Audit | Mark::Staged),
                    staged: *m == Mark::Staged,
                    rule: rules[i][j].clone(),
                });
            }
        }
        let out = MatrixJson {
            proto: pname,
            port,
            endpoints: names,
            flows,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!("{pname}/{port}: rows = source, columns = destination");
    for (i, n) in names.iter().enumerate() {
        println!("  [{}] {n}", i + 1);
    }
    let w = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let cw = (names.len().to_string().len() + 1).max(2);
    let mut header = format!("{:w$} ", "");
    for j in 0..names.len() {
        header.push_str(&format!("{:>cw$}", j + 1));
    }
    println!("{header}");
    for (i, row) in grid.iter().enumerate() {
        let mut line = format!("{:<w$} ", names[i]);
        for (j, m) in row.iter().enumerate() {
            let ch = if i == j {
                "·"
            } else {
                match m {
                    Mark::Allowed => "✓",
                    Mark::Audit => "A",
                    Mark::Staged => "S",
                    Mark::Denied => "✗",
                }
            };
            line.push_str(&format!("{:>cw$}", ch));
        }
        println!("{line}");
    }
    Ok(0)
}

/// The matrix as a picture: rows are sources, columns destinations.
struct Picture<'a> {
    proto: &'a str,
    port: u16,
    names: &'a [String],
    grid: &'a [Vec<Mark>],
    rules: &'a [Vec<String>],
}

/// Escape text for XML content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

const CELL: usize = 24;
const GREEN: &str = "#2e9e44";
const RED: &str = "#d1352b";
const AMBER: &str = "#e3a21a";
const PURPLE: &str = "#8e44ad";
const GREY: &str = "#c8c8c8";

impl Picture<'_> {
    fn cell(&self, i: usize, j: usize) -> (&'static str, &'static str) {
        if i == j {
            return ("self", GREY);
        }
        match self.grid[i][j] {
            Mark::Allowed => ("allowed", GREEN),
            Mark::Audit => ("audit", AMBER),
            Mark::Staged => ("staged", PURPLE),
            Mark::Denied => ("denied", RED),
        }
    }

    /// A standalone SVG document (also embedded in the HTML page).
    fn svg(&self) -> String {
        use std::fmt::Write as _;
        let n = self.names.len();
        let label_w = self
            .names
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(4)
            * 7
            + 16;
        let top = label_w; // column labels are rotated; same room as row labels
        let legend_h = 40;
        let width = label_w + n * CELL + label_w / 2 + 20;
        let height = top + n * CELL + legend_h;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            s,
            "<title>netpol connectivity matrix, {}/{}</title>",
            xml_escape(self.proto),
            self.port
        );
        let _ = writeln!(
            s,
            r#"<text x="4" y="14" font-weight="bold">{}/{}: rows = source, columns = destination</text>"#,
            xml_escape(self.proto),
            self.port
        );
        for (i, name) in self.names.iter().enumerate() {
            let y = top + i * CELL + CELL / 2 + 4;
            let _ = writeln!(
                s,
                r#"<text class="row-label" x="{}" y="{y}" text-anchor="end">{}</text>"#,
                label_w - 6,
                xml_escape(name)
            );
            let x = label_w + i * CELL + CELL / 2 + 4;
            let _ = writeln!(
                s,
                r#"<text class="col-label" x="{x}" y="{}" transform="rotate(-60 {x} {})">{}</text>"#,
                top - 6,
                top - 6,
                xml_escape(name)
            );
        }
        for i in 0..n {
            for j in 0..n {
                let (v, color) = self.cell(i, j);
                let tip = if i == j {
                    format!("{}: the endpoint itself", self.names[i])
                } else {
                    format!(
                        "{} → {} {}/{}: {v} — {}",
                        self.names[i], self.names[j], self.proto, self.port, self.rules[i][j]
                    )
                };
                let _ = writeln!(
                    s,
                    r#"<rect class="cell" x="{}" y="{}" width="{}" height="{}" fill="{color}" stroke="white" data-from="{}" data-to="{}" data-verdict="{v}"><title>{}</title></rect>"#,
                    label_w + j * CELL,
                    top + i * CELL,
                    CELL,
                    CELL,
                    xml_escape(&self.names[i]),
                    xml_escape(&self.names[j]),
                    xml_escape(&tip)
                );
            }
        }
        let ly = top + n * CELL + 20;
        for (k, (label, color)) in [
            ("allowed", GREEN),
            ("denied", RED),
            ("audit", AMBER),
            ("staged", PURPLE),
            ("self", GREY),
        ]
        .iter()
        .enumerate()
        {
            let x = 4 + k * 90;
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{}" width="12" height="12" fill="{color}"/>"#,
                ly - 10
            );
            let _ = writeln!(s, r#"<text x="{}" y="{ly}">{label}</text>"#, x + 16);
        }
        s.push_str("</svg>\n");
        s
    }

    /// A self-contained page (no external resources), also well-formed XML.
    fn html(&self) -> String {
        let title = format!("netpol matrix {}/{}", xml_escape(self.proto), self.port);
        format!(
            "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<title>{title}</title>\n<style>body {{ font-family: sans-serif; margin: 1em; }} rect.cell:hover {{ stroke: #000000; stroke-width: 2; }}</style>\n</head>\n<body>\n<h1>{title}</h1>\n<p>Rows are sources, columns destinations. Hover a cell for the rule that decides it.</p>\n{}</body>\n</html>\n",
            self.svg()
        )
    }
}

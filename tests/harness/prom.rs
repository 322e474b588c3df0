//! A validator for the Prometheus text exposition format (0.0.4), strict enough
//! to catch what a Prometheus server would refuse, and a tiny scraper. Shared by
//! the offline operator tests and the privileged kind-node test.

use std::collections::{BTreeMap, BTreeSet};

/// One parsed sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub fn is_metric_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(x) if x.is_ascii_alphabetic() || x == '_' || x == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

pub fn is_label_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(x) if x.is_ascii_alphabetic() || x == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        && !n.starts_with("__")
}

pub fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v
            .parse::<f64>()
            .map_err(|_| format!("{v:?} is not a float")),
    }
}

/// Parse `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
pub fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut out = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((out, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = rest[..eq].trim();
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = rest[eq + 1..].char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {name}: value not quoted"));
        }
        let mut value = String::new();
        let mut end = None;
        let body = &rest[eq + 1..];
        let mut it = body.char_indices().skip(1);
        while let Some((i, c)) = it.next() {
            match c {
                '\\' => match it.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("label {name}: bad escape {other:?}")),
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                '\n' => return Err(format!("label {name}: raw newline")),
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| format!("label {name}: unterminated value"))?;
        if out.insert(name.to_string(), value).is_some() {
            return Err(format!("duplicate label {name}"));
        }
        rest = &body[end + 1..];
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err(format!("expected , or }} after label {name}"));
        }
    }
}

/// (buckets as (le, count), _sum, _count) of one histogram series.
type HistogramSeries = (Vec<(f64, f64)>, Option<f64>, Option<f64>);

/// Validate a text exposition (format 0.0.4) and return its samples by family.
pub fn parse_exposition(text: &str) -> Result<BTreeMap<String, (String, Vec<Sample>)>, String> {
    let mut families: BTreeMap<String, (String, Vec<Sample>)> = BTreeMap::new();
    let mut helps: BTreeSet<String> = BTreeSet::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series: BTreeSet<String> = BTreeSet::new();
    if !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let at = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            if !is_metric_name(name) || !helps.insert(name.to_string()) {
                return Err(at("bad or repeated HELP".into()));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split(' ');
            let (name, kind) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
            if !is_metric_name(name) || w.next().is_some() {
                return Err(at("bad TYPE line".into()));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type {kind}")));
            }
            if families.contains_key(name) {
                return Err(at("second TYPE for a family".into()));
            }
            if let Some(c) = current.replace(name.to_string()) {
                finished.insert(c);
            }
            families.insert(name.to_string(), (kind.to_string(), Vec::new()));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut w = rest.split_whitespace();
        let value = parse_value(w.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
        if let Some(ts) = w.next() {
            ts.parse::<i64>().map_err(|_| at("bad timestamp".into()))?;
        }
        if w.next().is_some() {
            return Err(at("trailing text".into()));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| families.get(*b).is_some_and(|f| f.0 == "histogram"))
            })
            .unwrap_or(name)
            .to_string();
        let Some((kind, samples)) = families.get_mut(&family) else {
            return Err(at(format!("sample of {family} before its TYPE")));
        };
        if current.as_deref() != Some(family.as_str()) || finished.contains(&family) {
            return Err(at(format!(
                "samples of {family} are not grouped under its TYPE"
            )));
        }
        if kind == "counter" && (value.is_nan() || value < 0.0) {
            return Err(at("negative or NaN counter".into()));
        }
        if kind == "histogram" && name.ends_with("_bucket") != labels.contains_key("le") {
            return Err(at("le belongs to _bucket samples only".into()));
        }
        let key = format!("{name}{labels:?}");
        if !series.insert(key) {
            return Err(at("duplicate series".into()));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // Histograms: per label set, buckets ascending by le, cumulative, ending +Inf = _count.
    for (fname, (kind, samples)) in &families {
        if kind != "histogram" {
            continue;
        }
        let mut groups: BTreeMap<String, HistogramSeries> = BTreeMap::new();
        for s in samples {
            let mut l = s.labels.clone();
            let le = l.remove("le");
            let g = groups.entry(format!("{l:?}")).or_default();
            if s.name.ends_with("_bucket") {
                g.0.push((
                    parse_value(le.as_deref().unwrap_or(""))
                        .map_err(|e| format!("{fname}: le: {e}"))?,
                    s.value,
                ));
            } else if s.name.ends_with("_sum") {
                g.1 = Some(s.value);
            } else if s.name.ends_with("_count") {
                g.2 = Some(s.value);
            }
        }
        for (l, (buckets, sum, count)) in groups {
            let (Some(_), Some(count)) = (sum, count) else {
                return Err(format!("{fname}{l}: _sum or _count missing"));
            };
            if buckets.is_empty() || buckets.last().unwrap().0 != f64::INFINITY {
                return Err(format!("{fname}{l}: buckets must end with le=\"+Inf\""));
            }
            for w in buckets.windows(2) {
                if w[0].0 >= w[1].0 || w[0].0.is_nan() {
                    return Err(format!(
                        "{fname}{l}: le not ascending: {} then {}",
                        w[0].0, w[1].0
                    ));
                }
                if w[0].1 > w[1].1 {
                    return Err(format!("{fname}{l}: buckets not cumulative"));
                }
            }
            if buckets.last().unwrap().1 != count {
                return Err(format!(
                    "{fname}{l}: +Inf bucket {} != _count {count}",
                    buckets.last().unwrap().1
                ));
            }
        }
    }
    Ok(families)
}

/// `GET /metrics` over HTTP/1.1; the body, checked against the head.
pub fn scrape(addr: std::net::SocketAddr) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or("no header end")?;
    if !head.starts_with("HTTP/1.1 200 OK")
        || !head.contains("Content-Type: text/plain; version=0.0.4")
    {
        return Err(format!("bad response head: {head}"));
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or("no Content-Length")?;
    if len != body.len() {
        return Err(format!("Content-Length {len} but {} bytes", body.len()));
    }
    Ok(body.to_string())
}

/// The value of the first sample of `name` with these labels.
pub fn value(
    f: &BTreeMap<String, (String, Vec<Sample>)>,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let fam = name.trim_end_matches("_count").trim_end_matches("_sum");
    f.get(name)
        .or_else(|| f.get(fam))?
        .1
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

//! Which DNS names an FQDN selector matches: Cilium's semantics
//! (pkg/fqdn/matchpattern `ToAnchoredRegexp`, pkg/policy/api/fqdn.go), without
//! a regex engine.
//!
//! A name is compared in Cilium's normal form: lower case, with the trailing
//! dot ([`normalize`]). `matchName` is that name exactly. In `matchPattern`,
//! `*` is any run (also empty) of name characters (`[-a-z0-9_]`) inside one
//! label; a leading `**.` is one or more whole labels; a pattern of stars
//! alone (`*`, `**.`) matches every name. Selectors come validated and
//! normalised from `api` ([`FqdnSelector`]).

use crate::api::model::FqdnSelector;

/// Cilium's normal form of a name: ASCII lower case, a trailing dot.
pub fn normalize(name: &str) -> String {
    let mut s = name.to_ascii_lowercase();
    if !s.ends_with('.') {
        s.push('.');
    }
    s
}

fn name_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

/// `([-a-z0-9_]+[.])+` or the root `.`: what the match-all pattern accepts.
fn every_name(name: &str) -> bool {
    name == "."
        || (name.ends_with('.')
            && name[..name.len() - 1]
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(name_char)))
}

/// One label against one pattern label: `*` runs match any run of name
/// characters, everything else itself. Two-pointer wildcard matching (linear
/// in practice, never exponential).
fn label_matches(pat: &[u8], label: &[u8]) -> bool {
    let (mut p, mut l) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while l < label.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, l));
            p += 1;
        } else if p < pat.len() && pat[p] == label[l] {
            p += 1;
            l += 1;
        } else if let Some((sp, sl)) = star {
            // The star takes one more character, if it may.
            if !name_char(label[sl]) {
                return false;
            }
            star = Some((sp, sl + 1));
            p = sp + 1;
            l = sl + 1;
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|b| *b == b'*')
}

fn pattern_matches(pattern: &str, name: &str) -> bool {
    let body = pattern.strip_suffix('.').unwrap_or(pattern);
    if !body.is_empty() && body.bytes().all(|b| b == b'*') {
        return every_name(name);
    }
    let (Some(pat), Some(name)) = (pattern.strip_suffix('.'), name.strip_suffix('.')) else {
        return false;
    };
    let stars = pat.bytes().take_while(|b| *b == b'*').count();
    let (subdomains, rest) = if stars >= 2 && pat.as_bytes().get(stars) == Some(&b'.') {
        (true, &pat[stars + 1..])
    } else {
        (false, pat)
    };
    let pat_labels: Vec<&str> = rest.split('.').collect();
    let name_labels: Vec<&str> = name.split('.').collect();
    let skip = if subdomains {
        // One or more whole labels of name characters before the rest.
        if name_labels.len() <= pat_labels.len() {
            return false;
        }
        let skip = name_labels.len() - pat_labels.len();
        if !name_labels[..skip]
            .iter()
            .all(|l| !l.is_empty() && l.bytes().all(name_char))
        {
            return false;
        }
        skip
    } else {
        if name_labels.len() != pat_labels.len() {
            return false;
        }
        0
    };
    pat_labels
        .iter()
        .zip(&name_labels[skip..])
        .all(|(p, l)| label_matches(p.as_bytes(), l.as_bytes()))
}

/// Whether `sel` matches `name` (any spelling: it is normalised first).
pub fn matches(sel: &FqdnSelector, name: &str) -> bool {
    let name = normalize(name);
    match sel {
        FqdnSelector::Name(n) => *n == name,
        FqdnSelector::Pattern(p) => pattern_matches(p, &name),
    }
}

/// Whether any of `selectors` matches `name`.
pub fn any_matches(selectors: &[FqdnSelector], name: &str) -> bool {
    selectors.iter().any(|s| matches(s, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(p: &str) -> FqdnSelector {
        FqdnSelector::Pattern(crate::api::validate::fqdn_pattern(p).unwrap())
    }

    fn name(n: &str) -> FqdnSelector {
        FqdnSelector::Name(crate::api::validate::fqdn_name(n).unwrap())
    }

    fn check(sel: &FqdnSelector, yes: &[&str], no: &[&str]) {
        for n in yes {
            assert!(matches(sel, n), "{sel:?} should match {n}");
        }
        for n in no {
            assert!(!matches(sel, n), "{sel:?} should not match {n}");
        }
    }

    /// The examples of Cilium's FQDNSelector docs (CRD description of matchPattern).
    #[test]
    fn cilium_documented_patterns() {
        check(
            &pat("*.cilium.io"),
            &["www.cilium.io", "blog.cilium.io.", "WWW.Cilium.IO"],
            &["cilium.io", "google.com", "a.b.cilium.io"],
        );
        check(
            &pat("*cilium.io"),
            &["cilium.io", "subcilium.io", "sub-cilium.io"],
            &["www.cilium.io", "blog.cilium.io", "google.com"],
        );
        check(
            &pat("sub*.cilium.io"),
            &["sub.cilium.io", "subdomain.cilium.io"],
            &["www.cilium.io", "blog.cilium.io", "cilium.io", "google.com"],
        );
        check(
            &pat("**.cilium.io"),
            &["www.cilium.io", "a.b.cilium.io", "x-1.y_2.cilium.io."],
            &["cilium.io", "wwwcilium.io", "cilium.io.evil.com"],
        );
    }

    #[test]
    fn match_all_and_names() {
        for p in ["*", "**", "*.", "**."] {
            check(
                &pat(p),
                &["a.", "example.com", "x.y.z", "."],
                &["bad name.com", "a..b."],
            );
        }
        check(
            &name("Example.COM"),
            &["example.com", "EXAMPLE.com."],
            &["www.example.com", "example.co", "example.com.evil"],
        );
        // A star is name characters only: never a dot, never a space.
        check(
            &pat("a*b.io"),
            &["ab.io", "a-x_9b.io"],
            &["a.b.io", "a b.io"],
        );
        check(&pat("*x*"), &["x", "axb", "xx"], &["y", "a.x"]);
    }
}

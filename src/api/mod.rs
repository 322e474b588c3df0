//! Policy and registry files as written: serde types for every accepted kind,
//! parsing with `file:line:column` errors, and validation into [`model`] types.
//!
//! Does no I/O beyond reading the files it is pointed at; never touches the
//! kernel, never compiles, never decides what is enforced.
//!
//! Layout: [`yaml`] builds a positioned document tree, [`de`] deserializes the
//! `Raw*` types of [`raw`] from it with located errors, [`policy`] and
//! [`registry`] validate and translate into [`model`], [`load`] reads files and
//! directories and runs the cross-document checks, [`cache`] keeps unchanged
//! files' parses for a caller that loads the same directories again; [`build`]
//! (feature `test-support`) constructs model values in code for tests.

#[cfg(any(test, feature = "test-support"))]
pub mod build;
pub mod cache;
pub mod de;
pub mod load;
pub mod model;
pub mod policy;
pub mod raw;
pub mod registry;
pub mod validate;
pub mod warn;
pub mod yaml;

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// One problem found in one file. Displayed as
/// `FILE:LINE:COL: document N (KIND NAMESPACE/NAME): FIELD.PATH: message`
/// with the parts that are unknown left out.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// 1-based document number within the file, when known.
    pub document: Option<usize>,
    /// `Kind namespace/name` or `Kind name`, when known.
    pub object: Option<String>,
    /// Field path, e.g. `spec.ingress[0].toPorts[0].ports[0].port`.
    pub field: Option<String>,
    pub message: String,
}

impl Problem {
    /// `FILE[:LINE[:COL]]:`
    pub(crate) fn fmt_location(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ":")
    }

    /// ` document N (OBJECT): FIELD: message`, the parts that are known.
    pub(crate) fn fmt_detail(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(doc) = self.document {
            write!(f, " document {doc}")?;
            if let Some(obj) = &self.object {
                write!(f, " ({obj})")?;
            }
            write!(f, ":")?;
        }
        if let Some(field) = &self.field {
            write!(f, " {field}:")?;
        }
        write!(f, " {}", self.message)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_location(f)?;
        self.fmt_detail(f)
    }
}

use std::path::Path;
use std::sync::Arc;

pub use load::{FileKind, Parsed};
use model::{Policy, PolicySet, RegistrySet};

pub use cache::LoadCache;
pub use load::{LoadOptions, MAX_FILE_SIZE};
pub use warn::{Warning, WarningCode};

/// A load's result with its warnings, which never refuse a set: the warnings
/// are there whether the set is valid or not.
#[derive(Debug)]
pub struct Loaded<T> {
    pub result: Result<T, Vec<Problem>>,
    pub warnings: Vec<Warning>,
}

/// Read every policy file in `dir` (the naming rules of docs/policy.md, "Files"). Returns the valid set
/// only when every file is valid; otherwise every problem found.
pub fn load_policy_dir(dir: &Path) -> Result<PolicySet, Vec<Problem>> {
    load_policy_dir_with(dir, &LoadOptions::default())
}

/// Read every registry file in `dirs`. Same all-or-nothing rule as policies.
pub fn load_endpoint_dirs(dirs: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>> {
    load_endpoint_dirs_with(dirs, &LoadOptions::default())
}

/// [`load_policy_dir`] with options: `LoadOptions { strict_modes: false }` skips
/// the file trust check (config `strict_file_modes = false`, for tests).
/// [`load_policy_dir`] is this with the default options (strict).
pub fn load_policy_dir_with(dir: &Path, opts: &LoadOptions) -> Result<PolicySet, Vec<Problem>> {
    load_dirs(&[dir.to_path_buf()], FileKind::Policy, opts, None).into_policy_set()
}

/// [`load_endpoint_dirs`] with options, as [`load_policy_dir_with`].
pub fn load_endpoint_dirs_with(
    dirs: &[PathBuf],
    opts: &LoadOptions,
) -> Result<RegistrySet, Vec<Problem>> {
    load_dirs(dirs, FileKind::Registry, opts, None).into_registry_set()
}

/// Read and parse every file of `dirs`: the one load, given a [`LoadCache`] or
/// not. With a cache, a file whose identity is unchanged since the cache read
/// it keeps its parse; the result is the same either way.
pub fn load_dirs(
    dirs: &[PathBuf],
    want: FileKind,
    opts: &LoadOptions,
    cache: Option<&mut LoadCache>,
) -> Parsed {
    match cache {
        Some(c) => c.load(dirs, want, opts),
        None => load::load_dirs_with(dirs, want, opts),
    }
}

/// Parse one policy file's text (`file` is only used in messages, and its
/// extension picks JSON or YAML).
pub fn parse_policies(file: &Path, text: &str) -> Result<Vec<Arc<Policy>>, Vec<Problem>> {
    let mut out = Parsed::default();
    load::parse_text(file, text, FileKind::Policy, &mut out);
    load::check_policies(&mut out);
    out.into_policy_set().map(|s| s.policies)
}

/// [`parse_policies`], with the file's warnings.
pub fn parse_policies_warned(file: &Path, text: &str) -> Loaded<Vec<Arc<Policy>>> {
    let mut out = Parsed::default();
    load::parse_text(file, text, FileKind::Policy, &mut out);
    load::check_policies(&mut out);
    let warnings = out.take_warnings();
    Loaded {
        result: out.into_policy_set().map(|s| s.policies),
        warnings,
    }
}

/// Parse one registry file's text.
pub fn parse_registry(file: &Path, text: &str) -> Result<RegistrySet, Vec<Problem>> {
    let mut out = Parsed::default();
    load::parse_text(file, text, FileKind::Registry, &mut out);
    load::check_registry(&mut out);
    out.into_registry_set()
}

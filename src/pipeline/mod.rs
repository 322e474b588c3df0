//! The one pipeline from inputs to a compiled state: read both input sets
//! through an [`Inputs`] source, keep the last valid set of a kind while its
//! inputs are invalid, and compile within the map budget. `netpolctl check`,
//! `trace`, `matrix` and `diff` run one pass from nothing; netpold runs a pass
//! per trigger over what it holds ([`Held`]) and applies the result.
//!
//! Owns the rules of docs/daemon.md, "Invalid files and the last valid set":
//! a kind's set in force is always one that was valid as a whole (the live
//! one, or the last valid one while the live one is invalid, or at start a
//! saved copy); a set that would not fit the maps is refused like an invalid
//! file and the last policy set that fit stays in force. Does not apply,
//! write, or log: the caller does, from the [`Pass`] it gets back.

pub mod inputs;

pub use inputs::{FileInputs, Hint, InputSet, Inputs, Kind, Read, SavedCopies, SavedReader};

use std::any::Any;
use std::time::{Duration, Instant};

use crate::api::model::{PolicySet, RegistrySet};
use crate::api::{Problem, Warning};
use crate::config::Config;
use crate::policy::compile::{CompileError, CompileOptions, CompileStats, Compiler};
use crate::policy::lint;
use crate::policy::types::Compiled;

/// Compiles the valid sets: the real [`Compiler`], or a stand-in (tests of the
/// daemon's loop put a trivial one here).
pub trait Compile: Send {
    fn compile(
        &mut self,
        policies: &PolicySet,
        registry: &RegistrySet,
        opts: &CompileOptions,
    ) -> Result<Compiled, CompileError>;

    /// [`Compile::compile`] of the registry in force, whose revision (see
    /// [`Held`]) names its content: a compiler may take an unchanged revision
    /// for an unchanged registry without looking at it.
    fn compile_revision(
        &mut self,
        policies: &PolicySet,
        registry: &RegistrySet,
        _revision: u64,
        opts: &CompileOptions,
    ) -> Result<Compiled, CompileError> {
        self.compile(policies, registry, opts)
    }

    /// What the last compile computed again and what it kept, for the log.
    fn stats(&self) -> Option<CompileStats> {
        None
    }
}

impl Compile for Compiler {
    fn compile(
        &mut self,
        policies: &PolicySet,
        registry: &RegistrySet,
        opts: &CompileOptions,
    ) -> Result<Compiled, CompileError> {
        Compiler::compile(self, policies, registry, opts)
    }

    fn compile_revision(
        &mut self,
        policies: &PolicySet,
        registry: &RegistrySet,
        revision: u64,
        opts: &CompileOptions,
    ) -> Result<Compiled, CompileError> {
        Compiler::compile_revision(self, policies, registry, revision, opts)
    }

    fn stats(&self) -> Option<CompileStats> {
        Some(Compiler::stats(self))
    }
}

impl<F> Compile for F
where
    F: FnMut(&PolicySet, &RegistrySet, &CompileOptions) -> Result<Compiled, CompileError> + Send,
{
    fn compile(
        &mut self,
        policies: &PolicySet,
        registry: &RegistrySet,
        opts: &CompileOptions,
    ) -> Result<Compiled, CompileError> {
        self(policies, registry, opts)
    }
}

/// A valid input set in force, and whether it is a saved copy (the live
/// inputs were invalid when nothing else was in force).
#[derive(Debug, Clone, PartialEq)]
pub struct InForce<T> {
    pub set: T,
    pub from_saved: bool,
}

/// What a caller holds between passes: nothing before the first.
#[derive(Default)]
pub struct Held {
    pub policies: Option<InForce<PolicySet>>,
    pub registry: Option<InForce<RegistrySet>>,
    /// Names the content of `registry`: a new number each time it is
    /// replaced, so a compiler need not look at an unchanged registry.
    registry_revision: u64,
    /// The last policy set that compiled within the limits: in force while a
    /// newer one is refused for not fitting.
    fitting: Fitting<PolicySet>,
    /// The last registry that compiled within the limits: in force while a
    /// newer one makes the policies overflow a map.
    fitting_registry: Fitting<RegistrySet>,
    /// Sets replaced by passes; the caller drops them when it likes (freeing
    /// thousands of policies is not on the way to enforcement).
    pub retired: Vec<Box<dyn Any + Send + Sync>>,
    /// The lint warnings of the sets in force (`policy::lint`) and the node
    /// name they were found for: found again only when a set or the name changes.
    lint: Option<(String, Vec<Warning>)>,
    /// Leave the lint to the caller ([`lint_warnings`] once the state is
    /// applied): netpold, so that warnings never delay enforcement.
    pub defer_lint: bool,
}

/// The last set of a kind that compiled within the limits, kept while the
/// one held now does not (or has not yet).
struct Fitting<T> {
    /// The last set that fit, when it is not the one held now.
    last: Option<T>,
    /// The set held now compiled within the limits.
    current: bool,
}

impl Held {
    /// Nothing held yet, and the lint left to the caller ([`Held::defer_lint`]).
    pub fn deferring_lint() -> Held {
        Held {
            defer_lint: true,
            ..Held::default()
        }
    }
}

impl<T> Default for Fitting<T> {
    fn default() -> Self {
        Fitting {
            last: None,
            current: false,
        }
    }
}

impl<T: Send + Sync + 'static> Fitting<T> {
    /// The set held was replaced by a newer one: kept as the last that fit
    /// when it did (and nothing older is kept), else retired.
    fn replaced(&mut self, old: Option<T>, retired: &mut Vec<Box<dyn Any + Send + Sync>>) {
        let Some(old) = old else { return };
        if self.current {
            if let Some(older) = self.last.replace(old) {
                retired.push(Box::new(older));
            }
        } else {
            retired.push(Box::new(old));
        }
        self.current = false;
    }

    /// The set held now compiled: nothing older is needed.
    fn fits(&mut self, retired: &mut Vec<Box<dyn Any + Send + Sync>>) {
        self.current = true;
        if let Some(old) = self.last.take() {
            retired.push(Box::new(old));
        }
    }

    /// The set to fall back on while the one held does not fit: the last that
    /// fit, else (nothing fit yet in this process) the saved copy.
    fn fallback(&mut self, inputs: &dyn Inputs, saved: &dyn SavedCopies) -> Option<&T>
    where
        T: InputSet,
    {
        if self.current {
            return None;
        }
        if self.last.is_none() {
            self.last = saved
                .dirs(T::KIND)
                .and_then(|dirs| T::read_saved(&*inputs.saved(), &dirs).ok());
        }
        self.last.as_ref()
    }
}

/// What one pass found.
#[derive(Debug, Default)]
pub struct Pass {
    /// Every problem of the inputs now: the policies', then the registry's
    /// (each kind in file order), then a refusal for not fitting the maps.
    pub problems: Vec<Problem>,
    /// Every warning of the inputs now (they never refuse a set): the inputs'
    /// own, then what `policy::lint` finds in the sets in force when they
    /// compiled.
    pub warnings: Vec<Warning>,
    /// The state to enforce; `None` when a kind has no valid set in force, or
    /// nothing in force fits the maps.
    pub compiled: Option<Compiled>,
    /// Policies of the set behind `compiled`.
    pub policies: usize,
    /// The policy set in force was refused for not fitting the maps (so it must
    /// not be saved as the last valid copy).
    pub refused: bool,
    /// The kinds for which a saved copy was put in force by this pass.
    pub from_saved: Vec<Kind>,
    /// The kinds whose last set that fit the maps is what `compiled` was
    /// compiled from, because the set held now does not fit.
    pub kept: Vec<Kind>,
    /// Files parsed by this pass's reads.
    pub files_parsed: usize,
    /// `compiled` was compiled from the sets in force (not a fallback): their
    /// lint warnings belong with it (in `warnings` unless [`Held::defer_lint`]).
    pub lint_due: bool,
    /// Time spent reading, and compiling.
    pub load: Duration,
    pub compile: Duration,
}

/// One kind's read as it changed what is held.
enum Step<T> {
    /// The set in force stays (unchanged, or invalid inputs over a valid set).
    Kept,
    /// A valid set replaced this one (or none).
    Replaced(Option<T>),
    /// Invalid inputs and nothing in force: the saved copy, if any, is now.
    NoneInForce,
}

/// Read one kind and fold the answer into what is in force.
fn step<T: InputSet>(
    slot: &mut Option<InForce<T>>,
    inputs: &mut dyn Inputs,
    hint: Hint<'_>,
    saved: &dyn SavedCopies,
    pass: &mut Pass,
) -> Step<T> {
    // A source is asked for what changed only while its own last valid set is
    // in force.
    let live = slot.as_ref().is_some_and(|s| !s.from_saved);
    match T::read(inputs, if live { hint } else { Hint::Whole }) {
        Read::Unchanged => Step::Kept,
        Read::Valid(set) => Step::Replaced(
            slot.replace(InForce {
                set,
                from_saved: false,
            })
            .map(|i| i.set),
        ),
        Read::Invalid(problems) => {
            pass.problems.extend(problems);
            if slot.is_some() {
                return Step::Kept;
            }
            *slot = read_saved::<T>(inputs, saved, pass).map(|set| InForce {
                set,
                from_saved: true,
            });
            Step::NoneInForce
        }
    }
}

/// The saved copy of a kind, when there is one and it is valid.
fn read_saved<T: InputSet>(
    inputs: &dyn Inputs,
    saved: &dyn SavedCopies,
    pass: &mut Pass,
) -> Option<T> {
    let dirs = saved.dirs(T::KIND)?;
    let set = T::read_saved(&*inputs.saved(), &dirs).ok()?;
    pass.from_saved.push(T::KIND);
    Some(set)
}

/// Read both input sets and compile what is then in force within
/// `opts.limits`: the pipeline of netpold's reconcile and of every `netpolctl`
/// command that reads files. `hint` says what may have changed since the last
/// pass over `held` (a first pass reads everything whatever it says); `saved`
/// are the copies to fall back on.
pub fn load_and_compile(
    inputs: &mut dyn Inputs,
    hint: Hint<'_>,
    saved: &dyn SavedCopies,
    held: &mut Held,
    compiler: &mut dyn Compile,
    opts: &CompileOptions,
) -> Pass {
    let t0 = Instant::now();
    let mut pass = Pass::default();
    let mut changed = true;
    if held.policies.is_none() && held.registry.is_none() {
        inputs.prefetch();
    }
    match step(&mut held.policies, inputs, hint, saved, &mut pass) {
        Step::Kept => changed = false,
        Step::Replaced(old) => held.fitting.replaced(old, &mut held.retired),
        Step::NoneInForce => held.fitting.current = false,
    }
    match step(&mut held.registry, inputs, hint, saved, &mut pass) {
        Step::Kept => {}
        Step::Replaced(old) => {
            changed = true;
            held.registry_revision += 1;
            held.fitting_registry.replaced(old, &mut held.retired);
        }
        Step::NoneInForce => {
            changed = true;
            held.registry_revision += 1;
            held.fitting_registry.current = false;
        }
    }
    if changed {
        held.lint = None;
    }
    pass.problems.extend(inputs.problems());
    pass.files_parsed = inputs.files_parsed();
    pass.warnings = inputs.warnings();
    pass.load = t0.elapsed();

    let (Some(pol), Some(reg)) = (&held.policies, &held.registry) else {
        return pass;
    };
    let t1 = Instant::now();
    let mut compiled = compiler.compile_revision(&pol.set, &reg.set, held.registry_revision, opts);
    pass.policies = pol.set.policies.len();
    if let Some(e) = compiled.as_ref().err().cloned() {
        // A set that would not fit the maps is invalid input, like a parse
        // error: the last set of each kind that fit stays in force. The
        // policies first (the registry as it is now when that fits), then the
        // registry (a registry change made the policies overflow: the policies
        // as they are now, with the last registry that fit), then both.
        pass.refused = true;
        let old_pol = held.fitting.fallback(inputs, saved);
        let old_reg = held.fitting_registry.fallback(inputs, saved);
        let mut tries = Vec::new();
        if let Some(p) = old_pol {
            tries.push((p, &reg.set, vec![Kind::Policies]));
        }
        if let Some(r) = old_reg {
            tries.push((&pol.set, r, vec![Kind::Registry]));
        }
        if let (Some(p), Some(r)) = (old_pol, old_reg) {
            tries.push((p, r, vec![Kind::Policies, Kind::Registry]));
        }
        for (p, r, kept) in tries {
            if let Ok(c) = compiler.compile(p, r, opts) {
                (compiled, pass.policies, pass.kept) = (Ok(c), p.policies.len(), kept);
                break;
            }
        }
        let blame_endpoint = pass.kept == [Kind::Registry];
        // A registry change to blame: the endpoint that pushed the map over
        // (its file and field), not the rule that was fine before.
        let problem = match (&e.endpoint, blame_endpoint) {
            (Some(ep), true) => ep,
            _ => &e.problem,
        };
        pass.problems.push((**problem).clone());
    } else {
        held.fitting.fits(&mut held.retired);
        held.fitting_registry.fits(&mut held.retired);
        pass.lint_due = true;
        if let (Ok(c), false) = (&compiled, held.defer_lint) {
            pass.warnings
                .extend(lint_warnings(held, c, &opts.node_name));
        }
    }
    pass.compile = t1.elapsed();
    pass.compiled = compiled.ok();
    pass
}

/// What `policy::lint` finds in the sets in force, `compiled` being the state
/// a pass just compiled from them (one whose [`Pass::lint_due`] is set): found
/// again only when a set or the node name changed since the last time.
pub fn lint_warnings(held: &mut Held, compiled: &Compiled, node_name: &str) -> Vec<Warning> {
    let (Some(pol), Some(reg)) = (&held.policies, &held.registry) else {
        return Vec::new();
    };
    if held.lint.as_ref().is_none_or(|(n, _)| n != node_name) {
        let found = lint::lint(&pol.set, &reg.set, compiled, node_name);
        held.lint = Some((node_name.to_string(), found));
    }
    held.lint
        .as_ref()
        .map(|(_, w)| w.clone())
        .unwrap_or_default()
}

/// The lint warnings of the sets in force are at hand (found since a set or
/// the node name last changed): [`lint_warnings`] costs a copy.
pub fn lint_known(held: &Held, node_name: &str) -> bool {
    held.lint.as_ref().is_some_and(|(n, _)| n == node_name)
}

/// One pass over a config's files from nothing, as every `netpolctl` command
/// that reads them makes it: the sets read (for a summary) and the pass.
pub fn load_files(config: &Config) -> (Held, Pass) {
    load_once(config, &mut FileInputs::once(config))
}

/// One pass from nothing over `inputs` (the files of `config`, or them merged
/// with a remote view), compiled with `config`'s options.
pub fn load_once(config: &Config, inputs: &mut dyn Inputs) -> (Held, Pass) {
    let mut held = Held::default();
    let pass = load_and_compile(
        inputs,
        Hint::Whole,
        &(),
        &mut held,
        &mut Compiler::new(),
        &config.compile_options(),
    );
    (held, pass)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use super::*;
    use crate::api::model::{Origin, Policy, PolicyKind};

    fn policy(name: &str) -> Policy {
        Policy {
            origin: Origin {
                file: PathBuf::from(format!("{name}.yaml")).into(),
                doc: 0,
                kind: "CiliumNetworkPolicy".into(),
                namespace: Some("default".into()),
                name: name.into(),
            },
            kind: PolicyKind::CiliumNetworkPolicy,
            rules: vec![].into(),
            staged: false,
            source: Default::default(),
        }
    }

    fn problem(file: &str) -> Problem {
        Problem {
            file: file.into(),
            line: None,
            column: None,
            document: None,
            object: None,
            field: None,
            message: "bad".into(),
        }
    }

    /// Answers from a script, and records the hints it was given.
    #[derive(Default)]
    struct Script {
        policies: Vec<Read<PolicySet>>,
        registry: Vec<Read<RegistrySet>>,
        hints: Vec<String>,
    }

    impl Inputs for Script {
        fn policies(&mut self, hint: Hint<'_>) -> Read<PolicySet> {
            self.hints.push(format!("policies {hint:?}"));
            self.policies.remove(0)
        }
        fn registry(&mut self, hint: Hint<'_>) -> Read<RegistrySet> {
            self.hints.push(format!("registry {hint:?}"));
            self.registry.remove(0)
        }
        fn saved(&self) -> Arc<dyn SavedReader> {
            Arc::new(Copies)
        }
    }

    /// A saved copy of each kind: one policy, an empty registry.
    struct Copies;

    impl SavedReader for Copies {
        fn policies(&self, _: &Path) -> Result<PolicySet, Vec<Problem>> {
            Ok(PolicySet {
                policies: vec![policy("saved").into()],
            })
        }
        fn registry(&self, _: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>> {
            Ok(RegistrySet::default())
        }
    }

    struct Saved;

    impl SavedCopies for Saved {
        fn dirs(&self, _: Kind) -> Option<Vec<PathBuf>> {
            Some(vec!["last-good".into()])
        }
    }

    fn pass(inputs: &mut Script, hint: Hint<'_>, saved: &dyn SavedCopies, held: &mut Held) -> Pass {
        load_and_compile(
            inputs,
            hint,
            saved,
            held,
            &mut Compiler::new(),
            &CompileOptions::default(),
        )
    }

    #[test]
    fn a_kind_in_force_stays_while_its_inputs_are_invalid_and_a_saved_copy_is_asked_for_whole() {
        let set = |names: &[&str]| PolicySet {
            policies: names.iter().map(|n| policy(n).into()).collect(),
        };
        let mut inputs = Script {
            policies: vec![
                Read::Invalid(vec![problem("p.yaml")]),
                Read::Valid(set(&["a"])),
                Read::Invalid(vec![problem("p.yaml")]),
                Read::Unchanged,
            ],
            registry: vec![
                Read::Invalid(vec![problem("e.yaml")]),
                Read::Valid(RegistrySet::default()),
                Read::Unchanged,
                Read::Unchanged,
            ],
            ..Script::default()
        };
        let mut held = Held::default();
        // From nothing, both invalid: every problem, policies' first, and the
        // saved copies in force.
        let p = pass(&mut inputs, Hint::Anything, &Saved, &mut held);
        assert_eq!(p.problems, vec![problem("p.yaml"), problem("e.yaml")]);
        assert_eq!(p.from_saved, vec![Kind::Policies, Kind::Registry]);
        assert!(held.policies.as_ref().is_some_and(|p| p.from_saved));
        assert_eq!(p.policies, 1);
        assert!(p.compiled.is_some());
        // Over saved copies the source is asked for the whole set again.
        let p = pass(&mut inputs, Hint::Anything, &Saved, &mut held);
        assert!(p.problems.is_empty() && p.from_saved.is_empty());
        assert_eq!(held.policies.as_ref().unwrap().set, set(&["a"]));
        assert_eq!(held.retired.len(), 2, "both saved copies replaced");
        // Invalid again: the live set stays; unchanged keeps it too.
        let p = pass(&mut inputs, Hint::Anything, &Saved, &mut held);
        assert_eq!(p.problems, vec![problem("p.yaml")]);
        assert_eq!(held.policies.as_ref().unwrap().set, set(&["a"]));
        let p = pass(&mut inputs, Hint::Anything, &Saved, &mut held);
        assert!(p.problems.is_empty());
        assert_eq!(p.policies, 1);
        assert_eq!(
            inputs.hints,
            [
                "policies Whole",
                "registry Whole",
                "policies Whole",
                "registry Whole",
                "policies Anything",
                "registry Anything",
                "policies Anything",
                "registry Anything",
            ]
        );
    }

    #[test]
    fn one_pass_without_saved_copies_compiles_nothing_from_invalid_inputs() {
        let mut inputs = Script {
            policies: vec![Read::Valid(PolicySet::default())],
            registry: vec![Read::Invalid(vec![problem("e.yaml")])],
            ..Script::default()
        };
        let mut held = Held::default();
        let p = pass(&mut inputs, Hint::Whole, &(), &mut held);
        assert_eq!(p.problems, vec![problem("e.yaml")]);
        assert!(p.compiled.is_none() && held.registry.is_none() && p.from_saved.is_empty());
    }
}

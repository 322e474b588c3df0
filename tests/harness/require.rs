//! The one privileged-requirement rule. A test that needs root, a mounted bpffs
//! or tools asks [`Needs::check`] (most say [`privileged`]): it runs; or it
//! skips with a message saying why; or, under `CI=true` (or `CI=1`), it fails,
//! because a test that cannot run must never pass there.
//!
//! The answer holds a turn: tests of one binary run side by side (their names
//! do not collide), except the ones that ask to run [`Needs::alone`] (they
//! measure timings a neighbour would distort, or share host-wide state). A
//! test that holds a turn may ask again (a timed helper inside a test): the
//! inner turn is the outer one, which must then be alone if the inner asks so.

use std::cell::Cell;
use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// What every privileged test may call: iproute2, util-linux, iputils.
const PRIVILEGED_TOOLS: [&str; 4] = ["ip", "nsenter", "unshare", "ping"];

/// Under CI a test that cannot run fails.
pub fn ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Whether `tool` (a name on `PATH`, or an absolute path) is there.
pub fn have(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// The first of these absolute paths that exists (a server binary that
/// Debian installs outside `PATH`, such as `/usr/sbin/dnsmasq`).
pub fn first_existing(paths: &[&str]) -> Option<std::path::PathBuf> {
    paths
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let mut f = l.split_whitespace().skip(1);
                f.next() == Some("/sys/fs/bpf") && f.next() == Some("bpf")
            })
        })
        .unwrap_or(false)
}

type Blocker = Box<dyn FnOnce() -> Option<String>>;

/// What a test needs to run here.
#[derive(Default)]
pub struct Needs {
    root: bool,
    bpffs: bool,
    tools: Vec<&'static str>,
    alone: bool,
    blockers: Vec<Blocker>,
}

/// While a test holds it: its turn (shared, or alone).
pub struct Turn {
    _guard: Guard,
}

enum Guard {
    Shared(RwLockReadGuard<'static, ()>),
    Alone(RwLockWriteGuard<'static, ()>),
    /// Inside a turn this thread already holds.
    Nested,
}

static TURNS: RwLock<()> = RwLock::new(());

thread_local! {
    /// While this thread (a test) holds a turn: whether it runs alone.
    static HELD: Cell<Option<bool>> = const { Cell::new(None) };
}

impl Drop for Turn {
    fn drop(&mut self) {
        if !matches!(self._guard, Guard::Nested) {
            HELD.with(|h| h.set(None));
        }
    }
}

impl Needs {
    /// Nothing yet (add tools, a blocker, a turn alone).
    pub fn nothing() -> Needs {
        Needs::default()
    }

    /// Root, and nothing else.
    pub fn root() -> Needs {
        Needs {
            root: true,
            ..Needs::default()
        }
    }

    /// Root, bpffs mounted on /sys/fs/bpf, and the tools of namespaces and probes.
    pub fn privileged() -> Needs {
        Needs {
            root: true,
            bpffs: true,
            tools: PRIVILEGED_TOOLS.to_vec(),
            ..Needs::default()
        }
    }

    /// These tools too.
    pub fn tools(mut self, tools: &[&'static str]) -> Needs {
        self.tools.extend_from_slice(tools);
        self
    }

    /// Run with no other test of this binary that took a turn.
    pub fn alone(mut self) -> Needs {
        self.alone = true;
        self
    }

    /// Not if `blocker` (asked once the turn is held) names a reason.
    pub fn unless(mut self, blocker: impl FnOnce() -> Option<String> + 'static) -> Needs {
        self.blockers.push(Box::new(blocker));
        self
    }

    /// The turn if `test` can run here; `None` after a skip message; a panic under CI.
    pub fn check(self, test: &str) -> Option<Turn> {
        let guard = match HELD.with(Cell::get) {
            Some(alone) => {
                assert!(
                    alone || !self.alone,
                    "{test}: asks to run alone inside a shared turn: ask for it first"
                );
                Guard::Nested
            }
            None if self.alone => {
                let g = TURNS.write().unwrap_or_else(|e| e.into_inner());
                HELD.with(|h| h.set(Some(true)));
                Guard::Alone(g)
            }
            None => {
                let g = TURNS.read().unwrap_or_else(|e| e.into_inner());
                HELD.with(|h| h.set(Some(false)));
                Guard::Shared(g)
            }
        };
        match self.missing() {
            None => Some(Turn { _guard: guard }),
            Some(why) => {
                cannot_run(test, &why);
                None
            }
        }
    }

    fn missing(self) -> Option<String> {
        if self.root && !nix::unistd::geteuid().is_root() {
            return Some("not running as root".into());
        }
        if self.bpffs && !bpffs_mounted() {
            return Some("no bpffs mounted on /sys/fs/bpf".into());
        }
        let missing: Vec<&str> = self.tools.iter().copied().filter(|t| !have(t)).collect();
        if !missing.is_empty() {
            return Some(format!("missing {}", missing.join(", ")));
        }
        self.blockers.into_iter().find_map(|b| b())
    }
}

/// The turn if a privileged test can run here (root, bpffs, the namespace tools).
pub fn privileged(test: &str) -> Option<Turn> {
    Needs::privileged().check(test)
}

/// A test that cannot run here: skip with the reason, or fail under CI.
pub fn cannot_run(test: &str, why: &str) {
    if ci() {
        panic!("{test}: cannot run under CI: {why}");
    }
    eprintln!("skipping {test}: {why}");
}

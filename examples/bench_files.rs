//! The control plane's own costs on a config's files, for bench/run: parse
//! time, a full compile (as netpold makes it at start: this host's entries
//! only), a compile after a policy change (the last policy's rules new, what
//! the compiler kept from the first compile used), and
//! the live heap after each step (a counting allocator), so the page can give
//! bytes per endpoint and per rule. Prints one JSON object.
//! `cargo run --release --example bench_files -- CONFIG [REPEAT]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use netpol::config::Config;
use netpol::policy::compile::{CompileOptions, Compiler};

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter is only arithmetic on the sizes it is given.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `l`, passed on unchanged.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from this allocator (the system's) with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: as `dealloc` for `p` and `l`; `new` is the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().expect("usage: bench_files CONFIG [REPEAT]"));
    let repeat: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let config = Config::load(&path).expect("config");
    let lopts = config.load_options();
    let base = live();

    let t = Instant::now();
    let registry = netpol::api::load_endpoint_dirs_with(&config.endpoint_dirs, &lopts)
        .unwrap_or_else(|p| panic!("{} problems, the first: {}", p.len(), p[0]));
    let parse_registry = t.elapsed().as_secs_f64();
    let bytes_registry = live() - base;
    let t = Instant::now();
    let policies = netpol::api::load_policy_dir_with(&config.policy_dir, &lopts)
        .unwrap_or_else(|p| panic!("{} problems, the first: {}", p.len(), p[0]));
    let parse_policies = t.elapsed().as_secs_f64();
    let bytes_policies = live() - base - bytes_registry;

    let opts = CompileOptions {
        local_entries_only: true,
        ..config.compile_options()
    };
    let mut full = f64::MAX;
    let mut warm = f64::MAX;
    let mut bytes_compiled = 0;
    let mut entries = 0;
    let mut endpoints = 0;
    for _ in 0..repeat.max(1) {
        let before = live();
        let mut compiler = Compiler::new();
        let t = Instant::now();
        let c = compiler
            .compile(&policies, &registry, &opts)
            .expect("fits the maps");
        full = full.min(t.elapsed().as_secs_f64());
        bytes_compiled = live().saturating_sub(before);
        (entries, endpoints) = (c.entries.len(), c.endpoints.len());
        drop(c);
        // A policy change as the loader gives it: one policy's rules parsed
        // again (new shared rules), every other policy as it was.
        let mut changed = policies.clone();
        if let Some(p) = changed.policies.last_mut() {
            let p = std::sync::Arc::make_mut(p);
            p.rules = p.rules.iter().cloned().collect();
        }
        let t = Instant::now();
        let c = compiler
            .compile(&changed, &registry, &opts)
            .expect("fits the maps");
        warm = warm.min(t.elapsed().as_secs_f64());
        drop(c);
    }
    let rules: usize = policies.policies.iter().map(|p| p.rules.len()).sum();
    let n_eps = registry.endpoints.len();
    println!(
        "{{\"endpoints\": {n_eps}, \"policies\": {}, \"rules\": {rules}, \"entries\": {entries}, \
         \"compiled_endpoints\": {endpoints}, \"parse_registry_s\": {parse_registry}, \
         \"parse_policies_s\": {parse_policies}, \"compile_full_s\": {full}, \
         \"compile_policy_change_s\": {warm}, \"bytes_registry\": {bytes_registry}, \
         \"bytes_policies\": {bytes_policies}, \"bytes_compiled\": {bytes_compiled}, \
         \"bytes_per_endpoint\": {}, \"bytes_per_rule\": {}}}",
        policies.policies.len(),
        bytes_registry / n_eps.max(1),
        bytes_policies / rules.max(1),
    );
}

//! Where netpold's heap goes for one config's files, without root: bytes and
//! allocations live after each step of a first pass (the files read into what
//! the daemon holds, the compile, one datapath shadow of the maps), then what
//! each part holds, found by dropping the parts one by one. A counting
//! allocator wraps the system one, so the figures are the heap the program
//! asked for (RSS adds the allocator's own overhead and freed pages it keeps).
//!
//! `cargo run --release --example profile_memory -- CONFIG`

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicIsize, Ordering};

use netpol::config::Config;
use netpol::datapath::generation::Contents;
use netpol::datapath::layout::KernelSlots;
use netpol::datapath::Attachment;
use netpol::pipeline::{self, FileInputs, Held, Hint};
use netpol::policy::compile::Compiler;

struct Counting;
static BYTES: AtomicIsize = AtomicIsize::new(0);
static ALLOCS: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        BYTES.fetch_add(l.size() as isize, Ordering::Relaxed);
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        BYTES.fetch_sub(l.size() as isize, Ordering::Relaxed);
        ALLOCS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: `p` came from this allocator with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        BYTES.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from this allocator with layout `l`.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> (isize, isize) {
    (
        BYTES.load(Ordering::Relaxed),
        ALLOCS.load(Ordering::Relaxed),
    )
}

/// Prints what changed since `from` under `what`, and returns the figures now.
fn step(what: &str, from: (isize, isize), per: &[(&str, usize)]) -> (isize, isize) {
    let now = live();
    let (b, n) = ((now.0 - from.0).abs(), (now.1 - from.1).abs());
    let mut line = format!(
        "{what:34} {:9.2} MiB {:>9} allocs",
        b as f64 / (1 << 20) as f64,
        n
    );
    for (name, count) in per {
        if *count > 0 {
            line += &format!(
                "  {:7.0} B/{name} ({:.1} allocs)",
                b as f64 / *count as f64,
                n as f64 / *count as f64
            );
        }
    }
    println!("{line}");
    now
}

fn main() {
    let config = PathBuf::from(std::env::args().nth(1).expect("CONFIG"));
    let config = Config::load(&config).expect("config");
    // As the daemon compiles: entries for its own endpoints only.
    let copts = netpol::policy::compile::CompileOptions {
        local_entries_only: true,
        ..config.compile_options()
    };
    let start = live();
    let mut inputs = FileInputs::new(&config);
    let mut held = Held::deferring_lint();
    let mut compiler = Compiler::new();
    let pass = pipeline::load_and_compile(
        &mut inputs,
        Hint::Whole,
        &(),
        &mut held,
        &mut compiler,
        &copts,
    );
    let compiled = pass.compiled.expect("the first pass compiles");
    held.retired.clear();
    let policies = held.policies.as_ref().map_or(0, |p| p.set.policies.len());
    let rules: usize = held.policies.as_ref().map_or(0, |p| {
        p.set.policies.iter().map(|p| p.rules.len()).sum::<usize>()
    });
    let endpoints = held.registry.as_ref().map_or(0, |r| r.set.endpoints.len());
    let per = [("policy", policies), ("endpoint", endpoints)];
    println!(
        "{policies} policies ({rules} rules), {endpoints} endpoints; {} entries, {} ipcache",
        compiled.entries.len(),
        compiled.ipcache.len()
    );
    let after_pass = step("first pass, all held", start, &per);
    // The lint netpold runs a quiet second after an apply: its warnings are
    // kept (so they count); its scratch is freed.
    let before_lint = live();
    let warnings = pipeline::lint_warnings(&mut held, &compiled, &copts.node_name);
    let after_lint = step(
        &format!("the lint, {} warnings kept", warnings.len()),
        before_lint,
        &per,
    );
    drop(warnings);
    let after_pass = (
        after_pass.0 + (after_lint.0 - before_lint.0),
        after_pass.1 + (after_lint.1 - before_lint.1),
    );
    let att: Vec<Attachment> = compiled
        .endpoints
        .iter()
        .filter(|e| e.local && e.interface.is_some())
        .map(|e| Attachment {
            slot: e.slot,
            ifindex: 1000 + e.slot,
        })
        .collect();
    let slots = KernelSlots::assign(&KernelSlots::default(), &att);
    let shadow = Contents::build(&compiled, &att, &slots).expect("contents");
    let t = step("one datapath shadow (of two)", after_pass, &per);
    drop(shadow);
    let t = step("", t, &[]);
    drop(compiled);
    let t = step("  the compiled state", t, &per);
    drop(compiler);
    let t = step("  the compiler's kept parts", t, &per);
    let pol = held.policies.take();
    drop(pol);
    let t = step("  the policy set held", t, &[("policy", policies)]);
    let reg = held.registry.take();
    drop(reg);
    let t = step("  the registry held", t, &[("endpoint", endpoints)]);
    drop(held);
    let t = step("  the rest of what is held", t, &[]);
    drop(inputs);
    step("  the file inputs (load cache)", t, &per);
}

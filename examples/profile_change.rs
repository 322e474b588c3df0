//! Where one change's time goes in netpold's reconcile, without root: the
//! daemon's pipeline pass (load through the file cache, compile with a kept
//! compiler), the compare with what is installed, and the datapath's user
//! space share (the generation's contents built, diffed against the last).
//! Each of `CHANGES` changes renames one of two versions of a file into place
//! (`A` and `B` in turn), as bench/run's probes do. Prints one line per phase
//! with its median and maximum. Run it under `perf record` for a profile.
//!
//! `cargo run --release --example profile_change -- CONFIG TARGET A B [CHANGES]`

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use netpol::config::Config;
use netpol::datapath::generation::{diff, Contents};
use netpol::datapath::layout::KernelSlots;
use netpol::datapath::Attachment;
use netpol::pipeline::{self, FileInputs, Held, Hint};
use netpol::policy::compile::Compiler;
use netpol::policy::types::Compiled;

fn attachments(c: &Compiled) -> Vec<Attachment> {
    c.endpoints
        .iter()
        .filter(|e| e.local && e.interface.is_some())
        .map(|e| Attachment {
            slot: e.slot,
            ifindex: 1000 + e.slot,
        })
        .collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let config = PathBuf::from(args.next().expect("CONFIG"));
    let target = PathBuf::from(args.next().expect("TARGET"));
    let a = PathBuf::from(args.next().expect("A"));
    let b = PathBuf::from(args.next().expect("B"));
    let changes: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20);
    let config = Config::load(&config).expect("config");
    // As the daemon compiles: entries for its own endpoints only.
    let copts = netpol::policy::compile::CompileOptions {
        local_entries_only: true,
        ..config.compile_options()
    };
    let mut inputs = FileInputs::new(&config);
    let mut held = Held::deferring_lint();
    let mut compiler = Compiler::new();
    let t = Instant::now();
    let pass = pipeline::load_and_compile(
        &mut inputs,
        Hint::Whole,
        &(),
        &mut held,
        &mut compiler,
        &copts,
    );
    let mut installed = pass.compiled.expect("first pass compiles");
    let att = attachments(&installed);
    let mut slots = KernelSlots::assign(&KernelSlots::default(), &att);
    let mut shadow = Contents::build(&installed, &att, &slots).expect("contents");
    eprintln!(
        "first pass {:?} (load {:?} compile {:?}), {} endpoints, {} entries, {} ipcache",
        t.elapsed(),
        pass.load,
        pass.compile,
        installed.endpoints.len(),
        installed.entries.len(),
        installed.ipcache.len()
    );
    let names = [
        "load", "compile", "compare", "attach", "build", "diff", "drop", "total",
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    for k in 0..changes {
        let from = if k % 2 == 0 { &a } else { &b };
        let staged = target.with_extension("staged");
        std::fs::copy(from, &staged).expect("copy");
        std::fs::rename(&staged, &target).expect("rename");
        let touched: BTreeSet<PathBuf> = [target.clone()].into();
        let t0 = Instant::now();
        let pass = pipeline::load_and_compile(
            &mut inputs,
            Hint::Files(&touched),
            &(),
            &mut held,
            &mut compiler,
            &copts,
        );
        let compiled = pass.compiled.expect("compiles");
        let t1 = Instant::now();
        let same = compiled == installed;
        let t2 = Instant::now();
        let att = attachments(&compiled);
        let last_slots = slots.clone();
        slots = KernelSlots::assign(&slots, &att);
        let t3 = Instant::now();
        // As the kernel datapath builds it: over the last state's ipcache.
        let want = Contents::build_from(
            &shadow,
            &installed.ipcache,
            &last_slots,
            &compiled,
            &att,
            &slots,
        )
        .expect("contents");
        let t4 = Instant::now();
        let (d1, u1) = diff(&shadow.ipcache, &want.ipcache);
        let (d2, u2) = diff(&shadow.policy, &want.policy);
        let (d3, u3) = diff(&shadow.endpoints, &want.endpoints);
        let t5 = Instant::now();
        let writes = d1.len() + u1.len() + d2.len() + u2.len() + d3.len() + u3.len();
        shadow = want;
        installed = compiled;
        held.retired.clear();
        let t6 = Instant::now();
        for (i, d) in [
            pass.load,
            pass.compile,
            t2 - t1,
            t3 - t2,
            t4 - t3,
            t5 - t4,
            t6 - t5,
            t6 - t0,
        ]
        .into_iter()
        .enumerate()
        {
            times[i].push(d);
        }
        if k < 2 {
            eprintln!(
                "change {k}: same {same}, writes {writes}, stats {:?}",
                compiler.stats()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (n, mut v) in names.iter().zip(times) {
        v.sort();
        println!(
            "{n:8} p50 {:8.2} ms  max {:8.2} ms",
            v[v.len() / 2].as_secs_f64() * 1e3,
            v[v.len() - 1].as_secs_f64() * 1e3
        );
    }
}

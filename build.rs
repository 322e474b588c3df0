//! Builds the eBPF datapath (bpf/netpol.bpf.c) with the system clang and
//! generates its libbpf-cargo skeleton into OUT_DIR. No network access: the
//! libbpf headers (bpf_helpers.h, bpf_endian.h) come from the libbpf-sys crate
//! we link against (`DEP_BPF_INCLUDE`), falling back to /usr/include (Debian's
//! libbpf-dev).

use std::env;
use std::path::{Path, PathBuf};

use libbpf_cargo::SkeletonBuilder;

fn rerun_for_dir(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rerun_for_dir(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let bpf_dir = manifest.join("bpf");
    rerun_for_dir(&bpf_dir);
    println!("cargo:rerun-if-env-changed=DEP_BPF_INCLUDE");
    println!("cargo:rerun-if-env-changed=NETPOL_CLANG");

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let mut args: Vec<String> = vec![
        "-O2".into(),
        "-g".into(),
        "-Wall".into(),
        "-Werror".into(),
        format!("-I{}", bpf_dir.display()),
    ];
    if let Ok(inc) = env::var("DEP_BPF_INCLUDE") {
        args.push(format!("-I{inc}"));
    }
    // Debian's multiarch asm/ headers (asm/types.h) live here.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    if Path::new(&multiarch).is_dir() {
        args.push(format!("-I{multiarch}"));
    }

    let mut builder = SkeletonBuilder::new();
    builder
        .source(bpf_dir.join("netpol.bpf.c"))
        .clang_args(args);
    if let Ok(clang) = env::var("NETPOL_CLANG") {
        builder.clang(clang);
    }
    if let Err(e) = builder.build_and_generate(out.join("netpol.skel.rs")) {
        panic!("building bpf/netpol.bpf.c failed: {e:#}");
    }
}

//! The libbpf-cargo skeleton of bpf/netpol.bpf.c and the map layouts it
//! generates from bpf/lib/netpol_maps.h. This is the only place the layouts
//! enter Rust; the size assertions below fail the build if the C header and
//! the expectations of the Rust code ever drift apart.

#![allow(
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    unused_qualifications,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    unused_imports
)]
#![allow(missing_docs)]

include!(concat!(env!("OUT_DIR"), "/netpol.skel.rs"));

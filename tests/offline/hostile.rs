//! Hostile files: a committed corpus (`tests/fixtures/hostile/`) with the exact
//! outcome of each input, generated inputs too large to commit (deep nesting,
//! huge files, long lines, a million ports, 10,000 files), file trust (modes,
//! owners, symlinks), special files, and property tests that feed arbitrary
//! text to the parsers and generated policies to compile and trace.
//!
//! Every case runs on its own thread with the default 2 MiB stack (so a
//! recursion that would overflow the daemon's stack overflows here too), must
//! finish within [`LIMIT`], and must not panic. The compile budget case
//! (`compile_blowup_is_refused_by_the_map_budget`) is not timed: it asserts the
//! refusal, and only has to finish.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use netpol::api::{self, LoadOptions, Problem};

use crate::harness::require::Turn;
use crate::harness::Needs;

/// CPU-time bound for one hostile input of up to 1 MiB (debug build); larger
/// inputs get [`PER_MIB`] more per MiB. CPU time, not wall time, so that other
/// work on a shared machine does not make a case look slow; the wall clock only
/// catches a hang (ten times the bound). The YAML scanner
/// (yaml-rust2) handles roughly a million events in 2.5 s here, so a 4 MiB file
/// of one-character list items is the slowest input the size limit lets in.
const LIMIT: Duration = Duration::from_secs(2);
const PER_MIB: Duration = Duration::from_secs(3);

/// The turn of a test that times its cases: alone in the binary, so a case's
/// time is its own, not its neighbours' (the tests of one binary run on
/// parallel threads).
fn timed(test: &str) -> Turn {
    Needs::nothing()
        .alone()
        .check(test)
        .expect("no requirement")
}

fn limit_for(bytes: usize) -> Duration {
    LIMIT + PER_MIB * (bytes >> 20) as u32
}

/// Run `f` on a fresh thread (2 MiB stack); fail if it panics, or uses more CPU
/// time than the limit for `bytes` of input (and do not wait forever for one
/// that hangs).
fn bounded<T: Send + 'static>(
    what: &str,
    bytes: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    bounded_by(what, limit_for(bytes), f)
}

fn bounded_by<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let _turn = timed(what);
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(what.to_string())
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            // The process's CPU time: the test runs alone in its binary, and
            // the clock also counts any threads the loader fans out to.
            let start = process_cpu_time();
            let out = f();
            let _ = tx.send(());
            (out, process_cpu_time() - start)
        })
        .unwrap();
    match rx.recv_timeout(limit * 10) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still running after {:?} (a hang)", limit * 10)
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {} // panicked: join reports it
    }
    let (out, took) = handle.join().unwrap_or_else(|_| panic!("{what}: panicked"));
    assert!(
        took < limit,
        "{what}: took {took:?} of CPU time, more than {limit:?}"
    );
    eprintln!("bounded: {what}: {took:?} of CPU time");
    out
}

fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant
    // the kernel always knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn fixtures() -> PathBuf {
    crate::harness::cmd::fixtures("hostile")
}

fn lines(dir: &Path, problems: &[Problem]) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    problems
        .iter()
        .map(|p| p.to_string().replace(&prefix, ""))
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Policy,
    Registry,
}

/// Load `dir` as a policy or registry directory; the outcome as lines, with
/// `dir/` removed from paths: `ok: ...` or the problems.
fn outcome(dir: &Path, kind: Kind, opts: LoadOptions) -> Vec<String> {
    match kind {
        Kind::Policy => match api::load_policy_dir_with(dir, &opts) {
            Ok(set) => vec![format!("ok: {} policies", set.policies.len())],
            Err(p) => lines(dir, &p),
        },
        Kind::Registry => match api::load_endpoint_dirs_with(&[dir.to_path_buf()], &opts) {
            Ok(set) => vec![format!(
                "ok: {} endpoints, {} nodes, {} namespaces",
                set.endpoints.len(),
                set.nodes.len(),
                set.namespaces.len()
            )],
            Err(p) => lines(dir, &p),
        },
    }
}

/// [`outcome`] without the file-mode checks.
fn lenient(dir: &Path, kind: Kind) -> Vec<String> {
    outcome(
        dir,
        kind,
        LoadOptions {
            strict_modes: false,
        },
    )
}

/// A directory holding just `name` with `bytes`, loaded strictly, bounded.
fn load_one(kind: Kind, name: &str, bytes: Vec<u8>) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let len = bytes.len();
    fs::write(tmp.path().join(name), bytes).unwrap();
    let dir = tmp.path().to_path_buf();
    bounded(name, len, move || {
        outcome(&dir, kind, LoadOptions::default())
    })
}

/// A message about a huge input is clipped: a few KiB at most.
fn assert_clipped(m: &str) {
    assert!(
        m.len() < 2500,
        "message not clipped: {} bytes: {} ... {}",
        m.len(),
        &m[..300],
        &m[m.len() - 300..]
    );
}

// ---------------------------------------------------------------- committed corpus

/// Every file of `hostile/<sub>/` gives exactly the lines of its `.expected`
/// file when it is alone in a policy (registry) directory. `NETPOL_BLESS=1`
/// rewrites the expected files (review the diff).
fn check_corpus(sub: &str, kind: Kind) {
    let dir = fixtures().join(sub);
    let bless = std::env::var_os("NETPOL_BLESS").is_some();
    let mut failures = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    let mut n = 0;
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let expected_path = PathBuf::from(format!("{}.expected", path.display()));
        if name.ends_with(".expected") {
            let input = dir.join(name.trim_end_matches(".expected"));
            assert!(input.exists(), "{name} has no input file");
            continue;
        }
        n += 1;
        let got = load_one(kind, &name, fs::read(&path).unwrap());
        let got_text = got.join("\n") + "\n";
        if bless {
            fs::write(&expected_path, &got_text).unwrap();
            continue;
        }
        let want = fs::read_to_string(&expected_path).unwrap_or_else(|_| {
            panic!(
                "{} is missing (run with NETPOL_BLESS=1 and review it)",
                expected_path.display()
            )
        });
        if want != got_text {
            failures.push(format!(
                "{sub}/{name}:\n--- expected\n{want}--- got\n{got_text}"
            ));
        }
    }
    assert!(n > 10, "only {n} fixtures in {sub}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn policy_corpus_gives_expected_outcomes() {
    let _turn = timed("policy_corpus_gives_expected_outcomes");
    check_corpus("policy", Kind::Policy);
}

#[test]
fn registry_corpus_gives_expected_outcomes() {
    let _turn = timed("registry_corpus_gives_expected_outcomes");
    check_corpus("registry", Kind::Registry);
}

// ---------------------------------------------------------------- generated inputs

// `egress: [{}]`: Cilium refuses a rule with no direction at all.
const CNP: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: NAME\nspec:\n  endpointSelector: {}\n  egress: [{}]\n";

fn cnp(name: &str) -> String {
    CNP.replace("NAME", name)
}

#[test]
fn nesting_100000_flow_brackets() {
    let _turn = timed("nesting_100000_flow_brackets");
    let got = load_one(Kind::Policy, "deep.yaml", "[".repeat(100_000).into_bytes());
    assert_eq!(
        got,
        ["deep.yaml:1:256: YAML syntax error: recursion limit exceeded"]
    );
    let got = load_one(Kind::Policy, "deep.json", "[".repeat(100_000).into_bytes());
    assert_eq!(
        got,
        ["deep.json:1:128: JSON syntax error: recursion limit exceeded"]
    );
    let got = load_one(
        Kind::Policy,
        "deepmap.yaml",
        "{a: ".repeat(100_000).into_bytes(),
    );
    assert_eq!(
        got,
        ["deepmap.yaml:1:1021: YAML syntax error: recursion limit exceeded"]
    );
}

#[test]
fn nesting_100000_block_levels() {
    let _turn = timed("nesting_100000_block_levels");
    // Block nesting has no limit in the YAML scanner; ours stops at 64 levels.
    let want = "document 1: lists and mappings nest deeper than 64 levels; a policy or registry file needs far fewer";
    let got = load_one(
        Kind::Policy,
        "dashes.yaml",
        format!("{}x\n", "- ".repeat(100_000)).into_bytes(),
    );
    assert_eq!(got, [format!("dashes.yaml:1:129: {want}")]);
    // Indented block mappings: 2,800 levels fit in 4 MiB.
    let mut text = String::new();
    for i in 0..2_800 {
        text.push_str(&" ".repeat(i));
        text.push_str("a:\n");
    }
    let got = load_one(Kind::Policy, "indent.yaml", text.into_bytes());
    assert_eq!(got, [format!("indent.yaml:65:66: {want}")]);
    // Through the API too (fuzzers and `netpolctl` use it), registry side.
    let got = bounded("parse_registry deep", 200_000, || {
        api::parse_registry(Path::new("r.yaml"), &"- ".repeat(100_000))
            .unwrap_err()
            .len()
    });
    assert_eq!(got, 1);
}

#[test]
fn file_over_the_size_limit_is_refused_before_parsing() {
    let _turn = timed("file_over_the_size_limit_is_refused_before_parsing");
    let limit = api::MAX_FILE_SIZE as usize;
    let mut text = cnp("big");
    text.push_str(&"#".repeat(limit + 1 - text.len()));
    let got = load_one(Kind::Policy, "big.yaml", text.into_bytes());
    assert_eq!(
        got,
        ["big.yaml: file is 4194305 bytes; the limit is 4194304 bytes (4 MiB)"]
    );
    // The API refuses it as well.
    let text = format!("{}\n{}", cnp("big"), "#".repeat(limit));
    let e = api::parse_policies(Path::new("big.yaml"), &text).unwrap_err();
    assert_eq!(
        e[0].to_string(),
        format!(
            "big.yaml: file is {} bytes; the limit is 4194304 bytes (4 MiB)",
            text.len()
        )
    );
}

#[test]
fn file_at_the_size_limit_loads_in_bounded_time() {
    let _turn = timed("file_at_the_size_limit_loads_in_bounded_time");
    // Exactly 4 MiB: one policy and a comment line of 4 MiB.
    let limit = api::MAX_FILE_SIZE as usize;
    let mut text = cnp("big");
    text.push_str("# ");
    text.push_str(&"x".repeat(limit - text.len() - 1));
    text.push('\n');
    assert_eq!(text.len(), limit);
    assert_eq!(
        load_one(Kind::Policy, "big.yaml", text.into_bytes()),
        ["ok: 1 policies"]
    );
}

#[test]
fn a_million_ports_in_a_list() {
    let _turn = timed("a_million_ports_in_a_list");
    // 10^6 entries in one list: 2 MB, under the size limit; the first is refused.
    let text = format!(
        "{}  ingress:\n    - toPorts:\n        - ports: [{}1]\n",
        cnp("ports"),
        "1,".repeat(999_999)
    );
    let got = load_one(Kind::Policy, "million.yaml", text.into_bytes());
    assert_eq!(
        got,
        ["million.yaml:10:19: document 1 (CiliumNetworkPolicy default/ports): spec.ingress[0].toPorts[0].ports[0]: expected a mapping, found the number 1"]
    );
    // 10^6 well-formed entries through the API (12 MB: only the size limit stops it).
    let text = format!(
        "{}  ingress:\n    - toPorts:\n        - ports: [{}]\n",
        cnp("ports"),
        "{port: \"1\"},".repeat(1_000_000)
    );
    let got = bounded("parse_policies 12 MB", 0, move || {
        api::parse_policies(Path::new("m.yaml"), &text).unwrap_err()
    });
    assert_eq!(
        got[0].to_string(),
        "m.yaml: file is 12000165 bytes; the limit is 4194304 bytes (4 MiB)"
    );
    // As many well-formed port entries as fit in 4 MiB.
    let n = 4_000_000 / 12;
    let text = format!(
        "{}  ingress:\n    - toPorts:\n        - ports: [{}]\n",
        cnp("ports"),
        "{port: \"1\"},".repeat(n)
    );
    let got = load_one(Kind::Policy, "many.yaml", text.into_bytes());
    assert_eq!(
        got,
        [format!("many.yaml:10:18: document 1 (CiliumNetworkPolicy default/ports): spec.ingress[0].toPorts[0].ports: too many ports ({n}); at most 40 are allowed in one toPorts entry")]
    );
}

#[test]
fn extremely_long_lines_and_strings_give_bounded_messages() {
    let _turn = timed("extremely_long_lines_and_strings_give_bounded_messages");
    let long = "x".repeat(3_000_000);
    let text = cnp("long")
        + &format!("  ingress:\n    - fromEndpoints: [{{matchLabels: {{a: {long}}}}}]\n");
    let got = load_one(Kind::Policy, "value.yaml", text.into_bytes());
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with("value.yaml:9:41: document 1 (CiliumNetworkPolicy default/long): spec.ingress[0].fromEndpoints[0].matchLabels.a: \"xxxx"), "{}", &got[0][..200]);
    assert!(
        got[0].len() < 1200,
        "message not clipped: {} bytes",
        got[0].len()
    );
    assert!(
        got[0].contains("... (2999"),
        "{}",
        &got[0][got[0].len() - 100..]
    );
    // A 3 MB key: the field path is clipped too.
    let text = cnp("long")
        + &format!("  ingress:\n    - fromEndpoints: [{{matchLabels: {{{long}: b}}}}]\n");
    let got = load_one(Kind::Policy, "key.yaml", text.into_bytes());
    assert_eq!(got.len(), 1);
    assert_clipped(&got[0]);
    // A 3 MB name, a 3 MB comment (valid), a 3 MB quoted scalar spanning lines.
    let got = load_one(Kind::Policy, "name.yaml", cnp(&long).into_bytes());
    assert!(
        got[0].starts_with("name.yaml:4:9: document 1 (CiliumNetworkPolicy default/xxx"),
        "{}",
        &got[0][..100]
    );
    assert_clipped(&got[0]);
    let got = load_one(
        Kind::Policy,
        "comment.yaml",
        format!("{}# {long}\n", cnp("c")).into_bytes(),
    );
    assert_eq!(got, ["ok: 1 policies"]);
    let folded = format!(
        "{}  ingress:\n    - fromEndpoints: [{{matchLabels: {{a: \"{}\"}}}}]\n",
        cnp("f"),
        "x\n      ".repeat(300_000)
    );
    let got = load_one(Kind::Policy, "folded.yaml", folded.into_bytes());
    assert_eq!(got.len(), 1);
    assert!(got[0].len() < 1200);
}

#[test]
fn many_documents_and_many_keys() {
    let _turn = timed("many_documents_and_many_keys");
    // 100,000 empty documents, then one policy: counted, not stored.
    let text = "---\n".repeat(100_000) + &cnp("last");
    assert_eq!(
        load_one(Kind::Policy, "docs.yaml", text.into_bytes()),
        ["ok: 1 policies"]
    );
    // 100,000 policies in one file, all named alike: 99,999 problems, bounded.
    let text = (cnp("same") + "---\n").repeat(30_000);
    let got = load_one(Kind::Policy, "same.yaml", text.into_bytes());
    assert_eq!(got.len(), 29_999);
    // A mapping with 200,000 distinct keys (duplicate detection is a hash map): accepted.
    let mut text = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: k\n  labels:\n",
    );
    for i in 0..200_000 {
        text.push_str(&format!("    k{i}: v\n"));
    }
    text.push_str("spec:\n  endpointSelector: {}\n  egress: [{}]\n");
    let got = load_one(Kind::Policy, "keys.yaml", text.into_bytes());
    assert_eq!(got, ["ok: 1 policies"]);
}

/// 10,000 files: about 0.2 ms each here (open, fstat, read, parse, validate).
const FILES_LIMIT: Duration = Duration::from_secs(5);

#[test]
fn ten_thousand_files_load_in_bounded_time() {
    let _turn = timed("ten_thousand_files_load_in_bounded_time");
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..10_000 {
        fs::write(
            tmp.path().join(format!("p{i:05}.yaml")),
            cnp(&format!("p{i}")),
        )
        .unwrap();
    }
    let dir = tmp.path().to_path_buf();
    let got = bounded_by("10,000 valid files", FILES_LIMIT, move || {
        outcome(&dir, Kind::Policy, LoadOptions::default())
    });
    assert_eq!(got, ["ok: 10000 policies"]);
    // Every one broken: 10,000 problems, still bounded (the sort was quadratic).
    for i in 0..10_000 {
        fs::write(tmp.path().join(format!("p{i:05}.yaml")), "kind: [\n").unwrap();
    }
    let dir = tmp.path().to_path_buf();
    let got = bounded_by("10,000 broken files", FILES_LIMIT, move || {
        outcome(&dir, Kind::Policy, LoadOptions::default())
    });
    assert_eq!(got.len(), 10_000);
    assert!(
        got[0].starts_with("p00000.yaml:2:1: document 1: YAML syntax error"),
        "{}",
        got[0]
    );
    assert!(got[9_999].starts_with("p09999.yaml:"), "{}", got[9_999]);
}

#[test]
fn one_name_twice_and_one_address_twice_across_files() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("a.yaml"), cnp("web")).unwrap();
    fs::write(tmp.path().join("b.yaml"), cnp("web")).unwrap();
    assert_eq!(
        outcome(tmp.path(), Kind::Policy, LoadOptions::default()),
        ["b.yaml:4:9: document 1 (CiliumNetworkPolicy default/web): metadata.name: CiliumNetworkPolicy default/web is already defined at a.yaml:4:9; a policy name must be unique per kind and namespace"]
    );
    let tmp = tempfile::tempdir().unwrap();
    let ep = |name: &str, iface: &str, addr: &str| {
        format!("apiVersion: netpol/v1\nkind: Endpoint\nmetadata:\n  name: {name}\nspec:\n  interface: {iface}\n  addresses: [{addr}]\n")
    };
    fs::write(tmp.path().join("a.yaml"), ep("a", "nph-a", "10.205.0.1")).unwrap();
    fs::write(tmp.path().join("b.yaml"), ep("b", "nph-b", "10.205.0.1")).unwrap();
    assert_eq!(
        outcome(tmp.path(), Kind::Registry, LoadOptions::default()),
        ["b.yaml:7:15: document 1 (Endpoint default/b): spec.addresses[0]: address 10.205.0.1 is already claimed by Endpoint default/a at a.yaml:7:15; an address belongs to one endpoint"]
    );
}

// ---------------------------------------------------------------- special files

#[test]
fn special_files_never_hang() {
    let _turn = timed("special_files_never_hang");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // A FIFO nobody writes to, and a symlink to one.
    nix::unistd::mkfifo(
        &d.join("fifo.yaml"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    symlink(d.join("fifo.yaml"), d.join("to-fifo.yaml")).unwrap();
    // Devices: a symlink to /dev/zero (endless) and /dev/null.
    symlink("/dev/zero", d.join("zero.yaml")).unwrap();
    symlink("/dev/null", d.join("null.yaml")).unwrap();
    // A listening socket.
    let _sock = std::os::unix::net::UnixListener::bind(d.join("sock.yaml")).unwrap();
    // A symlink loop and a dangling symlink.
    symlink(d.join("loop-b.yaml"), d.join("loop-a.yaml")).unwrap();
    symlink(d.join("loop-a.yaml"), d.join("loop-b.yaml")).unwrap();
    symlink("/nonexistent/policy.yaml", d.join("dangling.yaml")).unwrap();
    // A directory with a wanted name.
    fs::create_dir(d.join("dir.yaml")).unwrap();
    // /dev/stdin leads to whatever the test runner's stdin is: never regular here.
    let dir = d.to_path_buf();
    let got = bounded("special files", 0, move || {
        outcome(&dir, Kind::Policy, LoadOptions::default())
    });
    assert_eq!(
        got,
        [
            "dangling.yaml: symlink target cannot be read: No such file or directory (os error 2)",
            "dir.yaml: a directory is not read: only regular files are policy or registry files",
            "fifo.yaml: a FIFO is not read: only regular files are policy or registry files",
            "loop-a.yaml: symlink target cannot be read: Too many levels of symbolic links (os error 40)",
            "loop-b.yaml: symlink target cannot be read: Too many levels of symbolic links (os error 40)",
            "null.yaml: a device is not read: only regular files are policy or registry files",
            "sock.yaml: a socket is not read: only regular files are policy or registry files",
            "to-fifo.yaml: a FIFO is not read: only regular files are policy or registry files",
            "zero.yaml: a device is not read: only regular files are policy or registry files",
        ]
    );
}

#[test]
fn character_device_node_in_the_directory() {
    // Mknod needs root; alone: the load below is timed.
    let Some(_turn) = Needs::root()
        .alone()
        .check("character_device_node_in_the_directory")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // A real device node (1,5 = /dev/zero), not a symlink to one.
    nix::sys::stat::mknod(
        &tmp.path().join("zero.yaml"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        nix::sys::stat::makedev(1, 5),
    )
    .unwrap();
    let dir = tmp.path().to_path_buf();
    let got = bounded("device node", 0, move || {
        outcome(&dir, Kind::Policy, LoadOptions::default())
    });
    assert_eq!(
        got,
        ["zero.yaml: a device is not read: only regular files are policy or registry files"]
    );
}

/// A copy of `netpolctl` in `dir` (made 0755), so that uid 65534 can run it
/// whatever the modes of the checkout it was built in.
fn netpolctl_for_anyone(dir: &Path) -> PathBuf {
    chmod(dir, 0o755);
    let bin = dir.join("netpolctl");
    fs::copy(env!("CARGO_BIN_EXE_netpolctl"), &bin).unwrap();
    chmod(&bin, 0o755);
    bin
}

/// `netpolctl check` (a copy in `dir` anyone may run) on these directories,
/// as nobody (uid 65534) when `nobody`.
fn check_as(dir: &Path, pol: &Path, reg: &Path, nobody: bool) -> std::process::Output {
    let mut cmd = std::process::Command::new(netpolctl_for_anyone(dir));
    cmd.args([
        "check",
        "--policy-dir",
        pol.to_str().unwrap(),
        "--endpoint-dir",
        reg.to_str().unwrap(),
    ]);
    if nobody {
        use std::os::unix::process::CommandExt;
        cmd.uid(65534).gid(65534);
    }
    cmd.output().unwrap()
}

#[test]
fn unreadable_file_is_reported_not_fatal() {
    // Root reads any file, so read it as another user: `netpolctl check` run
    // as nobody (uid 65534) on a root-owned, trusted file of mode 000.
    let tmp = tempfile::tempdir().unwrap();
    let pol = tmp.path().join("netpol.d");
    let reg = tmp.path().join("endpoints.d");
    fs::create_dir(&pol).unwrap();
    fs::create_dir(&reg).unwrap();
    for d in [tmp.path(), &pol, &reg] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::write(pol.join("ok.yaml"), cnp("ok")).unwrap();
    fs::write(pol.join("secret.yaml"), cnp("secret")).unwrap();
    fs::set_permissions(pol.join("secret.yaml"), fs::Permissions::from_mode(0o000)).unwrap();
    let out = check_as(tmp.path(), &pol, &reg, nix::unistd::geteuid().is_root());
    let stdout = String::from_utf8_lossy(&out.stdout).replace(&format!("{}/", pol.display()), "");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        "secret.yaml: cannot open: Permission denied (os error 13)\n"
    );
}

// ---------------------------------------------------------------- file trust

fn chown(path: &Path, uid: u32) {
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn group_or_world_writable_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::write(d.join("a.yaml"), cnp("a")).unwrap();
    fs::write(d.join("g.yaml"), cnp("g")).unwrap();
    fs::write(d.join("o.yaml"), cnp("o")).unwrap();
    fs::write(d.join("go.yaml"), cnp("go")).unwrap();
    chmod(&d.join("g.yaml"), 0o664);
    chmod(&d.join("o.yaml"), 0o646);
    chmod(&d.join("go.yaml"), 0o666);
    let got = outcome(d, Kind::Policy, LoadOptions::default());
    // The fix names the full path (shortened in `got`).
    let p = d.display().to_string();
    assert!(api::load_policy_dir(d).unwrap_err()[0]
        .message
        .ends_with(&format!("; run chmod go-w {p}/g.yaml")));
    assert_eq!(
        got,
        [
            "g.yaml: file is writable by group (mode 0664), so someone other than its owner could change what netpol enforces; run chmod go-w g.yaml".to_string(),
            "go.yaml: file is writable by group and others (mode 0666), so someone other than its owner could change what netpol enforces; run chmod go-w go.yaml".to_string(),
            "o.yaml: file is writable by others (mode 0646), so someone other than its owner could change what netpol enforces; run chmod go-w o.yaml".to_string(),
        ]
    );
    // The same files pass with the check turned off (strict_file_modes = false).
    assert_eq!(lenient(d, Kind::Policy), ["ok: 4 policies"]);
    // Registry files follow the same rule.
    fs::write(
        d.join("r.yaml"),
        "apiVersion: netpol/v1\nkind: Namespace\nmetadata: {name: prod}\n",
    )
    .unwrap();
    chmod(&d.join("r.yaml"), 0o620);
    let r = tempfile::tempdir().unwrap();
    fs::rename(d.join("r.yaml"), r.path().join("r.yaml")).unwrap();
    assert_eq!(
        outcome(r.path(), Kind::Registry, LoadOptions::default()),
        ["r.yaml: file is writable by group (mode 0620), so someone other than its owner could change what netpol enforces; run chmod go-w r.yaml"]
    );
    assert_eq!(
        lenient(r.path(), Kind::Registry),
        ["ok: 0 endpoints, 0 nodes, 1 namespaces"]
    );
}

#[test]
fn writable_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::write(d.join("a.yaml"), cnp("a")).unwrap();
    chmod(d, 0o777);
    let got = outcome(d, Kind::Policy, LoadOptions::default());
    let p = d.display().to_string();
    assert_eq!(
        got,
        [format!(
            "{p}: policy directory is writable by group and others (mode 0777), so someone other than its owner could change what netpol enforces; run chmod go-w {p}"
        )]
    );
    // Sticky or not, a directory others can write to is refused: they could add files.
    chmod(d, 0o1777);
    assert_eq!(outcome(d, Kind::Policy, LoadOptions::default()).len(), 1);
    chmod(d, 0o775);
    let got = outcome(d, Kind::Registry, LoadOptions::default());
    assert_eq!(
        got,
        [
            format!("{p}: endpoint directory is writable by group (mode 0775), so someone other than its owner could change what netpol enforces; run chmod go-w {p}"),
            "a.yaml:2:7: document 1 (CiliumNetworkPolicy default/a): kind: CiliumNetworkPolicy does not belong here; put it in the policy directory (/etc/netpol.d)".into(),
        ]
    );
    assert_eq!(lenient(d, Kind::Policy), ["ok: 1 policies"]);
    chmod(d, 0o755);
    assert_eq!(
        outcome(d, Kind::Policy, LoadOptions::default()),
        ["ok: 1 policies"]
    );
}

#[test]
fn files_owned_by_another_user_are_refused() {
    // Chown to another user needs root.
    let Some(_turn) = Needs::root().check("files_owned_by_another_user_are_refused") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::write(d.join("a.yaml"), cnp("a")).unwrap();
    fs::write(d.join("b.yaml"), cnp("b")).unwrap();
    chown(&d.join("b.yaml"), 1000);
    let p = d.display().to_string();
    assert_eq!(
        outcome(d, Kind::Policy, LoadOptions::default()),
        ["b.yaml: file is owned by uid 1000, which is neither root nor the user reading it (uid 0); run chown root b.yaml"]
    );
    // Both at once: two problems for one file.
    chmod(&d.join("b.yaml"), 0o666);
    assert_eq!(outcome(d, Kind::Policy, LoadOptions::default()).len(), 2);
    // The directory itself.
    chmod(&d.join("b.yaml"), 0o644);
    chown(&d.join("b.yaml"), 0);
    chown(d, 1000);
    assert_eq!(
        outcome(d, Kind::Policy, LoadOptions::default()),
        [format!("{p}: policy directory is owned by uid 1000, which is neither root nor the user reading it (uid 0); run chown root {p}")]
    );
    assert_eq!(lenient(d, Kind::Policy), ["ok: 2 policies"]);
}

#[test]
fn files_owned_by_the_reading_user_are_trusted() {
    // Run as nobody over a directory nobody owns: trusted (the user's own files).
    if !nix::unistd::geteuid().is_root() {
        // Not root: the test's own files are owned by the reading user.
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("a.yaml"), cnp("a")).unwrap();
        assert_eq!(
            outcome(tmp.path(), Kind::Policy, LoadOptions::default()),
            ["ok: 1 policies"]
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let pol = tmp.path().join("netpol.d");
    let reg = tmp.path().join("endpoints.d");
    fs::create_dir(&pol).unwrap();
    fs::create_dir(&reg).unwrap();
    fs::write(pol.join("a.yaml"), cnp("a")).unwrap();
    for p in [&pol, &reg, &pol.join("a.yaml")] {
        chown(p, 65534);
    }
    let run = |as_nobody: bool| {
        let out = check_as(tmp.path(), &pol, &reg, as_nobody);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).replace(&tmp.path().display().to_string(), "DIR"),
        )
    };
    let (code, out) = run(true);
    assert_eq!(code, Some(0), "{out}");
    // Root reading nobody's files refuses them.
    let (code, out) = run(false);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(
        out,
        "DIR/netpol.d: policy directory is owned by uid 65534, which is neither root nor the user reading it (uid 0); run chown root DIR/netpol.d\n\
         DIR/netpol.d/a.yaml: file is owned by uid 65534, which is neither root nor the user reading it (uid 0); run chown root DIR/netpol.d/a.yaml\n\
         DIR/endpoints.d: endpoint directory is owned by uid 65534, which is neither root nor the user reading it (uid 0); run chown root DIR/endpoints.d\n"
    );
}

#[test]
fn symlinks_out_of_the_directory_are_followed_and_their_targets_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("netpol.d");
    let elsewhere = tmp.path().join("elsewhere");
    fs::create_dir(&d).unwrap();
    fs::create_dir(&elsewhere).unwrap();
    chmod(&elsewhere, 0o755);
    fs::write(elsewhere.join("t.yaml"), cnp("linked")).unwrap();
    symlink(elsewhere.join("t.yaml"), d.join("l.yaml")).unwrap();
    // Allowed: the target is a regular file passing the trust check.
    assert_eq!(
        outcome(&d, Kind::Policy, LoadOptions::default()),
        ["ok: 1 policies"]
    );
    // A relative symlink through `..` too.
    fs::remove_file(d.join("l.yaml")).unwrap();
    symlink("../elsewhere/t.yaml", d.join("l.yaml")).unwrap();
    assert_eq!(
        outcome(&d, Kind::Policy, LoadOptions::default()),
        ["ok: 1 policies"]
    );
    // The target's mode is what counts, not the link's.
    chmod(&elsewhere.join("t.yaml"), 0o666);
    let t = fs::canonicalize(elsewhere.join("t.yaml"))
        .unwrap()
        .display()
        .to_string();
    assert_eq!(
        outcome(&d, Kind::Policy, LoadOptions::default()),
        [format!("l.yaml: symlink target {t} is writable by group and others (mode 0666), so someone other than its owner could change what netpol enforces; run chmod go-w {t}")]
    );
    // The directory holding the target: others could swap the target.
    chmod(&elsewhere.join("t.yaml"), 0o644);
    chmod(&elsewhere, 0o777);
    let e = fs::canonicalize(&elsewhere).unwrap().display().to_string();
    assert_eq!(
        outcome(&d, Kind::Policy, LoadOptions::default()),
        [format!("l.yaml: directory {e} holding the symlink target is writable by group and others (mode 0777), so someone other than its owner could change what netpol enforces; run chmod go-w {e}")]
    );
    assert_eq!(lenient(&d, Kind::Policy), ["ok: 1 policies"]);
    // A symlink into /tmp (world-writable, sticky) is refused for the same reason.
    chmod(&elsewhere, 0o755);
    let in_tmp = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile_in("/tmp")
        .unwrap();
    fs::write(in_tmp.path(), cnp("in-tmp")).unwrap();
    let tmp_mode = fs::metadata("/tmp").unwrap().permissions().mode() & 0o7777;
    let d2 = tmp.path().join("netpol2.d");
    fs::create_dir(&d2).unwrap();
    symlink(in_tmp.path(), d2.join("t.yaml")).unwrap();
    let got = outcome(&d2, Kind::Policy, LoadOptions::default());
    if tmp_mode & 0o022 != 0 {
        assert_eq!(
            got,
            [format!("t.yaml: directory /tmp holding the symlink target is writable by group and others (mode {tmp_mode:04o}), so someone other than its owner could change what netpol enforces; run chmod go-w /tmp")]
        );
    }
    // The owner of the target counts, not the owner of the link.
    if nix::unistd::geteuid().is_root() {
        chown(&elsewhere.join("t.yaml"), 1000);
        assert_eq!(
            outcome(&d, Kind::Policy, LoadOptions::default()),
            [format!("l.yaml: symlink target {t} is owned by uid 1000, which is neither root nor the user reading it (uid 0); run chown root {t}")]
        );
    }
}

#[test]
fn the_whole_set_is_invalid_when_one_file_is_untrusted() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for i in 0..5 {
        fs::write(d.join(format!("p{i}.yaml")), cnp(&format!("p{i}"))).unwrap();
    }
    assert_eq!(
        outcome(d, Kind::Policy, LoadOptions::default()),
        ["ok: 5 policies"]
    );
    chmod(&d.join("p3.yaml"), 0o664);
    assert!(api::load_policy_dir(d).is_err());
    assert!(api::load_policy_dir_with(d, &LoadOptions::default()).is_err());
    assert_eq!(LoadOptions::default(), LoadOptions { strict_modes: true });
}

// ---------------------------------------------------------------- fuzz corpus replay

/// The committed, minimized fuzz corpora (`fuzz/corpus/<target>/`), replayed
/// on stable in every `cargo test`: whatever the fuzzers once found interesting
/// keeps parsing (and compiling) without a panic.
fn corpus_files(target: &str) -> Vec<Vec<u8>> {
    let dir = crate::harness::cmd::repo().join("fuzz/corpus").join(target);
    let mut out: Vec<Vec<u8>> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(
        out.len() > 10,
        "{}: only {} inputs",
        dir.display(),
        out.len()
    );
    out.sort();
    out
}

#[test]
fn fuzz_corpus_replays_without_panic() {
    let _turn = timed("fuzz_corpus_replays_without_panic");
    let policies = corpus_files("parse_policies");
    let registries = corpus_files("parse_registry");
    let configs = corpus_files("parse_config");
    let n = policies.len() + registries.len() + configs.len();
    bounded_by(
        "fuzz corpus replay (parsers)",
        Duration::from_secs(30),
        move || {
            for data in &policies {
                if let Ok(text) = std::str::from_utf8(data) {
                    let _ = api::parse_policies(Path::new("fuzz.yaml"), text);
                    let _ = api::parse_policies(Path::new("fuzz.json"), text);
                }
            }
            for data in &registries {
                if let Ok(text) = std::str::from_utf8(data) {
                    let _ = api::parse_registry(Path::new("fuzz.yaml"), text);
                    let _ = api::parse_registry(Path::new("fuzz.json"), text);
                }
            }
            for data in &configs {
                if let Ok(text) = std::str::from_utf8(data) {
                    let _ = toml::from_str::<netpol::config::Config>(text);
                }
            }
        },
    );
    eprintln!("replayed {n} parser inputs");
}

#[test]
fn fuzz_corpus_compiles_and_traces_without_panic() {
    let _turn = timed("fuzz_corpus_compiles_and_traces_without_panic");
    use netpol::api::model::PolicySet;
    use netpol::policy::compile::{compile, CompileOptions};
    use netpol::policy::trace::trace_str;
    let inputs = corpus_files("compile_trace");
    let reg_text = fs::read_to_string(
        crate::harness::cmd::repo().join("etc/examples/seed/endpoints.d/seed.yaml"),
    )
    .unwrap();
    let reg = api::parse_registry(Path::new("seed.yaml"), &reg_text).unwrap();
    bounded_by(
        "fuzz corpus replay (compile, trace)",
        Duration::from_secs(60),
        move || {
            for data in inputs.iter().filter(|d| d.len() >= 2) {
                let Ok(text) = std::str::from_utf8(&data[2..]) else {
                    continue;
                };
                let Ok(policies) = api::parse_policies(Path::new("fuzz.yaml"), text) else {
                    continue;
                };
                let opts = CompileOptions {
                    node_name: "host-a".into(),
                    audit: data[0] & 1 != 0,
                    ..CompileOptions::default()
                };
                let c = compile(&PolicySet { policies }, &reg, &opts);
                for (s, d) in [
                    ("default/frontend-1", "backend"),
                    ("backend", "10.0.1.31"),
                    ("8.8.8.8", "fd00:1::12"),
                ] {
                    let _ = trace_str(&c, s, d, 6, u16::from(data[1]) * 257);
                }
            }
        },
    );
}

/// The DNS proxy's message handling (`fuzz_targets/dns_message.rs`): the
/// corpus's queries, answers, compression loops and huge counts.
#[test]
fn fuzz_corpus_dns_messages_without_panic() {
    let _turn = timed("fuzz_corpus_dns_messages_without_panic");
    use netpol::api::model::FqdnSelector;
    let inputs = corpus_files("dns_message");
    let rules = [
        FqdnSelector::Name("api.example.com.".into()),
        FqdnSelector::Pattern("*.example.com.".into()),
        FqdnSelector::Pattern("**.example.org.".into()),
    ];
    bounded_by(
        "fuzz corpus replay (dns messages)",
        Duration::from_secs(30),
        move || {
            for data in &inputs {
                netpol::dns::proxy::handle_offline(data, &rules);
            }
        },
    );
}

// ---------------------------------------------------------------- properties

mod props {
    use super::*;
    use netpol::api::model::PolicySet;
    use netpol::policy::compile::{compile, CompileOptions};
    use netpol::policy::trace::trace_str;
    use proptest::prelude::*;

    /// YAML-ish text: fragments that steer the scanner into its corners.
    fn yamlish() -> impl Strategy<Value = String> {
        let frag = prop_oneof![
            Just("apiVersion: cilium.io/v2\n".to_string()),
            Just("kind: CiliumNetworkPolicy\n".to_string()),
            Just("kind: Endpoint\n".to_string()),
            Just("apiVersion: netpol/v1\n".to_string()),
            Just("metadata: {name: x}\n".to_string()),
            Just("spec:\n".to_string()),
            Just("  endpointSelector: {}\n".to_string()),
            Just("  ingress:\n".to_string()),
            Just("    - fromEntities: [world]\n".to_string()),
            Just("    - toPorts: [{ports: [{port: \"80\"}]}]\n".to_string()),
            Just("  addresses: [10.205.0.1]\n".to_string()),
            Just("---\n".to_string()),
            Just("&a ".to_string()),
            Just("*a".to_string()),
            Just("<<: ".to_string()),
            Just("? ".to_string()),
            Just("- ".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            Just("{".to_string()),
            Just("}".to_string()),
            Just(": ".to_string()),
            Just("\"".to_string()),
            Just("'".to_string()),
            Just("|\n".to_string()),
            Just(">-\n".to_string()),
            Just("!!str ".to_string()),
            Just("!tag ".to_string()),
            Just("%YAML 1.2\n".to_string()),
            Just("\t".to_string()),
            Just("\r\n".to_string()),
            Just("\u{feff}".to_string()),
            Just("#".to_string()),
            "[a-z0-9./:-]{0,12}".prop_map(|s| s),
            "[ \n]{1,4}".prop_map(|s| s),
            any::<char>().prop_map(|c| c.to_string()),
        ];
        proptest::collection::vec(frag, 0..60).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = api::parse_policies(Path::new("p.yaml"), &text);
            let _ = api::parse_policies(Path::new("p.json"), &text);
            let _ = api::parse_registry(Path::new("r.yaml"), &text);
            let _ = toml::from_str::<netpol::config::Config>(&text);
        }

        #[test]
        fn yamlish_text_never_panics(text in yamlish()) {
            let _ = api::parse_policies(Path::new("p.yaml"), &text);
            let _ = api::parse_policies(Path::new("p.json"), &text);
            let _ = api::parse_registry(Path::new("r.yaml"), &text);
        }
    }

    // Generated valid policies: text → parse (must succeed) → compile → trace.

    const APPS: &[&str] = &["frontend", "backend", "database", "nobody"];

    fn selector() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("{}".to_string()),
            proptest::sample::select(APPS).prop_map(|a| format!("{{matchLabels: {{app: {a}}}}}")),
            proptest::sample::subsequence(APPS.to_vec(), 1..3).prop_map(|v| format!(
                "{{matchExpressions: [{{key: app, operator: NotIn, values: [{}]}}]}}",
                v.join(", ")
            )),
            Just("{matchExpressions: [{key: app, operator: Exists}]}".to_string()),
        ]
    }

    fn ports() -> impl Strategy<Value = String> {
        let one = prop_oneof![
            (
                0u32..=65535,
                proptest::sample::select(&["TCP", "UDP", "SCTP", "ANY"][..])
            )
                .prop_map(|(p, pr)| format!("{{port: \"{p}\", protocol: {pr}}}")),
            (1u32..=65535, 0u32..=2000)
                .prop_map(|(p, w)| format!("{{port: \"{p}\", endPort: {}}}", (p + w).min(65535))),
            Just("{port: http}".to_string()),
        ];
        proptest::collection::vec(one, 1..4)
            .prop_map(|v| format!("[{{ports: [{}]}}]", v.join(", ")))
    }

    fn peer(dir_from: bool) -> impl Strategy<Value = String> {
        let f = if dir_from { "from" } else { "to" };
        prop_oneof![
            selector().prop_map(move |s| format!("{f}Endpoints: [{s}]")),
            proptest::sample::select(&["world", "cluster", "host", "all", "remote-node"][..])
                .prop_map(move |e| format!("{f}Entities: [{e}]")),
            (0u8..=255, 0u8..=32)
                .prop_map(move |(a, l)| format!("{f}CIDR: [\"10.{a}.0.0/{}\"]", l.clamp(8, 32))),
            Just(format!(
                "{f}CIDRSet: [{{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]"
            )),
        ]
    }

    fn rule(section: &'static str) -> impl Strategy<Value = String> {
        let from = section.starts_with("ingress");
        (peer(from), proptest::option::of(ports())).prop_map(move |(p, ports)| match ports {
            Some(ports) => format!("{{{p}, toPorts: {ports}}}"),
            None => format!("{{{p}}}"),
        })
    }

    fn policy() -> impl Strategy<Value = String> {
        const SECTIONS: &[&str] = &["ingress", "egress", "ingressDeny", "egressDeny"];
        (
            selector(),
            proptest::collection::vec((proptest::sample::select(SECTIONS), 0..3usize), 0..4),
            proptest::collection::vec(rule("ingress"), 3),
            proptest::collection::vec(rule("egress"), 3),
        )
            // Cilium refuses a rule without an entry in any direction.
            .prop_filter("a rule needs an entry", |(_, secs, _, _)| {
                let mut seen = std::collections::BTreeSet::new();
                secs.iter().any(|(s, n)| seen.insert(*s) && *n > 0)
            })
            .prop_map(|(sel, secs, ins, egs)| {
                let mut text = format!("  endpointSelector: {sel}\n");
                let mut seen = std::collections::BTreeSet::new();
                for (s, n) in secs {
                    if !seen.insert(s) {
                        continue;
                    }
                    let pool = if s.starts_with("ingress") { &ins } else { &egs };
                    let items: Vec<&String> = pool.iter().take(n).collect();
                    let items: Vec<String> = items
                        .into_iter()
                        // Deny rules take no named ports and no L7; keep the peer and numeric ports.
                        .map(|r| {
                            if s.ends_with("Deny") {
                                r.replace("{port: http}", "{port: \"8080\"}")
                            } else {
                                r.clone()
                            }
                        })
                        .collect();
                    text.push_str(&format!("  {s}: [{}]\n", items.join(", ")));
                }
                text
            })
    }

    fn registry() -> api::model::RegistrySet {
        let text = fs::read_to_string(
            crate::harness::cmd::repo().join("etc/examples/seed/endpoints.d/seed.yaml"),
        )
        .unwrap();
        api::parse_registry(Path::new("seed.yaml"), &text).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn generated_policies_compile_and_trace(specs in proptest::collection::vec(policy(), 1..4), audit in any::<bool>()) {
            let mut text = String::new();
            for (i, spec) in specs.iter().enumerate() {
                text.push_str(&format!("---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p{i}\nspec:\n{spec}"));
            }
            let policies = match api::parse_policies(Path::new("gen.yaml"), &text) {
                Ok(p) => p,
                Err(e) => {
                    let msg: Vec<String> = e.iter().map(ToString::to_string).collect();
                    return Err(TestCaseError::fail(format!("generated policy is invalid:\n{text}\n{}", msg.join("\n"))));
                }
            };
            let opts = CompileOptions { node_name: "host-a".into(), audit, ..CompileOptions::default() };
            let c = compile(&PolicySet { policies }, &registry(), &opts);
            let sides = ["default/frontend-1", "backend", "database", "10.0.1.12", "fd00:1::21", "8.8.8.8", "2001:db8::1"];
            for s in sides {
                for d in sides {
                    for (proto, port) in [(6u8, 80u16), (17, 53), (6, 5432), (1, 0), (132, 9), (6, 65535)] {
                        let _ = trace_str(&c, s, d, proto, port);
                    }
                }
            }
        }
    }
}

/// Throughput of the YAML scanner alone, for docs/reliability.md:
/// `cargo test --test offline hostile::measure -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_yaml_scanner_throughput() {
    for (name, text) in [
        ("flow100k", format!("[{}1]\n", "1,".repeat(99_999))),
        ("flow1m", format!("[{}1]\n", "1,".repeat(999_999))),
        ("block1m", "- 1\n".repeat(1_000_000)),
        (
            "plain-map200k",
            (0..200_000)
                .map(|i| format!("k{i}: v\n"))
                .collect::<String>(),
        ),
        ("docs", (cnp("same") + "---\n").repeat(30_000)),
    ] {
        let t = Instant::now();
        let mut p = yaml_rust2::parser::Parser::new_from_str(&text);
        let mut n = 0;
        while let Ok((ev, _)) = p.next_token() {
            n += 1;
            if ev == yaml_rust2::parser::Event::StreamEnd {
                break;
            }
        }
        eprintln!("{name}: {} bytes, {n} events {:?}", text.len(), t.elapsed());
    }
}

/// Why the tree is built from pulled events: yaml-rust2's own `Parser::load`
/// recurses per nesting level. Run by hand; it is expected to crash the process:
/// `cargo test --test offline hostile::recursive_load -- --ignored --nocapture`.
#[test]
#[ignore]
fn recursive_load_overflows_the_stack() {
    struct Nothing;
    impl yaml_rust2::parser::MarkedEventReceiver for Nothing {
        fn on_event(&mut self, _: yaml_rust2::parser::Event, _: yaml_rust2::scanner::Marker) {}
    }
    let text = "- ".repeat(100_000);
    let r = std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            yaml_rust2::parser::Parser::new_from_str(&text)
                .load(&mut Nothing, true)
                .is_ok()
        })
        .unwrap()
        .join();
    eprintln!("survived: {r:?}");
}

/// The problem sort before it used a map: a list search per comparison.
/// `cargo test --test offline hostile::old_sort -- --ignored --nocapture`.
#[test]
#[ignore]
fn old_sort_was_quadratic() {
    let files: Vec<PathBuf> = (0..10_000)
        .map(|i| PathBuf::from(format!("/etc/netpol.d/p{i:05}.yaml")))
        .collect();
    let mut problems: Vec<Problem> = files
        .iter()
        .rev()
        .map(|f| Problem {
            file: f.clone(),
            line: Some(2),
            column: Some(1),
            document: Some(1),
            object: None,
            field: None,
            message: "x".into(),
        })
        .collect();
    let t = Instant::now();
    let order = files.clone();
    problems.sort_by(|a, b| {
        let fa = order.iter().position(|f| *f == a.file);
        let fb = order.iter().position(|f| *f == b.file);
        (fa, a.line).cmp(&(fb, b.line))
    });
    eprintln!("old sort of 10,000 problems: {:?}", t.elapsed());
}

/// A valid 87 KB policy (5,000 `fromCIDR` prefixes × 40 port ranges with
/// endPort) that would compile to millions of policy entries: refused by the map
/// budget (the default `maps.policy_max_entries`) with a problem naming the file,
/// the policy, the rule and the key to raise, after bounded work (without the
/// budget this took 69 s and gigabytes in a debug build). Not timed: it only has
/// to finish.
#[test]
fn compile_blowup_is_refused_by_the_map_budget() {
    use netpol::api::model::PolicySet;
    use netpol::policy::compile::{try_compile, CompileOptions};
    use netpol::sizes::MapKind;
    let reg_text = fs::read_to_string(
        crate::harness::cmd::repo().join("etc/examples/seed/endpoints.d/seed.yaml"),
    )
    .unwrap();
    let reg = api::parse_registry(Path::new("seed.yaml"), &reg_text).unwrap();
    let n = 5000;
    let cidrs: Vec<String> = (0..n)
        .map(|i| format!("\"11.{}.{}.0/24\"", i / 256, i % 256))
        .collect();
    let ports: Vec<String> = (0..40)
        .map(|i| format!("{{port: \"{}\", endPort: {}}}", 1 + i, 65534 - i))
        .collect();
    let text = format!(
        "{}  ingress:\n    - fromCIDR: [{}]\n      toPorts: [{{ports: [{}]}}]\n",
        cnp("big"),
        cidrs.join(", "),
        ports.join(", ")
    );
    assert!(text.len() > 85_000, "{} bytes", text.len());
    let policies = api::parse_policies(Path::new("/etc/netpol.d/big.yaml"), &text).unwrap();
    let t = Instant::now();
    let err = try_compile(&PolicySet { policies }, &reg, &CompileOptions::default()).unwrap_err();
    eprintln!(
        "{n} CIDRs x 40 ranges ({} bytes): refused in {:?}",
        text.len(),
        t.elapsed()
    );
    assert_eq!((err.map, err.limit), (MapKind::Policy, 262_144));
    assert_eq!(
        err.to_string(),
        "/etc/netpol.d/big.yaml:9:7: document 1 (CiliumNetworkPolicy default/big): spec.ingress[0]: with this rule, \
         endpoint default/backend would need more than 262144 policy entries; the policy map holds 262144 \
         (maps.policy_max_entries); narrow the rule or raise maps.policy_max_entries in netpold.toml"
    );
}

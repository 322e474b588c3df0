//! The repository, the binaries under test, and the one runner of `ip`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

pub const NETPOLD: &str = env!("CARGO_BIN_EXE_netpold");
pub const NETPOLCTL: &str = env!("CARGO_BIN_EXE_netpolctl");

/// Send `sig` to a child the caller owns and has not reaped (SIGSTOP and
/// SIGCONT hold a daemon or etcd still).
pub fn signal(child: &std::process::Child, sig: i32) {
    let pid = i32::try_from(child.id()).expect("pid fits in pid_t");
    // SAFETY: kill(2) on the pid of a child that has not been reaped, so the
    // pid names that process.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// The source tree.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/fixtures/<kind>`: conformance, parse, hostile, kubectl, packaging.
pub fn fixtures(kind: &str) -> PathBuf {
    repo().join("tests/fixtures").join(kind)
}

/// `netpolctl ARGS`.
pub fn netpolctl(args: &[&str]) -> Output {
    Command::new(NETPOLCTL)
        .args(args)
        .output()
        .expect("run netpolctl")
}

/// `ip ARGS`: its output, or a panic with its stderr when it fails.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip ARGS`, whatever comes of it (removing what may not be there).
pub fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `ip -force -n NS -batch -` with these lines (-force: go on after an error).
pub fn ip_batch(ns: &str, lines: &str) {
    let mut child = Command::new("ip")
        .args(["-force", "-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ip -batch");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let _ = child.wait();
}

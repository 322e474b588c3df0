//! Packaging end to end (DESIGN §7, tier 3).
//!
//! `deb_lifecycle_under_systemd` builds the .deb with `make deb`, boots a real
//! systemd as PID 1 of private PID, mount and UTS namespaces inside network
//! namespace `npk-node` (tests/fixtures/packaging/boot-systemd.sh), installs the package
//! there with `dpkg -i`, and checks what a user relies on: the unit is active;
//! workloads in network namespaces get the seed scenario's verdicts; a reload with
//! a broken file fails, says why, and changes nothing; a restart and an upgrade
//! keep enforcement throughout; the journal has the daemon's lines; `dpkg -P` stops it and leaves no
//! pins, programs or qdiscs.
//!
//! The file system is the host's, so the install is real: a guard purges the
//! package and removes everything the test made (namespaces, links, files, pins),
//! also when the test fails. The test refuses to run where netpol is already
//! installed rather than touch an administrator's installation.
//!
//! `rpm_lifecycle_under_systemd` does the same with `rpm -i` / `rpm -e`: the
//! .rpm's scriptlets hand the unit to systemd, stop it, detach and clean up.
//! `unit_sandbox_allows_bpf` runs tests/fixtures/packaging/bpf-probe.sh *as* the installed
//! netpold.service (a drop-in replaces only ExecStart=): the hardening leaves BPF
//! (pinning, maps, tc attach) working, whatever the daemon does.
//! `rpm_matches_deb` builds the .rpm with `make rpm` and holds its file list,
//! conffiles, dependencies and scriptlets to the .deb's (no root needed).
//! `man_pages_match_the_cli` holds the hand-written man pages to the binaries'
//! --help: the same commands and options, none missing, none invented.
//!
//! The privileged tests install the same package on the same host, so they run
//! alone. A test that cannot run here (not root, tools missing, bpffs not
//! mounted, netpol already installed) skips with a message, unless CI is set: then
//! it fails (`harness::require`).
//!
//! The packages are built from the `dev` profile by default, reusing the build
//! `cargo test` just made (a release build would double CI's compile time);
//! NETPOL_PKG_PROFILE=release builds them as shipped.

mod harness;

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use harness::cmd::{fixtures, ip, repo as src_dir, NETPOLCTL, NETPOLD};
use harness::netns::Netns;
use harness::probe::{self, Listeners};
use harness::require::have;
use harness::topo::{Names, Topo};
use harness::Needs;

const NODE: &str = "npk-node";
const BRIDGE: &str = "npk-br0";
const PIN_DIR: &str = "/sys/fs/bpf/netpol";
/// Where the sandbox probe pins (tests/fixtures/packaging/bpf-probe.sh).
const PROBE_PIN_DIR: &str = "/sys/fs/bpf/npk-probe";
/// Files the test puts under /etc carry this prefix, so the guard finds them.
const FILE_PREFIX: &str = "npk-";

/// The seed scenario's workloads, with this test's names and addresses:
/// (short name = netns and host-side link, endpoint name, IPv4, IPv6).
const WORKLOADS: [(&str, &str, &str, &str); 4] = [
    ("npk-fe1", "frontend-1", "10.203.1.11", "fd00:203::11"),
    ("npk-fe2", "frontend-2", "10.203.1.12", "fd00:203::12"),
    ("npk-be", "backend", "10.203.1.21", "fd00:203::21"),
    ("npk-db", "database", "10.203.1.31", "fd00:203::31"),
];
const PORTS: [u16; 3] = [80, 81, 5432];

// ---------------------------------------------------------------- gating, helpers

fn profile() -> String {
    std::env::var("NETPOL_PKG_PROFILE").unwrap_or_else(|_| "dev".to_string())
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Run, and panic with the output unless it succeeds.
fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("timed out after {timeout:?} waiting for {what}");
    false
}

/// What a test of the package's life under systemd needs: root, bpffs, the build
/// and systemd tools and `extra_tools`, a turn alone (the tests install the same
/// package on the same host), and a host where netpol is not installed.
fn host_needs(extra_tools: &[&'static str]) -> Needs {
    Needs::privileged()
        .tools(&BUILD_TOOLS)
        .tools(&[
            "/lib/systemd/systemd",
            "tc",
            "dpkg",
            "systemctl",
            "journalctl",
        ])
        .tools(extra_tools)
        .alone()
        .unless(|| {
            let status = run(&mut cmd("dpkg-query", &["-W", "-f=${Status}", "netpol"]));
            let by_rpm = have("rpm") && run(&mut cmd("rpm", &["-q", "netpol"])).status.success();
            (String::from_utf8_lossy(&status.stdout).contains(" installed")
                || by_rpm
                || Path::new(PIN_DIR).exists())
            .then(|| "netpol is already installed (or /sys/fs/bpf/netpol exists) on this host; not touching it".to_string())
        })
}

// ---------------------------------------------------------------- package builds

/// `make TARGET PROFILE=…` in the source tree; the packages land in dist/.
fn make(target: &str) -> Result<(), String> {
    let out = Command::new("make")
        .arg("-C")
        .arg(src_dir())
        .arg(target)
        .arg(format!("PROFILE={}", profile()))
        // cargo test's own library path, which no one running `make` has (and
        // dpkg-shlibdeps warns about)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .map_err(|e| format!("cannot run make: {e}"))?;
    // dpkg-buildpackage and its helpers warn about options `make deb` passes
    // wrongly (issue 19: --buildinfo-option=-O): none may.
    let warnings: Vec<&str> = std::str::from_utf8(&out.stderr)
        .unwrap_or("")
        .lines()
        .chain(std::str::from_utf8(&out.stdout).unwrap_or("").lines())
        .filter(|l| l.starts_with("dpkg-") && l.contains(": warning:"))
        .collect();
    if !warnings.is_empty() {
        return Err(format!("make {target} warns:\n{}", warnings.join("\n")));
    }
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "make {target} failed ({}):\n{}",
            out.status,
            text(&out)
        ))
    }
}

fn find_in_dist(pred: impl Fn(&str) -> bool) -> Result<PathBuf, String> {
    let dist = src_dir().join("dist");
    let mut found: Vec<PathBuf> = fs::read_dir(&dist)
        .map_err(|e| format!("{}: {e}", dist.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pred))
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| format!("no package in {}", dist.display()))
}

/// The .deb, built once per test binary.
fn deb() -> PathBuf {
    static DEB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DEB.get_or_init(|| {
        make("deb")?;
        let version = env!("CARGO_PKG_VERSION");
        find_in_dist(|n| n.starts_with(&format!("netpol_{version}_")) && n.ends_with(".deb"))
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

fn rpm() -> PathBuf {
    static RPM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    RPM.get_or_init(|| {
        make("rpm")?;
        let version = env!("CARGO_PKG_VERSION");
        find_in_dist(|n| n.starts_with(&format!("netpol-{version}-")) && n.ends_with(".rpm"))
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

const BUILD_TOOLS: [&str; 5] = ["make", "cargo", "dpkg-buildpackage", "dh", "dpkg-deb"];

// ---------------------------------------------------------------- .rpm vs .deb

/// A package path as both formats should agree on it: merged /usr, manual pages
/// and documents compressed or not.
fn normalize(path: &str) -> String {
    let p = path.trim_start_matches('.');
    let p = match p.strip_prefix("/lib/") {
        Some(rest) => format!("/usr/lib/{rest}"),
        None => p.to_string(),
    };
    p.strip_suffix(".gz").map(str::to_string).unwrap_or(p)
}

/// Debian-only files (dpkg's changelog and copyright file, lintian's overrides).
fn debian_only(path: &str) -> bool {
    matches!(
        path,
        "/usr/share/doc/netpol/changelog"
            | "/usr/share/doc/netpol/copyright"
            | "/usr/share/lintian/overrides/netpol"
    )
}

/// (files and links, directories) of the .deb.
fn deb_contents(deb: &Path) -> (Vec<String>, Vec<String>) {
    let listing = run_ok(Command::new("dpkg-deb").arg("-c").arg(deb));
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 {
            continue;
        }
        let path = fields[5];
        if fields[0].starts_with('d') {
            dirs.push(normalize(path.trim_end_matches('/')));
        } else {
            files.push(normalize(path));
        }
    }
    files.retain(|f| !debian_only(f));
    files.sort();
    dirs.sort();
    (files, dirs)
}

fn rpm_contents(rpm: &Path) -> (Vec<String>, Vec<String>) {
    let listing = run_ok(
        Command::new("rpm")
            .args(["-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]"])
            .arg(rpm),
    );
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    for line in listing.lines() {
        let Some((mode, path)) = line.split_once(' ') else {
            continue;
        };
        if mode.starts_with('d') {
            dirs.push(normalize(path));
        } else {
            files.push(normalize(path));
        }
    }
    files.sort();
    dirs.sort();
    (files, dirs)
}

fn deb_control_file(deb: &Path, name: &str) -> String {
    run_ok(Command::new("dpkg-deb").arg("-I").arg(deb).arg(name))
}

/// The rpm's scriptlets, by name ("postinstall", "preuninstall", "postuninstall").
fn rpm_scriptlet(all: &str, name: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in all.lines() {
        if line.ends_with("scriptlet (using /bin/sh):") {
            inside = line.starts_with(&format!("{name} scriptlet"));
            continue;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn assert_contains_any(what: &str, script: &str, needles: &[&str]) {
    assert!(
        needles.iter().any(|n| script.contains(n)),
        "{what}: expected one of {needles:?} in:\n{script}"
    );
}

#[test]
fn rpm_matches_deb() {
    const TEST: &str = "rpm_matches_deb";
    let Some(_turn) = Needs::nothing()
        .tools(&BUILD_TOOLS)
        .tools(&["rpmbuild", "rpm"])
        .check(TEST)
    else {
        return;
    };
    let deb = deb();
    let rpm = rpm();

    // Same files, same owned configuration directories.
    let (deb_files, deb_dirs) = deb_contents(&deb);
    let (rpm_files, rpm_dirs) = rpm_contents(&rpm);
    assert_eq!(
        deb_files,
        rpm_files,
        "files of {} vs {}",
        deb.display(),
        rpm.display()
    );
    for dir in [
        "/etc/netpol",
        "/etc/netpol.d",
        "/etc/netpol/endpoints.d",
        "/usr/share/doc/netpol/examples",
    ] {
        assert!(
            deb_dirs.iter().any(|d| d == dir),
            "the .deb lacks directory {dir}: {deb_dirs:?}"
        );
        assert!(
            rpm_dirs.iter().any(|d| d == dir),
            "the .rpm lacks directory {dir}: {rpm_dirs:?}"
        );
    }
    for must in [
        "/usr/sbin/netpold",
        "/usr/bin/netpolctl",
        "/usr/lib/systemd/system/netpold.service",
        "/etc/netpol/netpold.toml",
        "/usr/share/man/man8/netpold.8",
        "/usr/share/man/man8/netpolctl.8",
        "/usr/share/doc/netpol/examples/seed/endpoints.d/seed.yaml",
    ] {
        assert!(
            deb_files.iter().any(|f| f == must),
            "{must} missing from the packages: {deb_files:?}"
        );
    }

    // /etc files are conffiles / %config(noreplace).
    let mut deb_conf: Vec<String> = deb_control_file(&deb, "conffiles")
        .lines()
        .map(str::to_string)
        .collect();
    let mut rpm_conf: Vec<String> = run_ok(Command::new("rpm").arg("-qpc").arg(&rpm))
        .lines()
        .map(str::to_string)
        .collect();
    deb_conf.sort();
    rpm_conf.sort();
    assert_eq!(deb_conf, rpm_conf, "conffiles");
    assert_eq!(deb_conf, vec!["/etc/netpol/netpold.toml".to_string()]);
    let noreplace = run_ok(
        Command::new("rpm")
            .args(["-qp", "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]"])
            .arg(&rpm),
    );
    assert!(
        noreplace
            .lines()
            .any(|l| l.ends_with(" /etc/netpol/netpold.toml")
                && l.contains('c')
                && l.contains('n')),
        "/etc/netpol/netpold.toml is not %config(noreplace):\n{noreplace}"
    );

    // Runtime dependencies: libelf and zlib on both.
    let control = deb_control_file(&deb, "control");
    let depends = control
        .lines()
        .find(|l| l.starts_with("Depends:"))
        .unwrap_or_default()
        .to_string();
    for d in ["libelf1", "zlib1g"] {
        assert!(
            depends.contains(d),
            "the .deb does not depend on {d}: {depends}"
        );
    }
    let requires = run_ok(Command::new("rpm").arg("-qpR").arg(&rpm));
    for r in ["elfutils-libelf", "zlib"] {
        assert!(
            requires.lines().any(|l| l.trim() == r),
            "the .rpm does not require {r}:\n{requires}"
        );
    }

    // Scriptlets: the same life cycle in each format's idiom.
    let postinst = deb_control_file(&deb, "postinst");
    let prerm = deb_control_file(&deb, "prerm");
    let postrm = deb_control_file(&deb, "postrm");
    let scripts = run_ok(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm));
    let post = rpm_scriptlet(&scripts, "postinstall");
    let preun = rpm_scriptlet(&scripts, "preuninstall");
    let postun = rpm_scriptlet(&scripts, "postuninstall");

    // Install: the unit is registered with systemd (enabled / preset).
    assert_contains_any(
        "deb postinst enables",
        &postinst,
        &["deb-systemd-helper enable 'netpold.service'"],
    );
    assert_contains_any(
        "deb postinst starts",
        &postinst,
        &["deb-systemd-invoke $_dh_action 'netpold.service'"],
    );
    assert_contains_any(
        "rpm %post registers",
        &post,
        &[
            "preset netpold.service",
            "install-system-units netpold.service",
        ],
    );
    // Removal: stopped.
    assert_contains_any(
        "deb prerm stops",
        &prerm,
        &["deb-systemd-invoke stop 'netpold.service'"],
    );
    assert_contains_any(
        "rpm %preun stops",
        &preun,
        &[
            "disable --now netpold.service",
            "remove-system-units netpold.service",
        ],
    );
    // Upgrade: restarted, not stopped.
    assert_contains_any(
        "deb postinst restarts on upgrade",
        &postinst,
        &["_dh_action=restart"],
    );
    assert_contains_any(
        "rpm %postun restarts on upgrade",
        &postun,
        &[
            "try-restart netpold.service",
            "mark-restart-system-units netpold.service",
        ],
    );
    // Removal: enforcement detached, pins and state removed.
    for (what, script) in [("deb prerm", &prerm), ("rpm %preun", &preun)] {
        assert_contains_any(
            &format!("{what} detaches"),
            script,
            &["/usr/sbin/netpold --detach"],
        );
    }
    for (what, script) in [("deb postrm", &postrm), ("rpm %postun", &postun)] {
        assert_contains_any(
            &format!("{what} removes pins"),
            script,
            &["/sys/fs/bpf/netpol"],
        );
        assert_contains_any(
            &format!("{what} removes state"),
            script,
            &["/var/lib/netpol"],
        );
    }
}

// ---------------------------------------------------------------- systemd in namespaces

/// A real systemd, PID 1 of its own PID/mount/UTS namespaces, in netns `npk-node`.
struct Systemd {
    unshare: Child,
    /// systemd's PID as the host sees it.
    pid: u32,
    log: PathBuf,
}

impl Systemd {
    fn boot() -> Systemd {
        let log = std::env::temp_dir().join(format!("npk-systemd-{}.log", std::process::id()));
        let logf = fs::File::create(&log).expect("create systemd log");
        let tests = fixtures("packaging");
        let mut unshare = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{NODE}"))
            .args([
                "unshare",
                "--fork",
                "--pid",
                "--mount",
                "--uts",
                "--mount-proc",
                "--propagation",
                "private",
            ])
            .arg(tests.join("boot-systemd.sh"))
            .arg(tests.join("units"))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf)
            .spawn()
            .expect("spawn unshare");
        let upid = unshare.id();
        let mut pid = None;
        wait_for("unshare's child", Duration::from_secs(10), || {
            pid = fs::read_to_string(format!("/proc/{upid}/task/{upid}/children"))
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()));
            pid.is_some()
        });
        let Some(pid) = pid else {
            let _ = unshare.kill();
            let _ = unshare.wait();
            panic!(
                "systemd did not start:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        };
        let sd = Systemd { unshare, pid, log };
        let up = wait_for("systemd to be running", Duration::from_secs(30), || {
            let out = sd.exec(&["systemctl", "is-system-running"]);
            matches!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "running" | "degraded"
            )
        });
        assert!(
            up,
            "systemd in the namespaces did not come up:\n{}\n{}",
            fs::read_to_string(&sd.log).unwrap_or_default(),
            text(&sd.exec(&["systemctl", "list-jobs", "--no-pager"]))
        );
        sd
    }

    /// A command inside systemd's namespaces (mount: its /run; PID: its processes).
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.pid.to_string())
            .args(["-m", "-p", "--"])
            .args(args);
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c.env("SYSTEMD_PAGER", "");
        c
    }

    fn exec(&self, args: &[&str]) -> Output {
        run(&mut self.command(args))
    }

    fn exec_ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.command(args))
    }

    fn is_active(&self, unit: &str) -> String {
        String::from_utf8_lossy(&self.exec(&["systemctl", "is-active", unit]).stdout)
            .trim()
            .to_string()
    }

    fn journal(&self) -> String {
        text(&self.exec(&["journalctl", "--no-pager", "-u", "netpold.service"]))
    }

    /// What to show when something about the service is wrong.
    fn diagnose(&self) -> String {
        format!(
            "--- systemctl status netpold\n{}\n--- journalctl -u netpold\n{}",
            text(&self.exec(&["systemctl", "status", "--no-pager", "-l", "netpold.service"])),
            self.journal()
        )
    }

    /// dpkg, retrying while another dpkg/apt holds the lock.
    fn dpkg(&self, args: &[&str]) -> Output {
        let mut full = vec!["dpkg"];
        full.extend_from_slice(args);
        let start = Instant::now();
        loop {
            let out = self.exec(&full);
            let locked = !out.status.success() && text(&out).contains("lock");
            if !locked || start.elapsed() > Duration::from_secs(180) {
                return out;
            }
            thread::sleep(Duration::from_secs(2));
        }
    }

    fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    /// netpolctl status --json as the daemon answers it.
    fn status(&self) -> Option<serde_json::Value> {
        let out = self.exec(&["netpolctl", "status", "--json"]);
        serde_json::from_slice(&out.stdout).ok()
    }

    fn generation(&self) -> Option<u64> {
        self.status()
            .and_then(|s| s.get("generation").and_then(|g| g.as_u64()))
    }

    /// Wait until the daemon applies a generation newer than `after`.
    fn wait_generation(&self, after: Option<u64>) {
        let ok = wait_for("a new generation", Duration::from_secs(20), || {
            match (self.generation(), after) {
                (Some(g), Some(a)) => g > a,
                (Some(_), None) => true,
                _ => false,
            }
        });
        assert!(
            ok,
            "netpold applied no new generation (status: {:?})\n{}",
            self.status(),
            self.diagnose()
        );
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        // SIGKILL to a PID namespace's init ends every process in it.
        let _ = Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .status();
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        let _ = fs::remove_file(&self.log);
    }
}

// ---------------------------------------------------------------- the lab

/// Everything the lifecycle test makes, removed again in Drop (also on failure).
struct Lab {
    systemd: Option<Systemd>,
    /// dpkg -i was attempted: purge in Drop.
    installed: bool,
    /// rpm -i was attempted: erase in Drop.
    installed_rpm: bool,
    files: Vec<PathBuf>,
    _listeners: Vec<Listeners>,
    topo: Option<Topo>,
    net: Netns,
}

impl Lab {
    fn new() -> Lab {
        Lab {
            systemd: None,
            installed: false,
            installed_rpm: false,
            files: Vec::new(),
            _listeners: Vec::new(),
            topo: None,
            net: Netns::default(),
        }
    }

    fn sd(&self) -> &Systemd {
        self.systemd.as_ref().expect("systemd is running")
    }

    /// Only npk-node, where systemd and the daemon run.
    fn node(&mut self) {
        self.net.add(NODE);
    }

    /// npk-node with bridge npk-br0; each workload in its own netns behind a veth
    /// whose host side (the enforcement point) is in npk-node; TCP listeners on
    /// every port of the scenario.
    fn network(&mut self) {
        let workloads = WORKLOADS
            .iter()
            .map(|(ns, _, v4, v6)| (ns.to_string(), vec![format!("{v4}/24"), format!("{v6}/64")]))
            .collect();
        let names = Names {
            node: NODE.into(),
            bridge: BRIDGE.into(),
            ns_prefix: String::new(),
            dev_prefix: String::new(),
        };
        self.topo = Some(Topo::build(names, &[], workloads));
        for (ns, ..) in WORKLOADS {
            self._listeners.push(Listeners::accepting(ns, &PORTS));
        }
    }

    /// Boot systemd in npk-node and install the .deb there (the guard purges it);
    /// the package's path, for an upgrade.
    fn boot_and_install(&mut self, deb: &Path) -> String {
        self.systemd = Some(Systemd::boot());
        self.installed = true;
        let deb_path = deb.to_string_lossy().into_owned();
        let out = self.sd().dpkg(&["-i", &deb_path]);
        assert!(out.status.success(), "dpkg -i failed:\n{}", text(&out));
        deb_path
    }

    /// Write a file under /etc (through the guard, which removes it again).
    fn put(&mut self, path: &Path, content: &str) {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(
            name.starts_with(FILE_PREFIX),
            "test files are named {FILE_PREFIX}*: {}",
            path.display()
        );
        // Written aside and renamed in, as an editor or package manager does.
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        let mut f = fs::File::create(&tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
        f.write_all(content.as_bytes()).expect("write");
        drop(f);
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::rename(&tmp, path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if !self.files.contains(&path.to_path_buf()) {
            self.files.push(path.to_path_buf());
        }
    }

    fn remove(&mut self, path: &Path) {
        let _ = fs::remove_file(path);
        self.files.retain(|f| f != path);
    }

    fn remove_files(&mut self) {
        for f in self.files.drain(..) {
            let _ = fs::remove_file(f);
        }
    }

    fn rpm_erase(&mut self) -> Output {
        self.remove_files();
        let out = match &self.systemd {
            Some(sd) if sd.alive() => sd.exec(&["rpm", "-e", "netpol"]),
            _ => run(&mut cmd("rpm", &["-e", "netpol"])),
        };
        self.installed_rpm = false;
        out
    }

    fn purge(&mut self) -> Output {
        self.remove_files();
        let out = match &self.systemd {
            Some(sd) if sd.alive() => sd.dpkg(&["-P", "netpol"]),
            _ => run(&mut cmd("dpkg", &["-P", "netpol"])),
        };
        self.installed = false;
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.installed {
            let out = self.purge();
            if !out.status.success() {
                eprintln!("cleanup: dpkg -P netpol failed:\n{}", text(&out));
            }
            let _ = fs::remove_dir_all(PIN_DIR);
        }
        if self.installed_rpm {
            let out = self.rpm_erase();
            if !out.status.success() {
                eprintln!("cleanup: rpm -e netpol failed:\n{}", text(&out));
            }
            let _ = fs::remove_dir_all(PIN_DIR);
            for dir in ["/etc/netpol/endpoints.d", "/etc/netpol", "/etc/netpol.d"] {
                let _ = fs::remove_dir(dir); // only when empty
            }
        }
        let _ = fs::remove_dir_all(PROBE_PIN_DIR);
        self.remove_files();
        self.systemd = None; // kills it; the listeners and namespaces go after it
    }
}

// ---------------------------------------------------------------- traffic

fn workload(name: &str) -> (&'static str, &'static str, &'static str, &'static str) {
    *WORKLOADS
        .iter()
        .find(|w| w.1 == name)
        .unwrap_or_else(|| panic!("no workload {name}"))
}

/// Does a TCP connection from workload `from` to `to`:`port` get established?
fn connects(from: &str, to: &str, port: u16, v6: bool, timeout: Duration) -> bool {
    let (ns, ..) = workload(from);
    let (_, _, v4, v6addr) = workload(to);
    let ip: IpAddr = if v6 { v6addr } else { v4 }.parse().expect("address");
    probe::connects(ns, ip, port, timeout)
}

/// (from, to, port, expected) after both seed policies are in force.
const SEED_VERDICTS: [(&str, &str, u16, bool); 8] = [
    ("frontend-1", "backend", 80, true),
    ("frontend-2", "backend", 80, true),
    ("frontend-1", "backend", 81, false),
    ("database", "backend", 80, false),
    ("frontend-1", "database", 5432, false),
    ("frontend-2", "database", 80, false),
    ("database", "frontend-1", 80, true),
    ("backend", "database", 5432, true),
];

fn check_verdicts(sd: &Systemd, when: &str, verdicts: &[(&str, &str, u16, bool)]) {
    let mut wrong = Vec::new();
    for &(from, to, port, expected) in verdicts {
        for v6 in [false, true] {
            // Allowed: generous timeout; denied: a dropped SYN just times out.
            let timeout = Duration::from_millis(if expected { 3000 } else { 700 });
            let got = connects(from, to, port, v6, timeout);
            if got != expected {
                let fam = if v6 { "IPv6" } else { "IPv4" };
                wrong.push(format!(
                    "{from} -> {to}:{port} ({fam}): expected {}, got {}",
                    verdict(expected),
                    verdict(got)
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{when}: wrong verdicts:\n  {}\n{}",
        wrong.join("\n  "),
        sd.diagnose()
    );
}

fn verdict(allowed: bool) -> &'static str {
    if allowed {
        "allowed"
    } else {
        "denied"
    }
}

/// While `action` runs (and a second after), new connections keep their verdicts:
/// database -> backend:80 never connects, frontend-1 -> backend:80 always does; and
/// the action replaced the daemon process.
fn enforcement_holds_across(sd: &Systemd, what: &str, action: impl FnOnce()) {
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        thread::spawn(move || {
            let (mut probes, mut leaked, mut refused) = (0u32, 0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                probes += 1;
                if connects("database", "backend", 80, false, Duration::from_millis(300)) {
                    leaked += 1;
                }
                if !connects(
                    "frontend-1",
                    "backend",
                    80,
                    false,
                    Duration::from_millis(1000),
                ) {
                    refused += 1;
                }
            }
            (probes, leaked, refused)
        })
    };
    thread::sleep(Duration::from_millis(500));
    let main_pid = || {
        sd.exec_ok(&[
            "systemctl",
            "show",
            "-p",
            "MainPID",
            "--value",
            "netpold.service",
        ])
        .trim()
        .to_string()
    };
    let old_pid = main_pid();
    action();
    let active = wait_for(
        "netpold to be active again",
        Duration::from_secs(30),
        || sd.is_active("netpold.service") == "active",
    );
    thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let (probes, leaked, refused) = prober.join().expect("prober");
    assert!(
        active,
        "netpold.service is not active after {what}\n{}",
        sd.diagnose()
    );
    assert_ne!(old_pid, main_pid(), "netpold was not restarted by {what}");
    assert!(probes >= 3, "only {probes} probes ran across {what}");
    assert_eq!(
        leaked, 0,
        "database reached backend:80 {leaked} times out of {probes} during {what}"
    );
    assert_eq!(
        refused, 0,
        "frontend-1 could not reach backend:80 {refused} times out of {probes} during {what}"
    );
    check_verdicts(sd, &format!("after {what}"), &SEED_VERDICTS);
}

/// The shipped seed registry with this test's interfaces and addresses.
fn seed_registry() -> String {
    let shipped = fs::read_to_string(src_dir().join("etc/examples/seed/endpoints.d/seed.yaml"))
        .expect("seed registry");
    let mut out = shipped;
    for (from, to) in [
        ("veth-fe1", "npk-fe1"),
        ("veth-fe2", "npk-fe2"),
        ("veth-be", "npk-be"),
        ("veth-db", "npk-db"),
        ("10.0.1.", "10.203.1."),
        ("fd00:1::", "fd00:203::"),
    ] {
        out = out.replace(from, to);
    }
    for (ns, _, v4, _) in WORKLOADS {
        assert!(
            out.contains(ns) && out.contains(v4),
            "seed registry changed shape: {ns} {v4} not found in\n{out}"
        );
    }
    out
}

// ---------------------------------------------------------------- the lifecycle

#[test]
fn deb_lifecycle_under_systemd() {
    const TEST: &str = "deb_lifecycle_under_systemd";
    let Some(_host) = host_needs(&[]).check(TEST) else {
        return;
    };

    let deb = deb();
    let mut lab = Lab::new();
    lab.network();

    // ---- install: enabled, started, active, the unit verifies
    let deb_path = lab.boot_and_install(&deb);
    let sd = lab.sd();
    assert_eq!(
        String::from_utf8_lossy(
            &sd.exec(&["systemctl", "is-enabled", "netpold.service"])
                .stdout
        )
        .trim(),
        "enabled"
    );
    let active = wait_for("netpold to be active", Duration::from_secs(30), || {
        sd.is_active("netpold.service") == "active"
    });
    assert!(
        active,
        "netpold.service is not active after dpkg -i\n{}",
        sd.diagnose()
    );
    sd.exec_ok(&[
        "systemd-analyze",
        "verify",
        "--man=no",
        "/lib/systemd/system/netpold.service",
    ]);
    let security = text(&sd.exec(&[
        "systemd-analyze",
        "security",
        "--no-pager",
        "netpold.service",
    ]));
    let score: f64 = security
        .lines()
        .find_map(|l| l.split("netpold.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{security}"));
    eprintln!("systemd-analyze security netpold.service: {score}");
    assert!(score <= 2.5, "exposure level {score} > 2.5:\n{security}");

    // ---- no policy yet: everything connects
    let endpoints = PathBuf::from("/etc/netpol/endpoints.d/npk-seed.yaml");
    let policies = PathBuf::from("/etc/netpol.d");
    let g0 = sd.generation();
    lab.put(&endpoints, &seed_registry());
    let sd = lab.sd();
    sd.wait_generation(g0);
    check_verdicts(
        sd,
        "registry only, no policy",
        &[
            ("database", "backend", 80, true),
            ("frontend-1", "database", 5432, true),
        ],
    );

    // ---- the seed policies
    let g1 = sd.generation();
    for p in ["frontend-to-backend.yaml", "frontend-egress-control.yaml"] {
        let content = fs::read_to_string(src_dir().join("etc/examples/seed/netpol.d").join(p))
            .expect("seed policy");
        lab.put(&policies.join(format!("{FILE_PREFIX}{p}")), &content);
    }
    let sd = lab.sd();
    sd.wait_generation(g1);
    // Both files may land in one generation or two: wait until nothing is pending.
    thread::sleep(Duration::from_millis(500));
    check_verdicts(sd, "seed policies", &SEED_VERDICTS);

    // ---- a reload with a broken file fails, says why, and changes nothing
    let broken = policies.join(format!("{FILE_PREFIX}broken.yaml"));
    lab.put(
        &broken,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: broken}\nspec:\n  endpointSelector: {}\n  ingress:\n    - toPorts: [{ports: [{port: \"99999\", protocol: TCP}]}]\n",
    );
    let sd = lab.sd();
    let reload = sd.exec(&["systemctl", "reload", "netpold.service"]);
    assert!(
        !reload.status.success(),
        "systemctl reload succeeded with a broken file:\n{}",
        text(&reload)
    );
    let journal = sd.journal();
    assert!(
        journal.contains("npk-broken.yaml") && journal.contains("99999"),
        "the journal does not say why the reload failed:\n{journal}"
    );
    assert_eq!(
        sd.is_active("netpold.service"),
        "active",
        "{}",
        sd.diagnose()
    );
    check_verdicts(sd, "after the failed reload", &SEED_VERDICTS);
    lab.remove(&broken);
    let sd = lab.sd();
    let reload = sd.exec(&["systemctl", "reload", "netpold.service"]);
    assert!(
        reload.status.success(),
        "systemctl reload failed with valid files:\n{}\n{}",
        text(&reload),
        sd.diagnose()
    );
    check_verdicts(sd, "after a good reload", &SEED_VERDICTS);

    // ---- a restart keeps enforcement throughout
    enforcement_holds_across(sd, "systemctl restart", || {
        sd.exec_ok(&["systemctl", "restart", "netpold.service"]);
    });

    // ---- so does an upgrade (the same package again: prerm upgrade, postinst
    // configure with the old version, which restarts the daemon)
    enforcement_holds_across(sd, "an upgrade with dpkg -i", || {
        let out = sd.dpkg(&["-i", &deb_path]);
        assert!(
            out.status.success(),
            "dpkg -i (upgrade) failed:\n{}",
            text(&out)
        );
    });

    // ---- the journal has the daemon's own lines (not only systemd's)
    let own = sd.exec_ok(&[
        "journalctl",
        "--no-pager",
        "-o",
        "cat",
        "_SYSTEMD_UNIT=netpold.service",
        "_COMM=netpold",
    ]);
    assert!(
        own.lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with("-- ")),
        "no lines from netpold itself in the journal:\n{}",
        sd.journal()
    );

    // ---- purge: stopped, nothing left in the kernel or on disk
    let out = lab.purge();
    assert!(out.status.success(), "dpkg -P failed:\n{}", text(&out));
    let sd = lab.sd();
    let state = sd.is_active("netpold.service");
    assert!(
        state == "inactive" || state == "unknown" || state == "failed",
        "netpold.service is {state} after purge"
    );
    let procs = text(&sd.exec(&["ps", "-e", "-o", "comm="]));
    assert!(
        !procs.lines().any(|l| l.trim() == "netpold"),
        "netpold still runs after purge:\n{procs}"
    );
    assert!(
        !Path::new(PIN_DIR).exists(),
        "{PIN_DIR} is left after purge"
    );
    for path in [
        "/etc/netpol",
        "/etc/netpol.d",
        "/var/lib/netpol",
        "/usr/sbin/netpold",
        "/lib/systemd/system/netpold.service",
    ] {
        assert!(!Path::new(path).exists(), "{path} is left after purge");
    }
    assert!(
        fs::symlink_metadata("/etc/systemd/system/multi-user.target.wants/netpold.service")
            .is_err(),
        "the enable symlink is left after purge"
    );
    for (ns, ..) in WORKLOADS {
        let qdisc = run_ok(&mut cmd("tc", &["-n", NODE, "qdisc", "show", "dev", ns]));
        assert!(
            !qdisc.contains("clsact"),
            "{ns} keeps a clsact qdisc after purge:\n{qdisc}"
        );
        if have("bpftool") {
            let net = ip(&["netns", "exec", NODE, "bpftool", "net", "show", "dev", ns]);
            assert!(
                !net.contains("tcx/") && !net.contains("clsact/"),
                "{ns} keeps BPF programs after purge:\n{net}"
            );
        }
    }
    check_verdicts(
        sd,
        "after purge (nothing enforced)",
        &[
            ("database", "backend", 80, true),
            ("frontend-1", "database", 5432, true),
            ("frontend-1", "backend", 81, true),
        ],
    );
}

// ---------------------------------------------------------------- the sandbox allows BPF

/// The installed unit, with only ExecStart= replaced by tests/packaging/bpf-probe.sh,
/// creates a pin directory (/sys/fs/bpf/npk-probe: the daemon's own pins stay where
/// it left them when the package's start ran it), loads and pins a tc program with the daemon's map
/// types, updates a map and attaches with clsact: the hardening leaves BPF working.
/// Independent of the daemon, so it holds the unit to account on its own.
#[test]
fn unit_sandbox_allows_bpf() {
    const TEST: &str = "unit_sandbox_allows_bpf";
    let Some(_host) = host_needs(&["clang"]).check(TEST) else {
        return;
    };
    let tests = fixtures("packaging");
    let obj = std::env::temp_dir().join(format!("npk-bpf-probe-{}.o", std::process::id()));
    run_ok(
        Command::new("clang")
            .args([
                "-O2",
                "-g",
                "-Wall",
                "-Werror",
                "-target",
                "bpf",
                "-I/usr/include/x86_64-linux-gnu",
                "-c",
            ])
            .arg(tests.join("bpf-probe.bpf.c"))
            .arg("-o")
            .arg(&obj),
    );

    let deb = deb();
    let mut lab = Lab::new();
    lab.node();
    ip(&[
        "-n", NODE, "link", "add", "npk-pb0", "type", "veth", "peer", "name", "npk-pb1",
    ]);
    ip(&["-n", NODE, "link", "set", "npk-pb0", "up"]);
    lab.boot_and_install(&deb);
    let sd = lab.sd();
    let _ = sd.exec(&["systemctl", "stop", "netpold.service"]);
    let _ = fs::remove_dir_all(PROBE_PIN_DIR);

    // In systemd's private /run: the service has PrivateTmp= and ProtectHome=.
    let setup = format!(
        "set -e; mkdir -p /run/npk-probe /run/npk-units/netpold.service.d; \
         cp '{obj}' /run/npk-probe/probe.o; cp '{script}' /run/npk-probe/bpf-probe.sh; \
         printf '[Service]\\nType=oneshot\\nExecStart=\\nExecStart=/run/npk-probe/bpf-probe.sh /run/npk-probe/probe.o npk-pb0\\nExecReload=\\nRestart=no\\nWatchdogSec=0\\n' \
           > /run/npk-units/netpold.service.d/probe.conf",
        obj = obj.display(),
        script = tests.join("bpf-probe.sh").display()
    );
    sd.exec_ok(&["sh", "-c", &setup]);
    let _ = fs::remove_file(&obj);
    sd.exec_ok(&["systemctl", "daemon-reload"]);
    let start = sd.exec(&["systemctl", "start", "netpold.service"]);
    // A fresh systemd: the unit's journal holds only this test's runs.
    let log = text(&sd.exec(&[
        "journalctl",
        "--no-pager",
        "-o",
        "cat",
        "-u",
        "netpold.service",
    ]));
    assert!(
        start.status.success() && log.lines().any(|l| l.trim() == "probe: ok"),
        "BPF does not work inside netpold.service's sandbox:\n{}\n{log}\n{}",
        text(&start),
        sd.diagnose()
    );
    eprintln!("{log}");
}

// ---------------------------------------------------------------- the .rpm's scriptlets, for real

/// `rpm -i` under the same systemd: %post registers the unit with systemd (preset),
/// the daemon starts and enforces; `rpm -e` stops it (%preun), detaches and removes
/// the pins and state (%preun, %postun), and leaves nothing behind.
#[test]
fn rpm_lifecycle_under_systemd() {
    const TEST: &str = "rpm_lifecycle_under_systemd";
    let Some(_host) = host_needs(&["rpm", "rpmbuild"]).check(TEST) else {
        return;
    };
    let rpm = rpm();
    let mut lab = Lab::new();
    lab.node();
    ip(&[
        "-n", NODE, "link", "add", "npk-r0", "type", "veth", "peer", "name", "npk-r1",
    ]);
    ip(&["-n", NODE, "link", "set", "npk-r0", "up"]);
    lab.systemd = Some(Systemd::boot());
    lab.installed_rpm = true;
    let rpm_path = rpm.to_string_lossy().into_owned();
    // --nodeps: Debian's rpm database knows none of the system's libraries.
    let sd = lab.sd();
    let out = sd.exec(&["rpm", "-i", "--nodeps", &rpm_path]);
    assert!(out.status.success(), "rpm -i failed:\n{}", text(&out));
    let enabled = String::from_utf8_lossy(
        &sd.exec(&["systemctl", "is-enabled", "netpold.service"])
            .stdout,
    )
    .trim()
    .to_string();
    assert!(
        enabled == "enabled" || enabled == "disabled",
        "%post did not hand the unit to systemd's presets (is-enabled: {enabled:?})"
    );
    sd.exec_ok(&["systemctl", "start", "netpold.service"]);
    assert_eq!(
        sd.is_active("netpold.service"),
        "active",
        "{}",
        sd.diagnose()
    );

    // One endpoint on npk-r0 under a default-deny policy: something to detach.
    let g = sd.generation();
    lab.put(
        Path::new("/etc/netpol/endpoints.d/npk-r.yaml"),
        "apiVersion: netpol/v1\nkind: Endpoint\nmetadata: {name: npk-r, labels: {app: npk-r}}\nspec:\n  interface: npk-r0\n  addresses: [10.203.9.1]\n",
    );
    lab.put(
        Path::new("/etc/netpol.d/npk-r.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: npk-r}\nspec:\n  endpointSelector: {matchLabels: {app: npk-r}}\n  ingress: [{}]\n",
    );
    let sd = lab.sd();
    sd.wait_generation(g);
    let endpoints = text(&sd.exec(&["netpolctl", "endpoints"]));
    assert!(
        endpoints.contains("npk-r0") && endpoints.contains("attached"),
        "npk-r0 is not enforced:\n{endpoints}\n{}",
        sd.diagnose()
    );
    assert!(
        Path::new(PIN_DIR).exists(),
        "no pins under {PIN_DIR} while enforcing"
    );

    let out = lab.rpm_erase();
    assert!(out.status.success(), "rpm -e failed:\n{}", text(&out));
    let sd = lab.sd();
    let state = sd.is_active("netpold.service");
    assert!(
        state == "inactive" || state == "unknown" || state == "failed",
        "netpold.service is {state} after rpm -e"
    );
    let procs = text(&sd.exec(&["ps", "-e", "-o", "comm="]));
    assert!(
        !procs.lines().any(|l| l.trim() == "netpold"),
        "netpold still runs after rpm -e:\n{procs}"
    );
    for path in [
        PIN_DIR,
        "/var/lib/netpol",
        "/usr/sbin/netpold",
        "/usr/lib/systemd/system/netpold.service",
        "/etc/netpol/netpold.toml",
    ] {
        assert!(!Path::new(path).exists(), "{path} is left after rpm -e");
    }
    let qdisc = run_ok(&mut cmd(
        "tc",
        &["-n", NODE, "qdisc", "show", "dev", "npk-r0"],
    ));
    assert!(
        !qdisc.contains("clsact"),
        "npk-r0 keeps a clsact qdisc after rpm -e:\n{qdisc}"
    );
    for dir in ["/etc/netpol/endpoints.d", "/etc/netpol", "/etc/netpol.d"] {
        let _ = fs::remove_dir(dir);
    }
}

// ---------------------------------------------------------------- man pages vs the CLI

/// Long options (`--name`) in a clap help text, without --help and --version.
fn help_options(help: &str) -> Vec<String> {
    let mut out: Vec<String> = help
        .lines()
        .flat_map(|l| l.split(|c: char| c.is_whitespace() || c == ',' || c == '['))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .filter(|w| w != "--help" && w != "--version")
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Long options a roff page mentions (`\-\-name`).
fn man_options(page: &str) -> Vec<String> {
    let mut out: Vec<String> = page
        .split("\\-\\-")
        .skip(1)
        .map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '\\' || *c == '-')
                .collect();
            format!("--{}", name.replace("\\-", "-"))
        })
        .filter(|o| o != "--help" && o != "--version" && o.len() > 2)
        .collect();
    out.sort();
    out.dedup();
    out
}

fn help_of(bin: &str, args: &[&str]) -> String {
    run_ok(Command::new(bin).args(args).arg("--help"))
}

/// man/netpolctl.8 and man/netpold.8 are hand-written: hold them to the binaries'
/// own --help, both ways (no command or option missing, none invented).
#[test]
fn man_pages_match_the_cli() {
    let ctl = NETPOLCTL;
    let daemon = NETPOLD;
    let ctl_page = fs::read_to_string(src_dir().join("man/netpolctl.8")).expect("man/netpolctl.8");
    let daemon_page = fs::read_to_string(src_dir().join("man/netpold.8")).expect("man/netpold.8");

    // Subcommands: `netpolctl --help` vs the SYNOPSIS lines `.B netpolctl NAME`.
    let top = help_of(ctl, &[]);
    let mut commands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    commands.sort();
    let mut documented: Vec<String> = ctl_page
        .lines()
        .filter_map(|l| l.strip_prefix(".B netpolctl "))
        .filter_map(|rest| rest.split_whitespace().next().map(str::to_string))
        .collect();
    documented.sort();
    documented.dedup();
    assert_eq!(
        commands, documented,
        "netpolctl's commands vs the SYNOPSIS of man/netpolctl.8"
    );

    // Options of every command (registry: of its subcommands).
    let mut options = Vec::new();
    for c in &commands {
        let help = help_of(ctl, &[c]);
        if help.contains("Commands:") {
            for sub in help
                .lines()
                .skip_while(|l| !l.starts_with("Commands:"))
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| l.split_whitespace().next())
                .filter(|s| *s != "help")
            {
                options.extend(help_options(&help_of(ctl, &[c, sub])));
            }
        } else {
            options.extend(help_options(&help));
        }
    }
    options.sort();
    options.dedup();
    assert_eq!(
        options,
        man_options(&ctl_page),
        "netpolctl's options vs man/netpolctl.8"
    );
    assert_eq!(
        help_options(&help_of(daemon, &[])),
        man_options(&daemon_page),
        "netpold's options vs man/netpold.8"
    );
}

// ---------------------------------------------------------------- the install guide, as written

/// One marked fenced block of a guide page (the markers are described at the top
/// of docs/install.md): where it starts, and what to do with it.
#[derive(Debug)]
struct Step {
    /// `page:line` of the fence, for messages.
    at: String,
    kind: StepKind,
    text: String,
}

#[derive(Debug, PartialEq)]
enum StepKind {
    Run { fails: bool },
    Background,
    Output { words: bool, background: bool },
}

/// The marked blocks of `page` (named `name` in messages), in order. A marker
/// not followed by a fenced block, or an unknown marker, is an error in the page.
fn guide_steps(name: &str, page: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut lines = page.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let Some(marker) = line
            .trim()
            .strip_prefix("<!-- test:")
            .and_then(|m| m.strip_suffix("-->"))
        else {
            continue;
        };
        let kind = match marker.split_whitespace().collect::<Vec<_>>()[..] {
            ["run"] => StepKind::Run { fails: false },
            ["run", "fails"] => StepKind::Run { fails: true },
            ["background"] => StepKind::Background,
            ["output"] => StepKind::Output {
                words: false,
                background: false,
            },
            ["output", "words"] => StepKind::Output {
                words: true,
                background: false,
            },
            ["background", "output"] => StepKind::Output {
                words: false,
                background: true,
            },
            _ => panic!("{name}:{}: unknown marker {marker:?}", n + 1),
        };
        let (fence_at, fence) = loop {
            match lines.next() {
                Some((_, l)) if l.trim().is_empty() => continue,
                Some((m, l)) if l.trim_start().starts_with("```") => break (m, l),
                other => panic!(
                    "{name}:{}: marker {marker:?} is not followed by a fenced block but {other:?}",
                    n + 1
                ),
            }
        };
        let indent = fence.len() - fence.trim_start().len();
        let lang = fence.trim().trim_start_matches('`');
        let is_command = !matches!(kind, StepKind::Output { .. });
        assert_eq!(
            lang == "sh",
            is_command,
            "{name}:{}: commands are ```sh blocks, outputs plain ``` blocks",
            fence_at + 1
        );
        let mut text = String::new();
        for (m, l) in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            assert!(
                l.trim().is_empty() || l.len() - l.trim_start().len() >= indent,
                "{name}:{}: block line less indented than its fence",
                m + 1
            );
            text.push_str(l.get(indent..).unwrap_or(""));
            text.push('\n');
        }
        steps.push(Step {
            at: format!("{name}:{}", fence_at + 1),
            kind,
            text,
        });
    }
    steps
}

/// A line of output as the guide shows it and as a run prints it: blanks
/// collapsed, and the values that differ on every run made equal: times
/// (`2026-11-26T07:06:21.060Z`), source ports (`10.0.1.31:55942 ->`),
/// durations (`1.5 ms`) and bpftool's object ids (`2159: ... prog 3491`).
fn normalize_line(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut out = Vec::with_capacity(words.len());
    let number = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_digit());
    for (i, w) in words.iter().enumerate() {
        let next = words.get(i + 1).copied();
        let is_time = w.len() == 24 && w.as_bytes()[10] == b'T' && w.ends_with('Z');
        let w = if is_time {
            "<time>".to_string()
        } else if next == Some("->") {
            match w.rsplit_once(':') {
                Some((addr, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
                    format!("{addr}:<port>")
                }
                _ => w.to_string(),
            }
        } else if next == Some("ms") && w.parse::<f64>().is_ok() {
            "<n>".to_string()
        } else if i == 0 && w.strip_suffix(':').is_some_and(number) {
            "<id>:".to_string()
        } else if i > 0 && words[i - 1] == "prog" && number(w) {
            "<id>".to_string()
        } else {
            w.to_string()
        };
        out.push(w);
    }
    out.join(" ")
}

/// Does `actual` match `expected`, where `...` in `expected` stands for anything?
fn line_matches(expected: &str, actual: &str) -> bool {
    let (expected, actual) = (normalize_line(expected), normalize_line(actual));
    let pieces: Vec<&str> = expected.split("...").map(str::trim).collect();
    let mut rest = actual.as_str();
    for (i, piece) in pieces.iter().enumerate() {
        if piece.is_empty() {
            continue;
        }
        let found = if i == 0 {
            rest.starts_with(piece).then_some(0)
        } else {
            rest.find(piece)
        };
        let Some(at) = found else {
            return false;
        };
        rest = &rest[at + piece.len()..];
    }
    pieces.last().is_some_and(|p| p.is_empty()) || rest.trim().is_empty()
}

/// Every line of `expected` (but `...` lines) matches a line of `actual`, in
/// order; with `words`, both are taken as one line (columns of `ls`). What does
/// not match, said in full.
fn check_output(step: &Step, words: bool, actual: &str) -> Result<(), String> {
    let join = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let (expected, actual_lines): (Vec<String>, Vec<String>) = if words {
        (vec![join(&step.text)], vec![join(actual)])
    } else {
        (
            step.text.lines().map(str::to_string).collect(),
            actual.lines().map(str::to_string).collect(),
        )
    };
    let mut from = 0;
    for e in expected
        .iter()
        .filter(|e| !e.trim().is_empty() && e.trim() != "...")
    {
        match actual_lines[from..].iter().position(|a| line_matches(e, a)) {
            Some(i) => from += i + 1,
            None => {
                return Err(format!(
                    "{}: the guide shows\n  {e}\nbut the command printed (after the lines matched so far):\n{}\n--- the whole block expected:\n{}",
                    step.at,
                    actual_lines[from..].join("\n"),
                    step.text,
                ))
            }
        }
    }
    Ok(())
}

/// A reader's root shell on the host the packaging test boots: the mount, PID
/// and network namespaces of its systemd, a clean environment, the source tree as
/// the working directory (`apt install ./dist/...`), and "y" for apt's question.
fn reader_shell(sd: &Systemd, code: &str, errexit: bool, out: &fs::File) -> Command {
    let mut c = Command::new("nsenter");
    c.arg("-t")
        .arg(sd.pid.to_string())
        .args(["-m", "-p", "-n"])
        .arg(format!("--wd={}", src_dir().display()))
        .args(["--", "env", "-i"])
        .args([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
            "TERM=dumb",
        ]);
    c.arg("bash");
    if errexit {
        c.arg("-e");
    }
    c.arg("-c").arg(code);
    c.stdout(out.try_clone().expect("dup output"));
    c.stderr(out.try_clone().expect("dup output"));
    c
}

/// Follows a guide: runs its steps, keeps the last outputs, stops what it started.
struct Reader<'a> {
    sd: &'a Systemd,
    out_path: PathBuf,
    last: String,
    background: Option<(Child, PathBuf, String)>,
    /// Outputs that differ from the page's (reported together at the end: the
    /// steps after one still run).
    wrong: Vec<String>,
}

impl Reader<'_> {
    fn new(sd: &Systemd) -> Reader<'_> {
        Reader {
            sd,
            out_path: std::env::temp_dir().join(format!("npk-guide-{}.out", std::process::id())),
            last: String::new(),
            background: None,
            wrong: Vec::new(),
        }
    }

    fn follow(&mut self, steps: &[Step]) {
        for step in steps {
            let t0 = Instant::now();
            match step.kind {
                StepKind::Run { fails } => {
                    self.run(step, fails);
                    eprintln!(
                        "guide: {} ran ({:?}):\n{}",
                        step.at,
                        t0.elapsed(),
                        self.last
                    );
                }
                StepKind::Background => self.start(step),
                StepKind::Output { words, background } => {
                    let actual = if background {
                        self.stop(step)
                    } else {
                        self.last.clone()
                    };
                    if let Err(e) = check_output(step, words, &actual) {
                        eprintln!("{e}");
                        self.wrong.push(e);
                    }
                }
            }
        }
    }

    fn run(&mut self, step: &Step, fails: bool) {
        let out = fs::File::create(&self.out_path).expect("guide output file");
        let mut cmd = reader_shell(self.sd, &step.text, !fails, &out);
        let mut child = cmd
            .stdin(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot run: {e}", step.at));
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"y\n");
        }
        let status = child.wait().expect("wait for the guide's block");
        self.last = fs::read_to_string(&self.out_path).unwrap_or_default();
        assert_eq!(
            !status.success(),
            fails,
            "{}: the block {} ({status}):\n{}\n--- it printed:\n{}{}",
            step.at,
            if fails {
                "was to fail but succeeded"
            } else {
                "failed"
            },
            step.text,
            self.last,
            self.sd.diagnose()
        );
        // A reader's pause before the next command: netpold applies a change
        // in about 50 ms (debounce) plus the apply.
        thread::sleep(Duration::from_millis(1000));
    }

    fn start(&mut self, step: &Step) {
        assert!(
            self.background.is_none(),
            "{}: a second background block",
            step.at
        );
        let path = self.out_path.with_extension("bg");
        let out = fs::File::create(&path).expect("background output file");
        // stdbuf: lines come out as on a terminal (grep buffers into a file).
        let code = format!("exec stdbuf -oL bash -c {}", shell_quote(&step.text));
        let child = reader_shell(self.sd, &code, true, &out)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot start: {e}", step.at));
        self.background = Some((child, path, step.text.clone()));
        // Time to connect before the traffic comes.
        thread::sleep(Duration::from_millis(1000));
    }

    /// Stop the background block once monitor has printed its lines (a flow's
    /// line comes 3 s after its last packet), and return what it printed.
    fn stop(&mut self, step: &Step) -> String {
        let Some((mut child, path, _)) = self.background.take() else {
            panic!(
                "{}: background output, but nothing runs in the background",
                step.at
            );
        };
        thread::sleep(netpol::cli::daemonctl::REPEAT_WINDOW + Duration::from_millis(1000));
        kill_group(&mut child);
        let out = fs::read_to_string(&path).unwrap_or_default();
        let _ = fs::remove_file(&path);
        out
    }
}

fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.wait();
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if let Some((mut child, path, _)) = self.background.take() {
            kill_group(&mut child);
            let _ = fs::remove_file(path);
        }
        let _ = fs::remove_file(&self.out_path);
    }
}

/// What the guide has the reader create outside the package's own files; the
/// guide removes it all at its end, this guard when the test fails first.
const GUIDE_FILES: [&str; 8] = [
    "/etc/netpol/endpoints.d/seed.yaml",
    "/etc/netpol.d/frontend-to-backend.yaml",
    "/etc/netpol.d/frontend-egress-control.yaml",
    "/etc/netpol.d/database-lockdown.yaml",
    "/etc/netpol.d/broken.yaml",
    "/usr/local/sbin/seed-workloads",
    "/etc/systemd/system/netpold.service.d/metrics.conf",
    "/etc/systemd/system/netpold.service.d",
];

/// docs/install.md from its first step to its last, as a reader types it, under
/// the real systemd of the packaging tests: `apt install` of the .deb `make deb`
/// built, the example workloads made with the shipped script, every output the
/// page shows (what it prints, the probes' verdicts, monitor's lines with their
/// repeat counts, the journal's reason for a failed reload), and `apt remove` /
/// `apt purge` leaving nothing attached or pinned. Before the page's section 8
/// (removal), docs/bare-metal.md's section 5 (metrics, with and without the
/// drop-in) runs the same way.
#[test]
fn guide_under_systemd() {
    const TEST: &str = "guide_under_systemd";
    let Some(_host) = host_needs(&["apt", "bpftool", "curl", "stdbuf", "timeout", "bash"])
        .unless(|| {
            GUIDE_FILES
                .iter()
                .find(|f| Path::new(f).exists())
                .map(|f| format!("{f} exists on this host; not touching it"))
        })
        .check(TEST)
    else {
        return;
    };
    let install = fs::read_to_string(src_dir().join("docs/install.md")).expect("docs/install.md");
    let bare =
        fs::read_to_string(src_dir().join("docs/bare-metal.md")).expect("docs/bare-metal.md");
    let removal = install.find("\n## 8.").expect("install.md has a section 8");
    let (before, after) = install.split_at(removal);
    let first_lines = before.lines().count();
    let install_steps = guide_steps("docs/install.md", before);
    let mut removal_steps = guide_steps("docs/install.md", after);
    renumber(&mut removal_steps, first_lines - 1);
    let metrics_at = bare.find("\n## 5.").expect("bare-metal.md has a section 5");
    let metrics_end = bare[metrics_at + 1..]
        .find("\n## ")
        .map_or(bare.len(), |e| metrics_at + 1 + e);
    let mut metrics_steps = guide_steps("docs/bare-metal.md", &bare[metrics_at..metrics_end]);
    renumber(&mut metrics_steps, bare[..metrics_at].lines().count());
    let all: Vec<&Step> = install_steps
        .iter()
        .chain(&metrics_steps)
        .chain(&removal_steps)
        .collect();
    assert!(
        all.len() >= 20 && metrics_steps.len() >= 4,
        "the guides lost their marked steps: {all:#?}"
    );
    // Every other marked block of bare-metal.md would be silently skipped.
    assert_eq!(
        guide_steps("docs/bare-metal.md", &bare).len(),
        metrics_steps.len(),
        "only section 5 of bare-metal.md is followed"
    );

    // The page installs ./dist/netpol_VERSION_ARCH.deb: the one just built.
    let deb = deb();
    let name = deb.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    assert!(
        install_steps
            .iter()
            .any(|s| s.text.contains(&format!("apt install ./dist/{name}"))),
        "docs/install.md does not install ./dist/{name}"
    );

    let mut lab = Lab::new();
    lab.node();
    lab.systemd = Some(Systemd::boot());
    lab.installed = true; // the guard purges if the page does not get to it
    let _files = RemoveOnDrop(GUIDE_FILES.iter().map(PathBuf::from).collect());
    {
        let mut reader = Reader::new(lab.sd());
        reader.follow(&install_steps);
        reader.follow(&metrics_steps);
        reader.follow(&removal_steps);
        assert!(
            reader.wrong.is_empty(),
            "{} outputs differ from the guide's:\n\n{}",
            reader.wrong.len(),
            reader.wrong.join("\n\n")
        );
    }
    lab.installed = false;

    // The page's last steps purged the package and removed what it made.
    let sd = lab.sd();
    let status = text(&sd.exec(&["dpkg-query", "-W", "-f=${Status}", "netpol"]));
    assert!(
        !status.contains(" installed"),
        "netpol is still installed: {status}"
    );
    for path in [PIN_DIR, "/etc/netpol", "/etc/netpol.d", "/var/lib/netpol"]
        .iter()
        .chain(&GUIDE_FILES[5..])
    {
        assert!(!Path::new(path).exists(), "{path} is left after the guide");
    }
    let links = run_ok(&mut cmd("ip", &["-n", NODE, "-br", "link"]));
    assert!(
        !links.contains("veth-") && !links.contains("seed-br0"),
        "the example workloads' links are left:\n{links}"
    );
    let netns = text(&sd.exec(&["ip", "netns", "list"]));
    assert!(!netns.contains("seed-"), "namespaces are left: {netns}");
}

/// Steps of a part of a page that starts `lines` lines into it: line numbers of
/// the whole page.
fn renumber(steps: &mut [Step], lines: usize) {
    for s in steps {
        let (page, line) = s.at.rsplit_once(':').expect("page:line");
        s.at = format!("{page}:{}", line.parse::<usize>().expect("line") + lines);
    }
}

/// Removes files (and empty directories) when dropped.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
            let _ = fs::remove_dir(p);
        }
    }
}

/// The matcher the guide test holds outputs to: `...` and the values that
/// change on every run, nothing else.
#[test]
fn guide_outputs_match_only_what_they_show() {
    // (shown in the guide, printed, matches)
    let cases = [
        (
            "2026-11-26T07:06:21.060Z denied   10.0.1.31:55942 -> 10.0.1.21:80 tcp/80 default/backend (ingress) default deny (2 packets)",
            "2026-12-04T19:00:00.001Z denied   10.0.1.31:40000 -> 10.0.1.21:80 tcp/80 default/backend (ingress) default deny (2 packets)",
            true,
        ),
        (
            "... denied 10.0.1.31:55942 -> 10.0.1.21:80 tcp/80 default/backend (ingress) default deny (2 packets)",
            "2026-12-04T19:00:00.001Z denied 10.0.1.31:40000 -> 10.0.1.21:80 tcp/80 default/backend (ingress) default deny",
            false,
        ),
        ("tcp/80", "tcp/81", false),
        (
            "  4 endpoints (4 attached, 0 pending), 2 policies, last apply 1.5 ms",
            "4 endpoints (4 attached, 0 pending), 2 policies, last apply 120.0 ms",
            true,
        ),
        (
            "  4 endpoints (4 attached, 0 pending), 2 policies, last apply 1.5 ms",
            "4 endpoints (3 attached, 1 pending), 2 policies, last apply 120.0 ms",
            false,
        ),
        ("netpold on ...: ready, generation ...", "netpold on h: ready, generation 3", true),
        ("netpold on ...: ready, generation ...", "netpold on h: ready, DEGRADED, generation 3", false),
        ("ok: 2 policies", "ok: 2 policies (2 rules)", false),
        ("2159: type 11  prog 3491", "7: type 11 prog 12", true),
        ("2159: type 11  prog 3491", "7: type 11 prog 12 x", false),
    ];
    for (shown, printed, matches) in cases {
        assert_eq!(
            line_matches(shown, printed),
            matches,
            "{shown:?} vs {printed:?}"
        );
    }
    let steps = guide_steps(
        "t",
        "x\n<!-- test: run fails -->\n\n  ```sh\n  false\n  ```\n<!-- test: output words -->\n```\na  b\n```\n",
    );
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].kind, StepKind::Run { fails: true });
    assert_eq!(steps[0].text, "false\n");
    assert_eq!(steps[0].at, "t:4");
    assert_eq!(
        steps[1].kind,
        StepKind::Output {
            words: true,
            background: false
        }
    );
}

/// The shipped etc/examples/seed/workloads.sh, in private network and mount
/// namespaces (a tmpfs /run for its /run/netns): `create` twice makes the four
/// workloads once, with the registry's interfaces and addresses; they reach each
/// other (`probe`); `remove` leaves no namespace, link or bridge.
#[test]
fn seed_workloads_script_is_idempotent_and_removes_everything() {
    const TEST: &str = "seed_workloads_script_is_idempotent_and_removes_everything";
    let Some(_turn) = Needs::root()
        .tools(&["ip", "unshare", "timeout", "bash", "mount"])
        .check(TEST)
    else {
        return;
    };
    let script = src_dir().join("etc/examples/seed/workloads.sh");
    let registry = fs::read_to_string(src_dir().join("etc/examples/seed/endpoints.d/seed.yaml"))
        .expect("seed registry");
    let code = format!(
        "set -e; mount -t tmpfs npk-run /run; s='{}'; \
         $s create >/dev/null; $s create; echo ===; \
         ip -br link; ip -n seed-backend -br addr show dev eth0; echo ===; \
         $s probe database backend 80; $s probe frontend-1 database 5432; echo ===; \
         $s remove; ip -br link; ls /run/netns; echo ===",
        script.display()
    );
    let out = run_ok(Command::new("unshare").args([
        "--net",
        "--mount",
        "--propagation",
        "private",
        "bash",
        "-c",
        &code,
    ]));
    let parts: Vec<&str> = out.split("===\n").collect();
    assert_eq!(parts.len(), 5, "{out}");
    let (created, links, probes, removed) = (parts[0], parts[1], parts[2], parts[3]);
    for (name, veth, v4, v6) in [
        ("frontend-1", "veth-fe1", "10.0.1.11", "fd00:1::11"),
        ("frontend-2", "veth-fe2", "10.0.1.12", "fd00:1::12"),
        ("backend", "veth-be", "10.0.1.21", "fd00:1::21"),
        ("database", "veth-db", "10.0.1.31", "fd00:1::31"),
    ] {
        // The script's workloads are the registry's.
        assert!(
            registry.contains(&format!("interface: {veth}"))
                && registry.contains(&format!("[{v4}, \"{v6}\"]"))
                && registry.contains(&format!("name: {name}")),
            "{name} {veth} {v4} {v6} not in the registry"
        );
        assert!(
            created.contains(&format!(
                "{name}: namespace seed-{name}, eth0 {v4} {v6}, host side {veth}"
            )),
            "{created}"
        );
        assert_eq!(
            links
                .lines()
                .filter(|l| l.starts_with(&format!("{veth}@")))
                .count(),
            1,
            "{veth} once after two creates:\n{links}"
        );
    }
    assert!(links.contains("seed-br0"), "{links}");
    assert!(
        links.contains("10.0.1.21/24") && links.contains("fd00:1::21/64"),
        "{links}"
    );
    assert_eq!(
        probes,
        "database -> backend:80 reached\nfrontend-1 -> database:5432 reached\n"
    );
    // Left: the namespace's own lo, and no namespace in /run/netns.
    let left: Vec<&str> = removed.lines().collect();
    assert_eq!(
        left.first(),
        Some(&"removed the seed workloads"),
        "{removed}"
    );
    assert!(
        left.len() == 2 && left[1].starts_with("lo "),
        "left after remove:\n{removed}"
    );
}

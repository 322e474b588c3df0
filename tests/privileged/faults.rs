//! Faults injected into a running netpold (the real binary, the kernel
//! datapath, real TCP between network namespaces): bpffs missing, map creation
//! refused, a netlink event flood, an interface flapped a thousand times,
//! SIGKILL in the middle of an apply, an unwritable or full state_dir, and
//! abusive runtime-socket clients. docs/reliability.md lists what each
//! one shows.
//!
//! Needs root, bpffs, iproute2 and util-linux's `unshare`. Without them the
//! tests skip with a message, unless `CI=true`, where they fail. Names use the
//! `npf` prefix (netns `npf-<pid>-*`, pins `/sys/fs/bpf/npf-*`, 10.209.1.0/24);
//! the lab's Drop removes everything, also on failure.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::cmd::{ip, ip_batch};
use crate::harness::daemon::{raw_request, read_all, Daemon};
use crate::harness::lab::Lab;
use crate::harness::netns::in_ns;
use crate::harness::require::Turn;
use crate::harness::rng::{clock_seed, env_seed, Rng};
use crate::harness::Needs;

/// The tests of this file run alone: each measures timings (status latency,
/// kill delays) that a neighbour's flood would distort.
fn alone(test: &str) -> Option<Turn> {
    Needs::privileged().alone().check(test)
}

const THREE: [(&str, &str, &str, u8); 3] = [
    ("fe", "frontend", "frontend", 11),
    ("be", "backend", "backend", 21),
    ("db", "database", "database", 31),
];

/// A policy: workloads with app=`from` may open TCP `port` on app=`to`.
fn allow(name: &str, from: &str, to: &str, port: u16) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  endpointSelector:\n    matchLabels:\n      app: {to}\n  ingress:\n    - fromEndpoints:\n        - matchLabels:\n            app: {from}\n      toPorts:\n        - ports:\n            - port: \"{port}\"\n              protocol: TCP\n"
    )
}

/// Only frontend reaches backend:80; database does not.
const FE_ONLY: [(&str, &str, u16, bool); 2] = [("fe", "be", 80, true), ("db", "be", 80, false)];
/// Only database reaches backend:80.
const DB_ONLY: [(&str, &str, u16, bool); 2] = [("fe", "be", 80, false), ("db", "be", 80, true)];

/// Start the lab's daemon as `sh -c SCRIPT` in a private mount namespace
/// (unshare), the script ending in `exec "$NETPOLD" --config "$NETPOLD_CONFIG"`.
fn spawn_in_mount_ns(lab: &mut Lab, script: &str) {
    let script = format!("{script}\nexec \"$NETPOLD\" --config \"$NETPOLD_CONFIG\"");
    lab.daemon.spawn(&[
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-ec",
        &script,
    ]);
}

#[test]
fn bpffs_missing_is_mounted_or_named() {
    let Some(_turn) = alone("bpffs_missing_is_mounted_or_named") else {
        return;
    };
    let mut lab = Lab::new("bpf", &THREE);
    lab.write_policy("fe.yaml", &allow("fe", "frontend", "backend", 80));

    // 1. pin_dir under a directory that is not bpffs (a tmpfs mounted over it in a
    //    private mount namespace): only /sys/fs/bpf is ever mounted by netpold, so
    //    anything else is refused with a message naming the directory.
    let pins = lab.path("pins");
    std::fs::create_dir(&pins).unwrap();
    let pin_dir = pins.join("npf");
    let cfg = std::fs::read_to_string(lab.daemon.config())
        .unwrap()
        .replace(
            &lab.daemon.pin_dir.display().to_string(),
            &pin_dir.display().to_string(),
        );
    std::fs::write(lab.daemon.config(), &cfg).unwrap();
    spawn_in_mount_ns(
        &mut lab,
        &format!("mount -t tmpfs tmpfs {}", pins.display()),
    );
    let st = lab
        .daemon
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("netpold kept running on tmpfs\n{}", lab.daemon.log()));
    assert_eq!(st.code(), Some(1), "{}", lab.daemon.log());
    let log = lab.daemon.log();
    let want = format!(
        "{}: not a bpf filesystem (pin_dir {} must live on bpffs; mount -t bpf bpf {})",
        pins.display(),
        pin_dir.display(),
        pins.display()
    );
    assert!(log.contains(&want), "expected {want:?} in the log:\n{log}");
    assert!(
        lab.daemon.status().is_none(),
        "no socket may be left answering"
    );

    // 2. bpffs not mounted at /sys/fs/bpf (unmounted in a private mount namespace):
    //    netpold mounts it itself and enforces.
    lab.write_config("");
    spawn_in_mount_ns(
        &mut lab,
        "umount -l /sys/fs/bpf\n! mountpoint -q /sys/fs/bpf",
    );
    lab.daemon
        .wait_status("ready on a bpffs netpold mounted", |s| s.ready);
    lab.expect("enforcing with its own bpffs mount", &FE_ONLY);
    // Its pins are on the private bpffs, not the host's.
    assert!(
        !lab.daemon.pin_dir.exists(),
        "{} appeared on the host's bpffs",
        lab.daemon.pin_dir.display()
    );
    lab.daemon.stop();
}

#[test]
fn map_creation_refused_keeps_the_running_state() {
    let Some(_turn) = alone("map_creation_refused_keeps_the_running_state") else {
        return;
    };
    let mut lab = Lab::new("map", &THREE);
    lab.write_policy("sw.yaml", &allow("sw", "frontend", "backend", 80));
    lab.daemon.start();
    lab.expect("first instance", &FE_ONLY);
    let gen = lab.daemon.status().unwrap().generation;

    // 1. Another instance (its own pin_dir, socket and state) whose conntrack map
    //    cannot be created (E2BIG: more than 2^31 entries): it stops with a clear
    //    error and disturbs nothing.
    let other_pins = PathBuf::from(format!("{}-other", lab.daemon.pin_dir.display()));
    let mut other = Daemon::new(
        "the other instance",
        &lab.node,
        &lab.path("other"),
        &other_pins,
    );
    let cfg2 = std::fs::read_to_string(lab.daemon.config())
        .unwrap()
        .replace(
            &lab.daemon.pin_dir.display().to_string(),
            &other_pins.display().to_string(),
        )
        .replace(
            &lab.path("run").display().to_string(),
            &other.path("run").display().to_string(),
        )
        .replace(
            &lab.path("state").display().to_string(),
            &other.path("state").display().to_string(),
        );
    let cfg2_path = other.config();
    std::fs::write(
        &cfg2_path,
        format!("{cfg2}[conntrack]\nmax_entries = 4000000000\n"),
    )
    .unwrap();
    other.spawn(&[]);
    let st = other
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the other instance kept running\n{}", other.log()));
    let err = other.log();
    drop(other); // detaches and removes its pins
    assert_eq!(st.code(), Some(1), "{err}");
    eprintln!(
        "map creation refused (fresh instance): {}",
        err.lines().last().unwrap_or("")
    );
    assert!(
        err.contains("the kernel refuses a map of the configured size")
            && err.contains(&format!(
                "{}: conntrack.max_entries = 4000000000",
                cfg2_path.display()
            )),
        "unclear error: {err}"
    );
    let s = lab
        .daemon
        .status()
        .expect("the first instance still answers");
    assert_eq!(
        s.generation, gen,
        "the first instance's state changed: {s:?}"
    );
    lab.expect("first instance untouched", &FE_ONLY);

    // 2. The same instance restarted with an endpoint table it cannot create
    //    (the pinned maps are adopted, then every apply fails): it reports the
    //    error, keeps the previous generation in force, and retries with backoff.
    lab.daemon.stop();
    lab.write_config("[maps]\nendpoint_max_entries = 4000000000\n");
    lab.write_policy("sw.yaml", &allow("sw", "database", "backend", 80));
    lab.daemon.spawn(&[]);
    let s = lab
        .daemon
        .wait_status("datapath error reported", |s| s.datapath_error.is_some());
    let msg = s.datapath_error.clone().unwrap();
    eprintln!("map creation refused (adopting instance): {msg}");
    assert!(msg.contains("np_endpoints"), "{msg}");
    assert!(s.degraded && !s.ready, "{s:?}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        lab.daemon.exited().is_none(),
        "netpold exited:\n{}",
        lab.daemon.log_tail(40)
    );
    let retries = lab
        .daemon
        .log()
        .lines()
        .filter(|l| l.contains("datapath refused the new state"))
        .count();
    assert!(
        retries >= 2,
        "expected retries with backoff, saw {retries}\n{}",
        lab.daemon.log_tail(40)
    );
    let (code, json) = lab.daemon.ctl(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        v["datapath_error"]
            .as_str()
            .unwrap_or("")
            .contains("np_endpoints"),
        "{json}"
    );
    assert_eq!(v["generation"].as_u64(), Some(gen), "{json}");
    lab.expect("the previous generation still enforces", &FE_ONLY);

    // 3. A config that fits again: the new state applies.
    lab.daemon.stop();
    lab.write_config("");
    lab.daemon.start();
    lab.expect("applies once the maps can be created", &DB_ONLY);
}

/// Sends SIGCONT when dropped, so a failed step never leaves the daemon stopped.
struct Resume<'a>(&'a Daemon);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

#[test]
fn netlink_flood_resyncs_to_the_right_attachments() {
    let Some(_turn) = alone("netlink_flood_resyncs_to_the_right_attachments") else {
        return;
    };
    let mut lab = Lab::new("nl", &THREE);
    // A large state, so the resync after the flood lands while the daemon
    // also applies a policy change.
    lab.write_policy("filler.yaml", &filler(3000));
    lab.write_policy("sw.yaml", &allow("sw", "database", "backend", 80));
    lab.daemon.start();
    lab.expect("first generation", &DB_ONLY);
    // The datapath creates a generation's inner maps the first time it writes
    // that generation, so the fd count steps up once (three map fds) at the
    // second apply. Take the baseline after both generations exist, so it
    // measures leaks, not that one-time step.
    lab.write_policy("sw.yaml", &allow("sw", "frontend", "backend", 80));
    lab.expect("second generation", &FE_ONLY);
    lab.write_policy("sw.yaml", &allow("sw", "database", "backend", 80));
    lab.expect("before the flood", &DB_ONLY);
    let (rss0, fds0) = lab.daemon.rss_fds();
    lab.write_policy("sw.yaml", &allow("sw", "frontend", "backend", 80));
    std::thread::sleep(Duration::from_millis(30));

    // 800 link events in a burst (400 bridges created by one `ip -batch`,
    // then deleted as one group), backend's device deleted and recreated in the
    // middle of it; twice, to tell a high-water mark from a leak. The daemon
    // is held stopped (SIGSTOP) while the burst arrives, so its event socket
    // overruns for certain: a daemon that reads fast enough would otherwise
    // keep up on a quick machine, and the test would prove nothing.
    let mut rss_after = Vec::new();
    for round in 0..2 {
        let t0 = Instant::now();
        lab.daemon.signal(libc::SIGSTOP);
        let resume = Resume(&lab.daemon);
        let mut add = String::new();
        for i in 0..400 {
            add.push_str(&format!("link add npfd{i} group 77 type bridge\n"));
        }
        let node = lab.node.clone();
        let t = std::thread::spawn(move || {
            ip_batch(&node, &add);
            ip_batch(&node, "link del group 77\n");
        });
        ip(&["-n", &lab.node, "link", "del", "veth-be"]);
        lab.plug("be");
        t.join().unwrap();
        drop(resume);
        if round == 0 {
            lab.write_policy("sw.yaml", &allow("sw", "database", "backend", 80));
        }
        lab.daemon
            .wait_status("the flood is over", |s| s.attached == 3);
        std::thread::sleep(Duration::from_secs(1));
        rss_after.push(lab.daemon.rss_fds().0);
        eprintln!("netlink flood round {round}: {:?}", t0.elapsed());
    }
    lab.write_policy("sw.yaml", &allow("sw", "frontend", "backend", 80));

    let be_ifindex = lab.topo.node_ifindexes();
    let want = in_ns(&lab.node, || {
        nix::net::if_::if_nametoindex("veth-be").unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let eps = lab.daemon.endpoints();
        let be = eps.iter().find(|e| e.name == "backend");
        if be.is_some_and(|e| e.ifindex == Some(want) && e.state.as_str() == "attached")
            && eps
                .iter()
                .filter(|e| e.state.as_str() == "attached")
                .count()
                == 3
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend not attached on ifindex {want}: {eps:?}\n{}",
            lab.daemon.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, json) = lab.daemon.ctl(&["endpoints", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let be = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "backend")
        .unwrap();
    assert_eq!(be["ifindex"].as_u64(), Some(u64::from(want)), "{json}");
    lab.expect("after the flood", &FE_ONLY);
    let pinned = lab.daemon.pinned_link_ifindexes();
    assert!(
        pinned.iter().all(|i| be_ifindex.contains(i)),
        "links pinned for dead ifindexes: {pinned:?} (live {be_ifindex:?})"
    );
    assert_eq!(pinned.len(), 3, "{pinned:?}");
    let overruns = lab
        .daemon
        .log()
        .lines()
        .filter(|l| l.contains("netlink buffer overrun"))
        .count();
    let (rss1, fds1) = lab.daemon.rss_fds();
    eprintln!("netlink flood: {overruns} overruns reported; RSS {rss0} -> {rss_after:?} -> {rss1} KiB, fds {fds0} -> {fds1}");
    assert!(
        overruns > 0,
        "the flood never overran the netlink socket: the test proves nothing"
    );
    assert!(fds1 <= fds0 + 2, "fds {fds0} -> {fds1}");
    assert!(
        rss_after[1] * 100 <= rss_after[0] * 120,
        "RSS grows with each flood: {rss_after:?} KiB"
    );
}

#[test]
fn interface_flapped_a_thousand_times_ends_attached_and_flat() {
    let Some(_turn) = alone("interface_flapped_a_thousand_times_ends_attached_and_flat") else {
        return;
    };
    let mut lab = Lab::new("flap", &THREE);
    lab.write_policy("fe.yaml", &allow("fe", "frontend", "backend", 80));
    lab.daemon.start();
    lab.expect("before flapping", &FE_ONLY);
    // Warm-up: one delete/recreate so every code path has run once.
    ip(&["-n", &lab.node, "link", "del", "veth-be"]);
    lab.plug("be");
    lab.daemon.wait_status("warm-up", |s| s.attached == 3);
    lab.expect("after the warm-up", &FE_ONLY);
    std::thread::sleep(Duration::from_millis(500));
    let (rss0, fds0) = lab.daemon.rss_fds();
    let targets0 = lab.daemon.fd_targets();

    // 1,000 down/up flaps of backend's device...
    let mut flaps = String::new();
    for _ in 0..500 {
        flaps.push_str("link set veth-be down\nlink set veth-be up\n");
    }
    ip_batch(&lab.node, &flaps);
    // ...then 300 delete/recreate cycles (the peer stays in the node), paced so
    // the daemon sees many of the ifindexes, then the real device again.
    for round in 0..10 {
        let mut churn = String::new();
        for _ in 0..30 {
            churn.push_str("link del veth-be\nlink add veth-be type veth peer name npfpeer\nlink set veth-be up\n");
        }
        ip_batch(&lab.node, &churn);
        if round % 3 == 0 {
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    ip(&["-n", &lab.node, "link", "del", "veth-be"]);
    lab.plug("be");
    let want = in_ns(&lab.node, || {
        nix::net::if_::if_nametoindex("veth-be").unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab
        .daemon
        .endpoints()
        .iter()
        .any(|e| e.name == "backend" && e.ifindex == Some(want))
    {
        assert!(
            Instant::now() < deadline,
            "backend not attached on {want}: {:?}\n{}",
            lab.daemon.endpoints(),
            lab.daemon.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.expect("after 1,300 flaps", &FE_ONLY);
    std::thread::sleep(Duration::from_millis(1000));
    let (rss1, fds1) = lab.daemon.rss_fds();
    let live = lab.topo.node_ifindexes();
    let pinned = lab.daemon.pinned_link_ifindexes();
    let attached: Vec<u32> = {
        let mut v: Vec<u32> = lab
            .daemon
            .endpoints()
            .iter()
            .filter_map(|e| e.ifindex)
            .collect();
        v.sort();
        v
    };
    eprintln!("flap: RSS {rss0} -> {rss1} KiB, fds {fds0} -> {fds1}, pinned links on {pinned:?}, attached {attached:?}");
    assert_eq!(
        pinned, attached,
        "pinned links must be exactly the attached devices (live: {live:?})"
    );
    assert!(pinned.iter().all(|i| live.contains(i)));
    assert!(
        fds1 <= fds0 + 2,
        "open fds grew: {fds0} -> {fds1}: {targets0:?} -> {:?}",
        lab.daemon.fd_targets()
    );
    assert!(
        rss1 * 100 <= rss0 * 120 + 2048 * 100,
        "RSS grew more than 20% (+2 MiB): {rss0} -> {rss1} KiB"
    );
    // Each pinned link really is attached to a live device (a tcx link whose
    // device went away reads ifindex 0).
    for e in std::fs::read_dir(lab.daemon.pin_dir.join("links"))
        .unwrap()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("tcx-") {
            let ifindex = tcx_link_ifindex(&e.path());
            assert!(
                live.contains(&ifindex),
                "{name}: attached to ifindex {ifindex}, not a live device of {live:?}"
            );
        }
    }
}

/// The device a pinned tcx link is attached to (0 once the device is gone).
fn tcx_link_ifindex(path: &std::path::Path) -> u32 {
    use libbpf_rs::libbpf_sys as sys;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe { sys::bpf_obj_get(c.as_ptr()) };
    assert!(
        fd >= 0,
        "{}: bpf_obj_get: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is ours to close.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: bpf_link_info is plain old data; all-zero is valid.
    let mut info: sys::bpf_link_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<sys::bpf_link_info>() as u32;
    // SAFETY: info and len are valid and sized as passed.
    let r = unsafe {
        sys::bpf_link_get_info_by_fd(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut info, &mut len)
    };
    assert!(
        r == 0,
        "{}: link info: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: a tcx link fills the tcx member.
    unsafe { info.__bindgen_anon_1.tcx.ifindex }
}

/// A policy on backend from `n` /32 CIDRs on 10 ports: about 10 × n entries, so
/// filling a generation takes a while.
fn filler(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: filler\n  namespace: default\nspec:\n  endpointSelector:\n    matchLabels:\n      app: backend\n  ingress:\n    - fromCIDR:\n",
    );
    for i in 0..n {
        y.push_str(&format!(
            "        - 172.{}.{}.{}/32\n",
            16 + i / 65536,
            i / 256 % 256,
            i % 256
        ));
    }
    y.push_str("      toPorts:\n        - ports:\n");
    for p in 0..10 {
        y.push_str(&format!(
            "            - port: \"{}\"\n              protocol: TCP\n",
            9000 + p
        ));
    }
    y
}

#[test]
fn sigkill_while_filling_a_generation_leaves_old_or_new() {
    let Some(_turn) = alone("sigkill_while_filling_a_generation_leaves_old_or_new") else {
        return;
    };
    let seed = env_seed("NETPOL_FAULT_SEED").unwrap_or_else(clock_seed);
    eprintln!("sigkill seed {seed} (NETPOL_FAULT_SEED={seed} to replay)");
    let mut rng = Rng::new(seed);
    let mut lab = Lab::new("kill", &THREE);
    lab.write_policy("filler.yaml", &filler(3000));
    lab.write_policy("sw.yaml", &allow("sw", "frontend", "backend", 80));
    lab.daemon.start();
    lab.expect("start", &FE_ONLY);
    // How long an apply of this state takes here.
    let g = lab.daemon.status().unwrap().generation;
    lab.write_policy("sw.yaml", &allow("sw", "database", "backend", 80));
    let s = lab
        .daemon
        .wait_status("second variant", |s| s.generation > g);
    let apply_ms = s.last_apply_ms.unwrap_or(100.0).max(20.0) as u64;
    lab.expect("second variant", &DB_ONLY);
    let mut fe_now = false;
    let mut outcomes = Vec::new();
    for round in 0..6 {
        fe_now = !fe_now;
        let (from, want_new, want_old) = if fe_now {
            ("frontend", FE_ONLY, DB_ONLY)
        } else {
            ("database", DB_ONLY, FE_ONLY)
        };
        lab.write_policy("sw.yaml", &allow("sw", from, "backend", 80));
        let delay = rng.below(apply_ms * 2 + 20);
        std::thread::sleep(Duration::from_millis(delay));
        lab.daemon.kill9();
        let got: Vec<bool> = want_new
            .iter()
            .map(|(f, t, p, _)| lab.connects(f, t, *p))
            .collect();
        let new = got.iter().zip(&want_new).all(|(g, w)| *g == w.3);
        let old = got.iter().zip(&want_old).all(|(g, w)| *g == w.3);
        assert!(new || old, "seed {seed}, round {round}: killed {delay} ms after the change: fe->be:80 {}, db->be:80 {}: a mix\n{}", got[0], got[1], lab.daemon.log_tail(30));
        outcomes.push(format!("{delay}ms:{}", if new { "new" } else { "old" }));
        // The next start converges on the files.
        lab.daemon.start();
        lab.expect("restart converges", &want_new);
    }
    eprintln!("sigkill: apply {apply_ms} ms; kills {outcomes:?}");
}

#[test]
fn state_dir_unwritable_or_full_keeps_enforcing() {
    let Some(_turn) = alone("state_dir_unwritable_or_full_keeps_enforcing") else {
        return;
    };
    let mut lab = Lab::new("state", &THREE);
    lab.write_policy("sw.yaml", &allow("sw", "frontend", "backend", 80));
    let cases: Vec<(&str, PathBuf, Option<String>)> = {
        let file = lab.path("state-is-a-file");
        std::fs::write(&file, "not a directory").unwrap();
        let ro = lab.path("state-ro");
        std::fs::create_dir(&ro).unwrap();
        let full = lab.path("state-full");
        std::fs::create_dir(&full).unwrap();
        vec![
            ("a file where the directory should be", file, None),
            (
                "a read-only bind mount",
                ro.clone(),
                Some(format!("mount --bind {0} {0}\nmount -o remount,bind,ro {0}", ro.display())),
            ),
            (
                "a full 64 KiB tmpfs",
                full.clone(),
                Some(format!("mount -t tmpfs -o size=64k tmpfs {0}\ndd if=/dev/zero of={0}/fill bs=4k count=64 2>/dev/null || true", full.display())),
            ),
        ]
    };
    let mut fe = true;
    for (what, dir, script) in cases {
        lab.write_config_with(&dir, "");
        match &script {
            None => lab.daemon.spawn(&[]),
            Some(s) => spawn_in_mount_ns(&mut lab, s),
        }
        lab.daemon
            .wait_status(&format!("{what}: ready"), |s| s.ready);
        let s = lab
            .daemon
            .wait_status(&format!("{what}: state_error"), |s| s.state_error.is_some());
        let err = s.state_error.unwrap();
        assert!(err.contains(&dir.display().to_string()), "{what}: {err}");
        // A change still applies.
        fe = !fe;
        let (from, want) = if fe {
            ("frontend", FE_ONLY)
        } else {
            ("database", DB_ONLY)
        };
        lab.write_policy("sw.yaml", &allow("sw", from, "backend", 80));
        lab.expect(&format!("{what}: enforcement continues"), &want);
        let (code, json) = lab.daemon.ctl(&["status", "--json"]);
        assert_eq!(code, 0);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(v["state_error"].is_string(), "{what}: {json}");
        eprintln!("state_dir {what}: {}", v["state_error"]);
        lab.daemon.stop();
    }
}

#[test]
fn runtime_socket_abuse_does_not_block_status() {
    let Some(_turn) = alone("runtime_socket_abuse_does_not_block_status") else {
        return;
    };
    let mut lab = Lab::new("sock", &[]);
    lab.daemon.start();
    let sock = lab.daemon.socket();

    // A status client asking every 50 ms throughout, recording the slowest answer.
    let stop = Arc::new(AtomicBool::new(false));
    let worst = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let prober = {
        let (stop, worst, failures, sock) =
            (stop.clone(), worst.clone(), failures.clone(), sock.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match raw_request(
                    &sock,
                    b"{\"request\":\"status\"}\n",
                    Duration::from_secs(10),
                ) {
                    Ok(l) if l.contains("\"generation\"") => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                worst.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            n
        })
    };

    // Malformed JSON.
    let a = raw_request(&sock, b"{\"request\": \n", Duration::from_secs(2)).unwrap();
    assert!(a.contains("\"error\"") && a.contains("bad request"), "{a}");
    let a = raw_request(&sock, b"\x00\xff{]\n", Duration::from_secs(2)).unwrap();
    assert!(a.contains("\"error\""), "{a}");

    // 100 idle connections that never send anything.
    let idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();

    // An oversized request: 10 MiB without a newline.
    let big = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let mut s = UnixStream::connect(&sock).unwrap();
            let chunk = vec![b'x'; 1 << 20];
            let mut sent = 0usize;
            let mut reader = s.try_clone().unwrap();
            let r = std::thread::spawn(move || read_all(&mut reader, Duration::from_secs(10)));
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            for _ in 0..10 {
                match s.write_all(&chunk) {
                    Ok(()) => sent += chunk.len(),
                    Err(_) => break,
                }
            }
            drop(s);
            (sent, r.join().unwrap())
        })
    };

    // A slow client: one byte a second.
    let slow = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let mut s = UnixStream::connect(&sock).unwrap();
            let mut reader = s.try_clone().unwrap();
            let r = std::thread::spawn(move || read_all(&mut reader, Duration::from_secs(12)));
            for b in b"{\"request\":\"status\"}" {
                if s.write_all(&[*b]).is_err() || t.elapsed() > Duration::from_secs(10) {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            (r.join().unwrap(), t.elapsed())
        })
    };

    let (sent, answer) = big.join().unwrap();
    assert!(
        answer.contains("longer than 4096 bytes"),
        "oversized request answered {answer:?} after {sent} bytes"
    );
    let (answer, took) = slow.join().unwrap();
    assert!(
        answer.contains("no request within"),
        "slow client answered {answer:?}"
    );
    assert!(took < Duration::from_secs(12), "slow client held {took:?}");
    // The idle ones were timed out too.
    for mut s in idle.into_iter().take(5) {
        let a = read_all(&mut s, Duration::from_secs(3));
        assert!(a.contains("no request within"), "idle client got {a:?}");
    }
    // The daemon's fds went back down.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let asked = prober.join().unwrap();
    let worst_ms = worst.load(Ordering::Relaxed) as f64 / 1000.0;
    eprintln!(
        "runtime socket abuse: {asked} status requests, slowest {worst_ms:.1} ms, {} failed",
        failures.load(Ordering::Relaxed)
    );
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "status requests failed during the abuse"
    );
    assert!(worst_ms < 200.0, "a status answer took {worst_ms} ms");

    // Beyond MAX_CONNECTIONS (256) clients at once: the extra ones are told so at
    // once rather than left waiting.
    let held: Vec<UnixStream> = (0..256)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let mut extra = UnixStream::connect(&sock).unwrap();
    let a = read_all(&mut extra, Duration::from_secs(2));
    assert!(a.contains("too many clients"), "client 257 got {a:?}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "client 257 waited {:?}",
        t.elapsed()
    );
    drop(held);
    lab.daemon
        .wait_status_for("status answers again", Duration::from_secs(8), |s| s.ready);
    assert!(lab.daemon.exited().is_none());
}

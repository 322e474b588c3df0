//! Privileged end-to-end tests of netpold's kernel-facing parts: real netlink in a
//! private network namespace, and (once the kernel datapath is built in) the
//! daemon enforcing the seed scenario on real TCP between network namespaces.
//!
//! Needs root and bpffs. Without them the tests skip with a message, unless
//! `CI=true`, where they fail. Every namespace, link and pin is named with the
//! `npe` prefix and removed by a guard, also on failure.

use std::collections::BTreeMap;
use std::time::Duration;

use netpol::netlink::{Links, NetlinkLinks};

/// Whether privileged tests can run here; under CI they must.
fn privileged(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let bpffs = std::fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.starts_with("bpf ")))
        .unwrap_or(false);
    if root && bpffs {
        return true;
    }
    let why = if !root { "not root" } else { "no bpffs at /sys/fs/bpf" };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: cannot run under CI: {why}");
    }
    eprintln!("{test}: skipped: {why}");
    false
}

/// Run `f` on a thread of its own in a fresh, private network namespace (gone when
/// the thread ends), with a current-thread tokio runtime.
fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

#[test]
fn netlink_follows_links_appearing_going_and_coming_back() {
    if !privileged("netlink_follows_links_appearing_going_and_coming_back") {
        return;
    }
    in_private_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let log = netpol::logging::discard();
            let mut links = NetlinkLinks;
            let mut rx = links.subscribe(&log).await.unwrap();
            assert_eq!(rx.borrow().links.keys().cloned().collect::<Vec<_>>(), ["lo"]);
            let (conn, handle, _) = rtnetlink::new_connection().unwrap();
            tokio::spawn(conn);

            async fn wait_until(
                rx: &mut tokio::sync::watch::Receiver<netpol::netlink::LinkTable>,
                what: &str,
                f: impl Fn(&BTreeMap<String, u32>) -> bool,
            ) -> BTreeMap<String, u32> {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                loop {
                    let cur = rx.borrow_and_update().links.clone();
                    if f(&cur) {
                        return cur;
                    }
                    if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                        panic!("timed out waiting for {what}; links: {cur:?}");
                    }
                }
            }

            handle.link().add().veth("npe-d0".into(), "npe-d0p".into()).execute().await.unwrap();
            let t = wait_until(&mut rx, "npe-d0 to appear", |l| l.contains_key("npe-d0")).await;
            let first = t["npe-d0"];
            handle.link().del(first).execute().await.unwrap();
            wait_until(&mut rx, "npe-d0 to go", |l| !l.contains_key("npe-d0")).await;
            handle.link().add().veth("npe-d0".into(), "npe-d0p".into()).execute().await.unwrap();
            let t = wait_until(&mut rx, "npe-d0 to come back", |l| l.contains_key("npe-d0")).await;
            assert_ne!(t["npe-d0"], first, "a recreated link has a new ifindex");

            // Addresses and routes follow too (interface: auto, host addresses).
            let idx = t["npe-d0"];
            handle.link().set(idx).up().execute().await.unwrap();
            handle.address().add(idx, "10.202.9.1".parse().unwrap(), 24).execute().await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                {
                    let cur = rx.borrow_and_update();
                    if cur.addresses.contains(&"10.202.9.1".parse().unwrap())
                        && cur.route_device("10.202.9.7".parse().unwrap()) == Some(idx)
                    {
                        break;
                    }
                }
                if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                    panic!("timed out waiting for the address and route: {:?}", rx.borrow());
                }
            }
        });
    });
}

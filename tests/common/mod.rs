//! Shared harness of the privileged real-packet tests (tests/bypass.rs):
//! the root/bpffs check, a pin-dir guard around `KernelDatapath`, a
//! node namespace with a bridge and one namespace per workload (veth pairs),
//! policy compiled from YAML, raw AF_PACKET injection and sniffing, and
//! TCP listeners. Everything it creates is removed by Drop guards, also when
//! a test fails. It never touches the host's own network namespace.
//!
//! Names: netns `<prefix>-<pid>-<tag>-<name>` (the pid: several people or
//! agents may run the same test binary at once on one machine), host-side
//! devices `<prefix>-<name>` inside the test's own node namespace, pins
//! `/sys/fs/bpf/<prefix>-test-*`.

#![allow(dead_code)]

pub mod wire;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netpol::api::model::{Interface, PolicySet};
use netpol::datapath::{Attachment, Datapath, DatapathSettings, KernelDatapath};
use netpol::policy::compile::{compile, CompileOptions};
use netpol::policy::types::Compiled;

/// Prefix of every name this harness creates (netns, links, pins).
pub const PREFIX: &str = "npy";

/// True if privileged tests can run; otherwise skip with a message, or fail
/// under CI=true.
pub fn privileged(test: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not running as root")
    } else if !std::path::Path::new("/sys/fs/bpf").is_dir() {
        Some("/sys/fs/bpf does not exist")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("the `ip` command (iproute2) is missing")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: privileged test cannot run under CI=true: {why}");
            }
            eprintln!("skipping {test}: {why}");
            false
        }
    }
}

static PIN_SEQ: AtomicU32 = AtomicU32::new(0);

/// Settings sized for tests, with a generous event budget so every drop is
/// reported.
pub fn settings() -> DatapathSettings {
    DatapathSettings {
        ct_max_entries: 4096,
        ipcache_max_entries: 1024,
        policy_max_entries: 4096,
        endpoint_max_entries: 64,
        events_per_sec: 100_000,
        ..DatapathSettings::default()
    }
}

/// A KernelDatapath under its own pin dir; Drop detaches and unpins everything.
pub struct Dp {
    dp: Option<KernelDatapath>,
    pub pin: PathBuf,
}

impl Dp {
    pub fn open(test: &str, settings: &DatapathSettings) -> Dp {
        let n = PIN_SEQ.fetch_add(1, Ordering::SeqCst);
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/{PREFIX}-test-{test}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pin);
        let dp = KernelDatapath::open(&pin, settings).expect("open the kernel datapath");
        Dp { dp: Some(dp), pin }
    }

    pub fn dp(&mut self) -> &mut KernelDatapath {
        self.dp.as_mut().expect("datapath open")
    }
}

impl Drop for Dp {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.as_mut() {
            let _ = dp.detach_all();
        }
        if self.pin.exists() {
            if let Ok(mut dp) = KernelDatapath::open(&self.pin, &settings()) {
                let _ = dp.detach_all();
            }
            let _ = std::fs::remove_dir_all(&self.pin);
        }
    }
}

fn ip_cmd(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `f` in a thread that joined network namespace `ns`.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .expect("namespace thread panicked")
    })
}

/// Move the calling thread into network namespace `ns`.
pub fn enter(ns: &str) {
    let file = File::open(format!("/run/netns/{ns}")).expect("open netns");
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// One workload of a [`Topo`]: name and addresses with prefix length.
pub struct Workload<'a> {
    pub name: &'a str,
    pub addrs: &'a [&'a str],
}

/// A node namespace with a bridge `<prefix>br` (optionally addressed: the
/// node's own interface) and one namespace per workload, linked by a veth
/// pair (host side `<prefix>-<name>` on the bridge, `eth0` inside, MAC
/// 02:07:00:00:00:<k+1>). Drop deletes the namespaces and with them every link.
pub struct Topo {
    pub node: String,
    pub tag: String,
    names: Vec<String>,
    namespaces: Vec<String>,
}

pub const BRIDGE: &str = "npybr";
pub const NODE_MAC: [u8; 6] = [0x02, 0x07, 0, 0, 0, 0xfe];

impl Topo {
    pub fn new(tag: &str, node_addrs: &[&str], workloads: &[Workload<'_>]) -> Topo {
        let tag = format!("{}-{tag}", std::process::id());
        let node = format!("{PREFIX}-{tag}-node");
        let _ = Command::new("ip").args(["netns", "del", &node]).output();
        for w in workloads {
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("{PREFIX}-{tag}-{}", w.name)])
                .output();
        }
        // The guard exists before the first namespace so a failure cleans up.
        let mut topo = Topo {
            node: node.clone(),
            tag: tag.clone(),
            names: Vec::new(),
            namespaces: Vec::new(),
        };
        ip_cmd(&["netns", "add", &node]);
        topo.namespaces.push(node.clone());
        ip_cmd(&["-n", &node, "link", "set", "lo", "up"]);
        // With br_netfilter loaded the bridge validates and trims IP packets
        // itself (and drops malformed ones), which would hide what the
        // datapath let through: the node bridges frames untouched instead.
        for key in [
            "bridge-nf-call-iptables",
            "bridge-nf-call-ip6tables",
            "bridge-nf-call-arptables",
        ] {
            let path = format!("/proc/sys/net/bridge/{key}");
            let _ = in_ns(&node, || std::fs::write(&path, "0"));
        }
        ip_cmd(&[
            "-n",
            &node,
            "link",
            "add",
            BRIDGE,
            "address",
            &mac_str(NODE_MAC),
            "type",
            "bridge",
        ]);
        for a in node_addrs {
            add_addr(&node, BRIDGE, a);
        }
        ip_cmd(&["-n", &node, "link", "set", BRIDGE, "up"]);
        for (k, w) in workloads.iter().enumerate() {
            let ns = format!("{PREFIX}-{tag}-{}", w.name);
            ip_cmd(&["netns", "add", &ns]);
            topo.namespaces.push(ns.clone());
            topo.names.push(w.name.to_string());
            let host = format!("{PREFIX}-{}", w.name);
            let mac = mac_str(Topo::mac_of(k));
            ip_cmd(&[
                "-n", &node, "link", "add", &host, "type", "veth", "peer", "name", "eth0",
                "address", &mac, "netns", &ns,
            ]);
            ip_cmd(&["-n", &node, "link", "set", &host, "master", BRIDGE, "up"]);
            ip_cmd(&["-n", &ns, "link", "set", "lo", "up"]);
            for a in w.addrs {
                add_addr(&ns, "eth0", a);
            }
            ip_cmd(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        topo
    }

    fn mac_of(k: usize) -> [u8; 6] {
        [0x02, 0x07, 0, 0, 0, k as u8 + 1]
    }

    pub fn ns(&self, w: &str) -> String {
        format!("{PREFIX}-{}-{w}", self.tag)
    }

    /// MAC of workload `w`'s eth0.
    pub fn mac(&self, w: &str) -> [u8; 6] {
        let k = self
            .names
            .iter()
            .position(|n| n == w)
            .unwrap_or_else(|| panic!("no workload {w}"));
        Topo::mac_of(k)
    }

    /// ifindex of a device in the node namespace.
    pub fn node_ifindex(&self, dev: &str) -> u32 {
        in_ns(&self.node, || {
            nix::net::if_::if_nametoindex(dev)
                .unwrap_or_else(|e| panic!("if_nametoindex {dev}: {e}"))
        })
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn add_addr(ns: &str, dev: &str, a: &str) {
    if a.contains(':') {
        ip_cmd(&["-n", ns, "addr", "add", a, "dev", dev, "nodad"]);
    } else {
        ip_cmd(&["-n", ns, "addr", "add", a, "dev", dev]);
    }
}

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Compile policy YAML and registry YAML as the daemon would (this host is
/// `<prefix>-node`; endpoints without `node` are local), keeping only the
/// local endpoints' entries.
pub fn compile_yaml(policies: &str, registry: &str) -> Compiled {
    let pfile = std::path::Path::new("/etc/netpol.d/test.yaml");
    let rfile = std::path::Path::new("/etc/netpol/endpoints.d/test.yaml");
    let policies = netpol::api::parse_policies(pfile, policies).unwrap_or_else(|p| {
        panic!(
            "test policies do not parse: {}",
            p.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    let registry = netpol::api::parse_registry(rfile, registry).unwrap_or_else(|p| {
        panic!(
            "test registry does not parse: {}",
            p.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    let opts = CompileOptions {
        node_name: format!("{PREFIX}-node"),
        ..Default::default()
    };
    let mut c = compile(&PolicySet { policies }, &registry, &opts);
    c.retain_local_entries();
    c
}

/// Attachments of every local endpoint of `c`, resolved in the topology's
/// node namespace.
pub fn attachments(topo: &Topo, c: &Compiled) -> Vec<Attachment> {
    c.endpoints
        .iter()
        .filter(|e| e.local)
        .map(|e| match &e.interface {
            Some(Interface::Name(n)) => Attachment {
                slot: e.slot,
                ifindex: topo.node_ifindex(n),
            },
            other => panic!("endpoint {} has interface {other:?}", e.name),
        })
        .collect()
}

/// Apply `c` and attach its local endpoints (in the node namespace).
pub fn enforce(dp: &mut Dp, topo: &Topo, c: &Compiled) -> Vec<Attachment> {
    let att = attachments(topo, c);
    dp.dp().apply(c, &att).expect("apply");
    let k = dp.dp();
    let a2 = att.clone();
    in_ns(&topo.node, move || k.sync_attachments(&a2)).expect("attach");
    att
}

/// Slot of the endpoint named `name` in `c`.
pub fn slot(c: &Compiled, name: &str) -> u32 {
    c.endpoints
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no endpoint {name}"))
        .slot
}

// ---------------------------------------------------------------------------
// Raw frames

const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u8 = 4;

fn packet_socket(ns: &str, dev: &str, proto: u16) -> (OwnedFd, i32) {
    in_ns(ns, || {
        let ifindex = nix::net::if_::if_nametoindex(dev)
            .unwrap_or_else(|e| panic!("{ns}: if_nametoindex {dev}: {e}"))
            as i32;
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto.to_be()),
            )
        };
        assert!(
            fd >= 0,
            "socket(AF_PACKET): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto.to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a valid sockaddr_ll and its size is passed with it.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert!(
            r == 0,
            "bind(AF_PACKET {dev}): {}",
            std::io::Error::last_os_error()
        );
        (fd, ifindex)
    })
}

/// Sends complete Ethernet frames out of a device of a namespace (an
/// AF_PACKET socket: the frame goes out exactly as built, tags and all).
pub struct Injector {
    fd: OwnedFd,
}

impl Injector {
    pub fn open(ns: &str, dev: &str) -> Injector {
        // Protocol 0: this socket sends only, it receives nothing.
        let (fd, _) = packet_socket(ns, dev, 0);
        Injector { fd }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: the buffer and its length are valid for the call.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        assert!(
            n == frame.len() as isize,
            "send raw frame: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Records every frame a device of a namespace receives (not the ones it
/// sends), on a background thread, from the moment it is opened.
pub struct Sniffer {
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sniffer {
    pub fn open(ns: &str, dev: &str) -> Sniffer {
        let (fd, _) = packet_socket(ns, dev, ETH_P_ALL);
        Sniffer::run(vec![fd], true)
    }

    /// What the IP stack of a namespace delivers locally for `proto` (raw
    /// IPv4 and IPv6 sockets): packets that got past every tc hook, after
    /// reassembly, whether or not a socket would take them. Unlike an
    /// AF_PACKET tap (which runs before tc ingress) this sees only what the
    /// datapath let in.
    pub fn stack(ns: &str, proto: i32) -> Sniffer {
        let fds = in_ns(ns, || {
            [libc::AF_INET, libc::AF_INET6]
                .iter()
                .map(|&af| {
                    // SAFETY: plain socket(2) call; the result is checked before use.
                    let fd =
                        unsafe { libc::socket(af, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
                    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
                    // SAFETY: fd is a fresh descriptor we own.
                    unsafe { OwnedFd::from_raw_fd(fd) }
                })
                .collect::<Vec<_>>()
        });
        Sniffer::run(fds, false)
    }

    fn run(fds: Vec<OwnedFd>, packet: bool) -> Sniffer {
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f2, s2) = (frames.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s2.load(Ordering::Relaxed) {
                let mut pfds: Vec<libc::pollfd> = fds
                    .iter()
                    .map(|fd| libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: a valid array of pollfds and its length.
                if unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 10) } <= 0 {
                    continue;
                }
                for fd in &fds {
                    loop {
                        // SAFETY: sockaddr_ll is plain old data; all-zero is
                        // valid, and it is big enough for sockaddr_in/in6 too.
                        let mut sll: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
                        let mut len = size_of::<libc::sockaddr_storage>() as u32;
                        // SAFETY: buf, sll and len are valid for the call and sized as passed.
                        let n = unsafe {
                            libc::recvfrom(
                                fd.as_raw_fd(),
                                buf.as_mut_ptr() as *mut libc::c_void,
                                buf.len(),
                                libc::MSG_DONTWAIT,
                                &mut sll as *mut libc::sockaddr_storage as *mut libc::sockaddr,
                                &mut len,
                            )
                        };
                        if n <= 0 {
                            break;
                        }
                        // SAFETY: for an AF_PACKET socket the kernel filled a sockaddr_ll.
                        let outgoing = packet
                            && unsafe {
                                (*(&sll as *const libc::sockaddr_storage
                                    as *const libc::sockaddr_ll))
                                    .sll_pkttype
                            } == PACKET_OUTGOING;
                        if !outgoing {
                            f2.lock().unwrap().push(buf[..n as usize].to_vec());
                        }
                    }
                }
            }
        });
        Sniffer {
            frames,
            stop,
            thread: Some(thread),
        }
    }

    /// Wait up to `timeout` for a received frame containing `needle`.
    pub fn seen(&self, needle: &[u8], timeout: Duration) -> bool {
        self.wait(timeout, |f| contains(f, needle))
    }

    /// Wait up to `timeout` for a received frame matching `pred`.
    pub fn wait(&self, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.frames.lock().unwrap().iter().any(|f| pred(f)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every frame received so far.
    pub fn frames(&self) -> Vec<Vec<u8>> {
        self.frames.lock().unwrap().clone()
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A unique marker to put in a payload and look for on the far side.
pub fn marker() -> Vec<u8> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let mut m = b"NPYMARK".to_vec();
    m.extend_from_slice(&std::process::id().to_be_bytes());
    m.extend_from_slice(&n.to_be_bytes());
    m
}

// ---------------------------------------------------------------------------
// Sockets

/// TCP listeners on `[::]:port` (dual stack) in a namespace; the kernel
/// completes handshakes into the backlog, so a SYN that reaches the stack is
/// answered with a SYN-ACK. Dropping the value closes them.
pub struct Listeners(Vec<TcpListener>);

impl Listeners {
    pub fn start(ns: &str, ports: &[u16]) -> Listeners {
        Listeners(in_ns(ns, || {
            ports
                .iter()
                .map(|p| {
                    TcpListener::bind(SocketAddr::new("::".parse().unwrap(), *p))
                        .expect("bind a test listener")
                })
                .collect()
        }))
    }
}

/// A TCP connection from namespace `ns` that completes within `timeout`.
pub fn tcp_connects(ns: &str, dst: IpAddr, port: u16, timeout: Duration) -> bool {
    in_ns(ns, || {
        TcpStream::connect_timeout(&SocketAddr::new(dst, port), timeout).is_ok()
    })
}

/// Counters per slot, for messages.
pub fn counters(dp: &mut Dp) -> BTreeMap<u32, netpol::datapath::Counters> {
    dp.dp().counters()
}

//! Raw frames between network namespaces: [`Injector`] sends complete
//! Ethernet frames out of a device exactly as built (tags and all), [`Sniffer`]
//! records what a device receives (or what a namespace's IP stack delivers),
//! and [`marker`]s tell one attempt's frames from another's.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::netns::in_ns;

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

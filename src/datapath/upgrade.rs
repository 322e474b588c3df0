//! Moving devices from cls_bpf to tcx in the background.
//!
//! A tcx attach waits for an RCU grace period under `rtnl_lock` (the kernel
//! swaps the device's program array, then `synchronize_rcu`), 6–24 ms a link
//! here; a cls_bpf filter is in place in about a millisecond. When a sync has
//! many devices to attach (a cold start among hundreds of workloads), the
//! datapath attaches them with cls_bpf first, so they are enforced at once,
//! and this worker thread then gives each a pair of pinned tcx links. The
//! thread that owns the datapath finishes each move ([`super::KernelDatapath`]
//! takes the cls_bpf filters away once the tcx links are pinned).
//!
//! While a device has both, a packet the tcx program passes (`TCX_NEXT`) also
//! meets the cls_bpf twin: the same program over the same maps, so the same
//! verdict; the window is one tcx attach. The worker touches nothing but the
//! two program fds it holds (duplicates), the namespace it is given and the
//! link pins it is told; it never calls into the skeleton.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{DatapathError, Hook};

/// One device to move: its index in `netns`, and where its two links go
/// (ingress, egress).
pub(super) struct Job {
    pub ifindex: u32,
    pub netns: OwnedFd,
    pub pins: [PathBuf; 2],
}

/// A device the worker is done with: both tcx links pinned, or why not (then
/// neither is).
pub(super) struct Done {
    pub ifindex: u32,
    pub result: Result<(), DatapathError>,
}

/// The worker and what was handed to it.
pub(super) struct Upgrader {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upgrader {
    /// A worker attaching `progs` (the tcx ingress and egress programs).
    pub fn start(progs: [OwnedFd; 2]) -> std::io::Result<Upgrader> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (tx, done) = mpsc::channel::<Done>();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::Builder::new()
            .name("netpol-tcx".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    if halt.load(Ordering::Acquire) {
                        return;
                    }
                    let result = move_device(&progs, &job);
                    if tx
                        .send(Done {
                            ifindex: job.ifindex,
                            result,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            })?;
        Ok(Upgrader {
            jobs: Some(jobs),
            done,
            stop,
            thread: Some(thread),
        })
    }

    /// Hand a device over; false if the worker is gone.
    pub fn send(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }

    /// The devices finished since the last call.
    pub fn finished(&self) -> Vec<Done> {
        self.done.try_iter().collect()
    }

    /// Let the device in hand finish, skip the others, and end the thread;
    /// what it finished is still in [`Upgrader::finished`].
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Upgrader {
    fn drop(&mut self) {
        self.stop();
    }
}

fn move_device(progs: &[OwnedFd; 2], job: &Job) -> Result<(), DatapathError> {
    nix::sched::setns(&job.netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        DatapathError::Kernel {
            op: format!("enter the namespace of ifindex {}", job.ifindex),
            source: std::io::Error::from_raw_os_error(e as i32),
        }
    })?;
    for (i, hook) in [Hook::Ingress, Hook::Egress].into_iter().enumerate() {
        if let Err(e) = attach_tcx_link(progs[i].as_fd(), job.ifindex, hook, &job.pins[i]) {
            // Both or neither: an unpinned link (fd closed) is detached.
            for p in &job.pins[..i] {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Attach `prog` to `ifindex`'s `hook` as a tcx link and pin it at `pin`
/// (replacing what is pinned there). A link whose pin fails is detached: its
/// only fd closes on return. Touches no skeleton: callable from any thread.
pub(super) fn attach_tcx_link(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    hook: Hook,
    pin: &Path,
) -> Result<(), DatapathError> {
    let attach_type = match hook {
        Hook::Ingress => libbpf_sys::BPF_TCX_INGRESS,
        Hook::Egress => libbpf_sys::BPF_TCX_EGRESS,
    };
    let opts = libbpf_sys::bpf_link_create_opts {
        sz: size_of::<libbpf_sys::bpf_link_create_opts>() as _,
        ..Default::default()
    };
    // SAFETY: a valid program fd and options of the size given; the result is checked.
    let fd = unsafe {
        libbpf_sys::bpf_link_create(prog.as_raw_fd(), ifindex as i32, attach_type, &opts)
    };
    if fd < 0 {
        return Err(DatapathError::Kernel {
            op: format!("tcx attach {} on ifindex {ifindex}", hook.name()),
            source: std::io::Error::from_raw_os_error(-fd),
        });
    }
    // SAFETY: a fresh fd owned by nobody else.
    let link = unsafe { OwnedFd::from_raw_fd(fd) };
    if pin.exists() {
        let _ = std::fs::remove_file(pin);
    }
    // The pin keeps the link (and enforcement) attached once our fd closes
    // below, also after this process exits.
    super::kernel::pin_fd(link.as_raw_fd(), pin)
}

//! [`KernelDatapath`]: the real [`Datapath`] on top of the libbpf-cargo
//! skeleton. It owns loading (fresh, or adopting the pins of an earlier
//! process), pinning under `pin_dir/{maps,progs,links}`, attaching (tcx, with a
//! clsact/cls_bpf fallback), the two-generation swap and the event reader.
//!
//! Each generation keeps its inner maps; an apply writes only the keys that
//! differ from the inactive generation's shadow, flips, and waits for the RCU
//! grace period that makes the old generation writable again on a background
//! thread that the next apply joins (see bpf/README.md, "Generations and pins").
//!
//! Interface indexes are resolved in the network namespace of the calling
//! thread: call `sync_attachments` from the namespace the devices live in.

use std::collections::{BTreeMap, BTreeSet};
use std::mem::{ManuallyDrop, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use libbpf_rs::query::LinkTypeInfo;
use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{
    Link, MapCore, MapFlags, MapHandle, MapType, OpenObject, RingBufferBuilder, TcHookBuilder,
    TC_EGRESS, TC_INGRESS,
};

use super::generation::{self, Contents, Table};
use super::layout::{self, EventRecord, KernelSlots, StateValue};
use super::skel::types::{self, np_layout};
use super::skel::{NetpolSkel, NetpolSkelBuilder};
use super::upgrade::{self, Upgrader};
use super::{
    Attachment, Counters, Datapath, DatapathError, DatapathSettings, DnsProxyTarget, DnsRedirect,
    DnsRedirectStats, VerdictEvent,
};
use crate::policy::identity;
use crate::policy::types::{Compiled, IpcacheEntry};

/// The layout version this build reads and writes (netpol_state_v1).
const LAYOUT_VERSION: u32 = np_layout::NP_LAYOUT_VERSION.0;
/// The older layout with every policy entry in the trie and no
/// netpol_policy_exact_v1: adopted as it is (an empty exact map in a slot
/// leaves the trie's verdicts), rewritten into the split at the next apply.
const LAYOUT_POLICY_TRIE: u32 = np_layout::NP_LAYOUT_VERSION_POLICY_TRIE.0;
/// The older layout this build adopts, migrating its conntrack entries
/// (netpol_ct_v1 → netpol_ct_v2); every other map is the same.
const LAYOUT_CT_V1: u32 = np_layout::NP_LAYOUT_VERSION_CT_V1.0;

/// BPF_FS_MAGIC from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// Handle and priority of our cls_bpf filters in the clsact fallback.
const TC_HANDLE: u32 = 0x4e50;
const TC_PRIORITY: u32 = 0x4e50;

/// A tc hook of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    pub(super) fn name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

/// How a device is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links (kernel 6.6+), pinned under `links/tcx-<ifindex>-<hook>`.
    Tcx,
    /// clsact qdisc + cls_bpf filter; the program is pinned under
    /// `links/tc-<ifindex>-<hook>` to remember it.
    Clsact,
}

/// The result of one BPF_PROG_TEST_RUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value: `NP_PASS` (-1, TCX_NEXT) or `NP_DROP` (2).
    pub retval: i32,
    /// Average time per run as measured by the kernel.
    pub duration: Duration,
}

impl TestRun {
    pub fn passed(&self) -> bool {
        // Widened on both sides: the enum's integer type follows clang's BTF
        // (unsigned before clang 15, signed after).
        i64::from(self.retval) != i64::from(types::np_action::NP_DROP.0)
    }
}

fn kerr(op: impl Into<String>) -> impl FnOnce(libbpf_rs::Error) -> DatapathError {
    let op = op.into();
    move |source| DatapathError::Libbpf { op, source }
}

fn ioerr(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> DatapathError {
    let op = op.into();
    move |source| DatapathError::Kernel { op, source }
}

/// The loaded skeleton together with the storage it borrows.
struct Loaded {
    skel: ManuallyDrop<NetpolSkel<'static>>,
    storage: *mut MaybeUninit<OpenObject>,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        // SAFETY: `skel` borrows `*storage`, so it is dropped first; `storage`
        // came from Box::into_raw in `open_skel` and is freed exactly once.
        unsafe {
            ManuallyDrop::drop(&mut self.skel);
            drop(Box::from_raw(self.storage));
        }
    }
}

// SAFETY: libbpf objects are not tied to the thread that created them; all
// access goes through `&mut KernelDatapath` (or `&` for read-only syscalls).
unsafe impl Send for Loaded {}

// The daemon may move its datapath between threads.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<KernelDatapath>();
};

/// The inner maps of one generation (one slot of the outer maps).
struct Generation {
    ipcache: MapHandle,
    endpoints: MapHandle,
    policy: MapHandle,
    policy_exact: MapHandle,
    /// The maps sit in the outer maps' slot (fresh ones are put there on
    /// their first fill).
    installed: bool,
    /// Exactly what the maps hold; `None` when unknown (adopted, or a write
    /// failed half way): read back from the kernel before the next diff.
    shadow: Option<Contents>,
}

/// The kernel datapath of one instance (one `pin_dir`).
pub struct KernelDatapath {
    loaded: Loaded,
    pin_dir: PathBuf,
    settings: DatapathSettings,
    /// Attached devices: ifindex → how.
    attached: BTreeMap<u32, AttachMode>,
    /// Kernel slots of the last applied state's attachments (layout::KernelSlots:
    /// only attached endpoints have one); `None` before the first apply of this
    /// process, when they are read back from the active generation.
    kslots: Option<KernelSlots>,
    generation: u64,
    /// netpol_barrier_v1 and the inner map put into it to wait for running
    /// programs (shared with the thread that waits).
    barrier: Arc<(MapHandle, MapHandle)>,
    /// The wait for a grace period after the last flip, running in the
    /// background; joined before the generation it protects is written.
    pending_barrier: Option<JoinHandle<Result<(), DatapathError>>>,
    /// The persistent inner maps of generation 0 and 1 with a shadow of
    /// their content (`None`: not created yet, or to be replaced).
    gens: [Option<Generation>; 2],
    force_clsact: bool,
    /// The kernel has tcx; without it the tcx programs are not loaded.
    tcx: bool,
    adopted: bool,
    /// Network namespace each clsact attachment was made in (tc filters are
    /// addressed by ifindex, which is per namespace; tcx links are not).
    clsact_netns: BTreeMap<u32, std::os::fd::OwnedFd>,
    /// A sync with more devices to attach than this attaches them with
    /// cls_bpf and moves them to tcx in the background (see [`upgrade`]).
    direct_tcx_max: usize,
    /// The worker moving cls_bpf devices to tcx (started on first use).
    upgrader: Option<Upgrader>,
    /// Devices handed to it and not reported back yet.
    upgrading: BTreeSet<u32>,
    /// Devices whose move failed, with why: they stay on cls_bpf.
    upgrade_failed: BTreeMap<u32, String>,
    /// `prepare_spare` ran (it runs once per process).
    spare_tried: bool,
    /// The ipcache of the last applied state and its kernel slots: what the
    /// active generation's shadow holds as ipcache, so the next apply writes
    /// the difference over it (`Contents::build_from`); `None` until an
    /// apply of this process succeeds, and after one fails.
    last_ipcache: Option<(Vec<IpcacheEntry>, KernelSlots)>,
    /// When the moves in hand were queued, and how many are done.
    upgrade_run: Option<(std::time::Instant, usize)>,
}

/// How many devices one sync attaches with tcx directly (each costs a grace
/// period under `rtnl_lock`); above that, cls_bpf first.
pub const DIRECT_TCX_MAX: usize = 4;

impl std::fmt::Debug for KernelDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDatapath")
            .field("pin_dir", &self.pin_dir)
            .field("attached", &self.attached)
            .field("generation", &self.generation)
            .field("adopted", &self.adopted)
            .finish()
    }
}

impl Drop for KernelDatapath {
    fn drop(&mut self) {
        // The background grace-period wait holds a reference to our maps; let
        // it end (at most one grace period) so nothing outlives the datapath.
        if let Some(h) = self.pending_barrier.take() {
            let _ = h.join();
        }
        // What stays pinned for the next process is one attachment a device:
        // the moves in hand are finished, the rest stay on cls_bpf.
        self.stop_upgrades();
    }
}

/// Make sure `dir`'s parent is a bpf filesystem, mounting /sys/fs/bpf if needed.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    // The f_type width differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if is_bpffs(parent) {
        return Ok(());
    }
    if parent == Path::new("/sys/fs/bpf") {
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| DatapathError::Kernel {
            op: "mount -t bpf bpf /sys/fs/bpf".into(),
            source: std::io::Error::from(e),
        })?;
        if is_bpffs(parent) {
            return Ok(());
        }
    }
    Err(DatapathError::NotBpffs {
        dir: parent.to_path_buf(),
        pin_dir: pin_dir.to_path_buf(),
    })
}

/// Our named maps are pinned; libbpf's internal ones (.rodata, .bss) are
/// private to one load.
fn is_pinned_map(name: &str) -> bool {
    name.starts_with("netpol_") && !name.contains('.')
}

fn map_names(skel: &NetpolSkel<'_>) -> Vec<String> {
    skel.object()
        .maps()
        .filter_map(|m| m.name().to_str().map(str::to_owned))
        .filter(|n| is_pinned_map(n))
        .collect()
}

/// tcx (and its program types) exists from Linux 6.6 on.
fn kernel_has_tcx() -> bool {
    let Ok(u) = nix::sys::utsname::uname() else {
        return true;
    };
    let release = u.release().to_string_lossy().into_owned();
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    match (nums.next(), nums.next()) {
        (Some(major), Some(minor)) => (major, minor) >= (6, 6),
        _ => true,
    }
}

/// Every map's key and value sizes must be the layouts' (after adoption too:
/// a pinned map of another build must not be read with these types).
fn verify_layouts(skel: &NetpolSkel<'_>) -> Result<(), DatapathError> {
    use std::mem::size_of;
    let m = &skel.maps;
    let checks: [(&dyn MapCore, &'static str, usize, usize); 9] = [
        (
            &m.netpol_state_v1,
            "netpol_state_v1",
            4,
            size_of::<StateValue>(),
        ),
        (
            &m.netpol_ct_v2,
            "netpol_ct_v2",
            size_of::<layout::CtKey>(),
            size_of::<layout::CtValue>(),
        ),
        (
            &m.netpol_frag_v1,
            "netpol_frag_v1",
            size_of::<layout::FragKey>(),
            size_of::<layout::FragValue>(),
        ),
        (
            &m.netpol_failsafe_v1,
            "netpol_failsafe_v1",
            size_of::<layout::FailsafeKey>(),
            4,
        ),
        (
            &m.netpol_counters_v1,
            "netpol_counters_v1",
            4,
            size_of::<layout::CountersValue>(),
        ),
        (
            &m.netpol_ratelimit_v1,
            "netpol_ratelimit_v1",
            4,
            size_of::<layout::RatelimitValue>(),
        ),
        (&m.netpol_policy_v1, "netpol_policy_v1", 4, 4),
        (&m.netpol_policy_exact_v1, "netpol_policy_exact_v1", 4, 4),
        (
            &m.netpol_bypass_v1,
            "netpol_bypass_v1",
            4,
            size_of::<layout::BypassEntry>(),
        ),
    ];
    for (map, name, key, value) in checks {
        if map.key_size() as usize != key || map.value_size() as usize != value {
            return Err(DatapathError::MapLayout {
                map: name,
                key: map.key_size(),
                value: map.value_size(),
                want_key: key,
                want_value: value,
            });
        }
    }
    Ok(())
}

fn open_skel(
    settings: &DatapathSettings,
    maps_dir: &Path,
    adopt: bool,
    tcx: bool,
) -> Result<Loaded, DatapathError> {
    let storage: *mut MaybeUninit<OpenObject> = Box::into_raw(Box::new(MaybeUninit::uninit()));
    // Frees `storage` if anything below fails before `Loaded` owns it.
    struct Guard(*mut MaybeUninit<OpenObject>, bool);
    impl Drop for Guard {
        fn drop(&mut self) {
            if !self.1 {
                // SAFETY: allocated above and not yet owned by a `Loaded`;
                // whatever borrowed it has been dropped by now.
                unsafe { drop(Box::from_raw(self.0)) }
            }
        }
    }
    let mut guard = Guard(storage, false);
    let skel = {
        // SAFETY: `storage` stays allocated until `Loaded::drop`, which drops
        // the skeleton borrowing it first.
        let storage_ref: &'static mut MaybeUninit<OpenObject> = unsafe { &mut *storage };
        let mut open = NetpolSkelBuilder::default()
            .open(storage_ref)
            .map_err(kerr("open the bpf object"))?;
        let ro = open
            .maps
            .rodata_data
            .as_deref_mut()
            .ok_or(DatapathError::NoSettings)?;
        let secs = |s: u32| u64::from(s) * 1_000_000_000;
        // One literal for all of .rodata: a load-time setting added to
        // bpf/lib/config.h and not set here fails the build.
        *ro = types::rodata {
            cfg_ct_syn_ns: secs(settings.ct_timeout_syn_secs),
            cfg_ct_established_ns: secs(settings.ct_timeout_established_secs),
            cfg_ct_close_ns: secs(settings.ct_timeout_close_secs),
            cfg_ct_other_ns: secs(settings.ct_timeout_other_secs),
            cfg_recheck_established: u32::from(settings.recheck_established),
            cfg_allow_sample_rate: settings.allow_sample_rate,
            cfg_events_per_sec: settings.events_per_sec,
            cfg_world_identity: identity::WORLD,
            cfg_stage: settings.stage.code(),
            cfg_local_bypass: u32::from(settings.local_bypass),
        };
        open.maps
            .netpol_ct_v2
            .set_max_entries(settings.ct_max_entries.max(1))
            .map_err(kerr("size netpol_ct_v2"))?;
        open.maps
            .netpol_counters_v1
            .set_max_entries(settings.endpoint_max_entries.max(1))
            .map_err(kerr("size netpol_counters_v1"))?;
        if adopt {
            for mut m in open.open_object_mut().maps_mut() {
                let Some(name) = m.name().to_str().map(str::to_owned) else {
                    continue;
                };
                if !is_pinned_map(&name) {
                    continue;
                }
                let path = maps_dir.join(&name);
                if !path.exists() {
                    // New in this layout (netpol_ct_v2 over a layout-1
                    // instance): created at load, pinned by `open`.
                    continue;
                }
                // Keep the pinned map's size: sizes from a changed config apply
                // after a detach, not by failing to adopt.
                if let Ok(pinned) = MapHandle::from_pinned_path(&path) {
                    if pinned.max_entries() != m.max_entries() {
                        let _ = m.set_max_entries(pinned.max_entries());
                    }
                }
                m.reuse_pinned_map(&path).map_err(kerr(format!(
                    "adopt pinned map {} (a different layout or size? detach the old instance first)",
                    path.display()
                )))?;
            }
        }
        if !tcx {
            // An older kernel refuses the tcx attach types at load time.
            open.progs.netpol_tcx_ingress.set_autoload(false);
            open.progs.netpol_tcx_egress.set_autoload(false);
        }
        open.load().map_err(kerr("load the bpf programs"))?
    };
    guard.1 = true;
    Ok(Loaded {
        skel: ManuallyDrop::new(skel),
        storage,
    })
}

impl KernelDatapath {
    /// Opens the datapath pinned at `pin_dir`: adopts the pinned maps and
    /// links of an earlier process (same layout version) so enforcement never
    /// lapses, or loads everything fresh and pins it.
    pub fn open(
        pin_dir: &Path,
        settings: &DatapathSettings,
    ) -> Result<KernelDatapath, DatapathError> {
        ensure_bpffs(pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let progs_dir = pin_dir.join("progs");
        let links_dir = pin_dir.join("links");
        for d in [&maps_dir, &progs_dir, &links_dir] {
            std::fs::create_dir_all(d).map_err(ioerr(format!("create {}", d.display())))?;
        }
        let adopt = maps_dir.join("netpol_state_v1").exists();
        if !adopt {
            // Leftovers of a load that died before pinning its state map.
            for entry in std::fs::read_dir(&maps_dir)
                .map_err(ioerr(format!("read {}", maps_dir.display())))?
                .flatten()
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let tcx = kernel_has_tcx();
        let mut loaded = open_skel(settings, &maps_dir, adopt, tcx)?;

        verify_layouts(&loaded.skel)?;
        let state_map = &loaded.skel.maps.netpol_state_v1;
        let mut state = read_state(state_map)?;
        if adopt {
            if ![LAYOUT_VERSION, LAYOUT_POLICY_TRIE, LAYOUT_CT_V1].contains(&state.layout_version) {
                return Err(DatapathError::LayoutVersion {
                    maps_dir,
                    found: state.layout_version,
                    supported: LAYOUT_VERSION,
                });
            }
        } else {
            state = StateValue {
                active: 0,
                layout_version: LAYOUT_VERSION,
                generation: 0,
            };
            write_state(state_map, &state)?;
        }
        // Pin every map that has no pin yet: all of them on a fresh load (the
        // leftovers of a dead one were removed above), those new in this
        // layout when adopting (netpol_ct_v2 over a layout-1 instance).
        let names = map_names(&loaded.skel);
        for mut m in loaded.skel.object_mut().maps_mut() {
            let Some(name) = m.name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = maps_dir.join(&name);
            if names.contains(&name) && !path.exists() {
                m.pin(&path)
                    .map_err(kerr(format!("pin {}", path.display())))?;
            }
        }

        // Programs: pin this process's programs (replacing an earlier process's).
        for mut p in loaded.skel.object_mut().progs_mut() {
            if !p.autoload() {
                continue;
            }
            let Some(name) = p.name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = progs_dir.join(&name);
            if path.exists() {
                std::fs::remove_file(&path).map_err(ioerr(format!("unpin {}", path.display())))?;
            }
            p.pin(&path)
                .map_err(kerr(format!("pin {}", path.display())))?;
        }

        let barrier_outer = MapHandle::from_pinned_path(maps_dir.join("netpol_barrier_v1"))
            .map_err(kerr("open netpol_barrier_v1"))?;
        let barrier_inner = MapHandle::create(
            MapType::Array,
            Some("np_barrier"),
            4,
            4,
            1,
            &libbpf_sys::bpf_map_create_opts {
                sz: size_of::<libbpf_sys::bpf_map_create_opts>() as _,
                ..Default::default()
            },
        )
        .map_err(kerr("create the barrier map"))?;

        let mut dp = KernelDatapath {
            loaded,
            pin_dir: pin_dir.to_path_buf(),
            settings: settings.clone(),
            attached: BTreeMap::new(),
            kslots: None,
            generation: state.generation,
            barrier: Arc::new((barrier_outer, barrier_inner)),
            pending_barrier: None,
            gens: [None, None],
            force_clsact: !tcx,
            tcx,
            adopted: adopt,
            clsact_netns: BTreeMap::new(),
            direct_tcx_max: DIRECT_TCX_MAX,
            upgrader: None,
            upgrading: BTreeSet::new(),
            upgrade_failed: BTreeMap::new(),
            spare_tried: false,
            last_ipcache: None,
            upgrade_run: None,
        };
        dp.write_failsafe()?;
        if adopt {
            let from_v1 = state.layout_version == LAYOUT_CT_V1;
            // A layout-1 instance's flows: copied before its links switch to
            // our programs (so no established flow meets an empty table),
            // and again after (the flows its programs added meanwhile).
            if from_v1 {
                dp.migrate_ct_v1(&state)?;
            }
            dp.adopt_links()?;
            if from_v1 {
                dp.migrate_ct_v1(&state)?;
                let v1 = maps_dir.join("netpol_ct_v1");
                match std::fs::remove_file(&v1) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(ioerr(format!("unpin {}", v1.display()))(e));
                    }
                    _ => {}
                }
                write_state(
                    &dp.loaded.skel.maps.netpol_state_v1,
                    &StateValue {
                        layout_version: LAYOUT_VERSION,
                        ..read_state(&dp.loaded.skel.maps.netpol_state_v1)?
                    },
                )?;
            }
            dp.adopt_generations()?;
            // The earlier process may have flipped just before it ended: wait a
            // grace period before the first write to the inactive generation.
            dp.start_barrier();
        }
        Ok(dp)
    }

    /// Copies the conntrack entries of a layout-1 instance (pinned
    /// `netpol_ct_v1`) into `netpol_ct_v2`, keeping entries already there.
    /// Their verdicts count as decided by no generation: the next packet of
    /// each flow is judged again (recheck) or checked for spoofing (keep).
    fn migrate_ct_v1(&self, state: &StateValue) -> Result<usize, DatapathError> {
        let path = self.pin_dir.join("maps").join("netpol_ct_v1");
        if !path.exists() {
            return Ok(0);
        }
        let old =
            MapHandle::from_pinned_path(&path).map_err(kerr(format!("open {}", path.display())))?;
        let stale = match state.generation as u32 {
            0 => u32::MAX,
            g => g,
        };
        let new = &self.loaded.skel.maps.netpol_ct_v2;
        let mut n = 0;
        for k in old.keys() {
            let Ok(Some(v)) = old.lookup(&k, MapFlags::ANY) else {
                continue; // expired meanwhile
            };
            let (Some(k), Some(v)) = (
                layout::from_bytes::<layout::CtV1Key>(&k),
                layout::from_bytes::<layout::CtV1Value>(&v),
            ) else {
                continue;
            };
            let (k2, v2) = layout::ct_from_v1(&k, &v, stale);
            match new.update(
                layout::bytes_of(&k2),
                layout::bytes_of(&v2),
                MapFlags::NO_EXIST,
            ) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == libbpf_rs::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(kerr("migrate netpol_ct_v1 into netpol_ct_v2")(e)),
            }
        }
        Ok(n)
    }

    /// True if this instance took over pins of an earlier process.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Devices attached now, and how.
    pub fn attached(&self) -> &BTreeMap<u32, AttachMode> {
        &self.attached
    }

    /// Use the clsact/cls_bpf fallback even where tcx works (tests).
    pub fn set_force_clsact(&mut self, yes: bool) {
        self.force_clsact = yes || !self.tcx;
    }

    /// Attach up to `n` new devices per sync with tcx directly; more go
    /// through cls_bpf first (default [`DIRECT_TCX_MAX`]; tests set 0).
    pub fn set_direct_tcx_max(&mut self, n: usize) {
        self.direct_tcx_max = n;
    }

    /// Devices on cls_bpf waiting for their tcx links.
    pub fn upgrading(&self) -> usize {
        self.upgrading.len()
    }

    /// Devices left on cls_bpf because their tcx attach failed, with why.
    pub fn upgrade_failures(&self) -> &BTreeMap<u32, String> {
        &self.upgrade_failed
    }

    /// Hand every device on cls_bpf that tcx could serve to the worker.
    fn queue_upgrades(&mut self) {
        if self.force_clsact {
            return;
        }
        let todo: Vec<u32> = self
            .attached
            .iter()
            .filter(|(i, m)| {
                **m == AttachMode::Clsact
                    && !self.upgrading.contains(i)
                    && !self.upgrade_failed.contains_key(i)
            })
            .map(|(i, _)| *i)
            .collect();
        if todo.is_empty() {
            return;
        }
        if self.upgrader.is_none() {
            let progs = [
                self.loaded.skel.progs.netpol_tcx_ingress.as_fd(),
                self.loaded.skel.progs.netpol_tcx_egress.as_fd(),
            ];
            let started = progs[0]
                .try_clone_to_owned()
                .and_then(|i| Ok([i, progs[1].try_clone_to_owned()?]))
                .and_then(Upgrader::start);
            match started {
                Ok(u) => self.upgrader = Some(u),
                Err(e) => {
                    for i in todo {
                        self.upgrade_failed
                            .insert(i, format!("start the tcx worker: {e}"));
                    }
                    return;
                }
            }
        }
        for ifindex in todo {
            let netns = match self.clsact_netns.get(&ifindex) {
                Some(f) => f.try_clone(),
                None => std::fs::File::open("/proc/thread-self/ns/net").map(Into::into),
            };
            let job = netns.map(|netns| upgrade::Job {
                ifindex,
                netns,
                pins: [
                    self.link_path(AttachMode::Tcx, ifindex, Hook::Ingress),
                    self.link_path(AttachMode::Tcx, ifindex, Hook::Egress),
                ],
            });
            match job {
                Ok(job) => {
                    if self.upgrader.as_ref().is_some_and(|u| u.send(job)) {
                        self.upgrading.insert(ifindex);
                        self.upgrade_run
                            .get_or_insert_with(|| (std::time::Instant::now(), 0));
                    } else {
                        self.upgrade_failed
                            .insert(ifindex, "the tcx worker is gone".into());
                    }
                }
                Err(e) => {
                    self.upgrade_failed
                        .insert(ifindex, format!("open its network namespace: {e}"));
                }
            }
        }
    }

    /// Finish the moves the worker reported: a device still on cls_bpf loses
    /// its filters (its tcx links enforce now); links made for a device
    /// detached meanwhile are taken away. Returns the moves that failed (each
    /// also in `upgrade_failed`) and the last one's reason.
    fn finish_upgrades(&mut self) -> (usize, Option<String>) {
        let Some(u) = &self.upgrader else {
            return (0, None);
        };
        let (mut failed, mut why) = (0, None);
        for done in u.finished() {
            self.upgrading.remove(&done.ifindex);
            match done.result {
                Ok(()) => match self.attached.get(&done.ifindex) {
                    Some(AttachMode::Clsact) => {
                        // A filter left behind would only run the same
                        // program again after tcx passed the packet.
                        let _ = self.detach_device(done.ifindex, AttachMode::Clsact);
                        self.clsact_netns.remove(&done.ifindex);
                        self.attached.insert(done.ifindex, AttachMode::Tcx);
                        if let Some(run) = &mut self.upgrade_run {
                            run.1 += 1;
                        }
                    }
                    Some(AttachMode::Tcx) => {}
                    None => {
                        let _ = self.detach_device(done.ifindex, AttachMode::Tcx);
                    }
                },
                Err(e) => {
                    let e = e.to_string();
                    self.upgrade_failed.insert(done.ifindex, e.clone());
                    failed += 1;
                    why = Some(e);
                }
            }
        }
        (failed, why)
    }

    /// End the worker (the device in hand is finished) and finish what it did.
    fn stop_upgrades(&mut self) {
        if let Some(u) = &mut self.upgrader {
            u.stop();
        }
        self.finish_upgrades();
        self.upgrader = None;
        self.upgrading.clear();
    }

    fn skel(&self) -> &NetpolSkel<'static> {
        &self.loaded.skel
    }

    fn links_dir(&self) -> PathBuf {
        self.pin_dir.join("links")
    }

    fn link_path(&self, mode: AttachMode, ifindex: u32, hook: Hook) -> PathBuf {
        let kind = match mode {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "tc",
        };
        self.links_dir()
            .join(format!("{kind}-{ifindex}-{}", hook.name()))
    }

    fn write_failsafe(&mut self) -> Result<(), DatapathError> {
        let map = &self.loaded.skel.maps.netpol_failsafe_v1;
        let existing: Vec<Vec<u8>> = map.keys().collect();
        for k in existing {
            let _ = map.delete(&k);
        }
        for (dir, proto, port) in &self.settings.failsafe {
            let k = layout::FailsafeKey {
                direction: layout::direction_code(*dir),
                proto: *proto,
                port: *port,
            };
            map.update(layout::bytes_of(&k), &1u32.to_ne_bytes(), MapFlags::ANY)
                .map_err(kerr("write netpol_failsafe_v1"))?;
        }
        Ok(())
    }

    /// Take over the links an earlier process pinned, and switch them to this
    /// process's programs (so new code and settings apply without a gap).
    fn adopt_links(&mut self) -> Result<(), DatapathError> {
        let dir = self.links_dir();
        let entries = std::fs::read_dir(&dir).map_err(ioerr(format!("read {}", dir.display())))?;
        let mut found: BTreeMap<u32, AttachMode> = BTreeMap::new();
        let mut both = BTreeSet::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let mut parts = name.splitn(3, '-');
            let (Some(kind), Some(idx), Some(hook)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(ifindex) = idx.parse::<u32>() else {
                continue;
            };
            let hook = match hook {
                "ingress" => Hook::Ingress,
                "egress" => Hook::Egress,
                _ => continue,
            };
            let mode = match kind {
                "tcx" => AttachMode::Tcx,
                "tc" => AttachMode::Clsact,
                _ => continue,
            };
            match mode {
                AttachMode::Tcx => {
                    let mut link = Link::open(e.path())
                        .map_err(kerr(format!("open {}", e.path().display())))?;
                    let prog = match hook {
                        Hook::Ingress => &self.loaded.skel.progs.netpol_tcx_ingress,
                        Hook::Egress => &self.loaded.skel.progs.netpol_tcx_egress,
                    };
                    // A defunct link (device gone) cannot be updated; sync re-attaches.
                    let _ = link.update_prog(prog);
                    // Dropping closes our fd only: for an fd-based link libbpf's
                    // "detach" is close(), and the pin keeps the link attached.
                    // (disconnect() would skip that close and leak the fd.)
                    drop(link);
                }
                AttachMode::Clsact => {
                    // Replace the filter with this process's program.
                    let _ = self.attach_clsact(ifindex, hook);
                }
            }
            if found.insert(ifindex, mode).is_some_and(|m| m != mode) {
                both.insert(ifindex);
            }
        }
        // A device with tcx links and a cls_bpf filter (a move to tcx
        // finished by a process that died before it took the filter away):
        // the links enforce; the filter goes.
        for ifindex in both {
            let _ = self.detach_device(ifindex, AttachMode::Clsact);
            found.insert(ifindex, AttachMode::Tcx);
        }
        self.attached = found;
        Ok(())
    }

    fn attach_tcx(&self, ifindex: u32, hook: Hook) -> Result<(), DatapathError> {
        let prog = match hook {
            Hook::Ingress => &self.loaded.skel.progs.netpol_tcx_ingress,
            Hook::Egress => &self.loaded.skel.progs.netpol_tcx_egress,
        };
        let path = self.link_path(AttachMode::Tcx, ifindex, hook);
        upgrade::attach_tcx_link(prog.as_fd(), ifindex, hook, &path)
    }

    fn attach_clsact(&self, ifindex: u32, hook: Hook) -> Result<(), DatapathError> {
        let prog = match hook {
            Hook::Ingress => &self.loaded.skel.progs.netpol_tc_ingress,
            Hook::Egress => &self.loaded.skel.progs.netpol_tc_egress,
        };
        let point = match hook {
            Hook::Ingress => TC_INGRESS,
            Hook::Egress => TC_EGRESS,
        };
        let mut tc = TcHookBuilder::new(prog.as_fd())
            .ifindex(ifindex as i32)
            .replace(true)
            .handle(TC_HANDLE)
            .priority(TC_PRIORITY)
            .hook(point);
        if hook == Hook::Ingress {
            // One clsact qdisc serves both hooks; creating it again only makes
            // the kernel complain (EEXIST is fine).
            tc.create()
                .map_err(kerr(format!("create clsact on ifindex {ifindex}")))?;
        }
        tc.attach().map_err(kerr(format!(
            "cls_bpf attach {} on ifindex {ifindex}",
            hook.name()
        )))?;
        let path = self.link_path(AttachMode::Clsact, ifindex, hook);
        if path.exists() {
            let _ = std::fs::remove_file(&path);
        }
        pin_fd(prog.as_fd().as_raw_fd(), &path)?;
        Ok(())
    }

    fn remember_netns(&mut self, ifindex: u32) {
        if let Ok(f) = std::fs::File::open("/proc/thread-self/ns/net") {
            self.clsact_netns.insert(ifindex, f.into());
        }
    }

    fn detach_device(&self, ifindex: u32, mode: AttachMode) -> Result<(), DatapathError> {
        let mut first_err = None;
        for hook in [Hook::Ingress, Hook::Egress] {
            let path = self.link_path(mode, ifindex, hook);
            match mode {
                AttachMode::Tcx => {
                    if let Ok(link) = Link::open(&path) {
                        // A defunct link (device gone) reports an error: fine.
                        let _ = link.detach();
                    }
                }
                AttachMode::Clsact => {
                    let prog = match hook {
                        Hook::Ingress => &self.loaded.skel.progs.netpol_tc_ingress,
                        Hook::Egress => &self.loaded.skel.progs.netpol_tc_egress,
                    };
                    let raw = prog.as_fd().as_raw_fd();
                    let netns = self.clsact_netns.get(&ifindex).map(|f| f.as_raw_fd());
                    let detach = move || {
                        // SAFETY: the program fd stays open for this call (the
                        // skeleton outlives it); it only seeds the builder.
                        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
                        let point = if hook == Hook::Ingress {
                            TC_INGRESS
                        } else {
                            TC_EGRESS
                        };
                        let mut tc = TcHookBuilder::new(fd)
                            .ifindex(ifindex as i32)
                            .handle(TC_HANDLE)
                            .priority(TC_PRIORITY)
                            .hook(point);
                        // ENOENT / ENODEV: the filter or the device is gone already.
                        let _ = tc.detach();
                    };
                    match netns {
                        Some(ns) => std::thread::scope(|s| {
                            s.spawn(move || {
                                // SAFETY: the namespace fd is kept open in
                                // `clsact_netns` until after this thread ends.
                                let ns = unsafe { std::os::fd::BorrowedFd::borrow_raw(ns) };
                                if nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                                    .is_ok()
                                {
                                    detach();
                                }
                            });
                        }),
                        None => detach(),
                    }
                }
            }
            if path.exists() {
                if let Err(e) = std::fs::remove_file(&path) {
                    first_err.get_or_insert(ioerr(format!("unpin {}", path.display()))(e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// True if the device's attachment is still in force.
    fn attachment_live(&self, ifindex: u32, mode: AttachMode) -> bool {
        match mode {
            AttachMode::Tcx => [Hook::Ingress, Hook::Egress].iter().all(|h| {
                Link::open(self.link_path(mode, ifindex, *h))
                    .and_then(|l| l.info())
                    .map(|i| matches!(i.info, LinkTypeInfo::Tcx(t) if t.ifindex == ifindex))
                    .unwrap_or(false)
            }),
            AttachMode::Clsact => [Hook::Ingress, Hook::Egress]
                .iter()
                .all(|h| self.link_path(mode, ifindex, *h).exists()),
        }
    }

    fn attach_device(&mut self, ifindex: u32, fast: bool) -> Result<AttachMode, DatapathError> {
        if !self.force_clsact && !fast {
            match self
                .attach_tcx(ifindex, Hook::Ingress)
                .and_then(|_| self.attach_tcx(ifindex, Hook::Egress))
            {
                Ok(()) => return Ok(AttachMode::Tcx),
                Err(e) => {
                    let _ = self.detach_device(ifindex, AttachMode::Tcx);
                    // No such device is not something clsact can fix.
                    if let DatapathError::Kernel { source, .. } = &e {
                        if source.raw_os_error() == Some(libc::ENODEV) {
                            return Err(e);
                        }
                    }
                    // Not moved to tcx later either: it was just refused.
                    self.upgrade_failed.insert(ifindex, e.to_string());
                }
            }
        }
        let r = self
            .attach_clsact(ifindex, Hook::Ingress)
            .and_then(|_| self.attach_clsact(ifindex, Hook::Egress));
        match r {
            Ok(()) => {
                self.remember_netns(ifindex);
                Ok(AttachMode::Clsact)
            }
            Err(e) => {
                let _ = self.detach_device(ifindex, AttachMode::Clsact);
                Err(e)
            }
        }
    }

    /// Runs one packet through the tcx program of `hook` with BPF_PROG_TEST_RUN
    /// (`repeat` times). The packet arrives on the loopback device (ifindex 1),
    /// so an endpoint attached at ifindex 1 is the one judged.
    pub fn test_run(
        &self,
        hook: Hook,
        packet: &[u8],
        repeat: u32,
    ) -> Result<TestRun, DatapathError> {
        let progs = &self.loaded.skel.progs;
        let prog = match (hook, self.tcx) {
            (Hook::Ingress, true) => &progs.netpol_tcx_ingress,
            (Hook::Egress, true) => &progs.netpol_tcx_egress,
            (Hook::Ingress, false) => &progs.netpol_tc_ingress,
            (Hook::Egress, false) => &progs.netpol_tc_egress,
        };
        let input = libbpf_rs::ProgramInput {
            data_in: Some(packet),
            repeat,
            ..Default::default()
        };
        let out = prog.test_run(input).map_err(kerr("BPF_PROG_TEST_RUN"))?;
        Ok(TestRun {
            retval: out.return_value as i32,
            duration: out.duration,
        })
    }

    /// Removes every conntrack and fragment entry (tests).
    pub fn clear_conntrack(&mut self) -> Result<(), DatapathError> {
        for map in [
            &self.loaded.skel.maps.netpol_ct_v2,
            &self.loaded.skel.maps.netpol_frag_v1,
        ] {
            let keys: Vec<Vec<u8>> = map.keys().collect();
            for k in keys {
                let _ = map.delete(&k);
            }
        }
        Ok(())
    }

    /// Number of live conntrack entries (diagnostics, tests).
    pub fn conntrack_len(&self) -> usize {
        self.loaded.skel.maps.netpol_ct_v2.keys().count()
    }

    fn create_inner(
        &self,
        ty: MapType,
        name: &str,
        key: usize,
        value: usize,
        max: u32,
        flags: u32,
    ) -> Result<MapHandle, DatapathError> {
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            map_flags: flags,
            ..Default::default()
        };
        MapHandle::create(ty, Some(name), key as u32, value as u32, max.max(1), &opts)
            .map_err(kerr(format!("create map {name}")))
    }

    /// Fresh, empty inner maps of one generation, sized by the settings.
    fn create_generation(&self) -> Result<Generation, DatapathError> {
        const NO_PREALLOC: u32 = libbpf_sys::BPF_F_NO_PREALLOC;
        Ok(Generation {
            ipcache: self.create_inner(
                MapType::LpmTrie,
                "np_ipcache",
                generation::IPCACHE_KEY,
                generation::IPCACHE_VALUE,
                self.settings.ipcache_max_entries,
                NO_PREALLOC,
            )?,
            endpoints: self.create_inner(
                MapType::Hash,
                "np_endpoints",
                generation::ENDPOINT_KEY,
                generation::ENDPOINT_VALUE,
                self.settings.endpoint_max_entries,
                0,
            )?,
            policy: self.create_inner(
                MapType::LpmTrie,
                "np_policy",
                generation::POLICY_KEY,
                generation::POLICY_VALUE,
                self.settings.policy_max_entries,
                NO_PREALLOC,
            )?,
            policy_exact: self.create_policy_exact()?,
            installed: false,
            shadow: Some(Contents::default()),
        })
    }

    /// An empty exact-match policy map, sized by the settings (preallocation
    /// off: most states hold far fewer entries than the budget).
    fn create_policy_exact(&self) -> Result<MapHandle, DatapathError> {
        self.create_inner(
            MapType::Hash,
            "np_policy_exact",
            generation::POLICY_KEY,
            generation::POLICY_VALUE,
            self.settings.policy_max_entries,
            libbpf_sys::BPF_F_NO_PREALLOC,
        )
    }

    /// The inner maps an earlier process left in the outer maps' slots. A slot
    /// whose maps are missing or sized otherwise than the settings gets fresh
    /// maps when it is next written. Their content is read back lazily. A
    /// slot of a layout-2 instance (no exact policy map) gets an empty one
    /// at once: its trie holds every entry, so its verdicts stay the same.
    fn adopt_generations(&mut self) -> Result<(), DatapathError> {
        let maps = &self.loaded.skel.maps;
        let want = [
            (
                MapType::LpmTrie,
                generation::IPCACHE_KEY,
                generation::IPCACHE_VALUE,
                self.settings.ipcache_max_entries,
            ),
            (
                MapType::Hash,
                generation::ENDPOINT_KEY,
                generation::ENDPOINT_VALUE,
                self.settings.endpoint_max_entries,
            ),
            (
                MapType::LpmTrie,
                generation::POLICY_KEY,
                generation::POLICY_VALUE,
                self.settings.policy_max_entries,
            ),
            (
                MapType::Hash,
                generation::POLICY_KEY,
                generation::POLICY_VALUE,
                self.settings.policy_max_entries,
            ),
        ];
        for slot in 0..2u32 {
            let mut inner = Vec::new();
            for (i, (outer, name)) in [
                (&maps.netpol_ipcache_v1, "netpol_ipcache_v1"),
                (&maps.netpol_endpoints_v1, "netpol_endpoints_v1"),
                (&maps.netpol_policy_v1, "netpol_policy_v1"),
                (&maps.netpol_policy_exact_v1, "netpol_policy_exact_v1"),
            ]
            .into_iter()
            .enumerate()
            {
                let id = outer
                    .lookup(&slot.to_ne_bytes(), MapFlags::ANY)
                    .map_err(kerr(format!("read {name}[{slot}]")))?
                    .and_then(|v| {
                        v.get(..4)
                            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    });
                let Some(id) = id else {
                    if i == 3 && inner.len() == 3 {
                        // Layout 2: all three others there, no exact map.
                        let m = self.create_policy_exact()?;
                        let fd = m.as_fd().as_raw_fd() as u32;
                        maps.netpol_policy_exact_v1
                            .update(&slot.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
                            .map_err(kerr(format!("install netpol_policy_exact_v1[{slot}]")))?;
                        inner.push(m);
                    }
                    break;
                };
                let Ok(m) = MapHandle::from_map_id(id) else {
                    break;
                };
                let (ty, k, v, max) = want[i];
                if m.map_type() != ty
                    || m.key_size() as usize != k
                    || m.value_size() as usize != v
                    || m.max_entries() != max.max(1)
                {
                    break;
                }
                inner.push(m);
            }
            if inner.len() == 4 {
                let policy_exact = inner.pop().expect("four maps");
                let policy = inner.pop().expect("four maps");
                let endpoints = inner.pop().expect("four maps");
                let ipcache = inner.pop().expect("four maps");
                self.gens[slot as usize] = Some(Generation {
                    ipcache,
                    endpoints,
                    policy,
                    policy_exact,
                    installed: true,
                    shadow: None,
                });
            }
        }
        Ok(())
    }

    /// Starts waiting, in the background, for every program that may still
    /// use the generation that was active before the last flip (an update of
    /// a map-in-map returns after an RCU grace period).
    fn start_barrier(&mut self) {
        let barrier = Arc::clone(&self.barrier);
        self.pending_barrier = Some(std::thread::spawn(move || {
            let (outer, inner) = &*barrier;
            let fd = inner.as_fd().as_raw_fd() as u32;
            outer
                .update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
                .map_err(kerr("wait for running programs (netpol_barrier_v1)"))
        }));
    }

    /// Returns once no program can still use the generation that was active
    /// before the last flip.
    fn wait_barrier(&mut self) -> Result<(), DatapathError> {
        let Some(h) = self.pending_barrier.take() else {
            return Ok(());
        };
        match h.join() {
            Ok(Ok(())) => Ok(()),
            // The background wait failed or died: wait here instead.
            _ => {
                self.start_barrier();
                match self.pending_barrier.take().map(JoinHandle::join) {
                    Some(Ok(r)) => r,
                    _ => Err(DatapathError::BarrierPanicked),
                }
            }
        }
    }

    /// Contents of the generation in `slot` (0 or 1) as the kernel holds it,
    /// `None` if that slot is empty (tests, diagnostics).
    pub fn dump_generation(&self, slot: u32) -> Result<Option<Contents>, DatapathError> {
        let maps = &self.loaded.skel.maps;
        let mut handles = Vec::new();
        for (outer, name) in [
            (&maps.netpol_ipcache_v1, "netpol_ipcache_v1"),
            (&maps.netpol_endpoints_v1, "netpol_endpoints_v1"),
            (&maps.netpol_policy_v1, "netpol_policy_v1"),
            (&maps.netpol_policy_exact_v1, "netpol_policy_exact_v1"),
        ] {
            let id = outer
                .lookup(&slot.to_ne_bytes(), MapFlags::ANY)
                .map_err(kerr(format!("read {name}[{slot}]")))?
                .and_then(|v| {
                    v.get(..4)
                        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                });
            let Some(id) = id else {
                if name == "netpol_policy_exact_v1" {
                    // A layout-2 generation: nothing but the trie.
                    break;
                }
                return Ok(None);
            };
            handles.push(
                MapHandle::from_map_id(id)
                    .map_err(kerr(format!("open the inner map of {name}[{slot}]")))?,
            );
        }
        Ok(Some(Contents {
            ipcache: dump_table(&handles[0], "ipcache")?,
            endpoints: dump_table(&handles[1], "endpoint table")?,
            policy: dump_table(&handles[2], "policy map")?,
            policy_exact: match handles.get(3) {
                Some(h) => dump_table(h, "exact policy map")?,
                None => Default::default(),
            },
        }))
    }

    /// The slot (0 or 1) packets use now.
    pub fn active_slot(&self) -> Result<u32, DatapathError> {
        Ok(read_state(&self.loaded.skel.maps.netpol_state_v1)?.active & 1)
    }

    /// Writes `want` into the inactive generation (only the keys that differ
    /// from what it holds), then flips. Running state is untouched on any error
    /// before the flip.
    fn try_apply(
        &mut self,
        state: &Compiled,
        attachments: &[Attachment],
    ) -> Result<u64, DatapathError> {
        let cur = read_state(&self.loaded.skel.maps.netpol_state_v1)?;
        let prev = match self.kslots.take() {
            Some(k) => k,
            None => self.adopted_slots(cur.active & 1),
        };
        let kslots = KernelSlots::assign(&prev, attachments);
        // From the active generation's ipcache when the last apply of this
        // process made it (a registry change among 100,000 endpoints writes
        // what changed over 200,000 entries rather than inserting them all).
        let last = self.last_ipcache.take();
        let active_shadow = self.gens[(cur.active & 1) as usize]
            .as_ref()
            .and_then(|g| g.shadow.as_ref());
        let built = layout::check_capacity(state, attachments, &kslots, &self.settings).and_then(
            |_| match (&last, active_shadow) {
                (Some((ipcache, slots)), Some(shadow)) => {
                    Contents::build_from(shadow, ipcache, slots, state, attachments, &kslots)
                }
                _ => Contents::build(state, attachments, &kslots),
            },
        );
        let mut want = match built {
            Ok(w) => w,
            Err(e) => {
                self.kslots = Some(prev);
                return Err(e);
            }
        };
        // A slot new to its interface counts from zero (an earlier holder's
        // counts are not this endpoint's).
        let fresh: Vec<u32> = kslots.new_since(&prev).collect();
        self.kslots = Some(prev);
        self.zero_counters(&fresh)?;

        // No program may still use the generation we are about to write.
        self.wait_barrier()?;
        want.stamp(cur.generation + 1);
        let inactive = (cur.active & 1) ^ 1;
        let idx = inactive as usize;
        if self.gens[idx].is_none() {
            self.gens[idx] = Some(self.create_generation()?);
        }
        self.fill_generation(idx, &want)?;

        // The flip: one word every packet reads once.
        let next = StateValue {
            active: inactive,
            layout_version: LAYOUT_VERSION,
            generation: cur.generation + 1,
        };
        write_state(&self.loaded.skel.maps.netpol_state_v1, &next)?;
        // The generation that was active is written next time; the grace
        // period that protects it runs meanwhile, off this path.
        self.start_barrier();

        self.generation = next.generation;
        self.last_ipcache = Some((state.ipcache.clone(), kslots.clone()));
        self.kslots = Some(kslots);
        Ok(next.generation)
    }

    /// Make generation `idx`'s maps hold exactly `want` (through its
    /// shadow), and put them into the outer maps' slot `idx` if they are not
    /// there yet. No program may be reading generation `idx`.
    fn fill_generation(&mut self, idx: usize, want: &Contents) -> Result<(), DatapathError> {
        let slot = idx as u32;
        let maps = &self.loaded.skel.maps;
        let g = self.gens[idx].as_mut().expect("a generation to fill");
        let mut shadow = match g.shadow.take() {
            Some(s) => s,
            None => Contents {
                ipcache: dump_table(&g.ipcache, "ipcache")?,
                endpoints: dump_table(&g.endpoints, "endpoint table")?,
                policy: dump_table(&g.policy, "policy map")?,
                policy_exact: dump_table(&g.policy_exact, "exact policy map")?,
            },
        };
        // Deletes before writes in each map, so a full map never overflows
        // half way. `shadow` follows every successful write; on an error it
        // is dropped (unknown) and read back next time.
        sync_table(&g.ipcache, &mut shadow.ipcache, &want.ipcache, "ipcache")?;
        sync_table(
            &g.endpoints,
            &mut shadow.endpoints,
            &want.endpoints,
            "endpoint table",
        )?;
        sync_table(&g.policy, &mut shadow.policy, &want.policy, "policy map")?;
        sync_table(
            &g.policy_exact,
            &mut shadow.policy_exact,
            &want.policy_exact,
            "exact policy map",
        )?;
        g.shadow = Some(shadow);

        if !g.installed {
            // Fresh maps go into the inactive slot (each update waits a grace
            // period; this happens once per slot and process at most).
            for (outer, inner, name) in [
                (&maps.netpol_ipcache_v1, &g.ipcache, "netpol_ipcache_v1"),
                (
                    &maps.netpol_endpoints_v1,
                    &g.endpoints,
                    "netpol_endpoints_v1",
                ),
                (&maps.netpol_policy_v1, &g.policy, "netpol_policy_v1"),
                (
                    &maps.netpol_policy_exact_v1,
                    &g.policy_exact,
                    "netpol_policy_exact_v1",
                ),
            ] {
                let fd = inner.as_fd().as_raw_fd() as u32;
                outer
                    .update(&slot.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
                    .map_err(kerr(format!("install generation into {name}[{slot}]")))?;
            }
            g.installed = true;
        }
        Ok(())
    }

    /// Between changes (netpold's idle loop): the spare generation made and
    /// filled as the active one is, so the first change after a start writes
    /// what changed, not every entry of new maps and four grace periods to
    /// put them in place. Once per process; `Ok(false)` when there is nothing
    /// to do.
    fn prepare_spare(&mut self) -> Result<bool, DatapathError> {
        if self.spare_tried {
            return Ok(false);
        }
        let cur = read_state(&self.loaded.skel.maps.netpol_state_v1)?;
        let active = (cur.active & 1) as usize;
        let spare = active ^ 1;
        // Nothing applied by this process yet, or the spare exists already.
        let Some(want) = self.gens[active].as_ref().and_then(|g| g.shadow.clone()) else {
            return Ok(false);
        };
        self.spare_tried = true;
        if self.gens[spare].is_some() {
            return Ok(false);
        }
        // Never installed: no program reads it, no barrier to wait for.
        self.gens[spare] = Some(self.create_generation()?);
        if let Err(e) = self.fill_generation(spare, &want) {
            // Made again, whole, by the next apply.
            self.gens[spare] = None;
            return Err(e);
        }
        Ok(true)
    }

    /// The spare generation is in place and filled (see `prepare_spare`).
    pub fn spare_ready(&self) -> bool {
        let cur = read_state(&self.loaded.skel.maps.netpol_state_v1);
        cur.is_ok_and(|c| {
            let g = &self.gens[((c.active & 1) ^ 1) as usize];
            g.as_ref()
                .is_some_and(|g| g.installed && g.shadow.is_some())
        })
    }

    /// ifindex → kernel slot as the endpoint table of generation `active`
    /// holds it (an earlier process's), so slots and counters carry over a
    /// restart; empty when there is none or it cannot be read.
    fn adopted_slots(&self, active: u32) -> KernelSlots {
        let Some(g) = self.gens[active as usize].as_ref() else {
            return KernelSlots::default();
        };
        let table = match &g.shadow {
            Some(s) => s.endpoints.clone(),
            None => dump_table(&g.endpoints, "endpoint table").unwrap_or_default(),
        };
        KernelSlots::adopted(table.iter().filter_map(|(k, v)| {
            let e = layout::from_bytes::<layout::EndpointValue>(v)?;
            Some((u32::from_ne_bytes(*k), e.slot))
        }))
    }

    /// Reset the per-CPU counters of kernel slots `slots`.
    fn zero_counters(&self, slots: &[u32]) -> Result<(), DatapathError> {
        if slots.is_empty() {
            return Ok(());
        }
        let map = &self.skel().maps.netpol_counters_v1;
        let cpus = libbpf_rs::num_possible_cpus().map_err(|e| DatapathError::Libbpf {
            op: "count the possible cpus".into(),
            source: e,
        })?;
        let zero = vec![vec![0u8; size_of::<layout::CountersValue>()]; cpus];
        for k in slots {
            map.update_percpu(&k.to_ne_bytes(), &zero, MapFlags::ANY)
                .map_err(kerr(format!("reset netpol_counters_v1[{k}]")))?;
        }
        Ok(())
    }
}

pub(super) fn pin_fd(fd: i32, path: &Path) -> Result<(), DatapathError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        DatapathError::NulInPath {
            path: path.to_path_buf(),
        }
    })?;
    // SAFETY: `fd` is a valid BPF object fd and `c` a NUL-terminated path.
    let r = unsafe { libbpf_sys::bpf_obj_pin(fd, c.as_ptr()) };
    if r < 0 {
        return Err(DatapathError::Kernel {
            op: format!("pin {}", path.display()),
            source: std::io::Error::from_raw_os_error(-r),
        });
    }
    Ok(())
}

/// Everything `map` holds, read key by key.
fn dump_table<const K: usize, const V: usize>(
    map: &MapHandle,
    what: &'static str,
) -> Result<Table<K, V>, DatapathError> {
    let mut out = Table::<K, V>::default();
    for k in map.keys() {
        let (Ok(key), Some(v)) = (
            <[u8; K]>::try_from(k.as_slice()),
            map.lookup(&k, MapFlags::ANY)
                .map_err(kerr(format!("read back the {what}")))?,
        ) else {
            continue;
        };
        let v = <[u8; V]>::try_from(v.as_slice()).map_err(|_| DatapathError::ValueSize {
            map: what,
            len: v.len(),
            expected: V,
        })?;
        out.insert(key, v);
    }
    Ok(out)
}

/// Makes `map` (whose content is `shadow`) hold exactly `want`, keeping
/// `shadow` equal to what the map holds after every successful write.
fn sync_table<const K: usize, const V: usize>(
    map: &MapHandle,
    shadow: &mut Table<K, V>,
    want: &Table<K, V>,
    what: &str,
) -> Result<(), DatapathError> {
    let (deletes, upserts) = generation::diff(shadow, want);
    for k in deletes {
        match map.delete(&k) {
            Ok(()) => {}
            // Already gone: what we want.
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
            Err(e) => return Err(kerr(format!("update the {what}"))(e)),
        }
        shadow.remove(&k);
    }
    for (k, v) in upserts {
        map.update(&k, &v, MapFlags::ANY)
            .map_err(kerr(format!("fill the {what}")))?;
        shadow.insert(k, v);
    }
    Ok(())
}

fn read_state(map: &impl MapCore) -> Result<StateValue, DatapathError> {
    let raw = map
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .map_err(kerr("read netpol_state_v1"))?
        .ok_or(DatapathError::NoState)?;
    layout::from_bytes::<StateValue>(&raw).ok_or(DatapathError::ValueSize {
        map: "netpol_state_v1",
        len: raw.len(),
        expected: size_of::<StateValue>(),
    })
}

fn write_state(map: &impl MapCore, s: &StateValue) -> Result<(), DatapathError> {
    map.update(&0u32.to_ne_bytes(), layout::bytes_of(s), MapFlags::ANY)
        .map_err(kerr("flip netpol_state_v1"))
}

impl Datapath for KernelDatapath {
    fn apply(
        &mut self,
        state: &Compiled,
        attachments: &[Attachment],
    ) -> Result<u64, DatapathError> {
        self.try_apply(state, attachments)
    }

    fn sync_attachments(&mut self, attachments: &[Attachment]) -> Result<(), DatapathError> {
        self.finish_upgrades();
        let desired: BTreeSet<u32> = attachments.iter().map(|a| a.ifindex).collect();
        let current: Vec<(u32, AttachMode)> = self.attached.iter().map(|(k, v)| (*k, *v)).collect();
        let mut first_err = None;
        for (ifindex, mode) in current {
            if !desired.contains(&ifindex) || !self.attachment_live(ifindex, mode) {
                if let Err(e) = self.detach_device(ifindex, mode) {
                    first_err.get_or_insert(e);
                }
                self.attached.remove(&ifindex);
                self.clsact_netns.remove(&ifindex);
                self.upgrade_failed.remove(&ifindex);
            }
        }
        let new: Vec<u32> = desired
            .into_iter()
            .filter(|i| !self.attached.contains_key(i))
            .collect();
        // Many devices at once (a cold start): enforced through cls_bpf in
        // about a millisecond each, moved to tcx in the background.
        let fast = new.len() > self.direct_tcx_max;
        for ifindex in new {
            match self.attach_device(ifindex, fast) {
                Ok(mode) => {
                    self.attached.insert(ifindex, mode);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.queue_upgrades();
        first_err.map_or(Ok(()), Err)
    }

    fn maintain(&mut self) -> Option<String> {
        let (failed, why) = self.finish_upgrades();
        let mut msg = why.map(|why| {
            format!("{failed} device(s) stay on cls_bpf: their tcx attach failed ({why})")
        });
        if let Err(e) = self.prepare_spare() {
            let m = format!("the spare generation is made at the next change instead ({e})");
            msg = Some(match msg {
                Some(prev) => format!("{prev}; {m}"),
                None => m,
            });
        }
        if let (true, Some((since, total))) = (self.upgrading.is_empty(), self.upgrade_run) {
            self.upgrade_run = None;
            if total > 0 {
                let done = format!(
                    "moved {total} device(s) from cls_bpf to tcx in {:.1} s",
                    since.elapsed().as_secs_f64()
                );
                msg = Some(match msg {
                    Some(m) => format!("{done}; {m}"),
                    None => done,
                });
            }
        }
        msg
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn poll_events(&mut self, max: usize) -> Vec<VerdictEvent> {
        let mut out = Vec::new();
        if max == 0 {
            return out;
        }
        let kslots = self.kslots.as_ref();
        let mut builder = RingBufferBuilder::new();
        let added = builder.add(&self.skel().maps.netpol_events_v1, |data: &[u8]| {
            if let Some(r) = layout::from_bytes::<EventRecord>(data) {
                let mut ev = layout::verdict_event(&r);
                // The kernel reports its slot; above the datapath slots are compiled ones.
                if let Some(slot) = kslots.and_then(|k| k.compiled(ev.slot)) {
                    ev.slot = slot;
                }
                out.push(ev);
            }
            0
        });
        if added.is_err() {
            return Vec::new();
        }
        if let Ok(rb) = builder.build() {
            let _ = rb.consume_raw_n(max);
        }
        out
    }

    fn counters(&self) -> BTreeMap<u32, Counters> {
        let map = &self.skel().maps.netpol_counters_v1;
        let mut out = BTreeMap::new();
        // Counted by kernel slot, reported by the compiled slot behind it;
        // nothing before this process's first apply (no state to name them by).
        for (kslot, slot) in self.kslots.iter().flat_map(KernelSlots::iter) {
            let Ok(Some(per_cpu)) = map.lookup_percpu(&kslot.to_ne_bytes(), MapFlags::ANY) else {
                continue;
            };
            let mut c = Counters::default();
            for raw in per_cpu {
                if let Some(v) = layout::from_bytes::<layout::CountersValue>(&raw) {
                    c.allowed += v.allowed;
                    c.denied_policy += v.denied_policy;
                    c.denied_default += v.denied_default;
                    c.denied_spoof += v.denied_spoof;
                    c.denied_other += v.denied_other;
                    c.audit += v.audit;
                }
            }
            out.insert(slot, c);
        }
        out
    }

    fn stage(&self) -> super::Stage {
        self.settings.stage
    }

    /// The redirect entries first (stale ones deleted, then the new written),
    /// then the proxy word with their count, so a packet never finds a count
    /// without the entries it covers.
    fn set_dns_redirect(
        &mut self,
        proxy: DnsProxyTarget,
        redirects: &[DnsRedirect],
    ) -> Result<(), DatapathError> {
        let maps = &self.loaded.skel.maps;
        let table = &maps.netpol_dns_redirect_v1;
        let want: BTreeMap<Vec<u8>, Vec<u8>> = redirects
            .iter()
            .map(|r| {
                let k = layout::DnsRedirectKey {
                    ifindex: r.ifindex,
                    port: r.port,
                    proto: r.proto,
                    pad: 0,
                };
                let v = layout::DnsRedirectValue {
                    mac: r.bridge_mac.unwrap_or_default(),
                    flags: if r.bridge_mac.is_some() {
                        types::np_dns_flags::NP_DNS_F_REWRITE_MAC.0
                    } else {
                        0
                    },
                };
                (layout::bytes_of(&k).to_vec(), layout::bytes_of(&v).to_vec())
            })
            .collect();
        let stale: Vec<Vec<u8>> = table.keys().filter(|k| !want.contains_key(k)).collect();
        for k in stale {
            let _ = table.delete(&k);
        }
        for (k, v) in &want {
            table
                .update(k, v, MapFlags::ANY)
                .map_err(kerr("write netpol_dns_redirect_v1"))?;
        }
        let word = layout::DnsProxyValue {
            redirects: want.len() as u32,
            mark: proxy.mark,
            port: proxy.port,
            pad: 0,
            reserved: 0,
        };
        maps.netpol_dns_proxy_v1
            .update(&0u32.to_ne_bytes(), layout::bytes_of(&word), MapFlags::ANY)
            .map_err(kerr("write netpol_dns_proxy_v1"))
    }

    fn dns_redirect_stats(&self) -> DnsRedirectStats {
        let mut out = DnsRedirectStats::default();
        let map = &self.skel().maps.netpol_dns_stats_v1;
        if let Ok(Some(per_cpu)) = map.lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY) {
            for raw in per_cpu {
                if let Some(v) = layout::from_bytes::<layout::DnsStatsValue>(&raw) {
                    out.redirected += v.redirected;
                    out.dropped_no_proxy += v.dropped_no_proxy;
                    out.dropped_other += v.dropped_other;
                }
            }
        }
        out
    }

    fn live_flows(&self) -> Vec<(u32, std::net::IpAddr, std::net::IpAddr)> {
        let map = &self.skel().maps.netpol_ct_v2;
        let now = layout::coarse_now_ns();
        let mut out = Vec::new();
        for k in map.keys() {
            let Ok(Some(v)) = map.lookup(&k, MapFlags::ANY) else {
                continue;
            };
            let (Some(key), Some(val)) = (
                layout::from_bytes::<layout::CtKey>(&k),
                layout::from_bytes::<layout::CtValue>(&v),
            ) else {
                continue;
            };
            if val.expires_ns <= now {
                continue;
            }
            let ip = |a: &[u8; 16]| -> std::net::IpAddr {
                if key.family == types::np_family::NP_FAMILY_V4.0 {
                    std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]).into()
                } else {
                    std::net::Ipv6Addr::from(*a).into()
                }
            };
            out.push((key.ifindex, ip(&key.addr_a), ip(&key.addr_b)));
        }
        out
    }

    fn detach_all(&mut self) -> Result<(), DatapathError> {
        self.stop_upgrades();
        let mut first_err = None;
        let current: Vec<(u32, AttachMode)> = self.attached.iter().map(|(k, v)| (*k, *v)).collect();
        for (ifindex, mode) in current {
            if let Err(e) = self.detach_device(ifindex, mode) {
                first_err.get_or_insert(e);
            }
        }
        self.attached.clear();
        self.clsact_netns.clear();
        if self.pin_dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.pin_dir) {
                first_err.get_or_insert(ioerr(format!("remove {}", self.pin_dir.display()))(e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

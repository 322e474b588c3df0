//! The reconcile loop without root: the real `daemon::run_with` over temp
//! directories, driven with the in-memory datapath and a fake interface table.
//!
//! Most tests put a tiny stand-in parser and compiler in the pipeline so they
//! depend only on the loop: a policy file is valid unless it contains `INVALID`
//! and its first line names the policy; a registry file has one `name interface`
//! line per endpoint. What the loop handed the datapath is then visible in the
//! applied state's `rules` (one per policy) and `endpoints`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netpol::api::model::{
    EndpointDef, EndpointKind, Interface, Origin, Policy, PolicyKind, PolicySet, RegistrySet,
};
use netpol::api::Problem;
use netpol::config::Config;
use netpol::daemon::netlink::{fake_links, LinkTable};
use netpol::daemon::sdnotify::Notifier;
use netpol::daemon::status::{EndpointState, EndpointView, Status};
use netpol::daemon::watch::WatchEvent;
use netpol::daemon::{run_with, Options};
use netpol::datapath::fake::FakeDatapath;
use netpol::datapath::{
    Attachment, Counters, Datapath, DatapathError, EventReason, EventVerdict, VerdictEvent,
};
use netpol::pipeline::{Hint, Inputs, Read, SavedReader};
use netpol::policy::compile::{CompileError, CompileOptions};
use netpol::policy::types::{Compiled, CompiledEndpoint, Direction, RuleRef};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

// ---------------------------------------------------------------- stand-in stages

fn input_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(netpol::api::load::wanted_name)
    });
    v.sort();
    v
}

fn problem(file: &Path, message: &str) -> Problem {
    Problem {
        file: file.to_path_buf(),
        line: Some(1),
        column: Some(1),
        document: None,
        object: None,
        field: None,
        message: message.to_string(),
    }
}

fn origin(file: &Path, kind: &str, name: &str) -> Origin {
    Origin {
        file: file.into(),
        doc: 0,
        kind: kind.into(),
        namespace: Some("default".into()),
        name: name.into(),
    }
}

fn fake_load_policies(dir: &Path) -> Result<PolicySet, Vec<Problem>> {
    let (mut set, mut problems) = (PolicySet::default(), Vec::new());
    for f in input_files(dir) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        if text.contains("INVALID") {
            problems.push(problem(&f, "not a policy"));
            continue;
        }
        let name = text.lines().next().unwrap_or("").trim().to_string();
        set.policies.push(
            Policy {
                origin: origin(&f, "CiliumNetworkPolicy", &name),
                kind: PolicyKind::CiliumNetworkPolicy,
                rules: vec![].into(),
                staged: false,
                source: Default::default(),
            }
            .into(),
        );
    }
    if problems.is_empty() {
        Ok(set)
    } else {
        Err(problems)
    }
}

fn fake_load_registry(dirs: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>> {
    let (mut set, mut problems) = (RegistrySet::default(), Vec::new());
    for f in dirs.iter().flat_map(|d| input_files(d)) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut w = line.split_whitespace();
            match (w.next(), w.next()) {
                (Some(name), Some(iface)) if name != "INVALID" => {
                    set.endpoints.push(Arc::new(EndpointDef {
                        origin: origin(&f, "Endpoint", name),
                        kind: EndpointKind::Workload,
                        name: name.into(),
                        namespace: Some("default".into()),
                        labels: vec![],
                        node: None,
                        interface: Some(Interface::Name(iface.into())),
                        addresses: vec![],
                        ports: vec![],
                        audit: false,
                    }))
                }
                _ => problems.push(problem(&f, "not an endpoint line")),
            }
        }
    }
    if problems.is_empty() {
        Ok(set)
    } else {
        Err(problems)
    }
}

fn fake_compile(
    p: &PolicySet,
    r: &RegistrySet,
    _o: &CompileOptions,
) -> Result<Compiled, CompileError> {
    Ok(Compiled {
        endpoints: r
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| CompiledEndpoint {
                slot: i as u32,
                name: e.name.clone(),
                namespace: e.namespace.clone(),
                kind: e.kind,
                identity: 1000 + i as u32,
                local: true,
                interface: e.interface.clone(),
                addresses: vec![],
                default_deny_ingress: !p.policies.is_empty(),
                default_deny_egress: false,
                enforced_ingress: !p.policies.is_empty(),
                enforced_egress: false,
                audit: false,
            })
            .collect(),
        rules: p
            .policies
            .iter()
            .map(|p| RuleRef {
                file: p.origin.file.clone(),
                kind: p.origin.kind.as_str().into(),
                policy: format!("default/{}", p.origin.name).into(),
                path: "spec.ingress[0]".into(),
                staged: false,
                default_deny: false,
            })
            .collect(),
        ..Compiled::default()
    })
}

type LoadPolicies = fn(&Path) -> Result<PolicySet, Vec<Problem>>;
type LoadRegistry = fn(&[PathBuf]) -> Result<RegistrySet, Vec<Problem>>;
type CompileFn = fn(&PolicySet, &RegistrySet, &CompileOptions) -> Result<Compiled, CompileError>;

/// The stages the loop runs: the real parser and core by default, or stand-ins.
#[derive(Clone, Copy, Default)]
struct Pipeline {
    loader: Option<(LoadPolicies, LoadRegistry)>,
    compile: Option<CompileFn>,
}

/// The daemon's inputs through stand-in load functions: every read reads
/// everything (never `Unchanged`), saved copies read the same way.
#[derive(Clone)]
struct StandIn {
    policy_dir: PathBuf,
    endpoint_dirs: Vec<PathBuf>,
    load: (LoadPolicies, LoadRegistry),
}

impl Inputs for StandIn {
    fn policies(&mut self, _: Hint<'_>) -> Read<PolicySet> {
        (self.load.0)(&self.policy_dir).into()
    }
    fn registry(&mut self, _: Hint<'_>) -> Read<RegistrySet> {
        (self.load.1)(&self.endpoint_dirs).into()
    }
    fn saved(&self) -> Arc<dyn SavedReader> {
        Arc::new(self.clone())
    }
}

impl SavedReader for StandIn {
    fn policies(&self, dir: &Path) -> Result<PolicySet, Vec<Problem>> {
        (self.load.0)(dir)
    }
    fn registry(&self, dirs: &[PathBuf]) -> Result<RegistrySet, Vec<Problem>> {
        (self.load.1)(dirs)
    }
}

fn stand_in() -> Pipeline {
    Pipeline {
        loader: Some((fake_load_policies, fake_load_registry)),
        compile: Some(fake_compile),
    }
}

// ---------------------------------------------------------------- harness

/// The fake datapath, shared between the loop and the test.
#[derive(Clone, Default)]
struct SharedDp(Arc<Mutex<FakeDatapath>>);

impl Datapath for SharedDp {
    fn apply(&mut self, state: &Compiled, a: &[Attachment]) -> Result<u64, DatapathError> {
        self.0.lock().unwrap().apply(state, a)
    }
    fn sync_attachments(&mut self, a: &[Attachment]) -> Result<(), DatapathError> {
        self.0.lock().unwrap().sync_attachments(a)
    }
    fn generation(&self) -> u64 {
        self.0.lock().unwrap().generation()
    }
    fn poll_events(&mut self, max: usize) -> Vec<VerdictEvent> {
        self.0.lock().unwrap().poll_events(max)
    }
    fn counters(&self) -> std::collections::BTreeMap<u32, Counters> {
        self.0.lock().unwrap().counters()
    }
    fn detach_all(&mut self) -> Result<(), DatapathError> {
        self.0.lock().unwrap().detach_all()
    }
}

impl SharedDp {
    fn applies(&self) -> usize {
        self.0.lock().unwrap().applied.len()
    }
    /// Policy names in the active state, sorted.
    fn policies(&self) -> Vec<String> {
        let dp = self.0.lock().unwrap();
        let mut v: Vec<String> = dp
            .active
            .as_ref()
            .map(|c| c.rules.iter().map(|r| r.policy.to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
    fn attached(&self) -> Vec<Attachment> {
        self.0.lock().unwrap().attached.iter().copied().collect()
    }
}

struct Dirs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    config: Config,
}

impl Dirs {
    fn new() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        for d in ["pol", "ep"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        let config = Config {
            policy_dir: root.join("pol"),
            endpoint_dirs: vec![root.join("ep")],
            pin_dir: "/sys/fs/bpf/npe-test-unused".into(),
            runtime_dir: root.join("run"),
            state_dir: root.join("state"),
            node_name: "node-a".into(),
            resync_interval_s: 0,
            ..Config::default()
        };
        Dirs {
            _tmp: tmp,
            root,
            config,
        }
    }
    fn pol(&self, name: &str) -> PathBuf {
        self.config.policy_dir.join(name)
    }
    fn ep(&self, name: &str) -> PathBuf {
        self.config.endpoint_dirs[0].join(name)
    }
}

/// A daemon running on the test's runtime: call [`Daemon::stop`] and await the
/// future returned by [`start`] (the tests join both).
struct Daemon {
    dp: SharedDp,
    links: watch::Sender<LinkTable>,
    notes: Arc<Mutex<Vec<String>>>,
    reload: mpsc::UnboundedSender<()>,
    watch_events: mpsc::UnboundedSender<WatchEvent>,
    stop: Option<oneshot::Sender<()>>,
    socket: PathBuf,
}

fn start(
    config: Config,
    pipeline: Pipeline,
    dp: SharedDp,
) -> (
    Daemon,
    impl std::future::Future<Output = Result<(), netpol::daemon::DaemonError>>,
) {
    let (links, fake) = fake_links(LinkTable::default());
    let (notifier, notes) = Notifier::recorder();
    let (reload_tx, reload_rx) = mpsc::unbounded_channel();
    let mut opts = Options::new(netpol::logging::discard(), notifier, reload_rx);
    if let Some(load) = pipeline.loader {
        opts.inputs = Some(Box::new(StandIn {
            policy_dir: config.policy_dir.clone(),
            endpoint_dirs: config.endpoint_dirs.clone(),
            load,
        }));
    }
    if let Some(compile) = pipeline.compile {
        opts.compiler = Box::new(compile);
    }
    opts.event_poll = Duration::from_millis(20);
    let watch_events = opts.watch_sender();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let socket = config.socket_path();
    let fut = run_with(config, dp.clone(), fake, opts, async move {
        let _ = stop_rx.await;
    });
    (
        Daemon {
            dp,
            links,
            notes,
            reload: reload_tx,
            watch_events,
            stop: Some(stop_tx),
            socket,
        },
        fut,
    )
}

impl Daemon {
    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    async fn ask(&self, request: &str) -> String {
        let s = tokio::net::UnixStream::connect(&self.socket)
            .await
            .expect("connect to the runtime socket");
        let (r, mut w) = s.into_split();
        w.write_all(format!("{{\"request\":\"{request}\"}}\n").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).await.unwrap();
        line
    }

    async fn status(&self) -> Status {
        serde_json::from_str(&self.ask("status").await).unwrap()
    }

    async fn endpoints(&self) -> Vec<EndpointView> {
        serde_json::from_str(&self.ask("endpoints").await).unwrap()
    }

    /// Poll the status until `f` holds (5 s at most).
    async fn wait_for(&self, what: &str, f: impl Fn(&Status, &SharedDp) -> bool) -> Status {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if self.socket.exists() {
                let s = self.status().await;
                if f(&s, &self.dp) {
                    return s;
                }
                if tokio::time::Instant::now() > deadline {
                    panic!(
                        "timed out waiting for {what}; status: {s:?}; policies {:?}",
                        self.dp.policies()
                    );
                }
            } else if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}: no socket");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap().clone()
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Rewrite a file in place through a hard link outside the watched directory:
/// inotify on the directory sees nothing, like a lost event.
fn write_unseen(dirs: &Dirs, path: &Path, text: &str) {
    let outside = dirs.root.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let link = outside.join(path.file_name().unwrap());
    let _ = std::fs::remove_file(&link);
    std::fs::hard_link(path, &link).unwrap();
    std::fs::write(&link, text).unwrap();
}

macro_rules! run_daemon {
    ($fut:expr, $body:expr) => {{
        let (r, ()) = tokio::join!($fut, $body);
        r.expect("daemon loop failed");
    }};
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn burst_of_writes_is_one_reconcile() {
    let dirs = Dirs::new();
    let (mut d, fut) = start(dirs.config.clone(), stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        d.wait_for("the first generation", |s, _| s.ready).await;
        assert_eq!(d.dp.applies(), 1);
        // A burst spread over ~100 ms, longer than the settle time of a single change.
        for i in 0..50 {
            write(&dirs.pol(&format!("p{i:02}.yaml")), &format!("p{i:02}"));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let s = d
            .wait_for("50 policies", |s, dp| {
                s.policies == 50 && dp.policies().len() == 50
            })
            .await;
        // Let any straggling reconcile happen before counting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = d.dp.applies();
        assert!(n <= 5, "50 writes gave {n} applies");
        assert_eq!(
            s.generation as usize,
            d.dp.applies().min(s.generation as usize)
        );
        assert!(!s.degraded && s.errors.is_empty());
        // Nothing changed: a resync or reload applies nothing.
        d.reload.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(d.dp.applies(), n);
        d.stop();
    });
}

#[tokio::test]
async fn file_renamed_into_the_directory_is_applied_and_editor_leftovers_ignored() {
    let dirs = Dirs::new();
    let (mut d, fut) = start(dirs.config.clone(), stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        d.wait_for("ready", |s, _| s.ready).await;
        let staging = dirs.root.join("staging.yaml");
        write(&staging, "renamed");
        std::fs::rename(&staging, dirs.pol("renamed.yaml")).unwrap();
        d.wait_for("the renamed policy", |_, dp| {
            dp.policies() == ["default/renamed"]
        })
        .await;
        write(&dirs.pol(".hidden.yaml"), "INVALID");
        write(&dirs.pol("renamed.yaml~"), "INVALID");
        write(&dirs.pol("b.yaml"), "b");
        d.wait_for("b", |_, dp| {
            dp.policies() == ["default/b", "default/renamed"]
        })
        .await;
        std::fs::remove_file(dirs.pol("renamed.yaml")).unwrap();
        let s = d
            .wait_for("removal", |_, dp| dp.policies() == ["default/b"])
            .await;
        assert!(s.errors.is_empty());
        d.stop();
    });
}

#[tokio::test]
async fn lost_events_are_recovered_by_a_rescan_and_by_the_resync_timer() {
    let dirs = Dirs::new();
    write(&dirs.pol("a.yaml"), "a");
    let (mut d, fut) = start(dirs.config.clone(), stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        d.wait_for("ready", |_, dp| dp.policies() == ["default/a"])
            .await;
        write_unseen(&dirs, &dirs.pol("a.yaml"), "a2");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            d.dp.policies(),
            ["default/a"],
            "the change should not have been seen"
        );
        d.watch_events.send(WatchEvent::Rescan).unwrap();
        d.wait_for("the rescan", |_, dp| dp.policies() == ["default/a2"])
            .await;
        d.stop();
    });

    let mut config = dirs.config.clone();
    config.resync_interval_s = 1;
    let (mut d, fut) = start(config, stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        d.wait_for("ready", |_, dp| dp.policies() == ["default/a2"])
            .await;
        write_unseen(&dirs, &dirs.pol("a.yaml"), "a3");
        d.wait_for("the periodic resync", |_, dp| {
            dp.policies() == ["default/a3"]
        })
        .await;
        d.stop();
    });
}

#[tokio::test]
async fn invalid_file_keeps_the_last_valid_set_until_fixed() {
    let dirs = Dirs::new();
    write(&dirs.pol("a.yaml"), "a");
    write(&dirs.ep("eps.yaml"), "web veth-web\n");
    let (mut d, fut) = start(dirs.config.clone(), stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        let s = d.wait_for("ready", |s, _| s.ready).await;
        assert!(!s.degraded);
        let applies = d.dp.applies();
        write(&dirs.pol("b.yaml"), "INVALID");
        let s = d.wait_for("the problem", |s, _| !s.errors.is_empty()).await;
        assert!(s.degraded && s.ready);
        assert_eq!(s.errors.len(), 1);
        assert_eq!(s.errors[0].file, dirs.pol("b.yaml").display().to_string());
        assert_eq!(
            s.errors[0].message,
            format!("{}:1:1: not a policy", dirs.pol("b.yaml").display())
        );
        assert_eq!(d.dp.policies(), ["default/a"]);
        assert_eq!(d.dp.applies(), applies, "nothing applied while invalid");
        // The registry on its own: a valid registry change applies with the last valid policies.
        write(&dirs.ep("eps.yaml"), "web veth-web\ndb veth-db\n");
        d.wait_for("the new endpoint", |s, _| s.endpoints == 2)
            .await;
        assert_eq!(d.dp.policies(), ["default/a"]);
        // An invalid registry keeps the last registry while policies are fixed.
        write(&dirs.ep("eps.yaml"), "INVALID\n");
        write(&dirs.pol("b.yaml"), "b");
        let s = d
            .wait_for("b applied", |_, dp| {
                dp.policies() == ["default/a", "default/b"]
            })
            .await;
        assert_eq!(s.endpoints, 2);
        assert!(s.degraded);
        assert_eq!(s.errors[0].file, dirs.ep("eps.yaml").display().to_string());
        write(&dirs.ep("eps.yaml"), "web veth-web\n");
        let s = d
            .wait_for("all valid", |s, _| s.errors.is_empty() && s.endpoints == 1)
            .await;
        assert!(!s.degraded);
        d.stop();
    });
}

#[tokio::test]
async fn interfaces_are_attached_when_they_appear_and_follow_recreation() {
    let dirs = Dirs::new();
    write(&dirs.ep("eps.yaml"), "web veth-web\ndb veth-db\n");
    let (mut d, fut) = start(dirs.config.clone(), stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        let s = d.wait_for("ready", |s, _| s.ready).await;
        assert_eq!((s.endpoints, s.attached, s.pending), (2, 0, 2));
        assert!(d.dp.attached().is_empty());
        let eps = d.endpoints().await;
        assert_eq!(
            eps.iter().map(|e| e.state.as_str()).collect::<Vec<_>>(),
            ["pending", "pending"]
        );

        let table = |links: &[(&str, u32)]| LinkTable {
            links: links.iter().map(|(n, i)| (n.to_string(), *i)).collect(),
            ..LinkTable::default()
        };
        d.links.send(table(&[("lo", 1), ("veth-db", 7)])).unwrap();
        d.wait_for("db attached", |s, _| s.attached == 1).await;
        assert_eq!(
            d.dp.attached(),
            [Attachment {
                slot: 1,
                ifindex: 7
            }]
        );

        d.links
            .send(table(&[("lo", 1), ("veth-db", 7), ("veth-web", 8)]))
            .unwrap();
        d.wait_for("web attached", |s, _| s.attached == 2).await;
        assert_eq!(
            d.dp.attached(),
            [
                Attachment {
                    slot: 0,
                    ifindex: 8
                },
                Attachment {
                    slot: 1,
                    ifindex: 7
                }
            ]
        );
        let eps = d.endpoints().await;
        assert_eq!(eps[0].ifindex, Some(8));
        assert_eq!(eps[0].state, EndpointState::Attached);
        assert_eq!(eps[0].identity, 1000);

        // veth-db recreated with another ifindex, veth-web gone.
        d.links.send(table(&[("lo", 1), ("veth-db", 12)])).unwrap();
        let s = d
            .wait_for("re-attached", |_, dp| {
                dp.attached()
                    == [Attachment {
                        slot: 1,
                        ifindex: 12,
                    }]
            })
            .await;
        assert_eq!((s.attached, s.pending), (1, 1));
        d.stop();
    });
}

#[tokio::test]
async fn last_valid_files_are_used_at_start_when_the_live_ones_are_invalid() {
    let dirs = Dirs::new();
    write(&dirs.pol("a.yaml"), "a");
    write(&dirs.ep("eps.yaml"), "web veth-web\n");
    let (mut d, fut) = start(dirs.config.clone(), stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        d.wait_for("ready", |s, _| s.ready).await;
        d.stop();
    });
    assert!(dirs
        .config
        .state_dir
        .join("last-good/policies/a.yaml")
        .exists());

    // Broken while the daemon was down.
    write(&dirs.pol("a.yaml"), "INVALID");
    write(&dirs.ep("eps.yaml"), "INVALID\n");
    let (mut d, fut) = start(dirs.config.clone(), stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        let s = d.wait_for("ready", |s, _| s.ready).await;
        assert!(
            s.degraded && s.policies_from_last_good && s.registry_from_last_good,
            "{s:?}"
        );
        assert_eq!(s.errors.len(), 2);
        assert_eq!(d.dp.policies(), ["default/a"]);
        assert_eq!(s.endpoints, 1);
        // The saved copy is not overwritten by the broken files.
        assert_eq!(
            std::fs::read_to_string(dirs.config.state_dir.join("last-good/policies/a.yaml"))
                .unwrap(),
            "a"
        );
        write(&dirs.pol("a.yaml"), "a-fixed");
        write(&dirs.ep("eps.yaml"), "web veth-web\n");
        let s = d
            .wait_for("fixed", |s, dp| {
                s.errors.is_empty() && dp.policies() == ["default/a-fixed"]
            })
            .await;
        assert!(!s.degraded && !s.policies_from_last_good && !s.registry_from_last_good);
        d.stop();
    });
    assert_eq!(
        std::fs::read_to_string(dirs.config.state_dir.join("last-good/policies/a.yaml")).unwrap(),
        "a-fixed"
    );
}

/// Set while a test holds the saving of the last valid copy.
static HOLD_SAVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Set once a held save has begun verifying its copy.
static SAVE_HELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The stand-in loader, except that verifying a copy in `last-good` waits while
/// `HOLD_SAVE` is set (at most 10 s: a loop that saved on its own thread would
/// otherwise hang the test rather than fail it).
fn held_load_policies(dir: &Path) -> Result<PolicySet, Vec<Problem>> {
    use std::sync::atomic::Ordering;
    if dir.to_string_lossy().contains("last-good") {
        let t0 = std::time::Instant::now();
        while HOLD_SAVE.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(10) {
            SAVE_HELD.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    fake_load_policies(dir)
}

/// Saving the last valid copy (copy, flush, verify: a tenth of a second or
/// more for a thousand files) happens beside the loop: a change that arrives
/// meanwhile is applied at once, and the copy that began before it is dropped
/// rather than saved, then the newer files are saved.
#[tokio::test]
async fn a_slow_save_of_the_last_valid_copy_does_not_hold_up_changes() {
    use std::sync::atomic::Ordering;
    let dirs = Dirs::new();
    write(&dirs.pol("a.yaml"), "a");
    let saved = dirs.config.state_dir.join("last-good/policies");
    let pipeline = Pipeline {
        loader: Some((held_load_policies, fake_load_registry)),
        compile: Some(fake_compile),
    };
    HOLD_SAVE.store(true, Ordering::SeqCst);
    let (mut d, fut) = start(dirs.config.clone(), pipeline, SharedDp::default());
    run_daemon!(fut, async {
        d.wait_for("ready", |s, dp| s.ready && dp.policies() == ["default/a"])
            .await;
        // The first save is under way and held.
        let t0 = tokio::time::Instant::now();
        while !SAVE_HELD.load(Ordering::SeqCst) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the save did not start"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        write(&dirs.pol("b.yaml"), "b");
        d.wait_for("b, while the save is held", |_, dp| {
            dp.policies() == ["default/a", "default/b"]
        })
        .await;
        assert!(
            HOLD_SAVE.load(Ordering::SeqCst) && !saved.exists(),
            "nothing saved yet"
        );
        HOLD_SAVE.store(false, Ordering::SeqCst);
        let t0 = tokio::time::Instant::now();
        while !saved.join("b.yaml").exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the newer files were not saved"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(saved.join("a.yaml").exists());
        d.stop();
    });
}

#[tokio::test]
async fn nothing_valid_and_nothing_saved_applies_nothing() {
    let dirs = Dirs::new();
    write(&dirs.pol("a.yaml"), "INVALID");
    let (mut d, fut) = start(dirs.config.clone(), stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        let s = d.wait_for("the problem", |s, _| !s.errors.is_empty()).await;
        assert!(!s.ready && s.degraded);
        assert_eq!(d.dp.applies(), 0);
        assert!(d.notes().iter().all(|n| !n.contains("READY=1")));
        write(&dirs.pol("a.yaml"), "a");
        d.wait_for("ready", |s, _| s.ready && !s.degraded).await;
        d.stop();
    });
}

#[tokio::test]
async fn datapath_errors_are_retried_and_keep_the_loop_running() {
    let dirs = Dirs::new();
    let dp = SharedDp::default();
    let (mut d, fut) = start(dirs.config.clone(), stand_in(), dp.clone());
    run_daemon!(fut, async {
        d.wait_for("ready", |s, _| s.ready).await;
        dp.0.lock().unwrap().fail_next_apply = Some("map full".into());
        write(&dirs.pol("a.yaml"), "a");
        let s = d
            .wait_for("the failure", |s, _| s.datapath_error.is_some())
            .await;
        assert_eq!(s.datapath_error.as_deref(), Some("map full"));
        assert!(s.degraded);
        // Retried after the backoff without any new event.
        let s = d
            .wait_for("the retry", |s, dp| {
                s.datapath_error.is_none() && dp.policies() == ["default/a"]
            })
            .await;
        assert!(!s.degraded);
        d.stop();
    });
}

#[tokio::test]
async fn unwritable_state_dir_is_reported_and_enforcement_goes_on() {
    let dirs = Dirs::new();
    let blocker = dirs.root.join("file");
    write(&blocker, "");
    let mut config = dirs.config.clone();
    config.state_dir = blocker.join("state");
    write(&dirs.pol("a.yaml"), "a");
    let (mut d, fut) = start(config, stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        let s = d
            .wait_for("the state_dir error", |s, _| {
                s.ready && s.state_error.is_some()
            })
            .await;
        assert!(
            s.state_error.as_deref().unwrap_or("").contains("last-good"),
            "{s:?}"
        );
        assert_eq!(d.dp.policies(), ["default/a"]);
        d.stop();
    });
}

#[tokio::test]
async fn systemd_is_told_ready_status_reloading_and_stopping() {
    let dirs = Dirs::new();
    let (mut d, fut) = start(dirs.config.clone(), stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        d.wait_for("ready", |s, _| s.ready).await;
        let notes = d.notes();
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].starts_with("READY=1\nSTATUS=generation 1: 0 endpoints"),
            "{notes:?}"
        );
        d.reload.send(()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while d.notes().len() < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let notes = d.notes();
        assert!(
            notes[1].starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{notes:?}"
        );
        assert!(
            notes[2].starts_with("READY=1\nSTATUS=generation 1"),
            "{notes:?}"
        );
        write(&dirs.pol("a.yaml"), "a");
        d.wait_for("generation 2", |s, _| s.generation == 2).await;
        d.stop();
    });
    let notes = d.notes();
    assert!(
        notes.iter().any(|n| n.starts_with(
            "STATUS=generation 2: 0 endpoints (0 attached, 0 pending), 1 policy, 0 problems"
        )),
        "{notes:?}"
    );
    assert_eq!(notes.last().map(String::as_str), Some("STOPPING=1"));
    assert!(!d.socket.exists(), "the socket is removed on exit");
    assert_eq!(
        d.dp.policies(),
        ["default/a"],
        "enforcement stays after stop"
    );
}

#[tokio::test]
async fn monitor_streams_events_with_the_rule_resolved() {
    let dirs = Dirs::new();
    write(&dirs.pol("a.yaml"), "a");
    write(&dirs.ep("eps.yaml"), "web veth-web\n");
    let dp = SharedDp::default();
    let (mut d, fut) = start(dirs.config.clone(), stand_in(), dp.clone());
    run_daemon!(fut, async {
        d.wait_for("ready", |s, _| s.ready).await;
        let s = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(b"monitor\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ev = |verdict, reason, rule| VerdictEvent {
            ifindex: 8,
            slot: 0,
            direction: Direction::Ingress,
            verdict,
            reason,
            src: "10.202.0.2".parse().unwrap(),
            dst: "10.202.0.3".parse().unwrap(),
            proto: 6,
            sport: 40000,
            dport: 80,
            src_identity: 2,
            dst_identity: 1000,
            rule,
        };
        dp.0.lock().unwrap().events.push(ev(
            EventVerdict::Allowed,
            EventReason::PolicyAllow,
            Some(0),
        ));
        dp.0.lock()
            .unwrap()
            .events
            .push(ev(EventVerdict::Denied, EventReason::DefaultDeny, None));
        let mut lines = BufReader::new(r).lines();
        let a: serde_json::Value =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(a["verdict"], "allowed");
        assert_eq!(a["endpoint"], "default/web");
        assert_eq!(a["proto"], "tcp");
        assert_eq!(a["rule"]["file"], dirs.pol("a.yaml").display().to_string());
        assert_eq!(a["rule"]["policy"], "default/a");
        let b: netpol::daemon::status::MonitorEvent =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(
            (b.verdict.as_str(), b.reason.as_str(), b.rule.is_none()),
            ("denied", "default-deny", true)
        );
        let text = netpol::cli::daemonctl::format_event(&b);
        assert!(text.ends_with(" denied   10.202.0.2:40000 -> 10.202.0.3:80 tcp/80 default/web (ingress) default deny"), "{text}");
        d.stop();
    });
}

#[tokio::test]
async fn socket_is_private_and_rejects_bad_requests() {
    use std::os::unix::fs::PermissionsExt;
    let dirs = Dirs::new();
    let (mut d, fut) = start(dirs.config.clone(), stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        d.wait_for("ready", |s, _| s.ready).await;
        let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let unknown: serde_json::Value = serde_json::from_str(&d.ask("reboot").await).unwrap();
        assert_eq!(
            unknown["error"],
            "unknown request \"reboot\"; expected status, endpoints or monitor"
        );
        // An oversized request is refused without reading it all.
        let s = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
        let (r, mut w) = s.into_split();
        let _ = w.write_all(&vec![b'x'; 10_000]).await;
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).await.unwrap();
        assert_eq!(line.trim(), r#"{"error":"request longer than 4096 bytes"}"#);
        // A second daemon on the same socket refuses to start.
        let (_d2, fut2) = start(dirs.config.clone(), stand_in(), SharedDp::default());
        let e = netpol::error::chain(&fut2.await.unwrap_err());
        assert!(e.contains("another netpold answers on this socket"), "{e}");
        d.stop();
    });
}

#[test]
fn netpolctl_status_without_a_daemon_names_the_socket() {
    let dirs = Dirs::new();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_netpolctl"))
        .args(["status", "--socket"])
        .arg(dirs.config.socket_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "netpolctl: no netpold answers on {}:",
            dirs.config.socket_path().display()
        )),
        "{err}"
    );
}

#[test]
fn shipped_config_file_loads_as_the_defaults() {
    let path = crate::harness::cmd::repo().join("etc/netpol/netpold.toml");
    assert_eq!(Config::load(&path).unwrap(), Config::default());
    let dirs = Dirs::new();
    // Every key of the defaults is in the file, commented out with its
    // default value: uncommented, the file still loads as the defaults.
    let text = std::fs::read_to_string(&path).unwrap();
    let defaults = toml::Value::try_from(Config::default()).unwrap();
    for (table, keys) in defaults.as_table().unwrap() {
        let Some(keys) = keys.as_table() else {
            continue;
        };
        let section = text
            .split(&format!("#[{table}]\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no #[{table}] in {}", path.display()));
        let section = section.split("\n#[").next().unwrap();
        for key in keys.keys() {
            assert!(
                section
                    .lines()
                    .any(|l| l.starts_with(&format!("#{key} = "))),
                "{}: [{table}] {key} is not in the file",
                path.display()
            );
        }
    }
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(k)
                if k.starts_with('[')
                    || k.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')) =>
            {
                k
            }
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let all = dirs.root.join("uncommented.toml");
    write(&all, &uncommented);
    assert_eq!(Config::load(&all).unwrap(), Config::default());
    let bad = dirs.root.join("bad.toml");
    write(&bad, "[conntrack]\nmax_entries = -1\n");
    let e = Config::load(&bad).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}:2:15: conntrack.max_entries: invalid value",
            bad.display()
        )),
        "{e}"
    );
}

// ---------------------------------------------------------------- the real parser and core

/// Fresh directories holding the seed registry and its frontend-to-backend policy.
fn seed_dirs() -> Dirs {
    let dirs = Dirs::new();
    std::fs::copy(seed("endpoints.d/seed.yaml"), dirs.ep("seed.yaml")).unwrap();
    std::fs::copy(
        seed("netpol.d/frontend-to-backend.yaml"),
        dirs.pol("frontend-to-backend.yaml"),
    )
    .unwrap();
    dirs
}

fn seed(path: &str) -> PathBuf {
    crate::harness::cmd::repo()
        .join("etc/examples/seed")
        .join(path)
}

#[tokio::test]
async fn seed_scenario_through_the_real_parser_and_core() {
    let dirs = Dirs::new();
    std::fs::copy(seed("endpoints.d/seed.yaml"), dirs.ep("seed.yaml")).unwrap();
    let dp = SharedDp::default();
    let (mut d, fut) = start(dirs.config.clone(), Pipeline::default(), dp.clone());
    run_daemon!(fut, async {
        let s = d.wait_for("ready", |s, _| s.ready).await;
        assert_eq!(
            (s.endpoints, s.attached, s.pending, s.policies),
            (4, 0, 4, 0)
        );
        let table = LinkTable {
            links: [
                ("lo", 1),
                ("veth-fe1", 11),
                ("veth-fe2", 12),
                ("veth-be", 13),
                ("veth-db", 14),
            ]
            .iter()
            .map(|(n, i)| (n.to_string(), *i))
            .collect(),
            ..LinkTable::default()
        };
        d.links.send(table).unwrap();
        d.wait_for("all attached", |s, _| s.attached == 4).await;

        std::fs::copy(
            seed("netpol.d/frontend-to-backend.yaml"),
            dirs.pol("frontend-to-backend.yaml"),
        )
        .unwrap();
        d.wait_for("frontend-to-backend", |s, _| s.policies == 1)
            .await;
        let eps = d.endpoints().await;
        let by_name = |n: &str| eps.iter().find(|e| e.name == n).unwrap().clone();
        assert!(by_name("backend").ingress_default_deny && !by_name("backend").egress_default_deny);
        assert!(
            !by_name("frontend-1").ingress_default_deny
                && !by_name("frontend-1").egress_default_deny
        );
        assert_eq!(by_name("backend").state, EndpointState::Attached);
        assert_eq!(by_name("backend").ifindex, Some(13));
        {
            let dp = dp.0.lock().unwrap();
            let c = dp.active.as_ref().unwrap();
            assert_eq!(c.rules.len(), 1);
            assert_eq!(&*c.rules[0].policy, "default/frontend-to-backend");
            assert_eq!(
                &*c.rules[0].file,
                dirs.pol("frontend-to-backend.yaml").as_path()
            );
            let backend = c
                .endpoints
                .iter()
                .find(|e| e.name == "backend")
                .unwrap()
                .slot;
            assert!(c.entries.iter().any(|e| e.endpoint == backend
                && e.direction == Direction::Ingress
                && e.port == 80));
        }

        // A broken file: named with line and column, nothing applied, last set kept.
        let applies = d.dp.applies();
        write(&dirs.pol("broken.yaml"), "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: broken}\nspec:\n  endpointSelector: {}\n  ingres: []\n");
        let s = d
            .wait_for("the broken file", |s, _| !s.errors.is_empty())
            .await;
        assert!(s.degraded);
        assert_eq!(
            s.errors[0].file,
            dirs.pol("broken.yaml").display().to_string()
        );
        assert!(
            s.errors[0]
                .message
                .starts_with(&format!("{}:6:3:", dirs.pol("broken.yaml").display())),
            "{:?}",
            s.errors
        );
        assert_eq!(d.dp.applies(), applies);
        std::fs::remove_file(dirs.pol("broken.yaml")).unwrap();

        std::fs::copy(
            seed("netpol.d/frontend-egress-control.yaml"),
            dirs.pol("frontend-egress-control.yaml"),
        )
        .unwrap();
        let s = d
            .wait_for("both policies", |s, _| {
                s.policies == 2 && s.errors.is_empty()
            })
            .await;
        assert!(!s.degraded);
        let eps = d.endpoints().await;
        assert!(
            eps.iter()
                .find(|e| e.name == "frontend-2")
                .unwrap()
                .egress_default_deny
        );
        d.stop();
    });
}

/// How files are saved, through the real parser: written aside and renamed into
/// place, replaced the way vim does (the old file moved away, a new one written),
/// and rewritten where inotify cannot see it (through a hard link elsewhere),
/// which a file event does not pick up (it reads only the files its events
/// name) but a reload does.
#[tokio::test]
async fn saves_by_rename_or_replacement_are_applied_and_unseen_writes_wait_for_a_full_read() {
    let cnp = |name: &str| {
        format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  endpointSelector: {{}}\n  ingress: [{{}}]\n")
    };
    let dirs = Dirs::new();
    write(&dirs.pol("a.yaml"), &cnp("a"));
    let (mut d, fut) = start(
        dirs.config.clone(),
        Pipeline::default(),
        SharedDp::default(),
    );
    run_daemon!(fut, async {
        d.wait_for("ready", |s, dp| s.ready && dp.policies() == ["default/a"])
            .await;
        // Staged under a name netpol never reads, then renamed into place.
        write(&dirs.pol(".b.yaml.new"), &cnp("b"));
        std::fs::rename(dirs.pol(".b.yaml.new"), dirs.pol("b.yaml")).unwrap();
        d.wait_for("b", |_, dp| dp.policies() == ["default/a", "default/b"])
            .await;
        // vim without backupcopy: move the old file away, write the new one, drop the backup.
        std::fs::rename(dirs.pol("a.yaml"), dirs.pol("a.yaml~")).unwrap();
        write(&dirs.pol("a.yaml"), &cnp("a2"));
        std::fs::remove_file(dirs.pol("a.yaml~")).unwrap();
        d.wait_for("a2", |_, dp| dp.policies() == ["default/a2", "default/b"])
            .await;
        // A write inotify does not see, then one it does: only the named file is read.
        write_unseen(&dirs, &dirs.pol("a.yaml"), &cnp("a3"));
        write(&dirs.pol("c.yaml"), &cnp("c"));
        let s = d.wait_for("c", |_, dp| dp.policies().len() == 3).await;
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert_eq!(d.dp.policies(), ["default/a2", "default/b", "default/c"]);
        // A reload reads every file.
        d.reload.send(()).unwrap();
        d.wait_for("a3 after the reload", |_, dp| {
            dp.policies() == ["default/a3", "default/b", "default/c"]
        })
        .await;
        // Removal.
        std::fs::remove_file(dirs.pol("b.yaml")).unwrap();
        d.wait_for("b removed", |_, dp| {
            dp.policies() == ["default/a3", "default/c"]
        })
        .await;
        d.stop();
    });
}

/// A valid policy whose compiled state would not fit the policy map
/// (`maps.policy_max_entries`) is invalid input like a parse error: refused,
/// named in the status with its file, the last policy set that fit stays in force
/// (also across a restart, from the saved copy) while registry changes still
/// apply, and the fixed file is applied.
#[tokio::test]
async fn set_over_the_map_budget_keeps_the_last_fitting_set_until_fixed() {
    let dirs = seed_dirs();
    let mut config = dirs.config.clone();
    config.maps.policy_max_entries = 20;
    // `n` TCP ports to backend from anyone: n entries for backend.
    let big = |n: u16| {
        let ports: Vec<String> = (0..n)
            .map(|i| format!("{{port: \"{}\", protocol: TCP}}", 1000 + i))
            .collect();
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: big}}\nspec:\n  endpointSelector: {{matchLabels: {{app: backend}}}}\n  ingress:\n  - toPorts: [{{ports: [{}]}}]\n",
            ports.join(", ")
        )
    };
    let f = dirs.pol("big.yaml");
    let expected = format!(
        "{}:7:5: document 1 (CiliumNetworkPolicy default/big): spec.ingress[0]: with this rule, endpoint \
         default/backend would need more than 20 policy entries; the policy map holds 20 \
         (maps.policy_max_entries); narrow the rule or raise maps.policy_max_entries in netpold.toml",
        f.display()
    );
    let saved = |name: &str| dirs.config.state_dir.join("last-good/policies").join(name);
    let (mut d, fut) = start(config.clone(), Pipeline::default(), SharedDp::default());
    run_daemon!(fut, async {
        d.wait_for("ready", |s, _| s.ready && s.policies == 1).await;
        d.wait_for("the saved copy", |_, _| {
            saved("frontend-to-backend.yaml").exists()
        })
        .await;
        let applies = d.dp.applies();
        write(&f, &big(30));
        let s = d.wait_for("the refusal", |s, _| !s.errors.is_empty()).await;
        assert!(s.degraded && s.ready, "{s:?}");
        assert_eq!(s.errors.len(), 1);
        assert_eq!(s.errors[0].file, f.display().to_string());
        assert_eq!((s.errors[0].line, s.errors[0].column), (Some(7), Some(5)));
        assert_eq!(s.errors[0].message, expected);
        assert_eq!(
            d.dp.applies(),
            applies,
            "nothing applied while over the budget"
        );
        assert_eq!(d.dp.policies(), ["default/frontend-to-backend"]);
        assert_eq!(
            s.policies, 1,
            "the status counts the set in force, not the refused one"
        );
        // A registry change still applies, with the last policy set that fit.
        write(
            &dirs.ep("extra.yaml"),
            "apiVersion: netpol/v1\nkind: Endpoint\nmetadata: {name: extra}\nspec: {interface: veth-extra, addresses: [10.0.9.9]}\n",
        );
        let s = d
            .wait_for("the new endpoint", |s, _| s.endpoints == 5)
            .await;
        assert_eq!(s.errors.len(), 1, "{s:?}");
        assert_eq!(s.policies, 1);
        assert_eq!(d.dp.policies(), ["default/frontend-to-backend"]);
        assert_eq!(d.dp.applies(), applies + 1);
        // Another reconcile changes nothing: still refused, still the same state.
        d.reload.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let s = d.status().await;
        assert!(s.degraded && s.errors.len() == 1, "{s:?}");
        assert_eq!(d.dp.applies(), applies + 1);
        // The refused file is not saved as part of the last valid copy.
        assert!(!saved("big.yaml").exists());
        d.stop();
    });

    // Restarted with the file still too big: the saved copy is enforced.
    let (mut d, fut) = start(config, Pipeline::default(), SharedDp::default());
    run_daemon!(fut, async {
        let s = d.wait_for("ready", |s, _| s.ready).await;
        assert!(s.degraded, "{s:?}");
        assert_eq!(
            s.errors
                .iter()
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>(),
            [expected.as_str()]
        );
        assert_eq!(d.dp.policies(), ["default/frontend-to-backend"]);
        // Fixed: applied.
        write(&f, &big(3));
        let s = d
            .wait_for("the fixed set", |s, dp| {
                s.errors.is_empty()
                    && dp.policies() == ["default/big", "default/frontend-to-backend"]
            })
            .await;
        assert!(!s.degraded, "{s:?}");
        d.stop();
    });
}

/// A registry change that makes the policies overflow the policy map keeps the
/// last registry that fit (and the policies, which still change), names the
/// endpoint to blame with its file and field, and recovers once fixed.
#[tokio::test]
async fn registry_over_the_map_budget_keeps_the_last_fitting_registry_until_fixed() {
    let dirs = seed_dirs();
    // `n` more ports to backend from frontend: n + 1 entries per backend.
    let wide = |n: u16| {
        let ports: Vec<String> = (0..n)
            .map(|i| format!("{{port: \"{}\", protocol: TCP}}", 1000 + i))
            .collect();
        write(
            &dirs.pol("wide.yaml"),
            &format!(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: wide}}\nspec:\n  endpointSelector: {{matchLabels: {{app: backend}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: frontend}}}}]\n    toPorts: [{{ports: [{}]}}]\n",
                ports.join(", ")
            ),
        )
    };
    wide(8);
    let mut config = dirs.config.clone();
    config.maps.policy_max_entries = 20;
    let backends = |n: usize| {
        (2..2 + n)
            .map(|i| format!("apiVersion: netpol/v1\nkind: Endpoint\nmetadata: {{name: backend-{i}, labels: {{app: backend}}}}\nspec: {{interface: veth-be{i}, addresses: [10.0.2.{i}]}}\n"))
            .collect::<Vec<_>>()
            .join("---\n")
    };
    // Named to sort after seed.yaml: the endpoint that pushes the map over.
    let f = dirs.ep("z-backends.yaml");
    let (mut d, fut) = start(config, Pipeline::default(), SharedDp::default());
    run_daemon!(fut, async {
        d.wait_for("ready", |s, _| s.ready && s.policies == 2).await;
        write(&f, &backends(1));
        d.wait_for("backend-2", |s, _| s.endpoints == 5 && s.errors.is_empty())
            .await;
        let applies = d.dp.applies();
        // A third backend: 27 entries on this host, over 20.
        write(&f, &backends(2));
        let s = d.wait_for("the refusal", |s, _| !s.errors.is_empty()).await;
        assert!(s.degraded && s.ready, "{s:?}");
        assert_eq!(s.errors.len(), 1, "{s:?}");
        assert_eq!(s.errors[0].file, f.display().to_string());
        assert_eq!(
            s.errors[0].message,
            format!(
                "{}: document 2 (Endpoint default/backend-3): metadata.labels: with this endpoint, the endpoints of \
                 this host would need more than 20 policy entries (it needs 9 (the most from {} CiliumNetworkPolicy \
                 default/wide: spec.ingress[0])); the policy map holds 20 (maps.policy_max_entries); raise \
                 maps.policy_max_entries in netpold.toml or change the endpoint",
                f.display(),
                dirs.pol("wide.yaml").display()
            )
        );
        assert_eq!(s.endpoints, 5, "the last registry that fit is in force");
        assert_eq!(d.dp.applies(), applies, "nothing new to apply");
        // A policy change applies, against the last registry that fit.
        std::fs::remove_file(dirs.pol("frontend-to-backend.yaml")).unwrap();
        let s = d
            .wait_for("the policy change", |s, dp| {
                dp.policies() == ["default/wide"] && s.policies == 1
            })
            .await;
        assert_eq!((s.endpoints, s.errors.len()), (5, 1), "{s:?}");
        // Fixed (6 entries per backend, 18 in all): the new registry applies.
        wide(6);
        let s = d
            .wait_for("the fitting registry", |s, _| {
                s.errors.is_empty() && s.endpoints == 6
            })
            .await;
        assert!(!s.degraded, "{s:?}");
        d.stop();
    });
}

/// `strict_file_modes` (on by default): a group-writable policy file is refused
/// with a message naming it and the fix, and the set in force stays; with the key
/// off the same file applies.
#[tokio::test]
async fn group_writable_policy_file_is_refused_unless_strict_modes_are_off() {
    use std::os::unix::fs::PermissionsExt;
    for strict in [true, false] {
        let dirs = Dirs::new();
        std::fs::copy(seed("endpoints.d/seed.yaml"), dirs.ep("seed.yaml")).unwrap();
        let mut config = dirs.config.clone();
        config.strict_file_modes = strict;
        let (mut d, fut) = start(config, Pipeline::default(), SharedDp::default());
        run_daemon!(fut, async {
            d.wait_for("ready", |s, _| s.ready).await;
            // Made group-writable before it enters the directory, so no load sees it trusted.
            let staged = dirs.root.join("staged.yaml");
            std::fs::copy(seed("netpol.d/frontend-to-backend.yaml"), &staged).unwrap();
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o664)).unwrap();
            let f = dirs.pol("frontend-to-backend.yaml");
            std::fs::rename(&staged, &f).unwrap();
            if strict {
                let s = d
                    .wait_for("the group-writable file refused", |s, _| {
                        !s.errors.is_empty()
                    })
                    .await;
                assert_eq!(s.policies, 0, "{s:?}");
                assert_eq!(
                    s.errors[0].message,
                    format!(
                        "{}: file is writable by group (mode 0664), so someone other than its owner could change what netpol enforces; run chmod go-w {}",
                        f.display(),
                        f.display()
                    )
                );
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
            d.wait_for("the policy applied", |s, _| {
                s.policies == 1 && s.errors.is_empty()
            })
            .await;
            d.stop();
        });
    }
}

// ---------------------------------------------------------------- the binary

/// The netpold binary's signal and systemd wiring, with the in-memory datapath
/// (`--fake-datapath`) so it needs no root.
#[test]
fn netpold_binary_notifies_systemd_reloads_on_sighup_and_stops_on_sigterm() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::os::unix::net::UnixDatagram;

    let dirs = Dirs::new();
    let cfg_path = dirs.root.join("netpold.toml");
    let c = &dirs.config;
    std::fs::write(
        &cfg_path,
        format!(
            "policy_dir = \"{}\"\nendpoint_dirs = [\"{}\"]\npin_dir = \"/sys/fs/bpf/npe-test-unused\"\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\nlog_format = \"json\"\n",
            c.policy_dir.display(),
            c.endpoint_dirs[0].display(),
            c.runtime_dir.display(),
            c.state_dir.display()
        ),
    )
    .unwrap();
    let notify_path = dirs.root.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_netpold"))
        .args(["--fake-datapath", "--config"])
        .arg(&cfg_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("JOURNAL_STREAM")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let mut buf = [0u8; 4096];
    let mut next = || {
        let n = notify.recv(&mut buf).expect("a notification from netpold");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(
        ready.starts_with("READY=1\nSTATUS=generation 1: 0 endpoints"),
        "{ready}"
    );
    kill(pid, Signal::SIGHUP).unwrap();
    assert!(next().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert!(next().starts_with("READY=1\nSTATUS=generation 1"));
    kill(pid, Signal::SIGTERM).unwrap();
    assert_eq!(next(), "STOPPING=1\n");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let log = String::from_utf8_lossy(&out.stderr);
    // JSON lines on request, one info line per applied generation.
    let applied: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("applied generation"))
        })
        .collect();
    assert_eq!(applied.len(), 1, "{log}");
    assert_eq!(applied[0]["generation"], 1);
    assert!(log.contains("\"signal\":\"SIGTERM\""), "{log}");
    assert!(!dirs.config.socket_path().exists());
}

#[tokio::test]
async fn socket_group_makes_the_socket_group_readable() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dirs = Dirs::new();
    let gid = nix::unistd::getgid();
    let group = nix::unistd::Group::from_gid(gid)
        .unwrap()
        .expect("the primary group has a name");
    let mut config = dirs.config.clone();
    config.socket_group = group.name.clone();
    let (mut d, fut) = start(config.clone(), stand_in(), SharedDp::default());
    run_daemon!(fut, async {
        d.wait_for("ready", |s, _| s.ready).await;
        let m = std::fs::metadata(&d.socket).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o660);
        assert_eq!(m.gid(), gid.as_raw());
        d.stop();
    });
    config.socket_group = "npe-no-such-group".into();
    std::fs::remove_dir_all(&config.runtime_dir).ok();
    let (_d, fut) = start(config, stand_in(), SharedDp::default());
    let e = netpol::error::chain(&fut.await.unwrap_err());
    assert_eq!(
        e,
        "runtime socket: socket_group \"npe-no-such-group\": no such group"
    );
    assert!(!dirs.config.socket_path().exists());
}

/// The lint (the warnings about the sets in force) waits until the inputs
/// have been quiet for `LINT_DELAY` after an apply, so a burst of changes is
/// enforced change by change without any waiting behind a lint: each change
/// of the burst is applied before its warnings are found, and they are found
/// once the burst is over.
#[tokio::test]
async fn warnings_are_found_once_a_burst_of_changes_is_over() {
    use netpol::daemon::reconcile::LINT_DELAY;
    let dirs = Dirs::new();
    std::fs::copy(seed("endpoints.d/seed.yaml"), dirs.ep("seed.yaml")).unwrap();
    write(&dirs.pol("nobody.yaml"), "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: nobody}\nspec:\n  endpointSelector: {matchLabels: {app: nobody}}\n  ingress: [{}]\n");
    let db = |port: u16| {
        format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: db}}\nspec:\n  endpointSelector: {{matchLabels: {{app: database}}}}\n  ingress:\n    - fromEndpoints: [{{matchLabels: {{app: backend}}}}]\n      toPorts: [{{ports: [{{port: \"{port}\"}}]}}]\n")
    };
    write(&dirs.pol("db.yaml"), &db(5432));
    let dp = SharedDp::default();
    let (mut d, fut) = start(dirs.config.clone(), Pipeline::default(), dp.clone());
    run_daemon!(fut, async {
        let s = d
            .wait_for("the first warning", |s, _| {
                s.ready && !s.warnings.is_empty()
            })
            .await;
        assert_eq!(s.warnings.len(), 1, "{s:?}");
        for port in 5433..5436 {
            let g = d.status().await.generation;
            let t = std::time::Instant::now();
            write(&dirs.pol("db.yaml"), &db(port));
            let s = d
                .wait_for("the change applied", |s, _| s.generation > g)
                .await;
            if t.elapsed() < LINT_DELAY {
                assert!(
                    s.warnings.is_empty(),
                    "linted before the inputs were quiet: {s:?}"
                );
            }
        }
        let s = d
            .wait_for("the warning found after the burst", |s, _| {
                !s.warnings.is_empty()
            })
            .await;
        assert_eq!(s.warnings[0].code, "selects-nothing", "{s:?}");
        d.stop();
    });
}

/// Through the real parser and core: a staged policy is applied without
/// changing any default deny (its would-be denials are entries of their own),
/// its audit events name it on the monitor, and the files' warnings are in
/// `status` while the set applies; without the annotation it is enforced.
#[tokio::test]
async fn staged_policy_reports_and_warnings_are_in_status_through_the_real_pipeline() {
    use netpol::policy::types::EntryVerdict;
    let dirs = Dirs::new();
    std::fs::copy(seed("endpoints.d/seed.yaml"), dirs.ep("seed.yaml")).unwrap();
    let lockdown = |annotation: &str| {
        format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: database-lockdown\n{annotation}spec:\n  endpointSelector: {{matchLabels: {{app: database}}}}\n  ingress:\n    - fromEndpoints: [{{matchLabels: {{app: backend}}}}]\n")
    };
    write(
        &dirs.pol("lockdown.yaml"),
        &lockdown("  annotations:\n    netpol.io/audit: \"true\"\n"),
    );
    write(&dirs.pol("nobody.yaml"), "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: nobody}\nspec:\n  endpointSelector: {matchLabels: {app: nobody}}\n  ingress: [{}]\n");
    let dp = SharedDp::default();
    let (mut d, fut) = start(dirs.config.clone(), Pipeline::default(), dp.clone());
    run_daemon!(fut, async {
        // The lint's warnings come once the inputs have been quiet a while.
        let s = d
            .wait_for("both policies and their warnings", |s, _| {
                s.ready && s.policies == 2 && !s.warnings.is_empty()
            })
            .await;
        assert!(!s.degraded && s.errors.is_empty(), "{s:?}");
        let nobody = dirs.pol("nobody.yaml").display().to_string();
        let w: Vec<(&str, &str, &str)> = s
            .warnings
            .iter()
            .map(|w| (w.file.as_str(), w.code.as_str(), w.message.as_str()))
            .collect();
        assert_eq!(
            w,
            [(
                nobody.as_str(),
                "selects-nothing",
                format!("{nobody}:5:21: warning: document 1 (CiliumNetworkPolicy default/nobody): spec.endpointSelector: selects no endpoint of the registry in namespace \"default\", so this rule enforces nothing [selects-nothing]").as_str()
            )]
        );
        let staged_rule = {
            let dp = dp.0.lock().unwrap();
            let c = dp.active.as_ref().unwrap();
            let db = c.endpoints.iter().find(|e| e.name == "database").unwrap();
            assert!(
                !db.default_deny_ingress,
                "a staged policy brings no default deny"
            );
            let e = c
                .entries
                .iter()
                .find(|e| e.endpoint == db.slot && e.verdict == EntryVerdict::StagedDefaultDeny)
                .expect("the staged default deny");
            let r = &c.rules[e.rule as usize];
            assert_eq!(
                (&*r.policy, r.staged, r.default_deny),
                ("default/database-lockdown", true, true)
            );
            e.rule
        };

        let s = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(b"monitor\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        dp.0.lock().unwrap().events.push(VerdictEvent {
            ifindex: 14,
            slot: 1,
            direction: Direction::Ingress,
            src_identity: 1000,
            dst_identity: 1001,
            rule: Some(staged_rule),
            ..crate::harness::events::frontend_to_db(EventVerdict::Audit)
        });
        let mut lines = BufReader::new(r).lines();
        let ev: netpol::daemon::status::MonitorEvent =
            serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        let rule = ev.rule.as_ref().expect("attributed");
        assert_eq!(
            (
                ev.verdict.as_str(),
                rule.policy.as_str(),
                rule.staged,
                rule.default_deny
            ),
            ("audit", "default/database-lockdown", true, true)
        );
        let text = netpol::cli::daemonctl::format_event(&ev);
        assert!(
            text.ends_with(&format!(
                " audit    10.0.1.11:40000 -> 10.0.1.31:5432 tcp/5432 default/database (ingress) {} default/database-lockdown (CiliumNetworkPolicy, staged) spec default deny",
                dirs.pol("lockdown.yaml").display()
            )),
            "{text}"
        );

        // Enforced: database's ingress is default-deny, no staged entry is left.
        let g = d.status().await.generation;
        write(&dirs.pol("lockdown.yaml"), &lockdown(""));
        d.wait_for("the policy enforced", |s, _| s.generation > g)
            .await;
        {
            let dp = dp.0.lock().unwrap();
            let c = dp.active.as_ref().unwrap();
            let db = c.endpoints.iter().find(|e| e.name == "database").unwrap();
            assert!(db.default_deny_ingress);
            assert!(c
                .entries
                .iter()
                .all(|e| matches!(e.verdict, EntryVerdict::Allow | EntryVerdict::Deny)));
            assert!(c.rules.iter().all(|r| !r.staged));
        }
        let s = d
            .wait_for("the warning found again", |s, _| !s.warnings.is_empty())
            .await;
        assert_eq!(s.warnings.len(), 1);
        d.stop();
    });
}

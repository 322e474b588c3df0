//! The privileged tests: root, bpffs, iproute2 and util-linux, real network
//! namespaces and the kernel datapath, one binary (`cargo test --test
//! privileged`, under the shared lock `/tmp/netpol-privileged.lock` on a shared
//! machine). Without what they need they skip with a message; under `CI=true`
//! they fail (`harness::require`). Their names carry the process id and a
//! per-test tag, so they run side by side; the fault and soak tests run alone
//! (`Needs::alone`): they measure timings a neighbour would distort.

mod harness;

mod privileged {
    mod bypass;
    mod daemon_e2e;
    mod datapath;
    mod datapath_diff;
    mod dns;
    mod faults;
    mod fleet;
    mod kindnode;
    mod multinode;
    mod soak;
}

//! The offline tests: no root, no kernel datapath, one binary
//! (`cargo test --test offline`). Parser and validator, the policy core,
//! the conformance suite, hostile files, the DNS proxy against dnsmasq on
//! loopback and its offline tools, the reconcile loop against the
//! in-memory datapath, the operator tools, fleet mode against a real etcd
//! (feature `etcd`). Fixtures: `tests/fixtures/`.

mod harness;

mod offline {
    mod conformance;
    mod core;
    mod daemon;
    mod dns_proxy;
    mod fleet;
    mod fqdn_tools;
    mod hostile;
    mod operator;
    mod parse;
}

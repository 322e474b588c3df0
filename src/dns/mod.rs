//! DNS names in policy: the pieces of netpold's transparent DNS proxy
//! (docs/policy.md, "DNS names").
//!
//! Owns: which names an FQDN selector matches ([`matcher`]); the proxy's
//! handling of one DNS message — parse a query, decide allowed or REFUSED by
//! an endpoint's DNS rules, build the REFUSED reply, read an answer's A/AAAA
//! records with their TTLs, drop and count malformed or hostile answers
//! ([`message`]); the learned set, name → addresses → selectors with TTLs,
//! caps, a keep-alive hook and its file in `state_dir` ([`learned`]); the
//! forwarding loop over UDP and TCP that asks a "learn before release"
//! callback before an allowed answer goes back ([`proxy`]); the DNS verdict
//! events of the monitor stream and their text ([`event`]).
//!
//! Must not: touch the kernel or the policy maps (the datapath redirect belongs
//! to `datapath`, the identities of learned addresses to `policy::fqdn`),
//! resolve names itself, or release an answer whose addresses were not
//! learned.

pub mod event;
pub mod learned;
pub mod matcher;
pub mod message;
pub mod proxy;

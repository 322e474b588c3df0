//! Verdict events as a fake datapath hands them to the daemon: the seed's
//! frontend → db connection attempt (10.0.1.11 → 10.0.1.31, TCP 5432), denied
//! by default. A test overrides the fields it is about with struct update
//! syntax.

use netpol::datapath::{EventReason, EventVerdict, VerdictEvent};
use netpol::policy::types::Direction;

pub fn frontend_to_db(verdict: EventVerdict) -> VerdictEvent {
    VerdictEvent {
        ifindex: 11,
        slot: 0,
        direction: Direction::Egress,
        verdict,
        reason: EventReason::DefaultDeny,
        src: "10.0.1.11".parse().unwrap(),
        dst: "10.0.1.31".parse().unwrap(),
        proto: 6,
        sport: 40000,
        dport: 5432,
        src_identity: 0,
        dst_identity: 0,
        rule: None,
    }
}

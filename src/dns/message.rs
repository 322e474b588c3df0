//! One DNS message through the proxy, with hickory-proto: a workload's query
//! (parsed, then allowed or REFUSED by its endpoint's DNS rules), the REFUSED
//! or SERVFAIL reply built for it, and the upstream answer (checked against the
//! query, its A/AAAA addresses read with their TTLs).
//!
//! Anything malformed or hostile — bytes that do not decode (compression
//! pointers that loop or point forward, truncated records), counts beyond
//! [`MAX_RECORDS`], an answer whose ID or question is not the query's — is a
//! [`DropReason`] with its reason, which the caller counts ([`DropCounts`]); a
//! dropped answer never reaches the workload and teaches nothing.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::matcher;
use crate::api::model::FqdnSelector;

/// Most records (answer + authority + additional) an answer may claim in its
/// header; more is refused before decoding (a 64 KiB message holds at most a
/// few thousand, and no answer the proxy reads needs more than a few dozen).
pub const MAX_RECORDS: usize = 512;

/// Largest DNS message (TCP's two-byte length; UDP's datagram).
pub const MAX_MESSAGE: usize = 65535;

/// Why a message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Did not decode (bad labels, compression loops, truncated records).
    Malformed,
    /// Shorter than a header, or longer than [`MAX_MESSAGE`].
    BadLength,
    /// Header counts beyond one question or [`MAX_RECORDS`] records.
    HugeCount,
    /// A query that is a response, or not a standard QUERY.
    NotAQuery,
    /// An answer that is not a response.
    NotAResponse,
    /// An answer whose ID is not the query's.
    IdMismatch,
    /// An answer whose question is not the query's.
    QuestionMismatch,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Malformed,
        DropReason::BadLength,
        DropReason::HugeCount,
        DropReason::NotAQuery,
        DropReason::NotAResponse,
        DropReason::IdMismatch,
        DropReason::QuestionMismatch,
    ];

    /// The name in counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::BadLength => "bad_length",
            DropReason::HugeCount => "huge_count",
            DropReason::NotAQuery => "not_a_query",
            DropReason::NotAResponse => "not_a_response",
            DropReason::IdMismatch => "id_mismatch",
            DropReason::QuestionMismatch => "question_mismatch",
        }
    }
}

/// Dropped messages, per reason.
#[derive(Debug, Default)]
pub struct DropCounts([AtomicU64; 7]);

impl DropCounts {
    pub fn count(&self, d: DropReason) {
        self.0[d as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self, d: DropReason) -> u64 {
        self.0[d as usize].load(Ordering::Relaxed)
    }
    pub fn total(&self) -> u64 {
        DropReason::ALL.iter().map(|d| self.get(*d)).sum()
    }
}

/// The header's counts, read before decoding: (questions, records).
fn header_counts(bytes: &[u8]) -> Result<(usize, usize), DropReason> {
    if bytes.len() < 12 || bytes.len() > MAX_MESSAGE {
        return Err(DropReason::BadLength);
    }
    let c = |i: usize| usize::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
    Ok((c(4), c(6) + c(8) + c(10)))
}

/// A workload's query: one question, its name in Cilium's normal form.
#[derive(Debug, Clone)]
pub struct Query {
    pub id: u16,
    /// Lower case, trailing dot.
    pub name: String,
    pub qtype: RecordType,
    message: Message,
}

/// Parse a query. A query must be a standard QUERY with exactly one question.
pub fn parse_query(bytes: &[u8]) -> Result<Query, DropReason> {
    let (questions, records) = header_counts(bytes)?;
    // A query carries at most an EDNS OPT record (and a TSIG): a few records.
    if questions != 1 || records > 4 {
        return Err(DropReason::HugeCount);
    }
    let message = Message::from_vec(bytes).map_err(|_| DropReason::Malformed)?;
    if message.message_type() != MessageType::Query || message.op_code() != OpCode::Query {
        return Err(DropReason::NotAQuery);
    }
    let q = message.queries().first().ok_or(DropReason::Malformed)?;
    Ok(Query {
        id: message.id(),
        name: matcher::normalize(&q.name().to_ascii()),
        qtype: q.query_type(),
        message,
    })
}

/// What the proxy does with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it to the address the workload asked.
    Forward,
    /// Answer REFUSED: no DNS rule of the endpoint allows the name.
    Refuse,
}

/// Allowed when one of the endpoint's DNS rule selectors matches the name.
pub fn decide(query: &Query, rules: &[FqdnSelector]) -> Verdict {
    if matcher::any_matches(rules, &query.name) {
        Verdict::Forward
    } else {
        Verdict::Refuse
    }
}

/// A reply to `query` with no records and this code: REFUSED for a name no
/// rule allows, SERVFAIL when the proxy cannot answer (upstream silent, the
/// learned set full).
pub fn reply(query: &Query, code: ResponseCode) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(query.id)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(query.message.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    for q in query.message.queries() {
        m.add_query(q.clone());
    }
    // A message built from a decoded query always encodes.
    m.to_vec().unwrap_or_default()
}

/// The REFUSED reply to `query`.
pub fn refused(query: &Query) -> Vec<u8> {
    reply(query, ResponseCode::Refused)
}

/// One address an answer gives for the query's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Addr {
    pub ip: IpAddr,
    /// Seconds: the smallest TTL along the CNAME chain to it.
    pub ttl: u32,
}

/// An upstream answer to a query, checked against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub id: u16,
    pub rcode: ResponseCode,
    /// The query's name (normal form).
    pub name: String,
    /// A and AAAA records for the name, directly or through CNAMEs within
    /// the answer section, sorted.
    pub addrs: Vec<Addr>,
}

fn same_question(a: &HQuery, name: &str, qtype: RecordType) -> bool {
    a.query_type() == qtype && matcher::normalize(&a.name().to_ascii()) == name
}

/// Parse an upstream answer to `query`. Its header is checked before it is
/// decoded, its ID and question after.
pub fn parse_answer(bytes: &[u8], query: &Query) -> Result<Answer, DropReason> {
    let (questions, records) = header_counts(bytes)?;
    if questions > 1 || records > MAX_RECORDS {
        return Err(DropReason::HugeCount);
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    if id != query.id {
        return Err(DropReason::IdMismatch);
    }
    let m = Message::from_vec(bytes).map_err(|_| DropReason::Malformed)?;
    if m.message_type() != MessageType::Response {
        return Err(DropReason::NotAResponse);
    }
    // A response without its question is allowed by RFC 1035 for errors
    // only; an answer with records must name what it answers.
    match m.queries().first() {
        Some(q) if same_question(q, &query.name, query.qtype) => {}
        None if m.answers().is_empty() => {}
        _ => return Err(DropReason::QuestionMismatch),
    }
    Ok(Answer {
        id,
        rcode: m.response_code(),
        name: query.name.clone(),
        addrs: addresses(&m, &query.name),
    })
}

/// A/AAAA records reachable from `name` through CNAMEs of the answer
/// section, each with the smallest TTL on its way.
fn addresses(m: &Message, name: &str) -> Vec<Addr> {
    // (owner name, ttl so far), followed breadth-first; each name once, so a
    // CNAME loop ends.
    let mut names: Vec<(String, u32)> = vec![(name.to_string(), u32::MAX)];
    let mut i = 0;
    let mut out = Vec::new();
    while i < names.len() && names.len() <= MAX_RECORDS {
        let (owner, ttl) = names[i].clone();
        i += 1;
        for r in m.answers() {
            if matcher::normalize(&r.name().to_ascii()) != owner {
                continue;
            }
            let ttl = ttl.min(r.ttl());
            match r.data() {
                RData::A(a) => out.push(Addr {
                    ip: IpAddr::V4(a.0),
                    ttl,
                }),
                RData::AAAA(a) => out.push(Addr {
                    ip: IpAddr::V6(a.0),
                    ttl,
                }),
                RData::CNAME(c) => {
                    let target = matcher::normalize(&c.0.to_ascii());
                    if !names.iter().any(|(n, _)| *n == target) {
                        names.push((target, ttl));
                    }
                }
                _ => {}
            }
        }
    }
    out.sort();
    out.dedup_by(|a, b| {
        // The same address twice: keep the longer TTL (`b` is kept).
        a.ip == b.ip && {
            b.ttl = b.ttl.max(a.ttl);
            true
        }
    });
    out
}

/// A query for `name` and `qtype` with this ID (tests, benchmarks, tools).
pub fn build_query(id: u16, name: &str, qtype: RecordType) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(HQuery::query(Name::from_ascii(name).ok()?, qtype));
    m.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::Record;

    fn query(name: &str) -> Query {
        parse_query(&build_query(7, name, RecordType::A).unwrap()).unwrap()
    }

    fn answer_to(q: &Query, records: Vec<Record>) -> Message {
        let mut m = Message::new();
        m.set_id(q.id)
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query);
        m.add_query(q.message.queries()[0].clone());
        for r in records {
            m.add_answer(r);
        }
        m
    }

    fn name(n: &str) -> Name {
        Name::from_ascii(n).unwrap()
    }

    fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(ip.into())))
    }

    #[test]
    fn query_is_parsed_and_decided() {
        let q = query("API.Example.COM");
        assert_eq!(q.name, "api.example.com.");
        let rules = [FqdnSelector::Pattern("*.example.com.".into())];
        assert_eq!(decide(&q, &rules), Verdict::Forward);
        assert_eq!(decide(&query("example.com"), &rules), Verdict::Refuse);
        let r = Message::from_vec(&refused(&q)).unwrap();
        assert_eq!(r.id(), 7);
        assert_eq!(r.response_code(), ResponseCode::Refused);
        assert_eq!(r.message_type(), MessageType::Response);
        assert_eq!(r.queries(), q.message.queries());
        assert!(r.answers().is_empty());
    }

    #[test]
    fn answer_addresses_through_cnames_with_the_smallest_ttl() {
        let q = query("www.example.com.");
        let m = answer_to(
            &q,
            vec![
                Record::from_rdata(
                    name("www.example.com."),
                    300,
                    RData::CNAME(CNAME(name("edge.cdn.net."))),
                ),
                a("edge.cdn.net.", 20, [192, 0, 2, 1]),
                Record::from_rdata(
                    name("edge.cdn.net."),
                    600,
                    RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                ),
                // Not on the chain from the query's name: never learned for it.
                a("other.example.", 60, [198, 51, 100, 9]),
            ],
        );
        let got = parse_answer(&m.to_vec().unwrap(), &q).unwrap();
        assert_eq!(got.rcode, ResponseCode::NoError);
        assert_eq!(
            got.addrs,
            vec![
                Addr {
                    ip: "192.0.2.1".parse().unwrap(),
                    ttl: 20
                },
                Addr {
                    ip: "2001:db8::1".parse().unwrap(),
                    ttl: 300
                },
            ]
        );
    }

    #[test]
    fn hostile_answers_are_dropped_with_their_reason() {
        let q = query("www.example.com.");
        let good = answer_to(&q, vec![a("www.example.com.", 5, [192, 0, 2, 1])])
            .to_vec()
            .unwrap();
        assert!(parse_answer(&good, &q).is_ok());
        // Another ID.
        let mut b = good.clone();
        b[1] ^= 1;
        assert_eq!(parse_answer(&b, &q), Err(DropReason::IdMismatch));
        // Huge counts: the header claims 65535 answers.
        let mut b = good.clone();
        b[6] = 0xff;
        b[7] = 0xff;
        assert_eq!(parse_answer(&b, &q), Err(DropReason::HugeCount));
        // More answers claimed than present.
        let mut b = good.clone();
        b[7] = 9;
        assert_eq!(parse_answer(&b, &q), Err(DropReason::Malformed));
        // A compression loop: the answer's owner name points at itself.
        let mut b = good.clone();
        let owner = 12 + q.message.queries()[0].name().len() + 1 + 4;
        b[owner] = 0xc0 | ((owner >> 8) as u8);
        b[owner + 1] = owner as u8;
        assert_eq!(parse_answer(&b, &q), Err(DropReason::Malformed));
        // A query where an answer was expected, an answer to another name.
        assert_eq!(
            parse_answer(
                &build_query(7, "www.example.com.", RecordType::A).unwrap(),
                &q
            ),
            Err(DropReason::NotAResponse)
        );
        let other = query("evil.example.net.");
        let forged = answer_to(&other, vec![a("www.example.com.", 5, [203, 0, 113, 1])]);
        assert_eq!(
            parse_answer(&forged.to_vec().unwrap(), &q),
            Err(DropReason::QuestionMismatch)
        );
        assert_eq!(parse_answer(&good[..11], &q), Err(DropReason::BadLength));
        // Queries: a response, two questions.
        assert_eq!(parse_query(&good).err(), Some(DropReason::NotAQuery));
        let mut two = build_query(1, "a.example.", RecordType::A).unwrap();
        two[5] = 2;
        assert_eq!(parse_query(&two).err(), Some(DropReason::HugeCount));
        let counts = DropCounts::default();
        counts.count(DropReason::IdMismatch);
        counts.count(DropReason::IdMismatch);
        assert_eq!((counts.get(DropReason::IdMismatch), counts.total()), (2, 2));
    }
}

//! Frames for a real wire, with correct checksums so the receiving stack
//! accepts (and answers) them: Ethernet with any stack of VLAN tags, IPv4
//! with options and fragments, IPv6 with an explicit extension-header chain
//! (each header's next-header field can be forged), TCP, UDP and ICMP.
//! Unlike src/datapath/packet.rs (BPF_PROG_TEST_RUN only), every field an
//! attacker controls is exposed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

/// An Ethernet frame: tags outermost first (TPID, VLAN id), padded to 60 bytes.
pub fn ether(
    dst: [u8; 6],
    src: [u8; 6],
    vlans: &[(u16, u16)],
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 22);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for (tpid, vid) in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    while f.len() < 60 {
        f.push(0);
    }
    f
}

/// Ethertype of an IP packet (by its version nibble).
pub fn ethertype_of(ip: &[u8]) -> u16 {
    if ip[0] >> 4 == 6 {
        ETH_IPV6
    } else {
        ETH_IPV4
    }
}

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < data.len() {
        sum += u32::from(u16::from_be_bytes([data[i], data[i + 1]]));
        i += 2;
    }
    if i < data.len() {
        sum += u32::from(data[i]) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = Vec::new();
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
            csum_add(0, &p)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = Vec::new();
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
            csum_add(0, &p)
        }
        _ => panic!("mixed address families"),
    }
}

/// A TCP segment (20-byte header) with its checksum.
#[allow(clippy::too_many_arguments)] // one argument per header field: call sites read as a header
pub fn tcp(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = vec![0u8; 20];
    b[0..2].copy_from_slice(&sport.to_be_bytes());
    b[2..4].copy_from_slice(&dport.to_be_bytes());
    b[4..8].copy_from_slice(&seq.to_be_bytes());
    b[8..12].copy_from_slice(&ack.to_be_bytes());
    b[12] = 5 << 4;
    b[13] = flags;
    b[14..16].copy_from_slice(&64240u16.to_be_bytes());
    b.extend_from_slice(payload);
    let c = csum_fold(csum_add(pseudo(src, dst, 6, b.len()), &b));
    b[16..18].copy_from_slice(&c.to_be_bytes());
    b
}

/// A UDP datagram with its checksum.
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 8];
    b[0..2].copy_from_slice(&sport.to_be_bytes());
    b[2..4].copy_from_slice(&dport.to_be_bytes());
    b[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    b.extend_from_slice(payload);
    let mut c = csum_fold(csum_add(pseudo(src, dst, 17, b.len()), &b));
    if c == 0 {
        c = 0xffff;
    }
    b[6..8].copy_from_slice(&c.to_be_bytes());
    b
}

/// An ICMP (v4) or ICMPv6 message: type, code, the 4 "rest of header" bytes,
/// body; checksummed (ICMPv6 over the pseudo header).
pub fn icmp(src: IpAddr, dst: IpAddr, ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut b = vec![ty, code, 0, 0];
    b.extend_from_slice(&rest);
    b.extend_from_slice(body);
    let sum = if src.is_ipv6() {
        pseudo(src, dst, 58, b.len())
    } else {
        0
    };
    let c = csum_fold(csum_add(sum, &b));
    b[2..4].copy_from_slice(&c.to_be_bytes());
    b
}

/// An IPv4 packet: identification, (fragment offset in 8-byte units,
/// more-fragments), raw option bytes (padded with NOPs to a multiple of 4),
/// payload. Header checksum set.
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    frag: (u16, bool),
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut opts = options.to_vec();
    while opts.len() % 4 != 0 {
        opts.push(1);
    }
    assert!(opts.len() <= 40, "at most 40 bytes of IPv4 options");
    let ihl = 20 + opts.len();
    let mut h = vec![0u8; 20];
    h[0] = 0x40 | (ihl / 4) as u8;
    h[2..4].copy_from_slice(&((ihl + payload.len()) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    let fo = (frag.0 & 0x1fff) | if frag.1 { 0x2000 } else { 0 };
    h[6..8].copy_from_slice(&fo.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h.extend_from_slice(&opts);
    let c = csum_fold(csum_add(0, &h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// One IPv6 extension header.
#[derive(Debug, Clone)]
pub enum Ext {
    /// Hop-by-hop options, `len8` 8-byte units (PadN inside).
    HopByHop(usize),
    /// Destination options, `len8` 8-byte units (PadN inside).
    DestOpts(usize),
    /// Routing header type 0 with segments-left 0 (processed as a no-op).
    Routing,
    /// Fragment header: offset in 8-byte units, more-fragments, id; `nh`
    /// forges the next-header field (default: the real next header).
    Fragment {
        offset: u16,
        more: bool,
        id: u32,
        nh: Option<u8>,
    },
    /// Authentication header (16 bytes).
    Ah,
}

impl Ext {
    pub fn proto(&self) -> u8 {
        match self {
            Ext::HopByHop(_) => 0,
            Ext::DestOpts(_) => 60,
            Ext::Routing => 43,
            Ext::Fragment { .. } => 44,
            Ext::Ah => 51,
        }
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop(len8) | Ext::DestOpts(len8) => {
                let len = 8 * (*len8).max(1);
                let mut b = vec![next, (len / 8 - 1) as u8];
                // One option filling the rest: Linux refuses more than 7
                // bytes of padding, so a longer header carries an unknown
                // option of type 0x1e (RFC 4727 experiment, "skip if
                // unknown").
                if len == 8 {
                    b.extend_from_slice(&[1, 4]); // PadN
                } else {
                    b.extend_from_slice(&[0x1e, (len - 4) as u8]);
                }
                b.resize(len, 0);
                b
            }
            Ext::Routing => {
                let mut b = vec![next, 2, 0, 0]; // hdrlen 2: one address; type 0; segments left 0
                b.resize(24, 0);
                b
            }
            Ext::Fragment {
                offset,
                more,
                id,
                nh,
            } => {
                let mut b = vec![nh.unwrap_or(next), 0];
                b.extend_from_slice(&((offset << 3) | u16::from(*more)).to_be_bytes());
                b.extend_from_slice(&id.to_be_bytes());
                b
            }
            Ext::Ah => {
                let mut b = vec![next, 2];
                b.resize(16, 0);
                b
            }
        }
    }
}

/// The bytes of an extension-header chain ending in `proto`, and the
/// protocol number of its first header.
pub fn ext_chain(exts: &[Ext], proto: u8) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map(Ext::proto).unwrap_or(proto);
        out.extend_from_slice(&e.bytes(next));
    }
    (exts.first().map(Ext::proto).unwrap_or(proto), out)
}

/// An IPv6 packet whose payload is `chain` (already-built extension
/// headers and upper-layer bytes) with `first` as the header's next header.
pub fn ipv6_raw(src: Ipv6Addr, dst: Ipv6Addr, first: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    h[6] = first;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 packet: extension headers, then `proto` with `l4`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, exts: &[Ext], proto: u8, l4: &[u8]) -> Vec<u8> {
    let (first, mut p) = ext_chain(exts, proto);
    p.extend_from_slice(l4);
    ipv6_raw(src, dst, first, &p)
}

/// An IP packet (either family) with no options or extension headers.
pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, proto, 0x1234, (0, false), &[], l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, &[], proto, l4),
        _ => panic!("mixed address families"),
    }
}

pub fn v4(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        _ => panic!("{a} is not IPv4"),
    }
}

pub fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        _ => panic!("{a} is not IPv6"),
    }
}

/// The TCP header of a received frame (untagged: the kernel hands AF_PACKET
/// sockets frames with their tag removed), if it is IPv4/IPv6 + TCP without
/// extension headers: (src, dst, sport, dport, flags, ack).
pub fn parse_tcp(frame: &[u8]) -> Option<(IpAddr, IpAddr, u16, u16, u8, u32)> {
    if frame.len() < 14 {
        return None;
    }
    let et = u16::from_be_bytes([frame[12], frame[13]]);
    let ip = &frame[14..];
    let (src, dst, l4): (IpAddr, IpAddr, &[u8]) = match et {
        ETH_IPV4 if ip.len() >= 20 && ip[9] == 6 => {
            let ihl = usize::from(ip[0] & 0xf) * 4;
            let s: [u8; 4] = ip[12..16].try_into().ok()?;
            let d: [u8; 4] = ip[16..20].try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), ip.get(ihl..)?)
        }
        ETH_IPV6 if ip.len() >= 40 && ip[6] == 6 => {
            let s: [u8; 16] = ip[8..24].try_into().ok()?;
            let d: [u8; 16] = ip[24..40].try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), &ip[40..])
        }
        _ => return None,
    };
    if l4.len() < 20 {
        return None;
    }
    Some((
        src,
        dst,
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
        l4[13],
        u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
    ))
}

/// One fragment (offset in 8-byte units, more to come) of datagram `id` from
/// `src` to `dst`: IPv4, or IPv6 with a Fragment header (its id widened).
pub fn fragment(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    id: u16,
    (offset, more): (u16, bool),
    bytes: &[u8],
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(
            s,
            d,
            &[Ext::Fragment {
                offset,
                more,
                id: u32::from(id),
                nh: None,
            }],
            proto,
            bytes,
        ),
        _ => ipv4(v4(src), v4(dst), proto, id, (offset, more), &[], bytes),
    }
}

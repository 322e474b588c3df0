//! A small builder of Ethernet frames for BPF_PROG_TEST_RUN: IPv4/IPv6,
//! TCP/UDP/SCTP/ICMP/ICMPv6, VLAN tags, IPv4 fragments, IPv6 extension
//! headers and ICMP errors carrying an inner packet. Checksums are left zero
//! (the datapath never checks them). Used by the datapath tests, the
//! differential test and the lookup benchmark; never on a real wire.

use std::net::IpAddr;

/// A packet to build.
#[derive(Debug, Clone)]
pub struct PacketSpec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// 802.1Q/802.1ad tags, outermost first (TPID, VLAN id).
    pub vlans: Vec<(u16, u16)>,
    /// IPv4: (fragment offset in 8-byte units, more-fragments); IPv6: a
    /// fragment header with the same meaning.
    pub fragment: Option<(u16, bool)>,
    /// Fragment identification.
    pub frag_id: u32,
    /// IPv6 extension headers before the L4 header (next-header values:
    /// 0 hop-by-hop, 43 routing, 60 destination options, 51 AH).
    pub ext_headers: Vec<u8>,
    /// IPv4 options length in bytes (multiple of 4, at most 40).
    pub ipv4_options: usize,
}

/// The transport part.
#[derive(Debug, Clone)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// ICMP (v4 or v6 after the family of the addresses): type, code, echo id.
    Icmp {
        ty: u8,
        code: u8,
        id: u16,
    },
    /// An ICMP error (type, code) quoting `inner`.
    IcmpError {
        ty: u8,
        code: u8,
        inner: Box<PacketSpec>,
    },
    /// Another protocol with a few payload bytes.
    Raw {
        proto: u8,
    },
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl PacketSpec {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            src,
            dst,
            l4,
            vlans: Vec::new(),
            fragment: None,
            frag_id: 0x4242,
            ext_headers: Vec::new(),
            ipv4_options: 0,
        }
    }

    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
            },
        )
    }

    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport })
    }

    pub fn icmp(src: IpAddr, dst: IpAddr, ty: u8, code: u8, id: u16) -> Self {
        Self::new(src, dst, L4::Icmp { ty, code, id })
    }

    /// The whole Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        for (tpid, vid) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
        }
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&self.ip_packet());
        // Pad to the Ethernet minimum so the kernel accepts the frame.
        while f.len() < 60 {
            f.push(0);
        }
        f
    }

    fn l4_bytes(&self) -> (u8, Vec<u8>) {
        let v6 = self.src.is_ipv6();
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut b = vec![0u8; 20];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[12] = 5 << 4;
                b[13] = *flags;
                b[14..16].copy_from_slice(&64240u16.to_be_bytes());
                (6, b)
            }
            L4::Udp { sport, dport } => {
                let mut b = vec![0u8; 16];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b[4..6].copy_from_slice(&16u16.to_be_bytes());
                (17, b)
            }
            L4::Sctp { sport, dport } => {
                let mut b = vec![0u8; 16];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                (132, b)
            }
            L4::Icmp { ty, code, id } => {
                let mut b = vec![0u8; 16];
                b[0] = *ty;
                b[1] = *code;
                b[4..6].copy_from_slice(&id.to_be_bytes());
                b[6..8].copy_from_slice(&1u16.to_be_bytes());
                (if v6 { 58 } else { 1 }, b)
            }
            L4::IcmpError { ty, code, inner } => {
                let mut b = vec![*ty, *code, 0, 0, 0, 0, 0, 0];
                b.extend_from_slice(&inner.ip_packet());
                (if v6 { 58 } else { 1 }, b)
            }
            L4::Raw { proto } => (*proto, vec![0u8; 8]),
        }
    }

    /// The IP packet (no Ethernet header).
    pub fn ip_packet(&self) -> Vec<u8> {
        let (proto, l4) = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let opts = self.ipv4_options.min(40) / 4 * 4;
                let ihl = 20 + opts;
                let mut h = vec![0u8; ihl];
                h[0] = 0x40 | (ihl / 4) as u8;
                let total = (ihl + l4.len()) as u16;
                h[2..4].copy_from_slice(&total.to_be_bytes());
                h[4..6].copy_from_slice(&(self.frag_id as u16).to_be_bytes());
                if let Some((off, mf)) = self.fragment {
                    let v = (off & 0x1fff) | if mf { 0x2000 } else { 0 };
                    h[6..8].copy_from_slice(&v.to_be_bytes());
                }
                h[8] = 64;
                h[9] = proto;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                for b in h.iter_mut().skip(20) {
                    *b = 1; // NOP options
                }
                // A non-first fragment carries payload, not the L4 header;
                // keep the bytes anyway: the datapath must not read them as ports.
                h.extend_from_slice(&l4);
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut chain: Vec<u8> = self.ext_headers.clone();
                // The fragment header comes last unless the chain places it.
                if self.fragment.is_some() && !chain.contains(&44) {
                    chain.push(44);
                }
                let first = chain.first().copied().unwrap_or(proto);
                let mut ext = Vec::new();
                for (i, nh) in chain.iter().enumerate() {
                    let next = chain.get(i + 1).copied().unwrap_or(proto);
                    match nh {
                        44 => {
                            let (off, mf) = self.fragment.unwrap_or((0, false));
                            let v = (off << 3) | u16::from(mf);
                            ext.push(next);
                            ext.push(0);
                            ext.extend_from_slice(&v.to_be_bytes());
                            ext.extend_from_slice(&self.frag_id.to_be_bytes());
                        }
                        51 => {
                            // AH: length in 4-byte units minus 2 → 16 bytes here.
                            ext.push(next);
                            ext.push(2);
                            ext.extend_from_slice(&[0u8; 14]);
                        }
                        _ => {
                            // 16 bytes: length in 8-byte units minus 1.
                            ext.push(next);
                            ext.push(1);
                            ext.extend_from_slice(&[1, 12]);
                            ext.extend_from_slice(&[0u8; 12]);
                        }
                    }
                }
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                let plen = (ext.len() + l4.len()) as u16;
                h[4..6].copy_from_slice(&plen.to_be_bytes());
                h[6] = first;
                h[7] = 64;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                h.extend_from_slice(&ext);
                h.extend_from_slice(&l4);
                h
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_v4_frame_layout() {
        let p = PacketSpec::tcp(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            1234,
            80,
            TCP_SYN,
        );
        let f = p.build();
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[14], 0x45);
        assert_eq!(f[23], 6);
        assert_eq!(&f[34..38], &[0x04, 0xd2, 0, 80]);
        assert_eq!(f[47], TCP_SYN);
    }

    #[test]
    fn v6_extension_chain_links_next_headers() {
        let mut p = PacketSpec::udp(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            5,
            53,
        );
        p.ext_headers = vec![0, 60];
        p.fragment = Some((0, true));
        let ip = p.ip_packet();
        assert_eq!(ip[6], 0); // hop-by-hop first
        assert_eq!(ip[40], 60); // then destination options
        assert_eq!(ip[56], 44); // then fragment
        assert_eq!(ip[72], 17); // then UDP
        assert_eq!(&ip[80..84], &[0, 5, 0, 53]);
    }
}

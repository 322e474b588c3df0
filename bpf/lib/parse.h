/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * parse.h — packet parsing into struct np_pkt: Ethernet, up to two VLAN tags
 * (802.1Q / 802.1ad, parsed through so a tag never bypasses policy; a third
 * tag is malformed), ARP, IPv4 (options), IPv6 with a bounded walk over
 * extension headers (hop-by-hop, routing, destination options, fragment, AH),
 * TCP/UDP/SCTP ports, ICMP/ICMPv6 type, code, echo id, and the inner tuple of
 * ICMP errors. The common case (untagged, IPv4 without options or IPv6
 * without extension headers, unfragmented TCP/UDP) is read with direct packet
 * access; everything else with bpf_skb_load_bytes. Nothing is read past the
 * end of the IP datagram (see np_l3_end).
 */
#ifndef NETPOL_PARSE_H
#define NETPOL_PARSE_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "netpol_abi.h"

enum np_eth_proto {
	NP_ETH_P_IP = 0x0800,
	NP_ETH_P_ARP = 0x0806,
	NP_ETH_P_IPV6 = 0x86DD,
	NP_ETH_P_8021Q = 0x8100,
	NP_ETH_P_8021AD = 0x88A8,
};

/* The version field of an IP header. */
enum np_ip_version {
	NP_IP_VERSION_4 = 4,
	NP_IP_VERSION_6 = 6,
};

enum np_ipproto {
	NP_IPPROTO_HOPOPTS = 0,
	NP_IPPROTO_ICMP = 1,
	NP_IPPROTO_TCP = 6,
	NP_IPPROTO_UDP = 17,
	NP_IPPROTO_ROUTING = 43,
	NP_IPPROTO_FRAGMENT = 44,
	NP_IPPROTO_AH = 51,
	NP_IPPROTO_ICMPV6 = 58,
	NP_IPPROTO_DSTOPTS = 60,
	NP_IPPROTO_SCTP = 132,
};

enum np_tcp_flags {
	NP_TCP_FIN = 0x01,
	NP_TCP_SYN = 0x02,
	NP_TCP_RST = 0x04,
	NP_TCP_ACK = 0x10,
};

enum np_parse_limits {
	NP_MAX_VLAN = 2,
	NP_MAX_EXTHDR = 8,
};

/* Outcome of parsing. */
enum np_parse_result {
	NP_PARSE_OK = 0,
	NP_PARSE_PASS = 1, /* not IP (ARP, others): not subject to policy */
	NP_PARSE_MALFORMED = 2,
};

struct np_pkt {
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 in_saddr[16];   /* ICMP error: inner packet */
	__u8 in_daddr[16];
	__u32 frag_id;
	__u16 sport;         /* host order; ICMP echo: identifier */
	__u16 dport;
	__u16 in_sport;
	__u16 in_dport;
	__u16 policy_port;   /* dport, or the ICMP type */
	__u8 family; /* NP_FAMILY_* */
	__u8 proto;
	__u8 in_proto;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 tcp_flags;
	__u8 is_icmp_error;  /* inner tuple valid */
	__u8 frag_first;     /* first fragment of a fragmented datagram */
	__u8 frag_later;     /* non-first fragment: no L4 header */
	__u8 frag_proto;     /* fragments: the protocol every fragment carries */
	__u8 has_l4;
};

static __always_inline int np_is_icmp4_error(__u8 type)
{
	return type == 3 || type == 11 || type == 12;
}

static __always_inline int np_is_icmp6_error(__u8 type)
{
	return type >= 1 && type <= 4;
}

static __always_inline int np_is_echo(__u8 family, __u8 type)
{
	if (family == NP_FAMILY_V4)
		return type == 8 || type == 0;
	return type == 128 || type == 129;
}

/*
 * End of the IP datagram: `off` + the length its header declares. A frame may
 * carry bytes after the datagram (Ethernet padding, or a trailer an attacker
 * appends to a raw frame) that the receiving stack trims before it looks at
 * L4. Reading ports there let a first fragment without an L4 header be
 * judged by forged "ports" in the trailer (say 80), and its later fragments,
 * which carry the real TCP header (say port 22), inherit those ports
 * (tests/privileged/bypass.rs tiny_first_fragments_do_not_bypass_policy). So every L4
 * read is bounded by the datagram's end. A declared length of 0 (IPv4 BIG TCP
 * GSO packets, IPv6 jumbograms) means "up to the end of the frame".
 */
static __always_inline __u32 np_l3_end(struct __sk_buff *skb, __u32 off, __u32 len)
{
	if (len == 0)
		return skb->len;
	return off + len;
}

/* Ports of an L4 header at `off` (TCP, UDP, SCTP share the first 4 bytes). */
static __always_inline int np_load_ports(struct __sk_buff *skb, __u32 off, __u16 *sport, __u16 *dport)
{
	__be16 p[2];
	if (bpf_skb_load_bytes(skb, off, p, sizeof(p)) < 0)
		return -1;
	*sport = bpf_ntohs(p[0]);
	*dport = bpf_ntohs(p[1]);
	return 0;
}

/* Inner tuple of an ICMP error whose inner IP header starts at `off`. */
static __noinline void np_parse_inner(struct __sk_buff *skb, struct np_pkt *p, __u32 off,
					   __u32 end)
{
	__u32 l4;
	__u8 b[40];

	if (p->family == NP_FAMILY_V4) {
		if (off + 20 > end || bpf_skb_load_bytes(skb, off, b, 20) < 0)
			return;
		if ((b[0] >> 4) != NP_IP_VERSION_4)
			return;
		l4 = off + ((__u32)(b[0] & 0xf) << 2);
		p->in_proto = b[9];
		__builtin_memcpy(p->in_saddr, &b[12], 4);
		__builtin_memcpy(p->in_daddr, &b[16], 4);
	} else {
		if (off + 40 > end || bpf_skb_load_bytes(skb, off, b, 40) < 0)
			return;
		if ((b[0] >> 4) != NP_IP_VERSION_6)
			return;
		l4 = off + 40;
		p->in_proto = b[6];
		__builtin_memcpy(p->in_saddr, &b[8], 16);
		__builtin_memcpy(p->in_daddr, &b[24], 16);
	}
	if (p->in_proto == NP_IPPROTO_TCP || p->in_proto == NP_IPPROTO_UDP ||
	    p->in_proto == NP_IPPROTO_SCTP) {
		if (l4 + 4 > end || np_load_ports(skb, l4, &p->in_sport, &p->in_dport) < 0)
			return;
	} else if (p->in_proto == NP_IPPROTO_ICMP || p->in_proto == NP_IPPROTO_ICMPV6) {
		__u8 ih[8];
		if (l4 + sizeof(ih) > end || bpf_skb_load_bytes(skb, l4, ih, sizeof(ih)) < 0)
			return;
		if (!np_is_echo(p->family, ih[0]))
			return;
		p->in_sport = ((__u16)ih[4] << 8) | ih[5];
		p->in_dport = p->in_sport;
	} else {
		return;
	}
	p->is_icmp_error = 1;
}

/* The L4 header at `off`: ports, TCP flags, ICMP type/code/echo id. */
static __always_inline enum np_parse_result np_parse_l4(struct __sk_buff *skb, struct np_pkt *p,
							 __u32 off, __u32 end)
{
	if (p->frag_later)
		return NP_PARSE_OK;
	switch (p->proto) {
	case NP_IPPROTO_TCP: {
		__u8 fl = 0;
		if (off + 4 > end || np_load_ports(skb, off, &p->sport, &p->dport) < 0)
			return NP_PARSE_MALFORMED;
		/* A tiny first fragment may hold the ports but not the flags. */
		if (off + 14 <= end && bpf_skb_load_bytes(skb, off + 13, &fl, 1) < 0)
			return NP_PARSE_MALFORMED;
		p->tcp_flags = fl;
		p->policy_port = p->dport;
		p->has_l4 = 1;
		break;
	}
	case NP_IPPROTO_UDP:
	case NP_IPPROTO_SCTP:
		if (off + 4 > end || np_load_ports(skb, off, &p->sport, &p->dport) < 0)
			return NP_PARSE_MALFORMED;
		p->policy_port = p->dport;
		p->has_l4 = 1;
		break;
	case NP_IPPROTO_ICMP:
	case NP_IPPROTO_ICMPV6: {
		__u8 h[8];
		if ((p->proto == NP_IPPROTO_ICMP) != (p->family == NP_FAMILY_V4))
			return NP_PARSE_MALFORMED;
		if (off + sizeof(h) > end || bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
			return NP_PARSE_MALFORMED;
		p->icmp_type = h[0];
		p->icmp_code = h[1];
		p->policy_port = h[0];
		p->has_l4 = 1;
		if (np_is_echo(p->family, h[0])) {
			p->sport = ((__u16)h[4] << 8) | h[5];
			p->dport = p->sport;
		} else if (p->family == NP_FAMILY_V4 ? np_is_icmp4_error(h[0])
						     : np_is_icmp6_error(h[0])) {
			np_parse_inner(skb, p, off + 8, end);
		}
		break;
	}
	default:
		/* Other protocols: no ports; only protocol or any-protocol entries match. */
		break;
	}
	return NP_PARSE_OK;
}

/* The general parsers are out of line: the common case never runs them. */
static __noinline enum np_parse_result np_parse_ipv4(struct __sk_buff *skb, struct np_pkt *p,
							   __u32 off)
{
	__u8 h[20];
	__u16 frag;
	__u32 ihl, tot, end;

	if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
		return NP_PARSE_MALFORMED;
	if ((h[0] >> 4) != NP_IP_VERSION_4)
		return NP_PARSE_MALFORMED;
	ihl = (__u32)(h[0] & 0xf) << 2;
	if (ihl < 20)
		return NP_PARSE_MALFORMED;
	tot = ((__u32)h[2] << 8) | h[3];
	if (tot != 0 && tot < ihl)
		return NP_PARSE_MALFORMED;
	end = np_l3_end(skb, off, tot);
	p->family = NP_FAMILY_V4;
	p->proto = h[9];
	__builtin_memcpy(p->saddr, &h[12], 4);
	__builtin_memcpy(p->daddr, &h[16], 4);
	p->frag_id = ((__u32)h[4] << 8) | h[5];
	p->frag_proto = h[9];
	frag = ((__u16)h[6] << 8) | h[7];
	if (frag & 0x1fff)
		p->frag_later = 1;
	else if (frag & 0x2000)
		p->frag_first = 1;
	return np_parse_l4(skb, p, off + ihl, end);
}

static __noinline enum np_parse_result np_parse_ipv6(struct __sk_buff *skb, struct np_pkt *p,
							   __u32 off)
{
	__u8 h[40];
	__u8 nh;
	__u32 end;
	int i;

	if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
		return NP_PARSE_MALFORMED;
	if ((h[0] >> 4) != NP_IP_VERSION_6)
		return NP_PARSE_MALFORMED;
	p->family = NP_FAMILY_V6;
	__builtin_memcpy(p->saddr, &h[8], 16);
	__builtin_memcpy(p->daddr, &h[24], 16);
	nh = h[6];
	end = np_l3_end(skb, off + 40, ((__u32)h[4] << 8) | h[5]);
	off += 40;

	for (i = 0; i < NP_MAX_EXTHDR; i++) {
		__u8 e[8];

		if (nh != NP_IPPROTO_HOPOPTS && nh != NP_IPPROTO_ROUTING &&
		    nh != NP_IPPROTO_DSTOPTS && nh != NP_IPPROTO_FRAGMENT &&
		    nh != NP_IPPROTO_AH)
			break;
		if (off + sizeof(e) > end || bpf_skb_load_bytes(skb, off, e, sizeof(e)) < 0)
			return NP_PARSE_MALFORMED;
		if (nh == NP_IPPROTO_FRAGMENT) {
			__u16 fo = ((__u16)e[2] << 8) | e[3];
			p->frag_id = ((__u32)e[4] << 24) | ((__u32)e[5] << 16) |
				     ((__u32)e[6] << 8) | e[7];
			nh = e[0];
			p->frag_proto = nh;
			off += 8;
			if (fo & 0xfff8) {
				p->frag_later = 1;
				break; /* what follows is payload, not a header */
			}
			if (fo & 1)
				p->frag_first = 1;
		} else if (nh == NP_IPPROTO_AH) {
			nh = e[0];
			off += ((__u32)e[1] + 2) << 2;
		} else {
			nh = e[0];
			off += ((__u32)e[1] + 1) << 3;
		}
	}
	if (!p->frag_later &&
	    (nh == NP_IPPROTO_HOPOPTS || nh == NP_IPPROTO_ROUTING || nh == NP_IPPROTO_DSTOPTS ||
	     nh == NP_IPPROTO_FRAGMENT || nh == NP_IPPROTO_AH))
		return NP_PARSE_MALFORMED; /* more extension headers than we walk */
	p->proto = nh;
	return np_parse_l4(skb, p, off, end);
}

/*
 * The common case read with direct packet access: an untagged Ethernet frame
 * carrying an unfragmented IPv4 packet without options, or an IPv6 packet
 * without extension headers, with a whole TCP or UDP header inside both the
 * datagram and the linear data. Returns 1 with `p` filled exactly as the
 * general parser below fills it; 0 for anything else (VLAN tags, options,
 * extension headers, fragments, ICMP, other protocols, short or non-linear
 * data), which the general parser then reads with bpf_skb_load_bytes.
 */
static __always_inline int np_parse_direct(struct __sk_buff *skb, struct np_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *eth = data;
	__u8 *l4;
	__u8 proto;
	__u32 l4len;

	if (data + 14 + 20 > data_end)
		return 0;
	if (eth[12] == 0x08 && eth[13] == 0x00) {
		__u8 *h = eth + 14;

		if (h[0] != 0x45 || (h[6] & 0x3f) || h[7])
			return 0; /* options, or a fragment (MF or an offset) */
		l4len = (((__u32)h[2] << 8) | h[3]);
		if (l4len < 20)
			return 0;
		l4len -= 20;
		proto = h[9];
		p->family = NP_FAMILY_V4;
		__builtin_memcpy(p->saddr, &h[12], 4);
		__builtin_memcpy(p->daddr, &h[16], 4);
		p->frag_id = ((__u32)h[4] << 8) | h[5];
		p->frag_proto = proto;
		l4 = h + 20;
	} else if (eth[12] == 0x86 && eth[13] == 0xDD) {
		__u8 *h = eth + 14;

		if ((void *)(h + 40) > data_end || (h[0] >> 4) != NP_IP_VERSION_6)
			return 0;
		l4len = ((__u32)h[4] << 8) | h[5];
		proto = h[6];
		p->family = NP_FAMILY_V6;
		__builtin_memcpy(p->saddr, &h[8], 16);
		__builtin_memcpy(p->daddr, &h[24], 16);
		l4 = h + 40;
	} else {
		return 0;
	}
	if (proto == NP_IPPROTO_TCP) {
		if (l4len < 20 || (void *)(l4 + 20) > data_end)
			return 0;
		p->tcp_flags = l4[13];
	} else if (proto == NP_IPPROTO_UDP) {
		if (l4len < 8 || (void *)(l4 + 8) > data_end)
			return 0;
	} else {
		return 0;
	}
	p->proto = proto;
	p->sport = ((__u16)l4[0] << 8) | l4[1];
	p->dport = ((__u16)l4[2] << 8) | l4[3];
	p->policy_port = p->dport;
	p->has_l4 = 1;
	return 1;
}

static __always_inline enum np_parse_result np_parse(struct __sk_buff *skb, struct np_pkt *p)
{
	__u32 off = 12;
	__be16 etype;
	int i;

	if (np_parse_direct(skb, p))
		return NP_PARSE_OK;
	if (bpf_skb_load_bytes(skb, off, &etype, sizeof(etype)) < 0)
		return NP_PARSE_MALFORMED;
	off += 2;
	for (i = 0; i < NP_MAX_VLAN; i++) {
		if (etype != bpf_htons(NP_ETH_P_8021Q) && etype != bpf_htons(NP_ETH_P_8021AD))
			break;
		if (bpf_skb_load_bytes(skb, off + 2, &etype, sizeof(etype)) < 0)
			return NP_PARSE_MALFORMED;
		off += 4;
	}
	if (etype == bpf_htons(NP_ETH_P_8021Q) || etype == bpf_htons(NP_ETH_P_8021AD))
		return NP_PARSE_MALFORMED; /* a third tag: never let it bypass policy */
	if (etype == bpf_htons(NP_ETH_P_IP))
		return np_parse_ipv4(skb, p, off);
	if (etype == bpf_htons(NP_ETH_P_IPV6))
		return np_parse_ipv6(skb, p, off);
	/* ARP and other non-IP frames are not subject to IP policy. */
	return NP_PARSE_PASS;
}

#endif

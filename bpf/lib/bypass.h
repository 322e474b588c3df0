/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * bypass.h — one program's work when both ends are local. A packet from one
 * local endpoint to another crosses two enforced hooks: the ingress hook of
 * the sender's device (its program judges the packet, every packet) and the
 * egress hook of the receiver's device. Once the egress program has passed a
 * packet of a flow in full (conntrack: established under this generation, or
 * a reply; not audited, not closing), it records the flow in its per-CPU
 * cache netpol_bypass_v1 (netpol_abi.h, struct np_bypass_entry); the next
 * packets of that flow are recognised by one array lookup and a compare, before
 * the endpoint table, conntrack or any policy lookup.
 *
 * What the test trusts is nothing anyone but the kernel and this program
 * write: the packet's own tuple (after any DNAT or reroute: as this hook sees
 * it), the device it leaves by, and skb->ingress_ifindex, which the kernel
 * sets when a device receives the packet. No skb->mark or tc_index bit is
 * read, so a workload (SO_MARK, its own iptables or tc) or another user of
 * the host's marks grants nothing, and a packet whose tuple or devices differ
 * from the entry (DNAT, a changed route) is judged in full. The entry holds
 * only while its generation is the active one and for at most a second (a
 * quarter of a shorter timeout), after which the next packet is judged in
 * full, refreshing the conntrack entry the cache stands for. TCP packets with
 * SYN, FIN or RST are always judged in full (they move conntrack state).
 */
#ifndef NETPOL_BYPASS_H
#define NETPOL_BYPASS_H

#include "netpol_abi.h"
#include "netpol_maps.h"
#include "config.h"
#include "parse.h"
#include "conntrack.h"
#include "events.h"

/* Direct-mapped: any mix of the tuple does; a collision costs a full pass. */
static __always_inline __u32 np_bypass_index(const struct np_pkt *p)
{
	const __u32 *s = (const __u32 *)p->saddr, *d = (const __u32 *)p->daddr;
	__u32 h = s[0] ^ s[1] ^ s[2] ^ s[3];

	h = h * 0x9e3779b1u ^ (d[0] ^ d[1] ^ d[2] ^ d[3]);
	h = h * 0x85ebca6bu ^ (((__u32)p->sport << 16) | p->dport);
	h = h * 0xc2b2ae35u ^ p->proto;
	h ^= h >> 15;
	h *= 0x2c1b3c6du;
	h ^= h >> 12;
	return h & (NP_BYPASS_SLOTS - 1);
}

/* Whether this program looks at the cache: the egress hook of the whole
 * pipeline, when the setting is on (constants: pruned otherwise). */
static __always_inline int np_bypass_on(__u8 hook)
{
	return cfg_local_bypass && cfg_stage == NP_STAGE_FULL && hook == NP_HOOK_EGRESS;
}

/* A packet that may be recorded or recognised: received on another device
 * of this host, and no TCP flag that moves conntrack state. */
static __always_inline int np_bypass_candidate(struct __sk_buff *skb, const struct np_pkt *p)
{
	__u32 in = skb->ingress_ifindex;

	if (in == 0 || in == skb->ifindex)
		return 0;
	return p->proto != NP_IPPROTO_TCP ||
	       !(p->tcp_flags & (NP_TCP_SYN | NP_TCP_FIN | NP_TCP_RST));
}

static __always_inline int np_bypass_same(const struct np_bypass_entry *e, const struct np_pkt *p,
					  __u32 in, __u32 out)
{
	return np_addr_eq(e->saddr, p->saddr) && np_addr_eq(e->daddr, p->daddr) &&
	       e->sport == p->sport && e->dport == p->dport && e->proto == p->proto &&
	       e->family == p->family && e->in_ifindex == in && e->out_ifindex == out;
}

/* 1: the packet (parsed by np_parse_direct) passes on its flow's entry; it
 * is counted as allowed for the endpoint that recorded it. */
static __always_inline int np_bypass_hit(struct __sk_buff *skb, const struct np_pkt *p)
{
	struct np_bypass_entry *e;
	struct np_state *st;
	__u32 idx, zero = 0;

	if (!np_bypass_candidate(skb, p))
		return 0;
	idx = np_bypass_index(p);
	e = bpf_map_lookup_elem(&netpol_bypass_v1, &idx);
	if (!e || !np_bypass_same(e, p, skb->ingress_ifindex, skb->ifindex))
		return 0;
	/* The active generation's number (as stamped into its endpoint
	 * values): a flip makes every entry of the old one stale. */
	st = bpf_map_lookup_elem(&netpol_state_v1, &zero);
	if (!st || (__u32)st->generation != e->generation)
		return 0;
	if (np_ct_now() >= e->until_ns)
		return 0;
	np_count(e->slot, NP_CNT_ALLOWED);
	return 1;
}

/*
 * The egress program passed `p` in full on its conntrack entry `v` under
 * generation `gen`: record it when it came through an enforced endpoint of
 * this generation (both ends local). `endpoints` is that generation's
 * endpoint table.
 */
static __always_inline void np_bypass_record(struct __sk_buff *skb, const struct np_pkt *p,
					     void *endpoints, const struct np_ct_value *v,
					     __u32 slot, __u32 gen, __u64 now)
{
	struct np_bypass_entry *e;
	__u32 idx, in = skb->ingress_ifindex;
	__u64 t;

	if (!np_bypass_candidate(skb, p) || (v->flags & NP_CT_F_AUDIT) ||
	    (v->state & NP_CT_CLOSING))
		return;
	if (!bpf_map_lookup_elem(endpoints, &in))
		return;
	idx = np_bypass_index(p);
	e = bpf_map_lookup_elem(&netpol_bypass_v1, &idx);
	if (!e)
		return;
	t = np_ct_timeout(p->proto, v->state) >> 2;
	if (t > NP_CT_SLACK_NS)
		t = NP_CT_SLACK_NS;
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	e->sport = p->sport;
	e->dport = p->dport;
	e->proto = p->proto;
	e->family = p->family;
	e->pad = 0;
	e->in_ifindex = in;
	e->out_ifindex = skb->ifindex;
	e->generation = gen;
	e->slot = slot;
	e->until_ns = now + t;
}

#endif

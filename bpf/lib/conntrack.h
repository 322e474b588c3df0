/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * conntrack.h — per-enforcement-point connection tracking (key layout and
 * classification rules in netpol_abi.h, struct np_ct_key) and the fragment
 * table that lets non-first fragments inherit their first fragment's ports.
 */
#ifndef NETPOL_CONNTRACK_H
#define NETPOL_CONNTRACK_H

#include "netpol_abi.h"
#include "netpol_maps.h"
#include "config.h"
#include "parse.h"

/* What conntrack makes of a packet. */
enum np_ct_class {
	NP_CT_NEW = 0,
	NP_CT_ESTABLISHED = 1,
	NP_CT_REPLY = 2,
	NP_CT_RELATED = 3,
};

static __always_inline void np_ct_key_fill(struct np_ct_key *k, __u32 ifindex, __u8 hook,
					   __u8 family, __u8 proto, const __u8 *s, const __u8 *d,
					   __u16 sport, __u16 dport)
{
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->saddr, s, 16);
	__builtin_memcpy(k->daddr, d, 16);
	k->sport = sport;
	k->dport = dport;
	k->ifindex = ifindex;
	k->proto = proto;
	k->family = family;
	k->hook = hook;
}

static __always_inline __u64 np_ct_timeout(__u8 proto, __u8 state)
{
	if (proto != NP_IPPROTO_TCP)
		return cfg_ct_other_ns;
	if (state & NP_CT_CLOSING)
		return cfg_ct_close_ns;
	if (state & NP_CT_SEEN_REPLY)
		return cfg_ct_established_ns;
	return cfg_ct_syn_ns;
}

/* A live entry for `k`, or NULL (expired entries are removed). */
static __always_inline struct np_ct_value *np_ct_get(struct np_ct_key *k, __u64 now)
{
	struct np_ct_value *v = bpf_map_lookup_elem(&netpol_ct_v1, k);

	if (v && v->expires_ns < now) {
		bpf_map_delete_elem(&netpol_ct_v1, k);
		return NULL;
	}
	return v;
}

static __always_inline void np_ct_touch(struct np_ct_value *v, struct np_pkt *p, int reply, __u64 now)
{
	__u8 st = v->state;

	if (reply)
		st |= NP_CT_SEEN_REPLY;
	if (p->proto == NP_IPPROTO_TCP && (p->tcp_flags & (NP_TCP_FIN | NP_TCP_RST)))
		st |= NP_CT_CLOSING;
	if (st != v->state)
		v->state = st;
	v->expires_ns = now + np_ct_timeout(p->proto, st);
}

/* Addresses in struct np_pkt are 4-byte aligned (it starts with them). */
static __always_inline int np_addr_eq(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0;
}

/*
 * Classify a packet at (ifindex, hook). For ICMP errors the inner tuple is
 * checked against both orientations of the flows at this point.
 */
static __always_inline enum np_ct_class np_ct_classify(struct np_pkt *p, __u32 ifindex, __u8 hook,
						       __u64 now, __u32 *rule)
{
	struct np_ct_key k;
	struct np_ct_value *v;
	__u8 other = hook ^ 1;

	if (p->is_icmp_error) {
		/*
		 * An error goes back to the sender of the packet it quotes: its
		 * destination is the inner source. Without this check a workload
		 * with any tracked flow (a -> c:80) could send "errors" quoting
		 * that flow (c:80 -> a) to any destination its policy denies, with
		 * any payload after the quote, and they passed as related
		 * (tests/privileged/bypass.rs icmp_error_quoting_a_tracked_flow_reaches_only_
		 * that_flows_peer). Linux conntrack applies the same rule.
		 */
		if (!np_addr_eq(p->daddr, p->in_saddr))
			return NP_CT_NEW;
		/* Inner packet was sent by the peer of this hook's original direction... */
		np_ct_key_fill(&k, ifindex, other, p->family, p->in_proto, p->in_saddr,
			       p->in_daddr, p->in_sport, p->in_dport);
		if (np_ct_get(&k, now))
			return NP_CT_RELATED;
		/* ...or it is a reply we sent that the peer rejected. */
		np_ct_key_fill(&k, ifindex, hook, p->family, p->in_proto, p->in_daddr,
			       p->in_saddr, p->in_dport, p->in_sport);
		if (np_ct_get(&k, now))
			return NP_CT_RELATED;
		return NP_CT_NEW;
	}

	np_ct_key_fill(&k, ifindex, hook, p->family, p->proto, p->saddr, p->daddr, p->sport,
		       p->dport);
	v = np_ct_get(&k, now);
	if (v) {
		np_ct_touch(v, p, 0, now);
		*rule = v->rule;
		return NP_CT_ESTABLISHED;
	}
	/* Echo replies use the same identifier; the reply key is the swapped tuple. */
	np_ct_key_fill(&k, ifindex, other, p->family, p->proto, p->daddr, p->saddr, p->dport,
		       p->sport);
	v = np_ct_get(&k, now);
	if (v) {
		np_ct_touch(v, p, 1, now);
		return NP_CT_REPLY;
	}
	return NP_CT_NEW;
}

static __always_inline void np_ct_create(struct np_pkt *p, __u32 ifindex, __u8 hook, __u64 now,
					 __u32 rule)
{
	struct np_ct_key k;
	struct np_ct_value v = {};

	np_ct_key_fill(&k, ifindex, hook, p->family, p->proto, p->saddr, p->daddr, p->sport,
		       p->dport);
	v.rule = rule;
	if (p->proto == NP_IPPROTO_TCP && (p->tcp_flags & NP_TCP_SYN))
		v.state = NP_CT_SEEN_SYN;
	if (p->proto == NP_IPPROTO_TCP && (p->tcp_flags & (NP_TCP_FIN | NP_TCP_RST)))
		v.state |= NP_CT_CLOSING;
	v.expires_ns = now + np_ct_timeout(p->proto, v.state);
	bpf_map_update_elem(&netpol_ct_v1, &k, &v, BPF_ANY);
}

static __always_inline void np_frag_key_fill(struct np_frag_key *k, struct np_pkt *p)
{
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
	k->id = p->frag_id;
	k->proto = p->proto;
	k->family = p->family;
}

/* First fragment: remember its ports for the fragments that follow. */
static __always_inline void np_frag_record(struct np_pkt *p)
{
	struct np_frag_key k;
	struct np_frag_value v = {};

	np_frag_key_fill(&k, p);
	v.sport = p->sport;
	v.dport = p->dport;
	v.policy_port = p->policy_port;
	bpf_map_update_elem(&netpol_frag_v1, &k, &v, BPF_ANY);
}

/* Non-first fragment: take the ports of its first fragment; -1 if unknown. */
static __always_inline int np_frag_resolve(struct np_pkt *p)
{
	struct np_frag_key k;
	struct np_frag_value *v;

	np_frag_key_fill(&k, p);
	v = bpf_map_lookup_elem(&netpol_frag_v1, &k);
	if (!v)
		return -1;
	p->sport = v->sport;
	p->dport = v->dport;
	p->policy_port = v->policy_port;
	p->frag_later = 0;
	return 0;
}

#endif

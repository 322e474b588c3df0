/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * conntrack.h — per-enforcement-point connection tracking (key layout and
 * classification rules in netpol_abi.h, struct np_ct_key: one entry per
 * flow, found with one lookup from either direction, caching the verdict and
 * the generation that decided it) and the fragment table that lets non-first
 * fragments inherit their first fragment's protocol and ports.
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

/* An entry's expiry moves at most this early: it is written only when it
 * moves by more (keeps the entry's cache line shared between the CPUs of the
 * two directions), capped at 1/16 of the timeout for short timeouts. */
#define NP_CT_SLACK_NS 1000000000ULL

/* Addresses in struct np_pkt are 4-byte aligned (it starts with them). */
static __always_inline int np_addr_eq(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0;
}

/* 1 if (s, sport) is side b of the key: the greater end (address words in
 * memory order, then port). Any fixed total order does; this one is cheap. */
static __always_inline int np_ct_src_is_b(const __u8 *s, const __u8 *d, __u16 sport, __u16 dport)
{
	const __u32 *x = (const __u32 *)s, *y = (const __u32 *)d;

	if (x[0] != y[0])
		return x[0] > y[0];
	if (x[1] != y[1])
		return x[1] > y[1];
	if (x[2] != y[2])
		return x[2] > y[2];
	if (x[3] != y[3])
		return x[3] > y[3];
	return sport > dport;
}

/* The key of the flow a packet (s, sport) -> (d, dport) belongs to; returns
 * whether its source is side b. */
static __always_inline int np_ct_key_fill(struct np_ct_key *k, __u32 ifindex, __u8 family,
					  __u8 proto, const __u8 *s, const __u8 *d, __u16 sport,
					  __u16 dport)
{
	int src_b = np_ct_src_is_b(s, d, sport, dport);

	__builtin_memset(k, 0, sizeof(*k));
	if (src_b) {
		__builtin_memcpy(k->addr_a, d, 16);
		__builtin_memcpy(k->addr_b, s, 16);
		k->port_a = dport;
		k->port_b = sport;
	} else {
		__builtin_memcpy(k->addr_a, s, 16);
		__builtin_memcpy(k->addr_b, d, 16);
		k->port_a = sport;
		k->port_b = dport;
	}
	k->ifindex = ifindex;
	k->proto = proto;
	k->family = family;
	return src_b;
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

/* The clock of `expires_ns`: coarse (jiffies), timeouts are seconds. */
static __always_inline __u64 np_ct_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

/* A packet of the flow passed: its state and expiry. The expiry is written
 * only when it moves by more than the slack, or the state changes. */
static __always_inline void np_ct_touch(struct np_ct_value *v, struct np_pkt *p, int reply, __u64 now)
{
	__u8 st = v->state;
	__u64 t, slack, exp;

	if (reply)
		st |= NP_CT_SEEN_REPLY;
	if (p->proto == NP_IPPROTO_TCP && (p->tcp_flags & (NP_TCP_FIN | NP_TCP_RST)))
		st |= NP_CT_CLOSING;
	t = np_ct_timeout(p->proto, st);
	exp = now + t;
	if (st != v->state) {
		v->state = st;
		v->expires_ns = exp;
		return;
	}
	slack = t >> 4;
	if (slack > NP_CT_SLACK_NS)
		slack = NP_CT_SLACK_NS;
	if (exp > v->expires_ns + slack)
		v->expires_ns = exp;
}

/* The live entry for `k`, or NULL (an expired entry is removed). */
static __always_inline struct np_ct_value *np_ct_get(struct np_ct_key *k, __u64 now)
{
	struct np_ct_value *v = bpf_map_lookup_elem(&netpol_ct_v2, k);

	if (v && v->expires_ns < now) {
		bpf_map_delete_elem(&netpol_ct_v2, k);
		return NULL;
	}
	return v;
}

/* ICMP errors (out of line: rare). The error goes back to the sender of the
 * packet it quotes, so its destination must be the quoted source: without
 * this check a workload with any tracked flow (a -> c:80) could send
 * "errors" quoting that flow (c:80 -> a) to any destination its policy
 * denies (tests/privileged/bypass.rs icmp_error_quoting_a_tracked_flow_reaches_only_
 * that_flows_peer); Linux conntrack applies the same rule. Related: the
 * quoted packet is the originator's (it passed the other hook, so the flow
 * was first seen there) or the responder's (a reply of a flow first seen at
 * this hook, which the peer rejected). */
static __noinline int np_ct_related(struct np_pkt *p, __u32 ifindex, __u32 hook, __u64 now)
{
	struct np_ct_key k;
	struct np_ct_value *v;
	int in_src_b, in_src_orig;

	if (!np_addr_eq(p->daddr, p->in_saddr))
		return 0;
	in_src_b = np_ct_key_fill(&k, ifindex, p->family, p->in_proto, p->in_saddr, p->in_daddr,
				  p->in_sport, p->in_dport);
	v = np_ct_get(&k, now);
	if (!v)
		return 0;
	in_src_orig = in_src_b == !!(v->flags & NP_CT_F_ORIG_B);
	/* quoted packet from the originator, who sends at v->hook: it came in
	 * through the other hook... */
	if (in_src_orig)
		return v->hook == (hook ^ 1);
	/* ...or from the responder, whose packets pass at the other hook. */
	return v->hook == hook;
}

/*
 * Classify a packet at (ifindex, hook) with one lookup. The entry of an
 * established packet or a reply goes to the caller (*hit), which checks what
 * it caches and touches it when the packet passes.
 */
static __always_inline enum np_ct_class np_ct_classify(struct np_pkt *p, __u32 ifindex, __u8 hook,
						       __u64 now, struct np_ct_value **hit)
{
	struct np_ct_key k;
	struct np_ct_value *v;
	int orig, src_b;

	*hit = 0;
	if (p->is_icmp_error)
		return np_ct_related(p, ifindex, hook, now) ? NP_CT_RELATED : NP_CT_NEW;

	src_b = np_ct_key_fill(&k, ifindex, p->family, p->proto, p->saddr, p->daddr, p->sport,
			       p->dport);
	v = np_ct_get(&k, now);
	if (!v)
		return NP_CT_NEW;
	orig = src_b == !!(v->flags & NP_CT_F_ORIG_B);
	if (orig && v->hook == hook) {
		*hit = v;
		return NP_CT_ESTABLISHED;
	}
	if (!orig && v->hook != hook) {
		*hit = v;
		return NP_CT_REPLY;
	}
	/* The same tuple the other way through this device: not this flow. */
	return NP_CT_NEW;
}

/* A passed established packet re-decided by generation `gen`: cache it. */
static __always_inline void np_ct_refresh(struct np_ct_value *v, __u32 gen, __u32 rule, __u32 audit)
{
	__u8 fl = (v->flags & ~NP_CT_F_AUDIT) | (audit ? NP_CT_F_AUDIT : 0);

	if (v->generation != gen)
		v->generation = gen;
	if (v->rule != rule)
		v->rule = rule;
	if (v->flags != fl)
		v->flags = fl;
}

/* A new flow allowed (or audited) by the generation `gen`: its entry. */
static __always_inline void np_ct_create(struct np_pkt *p, __u32 ifindex, __u32 hook, __u64 now,
				    __u32 rule, __u32 gen, __u32 audit)
{
	struct np_ct_key k;
	struct np_ct_value v = {};

	if (np_ct_key_fill(&k, ifindex, p->family, p->proto, p->saddr, p->daddr, p->sport,
			   p->dport))
		v.flags = NP_CT_F_ORIG_B;
	if (audit)
		v.flags |= NP_CT_F_AUDIT;
	v.hook = hook;
	v.rule = rule;
	v.generation = gen;
	v.reply_generation = gen - 1; /* the first reply is checked */
	if (p->proto == NP_IPPROTO_TCP && (p->tcp_flags & NP_TCP_SYN))
		v.state = NP_CT_SEEN_SYN;
	if (p->proto == NP_IPPROTO_TCP && (p->tcp_flags & (NP_TCP_FIN | NP_TCP_RST)))
		v.state |= NP_CT_CLOSING;
	v.expires_ns = now + np_ct_timeout(p->proto, v.state);
	bpf_map_update_elem(&netpol_ct_v2, &k, &v, BPF_ANY);
}

/* A packet the slow path passed: an established flow's entry caches the new
 * verdict, a new flow (not an ICMP error) gets its entry. */
static __always_inline void np_ct_remember(struct np_ct_value *hit, struct np_pkt *p, __u32 ifindex,
					   __u8 hook, __u64 now, __u32 rule, __u32 gen,
					   __u32 audit)
{
	if (hit) {
		np_ct_refresh(hit, gen, rule, audit);
		np_ct_touch(hit, p, 0, now);
	} else if (!p->is_icmp_error) {
		np_ct_create(p, ifindex, hook, now, rule, gen, audit);
	}
}

/*
 * Fragments. The key's `proto` is the protocol field every fragment of a
 * datagram carries: IPv4's protocol, IPv6's fragment header's next header
 * (which is an extension header when one follows the fragment header). The
 * first fragment stores the real L4 protocol and ports; later fragments take
 * both (tests: a first fragment with a destination-options header after the
 * fragment header no longer loses its later fragments).
 */
static __always_inline void np_frag_key_fill(struct np_frag_key *k, struct np_pkt *p)
{
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
	k->id = p->frag_id;
	k->proto = p->frag_proto;
	k->family = p->family;
}

/* First fragment: remember its protocol and ports for the fragments that follow. */
static __noinline void np_frag_record(struct np_pkt *p)
{
	struct np_frag_key k;
	struct np_frag_value v = {};

	np_frag_key_fill(&k, p);
	v.sport = p->sport;
	v.dport = p->dport;
	v.policy_port = p->policy_port;
	v.proto = p->proto;
	bpf_map_update_elem(&netpol_frag_v1, &k, &v, BPF_ANY);
}

/* Non-first fragment: take the protocol and ports of its first fragment; -1 if unknown. */
static __noinline int np_frag_resolve(struct np_pkt *p)
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
	/* 0: recorded by layout 1, which keyed on the L4 protocol itself. */
	if (v->proto)
		p->proto = v->proto;
	p->frag_later = 0;
	return 0;
}

#endif

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * lookup.h — the generation-scoped lookups: ipcache (address -> identity,
 * owning endpoint) and the policy decision. The precedence implemented by
 * np_policy_decide is documented with struct np_policy_key in netpol_abi.h
 * and is the contract shared with src/policy/lookup.rs.
 */
#ifndef NETPOL_LOOKUP_H
#define NETPOL_LOOKUP_H

#include "netpol_abi.h"
#include "netpol_maps.h"
#include "config.h"
#include "parse.h"

/* The maps of the generation a packet uses: the active word is read once;
 * the endpoint table is fetched at once, the ipcache and policy maps of the
 * same slot only when the packet needs them (np_gen_rest: not on the fast
 * path of an established flow). */
struct np_gen {
	void *ipcache;
	void *endpoints;
	void *policy;
	void *policy_exact; /* NULL: none (a layout-2 generation), the trie has all */
	__u32 active;
};

static __always_inline int np_gen_get(struct np_gen *g)
{
	__u32 zero = 0;
	struct np_state *st;

	st = bpf_map_lookup_elem(&netpol_state_v1, &zero);
	if (!st)
		return -1;
	/* Read the active word exactly once. */
	g->active = *(volatile __u32 *)&st->active & 1;
	g->endpoints = bpf_map_lookup_elem(&netpol_endpoints_v1, &g->active);
	if (!g->endpoints)
		return -1;
	return 0;
}

/* The ipcache and policy maps of the slot np_gen_get chose. */
static __always_inline int np_gen_rest(struct np_gen *g)
{
	g->ipcache = bpf_map_lookup_elem(&netpol_ipcache_v1, &g->active);
	g->policy = bpf_map_lookup_elem(&netpol_policy_v1, &g->active);
	if (!g->ipcache || !g->policy)
		return -1;
	g->policy_exact = bpf_map_lookup_elem(&netpol_policy_exact_v1, &g->active);
	return 0;
}

struct np_ident {
	__u32 identity;
	__u32 endpoint; /* NP_SLOT_NONE: no endpoint's; NP_SLOT_ELSEWHERE: one not attached here */
};

static __always_inline void np_ipcache_lookup(void *ipcache, __u8 family, const __u8 *addr,
					      struct np_ident *out)
{
	struct np_ipcache_key k = {};
	struct np_ipcache_value *v;

	k.family = family;
	if (family == NP_FAMILY_V4) {
		k.prefixlen = NP_IPCACHE_STATIC_PREFIX + 32;
		__builtin_memcpy(k.addr, addr, 4);
	} else {
		k.prefixlen = NP_IPCACHE_STATIC_PREFIX + 128;
		__builtin_memcpy(k.addr, addr, 16);
	}
	v = bpf_map_lookup_elem(ipcache, &k);
	if (v) {
		out->identity = v->identity;
		out->endpoint = v->endpoint;
	} else {
		out->identity = cfg_world_identity;
		out->endpoint = NP_SLOT_NONE;
	}
}

/* Outcome of a policy decision. */
enum np_decision {
	NP_DECIDE_ALLOW = 0,          /* an allow entry matched */
	NP_DECIDE_DENY = 1,           /* a deny entry matched */
	NP_DECIDE_DEFAULT_DENY = 2,   /* nothing matched, default deny */
	NP_DECIDE_NO_POLICY = 3,      /* nothing matched, not default deny: pass */
	NP_DECIDE_STAGED_DENY = 4,    /* allowed; a staged deny would drop it: audit */
	NP_DECIDE_STAGED_DEFAULT = 5, /* allowed; a staged default deny would: audit */
};

static __always_inline int np_is(struct np_policy_value *v, __u8 verdict)
{
	return v && v->verdict == verdict;
}

/* The longest match of the key: an exact entry (hash) if there is one, else
 * the trie's longest prefix. */
static __always_inline struct np_policy_value *
np_policy_lookup(struct np_gen *g, __u32 slot, __u8 dir, __u32 identity, __u8 proto, __u16 port)
{
	struct np_policy_key k = {};
	struct np_policy_value *v;

	k.prefixlen = NP_POLICY_FULL_PREFIX;
	k.slot = slot;
	k.identity = identity;
	k.direction = dir;
	k.proto = proto;
	k.port = bpf_htons(port);
	if (g->policy_exact) {
		v = bpf_map_lookup_elem(g->policy_exact, &k);
		if (v)
			return v;
	}
	return bpf_map_lookup_elem(g->policy, &k);
}

static __always_inline enum np_decision np_policy_decide(struct np_gen *g, __u32 slot,
							 __u32 ep_flags, __u8 dir, __u32 remote,
							 __u8 proto, __u16 port, __u32 *rule)
{
	struct np_policy_value *l1, *l2, *staged;
	__u32 deny_flag;

	l1 = np_policy_lookup(g, slot, dir, remote, proto, port);
	l2 = np_policy_lookup(g, slot, dir, 0, proto, port);
	*rule = NP_RULE_NONE;
	if (l1 && l1->verdict == NP_VERDICT_DENY) {
		*rule = l1->rule;
		return NP_DECIDE_DENY;
	}
	if (l2 && l2->verdict == NP_VERDICT_DENY) {
		*rule = l2->rule;
		return NP_DECIDE_DENY;
	}
	deny_flag = dir == NP_DIR_INGRESS ? NP_EP_F_DENY_INGRESS : NP_EP_F_DENY_EGRESS;
	/* A staged deny passes as audit where the enforced entries let the flow
	 * through (docs/policy.md, "Staged policies"). */
	staged = 0;
	if (np_is(l1, NP_VERDICT_STAGED_DENY) || np_is(l1, NP_VERDICT_ALLOW_STAGED_DENY))
		staged = l1;
	else if (np_is(l2, NP_VERDICT_STAGED_DENY) || np_is(l2, NP_VERDICT_ALLOW_STAGED_DENY))
		staged = l2;
	if (staged) {
		if (np_is(l1, NP_VERDICT_ALLOW) || np_is(l1, NP_VERDICT_ALLOW_STAGED_DENY) ||
		    np_is(l2, NP_VERDICT_ALLOW) || np_is(l2, NP_VERDICT_ALLOW_STAGED_DENY) ||
		    !(ep_flags & deny_flag)) {
			*rule = staged->rule;
			return NP_DECIDE_STAGED_DENY;
		}
		return NP_DECIDE_DEFAULT_DENY;
	}
	if (l1 && l1->verdict == NP_VERDICT_ALLOW) {
		*rule = l1->rule;
		return NP_DECIDE_ALLOW;
	}
	if (l2 && l2->verdict == NP_VERDICT_ALLOW) {
		*rule = l2->rule;
		return NP_DECIDE_ALLOW;
	}
	if (ep_flags & deny_flag)
		return NP_DECIDE_DEFAULT_DENY;
	staged = 0;
	if (np_is(l1, NP_VERDICT_STAGED_DEFAULT))
		staged = l1;
	else if (np_is(l2, NP_VERDICT_STAGED_DEFAULT))
		staged = l2;
	if (staged) {
		*rule = staged->rule;
		return NP_DECIDE_STAGED_DEFAULT;
	}
	return NP_DECIDE_NO_POLICY;
}

#endif

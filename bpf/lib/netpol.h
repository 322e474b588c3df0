/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * netpol.h — the per-packet pipeline shared by all four entry points:
 *
 *   1. generation: read the active word once, fetch that generation's maps
 *   2. endpoint: ifindex -> (slot, identity, flags); unknown devices pass
 *   3. parse; ARP/non-IP pass; malformed (incl. a third VLAN tag) drop
 *   4. ICMPv6 neighbour discovery (133-137) passes
 *   5. anti-spoofing: a packet leaving a workload must come from one of its
 *      own addresses (the ipcache entry of the source names its slot)
 *   6. fragments: non-first fragments take the first fragment's ports or drop
 *   7. ICMPv4 fragmentation-needed passes
 *   8. conntrack: replies and related ICMP errors pass; established flows pass
 *      under `keep`, are judged again under `recheck`
 *   9. host endpoints: failsafe ports pass
 *  10. policy decision (netpol_abi.h, struct np_policy_key); an allowed new
 *      flow gets a conntrack entry; audit endpoints pass would-be drops, and
 *      a staged policy's would-be drop passes as audit everywhere.
 *
 * Hook to direction: for a workload endpoint (host-side veth) the device's
 * ingress carries packets LEAVING the workload (its egress policy, remote =
 * destination) and the device's egress carries packets TO it (its ingress
 * policy, remote = source). For a host endpoint it is the other way round.
 */
#ifndef NETPOL_NETPOL_H
#define NETPOL_NETPOL_H

#include "netpol_abi.h"
#include "netpol_maps.h"
#include "config.h"
#include "parse.h"
#include "lookup.h"
#include "conntrack.h"
#include "events.h"

static __always_inline int np_drop(struct np_pkt *p, struct np_verdict_info *vi,
				   enum np_counter counter, __u8 reason)
{
	np_count(vi->slot, counter);
	vi->verdict = NP_EV_DENIED;
	vi->reason = reason;
	np_emit(p, vi);
	return NP_DROP;
}

static __always_inline int np_handle(struct __sk_buff *skb, __u8 hook)
{
	struct np_pkt p = {};
	struct np_verdict_info vi = {};
	struct np_gen g;
	struct np_endpoint_value *ep;
	struct np_ident remote;
	__u32 ifindex = skb->ifindex;
	__u32 slot, flags, identity, rule = NP_RULE_NONE, ct_rule = NP_RULE_NONE;
	__u8 dir, is_host;
	__u64 now;
	enum np_parse_result r;
	enum np_ct_class ct;
	enum np_decision decision;

	if (cfg_stage == NP_STAGE_ENTRY)
		return NP_PASS;
	if (np_gen_get(&g) < 0)
		return NP_PASS; /* nothing installed yet */
	ep = bpf_map_lookup_elem(g.endpoints, &ifindex);
	if (!ep)
		return NP_PASS; /* not an endpoint of this generation */
	slot = ep->slot;
	flags = ep->flags;
	identity = ep->identity;
	if (cfg_stage == NP_STAGE_ENDPOINT)
		return NP_PASS;
	is_host = (flags & NP_EP_F_HOST) ? 1 : 0;
	if (is_host)
		dir = hook == NP_HOOK_INGRESS ? NP_DIR_INGRESS : NP_DIR_EGRESS;
	else
		dir = hook == NP_HOOK_INGRESS ? NP_DIR_EGRESS : NP_DIR_INGRESS;

	vi.ifindex = ifindex;
	vi.slot = slot;
	vi.direction = dir;
	vi.rule = NP_RULE_NONE;
	vi.src_identity = identity;
	vi.dst_identity = identity;

	r = np_parse(skb, &p);
	if (r == NP_PARSE_PASS)
		return NP_PASS;
	if (r != NP_PARSE_OK)
		return np_drop(&p, &vi, NP_CNT_DENIED_OTHER, NP_REASON_MALFORMED);
	if (cfg_stage == NP_STAGE_PARSE)
		return NP_PASS;

	/* Neighbour discovery must work before anything else (and its source
	 * is link-local or unspecified, so it precedes anti-spoofing). */
	if (p.family == NP_FAMILY_V6 && p.proto == NP_IPPROTO_ICMPV6 && p.has_l4 &&
	    p.icmp_type >= 133 && p.icmp_type <= 137)
		return NP_PASS;

	/* Multicast listener reports and queries (MLD, RFC 2710/3810: ICMPv6 130,
	 * 131, 132, 143) go from a link-local or unspecified source to a
	 * link-scoped group (ff02::/16). The kernel sends them on every IPv6
	 * interface, also of an IPv4-only workload; they never leave the link,
	 * so they pass before anti-spoofing instead of counting as spoofed. */
	if (p.family == NP_FAMILY_V6 && p.proto == NP_IPPROTO_ICMPV6 && p.has_l4 &&
	    (p.icmp_type == 130 || p.icmp_type == 131 || p.icmp_type == 132 ||
	     p.icmp_type == 143) &&
	    p.daddr[0] == 0xff && p.daddr[1] == 0x02)
		return NP_PASS;

	if (!is_host && hook == NP_HOOK_INGRESS) {
		struct np_ident src;

		np_ipcache_lookup(g.ipcache, p.family, p.saddr, &src);
		if (src.endpoint != slot)
			return np_drop(&p, &vi, NP_CNT_DENIED_SPOOF, NP_REASON_SPOOFED);
	}

	if (dir == NP_DIR_EGRESS) {
		np_ipcache_lookup(g.ipcache, p.family, p.daddr, &remote);
		vi.dst_identity = remote.identity;
	} else {
		np_ipcache_lookup(g.ipcache, p.family, p.saddr, &remote);
		vi.src_identity = remote.identity;
	}
	if (cfg_stage == NP_STAGE_IPCACHE)
		return NP_PASS;

	if (p.frag_later) {
		if (np_frag_resolve(&p) < 0)
			return np_drop(&p, &vi, NP_CNT_DENIED_OTHER, NP_REASON_FRAGMENT);
	} else if (p.frag_first) {
		np_frag_record(&p);
	}

	if (p.family == NP_FAMILY_V4 && p.proto == NP_IPPROTO_ICMP && p.has_l4 &&
	    p.icmp_type == 3 && p.icmp_code == 4) {
		np_count(slot, NP_CNT_ALLOWED);
		return NP_PASS;
	}

	now = bpf_ktime_get_ns();
	ct = np_ct_classify(&p, ifindex, hook, now, &ct_rule);
	if (cfg_stage == NP_STAGE_CONNTRACK) {
		/* The next packet of the flow measures an established one. */
		if (ct == NP_CT_NEW && !p.is_icmp_error)
			np_ct_create(&p, ifindex, hook, now, NP_RULE_NONE);
		return NP_PASS;
	}
	if (ct == NP_CT_REPLY || ct == NP_CT_RELATED) {
		np_count(slot, NP_CNT_ALLOWED);
		return NP_PASS;
	}
	if (ct == NP_CT_ESTABLISHED && !cfg_recheck_established) {
		np_count(slot, NP_CNT_ALLOWED);
		return NP_PASS;
	}

	if (is_host) {
		struct np_failsafe_key fk = {};

		fk.direction = dir;
		fk.proto = p.proto;
		fk.port = p.policy_port;
		if (bpf_map_lookup_elem(&netpol_failsafe_v1, &fk)) {
			np_count(slot, NP_CNT_ALLOWED);
			if (ct == NP_CT_NEW && !p.is_icmp_error)
				np_ct_create(&p, ifindex, hook, now, NP_RULE_NONE);
			return NP_PASS;
		}
	}

	decision = np_policy_decide(g.policy, slot, flags, dir, remote.identity, p.proto,
				    p.policy_port, &rule);
	vi.rule = rule;
	if (decision == NP_DECIDE_ALLOW || decision == NP_DECIDE_NO_POLICY) {
		np_count(slot, NP_CNT_ALLOWED);
		if (ct == NP_CT_NEW) {
			if (!p.is_icmp_error)
				np_ct_create(&p, ifindex, hook, now, rule);
			if (np_sample_allow()) {
				vi.verdict = NP_EV_ALLOWED;
				vi.reason = NP_REASON_POLICY_ALLOW;
				np_emit(&p, &vi);
			}
		}
		return NP_PASS;
	}

	vi.reason = decision == NP_DECIDE_DENY || decision == NP_DECIDE_STAGED_DENY
			    ? NP_REASON_POLICY_DENY
			    : NP_REASON_DEFAULT_DENY;
	/* A staged policy's would-be drop, or any drop at an audit endpoint. */
	if (decision == NP_DECIDE_STAGED_DENY || decision == NP_DECIDE_STAGED_DEFAULT ||
	    (flags & NP_EP_F_AUDIT)) {
		np_count(slot, NP_CNT_AUDIT);
		vi.verdict = NP_EV_AUDIT;
		np_emit(&p, &vi);
		if (ct == NP_CT_NEW && !p.is_icmp_error)
			np_ct_create(&p, ifindex, hook, now, rule);
		return NP_PASS;
	}
	return np_drop(&p, &vi,
		       decision == NP_DECIDE_DENY ? NP_CNT_DENIED_POLICY : NP_CNT_DENIED_DEFAULT,
		       vi.reason);
}

#endif

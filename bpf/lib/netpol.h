/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * netpol.h — the per-packet pipeline shared by all four entry points:
 *
 *   0. egress hook: a flow this hook passed within the last second, arriving
 *      through another enforced endpoint, passes on one lookup (bypass.h)
 *   1. generation: read the active word once, fetch that generation's maps
 *   2. endpoint: ifindex -> (slot, identity, flags, generation number);
 *      unknown devices pass
 *   3. parse; ARP/non-IP pass; malformed (incl. a third VLAN tag) drop
 *   4. ICMPv6 neighbour discovery (133-137) and multicast listener
 *      messages to link-scoped groups pass
 *   5. fragments: non-first fragments take the first fragment's protocol
 *      and ports or drop
 *   6. ICMPv4 fragmentation-needed passes
 *   7. conntrack, one lookup (netpol_abi.h, struct np_ct_key): replies and
 *      related ICMP errors pass; an established packet whose entry was
 *      decided by this generation passes at once — no anti-spoofing, ipcache
 *      or policy lookup. After a flip it is judged again under `recheck`
 *      (steps 8-10) and checked for spoofing only under `keep`.
 *   8. anti-spoofing: a packet leaving a workload must come from one of its
 *      own addresses (the ipcache entry of the source names its slot)
 *   9. host endpoints: failsafe ports pass
 *  10. policy decision (netpol_abi.h, struct np_policy_key); an allowed new
 *      flow gets a conntrack entry caching the verdict and the generation;
 *      audit endpoints pass would-be drops, and a staged policy's would-be
 *      drop passes as audit everywhere.
 *
 * An established flow's entry exists only if its first packet passed
 * anti-spoofing: the key holds the device and the source address, and the
 * cached generation is that of the maps that judged it.
 *
 * Hook to direction: for a workload endpoint (host-side veth) the device's
 * ingress carries packets LEAVING the workload (its egress policy, remote =
 * destination) and the device's egress carries packets TO it (its ingress
 * policy, remote = source). For a host endpoint it is the other way round.
 *
 * cfg_stage (benchmarks only, netpol_abi.h enum np_stage) stops the pipeline
 * after a step, in the order entry, endpoint, parse, ipcache, conntrack; the
 * ipcache and conntrack stages run the ipcache lookups right after parsing.
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
#include "dnsredirect.h"
#include "bypass.h"

static __always_inline int np_drop(struct np_pkt *p, struct np_verdict_info *vi,
				   enum np_counter counter, __u8 reason)
{
	np_count(vi->slot, counter);
	vi->verdict = NP_EV_DENIED;
	vi->reason = reason;
	np_emit(p, vi);
	return NP_DROP;
}

/* An unspecified or link-local source (0.0.0.0, 169.254.0.0/16, ::,
 * fe80::/10): what a workload sends before it has an address (DHCP, DHCPv6,
 * router solicitation) and on the link only. */
static __always_inline int np_link_scope_source(struct np_pkt *p)
{
	const __u32 *w = (const __u32 *)p->saddr;

	if (p->family == NP_FAMILY_V4)
		return w[0] == 0 || (p->saddr[0] == 169 && p->saddr[1] == 254);
	if ((w[0] | w[1] | w[2] | w[3]) == 0)
		return 1;
	return p->saddr[0] == 0xfe && (p->saddr[1] & 0xc0) == 0x80;
}

/* Anti-spoofing: 0 if a packet leaving the workload in `slot` has one of its
 * addresses as source (the ipcache entry of the source names the slot), or
 * an unspecified or link-local source that is no endpoint's address: such a
 * packet impersonates nobody, and policy still judges it (docs/policy.md,
 * "DHCP and link-local traffic"). */
static __always_inline int np_spoofed(void *ipcache, struct np_pkt *p, __u32 slot)
{
	struct np_ident src;

	np_ipcache_lookup(ipcache, p->family, p->saddr, &src);
	if (src.endpoint == slot)
		return 0;
	return src.endpoint != NP_SLOT_NONE || !np_link_scope_source(p);
}

/* The remote end's identity: the destination in the egress direction, the
 * source in the ingress direction. */
static __always_inline void np_remote(void *ipcache, struct np_pkt *p, __u8 dir,
				      struct np_verdict_info *vi, struct np_ident *remote)
{
	if (dir == NP_DIR_EGRESS) {
		np_ipcache_lookup(ipcache, p->family, p->daddr, remote);
		vi->dst_identity = remote->identity;
	} else {
		np_ipcache_lookup(ipcache, p->family, p->saddr, remote);
		vi->src_identity = remote->identity;
	}
}

static __always_inline int np_handle(struct __sk_buff *skb, __u8 hook)
{
	struct np_pkt p = {};
	struct np_verdict_info vi = {};
	struct np_gen g;
	struct np_endpoint_value *ep;
	struct np_ct_value *hit;
	struct np_ident remote;
	__u32 ifindex = skb->ifindex;
	__u32 slot, flags, identity, gen, rule = NP_RULE_NONE;
	__u8 dir, is_host, from_workload, spoof_checked = 0, direct = 0;
	__u64 now;
	enum np_parse_result r;
	enum np_ct_class ct;
	enum np_decision decision;

	if (cfg_stage == NP_STAGE_ENTRY)
		return NP_PASS;
	/* Both ends local: a flow this egress hook passed recently, arriving
	 * through another enforced endpoint, passes on one lookup (bypass.h). */
	if (np_bypass_on(hook)) {
		direct = np_parse_direct(skb, &p);
		if (direct && np_bypass_hit(skb, &p))
			return NP_PASS;
	}
	if (np_gen_get(&g) < 0)
		return NP_PASS; /* nothing installed yet */
	ep = bpf_map_lookup_elem(g.endpoints, &ifindex);
	if (!ep)
		return NP_PASS; /* not an endpoint of this generation */
	slot = ep->slot;
	flags = ep->flags;
	identity = ep->identity;
	gen = ep->generation;
	if (cfg_stage == NP_STAGE_ENDPOINT)
		return NP_PASS;
	is_host = (flags & NP_EP_F_HOST) ? 1 : 0;
	if (is_host)
		dir = hook == NP_HOOK_INGRESS ? NP_DIR_INGRESS : NP_DIR_EGRESS;
	else
		dir = hook == NP_HOOK_INGRESS ? NP_DIR_EGRESS : NP_DIR_INGRESS;
	from_workload = !is_host && hook == NP_HOOK_INGRESS;

	vi.ifindex = ifindex;
	vi.slot = slot;
	vi.direction = dir;
	vi.rule = NP_RULE_NONE;
	vi.src_identity = identity;
	vi.dst_identity = identity;

	r = direct ? NP_PARSE_OK : np_parse(skb, &p);
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

	if (cfg_stage == NP_STAGE_IPCACHE || cfg_stage == NP_STAGE_CONNTRACK) {
		if (np_gen_rest(&g) < 0)
			return NP_PASS;
		if (from_workload && np_spoofed(g.ipcache, &p, slot))
			return np_drop(&p, &vi, NP_CNT_DENIED_SPOOF, NP_REASON_SPOOFED);
		np_remote(g.ipcache, &p, dir, &vi, &remote);
		if (cfg_stage == NP_STAGE_IPCACHE)
			return NP_PASS;
	}

	/* Fragments and ICMPv4 fragmentation-needed are rare: anti-spoofing
	 * first, as for any packet that is not established. */
	if (p.frag_later || p.frag_first ||
	    (p.family == NP_FAMILY_V4 && p.proto == NP_IPPROTO_ICMP && p.icmp_type == 3)) {
		if (np_gen_rest(&g) < 0)
			return NP_PASS;
		if (from_workload && np_spoofed(g.ipcache, &p, slot))
			return np_drop(&p, &vi, NP_CNT_DENIED_SPOOF, NP_REASON_SPOOFED);
		spoof_checked = 1;
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
	}

	now = np_ct_now();
	ct = np_ct_classify(&p, ifindex, hook, now, &hit);
	if (cfg_stage == NP_STAGE_CONNTRACK) {
		/* The next packet of the flow measures an established one. */
		if (ct == NP_CT_NEW && !p.is_icmp_error)
			np_ct_create(&p, ifindex, hook, now, NP_RULE_NONE, gen, 0);
		else if (hit)
			np_ct_touch(hit, &p, ct == NP_CT_REPLY, now);
		return NP_PASS;
	}
	if (ct == NP_CT_REPLY) {
		/* A reply leaving the workload: its source checked once per
		 * generation. */
		if (from_workload && !spoof_checked && hit->reply_generation != gen) {
			if (np_gen_rest(&g) < 0)
				return NP_PASS;
			if (np_spoofed(g.ipcache, &p, slot))
				return np_drop(&p, &vi, NP_CNT_DENIED_SPOOF, NP_REASON_SPOOFED);
			hit->reply_generation = gen;
		}
		np_ct_touch(hit, &p, 1, now);
		np_count(slot, NP_CNT_ALLOWED);
		if (direct)
			np_bypass_record(skb, &p, g.endpoints, hit, slot, gen, now);
		return NP_PASS;
	}
	if (ct == NP_CT_ESTABLISHED) {
		/* The fast path: decided by this generation's maps. */
		if (hit->generation == gen &&
		    (!(hit->flags & NP_CT_F_AUDIT) || !cfg_recheck_established)) {
			np_ct_touch(hit, &p, 0, now);
			np_count(slot, NP_CNT_ALLOWED);
			if (direct)
				np_bypass_record(skb, &p, g.endpoints, hit, slot, gen, now);
			return np_dns_pass(skb, &p, &vi, from_workload);
		}
		if (!cfg_recheck_established) {
			/* keep: a new generation may have taken the address away. */
			if (from_workload && !spoof_checked) {
				if (np_gen_rest(&g) < 0)
					return NP_PASS;
				if (np_spoofed(g.ipcache, &p, slot))
					return np_drop(&p, &vi, NP_CNT_DENIED_SPOOF,
						       NP_REASON_SPOOFED);
			}
			hit->generation = gen;
			np_ct_touch(hit, &p, 0, now);
			np_count(slot, NP_CNT_ALLOWED);
			if (direct)
				np_bypass_record(skb, &p, g.endpoints, hit, slot, gen, now);
			return np_dns_pass(skb, &p, &vi, from_workload);
		}
	}

	/* New flows, related ICMP errors, and established flows after a flip
	 * under recheck. */
	if (np_gen_rest(&g) < 0)
		return NP_PASS;
	if (from_workload && !spoof_checked && np_spoofed(g.ipcache, &p, slot))
		return np_drop(&p, &vi, NP_CNT_DENIED_SPOOF, NP_REASON_SPOOFED);
	if (ct == NP_CT_RELATED) {
		np_count(slot, NP_CNT_ALLOWED);
		return NP_PASS;
	}
	np_remote(g.ipcache, &p, dir, &vi, &remote);

	if (is_host) {
		struct np_failsafe_key fk = {};

		fk.direction = dir;
		fk.proto = p.proto;
		fk.port = p.policy_port;
		if (bpf_map_lookup_elem(&netpol_failsafe_v1, &fk)) {
			np_count(slot, NP_CNT_ALLOWED);
			np_ct_remember(hit, &p, ifindex, hook, now, NP_RULE_NONE, gen, 0);
			return NP_PASS;
		}
	}

	decision = np_policy_decide(&g, slot, flags, dir, remote.identity, p.proto,
				    p.policy_port, &rule);
	vi.rule = rule;
	if (decision == NP_DECIDE_ALLOW || decision == NP_DECIDE_NO_POLICY) {
		np_count(slot, NP_CNT_ALLOWED);
		np_ct_remember(hit, &p, ifindex, hook, now, rule, gen, 0);
		if (!hit && np_sample_allow()) {
			vi.verdict = NP_EV_ALLOWED;
			vi.reason = NP_REASON_POLICY_ALLOW;
			np_emit(&p, &vi);
		}
		return np_dns_pass(skb, &p, &vi, from_workload);
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
		np_ct_remember(hit, &p, ifindex, hook, now, rule, gen, 1);
		return NP_PASS;
	}
	/* An established flow the new generation denies: dropped, its entry
	 * left as it is (replies still pass until it expires, as a re-allow
	 * resumes the flow). */
	return np_drop(&p, &vi,
		       decision == NP_DECIDE_DENY ? NP_CNT_DENIED_POLICY : NP_CNT_DENIED_DEFAULT,
		       vi.reason);
}

#endif

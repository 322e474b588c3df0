/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * dnsredirect.h — the DNS proxy redirect (docs/policy.md, "DNS names"): DNS
 * traffic leaving a workload whose egress has DNS rules is handed to
 * netpold's transparent proxy by socket assignment, as Cilium's proxy
 * redirect does (bpf/lib/proxy.h there), with the workload's resolver
 * configuration unchanged.
 *
 * Called for a packet leaving a workload (tc ingress of its host-side device)
 * that policy let through — a new flow allowed, or a packet of an established
 * one — so the L3/L4 rules still decide who may be asked. When
 * netpol_dns_redirect_v1 has (ifindex, protocol, destination port):
 *   - the proxy's socket is looked up: TCP first by the packet's own tuple
 *     (the proxy's accepted connection, whose local address is the original
 *     destination), else the listener; UDP the listener. The proxy listens on
 *     127.0.0.1 / ::1 at netpol_dns_proxy_v1's port;
 *   - the packet gets that socket (bpf_sk_assign), the mark netpold routes
 *     locally (an `ip rule fwmark` to a table with a `local` default route:
 *     the stack delivers only locally routed packets to an assigned socket),
 *     and, on a bridge port, the device's own MAC as destination with
 *     PACKET_HOST, so the bridge passes it up instead of forwarding it.
 *   - no socket (netpold down, the proxy not started, its listener gone), an
 *     assignment the kernel refuses, or a fragment: the packet is DROPPED and
 *     counted (netpol_dns_stats_v1, the endpoint's denied_other, an event
 *     with NP_REASON_DNS_PROXY). DNS of such an endpoint fails closed; it
 *     never reaches a server unfiltered, and nothing is learned.
 * netpol_dns_proxy_v1[0].redirects == 0 (no endpoint has DNS rules) skips
 * the hash lookup: an array lookup on the way of every packet.
 */
#ifndef NETPOL_DNSREDIRECT_H
#define NETPOL_DNSREDIRECT_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_packet.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "netpol_abi.h"
#include "netpol_maps.h"
#include "parse.h"
#include "events.h"

/* The drop: counted three ways, reported as an event. */
static __always_inline int np_dns_drop(struct np_pkt *p, struct np_verdict_info *vi, __u32 why)
{
	__u32 zero = 0;
	struct np_dns_stats *st = bpf_map_lookup_elem(&netpol_dns_stats_v1, &zero);

	if (st) {
		if (why == 0)
			st->dropped_no_proxy++;
		else
			st->dropped_other++;
	}
	np_count(vi->slot, NP_CNT_DENIED_OTHER);
	vi->verdict = NP_EV_DENIED;
	vi->reason = NP_REASON_DNS_PROXY;
	np_emit(p, vi);
	return NP_DROP;
}

/* The proxy's socket for this packet, referenced (release it), or NULL. */
static __always_inline struct bpf_sock *np_dns_socket(struct __sk_buff *skb, struct np_pkt *p,
						      __u16 proxy_port)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 len;

	if (p->family == NP_FAMILY_V4) {
		__builtin_memcpy(&t.ipv4.saddr, p->saddr, 4);
		__builtin_memcpy(&t.ipv4.daddr, p->daddr, 4);
		t.ipv4.sport = bpf_htons(p->sport);
		t.ipv4.dport = bpf_htons(p->dport);
		len = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(t.ipv6.saddr, p->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, p->daddr, 16);
		t.ipv6.sport = bpf_htons(p->sport);
		t.ipv6.dport = bpf_htons(p->dport);
		len = sizeof(t.ipv6);
	}
	if (p->proto == NP_IPPROTO_TCP) {
		/* A connection the proxy accepted: its own socket. */
		sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
		if (sk) {
			if (sk->state != BPF_TCP_LISTEN && sk->state != BPF_TCP_TIME_WAIT)
				return sk;
			bpf_sk_release(sk);
		}
	}
	/* The listener: 127.0.0.1 or ::1 at the proxy's port. */
	if (p->family == NP_FAMILY_V4) {
		t.ipv4.daddr = bpf_htonl(0x7f000001);
		t.ipv4.dport = bpf_htons(proxy_port);
	} else {
		__builtin_memset(t.ipv6.daddr, 0, 16);
		((__u8 *)t.ipv6.daddr)[15] = 1;
		t.ipv6.dport = bpf_htons(proxy_port);
	}
	if (p->proto == NP_IPPROTO_TCP)
		return (struct bpf_sock *)bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	return bpf_sk_lookup_udp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
}

/* Out of line: one copy for the three call sites. */
static __noinline int np_dns_redirect(struct __sk_buff *skb, struct np_pkt *p,
				      struct np_verdict_info *vi)
{
	__u32 zero = 0;
	struct np_dns_proxy *px;
	struct np_dns_redirect_key k = {};
	struct np_dns_redirect_value *v;
	struct np_dns_stats *st;
	struct bpf_sock *sk;
	long err;

	px = bpf_map_lookup_elem(&netpol_dns_proxy_v1, &zero);
	if (!px || px->redirects == 0)
		return NP_PASS;
	k.ifindex = skb->ifindex;
	k.port = p->dport;
	k.proto = p->proto;
	v = bpf_map_lookup_elem(&netpol_dns_redirect_v1, &k);
	if (!v)
		return NP_PASS;
	if (p->frag_first || p->frag_later)
		return np_dns_drop(p, vi, 1);
	if (px->port == 0)
		return np_dns_drop(p, vi, 0);
	sk = np_dns_socket(skb, p, px->port);
	if (!sk)
		return np_dns_drop(p, vi, 0);
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return np_dns_drop(p, vi, 1);
	skb->mark = px->mark;
	if (v->flags & NP_DNS_F_REWRITE_MAC) {
		if (bpf_skb_store_bytes(skb, 0, v->mac, 6, 0) < 0)
			return np_dns_drop(p, vi, 1);
		bpf_skb_change_type(skb, PACKET_HOST);
	}
	st = bpf_map_lookup_elem(&netpol_dns_stats_v1, &zero);
	if (st)
		st->redirected++;
	return NP_PASS;
}

/* The call site: a packet policy let through; only TCP and UDP leaving a
 * workload can be DNS to redirect. */
static __always_inline int np_dns_pass(struct __sk_buff *skb, struct np_pkt *p,
				       struct np_verdict_info *vi, __u8 from_workload)
{
	if (!from_workload || (p->proto != NP_IPPROTO_UDP && p->proto != NP_IPPROTO_TCP))
		return NP_PASS;
	return np_dns_redirect(skb, p, vi);
}

#endif

/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * events.h — per-endpoint per-CPU counters and verdict events on the ring
 * buffer, rate-limited per CPU (cfg_events_per_sec) so a flood cannot starve
 * the host; allowed new flows are sampled (1 in cfg_allow_sample_rate).
 */
#ifndef NETPOL_EVENTS_H
#define NETPOL_EVENTS_H

#include "netpol_abi.h"
#include "netpol_maps.h"
#include "config.h"
#include "parse.h"

/* Which field of struct np_counters a packet counts on. */
enum np_counter {
	NP_CNT_ALLOWED = 0,
	NP_CNT_DENIED_POLICY = 1,
	NP_CNT_DENIED_DEFAULT = 2,
	NP_CNT_DENIED_SPOOF = 3,
	NP_CNT_DENIED_OTHER = 4,
	NP_CNT_AUDIT = 5,
};

static __always_inline void np_count(__u32 slot, enum np_counter which)
{
	struct np_counters *c = bpf_map_lookup_elem(&netpol_counters_v1, &slot);

	if (!c)
		return;
	switch (which) {
	case NP_CNT_ALLOWED: c->allowed++; break;
	case NP_CNT_DENIED_POLICY: c->denied_policy++; break;
	case NP_CNT_DENIED_DEFAULT: c->denied_default++; break;
	case NP_CNT_DENIED_SPOOF: c->denied_spoof++; break;
	case NP_CNT_DENIED_OTHER: c->denied_other++; break;
	default: c->audit++; break;
	}
}

/* 1 if an allowed new flow should be reported (1 in cfg_allow_sample_rate). */
static __always_inline int np_sample_allow(void)
{
	__u32 zero = 0;
	struct np_ratelimit *rl;

	if (cfg_allow_sample_rate == 0)
		return 0;
	rl = bpf_map_lookup_elem(&netpol_ratelimit_v1, &zero);
	if (!rl)
		return 0;
	rl->sample++;
	if (rl->sample < cfg_allow_sample_rate)
		return 0;
	rl->sample = 0;
	return 1;
}

struct np_verdict_info {
	__u32 ifindex;
	__u32 slot;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 rule;
	__u8 direction;
	__u8 verdict;
	__u8 reason;
};

/* Out of line: events are the cold path. */
static __noinline void np_emit(struct np_pkt *p, struct np_verdict_info *vi)
{
	__u32 zero = 0;
	struct np_ratelimit *rl;
	struct np_event *e;
	__u64 now = bpf_ktime_get_ns();

	rl = bpf_map_lookup_elem(&netpol_ratelimit_v1, &zero);
	if (!rl)
		return;
	if (now - rl->window_start_ns >= 1000000000ULL) {
		rl->window_start_ns = now;
		rl->count = 0;
	}
	if (rl->count >= cfg_events_per_sec)
		return;
	rl->count++;

	e = bpf_ringbuf_reserve(&netpol_events_v1, sizeof(*e), 0);
	if (!e)
		return;
	e->ts_ns = now;
	e->ifindex = vi->ifindex;
	e->slot = vi->slot;
	e->src_identity = vi->src_identity;
	e->dst_identity = vi->dst_identity;
	e->rule = vi->rule;
	e->sport = p->sport;
	e->dport = p->policy_port;
	e->direction = vi->direction;
	e->verdict = vi->verdict;
	e->reason = vi->reason;
	e->proto = p->proto;
	e->family = p->family;
	e->pad[0] = 0;
	e->pad[1] = 0;
	e->pad[2] = 0;
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	bpf_ringbuf_submit(e, 0);
}

#endif

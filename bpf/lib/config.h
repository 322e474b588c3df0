/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * config.h — load-time settings. `volatile const` globals live in .rodata and
 * are set by userspace through the skeleton before load (DatapathSettings);
 * the defaults here are only what a bare load gets.
 */
#ifndef NETPOL_CONFIG_H
#define NETPOL_CONFIG_H

#include <linux/types.h>

#define NP_PASS (-1) /* TCX_NEXT / TC_ACT_UNSPEC: let later programs decide */
#define NP_DROP 2    /* TCX_DROP / TC_ACT_SHOT */

/* 1: forward packets of established flows are judged again (recheck). */
volatile const __u32 cfg_recheck_established = 1;
/* 1 in N allowed new flows is reported; 0 = none. */
volatile const __u32 cfg_allow_sample_rate = 0;
/* Verdict events per second per CPU. */
volatile const __u32 cfg_events_per_sec = 1000;
/* Identity of addresses the ipcache does not know. */
volatile const __u32 cfg_world_identity_v4 = 2;
volatile const __u32 cfg_world_identity_v6 = 2;
/* Conntrack timeouts, nanoseconds. */
volatile const __u64 cfg_ct_syn_ns = 60ULL * 1000000000ULL;
volatile const __u64 cfg_ct_established_ns = 21600ULL * 1000000000ULL;
volatile const __u64 cfg_ct_close_ns = 10ULL * 1000000000ULL;
volatile const __u64 cfg_ct_other_ns = 60ULL * 1000000000ULL;

#endif

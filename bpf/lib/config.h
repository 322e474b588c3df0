/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * config.h — load-time settings: `volatile const` globals in .rodata, which
 * the verifier sees as constants once the object is loaded. Every one is set
 * from DatapathSettings before load (src/datapath/kernel.rs, open_skel), which
 * writes the skeleton's whole `rodata` struct with one struct literal: a
 * setting Rust does not set fails the Rust build. The 0 initialisers only
 * place the globals in .rodata; the defaults are DatapathSettings'.
 *
 * Widest first (64-bit, then 32-bit, ...): a padding hole between two
 * settings becomes a private field of the generated `rodata` struct, which
 * that struct literal cannot name.
 */
#ifndef NETPOL_CONFIG_H
#define NETPOL_CONFIG_H

#include <linux/types.h>

/* Conntrack timeouts, nanoseconds: TCP before the first reply, established
 * TCP, TCP after FIN/RST, every other protocol. */
volatile const __u64 cfg_ct_syn_ns = 0;
volatile const __u64 cfg_ct_established_ns = 0;
volatile const __u64 cfg_ct_close_ns = 0;
volatile const __u64 cfg_ct_other_ns = 0;
/* 1: forward packets of established flows are judged again (recheck). */
volatile const __u32 cfg_recheck_established = 0;
/* 1 in N allowed new flows is reported; 0 = none. */
volatile const __u32 cfg_allow_sample_rate = 0;
/* Verdict events per second per CPU. */
volatile const __u32 cfg_events_per_sec = 0;
/* Identity of an address the ipcache does not know (world). */
volatile const __u32 cfg_world_identity = 0;
/* 1: the egress hook passes a packet of a flow it passed within the last
 * second, that came through an enforced endpoint's device, with one lookup
 * in netpol_bypass_v1 (bpf/lib/bypass.h); 0: it judges every packet. */
volatile const __u32 cfg_local_bypass = 0;
/* NP_STAGE_*: where the programs stop (benchmarks only; 0 = the whole
 * pipeline). The verifier prunes the stops of other stages. */
volatile const __u32 cfg_stage = 0;

#endif

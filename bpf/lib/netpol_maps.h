/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * netpol_maps.h — every map of the netpol datapath, and the global that
 * anchors the ABI types of netpol_abi.h in BTF. Key and value layouts are
 * netpol_abi.h's; this header only defines objects.
 *
 * Generations
 * -----------
 * A policy state is four maps: ipcache, endpoint table, policy (trie) and
 * exact policy (hash). Each exists in two generations, held by ARRAY_OF_MAPS
 * outer maps with two slots (netpol_ipcache_v1, netpol_endpoints_v1,
 * netpol_policy_v1, netpol_policy_exact_v1). Each slot keeps
 * its inner maps; userspace brings the inactive slot's maps to exactly the new
 * state (writing only the keys that differ) and then flips
 * `netpol_state_v1[0].active`, which each packet reads exactly ONCE. An update
 * of netpol_barrier_v1 (a map-in-map; its updates wait for an RCU grace period)
 * after the flip, completed before the next change writes to the old slot,
 * guarantees no packet still uses that slot while it is rewritten.
 *
 * Sizes
 * -----
 * max_entries of 0 is a placeholder: userspace sizes that map from
 * DatapathSettings before load (src/datapath/kernel.rs, open_skel), and a
 * load that forgot would fail rather than run with some default. The inner
 * map templates (max_entries 1) only let libbpf create the outer maps;
 * userspace creates the real inner maps with the same types, key and value
 * sizes and flags, sized by DatapathSettings. Every other size is structural
 * or fixed here.
 */
#ifndef NETPOL_MAPS_H
#define NETPOL_MAPS_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "netpol_abi.h"

struct np_ipcache_inner {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct np_ipcache_key);
	__type(value, struct np_ipcache_value);
	__uint(max_entries, 1);
};

struct np_endpoints_inner {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct np_endpoint_value);
	__uint(max_entries, 1);
};

struct np_policy_inner {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct np_policy_key);
	__type(value, struct np_policy_value);
	__uint(max_entries, 1);
};

/* Policy entries with every key bit significant (one port, or a protocol
 * without ports): an exact-match hash beside the trie, which then holds only
 * the prefixes (port ranges, any port, any protocol). A hash hit is the
 * longest match there can be, so a lookup tries the hash, then the trie. */
struct np_policy_exact_inner {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct np_policy_key);
	__type(value, struct np_policy_value);
	__uint(max_entries, 1);
};

struct np_barrier_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct np_state);
	__uint(max_entries, 1);
} netpol_state_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__type(key, __u32);
	__uint(max_entries, 2);
	__array(values, struct np_ipcache_inner);
} netpol_ipcache_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__type(key, __u32);
	__uint(max_entries, 2);
	__array(values, struct np_endpoints_inner);
} netpol_endpoints_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__type(key, __u32);
	__uint(max_entries, 2);
	__array(values, struct np_policy_inner);
} netpol_policy_v1 SEC(".maps");

/* Layout 3: the full-prefix policy entries of each generation (an empty
 * slot, as a layout-2 instance left it, means the trie holds them all). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__type(key, __u32);
	__uint(max_entries, 2);
	__array(values, struct np_policy_exact_inner);
} netpol_policy_exact_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__type(key, __u32);
	__uint(max_entries, 1);
	__array(values, struct np_barrier_inner);
} netpol_barrier_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct np_ct_key);
	__type(value, struct np_ct_value);
	__uint(max_entries, 0); /* sized by userspace: ct_max_entries */
} netpol_ct_v2 SEC(".maps");

/* The second hook's cache of flows it passed (netpol_abi.h, struct
 * np_bypass_entry): per CPU, so an entry is never read half written. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct np_bypass_entry);
	__uint(max_entries, NP_BYPASS_SLOTS);
} netpol_bypass_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct np_frag_key);
	__type(value, struct np_frag_value);
	__uint(max_entries, 8192);
} netpol_frag_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct np_failsafe_key);
	__type(value, __u32);
	__uint(max_entries, 256);
} netpol_failsafe_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct np_counters);
	__uint(max_entries, 0); /* sized by userspace: endpoint_max_entries (by slot) */
} netpol_counters_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} netpol_events_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct np_ratelimit);
	__uint(max_entries, 1);
} netpol_ratelimit_v1 SEC(".maps");

/* The DNS proxy redirect (dnsredirect.h); layouts in netpol_abi.h. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct np_dns_proxy);
	__uint(max_entries, 1);
} netpol_dns_proxy_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct np_dns_redirect_key);
	__type(value, struct np_dns_redirect_value);
	__uint(max_entries, 16384);
} netpol_dns_redirect_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct np_dns_stats);
	__uint(max_entries, 1);
} netpol_dns_stats_v1 SEC(".maps");

/*
 * BTF only carries types reachable from globals; map definitions reference
 * keys by pointer, which leaves bare forward declarations, and enums are
 * never the type of anything. This never-read global anchors the complete
 * layout of every key and value and every enum of netpol_abi.h, so libbpf can
 * size inner maps and the Rust skeleton generates every struct and enum.
 */
struct np_abi {
	struct np_state state;
	struct np_ipcache_key ipcache_key;
	struct np_ipcache_value ipcache_value;
	struct np_endpoint_value endpoint_value;
	struct np_policy_key policy_key;
	struct np_policy_value policy_value;
	struct np_ct_key ct_key;
	struct np_ct_value ct_value;
	struct np_ct_v1_key ct_v1_key;
	struct np_ct_v1_value ct_v1_value;
	struct np_bypass_entry bypass_entry;
	struct np_frag_key frag_key;
	struct np_frag_value frag_value;
	struct np_failsafe_key failsafe_key;
	struct np_counters counters;
	struct np_event event;
	struct np_ratelimit ratelimit;
	enum np_layout layout;
	enum np_family family;
	enum np_hook hook;
	enum np_direction direction;
	enum np_verdict verdict;
	enum np_none none;
	enum np_action action;
	enum np_ipcache_prefix ipcache_prefix;
	enum np_endpoint_flags endpoint_flags;
	enum np_policy_prefix policy_prefix;
	enum np_ct_state ct_state;
	enum np_ct_flags ct_flags;
	enum np_event_verdict event_verdict;
	enum np_reason reason;
	enum np_stage stage;
	struct np_dns_proxy dns_proxy;
	struct np_dns_redirect_key dns_redirect_key;
	struct np_dns_redirect_value dns_redirect_value;
	struct np_dns_stats dns_stats;
	enum np_dns_flags dns_flags;
	enum np_bypass_size bypass_size;
};

struct np_abi np_abi_anchor;

#endif /* NETPOL_MAPS_H */

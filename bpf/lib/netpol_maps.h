/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * netpol_maps.h — the ONE definition of every map key and value layout of the
 * netpol datapath, and of the maps themselves. Rust gets these layouts from the
 * libbpf-cargo skeleton's generated `types` module (src/datapath/skel.rs asserts
 * their sizes); nothing is mirrored by hand.
 *
 * Map layout is ABI: maps are pinned and outlive the daemon. Every struct has
 * explicit padding (no implicit holes), names carry a layout version (`_v1`),
 * and a retired field stays as `reserved`. NETPOL_LAYOUT_VERSION is stored in
 * the state map so an adopting daemon can refuse an unknown layout.
 *
 * Generations
 * -----------
 * A policy state is three maps: ipcache, endpoint table, policy. Each exists in
 * two generations, held by ARRAY_OF_MAPS outer maps with two slots
 * (netpol_ipcache_v1, netpol_endpoints_v1, netpol_policy_v1). Userspace creates
 * fresh inner maps, fills them completely, stores them in the inactive slot and
 * then flips `netpol_state_v1[0].active`, which each packet reads exactly ONCE.
 * An update of netpol_barrier_v1 (a map-in-map; its updates wait for an RCU
 * grace period) after the flip guarantees no packet still uses the old slot
 * before the next change reuses it.
 */
#ifndef NETPOL_MAPS_H
#define NETPOL_MAPS_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define NETPOL_LAYOUT_VERSION 1

/* Address families as carried in keys (not AF_* values: one byte each). */
#define NP_FAMILY_V4 4
#define NP_FAMILY_V6 6

/* Hook a program runs at on its device. */
#define NP_HOOK_INGRESS 0 /* tc/tcx ingress: packets the device receives */
#define NP_HOOK_EGRESS 1  /* tc/tcx egress: packets the device sends */

/* Policy directions, as in Rust's `Direction`. */
#define NP_DIR_INGRESS 0
#define NP_DIR_EGRESS 1

/* Entry verdicts, as in Rust's `EntryVerdict`. */
#define NP_VERDICT_ALLOW 1
#define NP_VERDICT_DENY 2

#define NP_RULE_NONE 0xffffffffu
#define NP_SLOT_NONE 0xffffffffu

/* ------------------------------------------------------------------------
 * State: netpol_state_v1, ARRAY of 1.
 * `active` (0 or 1) selects the slot of every outer map; `generation` is the
 * daemon's generation counter (informational for the datapath).
 */
struct np_state {
	__u32 active;
	__u32 layout_version;
	__u64 generation;
};

/* ------------------------------------------------------------------------
 * ipcache: LPM trie, v4 and v6 in one trie.
 *
 *   | prefixlen (u32, host order) | family u8 | pad[3] | addr[16] |
 *
 * prefixlen counts bits after the prefixlen field: 32 (family + pad, always
 * matched) + the address prefix length. IPv4 addresses occupy addr[0..4] in
 * network order. A miss means world (`world_identity_v4/_v6`).
 */
struct np_ipcache_key {
	__u32 prefixlen;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

struct np_ipcache_value {
	__u32 identity;
	/* Slot of the endpoint owning exactly this address (anti-spoofing),
	 * NP_SLOT_NONE if none. */
	__u32 endpoint;
};

#define NP_IPCACHE_STATIC_PREFIX 32

/* ------------------------------------------------------------------------
 * Endpoint table: HASH ifindex (u32) -> endpoint.
 */
#define NP_EP_F_HOST 0x1        /* HostEndpoint: hooks map the other way round */
#define NP_EP_F_DENY_INGRESS 0x2 /* default deny in the ingress direction */
#define NP_EP_F_DENY_EGRESS 0x4  /* default deny in the egress direction */
#define NP_EP_F_AUDIT 0x8        /* would-be drops pass and are reported */

struct np_endpoint_value {
	__u32 slot;
	__u32 identity;
	__u32 flags;
	__u32 reserved;
};

/* ------------------------------------------------------------------------
 * Policy: LPM trie, one per generation, all endpoints.
 *
 *   | prefixlen (u32) | slot u32 | identity u32 | direction u8 | proto u8 | port be16 |
 *
 * prefixlen counts bits after the prefixlen field (96 in all):
 *   72            slot + identity + direction: any protocol, any port
 *   80            + protocol: any port of that protocol
 *   80 + n        + the first n bits of the port (port ranges, n = 1..16)
 * For ICMP/ICMPv6 the port is the ICMP type. identity 0 = any identity: a
 * separate key, never a wildcarded prefix.
 *
 * Lookup precedence for a new flow at endpoint E, direction D, remote identity
 * R, protocol P, port N (THE CONTRACT shared with src/policy/lookup.rs):
 *   L1 = longest match of (E, R, D, P, N), L2 = longest match of (E, 0, D, P, N)
 *   1. L1 is Deny -> drop, reported with L1's rule
 *   2. L2 is Deny -> drop, reported with L2's rule
 *   3. L1 is Allow -> pass (L1's rule); else L2 is Allow -> pass (L2's rule)
 *   4. neither: drop "default deny" if E is default-deny in D, else pass
 * An audit endpoint passes would-be drops and reports them as audit.
 * Deny precedence within one identity is resolved by the compiler.
 */
struct np_policy_key {
	__u32 prefixlen;
	__u32 slot;
	__u32 identity;
	__u8 direction;
	__u8 proto;
	__be16 port;
};

#define NP_POLICY_STATIC_PREFIX 72
#define NP_POLICY_FULL_PREFIX 96

struct np_policy_value {
	__u8 verdict;   /* NP_VERDICT_* */
	__u8 reserved0;
	__u16 reserved1;
	__u32 rule;     /* index into Compiled.rules */
};

/* ------------------------------------------------------------------------
 * Conntrack: LRU hash, global (not per generation).
 *
 * A flow is tracked per enforcement point: (ifindex, hook of its first packet)
 * plus its tuple in the direction of its first packet. A flow crossing two
 * enforced endpoints on one host (A's device, then B's) has one entry at each
 * and is judged at both. A packet is:
 *   established  if (ifindex, hook, src, dst, sport, dport, proto) exists;
 *   reply        if (ifindex, other hook, dst, src, dport, sport, proto) exists;
 *   related      if it is an ICMP error whose inner tuple is either of them.
 * ICMP echo uses the identifier as both ports. Ports in host order.
 */
struct np_ct_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u32 ifindex;
	__u8 proto;
	__u8 family;
	__u8 hook;
	__u8 pad;
};

#define NP_CT_SEEN_SYN 0x1     /* a SYN from the originator */
#define NP_CT_SEEN_REPLY 0x2   /* any packet back from the responder */
#define NP_CT_CLOSING 0x4      /* FIN or RST seen */

struct np_ct_value {
	__u64 expires_ns;
	__u32 rule;      /* rule that allowed the first packet */
	__u8 state;      /* NP_CT_* */
	__u8 pad[3];
};

/* ------------------------------------------------------------------------
 * Fragments: LRU hash keyed by the first fragment's (src, dst, id, proto);
 * value its L4 ports, so non-first fragments are judged with the same ports.
 * A non-first fragment with no entry is dropped.
 */
struct np_frag_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 id;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

struct np_frag_value {
	__u16 sport;
	__u16 dport;
	__u16 policy_port; /* dport, or the ICMP type */
	__u16 pad;
};

/* ------------------------------------------------------------------------
 * Failsafe: HASH (direction, proto, port) -> 1, for host endpoints only.
 */
struct np_failsafe_key {
	__u8 direction;
	__u8 proto;
	__u16 port; /* host order */
};

/* ------------------------------------------------------------------------
 * Counters: PERCPU_ARRAY indexed by endpoint slot.
 */
struct np_counters {
	__u64 allowed;
	__u64 denied_policy;
	__u64 denied_default;
	__u64 denied_spoof;
	__u64 denied_other;
	__u64 audit;
};

/* ------------------------------------------------------------------------
 * Verdict events: RINGBUF of struct np_event. Rate limit: PERCPU_ARRAY of 1
 * struct np_ratelimit.
 */
#define NP_EV_ALLOWED 0
#define NP_EV_DENIED 1
#define NP_EV_AUDIT 2

#define NP_REASON_POLICY_ALLOW 0
#define NP_REASON_POLICY_DENY 1
#define NP_REASON_DEFAULT_DENY 2
#define NP_REASON_SPOOFED 3
#define NP_REASON_FRAGMENT 4
#define NP_REASON_MALFORMED 5

struct np_event {
	__u64 ts_ns;
	__u32 ifindex;
	__u32 slot;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 rule;
	__u16 sport;
	__u16 dport;
	__u8 direction;
	__u8 verdict; /* NP_EV_* */
	__u8 reason;  /* NP_REASON_* */
	__u8 proto;
	__u8 family;
	__u8 pad[3];
	__u8 saddr[16];
	__u8 daddr[16];
};

struct np_ratelimit {
	__u64 window_start_ns;
	__u32 count;
	__u32 sample;
};

/* ------------------------------------------------------------------------
 * The maps. max_entries marked (settings) are set from DatapathSettings
 * before load; inner maps are created by userspace with the same key and
 * value sizes and flags as these templates.
 */
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
	__uint(max_entries, 65536); /* (settings) */
} netpol_ct_v1 SEC(".maps");

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
	__uint(max_entries, 1024); /* (settings: endpoint_max_entries) */
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

/*
 * BTF only carries types reachable from globals; map definitions reference
 * keys by pointer, which leaves bare forward declarations. This never-read
 * global anchors the complete layout of every key and value so libbpf can
 * size inner maps and the Rust skeleton generates every struct.
 */
struct np_layouts {
	struct np_state state;
	struct np_ipcache_key ipcache_key;
	struct np_ipcache_value ipcache_value;
	struct np_endpoint_value endpoint_value;
	struct np_policy_key policy_key;
	struct np_policy_value policy_value;
	struct np_ct_key ct_key;
	struct np_ct_value ct_value;
	struct np_frag_key frag_key;
	struct np_frag_value frag_value;
	struct np_failsafe_key failsafe_key;
	struct np_counters counters;
	struct np_event event;
	struct np_ratelimit ratelimit;
};

struct np_layouts np_layouts_anchor;

#endif /* NETPOL_MAPS_H */

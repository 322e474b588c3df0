/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * netpol_abi.h — the ONE definition of everything the datapath shares with
 * userspace: every map key and value layout, the verdict event, and the
 * constants that go into them (layout version, families, hooks, directions,
 * verdicts, flags, event codes and reasons, program results). Types only; the
 * maps themselves are defined in netpol_maps.h.
 *
 * Rust takes all of it from the libbpf-cargo skeleton's generated `types`
 * module (src/datapath/skel.rs): each struct as a #[repr(C)] type, each enum
 * as a newtype over its underlying integer with one associated constant per
 * enumerator (`types::np_family::NP_FAMILY_V4.0`). Nothing is mirrored by
 * hand. The skeleton only knows types that BTF carries, and BTF only carries
 * types reachable from a global: struct np_abi in netpol_maps.h anchors every
 * struct and enum of this header, so a new one must be added there.
 *
 * Map layout is ABI: maps are pinned and outlive the daemon. Every struct has
 * explicit padding (no implicit holes), map names carry a layout version
 * (`_v1`), and a retired field stays as `reserved`. NP_LAYOUT_VERSION is
 * stored in the state map so an adopting daemon can refuse an unknown layout.
 * Sizes and offsets are asserted beside each struct (and the sizes again on
 * the Rust side, src/datapath/layout.rs).
 *
 * Fields keep fixed widths (__u8, __u32, ...), never an enum type. An enum
 * whose values go into a field has that field's width as its underlying type
 * (`enum np_family : __u8`, C23 syntax that clang accepts in every C mode), so
 * the generated Rust newtype wraps exactly the field's integer type;
 * NP_ABI_WIDTH asserts the pairing.
 */
#ifndef NETPOL_ABI_H
#define NETPOL_ABI_H

#include <linux/types.h>

#define NP_ABI_SIZE(type, size) _Static_assert(sizeof(type) == (size), #type " is " #size " bytes")
#define NP_ABI_OFFSET(type, field, off)                                                            \
	_Static_assert(__builtin_offsetof(type, field) == (off), #type "." #field " is at " #off)
#define NP_ABI_WIDTH(type, field, enumtype)                                                        \
	_Static_assert(sizeof(((type *)0)->field) == sizeof(enumtype),                             \
		       #type "." #field " holds " #enumtype)

/* Layout version of the maps, stored in netpol_state_v1. 2: conntrack is
 * netpol_ct_v2 (one entry per flow under a normalised key, with the verdict's
 * generation); an adopting daemon migrates the entries of a version 1
 * instance's netpol_ct_v1 (src/datapath/kernel.rs). 3: the full-prefix
 * policy entries move to netpol_policy_exact_v1. */
enum np_layout : __u32 {
	NP_LAYOUT_VERSION = 3,
	/* Layout 2: every policy entry in the trie, no netpol_policy_exact_v1
	 * (adopted as it is: an empty exact slot means the trie has them all). */
	NP_LAYOUT_VERSION_POLICY_TRIE = 2,
	NP_LAYOUT_VERSION_CT_V1 = 1,
};

/* Address families as carried in keys and events: the IP version, one byte
 * (not AF_*). */
enum np_family : __u8 {
	NP_FAMILY_V4 = 4,
	NP_FAMILY_V6 = 6,
};

/* Hook a program runs at on its device. */
enum np_hook : __u8 {
	NP_HOOK_INGRESS = 0, /* tc/tcx ingress: packets the device receives */
	NP_HOOK_EGRESS = 1,  /* tc/tcx egress: packets the device sends */
};
/* The conntrack code finds a flow's other hook as `hook ^ 1`. */
_Static_assert((NP_HOOK_INGRESS ^ 1) == NP_HOOK_EGRESS, "hooks are 0 and 1");

/* Policy directions (of the endpoint whose policy applies). */
enum np_direction : __u8 {
	NP_DIR_INGRESS = 0,
	NP_DIR_EGRESS = 1,
};

/* Verdict of a policy entry. The last three come only from staged policies
 * (docs/policy.md, "Staged policies"): what they would deny passes as audit. */
enum np_verdict : __u8 {
	NP_VERDICT_ALLOW = 1,
	NP_VERDICT_DENY = 2,
	/* a staged deny, and no enforced allow of this identity */
	NP_VERDICT_STAGED_DENY = 3,
	/* an enforced allow and a staged deny */
	NP_VERDICT_ALLOW_STAGED_DENY = 4,
	/* identity 0, any protocol only: a staged policy's default deny */
	NP_VERDICT_STAGED_DEFAULT = 5,
};

/* "No rule" / "no endpoint" in a rule index or endpoint slot. In an ipcache
 * value, NP_SLOT_ELSEWHERE marks an endpoint's address whose endpoint is not
 * attached here (remote, or not attached yet): it is no slot, yet anti-spoofing
 * still refuses it as a source, like any other endpoint's address. */
enum np_none : __u32 {
	NP_RULE_NONE = 0xffffffffu,
	NP_SLOT_NONE = 0xffffffffu,
	NP_SLOT_ELSEWHERE = 0xfffffffeu,
};

/* Where the programs stop (load-time setting cfg_stage, config `[datapath]
 * stage`; benchmarks only): anything but NP_STAGE_FULL passes every packet
 * after the named step and enforces NOTHING. The floor of the per-packet
 * cost, step by step (docs/benchmarks.md, "Where the time goes"). */
enum np_stage : __u32 {
	NP_STAGE_FULL = 0,      /* the whole pipeline: enforcing */
	NP_STAGE_ENTRY = 1,     /* return at entry: a no-op tcx program */
	NP_STAGE_ENDPOINT = 2,  /* after the generation and endpoint lookup */
	NP_STAGE_PARSE = 3,     /* after parsing */
	NP_STAGE_IPCACHE = 4,   /* after the ipcache lookups (anti-spoofing, remote) */
	NP_STAGE_CONNTRACK = 5, /* after conntrack (a new flow gets its entry) */
};

/* What a program returns. */
enum np_action {
	NP_PASS = -1, /* TCX_NEXT / TC_ACT_UNSPEC: let later programs decide */
	NP_DROP = 2,  /* TCX_DROP / TC_ACT_SHOT */
};

/* ------------------------------------------------------------------------
 * State: netpol_state_v1, ARRAY of 1.
 * `active` (0 or 1) selects the slot of every outer map; `generation` is the
 * daemon's generation counter (informational for the datapath).
 */
struct np_state {
	__u32 active;
	__u32 layout_version; /* NP_LAYOUT_VERSION */
	__u64 generation;
};
NP_ABI_SIZE(struct np_state, 16);
NP_ABI_OFFSET(struct np_state, active, 0);
NP_ABI_OFFSET(struct np_state, layout_version, 4);
NP_ABI_OFFSET(struct np_state, generation, 8);
NP_ABI_WIDTH(struct np_state, layout_version, enum np_layout);

/* ------------------------------------------------------------------------
 * ipcache: LPM trie, v4 and v6 in one trie.
 *
 *   | prefixlen (u32, host order) | family u8 | pad[3] | addr[16] |
 *
 * prefixlen counts bits after the prefixlen field: 32 (family + pad, always
 * matched) + the address prefix length. IPv4 addresses occupy addr[0..4] in
 * network order. A miss means world (`cfg_world_identity`).
 */
struct np_ipcache_key {
	__u32 prefixlen;
	__u8 family; /* NP_FAMILY_* */
	__u8 pad[3];
	__u8 addr[16];
};
NP_ABI_SIZE(struct np_ipcache_key, 24);
NP_ABI_OFFSET(struct np_ipcache_key, prefixlen, 0);
NP_ABI_OFFSET(struct np_ipcache_key, family, 4);
NP_ABI_OFFSET(struct np_ipcache_key, pad, 5);
NP_ABI_OFFSET(struct np_ipcache_key, addr, 8);
NP_ABI_WIDTH(struct np_ipcache_key, family, enum np_family);

/* Bits of the ipcache key always matched (family + padding). */
enum np_ipcache_prefix : __u32 {
	NP_IPCACHE_STATIC_PREFIX = 32,
};
_Static_assert(NP_IPCACHE_STATIC_PREFIX == 8 * (__builtin_offsetof(struct np_ipcache_key, addr) -
						 sizeof(__u32)),
	       "the static ipcache prefix covers family and pad");

struct np_ipcache_value {
	__u32 identity;
	/* Slot of the endpoint owning exactly this address (anti-spoofing),
	 * NP_SLOT_NONE if none. */
	__u32 endpoint;
};
NP_ABI_SIZE(struct np_ipcache_value, 8);
NP_ABI_OFFSET(struct np_ipcache_value, identity, 0);
NP_ABI_OFFSET(struct np_ipcache_value, endpoint, 4);

/* ------------------------------------------------------------------------
 * Endpoint table: HASH ifindex (u32) -> endpoint.
 */
enum np_endpoint_flags : __u32 {
	NP_EP_F_HOST = 0x1,         /* HostEndpoint: hooks map the other way round */
	NP_EP_F_DENY_INGRESS = 0x2, /* default deny in the ingress direction */
	NP_EP_F_DENY_EGRESS = 0x4,  /* default deny in the egress direction */
	NP_EP_F_AUDIT = 0x8,        /* would-be drops pass and are reported */
};

struct np_endpoint_value {
	__u32 slot;
	__u32 identity;
	__u32 flags; /* NP_EP_F_* */
	/* Low 32 bits of the generation number of the maps this value is in
	 * (layout 1: reserved, 0). A packet reads it from the endpoint table of
	 * the generation it uses, so the number it caches in a conntrack entry
	 * always belongs to the maps that decided (np_state is copied as a whole
	 * and a reader could pair its new `generation` with the old `active`). */
	__u32 generation;
};
NP_ABI_SIZE(struct np_endpoint_value, 16);
NP_ABI_OFFSET(struct np_endpoint_value, slot, 0);
NP_ABI_OFFSET(struct np_endpoint_value, identity, 4);
NP_ABI_OFFSET(struct np_endpoint_value, flags, 8);
NP_ABI_OFFSET(struct np_endpoint_value, generation, 12);
NP_ABI_WIDTH(struct np_endpoint_value, flags, enum np_endpoint_flags);

/* ------------------------------------------------------------------------
 * Policy: one per generation, all endpoints, in two maps: the entries whose
 * prefixlen is 96 (every bit significant: one port, or ICMP type) in an
 * exact-match hash (netpol_policy_exact_v1), the others in an LPM trie
 * (netpol_policy_v1). A lookup tries the hash first: a hit there is the
 * longest match; else the trie gives it. Same key layout in both.
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
 *   3. L1 (else L2) is StagedDeny or AllowStagedDeny: if L1 or L2 is Allow or
 *      AllowStagedDeny, or E is not default-deny in D -> pass as audit with
 *      its rule (staged deny); else drop "default deny"
 *   4. L1 is Allow -> pass (L1's rule); else L2 is Allow -> pass (L2's rule)
 *   5. L1 (else L2) is StagedDefault and E is not default-deny in D -> pass
 *      as audit with its rule (staged default deny)
 *   6. otherwise: drop "default deny" if E is default-deny in D, else pass
 * An audit endpoint passes would-be drops and reports them as audit.
 * Deny precedence within one identity is resolved by the compiler, and so is
 * the fold of staged entries into these verdicts.
 */
struct np_policy_key {
	__u32 prefixlen;
	__u32 slot;
	__u32 identity;
	__u8 direction; /* NP_DIR_* */
	__u8 proto;
	__be16 port;
};
NP_ABI_SIZE(struct np_policy_key, 16);
NP_ABI_OFFSET(struct np_policy_key, prefixlen, 0);
NP_ABI_OFFSET(struct np_policy_key, slot, 4);
NP_ABI_OFFSET(struct np_policy_key, identity, 8);
NP_ABI_OFFSET(struct np_policy_key, direction, 12);
NP_ABI_OFFSET(struct np_policy_key, proto, 13);
NP_ABI_OFFSET(struct np_policy_key, port, 14);
NP_ABI_WIDTH(struct np_policy_key, direction, enum np_direction);

/* Bits of the policy key always matched (slot + identity + direction), and
 * all of its bits (+ protocol + port). */
enum np_policy_prefix : __u32 {
	NP_POLICY_STATIC_PREFIX = 72,
	NP_POLICY_FULL_PREFIX = 96,
};
_Static_assert(NP_POLICY_STATIC_PREFIX ==
		       8 * (__builtin_offsetof(struct np_policy_key, proto) - sizeof(__u32)),
	       "the static policy prefix ends before the protocol");
_Static_assert(NP_POLICY_FULL_PREFIX == 8 * (sizeof(struct np_policy_key) - sizeof(__u32)),
	       "the full policy prefix covers the whole key");

struct np_policy_value {
	__u8 verdict; /* NP_VERDICT_* */
	__u8 reserved0;
	__u16 reserved1;
	__u32 rule; /* index into Compiled.rules */
};
NP_ABI_SIZE(struct np_policy_value, 8);
NP_ABI_OFFSET(struct np_policy_value, verdict, 0);
NP_ABI_OFFSET(struct np_policy_value, reserved0, 1);
NP_ABI_OFFSET(struct np_policy_value, reserved1, 2);
NP_ABI_OFFSET(struct np_policy_value, rule, 4);
NP_ABI_WIDTH(struct np_policy_value, verdict, enum np_verdict);

/* ------------------------------------------------------------------------
 * Conntrack: netpol_ct_v2, LRU hash, global (not per generation).
 *
 * A flow is tracked per enforcement point (ifindex), under ONE key for both
 * directions: its two ends (address, port) in a fixed order — side a is the
 * lower (address words, then port), side b the other — so a packet and its
 * reply find the same entry with one lookup. The value says which side
 * originated the flow and at which hook its first packet was seen. A flow
 * crossing two enforced endpoints on one host (A's device, then B's) has one
 * entry at each and is judged at both. A packet at (ifindex, hook) from side
 * S whose entry exists is:
 *   established  if S originated the flow and hook is the first packet's hook;
 *   reply        if S is the responder and hook is the other one;
 *   new          otherwise (the same tuple the other way through one device);
 *   related      if it is an ICMP error addressed to the quoted packet's
 *                source whose quoted tuple is an established or reply
 *                packet of a flow at this point, seen from this hook.
 * ICMP echo uses the identifier as both ports. Ports in host order.
 *
 * The verdict is cached: `generation` is the generation (low 32 bits, from
 * the endpoint table, struct np_endpoint_value) whose maps allowed the flow.
 * While it is the packet's generation, an established packet passes without
 * anti-spoofing, ipcache or policy lookups. After a flip, under `recheck`
 * the next packet is judged again (and refreshes it if allowed); under
 * `keep` it is checked for spoofing only. Entries decided as audit
 * (NP_CT_F_AUDIT) are judged on every packet under `recheck`, as before.
 */
struct np_ct_key {
	__u8 addr_a[16];
	__u8 addr_b[16];
	__u16 port_a;
	__u16 port_b;
	__u32 ifindex;
	__u8 proto;
	__u8 family; /* NP_FAMILY_* */
	__u16 pad;
};
NP_ABI_SIZE(struct np_ct_key, 44);
NP_ABI_OFFSET(struct np_ct_key, addr_a, 0);
NP_ABI_OFFSET(struct np_ct_key, addr_b, 16);
NP_ABI_OFFSET(struct np_ct_key, port_a, 32);
NP_ABI_OFFSET(struct np_ct_key, port_b, 34);
NP_ABI_OFFSET(struct np_ct_key, ifindex, 36);
NP_ABI_OFFSET(struct np_ct_key, proto, 40);
NP_ABI_OFFSET(struct np_ct_key, family, 41);
NP_ABI_OFFSET(struct np_ct_key, pad, 42);
NP_ABI_WIDTH(struct np_ct_key, family, enum np_family);

enum np_ct_state : __u8 {
	NP_CT_SEEN_SYN = 0x1,   /* a SYN from the originator */
	NP_CT_SEEN_REPLY = 0x2, /* any packet back from the responder */
	NP_CT_CLOSING = 0x4,    /* FIN or RST seen */
};

enum np_ct_flags : __u8 {
	NP_CT_F_ORIG_B = 0x1, /* side b originated the flow */
	NP_CT_F_AUDIT = 0x2,  /* decided as audit: judged again on every packet */
};

struct np_ct_value {
	__u64 expires_ns; /* bpf_ktime_get_coarse_ns() clock */
	__u32 rule;       /* rule that allowed the flow (NP_RULE_NONE: none) */
	__u32 generation; /* the generation whose maps allowed it (low 32 bits) */
	/* The generation under which the responder's source address passed
	 * anti-spoofing, when the responder is the workload of this device
	 * (replies leaving a workload are checked once per generation). */
	__u32 reply_generation;
	__u8 state; /* NP_CT_SEEN_*, NP_CT_CLOSING */
	__u8 flags; /* NP_CT_F_* */
	__u8 hook;  /* NP_HOOK_* of the originator's packets */
	__u8 pad;
};
NP_ABI_SIZE(struct np_ct_value, 24);
NP_ABI_OFFSET(struct np_ct_value, expires_ns, 0);
NP_ABI_OFFSET(struct np_ct_value, rule, 8);
NP_ABI_OFFSET(struct np_ct_value, generation, 12);
NP_ABI_OFFSET(struct np_ct_value, reply_generation, 16);
NP_ABI_OFFSET(struct np_ct_value, state, 20);
NP_ABI_OFFSET(struct np_ct_value, flags, 21);
NP_ABI_OFFSET(struct np_ct_value, hook, 22);
NP_ABI_OFFSET(struct np_ct_value, pad, 23);
NP_ABI_WIDTH(struct np_ct_value, state, enum np_ct_state);
NP_ABI_WIDTH(struct np_ct_value, flags, enum np_ct_flags);
NP_ABI_WIDTH(struct np_ct_value, hook, enum np_hook);

/* ------------------------------------------------------------------------
 * Local bypass: netpol_bypass_v1, PERCPU_ARRAY of NP_BYPASS_SLOTS entries,
 * direct-mapped by a hash of the tuple (bpf/lib/bypass.h). An entry says: a
 * packet of exactly this tuple, received on the enforced endpoint device
 * `in_ifindex` and sent through `out_ifindex`, passed the egress hook's whole
 * program under `generation` (its conntrack entry established or a reply,
 * not audited, not closing), and the same packet there passes again without
 * a lookup until `until_ns` (coarse clock). Written only by the egress
 * program after that full judgement; nothing a workload or another user of
 * the host sets is read: the "carrier" is the packet's own tuple and the
 * kernel's record of the device it arrived on (skb->ingress_ifindex, set on
 * receive), checked against this entry (bpf/README.md, "Both ends local").
 * A collision only overwrites: that flow is judged in full again. Not
 * migrated: a cache; a new load or an empty entry means the full program.
 */
enum np_bypass_size : __u32 {
	NP_BYPASS_SLOTS = 4096, /* per CPU; a power of two */
};

struct np_bypass_entry {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport; /* host order; as struct np_pkt */
	__u16 dport;
	__u8 proto;
	__u8 family; /* NP_FAMILY_*; 0: empty */
	__u16 pad;
	__u32 in_ifindex;  /* skb->ingress_ifindex: an enforced endpoint's device */
	__u32 out_ifindex; /* the device whose egress hook passed it */
	__u32 generation;  /* the generation that judged it (low 32 bits) */
	__u32 slot;        /* the egress device's endpoint slot (its counters) */
	__u64 until_ns;    /* bpf_ktime_get_coarse_ns() clock */
};
NP_ABI_SIZE(struct np_bypass_entry, 64);
NP_ABI_OFFSET(struct np_bypass_entry, saddr, 0);
NP_ABI_OFFSET(struct np_bypass_entry, daddr, 16);
NP_ABI_OFFSET(struct np_bypass_entry, sport, 32);
NP_ABI_OFFSET(struct np_bypass_entry, dport, 34);
NP_ABI_OFFSET(struct np_bypass_entry, proto, 36);
NP_ABI_OFFSET(struct np_bypass_entry, family, 37);
NP_ABI_OFFSET(struct np_bypass_entry, pad, 38);
NP_ABI_OFFSET(struct np_bypass_entry, in_ifindex, 40);
NP_ABI_OFFSET(struct np_bypass_entry, out_ifindex, 44);
NP_ABI_OFFSET(struct np_bypass_entry, generation, 48);
NP_ABI_OFFSET(struct np_bypass_entry, slot, 52);
NP_ABI_OFFSET(struct np_bypass_entry, until_ns, 56);
_Static_assert((NP_BYPASS_SLOTS & (NP_BYPASS_SLOTS - 1)) == 0, "bypass slots: a power of two");

/* Layout 1's conntrack (netpol_ct_v1), read only to migrate its entries:
 * one entry per flow under its first packet's (ifindex, hook, tuple). */
struct np_ct_v1_key {
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
NP_ABI_SIZE(struct np_ct_v1_key, 44);
NP_ABI_OFFSET(struct np_ct_v1_key, sport, 32);
NP_ABI_OFFSET(struct np_ct_v1_key, ifindex, 36);
NP_ABI_OFFSET(struct np_ct_v1_key, hook, 42);

struct np_ct_v1_value {
	__u64 expires_ns; /* bpf_ktime_get_ns() clock */
	__u32 rule;
	__u8 state;
	__u8 pad[3];
};
NP_ABI_SIZE(struct np_ct_v1_value, 16);
NP_ABI_OFFSET(struct np_ct_v1_value, rule, 8);
NP_ABI_OFFSET(struct np_ct_v1_value, state, 12);

/* ------------------------------------------------------------------------
 * Fragments: LRU hash keyed by the first fragment's (src, dst, id, proto),
 * where proto is the protocol field every fragment of the datagram carries
 * (IPv4: the protocol; IPv6: the fragment header's next header, which may be
 * an extension header); value its L4 protocol and ports, so non-first
 * fragments are judged as the first one. A non-first fragment with no entry
 * is dropped.
 */
struct np_frag_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 id;
	__u8 proto;
	__u8 family; /* NP_FAMILY_* */
	__u16 pad;
};
NP_ABI_SIZE(struct np_frag_key, 40);
NP_ABI_OFFSET(struct np_frag_key, saddr, 0);
NP_ABI_OFFSET(struct np_frag_key, daddr, 16);
NP_ABI_OFFSET(struct np_frag_key, id, 32);
NP_ABI_OFFSET(struct np_frag_key, proto, 36);
NP_ABI_OFFSET(struct np_frag_key, family, 37);
NP_ABI_OFFSET(struct np_frag_key, pad, 38);
NP_ABI_WIDTH(struct np_frag_key, family, enum np_family);

struct np_frag_value {
	__u16 sport;
	__u16 dport;
	__u16 policy_port; /* dport, or the ICMP type */
	__u8 proto;        /* the L4 protocol (0 = entry of layout 1: the key's) */
	__u8 pad;
};
NP_ABI_SIZE(struct np_frag_value, 8);
NP_ABI_OFFSET(struct np_frag_value, sport, 0);
NP_ABI_OFFSET(struct np_frag_value, dport, 2);
NP_ABI_OFFSET(struct np_frag_value, policy_port, 4);
NP_ABI_OFFSET(struct np_frag_value, proto, 6);
NP_ABI_OFFSET(struct np_frag_value, pad, 7);

/* ------------------------------------------------------------------------
 * Failsafe: HASH (direction, proto, port) -> 1, for host endpoints only.
 */
struct np_failsafe_key {
	__u8 direction; /* NP_DIR_* */
	__u8 proto;
	__u16 port; /* host order */
};
NP_ABI_SIZE(struct np_failsafe_key, 4);
NP_ABI_OFFSET(struct np_failsafe_key, direction, 0);
NP_ABI_OFFSET(struct np_failsafe_key, proto, 1);
NP_ABI_OFFSET(struct np_failsafe_key, port, 2);
NP_ABI_WIDTH(struct np_failsafe_key, direction, enum np_direction);

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
NP_ABI_SIZE(struct np_counters, 48);
NP_ABI_OFFSET(struct np_counters, allowed, 0);
NP_ABI_OFFSET(struct np_counters, denied_policy, 8);
NP_ABI_OFFSET(struct np_counters, denied_default, 16);
NP_ABI_OFFSET(struct np_counters, denied_spoof, 24);
NP_ABI_OFFSET(struct np_counters, denied_other, 32);
NP_ABI_OFFSET(struct np_counters, audit, 40);

/* ------------------------------------------------------------------------
 * Verdict events: RINGBUF of struct np_event. Rate limit: PERCPU_ARRAY of 1
 * struct np_ratelimit.
 */
enum np_event_verdict : __u8 {
	NP_EV_ALLOWED = 0,
	NP_EV_DENIED = 1,
	NP_EV_AUDIT = 2,
};

enum np_reason : __u8 {
	NP_REASON_POLICY_ALLOW = 0,
	NP_REASON_POLICY_DENY = 1,
	NP_REASON_DEFAULT_DENY = 2,
	NP_REASON_SPOOFED = 3,
	NP_REASON_FRAGMENT = 4,
	NP_REASON_MALFORMED = 5,
	/* DNS of an endpoint with DNS rules, and netpold's proxy cannot take it
	 * (dnsredirect.h): dropped, fail closed */
	NP_REASON_DNS_PROXY = 6,
};

struct np_event {
	__u64 ts_ns;
	__u32 ifindex;
	__u32 slot;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 rule;
	__u16 sport;
	__u16 dport;
	__u8 direction; /* NP_DIR_* */
	__u8 verdict;   /* NP_EV_* */
	__u8 reason;    /* NP_REASON_* */
	__u8 proto;
	__u8 family; /* NP_FAMILY_* */
	__u8 pad[3];
	__u8 saddr[16];
	__u8 daddr[16];
};
NP_ABI_SIZE(struct np_event, 72);
NP_ABI_OFFSET(struct np_event, ts_ns, 0);
NP_ABI_OFFSET(struct np_event, ifindex, 8);
NP_ABI_OFFSET(struct np_event, slot, 12);
NP_ABI_OFFSET(struct np_event, src_identity, 16);
NP_ABI_OFFSET(struct np_event, dst_identity, 20);
NP_ABI_OFFSET(struct np_event, rule, 24);
NP_ABI_OFFSET(struct np_event, sport, 28);
NP_ABI_OFFSET(struct np_event, dport, 30);
NP_ABI_OFFSET(struct np_event, direction, 32);
NP_ABI_OFFSET(struct np_event, verdict, 33);
NP_ABI_OFFSET(struct np_event, reason, 34);
NP_ABI_OFFSET(struct np_event, proto, 35);
NP_ABI_OFFSET(struct np_event, family, 36);
NP_ABI_OFFSET(struct np_event, pad, 37);
NP_ABI_OFFSET(struct np_event, saddr, 40);
NP_ABI_OFFSET(struct np_event, daddr, 56);
NP_ABI_WIDTH(struct np_event, direction, enum np_direction);
NP_ABI_WIDTH(struct np_event, verdict, enum np_event_verdict);
NP_ABI_WIDTH(struct np_event, reason, enum np_reason);
NP_ABI_WIDTH(struct np_event, family, enum np_family);

struct np_ratelimit {
	__u64 window_start_ns;
	__u32 count;
	__u32 sample;
};
NP_ABI_SIZE(struct np_ratelimit, 16);
NP_ABI_OFFSET(struct np_ratelimit, window_start_ns, 0);
NP_ABI_OFFSET(struct np_ratelimit, count, 8);
NP_ABI_OFFSET(struct np_ratelimit, sample, 12);

/* ------------------------------------------------------------------------
 * DNS proxy redirect (dnsredirect.h).
 *
 * netpol_dns_proxy_v1: ARRAY of 1, written by netpold when its proxy listens
 * (and 0 in `port` when it stops): the proxy's port on 127.0.0.1 and ::1, the
 * mark its `ip rule` routes locally, and how many redirect entries exist (0:
 * the redirect is skipped without a hash lookup).
 */
struct np_dns_proxy {
	__u32 redirects;
	__u32 mark;
	__u16 port; /* host order; 0 = no proxy: redirected DNS is dropped */
	__u16 pad;
	__u32 reserved;
};
NP_ABI_SIZE(struct np_dns_proxy, 16);
NP_ABI_OFFSET(struct np_dns_proxy, redirects, 0);
NP_ABI_OFFSET(struct np_dns_proxy, mark, 4);
NP_ABI_OFFSET(struct np_dns_proxy, port, 8);
NP_ABI_OFFSET(struct np_dns_proxy, pad, 10);
NP_ABI_OFFSET(struct np_dns_proxy, reserved, 12);

/* netpol_dns_redirect_v1: HASH (ifindex of an endpoint's device, protocol,
 * destination port) -> how to hand its packets to the proxy. */
struct np_dns_redirect_key {
	__u32 ifindex;
	__u16 port; /* host order */
	__u8 proto; /* TCP or UDP */
	__u8 pad;
};
NP_ABI_SIZE(struct np_dns_redirect_key, 8);
NP_ABI_OFFSET(struct np_dns_redirect_key, ifindex, 0);
NP_ABI_OFFSET(struct np_dns_redirect_key, port, 4);
NP_ABI_OFFSET(struct np_dns_redirect_key, proto, 6);
NP_ABI_OFFSET(struct np_dns_redirect_key, pad, 7);

enum np_dns_flags : __u16 {
	/* A bridge port: the frame's destination becomes `mac` (the device's
	 * own address, a local entry of its bridge) so it is passed up. */
	NP_DNS_F_REWRITE_MAC = 0x1,
};

struct np_dns_redirect_value {
	__u8 mac[6];
	__u16 flags; /* NP_DNS_F_* */
};
NP_ABI_SIZE(struct np_dns_redirect_value, 8);
NP_ABI_OFFSET(struct np_dns_redirect_value, mac, 0);
NP_ABI_OFFSET(struct np_dns_redirect_value, flags, 6);
NP_ABI_WIDTH(struct np_dns_redirect_value, flags, enum np_dns_flags);

/* netpol_dns_stats_v1: PERCPU_ARRAY of 1. */
struct np_dns_stats {
	__u64 redirected;       /* packets handed to the proxy */
	__u64 dropped_no_proxy; /* no proxy socket: fail closed */
	__u64 dropped_other;    /* assignment refused, fragment */
};
NP_ABI_SIZE(struct np_dns_stats, 24);
NP_ABI_OFFSET(struct np_dns_stats, redirected, 0);
NP_ABI_OFFSET(struct np_dns_stats, dropped_no_proxy, 8);
NP_ABI_OFFSET(struct np_dns_stats, dropped_other, 16);

#endif /* NETPOL_ABI_H */

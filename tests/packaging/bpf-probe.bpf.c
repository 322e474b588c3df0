// SPDX-License-Identifier: GPL-2.0
// The packaging test's stand-in for netpold's datapath: the map types the
// daemon uses (LPM trie, LRU hash, ring buffer) and a tc program reading them.
// Loaded by bpf-probe.sh *as netpold.service*, to show that the unit's sandbox
// lets BPF work, independent of the daemon.
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

struct lpm_key {
	__u32 prefixlen;
	__u32 addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lpm_key);
	__type(value, __u32);
	__uint(max_entries, 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} probe_lpm SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u64);
	__type(value, __u64);
	__uint(max_entries, 1024);
} probe_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} probe_events SEC(".maps");

SEC("tc")
int probe(struct __sk_buff *skb)
{
	struct lpm_key k = { 32, skb->mark };
	__u64 ck = skb->ifindex, one = 1;
	__u32 val = 7;
	__u32 *id = bpf_map_lookup_elem(&probe_lpm, &k);
	if (id)
		val = *id;
	bpf_map_update_elem(&probe_ct, &ck, &one, BPF_ANY);
	__u32 *ev = bpf_ringbuf_reserve(&probe_events, sizeof(*ev), 0);
	if (ev) {
		*ev = val;
		bpf_ringbuf_submit(ev, 0);
	}
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";

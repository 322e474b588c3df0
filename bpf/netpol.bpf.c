/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * netpol.bpf.c — the entry points. tcx programs (kernel 6.6+) are attached
 * by default; the `tc` twins are for the classic clsact/cls_bpf fallback when
 * tcx attach fails. All logic is in lib/netpol.h.
 */
#include "lib/netpol.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tcx/ingress")
int netpol_tcx_ingress(struct __sk_buff *skb)
{
	return np_handle(skb, NP_HOOK_INGRESS);
}

SEC("tcx/egress")
int netpol_tcx_egress(struct __sk_buff *skb)
{
	return np_handle(skb, NP_HOOK_EGRESS);
}

SEC("tc")
int netpol_tc_ingress(struct __sk_buff *skb)
{
	return np_handle(skb, NP_HOOK_INGRESS);
}

SEC("tc")
int netpol_tc_egress(struct __sk_buff *skb)
{
	return np_handle(skb, NP_HOOK_EGRESS);
}

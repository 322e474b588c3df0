#!/bin/bash
# The seed scenario's four workloads on this host, for trying netpol without
# Kubernetes or containers: each one a network namespace whose eth0 is paired
# with the host-side veth the example registry (endpoints.d/seed.yaml) names,
# with the registry's addresses. The host-side ends are ports of one bridge,
# seed-br0, so the workloads reach each other through the host, where netpold
# enforces.
#
#   workloads.sh create              make them; again: checks, fixes, changes nothing else
#   workloads.sh remove              remove the namespaces, veths and bridge create made
#   workloads.sh probe FROM TO PORT  open a TCP connection from workload FROM to
#                                    workload TO on PORT; prints "reached" (TO answered:
#                                    connected, or refused as nothing listens there) or
#                                    "blocked" (no answer within 2 s: dropped)
#
# Workloads: frontend-1 (veth-fe1, 10.0.1.11), frontend-2 (veth-fe2, 10.0.1.12),
# backend (veth-be, 10.0.1.21), database (veth-db, 10.0.1.31), and fd00:1::11 ...
# for IPv6; namespaces seed-frontend-1 ... seed-database. It uses 10.0.1.0/24 and
# fd00:1::/64: on a host that already routes those, change both here and in the
# registry. Run as root. Nothing listens in the namespaces: a probe that reaches
# its workload is refused, which is what tells it apart from a dropped one.
set -euo pipefail

BRIDGE=seed-br0
# name  host-side veth  IPv4  IPv6
WORKLOADS="frontend-1 veth-fe1 10.0.1.11 fd00:1::11
frontend-2 veth-fe2 10.0.1.12 fd00:1::12
backend veth-be 10.0.1.21 fd00:1::21
database veth-db 10.0.1.31 fd00:1::31"

usage() {
	echo "usage: $0 create | remove | probe FROM TO PORT" >&2
	exit 2
}

have_link() { ip link show dev "$1" >/dev/null 2>&1; }
have_netns() { [ -e "/run/netns/$1" ]; }

create() {
	have_link "$BRIDGE" || ip link add "$BRIDGE" type bridge
	ip addr replace 10.0.1.1/24 dev "$BRIDGE"
	ip link set "$BRIDGE" up
	while read -r name veth v4 v6; do
		ns=seed-$name
		have_netns "$ns" || ip netns add "$ns"
		ip -n "$ns" link set lo up
		if ! have_link "$veth"; then
			# A half-made pair from an interrupted run: start it again.
			ip -n "$ns" link del eth0 2>/dev/null || true
			ip link add "$veth" type veth peer name eth0 netns "$ns"
		fi
		ip link set "$veth" master "$BRIDGE" up
		ip -n "$ns" addr replace "$v4/24" dev eth0
		ip -n "$ns" addr replace "$v6/64" dev eth0 nodad
		ip -n "$ns" link set eth0 up
		ip -n "$ns" route replace default via 10.0.1.1
		echo "$name: namespace $ns, eth0 $v4 $v6, host side $veth"
	done <<<"$WORKLOADS"
}

remove() {
	while read -r name veth _ _; do
		# Deleting the namespace deletes its end of the pair, and with it the host's.
		if have_netns "seed-$name"; then ip netns del "seed-$name"; fi
		if have_link "$veth"; then ip link del "$veth"; fi
	done <<<"$WORKLOADS"
	if have_link "$BRIDGE"; then ip link del "$BRIDGE"; fi
	echo "removed the seed workloads"
}

address_of() {
	while read -r name _ v4 _; do
		if [ "$name" = "$1" ]; then
			echo "$v4"
			return
		fi
	done <<<"$WORKLOADS"
	echo "$0: no workload $1 (frontend-1, frontend-2, backend, database)" >&2
	exit 2
}

probe() {
	local from=$1 to=$2 port=$3 addr err rc=0
	addr=$(address_of "$to")
	address_of "$from" >/dev/null
	have_netns "seed-$from" || { echo "$0: no namespace seed-$from; run $0 create" >&2; exit 1; }
	err=$(ip netns exec "seed-$from" timeout 2 bash -c "exec 3<>/dev/tcp/$addr/$port" 2>&1) || rc=$?
	# 0: connected; "refused": an RST came back; 124 (timeout): nothing came back.
	if [ "$rc" -eq 0 ] || [[ "$err" == *"Connection refused"* ]]; then
		echo "$from -> $to:$port reached"
	elif [ "$rc" -eq 124 ]; then
		echo "$from -> $to:$port blocked"
	else
		echo "$from -> $to:$port: ${err:-exit status $rc}" >&2
		exit 1
	fi
}

case "${1:-}" in
create) [ $# -eq 1 ] || usage; create ;;
remove) [ $# -eq 1 ] || usage; remove ;;
probe) [ $# -eq 4 ] || usage; probe "$2" "$3" "$4" ;;
*) usage ;;
esac

#!/bin/sh
# Runs as netpold.service (a drop-in replaces ExecStart=, nothing else): does the
# unit's sandbox — capabilities, ProtectSystem=strict with ReadWritePaths=/sys/fs/bpf,
# the system call filter, RestrictAddressFamilies= — let a BPF datapath work?
#   bpf-probe.sh OBJECT DEVICE
# Creates /sys/fs/bpf/npk-probe, loads and pins OBJECT's program and maps there
# (bpftool, when installed), updates a map, attaches the program with clsact on
# DEVICE, then removes it all again. Prints "probe: ok" when everything worked.
set -eu
obj=$1
dev=$2
pin=/sys/fs/bpf/npk-probe
step() { echo "probe: $*"; }

step "capabilities $(grep CapEff /proc/self/status | tr -s '\t ' ' ')"
mkdir "$pin"
step "created $pin"
if command -v bpftool >/dev/null 2>&1; then
	bpftool prog loadall "$obj" "$pin/prog" type classifier pinmaps "$pin/maps"
	step "loaded and pinned: $(ls "$pin/prog" "$pin/maps" | tr '\n' ' ')"
	# 10.203.1.31/32 -> 5
	bpftool map update pinned "$pin/maps/probe_lpm" key 32 0 0 0 10 203 1 31 value 5 0 0 0
	step "updated a pinned map"
	tc qdisc add dev "$dev" clsact
	tc filter add dev "$dev" ingress bpf direct-action object-pinned "$pin/prog/probe"
else
	tc qdisc add dev "$dev" clsact
	tc filter add dev "$dev" ingress bpf direct-action object-file "$obj" section tc
fi
step "attached: $(tc filter show dev "$dev" ingress | tr '\n' ' ')"
tc qdisc del dev "$dev" clsact
rm -rf "$pin"
step "ok"

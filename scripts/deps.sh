#!/usr/bin/env bash
# Install everything netpol needs to build, test, demo and package on Debian 12+.
# Idempotent: installs only what is missing. Needs root (or sudo).
set -euo pipefail

PKGS=(
  # build: BPF C with clang, libbpf-sys's vendored libbpf needs libelf and zlib
  clang llvm libelf-dev zlib1g-dev pkg-config libbpf-dev make gcc libc6-dev python3
  # datapath and end-to-end tests: namespaces, veth, bridges, traffic
  iproute2 iputils-ping socat procps kmod util-linux bpftool
  # packaging: .deb and .rpm, a real systemd for the package test
  debhelper dpkg-dev fakeroot lintian rpm systemd
  # benchmarks: the contenders
  iperf3 nftables iptables
  # fleet mode (DESIGN §5a): the etcd-client crate compiles etcd's .proto files at
  # build time (protoc and the google/protobuf includes); tests run a real etcd,
  # with mTLS certificates scripts/etcd-tls-roles makes with openssl
  protobuf-compiler libprotobuf-dev etcd-server etcd-client openssl
  # the DNS proxy's tests (tests/offline/dns_proxy.rs) run a real DNS server on
  # loopback: dnsmasq's binary alone (dnsmasq-base: no service that takes port 53)
  dnsmasq-base
)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "deps: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
  fi
fi

# bpffs: the daemon pins its maps, programs and links here.
if [ "$(id -u)" -eq 0 ] && ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi

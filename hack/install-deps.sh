#!/usr/bin/env bash
# Installs what pontoon's demo, tests and benchmarks need on Debian/Ubuntu (run as root).
# Idempotent: packages already present are not reinstalled.
set -euo pipefail

need=()
for pkg in iproute2 iputils-ping nftables iptables jq python3 procps util-linux containernetworking-plugins iperf3 ethtool; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install a Rust toolchain (https://rustup.rs) and run this again" >&2
  exit 1
fi

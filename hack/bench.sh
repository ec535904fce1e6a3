#!/usr/bin/env bash
# ADD/DEL latency and throughput: pontoon vs the Go reference (bridge + host-local from
# Debian's containernetworking-plugins) vs the kernel floor (ip -batch), interleaved, in
# throwaway namespaces. Prints a table with ratios and writes JSON (default target/bench-cni.json).
#   bash hack/bench.sh            # full run (a few minutes)
#   bash hack/bench.sh --quick    # smoke run (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "run as root" >&2; exit 1; fi
bash hack/install-deps.sh
cargo build --release -q
cargo bench -q --bench cni -- "$@"

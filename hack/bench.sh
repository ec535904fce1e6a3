#!/usr/bin/env bash
# ADD/DEL latency and throughput, and the agent at cluster scale: pontoon vs the Go reference (bridge + host-local from
# Debian's containernetworking-plugins) vs the kernel floor (ip -batch), interleaved, in
# throwaway namespaces. Prints a table with ratios and writes JSON (default target/bench-cni.json).
#   bash hack/bench.sh            # full run (a few minutes)
#   bash hack/bench.sh --quick    # smoke run (seconds)
#   PONTOON_BASE_BIN=/path/to/older/pontoon bash hack/bench.sh   # also a before/after table
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "run as root" >&2; exit 1; fi
bash hack/install-deps.sh
PONTOON_BIN=$(bash hack/build-static.sh)
export PONTOON_BIN
cargo bench -q --bench cni -- "$@"
# The node agent with 5,000 Nodes in the stand-in API server (500 with --quick).
cargo bench -q --bench agent_scale -- "$@"
# Pod-to-pod throughput and latency over the VXLAN overlay vs a direct route.
cargo bench -q --bench overlay -- "$@"
# NetworkPolicy at 1,000 pods and 200 policies: change-to-enforcement latency, RSS,
# throughput and ADD latency with and without policies.
cargo bench -q --bench netpol -- "$@"

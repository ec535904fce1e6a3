#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, unit and integration tests (root: they build
# throwaway network namespaces, and remove them again), the containerd CRI and Podman tiers,
# a benchmark smoke run and a short fuzz run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "run as root: the integration tests create network namespaces" >&2
  exit 1
fi
bash hack/install-deps.sh

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings

echo "== unit and integration tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast
else
  cargo test --no-fail-fast
fi

echo "== benchmark smoke run (the full one is hack/bench.sh)"
PONTOON_BIN=$(bash hack/build-static.sh)
export PONTOON_BIN
cargo bench -q --bench cni -- --quick --out target/bench-smoke.json
cargo bench -q --bench agent_scale -- --quick
cargo bench -q --bench overlay -- --quick
cargo bench -q --bench netpol -- --quick

echo "== containerd CRI end-to-end tier"
bash hack/e2e-containerd.sh

echo "== Podman (libcni) end-to-end tier"
bash hack/e2e-podman.sh

echo "== fuzzing (short; hack/fuzz.sh SECONDS for a long run)"
bash hack/fuzz.sh 20

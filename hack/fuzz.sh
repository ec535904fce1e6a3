#!/usr/bin/env bash
# Fuzz the config parser, the CNI_ARGS parser and result conversion with cargo-fuzz (libFuzzer).
#   bash hack/fuzz.sh            # 20 s per target (what CI runs)
#   bash hack/fuzz.sh 3600       # an hour per target
# New inputs go to a temporary corpus; the committed seeds in fuzz/corpus are read-only.
# cargo-fuzz needs nightly compiler flags: RUSTC_BOOTSTRAP=1 enables them on the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install -q cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for t in config cni_args result; do
  work=$(mktemp -d)
  echo "== fuzz $t for ${secs}s"
  if ! cargo fuzz run "$t" "$work" "fuzz/corpus/$t" -- -max_total_time="$secs" 2>&1 | tail -n 3; then
    echo "fuzz target $t failed; the crashing input is under fuzz/artifacts/$t" >&2
    rm -rf "$work"
    exit 1
  fi
  rm -rf "$work"
done

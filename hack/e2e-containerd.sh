#!/usr/bin/env bash
# containerd end-to-end tier: Debian's containerd (CRI plugin) drives the built pontoon inside
# a throwaway node netns and a private mount namespace; a real CRI gRPC client checks pods,
# traffic, cleanup, restarts and pool exhaustion. Run as root. See e2e/src/main.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "run as root" >&2; exit 1; fi
bash hack/install-deps.sh
need=()
for pkg in containerd runc busybox-static protobuf-compiler util-linux; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
PONTOON_BIN=$(bash hack/build-static.sh)
cargo build --release -q --manifest-path e2e/Cargo.toml
PONTOON_BIN=$PONTOON_BIN e2e/target/release/pontoon-e2e

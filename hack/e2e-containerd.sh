#!/usr/bin/env bash
# containerd end-to-end tier: Debian's containerd (CRI plugin) drives the built pontoon inside
# a throwaway node netns and a private mount namespace; a real CRI gRPC client checks pods,
# traffic, cleanup, restarts and pool exhaustion. Run as root. See e2e/src/main.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "run as root" >&2; exit 1; fi
bash hack/install-deps.sh
need=()
for pkg in containerd runc busybox-static protobuf-compiler util-linux podman openssl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
PONTOON_BIN=$(bash hack/build-static.sh)
cargo build --release -q --manifest-path e2e/Cargo.toml
# The DaemonSet's image, built as users build it (hack/build-image.sh, podman with storage of
# its own here), and a second version of it for the upgrade step: the same binary with a few
# bytes appended, so the installer sees a new one.
images=$(mktemp -d)
trap 'rm -rf "$images"' EXIT
export PONTOON_IMAGE_ROOT=$images/engine
PONTOON_IMAGE=$(bash hack/build-image.sh --binary "$PONTOON_BIN" --save "$images/v1.tar")
cp "$PONTOON_BIN" "$images/pontoon-next"
printf 'pontoon-next-build\n' >>"$images/pontoon-next"
PONTOON_IMAGE_NEXT=$(bash hack/build-image.sh --binary "$images/pontoon-next" --tag "${PONTOON_IMAGE}-next" --save "$images/next.tar")
PONTOON_BIN=$PONTOON_BIN PONTOON_IMAGE_TAR=$images/v1.tar PONTOON_IMAGE_NEXT_TAR=$images/next.tar \
  PONTOON_IMAGE_NEXT=$PONTOON_IMAGE_NEXT PONTOON_BIN_NEXT=$images/pontoon-next \
  e2e/target/release/pontoon-e2e

#!/usr/bin/env bash
# Builds pontoon's container image, offline: the static binary in an image FROM scratch.
#   bash hack/build-image.sh [--tag IMAGE] [--save FILE.tar] [--binary PATH]
# IMAGE defaults to ghcr.io/pontoon-cni/pontoon:<crate version> (the manifest's tag). --save
# writes an OCI archive (for `ctr images import`, `kind load image-archive`). The engine is
# docker when a daemon answers, else podman; with PONTOON_IMAGE_ROOT=DIR podman keeps its
# storage, run state and config under DIR and runs in a mount namespace of its own with a
# tmpfs over /var/lib and /run (it writes /var/lib/containers/cache and /run/containers
# whatever --root and --runroot say), so
# nothing of the machine's is touched (the tests use that).
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image="ghcr.io/pontoon-cni/pontoon:$version"
save=""
binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) image=$2; shift 2 ;;
    --save) save=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$binary" ] || binary=$(bash hack/build-static.sh)
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$binary" "$ctx/pontoon"
cp deploy/Containerfile "$ctx/Containerfile"
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  engine=(docker)
elif command -v podman >/dev/null 2>&1; then
  engine=(podman)
  if [ -n "${PONTOON_IMAGE_ROOT:-}" ]; then
    mkdir -p "$PONTOON_IMAGE_ROOT"/{storage,run,tmp}
    printf '[engine]\nevents_logger = "file"\ncgroup_manager = "cgroupfs"\n' >"$PONTOON_IMAGE_ROOT/containers.conf"
    export CONTAINERS_CONF="$PONTOON_IMAGE_ROOT/containers.conf" TMPDIR="$PONTOON_IMAGE_ROOT/tmp"
    engine=(unshare -m sh -c 'mount -t tmpfs tmpfs /var/lib && mount -t tmpfs tmpfs /run && exec "$@"' - podman
      --root "$PONTOON_IMAGE_ROOT/storage" --runroot "$PONTOON_IMAGE_ROOT/run" --storage-driver vfs)
  fi
else
  echo "no container engine (docker or podman) here: apt-get install podman" >&2
  exit 1
fi
"${engine[@]}" build -q -f "$ctx/Containerfile" -t "$image" "$ctx" >/dev/null
if [ -n "$save" ]; then
  rm -f "$save"
  if [ "${engine[0]}" != docker ]; then
    "${engine[@]}" save -q --format oci-archive -o "$save" "$image"
  else
    docker save -o "$save" "$image"
  fi
fi
name=docker; [ "${engine[0]}" = docker ] || name=podman
echo "built $image with $name${save:+, saved to $save}" >&2
echo "$image"

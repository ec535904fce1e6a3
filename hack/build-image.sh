#!/usr/bin/env bash
# Builds pontoon's container image with whichever engine exists (docker, then podman).
#   bash hack/build-image.sh [IMAGE]     default ghcr.io/pontoon-cni/pontoon:latest
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-ghcr.io/pontoon-cni/pontoon:latest}
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v podman >/dev/null 2>&1; then
  engine=podman
else
  echo "no container engine (docker or podman) is running here" >&2
  exit 1
fi
"$engine" build -f deploy/Containerfile -t "$image" .
echo "built $image with $engine"

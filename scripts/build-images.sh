#!/usr/bin/env bash
# Builds FedFM's two images, the component image (Containerfile) and the operator image
# (Containerfile.operator), with docker or podman (ENGINE), and prints one line per image: NAME TARBALL.
#   scripts/build-images.sh [fedfm] [fedfm-operator]     (default: both)
#
# ONLINE (default where the base image can be pulled): FROM python:3.11-slim-bookworm, packages from the
#   package index, tagged $REGISTRY/fedfm:$IMAGE_TAG and $REGISTRY/fedfm-operator:$IMAGE_TAG; no tarball (-).
# OFFLINE (no registry reachable, or OFFLINE=1): nothing is pulled and the build has no network:
#   - the base image is Debian bookworm made from Debian's archive (scripts/testenv/node/make-base-images.sh,
#     mmdebstrap), with the pause image a test node needs;
#   - .wheelhouse/ gets a wheel of every package requirements.lock pins, for CPython 3.11 on Linux x86_64,
#     filled here from the index with each file's hash checked (DeepSpeed built with its op);
#   - the images are tagged localhost/fedfm:HASH and localhost/fedfm-operator:HASH, HASH a digest of everything
#     that goes into them, and saved as docker-archives in $IMAGE_CACHE: a second build with the same inputs
#     is a no-op (the test harness loads the tarballs into the node's containerd).
# podman without CONTAINERS_CONF uses the node recipe's settings (runc, ulimits below the hard limit) and
# a store under $IMAGE_CACHE/podman.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
ENGINE=${ENGINE:-$(command -v docker || command -v podman || true)}
[ -n "$ENGINE" ] || { echo "build-images.sh needs docker or podman; none is installed" >&2; exit 1; }
REGISTRY=${REGISTRY:-ghcr.io/fedfm}
IMAGE_TAG=${IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)}
ONLINE_BASE=python:3.11-slim-bookworm
export IMAGE_CACHE=${IMAGE_CACHE:-$HOME/.cache/fedfm-images}
mkdir -p "$IMAGE_CACHE" .wheelhouse
say() { echo "build-images: $*" >&2; }
WANTED=" ${*:-fedfm fedfm-operator} "
SPECS=()
for spec in "Containerfile fedfm" "Containerfile.operator fedfm-operator"; do
  [[ $WANTED == *" ${spec#* } "* ]] && SPECS+=("$spec")
done
[ ${#SPECS[@]} -gt 0 ] || { echo "build-images.sh: no such image in '$*' (fedfm, fedfm-operator)" >&2; exit 2; }

if [ "$(basename "$ENGINE")" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
  export WORK=$IMAGE_CACHE/podman
  . scripts/testenv/node/node-env.sh
  podman_conf
fi

if [ "${OFFLINE:-auto}" = auto ]; then
  if "$ENGINE" image exists "$ONLINE_BASE" 2>/dev/null || timeout 60 "$ENGINE" pull -q "$ONLINE_BASE" >/dev/null 2>&1
  then OFFLINE=0; else OFFLINE=1; fi
fi

if [ "$OFFLINE" = 0 ]; then
  for spec in "${SPECS[@]}"; do
    set -- $spec
    "$ENGINE" build -f "$1" -t "$REGISTRY/$2:$IMAGE_TAG" . >&2
    echo "$REGISTRY/$2:$IMAGE_TAG -"
  done
  exit 0
fi

# --- offline -----------------------------------------------------------------------------------------
PY=${PY:-$ROOT/.venv/bin/python}   # a Python 3.11 with torch (DeepSpeed's build imports it)
[ -x "$PY" ] || { echo "build-images.sh offline needs $PY (make venv)" >&2; exit 1; }
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-base:bookworm}
if ! "$ENGINE" image exists "$BASE_IMAGE" 2>/dev/null; then
  say "making the Debian base image from Debian's archive (first time: about a minute)"
  [ "$(basename "$ENGINE")" = podman ] || { echo "offline base images need podman" >&2; exit 1; }
  WORK=${WORK:-$IMAGE_CACHE/podman} BASE_IMAGE=$BASE_IMAGE scripts/testenv/node/make-base-images.sh >&2
fi

# The wheelhouse: every package the image installs, the files requirements.lock pins (downloaded with their hashes
# checked; DeepSpeed and the packages published only as source built here into wheels), and requirements.txt naming
# each wheel with its own sha256, so that the image installs these very files (--require-hashes). Its key is the
# lock and the Python that builds the wheels.
LOCK=${STACK_LOCK:-$ROOT/requirements.lock}
key=$( (cat "$LOCK"; "$PY" -VV) | sha256sum | cut -c1-16)
wheels=$IMAGE_CACHE/wheelhouse-$key
if [ ! -f "$wheels/.complete" ]; then
  say "filling the wheelhouse $wheels (first time: a few minutes)"
  rm -rf "$wheels" && mkdir -p "$wheels"
  DS_BUILD_SHM_COMM=1 "$PY" -m pip wheel -q --no-deps --no-build-isolation --require-hashes -w "$wheels" \
    -r "$LOCK" >&2
  "$PY" - "$wheels" >"$wheels/requirements.txt" <<'PY'
import hashlib, sys
from pathlib import Path
from packaging.utils import parse_wheel_filename
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version, *_ = parse_wheel_filename(wheel.name)
    print(f"{name}=={version} --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}")
PY
  touch "$wheels/.complete"
  # one wheelhouse: the older ones (another stack) would only fill the disk
  for old in "$IMAGE_CACHE"/wheelhouse-*; do [ "$old" = "$wheels" ] || rm -rf "$old"; done
fi
find .wheelhouse -mindepth 1 ! -name .keep -delete
# (the build context's copy; emptied again below, so that an ordinary build uses the index)
cp "$wheels"/*.whl "$wheels/requirements.txt" .wheelhouse/

base_id=$("$ENGINE" image inspect --format '{{.RootFS.Layers}}' "$BASE_IMAGE")  # stable across imports
sources=$(git ls-files -z pyproject.toml constraints.txt scripts fedfm components pipelines operators \
          | xargs -0 sha256sum | sha256sum | cut -c1-16)
for spec in "${SPECS[@]}"; do
  set -- $spec
  hash=$( (cat "$1"; echo "$base_id $key $sources") | sha256sum | cut -c1-16)
  image=localhost/$2:$hash tar=$IMAGE_CACHE/$2-$hash.docker.tar
  if [ ! -s "$tar" ]; then
    say "building $image from $1 (no network)"
    "$ENGINE" build -q --network none --pull=never --build-arg BASE_IMAGE="$BASE_IMAGE" -f "$1" -t "$image" . \
      >"$IMAGE_CACHE/build-$2.log" 2>&1 || { tail -40 "$IMAGE_CACHE/build-$2.log" >&2; exit 1; }
    "$ENGINE" save -q --format docker-archive -o "$tar.part" "$image" && mv "$tar.part" "$tar"
    # one image and tarball per name: the older ones (other code) would only fill the disk
    for old in "$IMAGE_CACHE/$2"-*.docker.tar; do
      if [[ $old != "$tar" && $(basename "$old") =~ ^$2-[0-9a-f]{16}\.docker\.tar$ ]]; then rm -f "$old"; fi
    done
    "$ENGINE" images --format '{{.Repository}}:{{.Tag}}' | grep -x "localhost/$2:[0-9a-f]\{16\}" \
      | grep -vx "$image" | xargs -r "$ENGINE" rmi >/dev/null 2>&1 || true
  fi
  echo "$image $tar"
done
find .wheelhouse -mindepth 1 ! -name .keep -delete

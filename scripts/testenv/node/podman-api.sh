#!/usr/bin/env bash
# Serves the Docker engine API on the unix socket SOCKET, until stopped, from podman's store of the images
# scripts/build-images.sh built ($IMAGE_CACHE/podman): what `fedfm run --runner docker` (docker-py, through
# DOCKER_HOST) talks to on a machine with podman and no Docker engine.
#   podman-api.sh SOCKET
set -euo pipefail
[ $# = 1 ] || { echo "usage: podman-api.sh SOCKET" >&2; exit 2; }
export WORK=${IMAGE_CACHE:-$HOME/.cache/fedfm-images}/podman
. "$(dirname "$0")/node-env.sh"
podman_conf
# The API waits for a container's exit through podman's events, which the node's settings turn off
# (events_logger "none"): this service keeps them in a file.
exec podman --events-backend=file system service --time=0 "unix://$1"

#!/usr/bin/env bash
# Builds a real kube-apiserver and kube-controller-manager (Kubernetes v1.20.2) from Debian bookworm's
# `kubernetes` source package with Debian's Go, and installs etcd 3.4 from Debian. Only Debian's
# package archive is used (the same archive apt already uses on this machine).
# Output: $BIN_DIR/kube-apiserver, $BIN_DIR/kube-controller-manager; etcd at /usr/bin/etcd.
# Takes about 6-7 minutes on 2 cores the first time; re-running with the same $WORK reuses the Go cache.
set -euo pipefail
WORK=${WORK:-$HOME/.cache/kube-from-debian}
BIN_DIR=${BIN_DIR:-$WORK/bin}
if [ -x "$BIN_DIR/kube-apiserver" ] && [ -x "$BIN_DIR/kube-controller-manager" ]; then
  if [ ! -x /usr/bin/etcd ]; then  # binaries restored from a cache onto a fresh machine: etcd is still needed
    mkdir -p "$WORK"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$WORK/apt-main-update.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends etcd-server >"$WORK/apt-install.log" 2>&1
  fi
  echo "already built: $BIN_DIR"; exit 0
fi
mkdir -p "$WORK" "$BIN_DIR"
cd "$WORK"
export DEBIAN_FRONTEND=noninteractive

# 1. toolchain + etcd + reflect2 1.0.2 source (the vendored 1.0.1 crashes under Go >= 1.18)
apt-get update -qq >"$WORK/apt-main-update.log" 2>&1
apt-get install -y -q --no-install-recommends \
  golang-go etcd-server rsync make openssl curl ca-certificates dpkg-dev \
  golang-github-modern-go-reflect2-dev >"$WORK/apt-install.log" 2>&1

# 2. a private deb-src list derived from this machine's own apt sources, then `apt-get source`
mkdir -p apt/lists/partial
sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > apt/debian-src.sources
APTO=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$WORK/apt"
      -o "Dir::State::Lists=$WORK/apt/lists")
apt-get "${APTO[@]}" update >"$WORK/apt-update.log" 2>&1
rm -rf src && mkdir src && cd src
apt-get "${APTO[@]}" source kubernetes >"$WORK/apt-source.log" 2>&1
SRC=$(find "$WORK/src" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -1)
cd "$SRC"

# 3. swap the vendored reflect2 for Debian's 1.0.2
V=vendor/github.com/modern-go/reflect2
rm -f "$V"/*.go "$V"/*.s
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
   /usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$V"/

# 4. build, GOPATH layout as Debian's own rules use
mkdir -p .go/src/k8s.io
[ -L .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
export GOPATH="$SRC/.go" GOCACHE="$WORK/gocache" GOPROXY=off CGO_ENABLED=0 HOME="$WORK/home"
mkdir -p "$HOME"
make WHAT=cmd/kube-apiserver >"$WORK/make-apiserver.log" 2>&1
make WHAT=cmd/kube-controller-manager >"$WORK/make-kcm.log" 2>&1
cp _output/bin/kube-apiserver _output/bin/kube-controller-manager "$BIN_DIR/"
"$BIN_DIR/kube-apiserver" --version

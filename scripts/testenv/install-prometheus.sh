#!/usr/bin/env bash
# Installs Debian's Prometheus (prometheus, promtool) and Pushgateway for the tests that scrape the
# operator, check the chart's alert rules and push a local run's metrics. Only Debian's package archive
# is used. A no-op when all three are there.
set -euo pipefail
# Test workers (pytest-xdist) may ask at once: one installer at a time, and each sees the other's result.
mkdir -p "$HOME/.cache"; exec 9>"$HOME/.cache/fedfm-installers.lock"; flock 9
if command -v prometheus >/dev/null && command -v promtool >/dev/null \
   && command -v prometheus-pushgateway >/dev/null; then
  echo "already installed: $(command -v prometheus)"; exit 0
fi
LOG=${LOG:-$HOME/.cache/kube-from-debian/apt-prometheus.log}
mkdir -p "$(dirname "$LOG")"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >"$LOG" 2>&1
apt-get install -y -q --no-install-recommends prometheus prometheus-pushgateway >>"$LOG" 2>&1
# The package starts a system service where an init system runs; the tests start their own.
command -v promtool >/dev/null && command -v prometheus-pushgateway >/dev/null

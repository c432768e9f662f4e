#!/usr/bin/env bash
# Installs prometheus-operator's object schemas (ServiceMonitor, PrometheusRule, ...) as compiled
# validators from the npm registry (@kubernetes-models/prometheus-operator, pinned), for the test that
# checks the chart's monitoring objects. Prints the folder; a no-op when it is there already.
set -euo pipefail
# Test workers (pytest-xdist) may ask at once: one installer at a time, and each sees the other's result.
mkdir -p "$HOME/.cache"; exec 9>"$HOME/.cache/fedfm-installers.lock"; flock 9
DIR=${DIR:-$HOME/.cache/fedfm-npm}
PACKAGE=@kubernetes-models/prometheus-operator@6.0.0
if [ ! -f "$DIR/node_modules/@kubernetes-models/prometheus-operator/package.json" ]; then
  mkdir -p "$DIR"
  npm install --prefix "$DIR" --silent --no-audit --no-fund "$PACKAGE" >"$DIR/npm-install.log" 2>&1
fi
echo "$DIR"

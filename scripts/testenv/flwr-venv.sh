#!/usr/bin/env bash
# A separate virtualenv with Flower (flwr), the reference for the strategies' differential tests.
# Separate because flwr pins typer, rich and others below the versions FedFM's stack uses; the tests
# exchange arrays with it through files. Prints the venv's python; a no-op when it exists.
set -euo pipefail
# Test workers (pytest-xdist) may ask at once: one installer at a time, and each sees the other's result.
mkdir -p "$HOME/.cache"; exec 9>"$HOME/.cache/fedfm-installers.lock"; flock 9
VENV=${VENV:-$HOME/.cache/fedfm-flwr-venv}
FLWR=${FLWR:-flwr==1.42.0}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import flwr" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$FLWR" >"$VENV.log" 2>&1
fi
echo "$VENV/bin/python"

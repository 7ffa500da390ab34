#!/usr/bin/env bash
# The GPU check: bf16 training steps of every plugin through Accelerate, ViT-B-32 embedding throughput against a
# plain open_clip loop, OPTIN scoring time on ViT-B-32 (benchmarks/gpu_check.py; about 5 minutes at most on one
# GPU). On a machine without a CUDA GPU it says so and exits 0.
#   bash benchmarks/gpu_check.sh [--model ViT-B-32] [--precision bf16] ...
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  echo "gpu_check: $(command -v python) cannot import torch: activate vlkit's environment first" >&2
  exit 2
fi
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: skipped: no CUDA GPU here (torch.cuda.is_available() is False)"
  exit 0
fi
exec timeout 600 python benchmarks/gpu_check.py "$@"

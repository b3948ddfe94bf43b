#!/usr/bin/env bash
# Install the service into .venv and start it on http://localhost:3000.
# CPU-only machines: SVD_MODEL_ID=tiny scripts/serve.sh (the tiny test model).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null; then
  # No NVIDIA GPU: the CPU build of PyTorch, not the multi-GB CUDA one.
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -r requirements.txt
exec .venv/bin/bentoml serve "$@"

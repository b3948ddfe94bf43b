#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the GPU test tier, then the GPU bench at the default size
# with the full-size SVD-XT architecture in float16 (random weights: no download, no network),
# eager and then compiled. Writes bench/results/gpu-<device>.json and gpu-<device>-compile.json.
# Needs torch (CUDA build), diffusers, transformers, accelerate, pillow, numpy, imageio-ffmpeg
# and pytest; not BentoML. PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pytest -m gpu -rs -p no:cacheprovider "$@"
SVD_MODEL_ID=random-svd-xt "$PYTHON" -m bench --gpu
SVD_MODEL_ID=random-svd-xt SVD_COMPILE=1 "$PYTHON" -m bench --gpu

#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one go: the GPU test tier, then the GPU bench at the default
# size with the full-size SVD-XT architecture in float16 (random weights: no download, no
# network), eager and then compiled. Everything it learns goes under OUT, so that one call to a
# borrowed machine brings it all back:
#
#   bash scripts/gpu.sh OUT [pytest arguments]
#
#   OUT/steps.txt        each step's exit status and seconds (the script exits 1 if any failed)
#   OUT/env.txt          nvidia-smi, Python, the packages' versions and where each was imported from
#   OUT/install.txt      the kit's install, where a package was missing
#   OUT/pytest.txt       `pytest -m gpu`
#   OUT/bench.txt        both benches' tables
#   OUT/gpu-*.json       bench/results/gpu-<device>.json and gpu-<device>-compile.json, to commit
#
# Eight files at most, all at OUT's top: what a borrowed machine gives back. Each step writes as it
# goes, so a call stopped at its time limit still brings back what was done.
#
# Needs torch (CUDA build), transformers, accelerate, pillow, numpy and pytest; not BentoML.
# What the GPU machines lack (diffusers, imageio-ffmpeg, ...) scripts/gpu-kit.sh packs here into
# .whl/; this installs it, offline, into GPU_SITE (default /tmp/svd-gpu-site) when one is missing.
# PYTHON picks the interpreter (default: python3); GPU_KIT the kit (default .whl); GPU_STEPS which
# of pytest, bench-eager and bench-compile run (default all three, comma-separated), so that a
# second call can finish what a first one had no time left for.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# = 0 ]; then
  echo "usage: bash scripts/gpu.sh OUT [pytest arguments]" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
PYTHON=${PYTHON:-python3}
KIT=${GPU_KIT:-.whl}
STEPS=,${GPU_STEPS:-pytest,bench-eager,bench-compile},
SITE=${GPU_SITE:-/tmp/svd-gpu-site}
export PYTHONUNBUFFERED=1
: >"$OUT/steps.txt"
failed=0
# Where the bench writes; git keeps it only once a machine's figures are committed.
mkdir -p bench/results

# step NAME LOG COMMAND...: runs it whatever went before, shows and keeps its output, and records
# its exit status; a failure fails the script at the end, not the steps after it.
step() {
  local name=$1 log=$2 start=$SECONDS rc
  shift 2
  case $name in pytest | bench-*) [[ $STEPS == *",$name,"* ]] || return 0 ;; esac
  echo "== $name: $*" | tee -a "$log"
  set +e
  "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  printf '%-16s exit %3d  %5d s\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$OUT/steps.txt"
  [ "$rc" = 0 ] || failed=1
}

# The GPU path's imports, ffmpeg included (imageio-ffmpeg finds its binary at run time).
has_packages() {
  "$PYTHON" -c 'import diffusers, imageio_ffmpeg, importlib_metadata; imageio_ffmpeg.get_ffmpeg_exe()' 2>/dev/null
}

versions() {
  "$PYTHON" - <<'EOF'
import importlib, importlib.metadata, platform, sys
print("python", platform.python_version(), sys.executable)
for module, dist in (("torch", "torch"), ("diffusers", "diffusers"), ("transformers", "transformers"),
                     ("accelerate", "accelerate"), ("huggingface_hub", "huggingface-hub"),
                     ("safetensors", "safetensors"), ("numpy", "numpy"), ("PIL", "pillow"),
                     ("imageio_ffmpeg", "imageio-ffmpeg"), ("importlib_metadata", "importlib-metadata"),
                     ("pytest", "pytest")):
    try:
        where = importlib.import_module(module).__file__
        print(f"{dist:20} {importlib.metadata.version(dist):24} {where}")
    except Exception as error:  # noqa: BLE001 - recorded; the steps that need it fail on their own
        print(f"{dist:20} MISSING: {error!r}")
import torch, imageio_ffmpeg
print("torch CUDA", torch.version.cuda, "available", torch.cuda.is_available())
print("ffmpeg", imageio_ffmpeg.get_ffmpeg_exe(), imageio_ffmpeg.get_ffmpeg_version())
EOF
  "$PYTHON" -m pip list
}

# bench NAME ENV...: one `python -m bench --gpu`, its JSON copied to OUT.
bench() {
  local marker
  marker=$(mktemp)
  step "$1" "$OUT/bench.txt" env "${@:2}" SVD_MODEL_ID=random-svd-xt "$PYTHON" -m bench --gpu
  # The file it wrote, by age: bench/results also holds the committed figures of earlier machines.
  find bench/results -maxdepth 1 -name 'gpu-*.json' -newer "$marker" -exec cp {} "$OUT/" \;
  rm -f "$marker"
}

step nvidia-smi "$OUT/env.txt" nvidia-smi
if ! has_packages; then
  step install "$OUT/install.txt" env PYTHON="$PYTHON" bash scripts/gpu-kit-install.sh "$KIT" "$SITE"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
step versions "$OUT/env.txt" versions
# Only the files that hold GPU tests: pytest imports every file it collects before it filters by
# marker, and the others import BentoML, redis and the rest, which the GPU machine lacks.
mapfile -t files < <(grep -l 'pytest.mark.gpu' tests/test_*.py)
# None found would leave pytest to collect the whole suite (testpaths): that is a failure here.
[ ${#files[@]} -gt 0 ] || files=(no-file-holds-pytest.mark.gpu)
step pytest "$OUT/pytest.txt" "$PYTHON" -m pytest -m gpu -rs -p no:cacheprovider "${files[@]}" "$@"
bench bench-eager
bench bench-compile SVD_COMPILE=1
echo "gpu.sh: $(grep -c . "$OUT/steps.txt") steps, $([ $failed = 0 ] && echo 'all passed' || echo 'some FAILED'):"
cat "$OUT/steps.txt"
exit $failed

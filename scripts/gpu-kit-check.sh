#!/usr/bin/env bash
# Here, without a GPU: runs what a borrowed GPU machine will run, as far as a CPU allows, in a
# fresh venv that holds only packages that machine has (KINDS.md in the device tool's notes), so
# that a wheel left out of the kit, or a module-level import of BentoML, redis and the like on
# the GPU path, fails here and not in the 15 minutes a machine is lent for.
#
#   bash scripts/gpu-kit-check.sh [KIT]      (KIT: default .whl, packed by scripts/gpu-kit.sh)
#
# It runs scripts/gpu.sh itself, as the device call does: the kit's offline install, the
# versions, the GPU tier (collected and imported; each test skipped for want of CUDA), and both
# benches, which must get as far as asking for CUDA. Then the bench's arguments, and one small
# generation on the core with the tiny model, which imports what loading and encoding import
# lazily and runs the kit's ffmpeg. GPU_CHECK_VENV keeps the venv there, to reuse (the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=$(cd "${1:-.whl}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
VENV=${GPU_CHECK_VENV:-$work/venv}

# The GPU machines' packages that the GPU path uses (with what pip brings for them, all of which
# those machines have too), at their versions where KINDS.md gives one. Two differ, for this
# machine: torch is 2.13.0's CPU build from this machine's disk (anything else pulls a multi-GB
# CUDA build), and numpy 2.4.6, the lock's (2.5 needs Python 3.12; this machine has 3.11).
DEVICE_PACKAGES=(
  torch==2.13.0 transformers==5.17.0 accelerate==1.15.0 huggingface-hub==1.33.0 safetensors==0.8.0
  tokenizers==0.23.2 numpy==2.4.6 pillow pytest httpx pyyaml imageio filelock regex requests zipp
)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "${DEVICE_PACKAGES[@]}"
fi
PYTHON=$VENV/bin/python
# pydantic is not among them: typer, which the machines have, brings it here (the import check
# below keeps the GPU path off it all the same).
for absent in bentoml redis standardwebhooks starlette diffusers imageio_ffmpeg; do
  if "$PYTHON" -c "import $absent" 2>/dev/null; then
    echo "gpu-kit-check: $absent is in the venv, and the GPU machines lack it" >&2
    exit 1
  fi
done

problems=()
out=$work/out
site=$work/site
PYTHON=$PYTHON GPU_KIT=$KIT GPU_SITE=$site bash scripts/gpu.sh "$out" >"$work/gpu.log" 2>&1 || true
echo "--- scripts/gpu.sh on this CPU:"
cat "$out/steps.txt"
exit_of() { awk -v name="$1" '$1 == name { print $3 }' "$out/steps.txt"; }
for name in install versions pytest; do
  [ "$(exit_of "$name")" = 0 ] || problems+=("gpu.sh's $name step did not pass")
done
# Without CUDA each bench must stop at its own request for it, and not at an import before.
for name in bench-eager bench-compile; do
  [ -n "$(exit_of "$name")" ] || problems+=("gpu.sh ran no $name step")
done
[ "$(grep -c 'bench --gpu needs a CUDA GPU' "$out/bench.txt")" = 2 ] ||
  problems+=("the benches did not both get as far as asking for CUDA")
grep -q 'skipped' "$out/pytest.txt" && ! grep -qiE '[0-9]+ errors?\b|no tests ran' "$out/pytest.txt" ||
  problems+=("the GPU tier did not collect cleanly")
if grep -q 'Traceback\|Error:' "$out"/*.txt; then problems+=("an error in gpu.sh's output"); fi
if [ ${#problems[@]} -gt 0 ]; then
  echo "--- scripts/gpu.sh's output:"
  cat "$work/gpu.log"
fi

export PYTHONPATH=$site
echo "--- the GPU path imports none of the serving stack"
SVD_MODEL_ID=tiny "$PYTHON" - <<'EOF' || problems+=("the GPU path imports the serving stack")
import sys
sys.path.insert(0, ".")
import bench.__main__, bench.gpu, svd.tools.gpu_check, tests.conftest, tests.test_gpu  # noqa: E401, F401
serving = {"bentoml", "redis", "standardwebhooks", "starlette", "pydantic"}
imported = serving & {name.split(".")[0] for name in sys.modules}
sys.exit(f"imported {sorted(imported)}" if imported else 0)
EOF
echo "--- pip check: every requirement of the kit's wheels is met, by the kit or the machine's packages"
"$PYTHON" -m pip check || problems+=("a requirement of the kit is missing (pip check)")
echo "--- ffmpeg is the kit's, not one this machine happens to have"
"$PYTHON" -c 'import imageio_ffmpeg, sys; exe = imageio_ffmpeg.get_ffmpeg_exe(); print(exe); sys.exit(not exe.startswith(sys.argv[1]))' \
  "$site/" || problems+=("imageio-ffmpeg does not use the kit's ffmpeg")
echo "--- python -m bench --gpu --help"
"$PYTHON" -m bench --gpu --help >/dev/null || problems+=("python -m bench --gpu --help failed")
echo "--- one generation on the core: the tiny model, on the CPU, its video through the kit's ffmpeg"
SVD_MODEL_ID=tiny SVD_DEVICE=cpu "$PYTHON" -m svd.tools.gpu_check --width 64 --height 64 --num-frames 2 \
  --num-inference-steps 1 --json "$work/check.json" >"$work/check.log" 2>&1 ||
  { cat "$work/check.log"; problems+=("svd.tools.gpu_check failed"); }

if [ ${#problems[@]} -gt 0 ]; then
  printf 'gpu-kit-check: FAILED: %s\n' "${problems[@]}" >&2
  exit 1
fi
echo "gpu-kit-check: the kit in $KIT serves the GPU tier and bench --gpu"

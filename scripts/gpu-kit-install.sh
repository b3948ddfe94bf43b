#!/usr/bin/env bash
# Installs the kit scripts/gpu-kit.sh packed (KIT, default .whl/) into SITE, offline, for a
# Python whose own packages stay as they are: put SITE on PYTHONPATH afterwards. Used by
# scripts/gpu.sh on the GPU machine and by scripts/gpu-kit-check.sh here, so both install alike.
#
#   bash scripts/gpu-kit-install.sh KIT SITE
#
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
KIT=$1
SITE=$2
PYTHON=${PYTHON:-python3}

shopt -s nullglob
wheels=("$KIT"/*.whl)
if [ ${#wheels[@]} = 0 ]; then
  echo "gpu-kit-install: no wheels in $KIT: run scripts/gpu-kit.sh here and carry it" >&2
  exit 1
fi
# --no-index: that machine reaches no registry. --no-deps: the rest of the tree is its own.
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"

# imageio-ffmpeg travels without its ffmpeg (too big for a call deflated): back where it looks.
for packed in "$KIT"/imageio_ffmpeg-binary-*.xz; do
  name=$(basename "$packed" .xz)
  exe="$SITE/imageio_ffmpeg/binaries/${name#imageio_ffmpeg-binary-}"
  "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$packed" "$exe"
  chmod 755 "$exe"
done
echo "gpu-kit-install: $(ls "$SITE" | grep -c dist-info) packages in $SITE"

#!/usr/bin/env bash
# Run here, before a GPU machine is borrowed: packs into KIT (default .whl/, ignored by git) what
# the GPU tier and `bench --gpu` need beyond the packages the borrowed machine already has, for its
# CPython 3.12 on manylinux x86_64. That machine has no network; the kit travels with the call
# (`carry: [".whl"]`, 64 MiB in all with the checkout) and scripts/gpu-kit-install.sh installs it.
#
#   bash scripts/gpu-kit.sh [KIT]
#
# The machine has torch, transformers, accelerate, pillow, numpy, pytest, httpx, pyyaml, imageio,
# safetensors, huggingface-hub, filelock, regex, requests and zipp, but not diffusers or
# imageio-ffmpeg. diffusers' own requirements it lacks: importlib_metadata, and in turn
# lazy-importer. Versions are requirements.txt's (the lock the tests run on), one of each.
#
# imageio-ffmpeg's wheel alone is 65 MiB (a 165 MiB static ffmpeg, deflated), over what a call
# carries: its binary is taken out of the wheel and packed with xz beside it (45 MiB), and
# gpu-kit-install.sh puts it back. Every wheel here is py3-none, so the same kit installs on
# this machine's Python 3.11 for scripts/gpu-kit-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${1:-.whl}
PYTHON=${PYTHON:-python3}
LIMIT_MIB=60
PACKAGES=(diffusers importlib-metadata lazy-importer imageio-ffmpeg)

# NAME==VERSION as requirements.txt pins it (names compared as pip does: case and -_. alike).
pinned() {
  local want
  want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  while IFS= read -r line; do
    [[ $line == *==* ]] || continue
    if [ "$(echo "${line%%==*}" | tr 'A-Z_.' 'a-z--')" = "$want" ]; then
      echo "$1==${line#*==}"
      return
    fi
  done <requirements.txt
  echo "gpu-kit: $1 is not pinned in requirements.txt" >&2
  return 1
}

mkdir -p "$KIT"
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
specs=()
for package in "${PACKAGES[@]}"; do specs+=("$(pinned "$package")"); done
# --no-deps: the device's own packages must not be fetched again; what it lacks is named above.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$download" "${specs[@]}"

# Into KIT: the wheels as they are, imageio-ffmpeg's without its binary, the binary as .xz; and
# nothing else, so an older version left there from an earlier lock cannot travel too.
"$PYTHON" - "$download" "$KIT" <<'EOF'
import base64, hashlib, lzma, shutil, sys, zipfile
from pathlib import Path

download, kit = Path(sys.argv[1]), Path(sys.argv[2])
wanted = set()
for wheel in sorted(download.glob("*.whl")):
    tag = wheel.stem.split("-", 2)[2]
    if not tag.startswith("py3-none-"):
        sys.exit(f"gpu-kit: {wheel.name} is not py3-none: the local check on Python 3.11 could not install it")
    if not wheel.name.startswith("imageio_ffmpeg-"):
        wanted.add(wheel.name)
        if not (kit / wheel.name).exists():
            shutil.copy(wheel, kit / wheel.name)
        continue
    with zipfile.ZipFile(wheel) as source:
        binary = next(n for n in source.namelist() if n.startswith("imageio_ffmpeg/binaries/ffmpeg-"))
        packed = f"imageio_ffmpeg-binary-{Path(binary).name}.xz"
        wanted |= {wheel.name, packed}
        if (kit / wheel.name).exists() and (kit / packed).exists():
            continue
        record = next(n for n in source.namelist() if n.endswith(".dist-info/RECORD"))
        lines = source.read(record).decode().splitlines(keepends=True)
        expected = next(line for line in lines if line.startswith(binary + ",")).split(",")[1]
        stripped = kit / (wheel.name + ".part")
        with zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as out:
            for info in source.infolist():
                if info.filename == binary:
                    continue
                data = source.read(info)
                if info.filename == record:
                    # Without the binary's line: the wheel lists exactly what it holds.
                    data = "".join(line for line in lines if not line.startswith(binary + ",")).encode()
                out.writestr(info, data)
        digest = hashlib.sha256()
        with source.open(binary) as raw, lzma.open(kit / (packed + ".part"), "wb", preset=6) as xz:
            while chunk := raw.read(1 << 20):
                digest.update(chunk)
                xz.write(chunk)
        if "sha256=" + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != expected:
            sys.exit(f"gpu-kit: {binary} does not match its wheel's RECORD")
        stripped.rename(kit / wheel.name)
        (kit / (packed + ".part")).rename(kit / packed)
for stale in kit.iterdir():
    if stale.name not in wanted:
        print(f"gpu-kit: removing {stale.name}, not in this kit")
        stale.unlink()
EOF

# The sizes, and the total against the limit.
ls -l "$KIT" | awk -v limit="$LIMIT_MIB" '
  NR > 1 { total += $5; printf "%8.1f MiB  %s\n", $5 / 1048576, $9 }
  END {
    printf "%8.1f MiB  in all (limit %d MiB: a call carries 64 MiB with the checkout)\n", total / 1048576, limit
    if (total > limit * 1048576) { print "gpu-kit: over the limit" > "/dev/stderr"; exit 1 }
  }'

"""The kit a borrowed GPU machine gets (scripts/gpu-kit.sh) and what scripts/gpu.sh does there.

A lent machine has 15 minutes in all and no network: a wheel missing from the kit, or a
module-level import of BentoML on the GPU path, would waste them. scripts/gpu-kit-check.sh runs
gpu.sh here, on the CPU, in a venv of only the packages that machine has; these tests run it on
the kit, and on the kit less one part, which must fail.

The kit is kept between runs in ~/.cache/svd-gpu-kit (SVD_GPU_KIT_CACHE): packing ffmpeg takes
minutes, and gpu-kit.sh keeps what is current and removes the rest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import ROOT

MIB = 2**20


@pytest.fixture(scope="module")
def kit() -> Path:
    folder = Path(os.environ.get("SVD_GPU_KIT_CACHE", Path.home() / ".cache" / "svd-gpu-kit"))
    packed = subprocess.run(
        ["bash", "scripts/gpu-kit.sh", str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert packed.returncode == 0, packed.stdout + packed.stderr
    return folder


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made by the first check that runs, and reused by the others: the check installs nothing into it."""
    return tmp_path_factory.mktemp("gpu-kit") / "venv"


def check(kit: Path, venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/gpu-kit-check.sh", str(kit)],
        cwd=ROOT,
        env={**os.environ, "GPU_CHECK_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_kit_is_one_version_of_each_missing_package_and_fits_a_device_call(kit: Path):
    files = sorted(path.name for path in kit.iterdir())
    wheels = [name for name in files if name.endswith(".whl")]
    names = [name.split("-")[0].lower() for name in wheels]
    assert sorted(names) == ["diffusers", "imageio_ffmpeg", "importlib_metadata", "lazy_importer"], files
    pinned = dict(
        line.strip().lower().replace("-", "_").split("==")
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line
    )
    for wheel in wheels:
        name, version = wheel.split("-")[:2]
        assert pinned[name.lower()] == version, f"{wheel}: requirements.txt pins {pinned[name.lower()]}"
        assert re.search(r"-py3-none-[^-]+\.whl$", wheel), f"{wheel} installs on Python 3.12 only"
    assert [name for name in files if name.endswith(".xz")] == ["imageio_ffmpeg-binary-ffmpeg-linux-x86_64-v9.0.2.xz"]
    assert sum(path.stat().st_size for path in kit.iterdir()) <= 60 * MIB


def test_the_gpu_run_installs_the_kit_and_gets_as_far_as_a_cpu_allows(kit: Path, venv: Path):
    result = check(kit, venv)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = dict(re.findall(r"^(\S+)\s+exit\s+(\d+)", result.stdout, re.M))
    # nvidia-smi and the benches fail for want of a GPU; the check has made sure it is for that alone.
    assert {name: steps[name] for name in ("install", "versions", "pytest")} == dict.fromkeys(
        ("install", "versions", "pytest"), "0"
    )


@pytest.mark.parametrize(
    ("part", "problem"),
    [
        ("diffusers-", "gpu.sh's pytest step did not pass"),
        ("imageio_ffmpeg-binary-", "imageio-ffmpeg does not use the kit's ffmpeg"),
        # diffusers requires it, though it imports it only on Python < 3.8: pip check catches it.
        ("importlib_metadata-", "a requirement of the kit is missing"),
    ],
)
def test_the_check_fails_with_a_part_of_the_kit_left_out(
    part: str, problem: str, kit: Path, venv: Path, tmp_path: Path
):
    short = tmp_path / "kit"
    shutil.copytree(kit, short, ignore=lambda _folder, names: [name for name in names if name.startswith(part)])
    assert len(list(short.iterdir())) == len(list(kit.iterdir())) - 1
    result = check(short, venv)
    assert result.returncode != 0, result.stdout
    assert f"gpu-kit-check: FAILED: {problem}" in result.stderr, result.stderr

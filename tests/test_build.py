"""`bentoml build` packs the service and its package, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from harness import ROOT

PINNED = "0123456789abcdef0123456789abcdef01234567"


def build(tmp_path: Path, **env: str) -> Path:
    home = tmp_path / "bentoml"
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "."],
        cwd=ROOT,
        env={**os.environ, "BENTOML_HOME": str(home), "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (bento,) = [path for path in (home / "bentos" / "stable_diffusion_video").iterdir() if path.name != "latest"]
    return bento


def test_build_packs_the_service_and_the_svd_package(tmp_path: Path):
    bento = build(tmp_path, SVD_MODEL_ID="tiny")
    source = bento / "src"
    modules = {path.name for path in (source / "svd").glob("*.py")}
    assert {"service.py", "bentofile.yaml"} <= {path.name for path in source.iterdir()}
    assert {"config.py", "loading.py", "images.py", "video.py", "generate.py", "architectures.py"} <= modules
    assert {"index.html", "app.js", "style.css"} <= {path.name for path in (source / "svd" / "static").iterdir()}
    assert (bento / "README.md").read_text().startswith("Turns a still image into a short video")
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "service:StableDiffusionVideo"
    assert manifest["labels"] == {"owner": "bentoml-team", "project": "stable-video-diffusion"}
    assert not manifest["services"][0]["models"], "the tiny model is built in code, not a stored model"
    assert "imageio-ffmpeg" in (bento / "env" / "python" / "requirements.txt").read_text()


def test_build_pins_the_hub_model_revision(tmp_path: Path):
    """With the revision given as a commit hash, the hub model is declared without going online."""
    bento = build(tmp_path, SVD_MODEL_ID="stabilityai/stable-video-diffusion-img2vid-xt", SVD_MODEL_REVISION=PINNED)
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    (model,) = manifest["services"][0]["models"]
    assert model["registry"] == "huggingface"
    assert model["metadata"]["model_id"] == "stabilityai/stable-video-diffusion-img2vid-xt"
    assert model["metadata"]["revision"] == PINNED

"""`bentoml build` declares the service, its labels and its model as BentoML expects, offline."""

from __future__ import annotations

from pathlib import Path

import yaml

from harness import build_bento

PINNED = "0123456789abcdef0123456789abcdef01234567"


def test_the_bento_declares_the_service_with_its_readme_and_no_stored_model(bento: Path):
    assert (bento / "README.md").read_text().startswith("Turns a still image into a short video")
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "service:StableDiffusionVideo"
    assert manifest["labels"] == {"owner": "bentoml-team", "project": "stable-video-diffusion"}
    assert not manifest["services"][0]["models"], "the tiny model is built in code, not a stored model"


def test_build_pins_the_hub_model_revision(tmp_path: Path):
    """With the revision given as a commit hash, the hub model is declared without going online."""
    bento = build_bento(
        tmp_path / "bentoml", SVD_MODEL_ID="stabilityai/stable-video-diffusion-img2vid-xt", SVD_MODEL_REVISION=PINNED
    )
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    (model,) = manifest["services"][0]["models"]
    assert model["registry"] == "huggingface"
    assert model["metadata"]["model_id"] == "stabilityai/stable-video-diffusion-img2vid-xt"
    assert model["metadata"]["revision"] == PINNED

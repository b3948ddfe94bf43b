"""The models built in code: the published SVD and SVD-XT architectures with random weights, and the tiny one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import ROOT
from svd.core.architectures import build_empty_pipeline, build_pipeline, parameter_count


@pytest.mark.parametrize(("name", "frames"), [("random-svd-xt", 25), ("random-svd", 14)])
def test_full_size_architectures_have_the_published_sizes(name: str, frames: int):
    pipe = build_empty_pipeline(name)
    assert parameter_count(pipe.unet) == 1_524_623_082
    assert parameter_count(pipe.vae) == pytest.approx(97.7e6, rel=1e-3)
    assert parameter_count(pipe.image_encoder) == pytest.approx(632e6, rel=1e-3)
    assert pipe.unet.config.num_frames == frames
    assert pipe.unet.config.block_out_channels == (320, 640, 1280, 1280)
    assert pipe.unet.config.cross_attention_dim == 1024
    assert pipe.vae.config.block_out_channels == (128, 256, 512, 512) and pipe.vae_scale_factor == 8
    vision = pipe.image_encoder.config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.projection_dim) == (
        1280,
        32,
        14,
        1024,
    )
    assert pipe.feature_extractor.crop_size == {"height": 224, "width": 224}
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.use_karras_sigmas
    assert all(parameter.is_meta for parameter in pipe.unet.parameters()), "shapes only, no memory"


def test_a_built_model_is_made_in_its_dtype_and_identical_on_every_build():
    first, again = build_pipeline("tiny"), build_pipeline("tiny", dtype=torch.bfloat16)
    for network in ("unet", "vae", "image_encoder"):
        ours, theirs = getattr(first, network).state_dict(), getattr(again, network).state_dict()
        assert {value.dtype for value in theirs.values() if value.is_floating_point()} == {torch.bfloat16}
        assert all(torch.equal(ours[key].to(torch.bfloat16), theirs[key]) for key in ours), network
    weights = first.unet.conv_in.weight
    assert not weights.is_meta and 0 < weights.abs().max() <= weights[0].numel() ** -0.5
    assert torch.equal(first.vae.decoder.conv_norm_out.weight, torch.ones(32)), "a normalisation scales by 1"


@pytest.mark.parametrize("name", ["random-svd-xt", "random-svd"])
def test_gpu_check_runs_the_full_size_architecture_on_the_cpu(name: str, tmp_path: Path):
    """The command as a user would type it: the real shapes, no weights, no GPU."""
    report_path = tmp_path / "out.json"
    env = {**os.environ, "SVD_MODEL_ID": name, "SVD_DEVICE": "cpu"}
    command = ["--width", "64", "--height", "64", "--num-frames", "2", "--num-inference-steps", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "svd.tools.gpu_check", *command, "--json", str(report_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["model"] == name and report["dtype"] == "float32"
    assert report["parameters"]["unet"] == 1_524_623_082
    assert report["settings"]["num_frames"] == 2 and report["video_bytes"] > 0
    assert "unet parameters" in result.stdout and "1,524,623,082" in result.stdout

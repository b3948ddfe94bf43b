"""The /generate method called in-process with the tiny model: the video a user gets back."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from harness import PHOTO, SMALL, assert_browser_safe_mp4, decode_video


def test_small_request_gives_a_browser_safe_mp4(call_service):
    path, headers = call_service(image=PHOTO, decode_chunk_size=2, seed=7, **SMALL)
    assert_browser_safe_mp4(decode_video(path), 256, 128, 8)
    assert headers["x-seed"] == "7"
    assert headers["content-type"] == "video/mp4"
    settings = json.loads(headers["x-settings"])
    assert settings == {**settings, **SMALL, "seed": 7, "fps": 7, "format": "mp4", "decode_chunk_size": 2}


def test_same_seed_gives_identical_frames_and_another_seed_does_not(call_service):
    first, _ = call_service(image=PHOTO, seed=123, **SMALL)
    again, _ = call_service(image=PHOTO, seed=123, **SMALL)
    other, _ = call_service(image=PHOTO, seed=124, **SMALL)
    frames = decode_video(first).frames
    assert np.array_equal(frames, decode_video(again).frames)
    assert not np.array_equal(frames, decode_video(other).frames)


def test_omitted_seed_is_drawn_and_reported(call_service):
    first, headers = call_service(image=PHOTO, **SMALL)
    second, second_headers = call_service(image=PHOTO, **SMALL)
    assert headers["x-seed"] != second_headers["x-seed"]
    replay, _ = call_service(image=PHOTO, seed=int(headers["x-seed"]), **SMALL)
    assert np.array_equal(decode_video(first).frames, decode_video(replay).frames)


def test_frames_match_what_the_diffusers_pipeline_returns(service):
    """Decoding chunk by chunk gives exactly diffusers' own uint8 frames."""
    from svd.base.params import GenerationParams

    image = Image.open(PHOTO).convert("RGB").resize((256, 128))
    from svd.core.generate import decode_frames, denoise

    model = service.engine.model
    params = GenerationParams(**SMALL, seed=5, decode_chunk_size=3).resolve(model.max_frames)
    pipe = model.pipe
    expected = pipe(
        image,
        width=256,
        height=128,
        num_frames=8,
        num_inference_steps=2,
        decode_chunk_size=3,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).frames[0]
    expected = (expected * 255).round().astype(np.uint8)
    latents = denoise(model, image, params)
    scaled = 1 / pipe.vae.config.scaling_factor * latents[0]
    ours = np.concatenate([decode_frames(model, scaled[i : i + 3]) for i in range(0, 8, 3)])
    assert ours.dtype == np.uint8 and ours.shape == (8, 128, 256, 3)
    assert np.abs(ours.astype(int) - expected).max() == 0


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("num_frames", 26, "from 1 to 25"),
        ("num_frames", 0, "from 1 to 25"),
    ],
)
def test_frames_beyond_the_model_are_refused(call_service, field, value, allowed):
    refused, _ = call_service(image=PHOTO, **{**SMALL, field: value})
    assert refused.status_code == 400
    assert re.search(f"{field}.*{allowed}", json.loads(refused.body)["error"])


def test_the_model_decides_the_default_number_of_frames(service):
    assert service.engine.model.max_frames == 25

"""Every /generate control, checked on the decoded video or on the frames it changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import PHOTO, SMALL, assert_browser_safe_mp4, decode_video
from svd.base.errors import BadInput
from svd.base.params import GenerationParams
from svd.base.settings import Settings
from svd.core.architectures import build_pipeline
from svd.core.loading import load_pipeline

TINY = {"width": 128, "height": 64, "num_frames": 4, "num_inference_steps": 2, "seed": 11}


def test_fps_sets_the_playback_rate(call_service):
    path, headers = call_service(image=PHOTO, **SMALL, fps=12)
    assert_browser_safe_mp4(decode_video(path), 256, 128, 8, fps=12)
    assert json.loads(headers["x-settings"])["fps"] == 12


def test_webm_is_vp9_yuv420p(call_service):
    path, headers = call_service(image=PHOTO, **SMALL, format="webm")
    video = decode_video(path)
    assert headers["content-type"] == "video/webm"
    assert path.read_bytes()[:4] == b"\x1a\x45\xdf\xa3", "an EBML (Matroska/WebM) file"
    assert video.codec == "vp9" and video.pix_fmt == "yuv420p"
    assert video.size == (256, 128) and len(video.frames) == 8


def test_gif_loops_forever(call_service):
    path, headers = call_service(image=PHOTO, **SMALL, format="gif")
    assert headers["content-type"] == "image/gif"
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.size == (256, 128)
        assert gif.n_frames == 8 and gif.info["loop"] == 0
        assert gif.info["duration"] == pytest.approx(1000 / 7, abs=10)


def test_portrait_request(call_service):
    path, headers = call_service(
        image=PHOTO, width=576, height=1024, num_frames=2, num_inference_steps=1, sizing="crop"
    )
    assert_browser_safe_mp4(decode_video(path), 576, 1024, 2)
    assert json.loads(headers["x-settings"])["sizing"] == "crop"


@pytest.mark.parametrize(
    "control",
    [
        {"motion_bucket_id": 30},
        {"noise_aug_strength": 0.5},
        {"min_guidance_scale": 2.0},
        {"max_guidance_scale": 1.0},
        {"fps": 20},
        {"sizing": "pad"},
        {"cache_interval": 2},
    ],
)
def test_model_controls_change_the_frames_and_are_echoed(call_service, control):
    baseline, _ = call_service(image=PHOTO, **TINY)
    changed, headers = call_service(image=PHOTO, **TINY, **control)
    assert not np.array_equal(decode_video(baseline).frames, decode_video(changed).frames)
    settings = json.loads(headers["x-settings"])
    assert settings == {**settings, **control}


def test_server_timing_names_every_stage(call_service):
    _, headers = call_service(image=PHOTO, **TINY)
    stages = dict(item.split(";dur=") for item in headers["server-timing"].split(", "))
    assert list(stages) == ["prepare", "encode", "denoise", "decode", "interpolate", "video"]
    assert float(stages.pop("interpolate")) == 0, "no interpolation asked for"
    assert all(float(ms) > 0 for ms in stages.values())


def test_guidance_range_must_be_ordered():
    with pytest.raises(BadInput, match="min_guidance_scale.*must not be above.*max_guidance_scale"):
        GenerationParams(min_guidance_scale=3.5, max_guidance_scale=3.0).resolve(25)


def test_frames_default_and_limit_come_from_the_loaded_unet(tmp_path: Path):
    """An SVD (14-frame) checkpoint gets 14 frames by default and refuses 15."""
    pipe = build_pipeline("tiny")
    pipe.unet.register_to_config(num_frames=14)
    pipe.save_pretrained(tmp_path, variant="fp16")
    model = load_pipeline(Settings(model_id=str(tmp_path), device="cpu"))
    assert model.max_frames == 14
    assert GenerationParams().resolve(model.max_frames).num_frames == 14
    with pytest.raises(BadInput, match="from 1 to 14"):
        GenerationParams(num_frames=15).resolve(model.max_frames)


def _phone_photo(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(PHOTO).save(path.with_suffix(".jpg"), exif=exif.tobytes())


def _animated(path: Path) -> None:
    frames = [Image.new("RGB", (128, 96), colour) for colour in [(250, 0, 0), (0, 0, 250)]]
    frames[0].save(path.with_suffix(".webp"), save_all=True, append_images=frames[1:], duration=100, loop=0)


INPUTS = {
    "exif-rotated": _phone_photo,
    "transparent": lambda path: Image.new("RGBA", (128, 96), (0, 0, 0, 0)).save(path.with_suffix(".png")),
    "greyscale": lambda path: Image.open(PHOTO).convert("L").save(path.with_suffix(".png")),
    "cmyk": lambda path: Image.open(PHOTO).convert("CMYK").save(path.with_suffix(".jpg")),
    "16-bit": lambda path: Image.fromarray(np.full((96, 128), 40000, np.uint16)).save(path.with_suffix(".png")),
    "animated": _animated,
}


@pytest.mark.parametrize("kind", INPUTS)
def test_real_world_inputs_produce_a_video(call_service, tmp_path: Path, kind: str):
    INPUTS[kind](tmp_path / "input")
    (image,) = tmp_path.glob("input.*")
    path, _ = call_service(image=image, **TINY)
    assert_browser_safe_mp4(decode_video(path), 128, 64, 4)

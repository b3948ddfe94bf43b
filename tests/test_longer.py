"""Longer and smoother videos: interpolation, chained segments and ping-pong loops, decoded and counted."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from PIL import Image

from harness import PHOTO, assert_browser_safe_mp4, decode_video
from svd.media.interpolate import interpolate, pingpong

# 8 frames at 7 fps, small and quick.
BASE = {"width": 128, "height": 64, "num_frames": 8, "num_inference_steps": 2, "seed": 21}


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b).mean())


@pytest.mark.parametrize("factor", [2, 4])
def test_interpolation_multiplies_the_frame_rate_and_keeps_every_generated_frame(call_service, factor: int):
    plain, _ = call_service(image=PHOTO, **BASE)
    smooth, headers = call_service(image=PHOTO, **BASE, interpolate=factor)
    frames = decode_video(plain).frames
    video = decode_video(smooth)
    count = 7 * factor + 1
    assert_browser_safe_mp4(video, 128, 64, count, fps=7 * factor)
    assert video.meta["duration"] == pytest.approx(count / (7 * factor), abs=0.02), "the same clip, denser"
    assert json.loads(headers["x-settings"])["interpolate"] == factor
    kept = video.frames[::factor]
    # Through two lossy encodes of noise, the generated frames come back close.
    assert max(_difference(a, b) for a, b in zip(kept, frames)) < 6


def test_interpolated_frames_follow_the_motion():
    """A pan across the photo, every other frame held out: the made frames match the held-out
    ones far better than a cross-fade of their neighbours does."""
    photo = np.asarray(Image.open(PHOTO).convert("RGB").resize((480, 320)))
    truth = np.stack([photo[64:192, 6 * x : 6 * x + 256] for x in range(9)])
    made = interpolate(truth[::2], 7, 2)
    assert made.shape == truth.shape
    middle = slice(1, None, 2)
    cross_fade = (truth[0:-1:2].astype(np.int16) + truth[2::2]) // 2
    assert _difference(made[middle], truth[middle]) < 0.5 * _difference(cross_fade, truth[middle])
    assert _difference(made[::2], truth[::2]) < 2, "the kept frames stay"


def test_segments_chain_from_the_last_frame_with_the_next_seeds(call_service, monkeypatch: pytest.MonkeyPatch):
    from svd.core import generate

    seen: list[tuple[int, np.ndarray]] = []
    denoise = generate.denoise

    def spy(model, image, params, *args, **kwargs):
        seen.append((params.seed, np.asarray(image)))
        return denoise(model, image, params, *args, **kwargs)

    one, _ = call_service(image=PHOTO, **BASE)
    monkeypatch.setattr(generate, "denoise", spy)
    two, headers = call_service(image=PHOTO, **BASE, segments=2)
    single, chained = decode_video(one).frames, decode_video(two)
    assert_browser_safe_mp4(chained, 128, 64, 2 * 8 - 1)
    assert [seed for seed, _ in seen] == [21, 22]
    assert _difference(chained.frames[:8], single) < 3, "the first segment is the one-segment video"
    # The second segment starts from the first one's last frame, which appears once.
    start = seen[1][1]
    assert np.argmin([_difference(start, frame) for frame in chained.frames]) == 7
    settings = json.loads(headers["x-settings"])
    assert settings["segments"] == 2 and settings["seed"] == 21 and settings["num_frames"] == 8


def test_pingpong_plays_back_without_repeating_the_ends(call_service):
    path, headers = call_service(image=PHOTO, **BASE, loop="pingpong", format="gif")
    with Image.open(path) as gif:
        frames = []
        for index in range(gif.n_frames):
            gif.seek(index)
            frames.append(np.asarray(gif.convert("RGB")))
    assert len(frames) == 2 * 8 - 2 and headers["content-type"] == "image/gif"
    for step in range(1, 7):
        assert np.array_equal(frames[7 + step], frames[7 - step]), f"frame {7 + step} mirrors frame {7 - step}"
    assert not np.array_equal(frames[0], frames[7])


def test_everything_together_counts_out(call_service):
    """Two segments of 8 (15 frames), doubled (29 at 14 fps), then ping-pong (56): 4 s."""
    path, headers = call_service(image=PHOTO, **BASE, segments=2, interpolate=2, loop="pingpong")
    video = decode_video(path)
    assert_browser_safe_mp4(video, 128, 64, 56, fps=14)
    assert video.meta["duration"] == pytest.approx(4.0, abs=0.05)
    assert _difference(video.frames[28 + 10], video.frames[28 - 10]) < 4, "mirrored"
    assert float(dict(part.split(";dur=") for part in headers["server-timing"].split(", "))["interpolate"]) > 0


def test_progress_names_the_segment_and_the_gpu_is_free_while_encoding(service, tmp_path):
    """The next request gets the GPU while this one interpolates and encodes."""
    from svd.base.params import GenerationParams
    from svd.core.generate import generate

    gpu = threading.Lock()
    seen: list[tuple[str, int, int, bool]] = []
    model = service.engine.model
    params = GenerationParams(**BASE, segments=2, interpolate=2).resolve(model.max_frames)
    image = Image.open(PHOTO).convert("RGB").resize((128, 64))
    generate(
        model,
        image,
        params,
        tmp_path,
        report=lambda p: seen.append((p.stage, p.segment, p.segments, gpu.locked())),
        gpu=gpu,
    )
    stages = [(stage, segment) for stage, segment, _, _ in seen]
    assert ("denoise", 1) in stages and ("denoise", 2) in stages and ("decode", 2) in stages
    assert all(segments == 2 for _, _, segments, _ in seen)
    assert all(locked for stage, _, _, locked in seen if stage in ("encode", "denoise", "decode"))
    assert [stage for stage, _, _, locked in seen if not locked] == ["queued", "interpolate", "video", "done"]


def test_pingpong_and_interpolation_on_arrays():
    frames = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1).repeat(3, axis=3).repeat(64, axis=1).repeat(64, axis=2)
    assert [int(f[0, 0, 0]) for f in pingpong(frames)] == [0, 1, 2, 3, 4, 3, 2, 1]
    assert len(interpolate(frames * 40, 7, 4)) == 17
    assert len(pingpong(interpolate(frames * 40, 7, 2))) == 2 * 9 - 2

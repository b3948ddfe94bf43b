"""The live preview (svd/core/preview.py): the projection, the file, its pacing, a generation that makes
previews, and /progress and GET /generate_task/preview on a real `bentoml serve` with a token."""

from __future__ import annotations

import io
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from harness import PHOTO, SMALL, Server, decode_video, serve, wait_until
from svd.core.preview import (
    FIRST_COST,
    LATENT_RGB,
    MIN_INTERVAL,
    SHARE,
    Pace,
    Previewer,
    encode,
    latents_to_rgb,
)
from svd.storage.folder import write_atomically
from svd.storage.previews import Previews

TOKEN = "preview-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Long enough in denoising (about 5 s on two cores) for several previews.
SLOW = {**SMALL, "num_inference_steps": 100}
RED, BLUE = (1.0, -1.0, -1.0), (-1.0, -1.0, 1.0)


def _latents_showing(rgb: np.ndarray) -> np.ndarray:
    """Latents (frames, 4, h, w) that the projection turns into `rgb` (frames, h, w, 3) in [-1, 1]:
    the factors have rank 3, so their pseudo-inverse reaches every colour."""
    return np.moveaxis(rgb.astype(np.float32) @ np.linalg.pinv(LATENT_RGB), -1, 1)


def _red_left_blue_right(height: int = 8, width: int = 16) -> np.ndarray:
    """Three frames in [-1, 1], red on the left and blue on the right, each darker than the last."""
    picture = np.empty((3, height, width, 3), np.float32)
    picture[:, :, : width // 2] = RED
    picture[:, :, width // 2 :] = BLUE
    return picture * np.array([1.0, 0.6, 0.2], np.float32)[:, None, None, None]


def _as_bytes(picture: np.ndarray) -> np.ndarray:
    return ((picture + 1) * 127.5).round()


def _frames(data: bytes) -> list[np.ndarray]:
    """Every frame of an animated image, decoded."""
    return [frame for frame, _ in _timed_frames(data)]


def _timed_frames(data: bytes) -> list[tuple[np.ndarray, int]]:
    """Every frame of an animated image, decoded, with its milliseconds."""
    image = Image.open(io.BytesIO(data))
    frames = []
    for index in range(image.n_frames):
        image.seek(index)
        frames.append((np.asarray(image.convert("RGB")), image.info["duration"]))
    return frames


def _always_due() -> Pace:
    """A pace that lets every offer make a preview, on the clock `_ticking` gives."""
    return Pace(0.0, share=1.0, min_interval=0.0)


def _ticking() -> Iterator[float]:
    """A clock one second further at each reading: each preview takes a second."""
    return itertools.count(1.0)


def test_the_projection_is_the_published_latent_to_rgb_map():
    """One latent channel at a time gives its row of ComfyUI's SD 1.5 factors, from [-1, 1] to bytes."""
    unit = np.eye(4, dtype=np.float32).reshape(1, 4, 1, 4)  # one frame, one row, channel k at column k
    assert latents_to_rgb(unit)[0, 0].tolist() == [[172, 157, 169], [169, 191, 157], [91, 150, 162], [100, 94, 36]]
    assert latents_to_rgb(np.zeros((1, 4, 1, 1), np.float32)).tolist() == [[[[128, 128, 128]]]]
    far = np.zeros((1, 4, 1, 2), np.float32)
    far[0, 0, 0, 0], far[0, 3, 0, 1] = 100, 100  # far out along the first channel, and the last
    assert latents_to_rgb(far).tolist() == [[[[255, 255, 255], [0, 0, 0]]]], "clipped, not wrapped"


def test_the_projection_keeps_each_frame_and_pixel_in_place():
    picture = _red_left_blue_right()
    rgb = latents_to_rgb(_latents_showing(picture))
    assert rgb.shape == (3, 8, 16, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - _as_bytes(picture)).max() <= 1


def test_a_preview_is_an_animated_webp_of_every_frame_at_the_video_s_rate():
    levels = [20, 90, 160, 230]
    frames = np.stack([np.full((16, 32, 3), level, np.uint8) for level in levels])
    data = encode(frames, fps=7)
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size, image.n_frames, image.is_animated, image.info["loop"]) == (
        "WEBP",
        (32, 16),
        4,
        True,
        0,
    )
    timed = _timed_frames(data)
    assert [duration for _, duration in timed] == [143] * 4, "1/7 s each, in milliseconds"
    assert [round(frame.mean()) for frame, _ in timed] == pytest.approx(levels, abs=3)


def test_a_reader_sees_the_old_preview_or_the_new_one_never_half_of_either(tmp_path: Path):
    path = tmp_path / "preview.webp"
    rng = np.random.default_rng(0)
    versions = [encode(rng.integers(0, 256, (25, 72, 128, 3), np.uint8), 7) for _ in range(2)]
    write_atomically(path, versions[0])
    stop = threading.Event()
    whole: list[bool] = []

    def read() -> None:
        while not stop.is_set():
            whole.append(path.read_bytes() in versions)

    reader = threading.Thread(target=read)
    reader.start()
    writes, deadline = 0, time.monotonic() + 30
    while len(whole) < 300 and time.monotonic() < deadline:
        write_atomically(path, versions[writes % 2])
        writes += 1
    stop.set()
    reader.join()
    assert len(whole) >= 300 and writes > 1
    assert all(whole), f"{whole.count(False)} reads were neither version"
    assert [entry.name for entry in tmp_path.iterdir()] == ["preview.webp"], "no temporary file left"


@pytest.mark.parametrize(("step_seconds", "preview_seconds"), [(0.05, 0.02), (1.0, 0.03), (0.3, 0.2)])
def test_previews_take_at_most_their_share_of_the_time_and_keep_coming(step_seconds: float, preview_seconds: float):
    """Steps of the tiny CPU model, of a GPU, and previews nearly as slow as a step, in simulated time."""
    pace = Pace(0.0)
    now, made_at = 0.0, []
    for _ in range(2000):
        now += step_seconds
        if pace.due(now):
            pace.record(now, now + preview_seconds)
            made_at.append(now)
            now += preview_seconds
    assert pace.made == len(made_at) and made_at[0] >= FIRST_COST / SHARE
    assert all(later - earlier >= MIN_INTERVAL for earlier, later in zip(made_at, made_at[1:]))
    assert pace.spent <= SHARE * now + preview_seconds, "within the share, but for the one that cost more than guessed"
    # Never a long wait: the share pays for the last preview, and for what it cost over its guess.
    longest = max(later - earlier for earlier, later in zip(made_at, made_at[1:]))
    assert longest <= max(MIN_INTERVAL, 2 * preview_seconds / SHARE) + step_seconds + preview_seconds


class _Scheduler:
    """A diffusers scheduler's `step` contract: the next noisy latents, and the predicted clean ones."""

    def __init__(self, noisy: torch.Tensor, predicted: torch.Tensor | None):
        self.noisy, self.predicted = noisy, predicted

    def step(self, *_args: object) -> SimpleNamespace:
        if self.predicted is None:
            return SimpleNamespace(prev_sample=self.noisy)
        return SimpleNamespace(prev_sample=self.noisy, pred_original_sample=self.predicted)


def test_the_preview_shows_the_predicted_video_not_the_noisy_latents(tmp_path: Path):
    picture = torch.from_numpy(_latents_showing(_red_left_blue_right()))[None]
    noisy = torch.randn_like(picture) * 700  # SVD's first steps: noise two orders of magnitude over the picture
    scheduler = _Scheduler(noisy, picture)
    previewer = Previewer(partial(write_atomically, tmp_path / "preview.webp"), _always_due(), _ticking().__next__)
    with previewer.watching(scheduler):
        latents = scheduler.step(None, 0, noisy).prev_sample
        previewer.offer(latents, fps=7)
    assert "step" not in vars(scheduler), "the scheduler's own step again"
    frames = np.stack(_frames((tmp_path / "preview.webp").read_bytes()))
    assert frames.shape == (3, 8, 16, 3)
    assert np.abs(frames - _as_bytes(_red_left_blue_right())).mean() < 10, "the picture, darkening frame by frame"


def test_a_scheduler_that_predicts_nothing_previews_the_latents_themselves(tmp_path: Path):
    picture = torch.from_numpy(_latents_showing(_red_left_blue_right()))[None]
    scheduler = _Scheduler(picture, None)
    previewer = Previewer(partial(write_atomically, tmp_path / "preview.webp"), _always_due(), _ticking().__next__)
    with previewer.watching(scheduler):
        previewer.offer(scheduler.step().prev_sample, fps=7)
    frames = np.stack(_frames((tmp_path / "preview.webp").read_bytes()))
    assert np.abs(frames - _as_bytes(_red_left_blue_right())).mean() < 10


def test_a_preview_that_cannot_be_written_never_fails_the_generation(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    gone = tmp_path / "gone" / "preview.webp"
    previewer = Previewer(partial(write_atomically, gone), _always_due(), _ticking().__next__)
    latents = torch.zeros(1, 2, 4, 8, 8)
    with caplog.at_level(logging.WARNING, logger="bentoml.svd"):
        for _ in range(3):
            previewer.offer(latents, fps=7)
    assert previewer.pace.made == 0
    warnings = [record.getMessage() for record in caplog.records if "could not write a preview" in record.getMessage()]
    assert len(warnings) == 1, "said once, then no more tries"


def test_the_previews_folder_links_each_new_preview_and_forgets_old_ones(tmp_path: Path):
    previews = Previews(tmp_path / "previews")
    folder = previews.storage.path
    job = "ab" * 16
    assert previews.link(job, "/generate_task") is None and previews.read(job) is None
    keep = previews.start(job, max_age=600)
    keep(b"first")
    first = previews.link(job, "/generate_task")
    assert first is not None and first.startswith(f"/generate_task/preview?task_id={job}&v=")
    keep(b"second, longer")
    assert previews.link(job, "/generate_task") != first, "a new address for a new preview"
    assert previews.read(job) == b"second, longer"
    assert previews.read("../" + job) is None, "only ids reach the file system"

    stale, stale_part = folder / f"{'cd' * 16}.webp", folder / ".stale.webp.x.part"
    for path in (stale, stale_part):
        path.write_bytes(b"a killed worker's")
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    previews.start("ef" * 16, max_age=600)
    assert sorted(path.name for path in folder.iterdir()) == [f"{job}.webp"], "only the stale ones swept"
    previews.remove(job)
    assert previews.read(job) is None and previews.link(job, "/generate_task") is None


def test_a_generation_with_previews_makes_the_same_video_and_previews_its_frames(tmp_path: Path):
    from svd.base.params import GenerationParams
    from svd.base.settings import Settings
    from svd.core.generate import generate
    from svd.core.loading import load_pipeline

    model = load_pipeline(Settings(model_id="tiny", device="cpu"))
    params = GenerationParams(width=128, height=64, num_frames=4, num_inference_steps=5, seed=3).resolve(25)
    image = Image.open(PHOTO).convert("RGB").resize((params.width, params.height))
    for name in ("plain", "previewed"):
        (tmp_path / name).mkdir()
    plain = generate(model, image, params, tmp_path / "plain")
    previewer = Previewer(partial(write_atomically, tmp_path / "preview.webp"), _always_due(), _ticking().__next__)
    previewed = generate(model, image, params, tmp_path / "previewed", preview=previewer)
    assert np.array_equal(decode_video(previewed.path).frames, decode_video(plain.path).frames)
    assert previewer.pace.made == 5, "one a step, at this pace"
    frames = _frames((tmp_path / "preview.webp").read_bytes())
    assert len(frames) == 4 and frames[0].shape == (8, 16, 3), "every frame, one pixel per latent"
    assert "step" not in vars(model.pipe.scheduler)


# --- Over HTTP, on a real `bentoml serve` that wants a token.


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("preview"), env={"SVD_API_TOKEN": TOKEN}) as running:
        yield running


def _submit(server: Server, **data: object) -> str:
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    response = httpx.post(f"{server.url}/generate_task/submit", files=files, data=data, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["task_id"]


def _progress(server: Server, task_id: str) -> dict:
    response = httpx.post(f"{server.url}/progress", json={"task_id": task_id}, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_progress_points_to_a_live_preview_that_needs_the_token_and_goes_when_the_job_ends(locked: Server):
    previews = locked.tmp.parent / "outputs" / "previews"
    running, waiting = _submit(locked, **SLOW), _submit(locked, **SLOW)
    pending = _progress(locked, waiting)
    assert (pending["status"], pending["preview"]) == ("pending", None), "null before a first preview"

    first = wait_until(lambda: _progress(locked, running)["preview"], 120, 0.1, "a first preview")
    assert first.startswith(f"/generate_task/preview?task_id={running}&v=")
    assert httpx.get(locked.url + first, timeout=30).status_code == 401
    answer = httpx.get(locked.url + first, headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/webp" and answer.headers["cache-control"] == "no-store"
    image = Image.open(io.BytesIO(answer.content))
    assert (image.format, image.size, image.n_frames) == ("WEBP", (256 // 8, 128 // 8), 8)

    def newer() -> str | None:
        path = _progress(locked, running)["preview"]
        return path if path not in (None, first) else None

    later = wait_until(newer, 60, 0.1, "a newer preview")
    assert later.startswith(f"/generate_task/preview?task_id={running}&v=")

    # Cancelled: its preview goes with it, and the waiting job runs and makes its own.
    canceled = httpx.put(f"{locked.url}/generate_task/cancel", params={"task_id": running}, headers=AUTH, timeout=30)
    assert canceled.status_code == 200, canceled.text
    wait_until(lambda: not (previews / f"{running}.webp").exists(), 60, 0.1, "the cancelled job's preview removed")
    assert _progress(locked, running)["preview"] is None
    assert httpx.get(locked.url + later, headers=AUTH, timeout=30).status_code == 404
    wait_until(lambda: _progress(locked, waiting)["preview"], 120, 0.1, "the next job's first preview")
    wait_until(lambda: _progress(locked, waiting)["status"] == "completed", 120, 0.2, "the next job completed")
    assert _progress(locked, waiting)["preview"] is None
    assert list(previews.iterdir()) == [], "nothing left of either job's previews"


def test_the_preview_route_names_what_is_wrong_with_a_task_id(locked: Server):
    unknown = httpx.get(f"{locked.url}/generate_task/preview", params={"task_id": "0" * 32}, headers=AUTH, timeout=30)
    assert unknown.status_code == 404 and f"no task {'0' * 32}" in unknown.json()["error"]
    malformed = httpx.get(
        f"{locked.url}/generate_task/preview", params={"task_id": "../jobs"}, headers=AUTH, timeout=30
    )
    assert malformed.status_code == 400 and "not a task id" in malformed.json()["error"]
    missing = httpx.get(f"{locked.url}/generate_task/preview", headers=AUTH, timeout=30)
    assert missing.status_code == 400 and "task_id is required" in missing.json()["error"]


def test_the_schema_documents_the_preview_route(locked: Server):
    spec = httpx.get(f"{locked.url}/docs.json", headers=AUTH, timeout=30).json()
    operation = spec["paths"]["/generate_task/preview"]["get"]
    assert set(operation["responses"]) == {"200", "400", "401", "404"}
    assert list(operation["responses"]["200"]["content"]) == ["image/webp"]
    (task_id,) = [parameter for parameter in operation["parameters"] if parameter["name"] == "task_id"]
    assert task_id["required"] and task_id["schema"]["pattern"] == "^[0-9a-f]{32}$"

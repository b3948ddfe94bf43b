"""Preview: what the live preview (svd/core/preview.py) costs a generation.

In-process, on the tiny model, through the engine as a job runner calls it: the same request
with previews and without, alternating, each generation timed whole and the previews' own
time measured by their pacing. Then one preview of a default-size video, timed alone.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.inprocess import tiny_engine
from bench.report import Row, Section, median
from harness import PHOTO
from svd.base.params import GenerationParams
from svd.core.preview import LATENT_RGB, SHARE, Previewer, encode, latents_to_rgb
from svd.serving.engine import Engine
from svd.storage.folder import write_atomically

MAX_SHARE = 0.03  # the bound, of a generation's time
# A default video's latents: 25 frames of 1024x576, one latent per 8x8 pixels.
DEFAULT_LATENTS = (25, 4, 576 // 8, 1024 // 8)
ONE_PREVIEW_REPEATS = 20


def run(request: dict[str, int], runs: int, torch_threads: int) -> Section:
    with tiny_engine(torch_threads, "bench-preview-") as (engine, tmp):
        return _measure(engine, tmp, request, runs)


def _measure(engine: Engine, tmp: Path, request: dict[str, int], runs: int) -> Section:
    params = GenerationParams(**request)
    engine.run(PHOTO, params, tmp)  # the first generation after the warm-up allocates what the others reuse
    plain: list[float] = []
    previewed: list[float] = []
    shares: list[float] = []
    made: list[int] = []
    for index in range(runs):
        # Alternating which goes first, so that a drift of the machine's speed favours neither.
        for with_previews in (True, False) if index % 2 else (False, True):
            previewer = Previewer(partial(write_atomically, tmp / "preview.webp")) if with_previews else None
            start = time.perf_counter()
            engine.run(PHOTO, params, tmp, preview=previewer)
            seconds = time.perf_counter() - start
            if previewer is None:
                plain.append(seconds)
                continue
            previewed.append(seconds)
            shares.append(previewer.pace.spent / seconds)
            made.append(previewer.pace.made)
    one = {kind: _one_default_preview(tmp, _default_latents(kind)) for kind in ("photo", "noise")}
    size = f"{params.width}x{params.height}, {params.num_frames} frames, {params.num_inference_steps} steps"
    slower = median(previewed) / median(plain) - 1
    return Section(
        "preview",
        [
            Row(
                f"time making previews / generation time, tiny model ({size}), median / max of {runs}; previews made",
                f"{median(shares):.2%} / {max(shares):.2%}; {median(made):.0f} per generation",
                f"≤ {MAX_SHARE:.0%}",
                max(shares) <= MAX_SHARE,
            ),
            Row(
                f"generation time without / with previews, median of {runs} (same runs)",
                f"{median(plain):.2f} / {median(previewed):.2f} s ({slower:+.1%})",
            ),
            Row(
                f"one preview of a default video ({DEFAULT_LATENTS[0]} frames of "
                f"{DEFAULT_LATENTS[3]}x{DEFAULT_LATENTS[2]} "
                f"latents), on the CPU: to float32, project, encode, write; median of {ONE_PREVIEW_REPEATS}, "
                "latents of a photo pan / of noise",
                f"{one['photo'] * 1000:.1f} / {one['noise'] * 1000:.1f} ms: at a {SHARE:.0%} share, one preview per "
                f"{one['photo'] / SHARE:.2f} / {one['noise'] / SHARE:.2f} s of generation at most",
            ),
        ],
        {
            "request": request,
            "plain_seconds": plain,
            "previewed_seconds": previewed,
            "preview_shares": shares,
            "previews_made": made,
            "one_default_preview_seconds": one,
        },
    )


def _one_default_preview(tmp: Path, latents: torch.Tensor) -> float:
    """The host's part of one preview, all of its cost once the GPU has finished the step: the
    float16 latents (frames, 4, h, w) to float32, projected, encoded and written."""
    seconds = []
    for _ in range(ONE_PREVIEW_REPEATS):
        start = time.perf_counter()
        write_atomically(tmp / "default.webp", encode(latents_to_rgb(latents.float().numpy()), 7))
        seconds.append(time.perf_counter() - start)
    return median(seconds)


def _default_latents(kind: str) -> torch.Tensor:
    """A default video's float16 latents: noise, as early in a denoising, or latents that project
    to a pan across the photo, as a preview looks once the video has taken shape (it encodes
    faster and smaller)."""
    frames, _, height, width = DEFAULT_LATENTS
    if kind == "noise":
        return torch.randn(*DEFAULT_LATENTS, generator=torch.Generator().manual_seed(0)).half()
    photo = np.asarray(Image.open(PHOTO).convert("RGB").resize((width + frames, height + frames // 2)), np.float32)
    pan = np.stack([photo[index // 2 : index // 2 + height, index : index + width] for index in range(frames)])
    # The least-squares inverse of the projection: latents whose preview is the pan.
    latents = (pan / 127.5 - 1) @ np.linalg.pinv(LATENT_RGB)
    return torch.from_numpy(np.moveaxis(latents, -1, 1).copy()).half()

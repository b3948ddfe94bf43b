"""A live preview of the video being made: what denoising predicts so far, as a small animated image.

Every few steps the model's prediction of the denoised latents is projected to RGB with a
fixed linear map, one pixel per latent (128x72 for a 1024x576 video), and written as an
animated WebP that plays at the video's frame rate. No VAE runs and no weights are added.

Each preview is handed whole to what keeps it, which stores it all or nothing, so a reader
never sees half a file; the running jobs' previews are kept by svd/storage/previews.py, in a
folder or a bucket.

Pacing keeps the cost bounded: a preview is made only while the previews so far, and
the next one, stay within SHARE of the generation's time.

This module imports neither torch nor Pillow at its top: a generation imports them.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(f"bentoml.{__name__}")

# SVD's latent space is Stable Diffusion's (its VAE encoder is SD's; only the decoder is
# temporal), so the SD 1.5 latent-to-RGB approximation fits it: these are ComfyUI's factors
# (comfy/latent_formats.py, SD15.latent_rgb_factors), which ComfyUI also uses for its SVD
# previews (comfy/supported_models.py, SVD_img2vid.latent_format = SD15). A row per latent
# channel; they map a scaled latent, as the pipeline holds it, to R, G, B in [-1, 1].
LATENT_RGB = np.array(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ],
    dtype=np.float32,
)
# Lossy at the fastest method: a preview is looked at for a second, then replaced.
QUALITY = 70
# The issue allows 3 % of the generation's time; the pacing aims below it, since a preview
# may cost more than the one before it.
SHARE = 0.02
# The page polls every 0.4 s: previews made more often than that are never seen.
MIN_INTERVAL = 0.5
# What the first preview is taken to cost, before one has been timed: it comes once the
# generation has run FIRST_COST / SHARE seconds (1 s).
FIRST_COST = 0.02


def latents_to_rgb(latents: np.ndarray) -> np.ndarray:
    """Scaled latents (frames, 4, h, w) to uint8 RGB frames (frames, h, w, 3), one pixel per latent."""
    rgb = np.moveaxis(latents.astype(np.float32, copy=False), 1, -1) @ LATENT_RGB
    return ((rgb + 1) * 127.5).clip(0, 255).round().astype(np.uint8)


def encode(frames: np.ndarray, fps: int) -> bytes:
    """uint8 RGB frames (frames, h, w, 3) as an animated WebP that loops at `fps`. libwebp stores
    identical consecutive frames once, for their summed time."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    out = io.BytesIO()
    images[0].save(
        out,
        "WEBP",
        save_all=True,
        append_images=images[1:],
        duration=round(1000 / fps),
        loop=0,
        quality=QUALITY,
        method=0,
    )
    return out.getvalue()


class Pace:
    """When the next preview is due: never sooner than `min_interval` after the last, and only
    while the time spent on previews, the next one's included, stays within `share` of the
    time since `started`. The next one is taken to cost what the last one did."""

    def __init__(self, started: float, share: float = SHARE, min_interval: float = MIN_INTERVAL):
        self.started = started
        self.share = share
        self.min_interval = min_interval
        self.spent = 0.0
        self.made = 0
        self._last = started
        self._cost = FIRST_COST

    def due(self, now: float) -> bool:
        return now - self._last >= self.min_interval and self.spent + self._cost <= self.share * (now - self.started)

    def record(self, start: float, end: float) -> None:
        """A preview was made from `start` to `end`."""
        self._last, self._cost = end, end - start
        self.spent += self._cost
        self.made += 1


class Previewer:
    """Hands the latest preview of one generation to `keep` (which stores it whole, replacing the
    last one), paced by `pace`.

    The generation core enters `watching` around its denoising and offers the latents
    after each step; it knows nothing else of previews.
    """

    def __init__(
        self, keep: Callable[[bytes], None], pace: Pace | None = None, clock: Callable[[], float] = time.perf_counter
    ):
        self.keep = keep
        self.clock = clock
        self.pace = pace or Pace(clock())
        self._predicted: torch.Tensor | None = None
        self._failed = False

    @contextmanager
    def watching(self, scheduler: Any) -> Iterator[None]:
        """Keep the scheduler's prediction of the denoised latents at each step.

        The latents the step callback sees are the noisy ones, which SVD's schedule (sigma
        from 700) leaves noise for most of the steps; the prediction shows the video from
        the first step on, as ComfyUI's previews do. diffusers' schedulers return it from
        `step`, which the pipeline calls but does not pass on, hence the wrapper on this
        scheduler for this denoising only.
        """
        step = scheduler.step

        def predicting(*args: Any, **kwargs: Any) -> Any:
            output = step(*args, **kwargs)
            self._predicted = getattr(output, "pred_original_sample", None)
            return output

        scheduler.step = predicting
        try:
            yield
        finally:
            del scheduler.step  # the class's own method again
            self._predicted = None

    def offer(self, latents: torch.Tensor, fps: int) -> None:
        """The latents (1, frames, 4, h, w) after a step: a preview is made when one is due."""
        if self._failed or not self.pace.due(self.clock()):
            return
        predicted = latents if self._predicted is None else self._predicted
        # Waits for the GPU to finish the step, which it would do anyway; only what follows
        # leaves it idle, so only that is counted.
        sample = predicted[0].detach().float().cpu().numpy()
        start = self.clock()
        try:
            self.keep(encode(latents_to_rgb(sample), fps))
        except OSError as exc:
            # A preview is for watching: a full disk or an unreachable bucket must not fail the generation.
            self._failed = True
            logger.warning("SVD could not write a preview, and makes no more for this generation: %s", exc)
            return
        self.pace.record(start, self.clock())

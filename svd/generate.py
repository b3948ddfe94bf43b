"""One generation: image in, video file out, with each stage timed.

The pipeline stops at latents; decoding happens here, chunk by chunk, each chunk
going straight into the encoder. That keeps peak memory at one chunk of frames,
and lets a decode that runs out of GPU memory retry with smaller chunks without
redoing the denoising.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from svd import metrics
from svd.faults import Faults
from svd.loading import LoadedModel
from svd.params import GenerationParams
from svd.video import CODECS, VideoWriter

logger = logging.getLogger("bentoml.svd")

STAGES = ("prepare", "encode", "denoise", "decode", "video")


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory outside the decode, or at a decode chunk of 1."""


class DeadlineExceeded(RuntimeError):
    """The request ran past its time limit and was stopped between steps."""


@dataclass
class Progress:
    """Where a generation is: its stage, and the step within it."""

    stage: str = "queued"
    step: int = 0
    steps: int = 0


ProgressCallback = Callable[[Progress], None]


@dataclass
class StageTimes:
    """Seconds spent in each stage of one generation."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def server_timing(self) -> str:
        """The value of a Server-Timing header, in milliseconds as the standard wants."""
        return ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in self.seconds.items())


@dataclass
class Generation:
    """What came out of one request: the file and everything needed to reproduce it."""

    path: Path
    params: GenerationParams
    content_type: str
    decode_chunk_size: int
    times: StageTimes


class VideoGenerator:
    """Runs generations one at a time on the loaded model."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.faults = Faults()
        # One GPU, one generation: concurrent requests and jobs wait here
        # instead of fighting over memory.
        self._lock = threading.Lock()
        self._waiting = 0
        self._count_lock = threading.Lock()
        self.last_seconds = 0.0

    @property
    def in_flight(self) -> int:
        """Generations admitted: running, waiting for the GPU, or preparing their image."""
        return self._waiting

    @contextmanager
    def admitted(self, limit: int) -> Iterator[bool]:
        """Take one of `limit` places in the queue, atomically; yields False when all are taken."""
        with self._count_lock:
            admitted = self._waiting < limit
            self._waiting += admitted
            metrics.IN_FLIGHT.set(self._waiting)
        try:
            yield admitted
        finally:
            with self._count_lock:
                self._waiting -= admitted
                metrics.IN_FLIGHT.set(self._waiting)

    def generate(
        self,
        image: Image.Image,
        params: GenerationParams,
        out_dir: Path,
        times: StageTimes | None = None,
        on_progress: ProgressCallback | None = None,
        deadline: float | None = None,
    ) -> Generation:
        """Generate a video from a prepared image with resolved params (see GenerationParams.resolve)."""
        times = times or StageTimes()
        report = on_progress or (lambda _: None)
        path = out_dir / f"video.{params.format}"
        report(Progress("queued"))
        with self._lock:
            start = time.perf_counter()
            try:
                latents = self._denoise(image, params, times, report, deadline)
                chunk = self._decode_into(path, latents, params, times, report, deadline)
            finally:
                latents = None  # drop our reference so release_memory can free it
                self.release_memory()
            self.last_seconds = time.perf_counter() - start
        return Generation(path, params, CODECS[params.format].content_type, chunk, times)

    def release_memory(self) -> None:
        """Give back what the last generation held, so memory after many requests equals after one."""
        gc.collect()
        self.model.pipe.maybe_free_model_hooks()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def _denoise(
        self,
        image: Image.Image,
        params: GenerationParams,
        times: StageTimes,
        report: ProgressCallback,
        deadline: float | None,
    ) -> torch.Tensor:
        pipe = self.model.pipe
        generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        start = time.perf_counter()
        first_step: list[float] = []

        def mark_first_step(*_: object) -> None:
            # The first UNet call marks the end of image encoding (CLIP and VAE encoder).
            if not first_step:
                first_step.append(time.perf_counter())
                self.faults.check("denoise")

        def after_step(_pipe: object, step: int, _t: object, tensors: dict) -> dict:
            report(Progress("denoise", step + 1, params.num_inference_steps))
            _check_deadline(deadline, "denoising")
            return tensors

        report(Progress("encode"))
        hook = pipe.unet.register_forward_pre_hook(mark_first_step)
        try:
            latents = pipe(
                image,
                width=params.width,
                height=params.height,
                num_frames=params.num_frames,
                num_inference_steps=params.num_inference_steps,
                min_guidance_scale=params.min_guidance_scale,
                max_guidance_scale=params.max_guidance_scale,
                fps=params.fps,
                motion_bucket_id=params.motion_bucket_id,
                noise_aug_strength=params.noise_aug_strength,
                generator=generator,
                output_type="latent",
                callback_on_step_end=after_step,
            ).frames
        except torch.OutOfMemoryError as exc:
            raise OutOfMemory(f"the GPU ran out of memory while denoising ({exc})") from None
        finally:
            hook.remove()
        end = time.perf_counter()
        encoded = first_step[0] if first_step else end
        times.seconds["encode"] += encoded - start
        times.seconds["denoise"] += end - encoded
        return latents

    def _decode_into(
        self,
        path: Path,
        latents: torch.Tensor,
        params: GenerationParams,
        times: StageTimes,
        report: ProgressCallback,
        deadline: float | None,
    ) -> int:
        """Decode the latents chunk by chunk into the video file; returns the chunk size finally used."""
        latents = 1 / self.model.pipe.vae.config.scaling_factor * latents[0]
        chunk = params.decode_chunk_size
        done = 0
        writer = VideoWriter(path, params.width, params.height, params.fps, params.format)
        try:
            while done < len(latents):
                report(Progress("decode", done, len(latents)))
                _check_deadline(deadline, "decoding")
                try:
                    with times.measure("decode"):
                        frames = self.decode_frames(latents[done : done + chunk])
                except torch.OutOfMemoryError as exc:
                    if chunk == 1:
                        raise OutOfMemory(f"the GPU ran out of memory decoding even one frame at a time ({exc})") from None
                    self.release_memory()
                    logger.warning(
                        "Out of GPU memory decoding %d frames at once; retrying with %d (%s)", chunk, chunk // 2, str(exc)
                    )
                    metrics.OOM_RETRIES.inc()
                    chunk //= 2
                    continue
                with times.measure("video"):
                    writer.write(frames)
                done += len(frames)
            report(Progress("video", done, len(latents)))
        finally:
            with times.measure("video"):
                writer.close()
        report(Progress("done", done, len(latents)))
        return chunk

    @torch.no_grad()
    def decode_frames(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents (frames, 4, h, w) to uint8 RGB frames (frames, H, W, 3), as diffusers rounds them."""
        self.faults.check("decode")
        vae = self.model.pipe.vae
        pixels = vae.decode(latents.to(vae.dtype), num_frames=len(latents)).sample
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _check_deadline(deadline: float | None, stage: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"the request ran past its time limit and was stopped while {stage}")

"""One generation: image in, video file out, with each stage timed.

The pipeline stops at latents; decoding happens here, chunk by chunk, each chunk
going straight into the encoder. That keeps peak memory at one chunk of frames,
and lets a decode that runs out of GPU memory retry with smaller chunks without
redoing the denoising.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from svd.loading import LoadedModel
from svd.params import GenerationParams
from svd.video import CODECS, VideoWriter

logger = logging.getLogger(__name__)

STAGES = ("prepare", "encode", "denoise", "decode", "video")


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
    frames: int
    decode_chunk_size: int
    times: StageTimes


class VideoGenerator:
    """Runs generations one at a time on the loaded model."""

    def __init__(self, model: LoadedModel):
        self.model = model
        # One GPU, one generation: concurrent requests wait here instead of
        # fighting over memory.
        self._lock = threading.Lock()

    def generate(
        self,
        image: Image.Image,
        params: GenerationParams,
        out_dir: Path,
        times: StageTimes | None = None,
    ) -> Generation:
        """Generate a video from a prepared image with resolved params (see GenerationParams.resolve)."""
        times = times or StageTimes()
        assert params.num_frames is not None and params.seed is not None, "params must be resolved"
        path = out_dir / f"video.{params.format}"
        with self._lock:
            try:
                latents = self._denoise(image, params, times)
                chunk = self._decode_into(path, latents, params, times)
            finally:
                if self.model.device.type == "cuda":
                    torch.cuda.empty_cache()
        return Generation(path, params, CODECS[params.format].content_type, params.num_frames, chunk, times)

    def _denoise(self, image: Image.Image, params: GenerationParams, times: StageTimes) -> torch.Tensor:
        pipe = self.model.pipe
        generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        start = time.perf_counter()
        first_step: list[float] = []

        def mark_first_step(*_: object) -> None:
            # The first UNet call marks the end of image encoding (CLIP and VAE encoder).
            if not first_step:
                first_step.append(time.perf_counter())

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
            ).frames
        finally:
            hook.remove()
        end = time.perf_counter()
        encoded = first_step[0] if first_step else end
        times.seconds["encode"] += encoded - start
        times.seconds["denoise"] += end - encoded
        return latents

    def _decode_into(self, path: Path, latents: torch.Tensor, params: GenerationParams, times: StageTimes) -> int:
        """Decode the latents chunk by chunk into the video file; returns the chunk size used."""
        latents = 1 / self.model.pipe.vae.config.scaling_factor * latents[0]
        chunk = params.decode_chunk_size
        writer = VideoWriter(path, params.width, params.height, params.fps, params.format)
        try:
            for start in range(0, len(latents), chunk):
                with times.measure("decode"):
                    frames = self.decode_frames(latents[start : start + chunk])
                with times.measure("video"):
                    writer.write(frames)
        finally:
            with times.measure("video"):
                writer.close()
        return chunk

    @torch.no_grad()
    def decode_frames(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents (frames, 4, h, w) to uint8 RGB frames (frames, H, W, 3), as diffusers rounds them."""
        vae = self.model.pipe.vae
        pixels = vae.decode(latents.to(vae.dtype), num_frames=len(latents)).sample
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

"""Stable Video Diffusion XT as a BentoML service: a still image in, a short video out.

Serve it with `bentoml serve` and open http://localhost:3000 for the Swagger UI.
Configuration is read from the environment once, in svd/config.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.validators import ContentType
from pydantic import Field

from svd.config import Settings
from svd.generate import Generation, StageTimes, VideoGenerator
from svd.images import prepare_image
from svd.loading import hub_reference, load_pipeline
from svd.params import (
    DecodeChunkSize,
    Fps,
    GenerationParams,
    Height,
    ImageSizing,
    MaxGuidanceScale,
    MinGuidanceScale,
    MotionBucketId,
    NoiseAugStrength,
    NumFrames,
    NumInferenceSteps,
    OutputFormat,
    Seed,
    Width,
)

logger = logging.getLogger("bentoml.svd")
SETTINGS = Settings.from_env()


@bentoml.service(resources={"gpu": 1, "gpu_type": "nvidia-l4"}, traffic={"timeout": 600})
class StableDiffusionVideo:
    # Declared for the hub model only: a Bento then pins its revision and
    # `bentoml containerize` bakes the weights in. None for tiny or a local directory.
    hub_model = hub_reference(SETTINGS)

    def __init__(self) -> None:
        self.model = load_pipeline(SETTINGS, (lambda: self.hub_model) if self.hub_model else None)
        self.generator = VideoGenerator(self.model)
        logger.info(
            "Loaded %s (%s) on %s as %s in %.1f s",
            SETTINGS.model_id, self.model.source, self.model.device, self.model.dtype, self.model.load_seconds,
        )

    @bentoml.api
    def generate(
        self,
        context: bentoml.Context,
        image: Annotated[Path, Field(description="The still image: PNG, JPEG, WebP, BMP, GIF or TIFF.")],
        decode_chunk_size: DecodeChunkSize = 2,
        seed: Seed = None,
        width: Width = 1024,
        height: Height = 576,
        num_frames: NumFrames = None,
        num_inference_steps: NumInferenceSteps = 25,
        fps: Fps = 7,
        motion_bucket_id: MotionBucketId = 127,
        noise_aug_strength: NoiseAugStrength = 0.02,
        min_guidance_scale: MinGuidanceScale = 1.0,
        max_guidance_scale: MaxGuidanceScale = 3.0,
        sizing: ImageSizing = "stretch",
        format: OutputFormat = "mp4",
    ) -> Annotated[Path, ContentType("video/*")]:
        """Turn a still image into a short video (25 frames at 1024x576 by default).

        The seed actually used comes back in the X-Seed header, every effective
        setting in X-Settings, and the seconds per stage in Server-Timing.
        """
        params = GenerationParams(
            width=width,
            height=height,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            decode_chunk_size=decode_chunk_size,
            seed=seed,
            fps=fps,
            motion_bucket_id=motion_bucket_id,
            noise_aug_strength=noise_aug_strength,
            min_guidance_scale=min_guidance_scale,
            max_guidance_scale=max_guidance_scale,
            sizing=sizing,
            format=format,
        ).resolve(self.model.max_frames)
        times = StageTimes()
        with times.measure("prepare"):
            picture = prepare_image(image, params.width, params.height, params.sizing, SETTINGS.max_pixels)
        result = self.generator.generate(picture, params, Path(context.temp_dir), times)
        context.response.headers.update(response_headers(result))
        return result.path


def response_headers(result: Generation) -> dict[str, str]:
    """What a caller needs to reproduce or report a result, without guessing defaults."""
    settings = {**result.params.__dict__, "decode_chunk_size": result.decode_chunk_size}
    return {
        "Content-Type": result.content_type,
        "X-Seed": str(result.params.seed),
        "X-Settings": json.dumps(settings, separators=(",", ":")),
        "X-Decode-Chunk-Size": str(result.decode_chunk_size),
        "Server-Timing": result.times.server_timing(),
    }

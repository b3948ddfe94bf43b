"""Every input check of the API in one place: the field types the service signature uses,
and the checks that need the loaded model or more than one field."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

from svd.errors import BadInput
from svd.images import Sizing
from svd.video import VideoFormat

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Range:
    """An inclusive numeric range, optionally in steps; its text is what error messages say."""

    low: float
    high: float
    step: int = 1

    def __str__(self) -> str:
        span = f"from {_number(self.low)} to {_number(self.high)}"
        return f"a multiple of {self.step} {span}" if self.step > 1 else span

    def __call__(self, value: float) -> float:
        inside = math.isfinite(value) and self.low <= value <= self.high
        if not inside or (self.step > 1 and value % self.step):
            raise ValueError(f"must be {self}, got {value}")
        return value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def bounded(kind: type, description: str, allowed: Range) -> Any:
    """A field type whose description and OpenAPI schema show the allowed range."""
    schema: dict[str, Any] = {"minimum": allowed.low, "maximum": allowed.high}
    if allowed.step > 1:
        schema["multipleOf"] = allowed.step
    return Annotated[
        kind, Field(description=f"{description} Allowed: {allowed}.", json_schema_extra=schema), AfterValidator(allowed)
    ]


SIDE = Range(64, 1024, 64)
Width = bounded(int, "Video width in pixels.", SIDE)
Height = bounded(int, "Video height in pixels.", SIDE)
NumFrames = Annotated[
    int | None,
    Field(description="Frames to generate; empty for the model's own (25 for SVD-XT). Allowed: from 1 to the model's."),
]
NumInferenceSteps = bounded(int, "Denoising steps; more is slower and usually sharper.", Range(1, 100))
DecodeChunkSize = bounded(
    int, "Frames decoded at once; lower uses less GPU memory but may flicker.", Range(1, 64)
)
Seed = Annotated[
    int | None,
    Field(description=f"Random seed; empty or null draws one, reported back in X-Seed. Allowed: from 0 to {MAX_SEED}."),
    AfterValidator(lambda seed: seed if seed is None else Range(0, MAX_SEED)(seed)),
]
Fps = bounded(int, "Frame rate the model is conditioned on and the video plays at.", Range(1, 60))
MotionBucketId = bounded(int, "Amount of motion; higher moves more.", Range(0, 255))
NoiseAugStrength = bounded(
    float, "Noise added to the conditioning image; higher drifts further from it.", Range(0, 1)
)
MinGuidanceScale = bounded(float, "Guidance for the first frame; 1 or less turns guidance off.", Range(0, 20))
MaxGuidanceScale = bounded(
    float, "Guidance for the last frame, ramped from min_guidance_scale; 1 or less turns guidance off.", Range(0, 20)
)
def _text(value: Any) -> Any:
    """A bare word as text: Swagger UI sends every form field as an application/json part, and
    BentoML 1.4.39 hands one that is not JSON (`crop`, unquoted) to validation as bytes."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


ImageSizing = Annotated[
    Sizing,
    BeforeValidator(_text),
    Field(description="How the image reaches width x height: stretch it, crop it to cover, or pad it to fit."),
]
OutputFormat = Annotated[
    VideoFormat,
    BeforeValidator(_text),
    Field(description="mp4 (H.264, plays everywhere), webm (VP9) or gif (loops)."),
]


@dataclass(frozen=True)
class GenerationParams:
    """A validated request; `num_frames` and `seed` are filled in by `resolve`."""

    width: int = 1024
    height: int = 576
    num_frames: int | None = None
    num_inference_steps: int = 25
    decode_chunk_size: int = 2
    seed: int | None = None
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0
    sizing: Sizing = "stretch"
    format: VideoFormat = "mp4"

    def resolve(self, max_frames: int) -> GenerationParams:
        """Check what depends on the model or on two fields; fill in the frames and the seed."""
        num_frames = max_frames if self.num_frames is None else self.num_frames
        if not 1 <= num_frames <= max_frames:
            raise BadInput(f"num_frames must be from 1 to {max_frames} for this model, got {num_frames}.")
        if self.min_guidance_scale > self.max_guidance_scale:
            raise BadInput(
                f"min_guidance_scale ({self.min_guidance_scale:g}) must not be above "
                f"max_guidance_scale ({self.max_guidance_scale:g})."
            )
        seed = secrets.randbelow(MAX_SEED + 1) if self.seed is None else self.seed
        return GenerationParams(**{**self.__dict__, "num_frames": num_frames, "seed": seed})

"""The API's field types: the descriptions, defaults and ranges Swagger shows, checked by pydantic."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

from svd.images import Sizing
from svd.params import MAX_SEED, Range
from svd.video import VideoFormat


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

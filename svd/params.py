"""A generation request and the checks that need the loaded model or more than one field.

The field types of the API, with their ranges, are in svd/fields.py."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

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

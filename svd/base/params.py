"""The generation controls, declared once: `GenerationParams` and, derived from it, `CONTROLS`.

Each field carries its default, its description, what it allows and how the web page
shows it. The API's fields (svd/http/request_fields.py), the page's form (/ui/controls.json), the
batch client's flags and the README's table are all made from, or checked against, it.
Adding a control means adding a field here and using it where the video is made.
"""

from __future__ import annotations

import math
import secrets
import types
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from svd.base.errors import BadInput

Sizing = Literal["stretch", "crop", "pad"]
VideoFormat = Literal["mp4", "webm", "gif"]
Interpolation = Literal[1, 2, 4]
Loop = Literal["none", "pingpong"]

MAX_SEED = 2**32 - 1
MAX_SEGMENTS = 4
# GIF frame delays are in hundredths of a second, and browsers slow down delays under 0.02 s.
MAX_GIF_FPS = 50


@dataclass(frozen=True)
class Range:
    """An inclusive numeric range, optionally in steps; its text is what error messages say.

    Without `high` the top is `up_to` in words, checked where it is known (`resolve`).
    """

    low: float
    high: float | None = None
    step: int = 1
    up_to: str = ""

    def __str__(self) -> str:
        top = self.up_to if self.high is None else _number(self.high)
        span = f"from {_number(self.low)} to {top}"
        return f"a multiple of {self.step} {span}" if self.step > 1 else span

    def __call__(self, value: float) -> float:
        inside = math.isfinite(value) and self.low <= value and (self.high is None or value <= self.high)
        if not inside or (self.step > 1 and value % self.step):
            raise ValueError(f"must be {self}, got {value}")
        return value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Widget:
    """How the web page shows a control."""

    label: str
    advanced: bool = False
    slider: bool = False
    # The page's increment for a float field.
    step: float | None = None
    # The page's words for each choice.
    options: dict[Any, str] = field(default_factory=dict)


def control(
    default: Any, description: str, allowed: Range | None = None, *, empty: str = "", **look: Any
) -> Any:
    """A field of GenerationParams: `empty` says what leaving it out means when the default is None."""
    return field(
        default=default,
        metadata={"description": description, "allowed": allowed, "empty": empty, "look": Widget(**look)},
    )


SIDE = Range(64, 1024, 64)
GUIDANCE = Range(0, 20)


@dataclass(frozen=True)
class GenerationParams:
    """A request's controls, in the tutorial's order; `num_frames` and `seed` are filled in by `resolve`."""

    decode_chunk_size: int = control(
        2,
        "Frames decoded at once; lower uses less GPU memory but may flicker.",
        Range(1, 64),
        label="Decode chunk",
        advanced=True,
    )
    seed: int | None = control(
        None,
        "Random seed; empty or null draws one, reported back in X-Seed.",
        Range(0, MAX_SEED),
        empty="random",
        label="Seed",
    )
    width: int = control(1024, "Video width in pixels.", SIDE, label="Width (px)", advanced=True)
    height: int = control(576, "Video height in pixels.", SIDE, label="Height (px)", advanced=True)
    num_frames: int | None = control(
        None,
        "Frames to generate; empty for the model's own.",
        Range(1, up_to="the model's own"),
        empty="the model's own (25 for SVD-XT)",
        label="Frames",
    )
    num_inference_steps: int = control(
        25, "Denoising steps; more is slower and usually sharper.", Range(1, 100), label="Steps", advanced=True
    )
    cache_interval: int = control(
        1,
        "Steps per full UNet pass: 1 runs every step in full; n runs one in n in full and the rest on "
        "its deep features (DeepCache), faster and a little less faithful.",
        Range(1, 5),
        label="Cache interval",
        advanced=True,
    )
    fps: int = control(
        7, "Frame rate the model is conditioned on and the video plays at.", Range(1, 60), label="Frame rate (fps)"
    )
    motion_bucket_id: int = control(
        127, "Amount of motion; higher moves more.", Range(0, 255), label="Motion", slider=True
    )
    noise_aug_strength: float = control(
        0.02,
        "Noise added to the conditioning image; higher drifts further from it.",
        Range(0, 1),
        label="Noise",
        advanced=True,
        step=0.01,
    )
    min_guidance_scale: float = control(
        1.0,
        "Guidance for the first frame; 1 or less turns guidance off.",
        GUIDANCE,
        label="Min guidance",
        advanced=True,
        step=0.1,
    )
    max_guidance_scale: float = control(
        3.0,
        "Guidance for the last frame, ramped from min_guidance_scale; 1 or less turns guidance off.",
        GUIDANCE,
        label="Max guidance",
        advanced=True,
        step=0.1,
    )
    sizing: Sizing = control(
        "stretch",
        "How the image reaches width x height: stretch it, crop it to cover, or pad it to fit.",
        label="Fit the image by",
        options={"stretch": "stretching it", "crop": "cropping to cover", "pad": "padding to fit"},
    )
    format: VideoFormat = control(
        "mp4",
        "mp4 (H.264, plays everywhere), webm (VP9) or gif (loops).",
        label="Format",
        options={"mp4": "MP4", "webm": "WebM", "gif": "GIF"},
    )
    interpolate: Interpolation = control(
        1,
        "Frames made between each pair by motion interpolation: n frames at fps become (n-1)*k+1 at k*fps, "
        "the same duration, smoother.",
        label="Smoother (interpolate)",
        options={1: "off", 2: "2x frame rate", 4: "4x frame rate"},
    )
    segments: int = control(
        1,
        "Segments chained into one video, each generated from the last frame of the one before, with seeds "
        "seed, seed+1 and so on; n frames each, the shared frames once.",
        Range(1, MAX_SEGMENTS),
        label="Segments (longer)",
    )
    loop: Loop = control(
        "none",
        "pingpong plays the video forward, then backward without repeating the end frames: a seamless loop.",
        label="Loop",
        options={"none": "no", "pingpong": "forward and back"},
    )

    def resolve(self, max_frames: int) -> GenerationParams:
        """Check what depends on the model or on two fields; fill in the frames and the seed."""
        num_frames = max_frames if self.num_frames is None else self.num_frames
        if not 1 <= num_frames <= max_frames:
            raise BadInput(f"num_frames must be from 1 to {max_frames} for this model, got {num_frames}.")
        self.check()
        seed = secrets.randbelow(MAX_SEED + 1) if self.seed is None else self.seed
        return GenerationParams(**{**self.__dict__, "num_frames": num_frames, "seed": seed})

    def check(self) -> None:
        """What depends on two fields: checked before a job is accepted, and again before it runs."""
        if self.min_guidance_scale > self.max_guidance_scale:
            raise BadInput(
                f"min_guidance_scale ({self.min_guidance_scale:g}) must not be above "
                f"max_guidance_scale ({self.max_guidance_scale:g})."
            )
        if self.format == "gif" and self.fps * self.interpolate > MAX_GIF_FPS:
            raise BadInput(
                f"fps x interpolate must be at most {MAX_GIF_FPS} for a gif (GIF counts in hundredths of a "
                f"second), got {self.fps} x {self.interpolate}; lower one, or ask for mp4 or webm."
            )


@dataclass(frozen=True)
class Control:
    """One field of GenerationParams, as the API, the page, the CLI and the README present it."""

    name: str
    kind: type
    default: Any
    description: str
    allowed: Range | tuple[str, ...]
    nullable: bool
    empty: str
    look: Widget

    @property
    def choices(self) -> tuple[Any, ...]:
        return () if isinstance(self.allowed, Range) else self.allowed

    def check(self, value: Any) -> Any:
        """The value if allowed; ValueError saying what is allowed otherwise."""
        if value is None or not isinstance(self.allowed, Range):
            return value
        return self.allowed(value)

    @property
    def allowed_text(self) -> str:
        """What is allowed, in the README's words: a range, or the choices as code."""
        if isinstance(self.allowed, Range):
            return f"{self.allowed}, or null" if self.nullable else str(self.allowed)
        return ", ".join(f"`{choice}`" for choice in self.allowed)

    @property
    def default_text(self) -> str:
        if self.default is None:
            return self.empty
        return f"`{self.default}`" if self.choices else str(self.default)

    @property
    def help(self) -> str:
        """The description with what is allowed, as Swagger and `--help` show it."""
        return f"{self.description} Allowed: {self.allowed_text.replace('`', '')}."

    def as_json(self) -> dict[str, Any]:
        """What the web page builds its form field from."""
        allowed = self.allowed
        limits = (
            {
                "min": allowed.low,
                "max": allowed.high,
                "step": allowed.step if self.kind is int else self.look.step or "any",
            }
            if isinstance(allowed, Range)
            else {"options": [[choice, self.look.options.get(choice, str(choice))] for choice in allowed]}
        )
        return {
            "name": self.name,
            "type": self.kind.__name__,
            "default": self.default,
            "description": self.description,
            "placeholder": self.empty,
            **limits,
            "label": self.look.label,
            "advanced": self.look.advanced,
            "slider": self.look.slider,
        }


def _controls() -> tuple[Control, ...]:
    hints = get_type_hints(GenerationParams)
    controls = []
    for spec in fields(GenerationParams):
        kind = hints[spec.name]
        options = get_args(kind)
        nullable = get_origin(kind) in (Union, types.UnionType) and type(None) in options
        if nullable:
            (kind,) = [option for option in options if option is not type(None)]
        choices = get_args(kind) if get_origin(kind) is Literal else ()
        controls.append(
            Control(
                spec.name,
                type(choices[0]) if choices else kind,
                spec.default,
                spec.metadata["description"],
                choices or spec.metadata["allowed"],
                nullable,
                spec.metadata["empty"],
                spec.metadata["look"],
            )
        )
    return tuple(controls)


CONTROLS = _controls()

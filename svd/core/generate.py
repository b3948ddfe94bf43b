"""One generation: image in, video file out, with each stage timed.

The pipeline stops at latents; decoding happens here, chunk by chunk. That keeps
peak GPU memory at one chunk of frames, and lets a decode that runs out of GPU
memory retry with smaller chunks without redoing the denoising. Longer videos chain
segments, each from the last frame of the one before. The frames then leave the GPU
(and its lock): interpolation, the loop and encoding run while the next request uses it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from svd.base.params import GenerationParams
from svd.base.progress import Progress, ProgressCallback
from svd.core.deepcache import deep_cache
from svd.core.loading import LoadedModel
from svd.core.preview import Previewer
from svd.media.interpolate import interpolate, pingpong
from svd.media.video import CODECS, VideoWriter

logger = logging.getLogger(f"bentoml.{__name__}")

STAGES = ("prepare", "encode", "denoise", "decode", "interpolate", "video")
# The smallest generation the model accepts: enough to run every kernel once.
WARM_UP = GenerationParams(width=64, height=64, num_frames=2, num_inference_steps=1, seed=0)
# A compiled model compiles again for every new shape: warm it at the defaults, so
# that a default request, the common one, never pays for compiling.
COMPILED_WARM_UP = GenerationParams(num_inference_steps=1, seed=0)


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory and the request could not finish.

    `held_elsewhere` is the GPU memory other processes held just after: if they
    hold much, a retry may fit; if not, the request alone is too big for the GPU.
    """

    def __init__(self, message: str, held_elsewhere: int = 0):
        super().__init__(message)
        self.held_elsewhere = held_elsewhere


class Stopped(RuntimeError):
    """The generation was told to stop (its job was cancelled) and stopped between steps."""


class DeadlineExceeded(Stopped):
    """The request ran past its time limit and was stopped between steps."""


class DeviceFailure(RuntimeError):
    """The GPU failed in a way that leaves this process's CUDA context unusable
    (a device-side assert, an illegal memory access): only a restart recovers."""


@dataclass(frozen=True)
class Checkpoint:
    """Where a generation may stop between steps: past its deadline, or when told to."""

    deadline: float | None = None
    stop: threading.Event | None = None

    def __call__(self, stage: str) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped(f"the generation was stopped while {stage}")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(f"the request ran past its time limit and was stopped while {stage}")


NO_CHECKPOINT = Checkpoint()


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


@dataclass
class GenerationResult:
    """What came out of one request: the file, the params that made it (with the decode chunk
    size finally used) and the time of each stage."""

    path: Path
    params: GenerationParams
    times: StageTimes

    @property
    def content_type(self) -> str:
        return CODECS[self.params.format].content_type


def generate(
    model: LoadedModel,
    image: Image.Image,
    params: GenerationParams,
    out_dir: Path,
    times: StageTimes | None = None,
    report: ProgressCallback | None = None,
    deadline: float | None = None,
    on_decode_retry: Callable[[], None] = lambda: None,
    gpu: AbstractContextManager[object] = nullcontext(),  # noqa: B008 (stateless and reusable)
    stop: threading.Event | None = None,
    preview: Previewer | None = None,
) -> GenerationResult:
    """Generate a video from a prepared image with resolved params (see GenerationParams.resolve).

    `gpu` is held while the model runs (svd/serving/engine.py passes its turn, so that requests take
    turns), and let go before the frames are interpolated and encoded. Setting `stop` stops
    the generation at the next denoising step or decode chunk with Stopped. `preview` is
    offered the latents after each denoising step (svd/core/preview.py).
    """
    times = times or StageTimes()
    report = report or (lambda _: None)
    _in_segment(report, 1, params.segments)(Progress("queued"))
    checkpoint = Checkpoint(deadline, stop)
    with gpu:
        frames, chunk = render(model, image, params, times, report, checkpoint, on_decode_retry, preview)
    params = replace(params, decode_chunk_size=chunk)
    path = out_dir / f"video.{params.format}"
    # What follows is on the whole video, reported as in its last segment.
    finishing = _in_segment(report, params.segments, params.segments)
    write_video(path, frames, params, times, finishing)
    finishing(Progress("done"))
    return GenerationResult(path, params, times)


def render(
    model: LoadedModel,
    image: Image.Image,
    params: GenerationParams,
    times: StageTimes,
    report: ProgressCallback,
    checkpoint: Checkpoint,
    on_decode_retry: Callable[[], None],
    preview: Previewer | None = None,
) -> tuple[np.ndarray, int]:
    """Every segment's frames as uint8 (frames, H, W, 3), a frame shared by two segments once,
    and the decode chunk size finally used."""
    chunk = params.decode_chunk_size
    parts: list[np.ndarray] = []
    with _releasing(model):
        for segment in range(params.segments):
            in_segment = _in_segment(report, segment + 1, params.segments)
            seeded = replace(params, seed=params.seed + segment)
            # Handed straight over, the latents live only inside _decode: they are gone
            # by the time memory is released.
            frames, chunk = _decode(
                model,
                denoise(model, image, seeded, times, in_segment, checkpoint, preview),
                chunk,
                times,
                in_segment,
                checkpoint,
                on_decode_retry,
            )
            parts.append(frames if segment == 0 else frames[1:])
            image = Image.fromarray(frames[-1])
    return np.concatenate(parts), chunk


def _in_segment(report: ProgressCallback, segment: int, segments: int) -> ProgressCallback:
    return lambda progress: report(replace(progress, segment=segment, segments=segments))


def write_video(
    path: Path, frames: np.ndarray, params: GenerationParams, times: StageTimes, report: ProgressCallback
) -> None:
    """Interpolate, loop and encode the frames into the file at `path`."""
    if params.interpolate > 1:
        report(Progress("interpolate"))
        with times.measure("interpolate"):
            frames = interpolate(frames, params.fps, params.interpolate)
    if params.loop == "pingpong":
        frames = pingpong(frames)
    report(Progress("video"))
    with times.measure("video"):
        writer = VideoWriter(path, params.width, params.height, params.fps * params.interpolate, params.format)
        try:
            writer.write(frames)
        finally:
            writer.close()


def warm_up(model: LoadedModel, params: GenerationParams) -> None:
    """Run every kernel at these shapes once: one denoising step, then one decode of each
    chunk length a request with these params decodes, without making a video."""
    image = Image.new("RGB", (params.width, params.height), (128, 128, 128))
    with _releasing(model):
        latents = denoise(model, image, params)
        scaled = latents[0] / model.pipe.vae.config.scaling_factor
        for length in chunk_lengths(len(scaled), params.decode_chunk_size):
            decode_frames(model, scaled[:length])
        del latents, scaled


@contextmanager
def _releasing(model: LoadedModel) -> Iterator[None]:
    """Give back what the block held once it is over, failed or not.

    A failure's traceback holds the frames of the calls that failed, and with
    them their tensors: it is dropped before releasing, or nothing would be freed.
    """
    failure: BaseException | None = None
    try:
        yield
    except torch.OutOfMemoryError as exc:
        failure = OutOfMemory(f"the GPU ran out of memory ({exc})")
    except (OutOfMemory, Stopped) as exc:
        failure = exc.with_traceback(None)
    except RuntimeError as exc:
        if not is_device_failure(exc):
            raise
        # The CUDA context is gone: every further call on it fails too.
        raise DeviceFailure(f"the GPU failed and this worker must be restarted: {exc}") from None
    _restore_vae_dtype(model)
    release_memory(model, emptying_cache=failure is not None)
    if isinstance(failure, OutOfMemory):
        failure.held_elsewhere = memory_held_elsewhere(model.device)
    if failure is not None:
        raise failure


def release_memory(model: LoadedModel, emptying_cache: bool = False) -> None:
    """Give back what the last generation held, so memory after many requests equals after one.

    The CUDA cache is kept after a success: the next request reuses its blocks
    instead of allocating gigabytes again, and PyTorch empties it by itself
    before it would run out. After an out-of-memory it is emptied, so that other
    processes on the GPU see the memory free.
    """
    gc.collect()
    model.pipe.maybe_free_model_hooks()
    if emptying_cache and model.device.type == "cuda":
        torch.cuda.empty_cache()


def _restore_vae_dtype(model: LoadedModel) -> None:
    """diffusers runs the VAE encoder in float32 when the VAE is float16 with force_upcast and
    casts it back afterwards; a failure in between would leave it float32 for good."""
    if model.pipe.vae.dtype != model.dtype:
        model.pipe.vae.to(dtype=model.dtype)


def _synchronize(model: LoadedModel) -> None:
    """Wait for the GPU, so that a stage's time is the GPU's and not only the host's queueing."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def denoise(
    model: LoadedModel,
    image: Image.Image,
    params: GenerationParams,
    times: StageTimes | None = None,
    report: ProgressCallback = lambda _: None,
    checkpoint: Checkpoint = NO_CHECKPOINT,
    preview: Previewer | None = None,
) -> torch.Tensor:
    """The pipeline up to the denoised latents, (1, frames, 4, h, w); encoding and denoising timed apart."""
    pipe = model.pipe
    times = times or StageTimes()
    start = time.perf_counter()
    first_step: list[float] = []

    def mark_first_step(*_: object) -> None:
        # The first UNet call marks the end of image encoding (CLIP and VAE encoder).
        if not first_step:
            _synchronize(model)
            first_step.append(time.perf_counter())

    def after_step(_pipe: object, step: int, _t: object, tensors: dict) -> dict:
        report(Progress("denoise", step + 1, params.num_inference_steps))
        if preview is not None:
            preview.offer(tensors["latents"], params.fps)
        checkpoint("denoising")
        return tensors

    report(Progress("encode"))
    # An offloaded UNet is moved to the GPU inside its own forward: mark the step
    # from its first layer, once the move is over, so the move counts as encoding.
    marker = pipe.unet.time_proj if hasattr(pipe.unet, "_hf_hook") else pipe.unet
    hook = marker.register_forward_pre_hook(mark_first_step)
    try:
        watching = preview.watching(pipe.scheduler) if preview is not None else nullcontext()
        with deep_cache(pipe.unet, params.cache_interval), watching:
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
                generator=seeded(params.seed),
                output_type="latent",
                callback_on_step_end=after_step,
            ).frames
        _synchronize(model)
    except torch.OutOfMemoryError as exc:
        error = str(exc)
    else:
        end = time.perf_counter()
        encoded = first_step[0] if first_step else end
        times.seconds["encode"] += encoded - start
        times.seconds["denoise"] += end - encoded
        return latents
    finally:
        hook.remove()
    # Out of the except block, whose traceback held the pipeline's tensors.
    stage = "denoising" if first_step else "encoding the image"
    raise OutOfMemory(f"the GPU ran out of memory while {stage} ({error})")


def _decode(
    model: LoadedModel,
    latents: torch.Tensor,
    chunk: int,
    times: StageTimes,
    report: ProgressCallback,
    checkpoint: Checkpoint,
    on_decode_retry: Callable[[], None],
) -> tuple[np.ndarray, int]:
    """Decode the latents chunk by chunk into uint8 frames; returns them and the chunk size finally used."""
    latents = latents[0] / model.pipe.vae.config.scaling_factor
    frames: list[np.ndarray] = []
    done = 0
    while done < len(latents):
        report(Progress("decode", done, len(latents)))
        checkpoint("decoding")
        try:
            with times.measure("decode"):
                frames.append(decode_frames(model, latents[done : done + chunk]))
        except torch.OutOfMemoryError as exc:
            error = str(exc)
        else:
            done += len(frames[-1])
            continue
        # Out of the except block, whose traceback held the failed chunk's activations.
        if chunk == 1:
            raise OutOfMemory(f"the GPU ran out of memory decoding even one frame at a time ({error})")
        release_memory(model, emptying_cache=True)
        logger.warning("Out of GPU memory decoding %d frames at once; retrying with %d (%s)", chunk, chunk // 2, error)
        on_decode_retry()
        chunk //= 2
    report(Progress("decode", done, len(latents)))
    return np.concatenate(frames), chunk


@torch.no_grad()
def decode_frames(model: LoadedModel, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents (frames, 4, h, w) to uint8 RGB frames (frames, H, W, 3), as diffusers rounds them."""
    vae = model.pipe.vae
    pixels = vae.decode(latents.to(vae.dtype), num_frames=len(latents)).sample
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def warm_up_params(compiled: bool, max_frames: int) -> GenerationParams:
    return (COMPILED_WARM_UP if compiled else WARM_UP).resolve(max_frames)


def seeded(seed: int) -> torch.Generator:
    """A CPU generator, as the tutorial's torch.manual_seed is: diffusers draws the starting
    noise on the CPU and moves it, so one seed gives the same noise on every device."""
    return torch.Generator("cpu").manual_seed(seed)


def chunk_lengths(num_frames: int, chunk: int) -> list[int]:
    """The distinct lengths of the chunks `num_frames` frames are decoded in: 25 in 2s are [2, 1]."""
    return sorted({min(chunk, num_frames - start) for start in range(0, num_frames, chunk)}, reverse=True)


def is_device_failure(exc: BaseException) -> bool:
    """A CUDA error that poisons the context, as opposed to an out-of-memory, which does not."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    return isinstance(exc, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(exc)


def memory_held_elsewhere(device: torch.device) -> int:
    """Bytes of the GPU that this process's PyTorch does not hold: other processes, and CUDA's own context."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)

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

from svd.faults import Faults
from svd.loading import LoadedModel
from svd.params import GenerationParams
from svd.video import CODECS, VideoWriter

logger = logging.getLogger("bentoml.svd")

STAGES = ("prepare", "encode", "denoise", "decode", "video")
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


class DeadlineExceeded(RuntimeError):
    """The request ran past its time limit and was stopped between steps."""


class DeviceFailure(RuntimeError):
    """The GPU failed in a way that leaves this process's CUDA context unusable
    (a device-side assert, an illegal memory access): only a restart recovers."""


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
        self.faults = Faults(model.pipe)
        self.on_decode_retry: Callable[[], None] = lambda: None
        # One GPU, one generation: concurrent requests and jobs wait here
        # instead of fighting over memory.
        self._lock = threading.Lock()
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self.last_seconds = 0.0

    @property
    def in_flight(self) -> int:
        """Generations admitted: running, waiting for the GPU, or preparing their image."""
        return self._in_flight

    @contextmanager
    def admitted(self, limit: int, on_change: Callable[[int], None] = lambda _: None) -> Iterator[bool]:
        """Take one of `limit` places in the queue, atomically; yields False when all are taken."""
        with self._count_lock:
            admitted = self._in_flight < limit
            self._in_flight += admitted
            on_change(self._in_flight)
        try:
            yield admitted
        finally:
            with self._count_lock:
                self._in_flight -= admitted
                on_change(self._in_flight)

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
            with self._releasing():
                # Handed straight over, the latents live only inside _decode_into: they are
                # gone by the time memory is released.
                chunk = self._decode_into(
                    path, self._denoise(image, params, times, report, deadline), params, times, report, deadline
                )
            self.last_seconds = time.perf_counter() - start
        return Generation(path, params, CODECS[params.format].content_type, chunk, times)

    def warm_up(self, params: GenerationParams) -> None:
        """Run every kernel at these shapes once: one denoising step, then one decode of each
        chunk length a request with these params decodes, without making a video."""
        image = Image.new("RGB", (params.width, params.height), (128, 128, 128))
        with self._lock, self._releasing():
            latents = self._denoise(image, params, StageTimes(), lambda _: None, None)
            scaled = latents[0] / self.model.pipe.vae.config.scaling_factor
            for length in chunk_lengths(len(scaled), params.decode_chunk_size):
                self.decode_frames(scaled[:length])
            del latents, scaled

    @contextmanager
    def _releasing(self) -> Iterator[None]:
        """Give back what the block held once it is over, failed or not.

        A failure's traceback holds the frames of the calls that failed, and with
        them their tensors: it is dropped before releasing, or nothing would be freed.
        """
        failure: BaseException | None = None
        try:
            yield
        except torch.OutOfMemoryError as exc:
            failure = OutOfMemory(f"the GPU ran out of memory ({exc})")
        except (OutOfMemory, DeadlineExceeded) as exc:
            failure = exc.with_traceback(None)
        except RuntimeError as exc:
            if not is_device_failure(exc):
                raise
            # The CUDA context is gone: every further call on it fails too.
            raise DeviceFailure(f"the GPU failed and this worker must be restarted: {exc}") from None
        self._restore_vae_dtype()
        self.release_memory(emptying_cache=failure is not None)
        if isinstance(failure, OutOfMemory):
            failure.held_elsewhere = memory_held_elsewhere(self.model.device)
        if failure is not None:
            raise failure

    def release_memory(self, emptying_cache: bool = False) -> None:
        """Give back what the last generation held, so memory after many requests equals after one.

        The CUDA cache is kept after a success: the next request reuses its blocks
        instead of allocating gigabytes again, and PyTorch empties it by itself
        before it would run out. After an out-of-memory it is emptied, so that other
        processes on the GPU see the memory free.
        """
        gc.collect()
        self.model.pipe.maybe_free_model_hooks()
        if emptying_cache and self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def _restore_vae_dtype(self) -> None:
        """diffusers runs the VAE encoder in float32 when the VAE is float16 with force_upcast and
        casts it back afterwards; a failure in between would leave it float32 for good."""
        vae = self.model.pipe.vae
        if vae.dtype != self.model.dtype:
            vae.to(dtype=self.model.dtype)

    def _synchronize(self) -> None:
        """Wait for the GPU, so that a stage's time is the GPU's and not only the host's queueing."""
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _denoise(
        self,
        image: Image.Image,
        params: GenerationParams,
        times: StageTimes,
        report: ProgressCallback,
        deadline: float | None,
    ) -> torch.Tensor:
        pipe = self.model.pipe
        start = time.perf_counter()
        first_step: list[float] = []

        def mark_first_step(*_: object) -> None:
            # The first UNet call marks the end of image encoding (CLIP and VAE encoder).
            if not first_step:
                self._synchronize()
                first_step.append(time.perf_counter())

        def after_step(_pipe: object, step: int, _t: object, tensors: dict) -> dict:
            report(Progress("denoise", step + 1, params.num_inference_steps))
            _check_deadline(deadline, "denoising")
            return tensors

        report(Progress("encode"))
        # An offloaded UNet is moved to the GPU inside its own forward: mark the step
        # from its first layer, once the move is over, so the move counts as encoding.
        marker = pipe.unet.time_proj if hasattr(pipe.unet, "_hf_hook") else pipe.unet
        hook = marker.register_forward_pre_hook(mark_first_step)
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
                generator=seeded(params.seed),
                output_type="latent",
                callback_on_step_end=after_step,
            ).frames
            self._synchronize()
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
        latents = latents[0] / self.model.pipe.vae.config.scaling_factor
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
                    error = str(exc)
                else:
                    with times.measure("video"):
                        writer.write(frames)
                    done += len(frames)
                    continue
                # Out of the except block, whose traceback held the failed chunk's activations.
                if chunk == 1:
                    raise OutOfMemory(f"the GPU ran out of memory decoding even one frame at a time ({error})")
                self.release_memory(emptying_cache=True)
                logger.warning(
                    "Out of GPU memory decoding %d frames at once; retrying with %d (%s)", chunk, chunk // 2, error
                )
                self.on_decode_retry()
                chunk //= 2
            report(Progress("video", done, len(latents)))
        finally:
            with times.measure("video"):
                writer.close()
        report(Progress("done", done, len(latents)))
        return chunk

    @torch.no_grad()
    def decode_frames(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents (frames, 4, h, w) to uint8 RGB frames (frames, H, W, 3), as diffusers rounds them."""
        vae = self.model.pipe.vae
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


def _check_deadline(deadline: float | None, stage: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"the request ran past its time limit and was stopped while {stage}")

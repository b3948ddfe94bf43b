"""The model's life in the service: loaded and warmed up in the background, then serving.

Loading a real model takes minutes; doing it off the server's start lets /livez
answer throughout while /readyz says 503 until the first generation has run.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

from svd import metrics
from svd.config import Settings
from svd.errors import InputError, Refused
from svd.faults import Faults
from svd.generate import (
    DeadlineExceeded,
    DeviceFailure,
    Generation,
    OutOfMemory,
    Progress,
    StageTimes,
    VideoGenerator,
    warm_up_params,
)
from svd.images import prepare_image
from svd.loading import load_pipeline, resolve_device
from svd.params import GenerationParams

logger = logging.getLogger("bentoml.svd")

KEPT_PROGRESS = 1000
# Below this, the GPU memory other processes hold is CUDA's own context, not a
# neighbour that may free enough for a retry.
SHARED_GPU_BYTES = 2**30


class NotReady(RuntimeError):
    """The model is still loading or warming up, or failed to load."""


class Engine:
    """Loads the model in a background thread and hands out its generator once warm."""

    def __init__(self, settings: Settings, locate: Callable[[], str] | None = None):
        # Refuse to start at once, not minutes later, when there is no device to run on.
        resolve_device(settings)
        self.settings = settings
        self.error: str | None = None
        self._generator: VideoGenerator | None = None
        self._ready = threading.Event()
        self._progress: OrderedDict[str, Progress] = OrderedDict()
        self._progress_lock = threading.Lock()
        self._thread = threading.Thread(target=self._start, args=(locate,), name="svd-load", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.error is None

    @property
    def generator(self) -> VideoGenerator:
        if self._generator is None or not self.ready:
            raise NotReady(self.error or "the model is still loading; retry when /readyz answers 200")
        return self._generator

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def _start(self, locate: Callable[[], str] | None) -> None:
        try:
            model = load_pipeline(self.settings, locate)
            generator = VideoGenerator(model)
            generator.on_decode_retry = metrics.OOM_RETRIES.inc
            self._generator = generator
            start = time.perf_counter()
            generator.warm_up(warm_up_params(bool(self.settings.compile), model.max_frames))
            warm_up_seconds = time.perf_counter() - start
            # The model's half a million objects never die: keep them out of the
            # collections that run after every generation (0.35 s each otherwise).
            gc.freeze()
            # Armed after the warm-up, so injected faults hit requests only.
            generator.faults = Faults(model.pipe, self.settings.test_faults)
        except Exception as exc:
            self.error = f"the model failed to load: {exc}"
            logger.error("SVD %s", self.error, exc_info=not isinstance(exc, RuntimeError))
            return
        self._ready.set()
        settings = self.settings
        revision = f"revision {settings.revision}" if settings.is_hub_model else model.source
        logger.info(
            "SVD ready: model %s (%s), device %s, dtype %s, memory %s%s%s; loaded in %.1f s, warmed up in %.1f s",
            settings.model_id,
            revision,
            model.device,
            str(model.dtype).removeprefix("torch."),
            settings.memory,
            ", forward chunking" if settings.forward_chunking else "",
            f", compiled with {settings.compile}" if settings.compile else "",
            model.load_seconds,
            warm_up_seconds,
        )

    def run(self, image: Path, params: GenerationParams, out_dir: Path, key: str | None = None) -> Generation:
        """Admit, check, prepare and generate one request; `key` names its progress for `progress`."""
        start = time.perf_counter()
        try:
            result = self._run(image, params, out_dir, key)
        except Refused as refused:
            metrics.GENERATIONS.labels(outcome=refused.reason).inc()
            if refused.reason in ("busy", "not_ready"):
                metrics.REFUSED.labels(reason=refused.reason).inc()
            raise
        except InputError as exc:
            metrics.GENERATIONS.labels(outcome="bad_input").inc()
            raise Refused(exc.status, "bad_input", str(exc)) from None
        except Exception:
            metrics.GENERATIONS.labels(outcome="error").inc()
            raise
        metrics.GENERATIONS.labels(outcome="ok").inc()
        metrics.GENERATION_SECONDS.observe(time.perf_counter() - start)
        metrics.FRAMES.inc(result.params.num_frames or 0)
        for stage, seconds in result.times.seconds.items():
            metrics.STAGE_SECONDS.labels(stage=stage).observe(seconds)
        return result

    def _run(self, image: Path, params: GenerationParams, out_dir: Path, key: str | None) -> Generation:
        deadline = time.monotonic() + self.settings.timeout
        try:
            generator = self.generator
        except NotReady as exc:
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, "not_ready", str(exc), None if self.error else 10) from None
        with generator.admitted(self.settings.max_queue, metrics.IN_FLIGHT.set) as admitted:
            if not admitted:
                raise Refused(
                    HTTPStatus.TOO_MANY_REQUESTS,
                    "busy",
                    f"{generator.in_flight} generations are already running or queued (SVD_MAX_QUEUE="
                    f"{self.settings.max_queue}); retry later",
                    self._retry_after(generator),
                )
            return self._generate(generator, image, params, out_dir, key, deadline)

    def _generate(
        self, generator: VideoGenerator, image: Path, params: GenerationParams, out_dir: Path, key: str | None, deadline: float
    ) -> Generation:
        params = params.resolve(generator.model.max_frames)
        times = StageTimes()
        with times.measure("prepare"):
            picture = prepare_image(image, params.width, params.height, params.sizing, self.settings.max_pixels)
        report = self.track(key) if key else None
        try:
            return generator.generate(picture, params, out_dir, times, report, deadline)
        except OutOfMemory as exc:
            logger.error("SVD out of memory: %s", str(exc))  # a string: a record must not keep tensors alive
            raise self._out_of_memory(exc, generator) from None
        except DeviceFailure as exc:
            self.error = str(exc)
            logger.error("SVD %s; /livez now answers 503 so that the worker is restarted", self.error)
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, "device_failure", self.error) from None
        except DeadlineExceeded as exc:
            raise Refused(
                HTTPStatus.GATEWAY_TIMEOUT,
                "timeout",
                f"{exc} after {self.settings.timeout} s (SVD_TIMEOUT); ask for fewer frames, steps or pixels",
            ) from None

    def _out_of_memory(self, exc: OutOfMemory, generator: VideoGenerator) -> Refused:
        """503 when other processes hold GPU memory they may free; else the request alone is too big: 422."""
        gib = exc.held_elsewhere / 2**30
        if exc.held_elsewhere > SHARED_GPU_BYTES:
            return Refused(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "out_of_memory",
                f"{exc}; other processes hold {gib:.1f} GiB of this GPU and nothing of this request "
                "is left allocated, so retrying may work",
                self._retry_after(generator),
            )
        return Refused(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "too_big_for_gpu",
            f"{exc}; this request needs more memory than the GPU has, even with nothing else on it: "
            "lower width and height, num_frames or decode_chunk_size, or set max_guidance_scale to 1 "
            "(no guidance halves the denoising memory); the operator can also set SVD_MEMORY=model_offload",
        )

    @staticmethod
    def _retry_after(generator: VideoGenerator) -> int:
        """Seconds until a place in the queue likely frees: one generation, the last one's time.

        Waiting for the whole queue to drain instead left the GPU idle under load (bench/load.py).
        """
        return max(1, math.ceil(generator.last_seconds))

    def track(self, key: str) -> Callable[[Progress], None]:
        """A progress callback that keeps the latest state under `key` for `progress`."""

        def report(progress: Progress) -> None:
            # Queued jobs report from their own threads while another one runs.
            with self._progress_lock:
                self._progress[key] = progress
                self._progress.move_to_end(key)
                while len(self._progress) > KEPT_PROGRESS:
                    self._progress.popitem(last=False)

        return report

    def progress(self, key: str) -> Progress | None:
        return self._progress.get(key)

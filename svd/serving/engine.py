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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Literal

from svd.base.errors import InputError, Refused
from svd.base.params import GenerationParams
from svd.base.progress import ProgressCallback
from svd.base.settings import Settings
from svd.core.faults import Faults
from svd.core.generate import (
    DeadlineExceeded,
    DeviceFailure,
    GenerationResult,
    OutOfMemory,
    StageTimes,
    Stopped,
    generate,
    warm_up,
    warm_up_params,
)
from svd.core.loading import LoadedModel, load_pipeline, resolve_device
from svd.core.preview import Previewer
from svd.media.images import prepare_image
from svd.serving import metrics
from svd.serving.gpu_turns import Turns

logger = logging.getLogger(f"bentoml.{__name__}")

# Below this, the GPU memory other processes hold is CUDA's own context, not a
# neighbour that may free enough for a retry.
SHARED_GPU_BYTES = 2**30
# Seconds a caller should wait while the model loads.
LOADING_RETRY_AFTER = 10


@dataclass(frozen=True)
class State:
    """Where the engine is: loading, then ready or failed for good; `message` says why when not ready."""

    name: Literal["loading", "ready", "failed"]
    message: str = ""


LOADING = State("loading", "the model is still loading; retry when /readyz answers 200")


class Engine:
    """Loads the model in a background thread, then queues the requests for it: one on the GPU at a time."""

    def __init__(self, settings: Settings, locate: Callable[[], str] | None = None):
        # Refuse to start at once, not minutes later, when there is no device to run on.
        resolve_device(settings)
        self.settings = settings
        self.state = LOADING
        self._settled = threading.Condition()
        self.model: LoadedModel | None = None
        self.faults: Faults | None = None
        # One GPU, one generation: admitted requests and jobs wait their turn instead of fighting over memory.
        self.turns = Turns()
        self._in_flight = 0
        self._admission = threading.Lock()
        self.last_seconds = 0.0
        threading.Thread(target=self._start, args=(locate,), name="svd-load", daemon=True).start()

    @property
    def ready(self) -> bool:
        return self.state.name == "ready"

    @property
    def alive(self) -> bool:
        return self.state.name != "failed"

    @property
    def in_flight(self) -> int:
        """Generations admitted: running, waiting for the GPU, or preparing their image."""
        return self._in_flight

    def wait_ready(self, timeout: float) -> bool:
        """Wait until loading is over; True once ready."""
        with self._settled:
            self._settled.wait_for(lambda: self.state is not LOADING, timeout)
        return self.ready

    def _settle(self, state: State) -> None:
        with self._settled:
            self.state = state
            self._settled.notify_all()

    def _start(self, locate: Callable[[], str] | None) -> None:
        try:
            model = load_pipeline(self.settings, locate)
            start = time.perf_counter()
            warm_up(model, warm_up_params(bool(self.settings.compile), model.max_frames))
            warm_up_seconds = time.perf_counter() - start
            # The model's half a million objects never die: keep them out of the
            # collections that run after every generation (0.35 s each otherwise).
            gc.freeze()
            # Armed after the warm-up, so injected faults hit requests only.
            self.faults = Faults(model.pipe, self.settings.test_faults)
        except Exception as exc:
            self._settle(State("failed", f"the model failed to load: {exc}"))
            logger.error("SVD %s", self.state.message, exc_info=not isinstance(exc, RuntimeError))
            return
        self.model = model
        self._settle(State("ready"))
        settings = self.settings
        revision = f"revision {settings.revision}" if settings.is_hub_model else model.source
        logger.info(
            "SVD ready: worker %d of %d, model %s (%s), device %s, dtype %s, memory %s%s%s; "
            "loaded in %.1f s, warmed up in %.1f s",
            settings.worker,
            settings.workers,
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

    def run(
        self,
        image: Path,
        params: GenerationParams,
        out_dir: Path,
        report: ProgressCallback | None = None,
        stop: threading.Event | None = None,
        turn: AbstractContextManager[object] | None = None,
        preview: Previewer | None = None,
    ) -> GenerationResult:
        """Admit, check, prepare and generate one request.

        A job comes with the GPU turn its runner took for it (`turn`): it is admitted
        whatever the queue, since the job store bounds the jobs. `report`, `stop` and
        `preview` are handed to the generation (svd/core/generate.py).
        """
        start = time.perf_counter()
        try:
            result = self._run(image, params, out_dir, report, stop, turn, preview)
        except Refused as refused:
            metrics.GENERATIONS.labels(outcome=refused.reason).inc()
            if refused.reason in ("busy", "not_ready"):
                metrics.REFUSED.labels(reason=refused.reason).inc()
            raise
        except InputError as exc:
            metrics.GENERATIONS.labels(outcome="bad_input").inc()
            raise Refused(exc.status, "bad_input", str(exc)) from None
        except Stopped:
            metrics.GENERATIONS.labels(outcome="canceled").inc()
            raise
        except Exception:
            metrics.GENERATIONS.labels(outcome="error").inc()
            raise
        metrics.GENERATIONS.labels(outcome="ok").inc()
        metrics.GENERATION_SECONDS.observe(time.perf_counter() - start)
        metrics.FRAMES.inc((result.params.num_frames or 0) * result.params.segments)
        for stage, seconds in result.times.seconds.items():
            metrics.STAGE_SECONDS.labels(stage=stage).observe(seconds)
        return result

    def _run(
        self,
        image: Path,
        params: GenerationParams,
        out_dir: Path,
        report: ProgressCallback | None,
        stop: threading.Event | None,
        turn: AbstractContextManager[object] | None,
        preview: Previewer | None,
    ) -> GenerationResult:
        deadline = time.monotonic() + self.settings.timeout
        state, model = self.state, self.model
        if model is None or state.name != "ready":
            retry_after = LOADING_RETRY_AFTER if state is LOADING else None
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, "not_ready", state.message, retry_after)
        with self._admitted(always=turn is not None) as admitted:
            if not admitted:
                raise Refused(
                    HTTPStatus.TOO_MANY_REQUESTS,
                    "busy",
                    f"{self.in_flight} generations are already running or queued (SVD_MAX_QUEUE="
                    f"{self.settings.max_queue}); retry later",
                    self._retry_after(),
                )
            return self._generate(model, image, params, out_dir, deadline, report, stop, turn or self.turns, preview)

    @contextmanager
    def _admitted(self, always: bool = False) -> Iterator[bool]:
        """Take one of SVD_MAX_QUEUE places, atomically; yields False when all are taken."""
        with self._admission:
            admitted = always or self._in_flight < self.settings.max_queue
            self._in_flight += admitted
            metrics.IN_FLIGHT.set(self._in_flight)
        try:
            yield admitted
        finally:
            with self._admission:
                self._in_flight -= admitted
                metrics.IN_FLIGHT.set(self._in_flight)

    def _generate(
        self,
        model: LoadedModel,
        image: Path,
        params: GenerationParams,
        out_dir: Path,
        deadline: float,
        report: ProgressCallback | None,
        stop: threading.Event | None,
        turn: AbstractContextManager[object],
        preview: Previewer | None,
    ) -> GenerationResult:
        params = params.resolve(model.max_frames)
        times = StageTimes()
        with times.measure("prepare"):
            picture = prepare_image(image, params.width, params.height, params.sizing, self.settings.max_pixels)
        try:
            result = generate(
                model, picture, params, out_dir, times, report, deadline, metrics.OOM_RETRIES.inc, gpu=turn, stop=stop,
                preview=preview,
            )
            self.last_seconds = sum(times.seconds.values())
            return result
        except OutOfMemory as exc:
            logger.error("SVD out of memory: %s", str(exc))  # a string: a record must not keep tensors alive
            raise self._out_of_memory(exc) from None
        except DeviceFailure as exc:
            self._settle(State("failed", str(exc)))
            logger.error("SVD %s; /livez now answers 503 so that the worker is restarted", exc)
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, "device_failure", str(exc)) from None
        except DeadlineExceeded as exc:
            raise Refused(
                HTTPStatus.GATEWAY_TIMEOUT,
                "timeout",
                f"{exc} after {self.settings.timeout} s (SVD_TIMEOUT); ask for fewer frames, steps or pixels",
            ) from None

    def _out_of_memory(self, exc: OutOfMemory) -> Refused:
        """503 when other processes hold GPU memory they may free; else the request alone is too big: 422."""
        gib = exc.held_elsewhere / 2**30
        if exc.held_elsewhere > SHARED_GPU_BYTES:
            return Refused(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "out_of_memory",
                f"{exc}; other processes hold {gib:.1f} GiB of this GPU and nothing of this request "
                "is left allocated, so retrying may work",
                self._retry_after(),
            )
        return Refused(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "too_big_for_gpu",
            f"{exc}; this request needs more memory than the GPU has, even with nothing else on it: "
            "lower width and height, num_frames or decode_chunk_size, or set max_guidance_scale to 1 "
            "(no guidance halves the denoising memory); the operator can also set SVD_MEMORY=model_offload",
        )

    def _retry_after(self) -> int:
        """Seconds until a place in the queue likely frees: one generation, the last one's time.

        Waiting for the whole queue to drain instead left the GPU idle under load (bench/load.py).
        """
        return max(1, math.ceil(self.last_seconds))

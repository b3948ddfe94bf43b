"""A worker's job runner: whenever the worker's GPU is free, it claims the oldest waiting
job from the store and runs it on the engine, one at a time.

The runner takes a GPU turn like any synchronous request, claims a job only while
holding it, and hands the turn to the job, so a job never waits on a busy GPU while
another worker's GPU is idle. It asks for the next turn as soon as the job lets go
of the GPU: the next job denoises while this one's video is encoded. While a job
runs, its lease is renewed; a cancel seen in the store stops the generation at the
next step or decode chunk.

While the store is unreachable (Redis down), the runner claims nothing, the running job
goes on, and its end is recorded once the store answers again.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from svd.base.errors import Refused
from svd.base.params import GenerationParams
from svd.base.progress import Progress, ProgressCallback
from svd.base.users import label_of
from svd.core.generate import Stopped
from svd.core.preview import Previewer
from svd.jobs.eta import size_of, work_of
from svd.jobs.model import CANCELED, COMPLETED, FAILED, Claim, StoreUnavailable
from svd.jobs.store import JobStore
from svd.jobs.webhooks import events
from svd.serving import metrics
from svd.serving.engine import Engine
from svd.serving.gpu_turns import HandedTurn
from svd.serving.records import record_of
from svd.storage.outputs import Outputs
from svd.storage.previews import previews_of

logger = logging.getLogger(f"bentoml.{__name__}")

# How often an idle runner looks for work that another worker's route submitted.
POLL_SECONDS = 0.2
# Leases are renewed this many times per lease, so that a late renewal or two never lets one lapse.
RENEWALS_PER_LEASE = 5
# How often an unreachable store is tried again.
UNREACHABLE_PAUSE_SECONDS = 1.0

T = TypeVar("T")


def keep_video(outputs: Outputs, claim: Claim, video: Path, record: dict, finish: Callable[[], bool]) -> bool:
    """Keep the claim's video under its attempt, then `finish` the job, and make the video the
    job's only if this attempt ended it; an attempt that lost its job removes only its own."""
    outputs.put(claim.id, video, record, claim.attempt)
    if not finish():
        outputs.remove(claim.id, claim.attempt)
        return False
    outputs.promote(claim.id, claim.attempt)
    return True


class JobRunner:
    """Runs jobs from `store` on `engine`, keeping their videos in `outputs`."""

    def __init__(self, engine: Engine, store: JobStore, outputs: Outputs, lease: float):
        self.engine = engine
        self.store = store
        self.outputs = outputs
        # Each running job's latest preview, beside the videos: where every replica's routes look.
        self.previews = previews_of(outputs)
        self.lease = lease
        # The users the configuration names: the GPU time's metric labels.
        self.users = frozenset(name for name, _ in engine.settings.api_tokens)
        # Unique across machines and restarts: host, process and worker.
        self.name = f"{socket.gethostname()}/{os.getpid()}/worker-{engine.settings.worker}"
        self._stopping = threading.Event()
        # Claims in progress and jobs running; with the next job running while the last one's
        # video is written, there may be two.
        self._busy = 0
        self._changed = threading.Condition()
        self._unreachable = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="svd-jobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Claim nothing more and give the running job up to `timeout` seconds to finish."""
        self._stopping.set()
        with self._changed:
            self._changed.wait_for(lambda: self._busy == 0, timeout)

    def _begin(self) -> None:
        with self._changed:
            self._busy += 1

    def _end(self) -> None:
        with self._changed:
            self._busy -= 1
            self._changed.notify_all()

    def _loop(self) -> None:
        self.engine.wait_ready(None)
        # A worker whose model failed, or whose GPU did, takes no job: another worker, or this
        # one restarted, will.
        while self.engine.ready and not self._stopping.is_set():
            self.engine.turns.acquire()
            # Busy from before the claim, so that `stop` never misses a job just claimed.
            self._begin()
            pause = POLL_SECONDS
            try:
                claim = None if self._stopping.is_set() else self.store.claim(self.name)
                self._reached()
            except StoreUnavailable as exc:
                self._not_reached(exc)
                claim, pause = None, UNREACHABLE_PAUSE_SECONDS
            except Exception:
                logger.exception("SVD could not read the job store; trying again")
                claim, pause = None, UNREACHABLE_PAUSE_SECONDS
            if claim is None:
                self._end()
                self.engine.turns.release()
                self._stopping.wait(pause)
                continue
            turn = HandedTurn(self.engine.turns)
            threading.Thread(target=self._run, args=(claim, turn), name=f"svd-job-{claim.id[:8]}", daemon=True).start()
            turn.given_back.wait()

    def _run(self, claim: Claim, turn: HandedTurn) -> None:
        start = time.perf_counter()
        stop = threading.Event()
        ended = threading.Event()
        worker = self.engine.settings.worker
        retried = f", retried after its worker stopped {claim.attempt - 1} time(s)" if claim.attempt > 1 else ""
        logger.info("SVD job %s started on worker %d, attempt %d%s", claim.id, worker, claim.attempt, retried)

        def report(progress: Progress) -> None:
            try:
                held = self.store.report(claim, progress)
            except StoreUnavailable as exc:
                self._not_reached(exc)
                return
            except Exception:
                # Progress is for watching: a store that fails a moment must not fail the job.
                logger.exception("SVD could not record the progress of job %s", claim.id)
                return
            if not held:
                stop.set()

        renewing = threading.Thread(target=self._renew, args=(claim, stop, ended), name="svd-lease", daemon=True)
        renewing.start()
        try:
            self._generate(claim, turn, report, stop)
        except Stopped:
            try:
                job = self.store.get(claim.id)
                status = job.status if job else "gone"
            except StoreUnavailable:
                status = "the store is unreachable"
            seconds = time.perf_counter() - start
            if status == CANCELED:
                logger.info(
                    "SVD job %s canceled on worker %d, attempt %d, after %.1f s",
                    claim.id,
                    worker,
                    claim.attempt,
                    seconds,
                )
            else:
                logger.warning(
                    "SVD job %s stopped on worker %d, attempt %d: its lease was lost (%s)",
                    claim.id,
                    worker,
                    claim.attempt,
                    status,
                )
        except Refused as refused:
            if refused.reason == "device_failure":
                # As if the worker had died: the lease lapses and a live worker runs the job again,
                # within SVD_JOB_ATTEMPTS, should the job itself be what breaks the GPU.
                logger.error(
                    "SVD job %s: the GPU of worker %d failed; the job runs again once its lease lapses",
                    claim.id,
                    worker,
                )
            else:
                self._fail(claim, str(refused), refused.status, start)
        except Exception as exc:
            logger.exception("SVD job %s failed on worker %d", claim.id, worker)
            self._fail(claim, f"the generation failed: {exc}", 500, start)
        else:
            seconds = time.perf_counter() - start
            logger.info(
                "SVD job %s completed on worker %d, attempt %d, in %.1f s", claim.id, worker, claim.attempt, seconds
            )
            self._learn(claim, seconds, None if turn.given_back_at is None else turn.given_back_at - start)
        finally:
            turn.give_back()
            ended.set()
            self._end()
            metrics.GPU_SECONDS.labels(user=label_of(claim.owner, self.users)).inc(time.perf_counter() - start)

    def _generate(self, claim: Claim, turn: HandedTurn, report: ProgressCallback, stop: threading.Event) -> None:
        with tempfile.TemporaryDirectory(prefix="svd-job-") as folder:
            image = Path(folder) / f"image{Path(claim.image_name).suffix[:16]}"
            image.write_bytes(claim.image)
            # A generation's denoising and decoding end by SVD_TIMEOUT: an older preview is a dead worker's.
            previewer = Previewer(self.previews.start(claim.id, self.engine.settings.timeout))
            try:
                result = self.engine.run(
                    image, GenerationParams(**claim.controls), Path(folder), report, stop, turn, previewer
                )
            finally:
                self.previews.remove(claim.id)
            # A job cancelled while its video was being written ends cancelled, with nothing kept.
            if stop.is_set() or not self._still_held(claim):
                raise Stopped("the job was stopped while its video was written")
            record = {**record_of(result, image, self.engine.settings), "owner": claim.owner}
            ended = events.ended_body(
                claim.id, COMPLETED, None, claim.attempt,
                output_id=claim.id, output_path=f"/generate_task/get?task_id={claim.id}",
                output_url=self.outputs.link(f"{claim.id}{result.path.suffix}"),
                seed=record["seed"], settings=record["settings"], stage_seconds=record["stage_seconds"],
            )
            finish = partial(self._finish, partial(self.store.finish, claim, COMPLETED, ended=ended))
            if not keep_video(self.outputs, claim, result.path, record, finish):
                raise Stopped("the job was stopped while its video was kept")

    def _still_held(self, claim: Claim) -> bool:
        """Whether the claim is still this worker's; when the store cannot say, the end decides."""
        try:
            return self.store.renew(claim)
        except StoreUnavailable as exc:
            self._not_reached(exc)
            return True

    def _finish(self, finish: Callable[[], bool]) -> bool:
        """Record the job's end and its end event (`finish`, the store's): a finished video is not
        thrown away for a store restarting."""
        return bool(self._until_reached(finish))

    def _until_reached(self, step: Callable[[], T]) -> T | None:
        """The step's answer, waiting for an unreachable store to answer. Only a stopping worker
        gives up (None), leaving the job to its lease."""
        while True:
            try:
                return step()
            except StoreUnavailable as exc:
                self._not_reached(exc)
                if self._stopping.wait(UNREACHABLE_PAUSE_SECONDS):
                    return None

    def _not_reached(self, exc: StoreUnavailable) -> None:
        if not self._unreachable.is_set():
            self._unreachable.set()
            logger.error("SVD cannot reach the job store: %s; jobs wait until it answers", exc)

    def _reached(self) -> None:
        if self._unreachable.is_set():
            self._unreachable.clear()
            logger.info("SVD reaches the job store again")

    def _learn(self, claim: Claim, seconds: float, turn_seconds: float | None) -> None:
        """Record the job's time, and how long it held the GPU turn, for its size: what the queue's
        ETAs are estimated from."""
        try:
            self.store.learn(size_of(claim.controls), work_of(claim.controls), seconds, turn_seconds)
        except Exception as exc:
            logger.warning("SVD job %s: its time could not be recorded for the ETAs: %s", claim.id, exc)

    def _fail(self, claim: Claim, error: str, status: int, start: float) -> None:
        ended = events.ended_body(claim.id, FAILED, error, claim.attempt)
        self._finish(partial(self.store.finish, claim, FAILED, error, status, ended))
        logger.warning(
            "SVD job %s failed on worker %d, attempt %d, after %.1f s: %s",
            claim.id, self.engine.settings.worker, claim.attempt, time.perf_counter() - start, error,
        )

    def _renew(self, claim: Claim, stop: threading.Event, ended: threading.Event) -> None:
        """Renew the lease until the job ends; a renewal refused means the job was cancelled or taken."""
        while not ended.wait(self.lease / RENEWALS_PER_LEASE):
            try:
                if not self.store.renew(claim):
                    stop.set()
                    return
            except StoreUnavailable as exc:
                self._not_reached(exc)
            except Exception:
                logger.exception("SVD could not renew the lease of job %s", claim.id)

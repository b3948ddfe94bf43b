"""Jobs: how long the GPU waits between one job and the next, and what the job store costs a job.

In-process, on the tiny model: the engine, the SQLite job store and the runner the service
uses, with every store call timed. The jobs are all queued before the runner starts, so
every gap measured is the runner's own, not a client's.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.inprocess import tiny_engine
from bench.report import Row, Section, median
from harness import PHOTO, wait_until
from svd.base.progress import Progress
from svd.base.retention import Retention
from svd.jobs.model import COMPLETED, Claim
from svd.jobs.runner import JobRunner
from svd.jobs.sqlite import SQLiteJobs
from svd.serving.engine import Engine
from svd.storage.outputs import Outputs

MAX_START_SECONDS = 0.2


class TimedStore:
    """A job store whose every call is timed, keeping when each job reported what and ended."""

    def __init__(self, store: SQLiteJobs):
        self._store = store
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.reports: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self.finished: dict[str, float] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[name] += time.perf_counter() - start
                    self.calls[name] += 1

        return timed

    def report(self, claim: Claim, progress: Progress) -> bool:
        self.reports[claim.id].append((time.perf_counter(), progress.stage))
        return self.__getattr__("report")(claim, progress)

    def finish(self, claim: Claim, status: str, *args: Any, **kwargs: Any) -> bool:
        done = self.__getattr__("finish")(claim, status, *args, **kwargs)
        self.finished[claim.id] = time.perf_counter()
        return done


def run(request: dict[str, int], jobs: int, torch_threads: int) -> Section:
    with tiny_engine(torch_threads, "bench-jobs-") as (engine, tmp):
        return _measure(engine, tmp, request, jobs)


def _measure(engine: Engine, tmp: Path, request: dict[str, int], jobs: int) -> Section:
    store = TimedStore(SQLiteJobs(tmp / "jobs.db"))
    ids = [store.submit(PHOTO.read_bytes(), PHOTO.name, request, per_worker=jobs).id for _ in range(jobs)]
    runner = JobRunner(engine, store, Outputs(tmp / "outputs", Retention(count=jobs)), lease=30)  # type: ignore[arg-type]
    start = time.perf_counter()
    runner.start()
    wait_until(lambda: len(store.finished) == jobs, 60 * jobs, 0.05, "every job finished")
    seconds = time.perf_counter() - start
    runner.stop(0)
    statuses = [store.get(job_id).status for job_id in ids]
    # The GPU's idle time: from a job's last decode chunk to the next job's image encoding.
    idle = [_first(store, after, "encode") - _last(store, before, "decode") for before, after in zip(ids, ids[1:])]
    starts = [_first(store, after, "denoise") - store.finished[before] for before, after in zip(ids, ids[1:])]
    in_store = sum(store.seconds.values()) / jobs
    calls = sum(store.calls.values()) / jobs
    return Section(
        "jobs",
        [
            Row(
                f"GPU idle between jobs (last decode chunk → next job's image encoding), median / max of {jobs - 1}",
                f"{median(idle) * 1000:.0f} / {max(idle) * 1000:.0f} ms",
            ),
            Row(
                "a job's end → the next job's first denoising step, median / max (negative: it began first)",
                f"{median(starts):.3f} / {max(starts):.3f} s",
                f"< {MAX_START_SECONDS} s",
                max(starts) < MAX_START_SECONDS,
            ),
            Row(
                "job store time per job: submit, claim, progress reports, renewals, finish (SQLite, synchronous=FULL)",
                f"{in_store * 1000:.1f} ms in {calls:.0f} calls; {in_store / (seconds / jobs):.2%} of a job's time",
            ),
        ],
        {
            "jobs": jobs,
            "statuses": statuses,
            "seconds": seconds,
            "gpu_idle_seconds": idle,
            "end_to_next_first_step_seconds": starts,
            "store_seconds_by_call": dict(store.seconds),
            "store_calls": dict(store.calls),
            "all_completed": statuses == [COMPLETED] * jobs,
        },
    )


def _first(store: TimedStore, job_id: str, stage: str) -> float:
    return next(at for at, reported in store.reports[job_id] if reported == stage)


def _last(store: TimedStore, job_id: str, stage: str) -> float:
    return [at for at, reported in store.reports[job_id] if reported == stage][-1]

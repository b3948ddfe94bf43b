"""Jobs that are never lost: the interface every job store implements.

A job is submitted with its image and controls, waits `pending` until a worker whose
GPU is free claims it, runs `in_progress` under a lease its worker renews, and ends
`completed`, `failed` or `canceled`. A lease that lapses (its worker died) lets another
worker claim the job again, up to the store's attempts; then it fails, saying so.
The statuses are BentoML's, so its clients read them unchanged.

Two stores implement it: an SQLite file shared by the workers of one machine
(svd/jobs/sqlite.py, the default) and Redis, shared by every replica of the service
(svd/jobs/redis.py, with SVD_QUEUE_URL).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from svd.storage.outputs import new_id
from svd.base.progress import Progress

if TYPE_CHECKING:
    from svd.base.settings import Settings

PENDING = "pending"
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
CANCELED = "canceled"
FINISHED = (COMPLETED, FAILED, CANCELED)


class QueueFull(Exception):
    """Submit refused: the store already holds as many unfinished jobs (`limit`) as it may.

    `retry_after` is one generation's time, the last job's, when the store knows it.
    """

    def __init__(self, unfinished: int, limit: int, retry_after: float | None):
        super().__init__(unfinished)
        self.unfinished = unfinished
        self.limit = limit
        self.retry_after = retry_after


class StoreUnavailable(Exception):
    """The store cannot be reached now (Redis down or restarting); the message names it."""


@dataclass(frozen=True)
class QueueDepth:
    """How many jobs wait for a GPU and run on one, and how long the oldest has waited."""

    waiting: int
    running: int
    oldest_waiting_seconds: float


class UnknownJob(KeyError):
    """No job has this id (never submitted, or its record has expired)."""


@dataclass(frozen=True)
class Job:
    """What the store knows of a job; times are seconds since the epoch."""

    id: str
    status: str
    created: float
    started: float | None = None
    finished: float | None = None
    attempt: int = 0
    progress: Progress | None = None
    # A failed job's error, and the HTTP status /generate_task/get answers it with.
    error: str | None = None
    error_status: int | None = None

    def as_json(self) -> dict[str, Any]:
        """BentoML's task status, with the attempt and a failed job's error."""
        return {
            "task_id": self.id,
            "status": self.status,
            "created_at": _iso(self.created),
            "executed_at": _iso(self.started),
            "completed_at": _iso(self.finished),
            "attempt": self.attempt,
            "error": self.error,
        }


@dataclass(frozen=True)
class Hook:
    """Where a job calls back, its webhook's URL, and at which of its events."""

    url: str
    events: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delivery:
    """A webhook call waiting in the store: its id (the `webhook-id` of every try), its job,
    where it goes, what it says, and how many tries it has had."""

    id: str
    job_id: str
    url: str
    body: bytes
    tries: int = 0


@dataclass(frozen=True)
class Claim:
    """A job a worker has claimed: its input, and the attempt its lease is for."""

    id: str
    attempt: int
    image: bytes
    image_name: str
    controls: dict[str, Any]


class JobStore(Protocol):
    """Submit, claim, renew, report, finish, cancel and look up jobs.

    Every method is one atomic step in the store, so any worker of any process may call
    any of them at any time. Methods that act for a claim return False once the claim is
    no longer the worker's: the job was cancelled, or its lease lapsed and another
    worker took it. Any method may raise StoreUnavailable.
    """

    def submit(self, image: bytes, image_name: str, controls: dict[str, Any], per_worker: int, hook: Hook | None = None) -> Job:
        """Queue a job, which calls `hook` back; QueueFull when `per_worker` jobs for each worker
        taking jobs are already pending or in progress."""
        ...

    def claim(self, worker: str) -> Claim | None:
        """The oldest pending job, or one whose lease lapsed, now leased to `worker`; None when
        there is none. Jobs whose lease lapsed on their last attempt are failed on the way."""
        ...

    def renew(self, claim: Claim) -> bool:
        """Extend the claim's lease."""
        ...

    def report(self, claim: Claim, progress: Progress) -> bool:
        """Record where the claimed job is, renewing its lease."""
        ...

    def finish(self, claim: Claim, status: str, error: str | None = None, error_status: int | None = None) -> bool:
        """End the claimed job as completed (its video kept by id) or failed (with its error)."""
        ...

    def cancel(self, job_id: str) -> tuple[Job, bool]:
        """Cancel a pending or running job; returns the job and whether this call cancelled it
        (False: it had already finished). UnknownJob when there is no such job."""
        ...

    def get(self, job_id: str) -> Job | None:
        ...

    def input(self, job_id: str) -> tuple[bytes, str, dict[str, Any]] | None:
        """A job's image, its file name and its controls, kept with its record."""
        ...

    def depth(self) -> QueueDepth:
        ...

    def notify(self, job_id: str, event: str, body: bytes) -> bool:
        """Keep a delivery of `body` to the job's webhook when it wants `event` (its end, always);
        whether one was kept."""
        ...

    def next_delivery(self, lease: float) -> Delivery | None:
        """The delivery due first, if one is due, held for `lease` seconds for its try."""
        ...

    def retry_delivery(self, delivery_id: str, tries: int, due: float) -> None:
        ...

    def delivered(self, delivery_id: str) -> None:
        """Forget the delivery: sent, or given up."""
        ...

    def reachable(self) -> bool:
        """Whether the store answers now; for the readiness probe."""
        ...


def wants(events: str | None, event: str) -> bool:
    """Whether a job whose webhook takes `events` (comma-separated) gets `event`: its end always."""
    from svd.jobs.delivery import COMPLETED

    return event == COMPLETED or event in (events or "").split(",")


def new_delivery_id() -> str:
    return f"msg_{new_id()}"


def open_store(settings: Settings) -> JobStore:
    """The job store the settings name: Redis at SVD_QUEUE_URL, else the SQLite file SVD_JOBS_DB."""
    if settings.queue_url:
        from svd.jobs.redis import RedisJobs

        return RedisJobs(settings.queue_url, settings.job_lease, settings.job_attempts)
    from svd.jobs.sqlite import SQLiteJobs

    return SQLiteJobs(Path(settings.jobs_db), settings.job_lease, settings.job_attempts, settings.workers)


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).isoformat()

"""Jobs that are never lost: what a job is, its statuses, and what the stores exchange.

A job is submitted with its image and controls, waits `pending` until a worker whose
GPU is free claims it, runs `in_progress` under a lease its worker renews, and ends
`completed`, `failed` or `canceled`. A lease that lapses (its worker died) lets another
worker claim the job again, up to the store's attempts; then it fails, saying so.
The statuses are BentoML's, so its clients read them unchanged.

The interface every store implements is svd/jobs/store.py; the webhook events a job
sends are svd/jobs/webhooks/events.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from svd.base.ids import new_id
from svd.base.progress import Progress


class JobStatus(StrEnum):
    """A job's status: BentoML's words, stored and answered as these strings."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


PENDING = JobStatus.PENDING
IN_PROGRESS = JobStatus.IN_PROGRESS
COMPLETED = JobStatus.COMPLETED
FAILED = JobStatus.FAILED
CANCELED = JobStatus.CANCELED
FINISHED = (COMPLETED, FAILED, CANCELED)
# Finished jobs' records, their input included so that /retry can run them again, are kept
# this long (as BentoML kept its task results); a completed job's video stays in the output
# folder for as long as SVD_OUTPUT_KEEP allows.
RETENTION_SECONDS = 24 * 3600
# The bytes of images the stores keep by default (SVD_INPUT_KEEP): an image is kept once,
# by its content's hash, however many jobs (retries) use it; beyond this, the images of
# finished jobs go, least recently submitted first, and /retry of those jobs answers 404.
# Unfinished jobs' images always stay: the queue's bound bounds them.
INPUT_KEEP_BYTES = 500 * 1000**2
# An Idempotency-Key answers its job this long after its submit.
IDEMPOTENCY_SECONDS = 24 * 3600
# The progress of a job that waits, as the stores keep it.
QUEUED = json.dumps(asdict(Progress()))


class QueueFull(Exception):
    """Submit refused: the store already holds as many unfinished jobs (`limit`) as it may.

    `retry_after` is one generation's time, the last job's, when the store knows it.
    """

    def __init__(self, unfinished: int, limit: int, retry_after: float | None):
        super().__init__(unfinished)
        self.unfinished = unfinished
        self.limit = limit
        self.retry_after = retry_after


class UserQueueFull(QueueFull):
    """Submit refused: the user already has as many unfinished jobs (`limit`) as SVD_MAX_QUEUE_PER_USER allows."""


class StoreUnavailable(Exception):
    """The store cannot be reached now (Redis down or restarting); the message names it."""


@dataclass(frozen=True)
class QueueDepth:
    """How many jobs wait for a GPU and run on one, and how long the oldest has waited."""

    waiting: int
    running: int
    oldest_waiting_seconds: float
    # Each owner's jobs waiting and running, for those who have any.
    by_owner: dict[str, tuple[int, int]] = field(default_factory=dict)


class KeyReused(Exception):
    """Submit refused: the Idempotency-Key was already used, for `job_id`, with another request."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


class UnknownJob(KeyError):
    """No job has this id (never submitted, or its record has expired)."""


@dataclass(frozen=True)
class Job:
    """What the store knows of a job; times are seconds since the epoch."""

    id: str
    status: JobStatus
    created: float
    started: float | None = None
    finished: float | None = None
    attempt: int = 0
    progress: Progress | None = None
    # A failed job's error, and the HTTP status /generate_task/get answers it with.
    error: str | None = None
    error_status: int | None = None
    # The user who submitted it (svd/base/users.py).
    owner: str = ""

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
class Idempotency:
    """A submit's Idempotency-Key, scoped to its token (`key`), and a digest of its request
    (`request`): the same key and request answer the job first submitted, for IDEMPOTENCY_SECONDS."""

    key: str
    request: str


@dataclass(frozen=True)
class Unfinished:
    """A job waiting or running, as the queue's position and ETA need it."""

    id: str
    status: JobStatus
    started: float | None
    controls: dict[str, Any]
    owner: str = ""
    created: float = 0.0


@dataclass(frozen=True)
class Speeds:
    """This service's measured speed: seconds per job of each size it has run (svd/jobs/eta.py's
    size_of), and seconds per unit of work for sizes it has not; the same for the seconds each job
    held its worker's GPU turn, after which the worker's next job starts (`turn_`)."""

    by_size: dict[str, float]
    per_work: float | None
    turn_by_size: dict[str, float] = field(default_factory=dict)
    turn_per_work: float | None = None


@dataclass(frozen=True)
class Webhook:
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
    owner: str = ""


def image_hash(image: bytes) -> str:
    """The name an image is kept under: its content's SHA-256."""
    return hashlib.sha256(image).hexdigest()


def new_delivery_id() -> str:
    return f"msg_{new_id()}"


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).isoformat()
